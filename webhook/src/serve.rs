//! AdmissionReview over HTTPS (rustls): `POST /mutate`. The certificate
//! comes from [`crate::certs::ServingCert`], swapped without a restart.
//!
//! The API server is the only expected client, but the port is reachable
//! in the cluster, so no client holds a connection slot or memory for
//! long:
//!
//! - At most [`MAX_CONNECTIONS`] connections are open; one more is closed
//!   at once (and said so in a warning at most every 5 s).
//! - The TLS handshake must end within 10 s. The protocol is the one ALPN
//!   negotiated: HTTP/2 for `h2`, HTTP/1.1 otherwise. Nothing is sniffed.
//! - The first complete request head must arrive within 10 s of the
//!   handshake, or the connection is closed. HTTP/1.1 then allows 10 s for
//!   every later request head too, counted while the connection idles
//!   between requests. HTTP/2 allows 16 streams at once and 128 KiB of
//!   unread data per connection, pings every 30 s, and closes a connection
//!   whose ping goes unanswered for 10 s.
//! - After 5 minutes a connection is shut down gracefully (HTTP/2 GOAWAY,
//!   HTTP/1.1 `Connection: close`). The API server reconnects, and the
//!   Service spreads the new connections across the replicas.
//! - At most 32 bodies are read at once, across all connections. A request
//!   that gets no turn within 2 s is answered 503. A body is read up to
//!   [`MAX_REVIEW_BYTES`] (413 past that) and within 10 s (408).
//! - Until the bindings have been listed, a review that asks for a service
//!   account's bindings (the creation of an opted-in pod, in a namespace
//!   that is injected) is refused: `allowed: false`, code 503, and a
//!   message asking to retry. Any other review gets its usual answer,
//!   since that answer reads no bindings.
//! - When `shutdown` is cancelled, the listener closes and every connection
//!   is shut down gracefully. Requests in flight get 10 s to finish.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bindings::BindingsCache;
use crate::certs::ServingCert;
use crate::metrics::Metrics;
use crate::review::{self, Outcome};
use crate::settings::InjectSettings;
use crate::{Error, Result};

/// The largest AdmissionReview read: a pod near etcd's 1.5 MiB object
/// limit, encoded in a review that carries it once. Not 3 MiB: the API
/// server takes a 3 MiB JSON pod, and its review is a little larger.
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
/// Open connections at once (the API server keeps a few alive).
pub const MAX_CONNECTIONS: usize = 512;
/// How long the requests in flight get once a connection is being shut
/// down (at its maximum age, or at shutdown).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The refusal while the bindings are not loaded yet.
const NOT_SYNCED_MESSAGE: &str =
    "credbroker: the webhook has not loaded the bindings yet; retry in a moment";

/// The bounds a client is held to. Fields rather than constants, so tests
/// can shorten them.
#[derive(Debug, Clone)]
struct Limits {
    connections: usize,
    /// For the TLS handshake; then for the first request head after it;
    /// and, on HTTP/1.1, for each later request head.
    handshake: Duration,
    /// For a whole body.
    body: Duration,
    /// Bodies read at once, across connections: each may hold
    /// [`MAX_REVIEW_BYTES`], twice while it is collected, so this bounds
    /// the memory requests can take.
    bodies: usize,
    /// How long a request waits for its turn to read a body.
    body_turn: Duration,
    /// HTTP/2 streams per connection.
    streams: u32,
    /// HTTP/2 flow-control windows (per stream and per connection): what
    /// a client can make the server buffer before a body is read at all.
    window: u32,
    ping_interval: Duration,
    ping_timeout: Duration,
    /// After this a connection is shut down gracefully.
    max_age: Duration,
    drain: Duration,
    /// Between two "too many open connections" warnings.
    full_warning: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: MAX_CONNECTIONS,
            handshake: Duration::from_secs(10),
            // The API server gives up after the webhook's `timeoutSeconds`
            // anyway.
            body: Duration::from_secs(10),
            bodies: 32,
            body_turn: Duration::from_secs(2),
            streams: 16,
            // 512 connections × 128 KiB = 64 MiB at most, and most pods fit
            // in one window.
            window: 128 * 1024,
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(300),
            drain: DRAIN_TIMEOUT,
            full_warning: Duration::from_secs(5),
        }
    }
}

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

/// What the connections share.
struct Shared {
    admitter: Arc<Admitter>,
    /// Turns to read a body ([`Limits::bodies`]).
    bodies: Semaphore,
    limits: Limits,
}

/// Serves until `shutdown`, then shuts every connection down gracefully
/// and returns once they are closed, or after [`DRAIN_TIMEOUT`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    admitter: Arc<Admitter>,
    shutdown: CancellationToken,
) {
    serve_with(listener, tls, admitter, shutdown, Limits::default()).await;
}

async fn serve_with(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    admitter: Arc<Admitter>,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.connections));
    let shared = Arc::new(Shared {
        admitter,
        bodies: Semaphore::new(limits.bodies),
        limits,
    });
    let connections = TaskTracker::new();
    let mut last_full_warning: Option<Instant> = None;
    let mut closed_since_warning = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
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
            // Said at most every few seconds: a flood must not flood the
            // logs too.
            closed_since_warning += 1;
            if last_full_warning.is_none_or(|t| t.elapsed() >= shared.limits.full_warning) {
                tracing::warn!(
                    %peer,
                    closed = closed_since_warning,
                    "too many open connections ({}); closing new ones",
                    shared.limits.connections
                );
                last_full_warning = Some(Instant::now());
                closed_since_warning = 0;
            }
            continue;
        };
        // Answers are small and written at once: no reason to wait for
        // more to send.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, "setting TCP_NODELAY: {e}");
        }
        connections.spawn(connection(
            stream,
            peer,
            acceptor.clone(),
            shared.clone(),
            shutdown.clone(),
            permit,
        ));
    }
    // No new connections from here; each open one sees `shutdown` and
    // closes once its requests are answered.
    drop(listener);
    connections.close();
    let drain = shared.limits.drain;
    if tokio::time::timeout(drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "connections still open {drain:?} after shutdown began; closing them"
        );
    }
}

/// One connection, from the TLS handshake to its close.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let limits = &shared.limits;
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return,
        handshake = tokio::time::timeout(limits.handshake, acceptor.accept(stream)) => handshake,
    };
    let tls = match handshake {
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
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    // Cancelled by the first request head: until then the connection
    // has done nothing that earns it a slot.
    let requested = CancellationToken::new();
    let service = {
        let (shared, requested) = (shared.clone(), requested.clone());
        service_fn(move |request| {
            requested.cancel();
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, request).await) }
        })
    };
    let io = TokioIo::new(tls);
    let ends = Ends {
        peer,
        limits,
        requested: &requested,
        shutdown: &shutdown,
    };
    if h2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.streams)
            .initial_stream_window_size(limits.window)
            .initial_connection_window_size(limits.window)
            .keep_alive_interval(Some(limits.ping_interval))
            .keep_alive_timeout(limits.ping_timeout);
        let conn = builder.serve_connection(io, service);
        ends.drive(conn, |c| c.graceful_shutdown()).await;
    } else {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(limits.handshake);
        let conn = builder.serve_connection(io, service);
        ends.drive(conn, |c| c.graceful_shutdown()).await;
    }
}

/// When a connection ends, besides the client closing it.
struct Ends<'a> {
    peer: SocketAddr,
    limits: &'a Limits,
    requested: &'a CancellationToken,
    shutdown: &'a CancellationToken,
}

impl Ends<'_> {
    /// Drives `conn` until it ends: closed if no request head arrives in
    /// time; at its maximum age or at shutdown, closed if it has sent no
    /// request yet, else shut down gracefully (`graceful`) and dropped if
    /// its requests take longer than the drain.
    async fn drive<C>(&self, conn: C, graceful: impl FnOnce(Pin<&mut C>))
    where
        C: Future<Output = hyper::Result<()>>,
    {
        let mut conn = std::pin::pin!(conn);
        let first_request = tokio::time::sleep(self.limits.handshake);
        let max_age = tokio::time::sleep(self.limits.max_age);
        tokio::pin!(first_request, max_age);
        let mut waiting = true;
        let why = loop {
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(peer = %self.peer, "connection ended: {e}");
                    }
                    return;
                }
                _ = self.requested.cancelled(), if waiting => waiting = false,
                _ = &mut first_request, if waiting => {
                    tracing::debug!(
                        peer = %self.peer,
                        "no request within {:?} of the TLS handshake; closing",
                        self.limits.handshake
                    );
                    return;
                }
                _ = &mut max_age => break "the connection reached its maximum age",
                _ = self.shutdown.cancelled() => break "shutting down",
            }
        };
        // Nothing asked, nothing to answer: close now. (A graceful close
        // would also wait, on HTTP/2, for a client preface that may never
        // come.)
        if !self.requested.is_cancelled() {
            tracing::debug!(peer = %self.peer, "closing a connection that sent no request ({why})");
            return;
        }
        graceful(conn.as_mut());
        match tokio::time::timeout(self.limits.drain, conn).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(peer = %self.peer, "connection ended ({why}): {e}"),
            Err(_) => tracing::debug!(
                peer = %self.peer,
                "requests still running {:?} after the graceful close ({why}); closing",
                self.limits.drain
            ),
        }
    }
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let admitter = &shared.admitter;
    if request.uri().path() != "/mutate" {
        return text(StatusCode::NOT_FOUND, "not found: POST /mutate\n");
    }
    if request.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n");
    }
    // A declared length past the limit is refused before it takes a turn.
    if request.body().size_hint().lower() > MAX_REVIEW_BYTES as u64 {
        admitter.metrics.malformed_body();
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body could not be read\n",
        );
    }
    let Ok(Ok(_turn)) =
        tokio::time::timeout(shared.limits.body_turn, shared.bodies.acquire()).await
    else {
        admitter.metrics.overloaded();
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the webhook is reading too many requests at once; retry\n",
        );
    };
    let body = Limited::new(request.into_body(), MAX_REVIEW_BYTES);
    let body = match tokio::time::timeout(shared.limits.body, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            admitter.metrics.malformed_body();
            return text(status, "the request body could not be read\n");
        }
        Err(_) => {
            admitter.metrics.malformed_body();
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
    // Before the first list, finding no binding does not mean there is
    // none: a review that asks for bindings then is refused below, whatever
    // it would have been answered. One that does not ask (not a pod
    // creation, not opted in) reads nothing that is missing.
    let needed_unsynced = Cell::new(false);
    let lookup = |ns: &str, sa: &str| {
        if !admitter.bindings.is_synced() {
            needed_unsynced.set(true);
            return Default::default();
        }
        admitter.bindings.lookup(ns, sa)
    };
    let mut answer = review::review(&body, &admitter.settings, &lookup, &mut new_placeholder);
    if needed_unsynced.get() {
        answer.outcome = Outcome::Refused;
        answer.detail = "the bindings are not loaded yet".into();
        answer.body = match not_synced_refusal(&body) {
            Some(refusal) => Some(refusal),
            None => {
                admitter.metrics.malformed_body();
                return text(
                    StatusCode::BAD_REQUEST,
                    "the AdmissionReview has no request.uid\n",
                );
            }
        };
    }
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
    let Some(body) = answer.body else {
        return text(StatusCode::BAD_REQUEST, &format!("{}\n", answer.detail));
    };
    match serde_json::to_vec(&body) {
        Ok(json) => {
            let mut response = Response::new(Full::new(Bytes::from(json)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => {
            // An empty 200 would leave the API server to guess.
            tracing::error!(pod = %answer.pod, "serializing the AdmissionReview response: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "serializing the AdmissionReview response failed\n",
            )
        }
    }
}

/// The refusal of a review that needs the bindings before they are
/// loaded: the request's uid, `allowed: false`, code 503. `None` if the
/// body has no uid to answer to.
fn not_synced_refusal(body: &[u8]) -> Option<serde_json::Value> {
    #[derive(Deserialize)]
    struct Review {
        request: Request,
    }
    #[derive(Deserialize)]
    struct Request {
        uid: String,
    }
    let review: Review = serde_json::from_slice(body).ok()?;
    Some(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": review.request.uid,
            "allowed": false,
            "status": { "code": 503, "message": NOT_SYNCED_MESSAGE },
        },
    }))
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use futures::StreamExt as _;
    use http_body_util::combinators::UnsyncBoxBody;
    use hyper::body::Frame;
    use rustls::pki_types::ServerName;
    use serde_json::{Value, json};
    use tokio::io::AsyncReadExt as _;

    type ClientBody = UnsyncBoxBody<Bytes, Infallible>;

    struct Server {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        admitter: Arc<Admitter>,
        client_tls: Arc<rustls::ClientConfig>,
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A server with `limits`, a self-signed certificate for `localhost`,
    /// and bindings that never sync (no API server answers).
    async fn start(limits: Limits) -> Server {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let serving = ServingCert::new();
        serving.set_pem(&cert.pem(), &key.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client_tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let args = crate::run::Args::try_parse_from([
            "credbroker-webhook",
            "--namespace",
            "credbroker-system",
            "--sidecar-image",
            "sidecar:1",
            "--init-image",
            "init:1",
            "--vault-addr",
            "https://vault:8200",
            "--cert-mode",
            "provided",
        ])
        .unwrap();
        let shutdown = CancellationToken::new();
        // Nothing listens on port 9: the cache never syncs.
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let admitter = Arc::new(Admitter {
            settings: args.inject_settings().unwrap(),
            bindings: BindingsCache::start(client, shutdown.clone()),
            metrics: Arc::new(Metrics::new(serving.clone())),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve_with(
            listener,
            tls_config(serving).unwrap(),
            admitter.clone(),
            shutdown.clone(),
            limits,
        ));
        Server {
            addr,
            shutdown,
            task,
            admitter,
            client_tls: Arc::new(client_tls),
        }
    }

    impl Server {
        async fn tls(&self, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
            let mut config = (*self.client_tls).clone();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            let tcp = TcpStream::connect(self.addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        }

        /// An HTTP/2 connection; its task ends when the server closes it.
        async fn h2(
            &self,
        ) -> (
            hyper::client::conn::http2::SendRequest<ClientBody>,
            tokio::task::JoinHandle<()>,
        ) {
            let tls = self.tls(&[b"h2"]).await;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            (
                sender,
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        }
    }

    fn post(body: ClientBody) -> Request<ClientBody> {
        Request::post("https://localhost/mutate")
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    }

    fn full(bytes: Vec<u8>) -> ClientBody {
        Full::new(Bytes::from(bytes)).boxed_unsync()
    }

    async fn json_of(response: Response<Incoming>) -> (StatusCode, Value) {
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn review(operation: &str, inject: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "f00d-1234",
                "namespace": "agents",
                "operation": operation,
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": { "name": "p", "annotations": { "credbroker.dev/inject": inject } },
                    "spec": { "containers": [ { "name": "agent", "image": "a" } ] }
                },
            }
        }))
        .unwrap()
    }

    /// Reads until the server closes; how long that took.
    async fn closed_after(mut tls: tokio_rustls::client::TlsStream<TcpStream>) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("the connection is still open after 5 s"),
            }
        }
    }

    #[tokio::test]
    async fn a_connection_that_sends_no_request_is_closed_after_the_deadline() {
        let server = start(Limits {
            handshake: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        // HTTP/2 (the server's SETTINGS come first), HTTP/1.1, and no ALPN
        // at all (HTTP/1.1).
        for alpn in [&[&b"h2"[..]][..], &[b"http/1.1"], &[]] {
            let tls = server.tls(alpn).await;
            let took = closed_after(tls).await;
            assert!(
                took >= Duration::from_millis(200) && took < Duration::from_secs(3),
                "{alpn:?}: closed after {took:?}"
            );
        }
        // A plain TCP connection that never starts TLS, too.
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let started = Instant::now();
        let mut tcp = tcp;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_connection_that_sent_a_request_outlives_the_first_request_deadline() {
        let server = start(Limits {
            handshake: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        let (mut sender, conn) = server.h2().await;
        let response = sender
            .send_request(
                Request::get("https://localhost/")
                    .body(full(vec![]))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!conn.is_finished(), "closed although it had sent a request");
        sender.ready().await.unwrap();
        let response = sender
            .send_request(post(full(review("UPDATE", "true"))))
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["response"]["allowed"], true, "{body}");
    }

    #[tokio::test]
    async fn connections_are_closed_gracefully_at_their_maximum_age() {
        let server = start(Limits {
            max_age: Duration::from_millis(500),
            ..Limits::default()
        })
        .await;
        let (mut sender, conn) = server.h2().await;
        let response = sender
            .send_request(
                Request::get("https://localhost/")
                    .body(full(vec![]))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        // GOAWAY, then the close: the client's connection ends by itself.
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the connection outlived its maximum age")
            .unwrap();

        // HTTP/1.1: the answer in flight says `Connection: close`.
        let tls = server.tls(&[b"http/1.1"]).await;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, ClientBody>(TokioIo::new(tls))
                .await
                .unwrap();
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the HTTP/1.1 connection outlived its maximum age")
            .unwrap();
        assert!(sender.ready().await.is_err());
    }

    #[tokio::test]
    async fn before_the_bindings_are_listed_opted_in_pods_are_refused_with_503() {
        let server = start(Limits::default()).await;
        assert!(!server.admitter.bindings.is_synced());
        let (mut sender, _conn) = server.h2().await;
        let response = sender
            .send_request(post(full(review("CREATE", "true"))))
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {
                    "uid": "f00d-1234",
                    "allowed": false,
                    "status": { "code": 503, "message": NOT_SYNCED_MESSAGE },
                },
            })
        );
        // What reads no bindings is answered as always.
        for (operation, inject) in [("CREATE", "false"), ("UPDATE", "true")] {
            sender.ready().await.unwrap();
            let response = sender
                .send_request(post(full(review(operation, inject))))
                .await
                .unwrap();
            let (status, body) = json_of(response).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                body["response"]["allowed"], true,
                "{operation} {inject}: {body}"
            );
            assert_eq!(body["response"]["uid"], "f00d-1234");
        }
    }

    #[tokio::test]
    async fn bodies_wait_for_a_turn_and_too_large_ones_take_none() {
        let server = start(Limits {
            bodies: 1,
            body_turn: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        let (mut sender, _conn) = server.h2().await;
        // The one turn, held by a body that is not finished.
        let (mut tx, rx) = futures::channel::mpsc::channel::<Bytes>(1);
        let slow = http_body_util::StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b))));
        tx.try_send(Bytes::from_static(b"{")).unwrap();
        let held = {
            let mut sender = sender.clone();
            tokio::spawn(async move { sender.send_request(post(slow.boxed_unsync())).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        sender.ready().await.unwrap();
        let started = Instant::now();
        let response = sender
            .send_request(post(full(review("CREATE", "false"))))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(
            server
                .admitter
                .metrics
                .render()
                .contains("credbroker_webhook_overloaded_requests_total 1")
        );
        // A declared length past the limit is refused without a turn.
        sender.ready().await.unwrap();
        let big = Request::post("https://localhost/mutate")
            .header("content-length", (MAX_REVIEW_BYTES + 1).to_string())
            .body(full(vec![b' '; MAX_REVIEW_BYTES + 1]))
            .unwrap();
        let response = sender.send_request(big).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // The held body ends: a malformed review, and the turn is free.
        drop(tx);
        let response = held.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        sender.ready().await.unwrap();
        let response = sender
            .send_request(post(full(review("UPDATE", "true"))))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let metrics = server.admitter.metrics.render();
        // Unreadable bodies are not timed: only the two reviews read.
        assert!(
            metrics.contains("credbroker_webhook_admission_duration_seconds_count 2"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn shutdown_closes_the_listener_and_every_connection() {
        let server = start(Limits {
            drain: Duration::from_secs(5),
            ..Limits::default()
        })
        .await;
        let (mut sender, conn) = server.h2().await;
        let response = sender
            .send_request(
                Request::get("https://localhost/")
                    .body(full(vec![]))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        // Connections that have sent nothing yet: HTTP/1.1, and HTTP/2
        // without even its preface (which a graceful close would wait for).
        let idle_h1 = server.tls(&[b"http/1.1"]).await;
        let idle_h2 = server.tls(&[b"h2"]).await;
        // So the server is past the handshakes and serving both.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        server.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(3), conn)
            .await
            .expect("the HTTP/2 connection was not closed")
            .unwrap();
        assert!(closed_after(idle_h1).await < Duration::from_secs(3));
        assert!(closed_after(idle_h2).await < Duration::from_secs(3));
        tokio::time::timeout(Duration::from_secs(3), server.task)
            .await
            .expect("serve did not return")
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(TcpStream::connect(server.addr).await.is_err());
    }
}
