//! The smuggling guard against hyper itself: the same bytes go to a real
//! hyper HTTP/1.1 server and to the guard. Every request hyper hands to its
//! service must have a verdict from the guard for that very request (the
//! same target, in the same order), unless the guard gave up (then every
//! later request is refused, which fails closed). A guard that drifts out
//! of step with hyper would let a verdict meant for one request vouch for
//! another.
#![no_main]

use std::sync::{Arc, Mutex};

use credbroker_sidecar::exchange::guard::FramingTracker;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() > 16 * 1024 {
        return;
    }
    let mut guard = FramingTracker::new(8192 + 4096);
    guard.feed(data);

    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let seen2 = seen.clone();
        let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let seen = seen2.clone();
            async move {
                seen.lock().unwrap().push(request.uri().to_string());
                // Read the body as hyper frames it, as the proxy would.
                let _ = request.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.max_buf_size(8192).max_header_size(8192);
        let conn = builder.serve_connection(TokioIo::new(server), service);
        let mut client = client;
        let writer = async move {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Drain responses so hyper never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            tokio::join!(conn, writer)
        })
        .await;
    });
    let seen = seen.lock().unwrap();
    for (i, target) in seen.iter().enumerate() {
        match guard.targets.get(i) {
            // http's Uri drops a fragment (`/a#b` is served as `/a`); the
            // guard keeps the target as sent.
            Some(ours) => assert_eq!(
                ours.split('#').next().unwrap_or(""),
                target,
                "request {i}: hyper served {target:?}, the guard's verdict is for {ours:?}"
            ),
            None => assert!(
                guard.is_lost(),
                "hyper served request {i} ({target:?}) the guard never saw, and the guard did not give up"
            ),
        }
    }
});
