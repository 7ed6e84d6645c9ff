//! Health and metrics on their own port: `/healthz` (the process serves),
//! `/readyz` (started: logged in to Vault, and leading or standing by) and
//! `/metrics`. Nothing here is secret.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What `/metrics` shows: the controller's metrics, or the webhook's
/// (which serves its probes through this module too).
pub trait RenderMetrics: Send + Sync {
    fn render(&self) -> String;
}

impl RenderMetrics for crate::metrics::Metrics {
    fn render(&self) -> String {
        crate::metrics::Metrics::render(self)
    }
}

/// Probes and a scraper need a handful of connections.
const MAX_CONNECTIONS: usize = 32;

/// What the probes report.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<dyn RenderMetrics>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| {
                let answer = answer(&health, metrics.as_ref(), &request);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(
    health: &Health,
    metrics: &dyn RenderMetrics,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if health.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
        "/metrics" => text(StatusCode::OK, metrics.render()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
