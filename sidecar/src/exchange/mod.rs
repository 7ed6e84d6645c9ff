//! The HTTP side of an intercepted connection: serving the agent (HTTP/1.1
//! or HTTP/2), deciding and rewriting each request, forwarding it, and
//! checking what comes back.
//!
//! - [`plan`]: the pure decision and head rewrite of one request;
//! - [`body`]: request bodies scanned on the way out, responses checked
//!   for echoes on the way back;
//! - [`guard`]: the HTTP/1.1 request-smuggling guard;
//! - [`handler`]: one request end to end, and its accounting;
//! - [`serve`] (here): one connection.

pub mod body;
pub mod guard;
pub mod handler;
pub mod plan;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::engine::{Engine, EngineSettings};
use crate::listen::ConnGuard;
use crate::upstream::BoxError;

/// The body type answered to the agent.
pub type RespBody = UnsyncBoxBody<Bytes, BoxError>;

/// What is known about a connection before its first request (owned; see
/// [`plan::ConnFacts`]).
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    pub sni: Option<String>,
    pub port: u16,
    pub original: Option<SocketAddr>,
    pub tunnel_host: Option<String>,
    pub proxy_form: bool,
    /// The connection's place under the cap; a tunnel takes it along.
    pub guard: Option<Arc<ConnGuard>>,
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

/// The HTTP/1.1 server settings every agent-facing connection uses: heads
/// within `--max-header-bytes` (hyper's exact limit; 431 beyond) and within
/// `--header-timeout`, which also closes an idle keep-alive connection.
pub fn http1_builder(settings: &EngineSettings) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_header_size(settings.max_header_bytes as usize)
        .max_buf_size(settings.max_header_bytes as usize)
        .keep_alive(true);
    builder
}

/// Runs an agent-facing HTTP/1.1 connection until it ends, or until
/// `shutdown`, after which the request in flight completes and it closes.
pub async fn serve_h1_until_shutdown<I, S, B>(
    conn: hyper::server::conn::http1::UpgradeableConnection<I, S>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Serves one connection until it closes or the engine shuts down (then
/// in-flight requests complete and it closes).
pub async fn serve<IO>(io: IO, protocol: Protocol, info: ConnInfo, engine: Arc<Engine>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let settings = &engine.settings;
    let shutdown = engine.shutdown.clone();
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
            let conn = http1_builder(settings)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            if let Err(e) = serve_h1_until_shutdown(conn, &shutdown).await {
                tracing::debug!(error = %e, connection = %info.describe(), "HTTP/1.1 connection ended");
            }
        }
        Protocol::Http2 => {
            let activity = Arc::new(Activity::new());
            let service = {
                let (engine, info, activity) = (engine.clone(), info.clone(), activity.clone());
                service_fn(move |request| {
                    let (engine, info, activity) = (engine.clone(), info.clone(), activity.clone());
                    async move {
                        let stream = activity.start();
                        let response = handler::handle(engine, info, None, request).await;
                        Ok::<_, std::convert::Infallible>(response.map(|body| {
                            Tracked {
                                body,
                                _stream: stream,
                            }
                            .boxed_unsync()
                        }))
                    }
                })
            };
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_header_list_size(settings.max_header_bytes)
                .max_concurrent_streams(100)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20));
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let idle = activity.idle(settings.header_timeout, settings.idle_timeout);
            tokio::pin!(idle);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                () = &mut idle => {
                    // No stream at all, or none for the idle timeout: a
                    // connection may not hold its place for nothing.
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

/// The streams of one HTTP/2 connection, for its idle deadline.
struct Activity {
    epoch: Instant,
    open: AtomicUsize,
    /// When the last stream ended (ms since `epoch`); `u64::MAX`: none yet.
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(u64::MAX),
        }
    }

    fn start(self: &Arc<Self>) -> StreamOpen {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamOpen(self.clone())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Resolves when the connection has had no stream for `first` from its
    /// start, or no open stream for `idle` since the last one ended.
    async fn idle(self: &Arc<Self>, first: Duration, idle: Duration) {
        loop {
            if self.open.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(idle.min(Duration::from_secs(5))).await;
                continue;
            }
            let last = self.last_end_ms.load(Ordering::Acquire);
            let (since, limit) = if last == u64::MAX {
                (0, first)
            } else {
                (last, idle)
            };
            let quiet = Duration::from_millis(self.now_ms().saturating_sub(since));
            if quiet >= limit {
                return;
            }
            tokio::time::sleep((limit - quiet).max(Duration::from_millis(100))).await;
        }
    }
}

/// One open HTTP/2 stream, until its response body is done.
struct StreamOpen(Arc<Activity>);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.last_end_ms.store(self.0.now_ms(), Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its stream counted as open until it ends.
struct Tracked {
    body: RespBody,
    _stream: StreamOpen,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A JSON answer from the sidecar itself:
/// `{"error", "reason", "detail", "binding", "from"}`.
pub fn json_response(
    status: StatusCode,
    decision: &str,
    reason: &str,
    detail: &str,
    binding: Option<&str>,
) -> Response<RespBody> {
    let mut body = serde_json::json!({
        "error": decision,
        "reason": reason,
        "detail": detail,
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
