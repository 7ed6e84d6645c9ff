//! Local mode: an explicit HTTP proxy on loopback with the same engine, for
//! laptops, CI and the demo (`HTTPS_PROXY=http://127.0.0.1:PORT`).
//!
//! - `CONNECT host:port`: a tunnel. To a bound host, the sidecar answers
//!   `200` and then treats the tunnel exactly like an intercepted connection
//!   to `host:port` (its TLS must name `host`); to another host it splices
//!   to the name it resolved itself, or refuses with `403` in `deny` mode.
//! - absolute-form requests (`GET http://host/path`): cleartext HTTP,
//!   decided as in the pod.
//! - anything else gets a `400` saying how to use the proxy.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::EgressMode;
use crate::engine::Engine;
use crate::http::guard::GuardedIo;
use crate::http::{ConnInfo, RespBody, handler, json_response};
use crate::intercept::{PeekTimeouts, peek_client_hello};
use crate::route::{Destination, Dial, route};

/// Accepts proxy clients on `listener` until `shutdown`.
pub async fn accept_loop(
    engine: Arc<Engine>,
    listener: TcpListener,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::error!(error = %e, "accepting a proxy client failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            engine.metrics.connection("over_limit");
            continue;
        };
        let (engine, shutdown2, tracker2) = (engine.clone(), shutdown.clone(), tracker.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let _open = engine.metrics.open_connection();
            serve_client(engine, stream, tracker2, shutdown2).await;
        });
    }
}

async fn serve_client(
    engine: Arc<Engine>,
    stream: TcpStream,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (io, verdicts) = GuardedIo::new(
        stream,
        crate::http::guard::head_limit(engine.settings.max_header_bytes),
    );
    let info = Arc::new(ConnInfo {
        proxy_form: true,
        ..ConnInfo::default()
    });
    let service = {
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        service_fn(move |request: Request<Incoming>| {
            let (engine, info, verdicts) = (engine.clone(), info.clone(), verdicts.clone());
            let (tracker, shutdown) = (tracker.clone(), shutdown.clone());
            async move {
                let response = if request.method() == Method::CONNECT {
                    // The guard follows heads only up to a CONNECT; take
                    // its verdict so the next request gets its own.
                    let _ = verdicts.next();
                    connect(engine, request, tracker, shutdown)
                } else {
                    handler::handle(engine, info, Some(verdicts), request).await
                };
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(engine.settings.header_timeout)
        .max_header_size(engine.settings.max_header_bytes as usize)
        .max_buf_size(engine.settings.max_header_bytes as usize);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "proxy client connection ended");
    }
}

/// Answers a CONNECT, and runs its tunnel once the client switches.
fn connect(
    engine: Arc<Engine>,
    mut request: Request<Incoming>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> Response<RespBody> {
    let Some(authority) = request.uri().authority().cloned() else {
        return close(json_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "CONNECT needs host:port",
            None,
        ));
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let Some(port) = authority.port_u16() else {
        return close(json_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "CONNECT needs host:port",
            None,
        ));
    };
    let snapshot = engine.snapshot();
    let covered = snapshot.covers(&host, port, true) || snapshot.covers(&host, port, false);
    if !covered && engine.settings.egress == EgressMode::Deny {
        engine.metrics.connection("refused");
        return close(json_response(
            StatusCode::FORBIDDEN,
            "egress_denied",
            &format!("{host}:{port} is not a bound destination, and egress is deny"),
            None,
        ));
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    let tracker2 = tracker.clone();
    tracker2.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT tunnel was not opened");
                return;
            }
        };
        let mut io = TokioIo::new(upgraded);
        let timeouts = PeekTimeouts {
            first_byte: engine.settings.first_byte_timeout,
            complete: engine.settings.client_hello_timeout,
        };
        let peeked = match peek_client_hello(&mut io, timeouts).await {
            Ok(peeked) => peeked,
            Err(e) => {
                tracing::debug!(error = %e, "reading a tunnel's first bytes failed");
                return;
            }
        };
        let destination = Destination {
            port,
            dial: Dial::Name(host.clone(), port),
            original: None,
            tunnel_host: Some(host),
        };
        route(engine, io, peeked, destination, shutdown).await;
    });
    let _ = tracker;
    Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync())
}

/// Asks the client to close the connection after this answer (the framing
/// guard stops following a connection at a CONNECT).
fn close(mut response: Response<RespBody>) -> Response<RespBody> {
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}
