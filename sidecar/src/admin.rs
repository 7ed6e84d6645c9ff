//! The admin port: `/healthz` (the process serves), `/readyz` (config
//! loaded and every bound secret read; else 503 saying what is missing),
//! `/metrics` (Prometheus). Nothing here carries a secret or a placeholder.
//! It has its own small connection cap, so a flood of it cannot take the
//! proxy's descriptors.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::engine::Engine;
use crate::listen::{Listener, accept_loop};

/// Admin connections open at once (probes and a scraper need a handful).
const MAX_ADMIN_CONNECTIONS: usize = 32;

/// Serves the admin endpoints on `listener` until shutdown.
pub async fn serve(engine: Arc<Engine>, listener: TcpListener) {
    let l = Listener {
        listener,
        limit: Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS)),
        // Not the proxy's tracker: the drain does not wait for scrapers.
        tasks: tokio_util::task::TaskTracker::new(),
        shutdown: engine.shutdown.clone(),
        metrics: None,
        what: "admin",
    };
    accept_loop(l, move |stream, guard| {
        let engine = engine.clone();
        async move {
            let _guard = guard;
            let service = service_fn(move |request| {
                let engine = engine.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&engine, &request)) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await;
}

fn answer(engine: &Engine, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match engine.is_ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let mut response = text(StatusCode::OK, engine.metrics.render());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /healthz, /readyz, /metrics\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
