//! The admin port: `/healthz` (the process serves), `/readyz` (config
//! loaded and every bound secret read; else 503 saying what is missing),
//! `/metrics` (Prometheus), `/status` (each binding's secret as the broker
//! holds it: state, version, a fingerprint). Nothing here carries a secret
//! or a placeholder.
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
        // /status is for whoever is inside the pod (or `kubectl
        // port-forward`, which arrives on loopback), not the cluster.
        let from_loopback = stream
            .peer_addr()
            .is_ok_and(|a| a.ip().to_canonical().is_loopback());
        async move {
            let _guard = guard;
            let service = service_fn(move |request| {
                let engine = engine.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(answer(&engine, &request, from_loopback))
                }
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

fn answer(
    engine: &Engine,
    request: &Request<Incoming>,
    from_loopback: bool,
) -> Response<Full<Bytes>> {
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
        "/status" if !from_loopback => text(
            StatusCode::FORBIDDEN,
            "/status answers only on loopback (inside the pod, or through kubectl port-forward)\n"
                .into(),
        ),
        "/status" => {
            let mut response = text(StatusCode::OK, status_json(engine));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
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
            "not found: /healthz, /readyz, /metrics, /status\n".into(),
        ),
    }
}

/// `/status`: per binding, its state, the version in use, the value's
/// fingerprint (a keyed hash, random per process: it shows a change, and
/// nothing of the value) and when the source last confirmed it.
fn status_json(engine: &Engine) -> String {
    use crate::store::SecretState;
    let view = engine.store().view();
    let mut ids: Vec<&String> = view.states.keys().collect();
    ids.sort();
    let bindings: Vec<serde_json::Value> = ids
        .into_iter()
        .map(|id| match &view.states[id] {
            SecretState::Pending => serde_json::json!({ "id": id, "state": "pending" }),
            SecretState::Ready(s) => serde_json::json!({
                "id": id,
                "state": if s.usable_at(tokio::time::Instant::now()) { "ready" } else { "stale" },
                "version": s.version(),
                "fingerprint": s.fingerprint(),
                "lastSuccess": s.confirmed_unix(),
            }),
            SecretState::Failed(f) => serde_json::json!({
                "id": id,
                "state": "failed",
                "step": f.step,
                "reason": f.message,
            }),
        })
        .collect();
    let mut out = serde_json::json!({
        "source": engine.store().source_kind(),
        "ready": engine.is_ready().is_ok(),
        "bindings": bindings,
    })
    .to_string();
    out.push('\n');
    out
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
