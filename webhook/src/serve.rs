//! AdmissionReview over HTTPS (rustls): `POST /mutate`. The certificate
//! comes from [`crate::certs::ServingCert`], swapped without a restart.
//! Bodies are bounded and every read has a deadline: the API server is the
//! only expected client, but the port is reachable in the cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::bindings::BindingsCache;
use crate::certs::ServingCert;
use crate::metrics::Metrics;
use crate::review::{self, Outcome};
use crate::settings::InjectSettings;
use crate::{Error, Result};

/// The largest AdmissionReview read: a pod near etcd's 1.5 MiB object
/// limit, encoded in a review that carries it once.
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
/// Open connections at once (the API server keeps a few alive).
const MAX_CONNECTIONS: usize = 512;
/// The TLS handshake and the request head must arrive within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole body must arrive within this (the API server gives up after
/// the webhook's `timeoutSeconds` anyway).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What every admission needs.
pub struct Admitter {
    pub settings: InjectSettings,
    pub bindings: BindingsCache,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Admitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitter").finish_non_exhaustive()
    }
}

/// The TLS settings: TLS 1.2 and 1.3 with ring, HTTP/2 or HTTP/1.1.
pub fn tls_config(serving: Arc<ServingCert>) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Certificate(format!("TLS settings: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    admitter: Arc<Admitter>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many open connections; closing one");
            continue;
        };
        let (acceptor, admitter) = (acceptor.clone(), admitter.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = service_fn(move |request| {
                let admitter = admitter.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&admitter, request).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            builder.http2().timer(TokioTimer::new());
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

async fn handle(admitter: &Admitter, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != "/mutate" {
        return text(StatusCode::NOT_FOUND, "not found: POST /mutate\n");
    }
    if request.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n");
    }
    let body = Limited::new(request.into_body(), MAX_REVIEW_BYTES);
    let body = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            admitter.metrics.admission(Outcome::Malformed, 0.0);
            return text(status, "the request body could not be read\n");
        }
        Err(_) => {
            admitter.metrics.admission(Outcome::Malformed, 0.0);
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "the request body was too slow\n",
            );
        }
    };
    let started = Instant::now();
    let mut new_placeholder = |prefix: Option<&str>| {
        credbroker_crds::config::generate_placeholder(prefix).map_err(|e| e.to_string())
    };
    let lookup = |ns: &str, sa: &str| admitter.bindings.lookup(ns, sa);
    let answer = review::review(&body, &admitter.settings, &lookup, &mut new_placeholder);
    let took = started.elapsed();
    admitter
        .metrics
        .admission(answer.outcome, took.as_secs_f64());
    match answer.outcome {
        Outcome::Refused => tracing::info!(
            pod = %answer.pod, result = answer.outcome.label(), reason = %answer.detail,
            took_us = took.as_micros() as u64, "pod refused"
        ),
        Outcome::Malformed => tracing::warn!(reason = %answer.detail, "malformed admission review"),
        Outcome::Injected | Outcome::AlreadyInjected => tracing::info!(
            pod = %answer.pod, result = answer.outcome.label(), detail = %answer.detail,
            took_us = took.as_micros() as u64, "pod admitted"
        ),
        Outcome::Skipped => tracing::debug!(pod = %answer.pod, reason = %answer.detail, "skipped"),
    }
    match answer.body {
        Some(body) => {
            let mut response = Response::new(Full::new(Bytes::from(
                serde_json::to_vec(&body).unwrap_or_default(),
            )));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        None => text(StatusCode::BAD_REQUEST, &format!("{}\n", answer.detail)),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}
