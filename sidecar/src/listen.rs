//! Accepting connections, for every listener the sidecar has (the
//! transparent proxy's, the local proxy's, the admin port's): a cap on how
//! many are open at once, every connection on a task tracker so a drain can
//! wait for it, and back-off when accepting fails.
//!
//! A connection holds a [`ConnGuard`] for as long as it is open; a tunnel it
//! turns into (a WebSocket upgrade, a CONNECT) takes the guard along, so
//! the cap and the open-connection gauge count it until it closes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{Metrics, OpenConnection};

/// An open connection's place under the cap (and in the gauge).
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    _open: Option<OpenConnection>,
}

impl std::fmt::Debug for ConnGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnGuard")
    }
}

/// How one listener accepts.
pub struct Listener {
    pub listener: TcpListener,
    /// The cap this listener's connections count against.
    pub limit: Arc<Semaphore>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    /// Counted in `credbroker_sidecar_open_connections` (not the admin port).
    pub metrics: Option<Arc<Metrics>>,
    /// For logs: `proxy`, `local`, `admin`.
    pub what: &'static str,
}

impl Listener {
    /// A listener of agents' connections: they count against the engine's
    /// cap, run on its tracker (the drain waits for them) and in its metrics.
    pub fn for_agents(
        engine: &crate::engine::Engine,
        listener: TcpListener,
        what: &'static str,
    ) -> Self {
        Self {
            listener,
            limit: engine.connections.clone(),
            tasks: engine.tasks.clone(),
            shutdown: engine.shutdown.clone(),
            metrics: Some(engine.metrics.clone()),
            what,
        }
    }
}

/// Accepts until shutdown, running `handle` for each connection on the
/// tracker. A connection past the cap is closed at once.
pub async fn accept_loop<F, Fut>(l: Listener, handle: F)
where
    F: Fn(TcpStream, Arc<ConnGuard>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = l.listener.accept() => accepted,
            () = l.shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: back off rather than spin.
                tracing::error!(error = %e, listener = l.what, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = l.limit.clone().try_acquire_owned() else {
            if let Some(m) = &l.metrics {
                m.connection("over_limit");
            }
            tracing::warn!(
                listener = l.what,
                "too many connections; a new one was closed"
            );
            continue;
        };
        let guard = Arc::new(ConnGuard {
            _permit: permit,
            _open: l.metrics.as_ref().map(|m| m.open_connection()),
        });
        let _ = stream.set_nodelay(true);
        l.tasks.spawn(handle(stream, guard));
    }
}
