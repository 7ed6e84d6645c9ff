//! The HTTP side of an intercepted connection: serving the agent (HTTP/1.1
//! or HTTP/2), deciding and rewriting each request, forwarding it, and
//! checking what comes back.
//!
//! - [`plan`]: the pure decision and head rewrite of one request;
//! - [`body`]: request bodies scanned on the way out, responses checked
//!   for echoes on the way back;
//! - [`guard`]: the HTTP/1.1 request-smuggling guard;
//! - [`handler`]: one request end to end;
//! - [`serve`] (here): one connection.

pub mod body;
pub mod guard;
pub mod handler;
pub mod plan;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::upstream::BoxError;

/// The body type answered to the agent.
pub type RespBody = UnsyncBoxBody<Bytes, BoxError>;

/// What is known about a connection before its first request (owned; see
/// [`plan::Conn`]).
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    pub sni: Option<String>,
    pub port: u16,
    pub original: Option<SocketAddr>,
    pub tunnel_host: Option<String>,
    pub proxy_form: bool,
}

impl ConnInfo {
    /// `host:port` as far as the connection knows it (for refusals before
    /// the request names its host).
    pub fn describe(&self) -> String {
        match (&self.sni, &self.tunnel_host, &self.original) {
            (Some(host), _, _) | (None, Some(host), _) => format!("{host}:{}", self.port),
            (None, None, Some(addr)) => addr.to_string(),
            (None, None, None) => String::new(),
        }
    }
}

/// Which HTTP the agent speaks on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Serves one connection until it closes or `shutdown` asks it to finish
/// (in-flight requests complete, then it closes).
pub async fn serve<IO>(
    io: IO,
    protocol: Protocol,
    info: ConnInfo,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let settings = &engine.settings;
    match protocol {
        Protocol::Http1 => {
            let (io, verdicts) =
                guard::GuardedIo::new(io, guard::head_limit(settings.max_header_bytes));
            let service = {
                let (engine, info) = (engine.clone(), info.clone());
                service_fn(move |request| {
                    let (engine, info, verdicts) = (engine.clone(), info.clone(), verdicts.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            handler::handle(engine, info, Some(verdicts), request).await,
                        )
                    }
                })
            };
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_timeout)
                // The exact limit (431 beyond); max_buf_size alone is only
                // checked between reads.
                .max_header_size(settings.max_header_bytes as usize)
                .max_buf_size(settings.max_header_bytes as usize)
                .keep_alive(true);
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
                tracing::debug!(error = %e, connection = %info.describe(), "HTTP/1.1 connection ended");
            }
        }
        Protocol::Http2 => {
            let service = {
                let (engine, info) = (engine.clone(), info.clone());
                service_fn(move |request| {
                    let (engine, info) = (engine.clone(), info.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            handler::handle(engine, info, None, request).await,
                        )
                    }
                })
            };
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_header_list_size(settings.max_header_bytes)
                .max_concurrent_streams(256)
                .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, connection = %info.describe(), "HTTP/2 connection ended");
            }
        }
    }
}

/// A JSON answer from the sidecar itself: `{"error", "reason", "binding"}`.
pub fn json_response(
    status: StatusCode,
    decision: &str,
    reason: &str,
    binding: Option<&str>,
) -> Response<RespBody> {
    let mut body = serde_json::json!({
        "error": decision,
        "reason": reason,
        "from": "credbroker",
    });
    if let Some(binding) = binding {
        body["binding"] = serde_json::Value::from(binding);
    }
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(value) = HeaderValue::from_str(decision) {
        headers.insert("x-credbroker-decision", value);
    }
    response
}
