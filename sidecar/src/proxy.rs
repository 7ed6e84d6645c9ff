//! The in-pod transparent proxy: loopback listeners (IPv4 and IPv6) fed by
//! the pod's REDIRECT rules. Each connection's original destination is
//! recovered, its first bytes are peeked, and [`crate::route`] decides.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::engine::Engine;
use crate::intercept::{PeekTimeouts, original_dst, peek_client_hello};
use crate::listen::{ConnGuard, Listener, accept_loop};
use crate::route::{Destination, Dial, route};

/// Serves redirected connections on `listener` until shutdown.
pub async fn serve(engine: Arc<Engine>, listener: TcpListener) {
    let l = Listener::for_agents(&engine, listener, "proxy");
    accept_loop(l, move |stream, guard| {
        handle(engine.clone(), stream, guard)
    })
    .await;
}

async fn handle(engine: Arc<Engine>, mut stream: TcpStream, guard: Arc<ConnGuard>) {
    let original = match original_dst(&stream) {
        Ok(original) => original,
        Err(e) => {
            engine.metrics.connection("not_redirected");
            tracing::debug!(error = %e, "connection refused");
            return;
        }
    };
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
    let destination = Destination {
        port: original.port(),
        dial: Dial::Addr(original.addr()),
        original: Some(original.addr()),
        tunnel_host: None,
    };
    route(engine, stream, peeked, destination, guard).await;
}
