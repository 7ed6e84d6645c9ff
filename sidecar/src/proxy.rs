//! The in-pod transparent proxy's listeners: loopback only (IPv4 and IPv6),
//! fed by the pod's REDIRECT rules. Each connection's original destination
//! is recovered, its first bytes are peeked, and [`crate::route`] decides.
//!
//! The number of connections is capped; past the cap a connection is
//! closed at once, so a flood cannot exhaust memory or descriptors.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::Engine;
use crate::intercept::{PeekTimeouts, original_dst, peek_client_hello};
use crate::route::{Destination, Dial, route};

/// Accepts on `listener` until `shutdown`; every connection task is
/// spawned on `tracker`, so shutdown can wait for them.
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
        let (stream, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: back off rather than spin.
                tracing::error!(error = %e, "accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            engine.metrics.connection("over_limit");
            tracing::warn!("too many connections; a new one was closed");
            continue;
        };
        let (engine, shutdown) = (engine.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let _open = engine.metrics.open_connection();
            handle(engine, stream, shutdown).await;
        });
    }
}

async fn handle(engine: Arc<Engine>, mut stream: TcpStream, shutdown: CancellationToken) {
    let original = match original_dst(&stream) {
        Ok(original) => original,
        Err(e) => {
            engine.metrics.connection("not_redirected");
            tracing::debug!(error = %e, "connection refused");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let timeouts = PeekTimeouts {
        first_byte: engine.settings.first_byte_timeout,
        complete: engine.settings.client_hello_timeout,
    };
    let peeked = match peek_client_hello(&mut stream, timeouts).await {
        Ok(peeked) => peeked,
        Err(e) => {
            tracing::debug!(error = %e, original = %original, "reading a connection's first bytes failed");
            return;
        }
    };
    if engine.settings.egress == crate::config::EgressMode::Deny {
        // Refused connections are reset, so the agent sees a refusal at
        // once instead of a hang.
        let _ = stream.set_zero_linger();
    }
    let destination = Destination {
        port: original.port(),
        dial: Dial::Addr(original.addr()),
        original: Some(original.addr()),
        tunnel_host: None,
    };
    route(engine, stream, peeked, destination, shutdown).await;
}
