//! A recording upstream: the HTTP(S) server that stands where a real API
//! (api.openai.com and the like) would, so tests can assert exactly what
//! reached it (DESIGN.md section 6, "upstream APIs").
//!
//! It owns a freshly generated test CA and a leaf for the names and IPs it is
//! given, speaks HTTP/1.1 and HTTP/2 (chosen by ALPN over TLS, by the client's
//! preface in cleartext), records every request in full, and answers according
//! to a [`Behaviour`] that a test can swap at any time. It serves on a listener
//! the caller binds, so it can live on `127.0.0.1:0` or inside a network
//! namespace ([`crate::netns::Netns::bind_tcp`]), and it stops on drop.
//!
//! ```no_run
//! # async fn example() -> credbroker_test_support::Result<()> {
//! use credbroker_test_support::upstream::{Behaviour, EchoTo, HeaderName, Upstream};
//! let listener = std::net::TcpListener::bind("127.0.0.1:0")
//!     .map_err(|e| credbroker_test_support::Error::Io("bind".into(), e))?;
//! let upstream = Upstream::https(["api.example.test", "127.0.0.1"])
//!     .behaviour(Behaviour::echo_header(HeaderName::from_static("authorization"), EchoTo::Body))
//!     .start(listener)?;
//! // ... point a client at upstream.url("127.0.0.1") trusting upstream.ca_file() ...
//! let requests = upstream.wait_for_requests(1, std::time::Duration::from_secs(5)).await?;
//! assert_eq!(requests[0].path, "/");
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

// Re-exported so tests can build replies and read records without depending
// on `hyper`/`http` themselves.
pub use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
pub use hyper::{Method, StatusCode, Version};

use crate::pki::TestCa;
use crate::{Error, Result};

/// The response header that carries echoed request-header values.
pub const ECHO_HEADER: HeaderName = HeaderName::from_static("x-echo");

/// Request bodies are read whole (echo and assertions need them); this bound
/// keeps a runaway client from eating the test machine's memory.
const MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;

/// A client that opens a connection and never finishes the handshake must not
/// pin a task for the life of the test.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default ALPN offer: HTTP/2 preferred, HTTP/1.1 for clients that want it.
const DEFAULT_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The connection a request arrived on.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// 1-based, in order of acceptance; equal ids mean a reused connection.
    pub id: u64,
    /// The client's address. IPv4 clients of a dual-stack (`[::]`) listener
    /// appear as plain IPv4, not `::ffff:a.b.c.d`.
    pub peer: SocketAddr,
    /// The address the client reached (after any NAT redirect).
    pub local: SocketAddr,
    /// The TLS server name the client sent (`None` in cleartext or for IP literals).
    pub sni: Option<String>,
    /// The ALPN protocol agreed (`"h2"`, `"http/1.1"`), `None` in cleartext.
    pub alpn: Option<String>,
}

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub version: Version,
    pub method: Method,
    /// The request target as hyper parsed it (absolute-form for HTTP/2).
    pub uri: Uri,
    /// Path with query, exactly as sent (`/v1/x?y=1`).
    pub path: String,
    /// `:authority` (HTTP/2) or the `Host` header (HTTP/1.1).
    pub authority: Option<String>,
    pub headers: HeaderMap,
    /// The whole request body.
    pub body: Bytes,
    pub connection: ConnectionInfo,
}

impl RecordedRequest {
    /// The first value of header `name`, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every value of header `name` (HTTP/2 may split e.g. `cookie`).
    pub fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .get_all(name)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect()
    }

    /// The body as text, with invalid UTF-8 replaced.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A response the upstream sends: status, headers and a body that is either
/// sent at once or streamed in paced chunks.
#[derive(Clone, Debug)]
pub struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: ReplyBody,
}

#[derive(Clone, Debug)]
enum ReplyBody {
    Full(Bytes),
    Paced {
        chunks: Vec<Bytes>,
        interval: Duration,
    },
}

impl Reply {
    /// A reply with `status` and an empty body.
    pub fn new(status: StatusCode) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body: ReplyBody::Full(Bytes::new()),
        }
    }

    /// `200 OK` with an empty body.
    pub fn ok() -> Self {
        Self::new(StatusCode::OK)
    }

    /// Adds a header (appends, so a name may repeat).
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Sends `body` in one piece (with a `content-length`).
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = ReplyBody::Full(body.into());
        self
    }

    /// Streams `chunks` one by one with `interval` between them (chunked in
    /// HTTP/1.1, separate DATA frames in HTTP/2), for tests of streaming.
    pub fn paced<I, C>(mut self, chunks: I, interval: Duration) -> Self
    where
        I: IntoIterator<Item = C>,
        C: Into<Bytes>,
    {
        self.body = ReplyBody::Paced {
            chunks: chunks.into_iter().map(Into::into).collect(),
            interval,
        };
        self
    }

    fn into_response(self) -> Response<ResponseBody> {
        let body = match self.body {
            ReplyBody::Full(bytes) => Full::new(bytes).boxed_unsync(),
            ReplyBody::Paced { chunks, interval } => {
                PacedBody::new(chunks, interval).boxed_unsync()
            }
        };
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;
type Responder = dyn Fn(&RecordedRequest) -> Reply + Send + Sync;

/// Where [`Behaviour::echo_header`] puts the echoed value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EchoTo {
    /// In the [`ECHO_HEADER`] response header (one per request value).
    Header,
    /// In the body (values joined by `\n`).
    Body,
    Both,
}

/// How the upstream answers each request: a function from the recorded
/// request to a [`Reply`]. The constructors cover common cases; anything else
/// (e.g. echoing a value base64-encoded) is a [`Behaviour::custom`] closure.
#[derive(Clone)]
pub struct Behaviour(Arc<Responder>);

impl fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Behaviour(..)")
    }
}

impl Default for Behaviour {
    /// `200 OK` with body `ok\n`.
    fn default() -> Self {
        Self::reply(Reply::ok().body("ok\n"))
    }
}

impl Behaviour {
    /// Always answers with `reply` (e.g. a 401 with a `www-authenticate` header).
    pub fn reply(reply: Reply) -> Self {
        Self::custom(move |_| reply.clone())
    }

    /// Echoes the values of request header `name` back, as the echo checks of
    /// the sidecar need. A request without that header gets a 400 that says
    /// so, so a test never mistakes "nothing sent" for "nothing echoed".
    pub fn echo_header(name: HeaderName, to: EchoTo) -> Self {
        Self::custom(move |request| {
            let values: Vec<&HeaderValue> = request.headers.get_all(&name).iter().collect();
            if values.is_empty() {
                return Reply::new(StatusCode::BAD_REQUEST).body(format!(
                    "recording upstream: the request has no {name} header to echo\n"
                ));
            }
            let mut reply = Reply::ok();
            if matches!(to, EchoTo::Header | EchoTo::Both) {
                for value in &values {
                    reply = reply.header(ECHO_HEADER, (*value).clone());
                }
            }
            if matches!(to, EchoTo::Body | EchoTo::Both) {
                let body: Vec<u8> = values
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect::<Vec<_>>()
                    .join(&b'\n');
                reply = reply.body(body);
            }
            reply
        })
    }

    /// Answers `200 OK` with the request body (and its `content-type`).
    pub fn echo_body() -> Self {
        Self::custom(|request| {
            let mut reply = Reply::ok().body(request.body.clone());
            if let Some(content_type) = request.headers.get(header::CONTENT_TYPE) {
                reply = reply.header(header::CONTENT_TYPE, content_type.clone());
            }
            reply
        })
    }

    /// Answers the n-th request with the n-th behaviour; the last one repeats
    /// (e.g. a 401 once, then 200s, as a rotation test needs). Empty means
    /// the default behaviour.
    pub fn sequence(steps: impl IntoIterator<Item = Behaviour>) -> Self {
        let steps: Vec<Behaviour> = steps.into_iter().collect();
        let next = AtomicUsize::new(0);
        Self::custom(move |request| {
            let index = next.fetch_add(1, Ordering::SeqCst);
            match steps.get(index).or_else(|| steps.last()) {
                Some(step) => step.respond(request),
                None => Behaviour::default().respond(request),
            }
        })
    }

    /// Any answer computed from the request.
    pub fn custom(respond: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) -> Self {
        Self(Arc::new(respond))
    }

    fn respond(&self, request: &RecordedRequest) -> Reply {
        (self.0)(request)
    }
}

/// Configures an [`Upstream`] before it starts; see [`Upstream::https`] and
/// [`Upstream::http`].
#[derive(Debug)]
pub struct UpstreamBuilder {
    /// `None` for cleartext.
    tls_names: Option<Vec<String>>,
    behaviour: Behaviour,
}

impl UpstreamBuilder {
    /// How to answer requests (default: `200 ok`). Changeable later with
    /// [`Upstream::set_behaviour`].
    pub fn behaviour(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }

    /// Starts serving on `listener` (blocking or not; it is made
    /// non-blocking). Must be called inside a Tokio runtime, which then runs
    /// the server until the [`Upstream`] is dropped.
    pub fn start(self, listener: std::net::TcpListener) -> Result<Upstream> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            Error::Other(format!(
                "the recording upstream must be started inside a Tokio runtime: {e}"
            ))
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::Io("reading the upstream listener's address".into(), e))?;
        let (tls, acceptor) = match &self.tls_names {
            Some(names) => {
                let (material, acceptor) = TlsMaterial::generate(names)?;
                (Some(material), Some(acceptor))
            }
            None => (None, None),
        };
        listener.set_nonblocking(true).map_err(|e| {
            Error::Io(
                format!("making the upstream listener on {local_addr} non-blocking"),
                e,
            )
        })?;
        let listener = {
            // Registering with the reactor needs the runtime's context.
            let _context = runtime.enter();
            TcpListener::from_std(listener).map_err(|e| {
                Error::Io(
                    format!("registering the upstream listener on {local_addr}"),
                    e,
                )
            })?
        };
        let (request_count, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            behaviour: RwLock::new(self.behaviour),
            requests: Mutex::new(Vec::new()),
            request_count,
            connections: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
        });
        let task = runtime.spawn(accept_loop(listener, acceptor, shared.clone()));
        Ok(Upstream {
            local_addr,
            tls,
            shared,
            task,
        })
    }
}

/// A running recording upstream. Dropping it stops the server and every
/// connection it holds.
pub struct Upstream {
    local_addr: SocketAddr,
    tls: Option<TlsMaterial>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("local_addr", &self.local_addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// An HTTPS upstream whose leaf certificate covers `names`: DNS names,
    /// or IP addresses (which become IP SANs).
    pub fn https<I, S>(names: I) -> UpstreamBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        UpstreamBuilder {
            tls_names: Some(names.into_iter().map(Into::into).collect()),
            behaviour: Behaviour::default(),
        }
    }

    /// A cleartext HTTP upstream (HTTP/1.1, and HTTP/2 with prior knowledge).
    pub fn http() -> UpstreamBuilder {
        UpstreamBuilder {
            tls_names: None,
            behaviour: Behaviour::default(),
        }
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// `scheme://host:port` for this upstream's port; IPv6 literals are bracketed.
    pub fn url(&self, host: &str) -> String {
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => host.to_string(),
        };
        format!("{}://{host}:{}", self.scheme(), self.local_addr.port())
    }

    /// The test CA that issued the leaf, as PEM (`None` for cleartext).
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    /// The test CA as DER, for a rustls root store.
    pub fn ca_der(&self) -> Option<&CertificateDer<'static>> {
        self.tls.as_ref().map(|t| &t.ca_der)
    }

    /// A world-readable PEM file holding the CA (for `curl --cacert`, also
    /// when curl runs as an unprivileged UID). Removed on drop.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_file.as_path())
    }

    /// Writes the CA PEM to `path` (for tests that need it at a chosen place).
    pub fn write_ca_pem(&self, path: &Path) -> Result<()> {
        let pem = self.ca_pem().ok_or_else(|| {
            Error::Other(format!(
                "the upstream on {} is cleartext and has no CA",
                self.local_addr
            ))
        })?;
        std::fs::write(path, pem)
            .map_err(|e| Error::Io(format!("writing the upstream CA to {}", path.display()), e))
    }

    /// Changes how later requests are answered.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self
            .shared
            .behaviour
            .write()
            .unwrap_or_else(PoisonError::into_inner) = behaviour;
    }

    /// Every request recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many requests were recorded.
    pub fn request_count(&self) -> usize {
        *self.shared.request_count.borrow()
    }

    /// How many TCP connections were accepted, including ones that never
    /// completed a TLS handshake or a request (so "got nothing" means 0 here).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Failed handshakes and broken connections, for failure messages.
    pub fn connection_errors(&self) -> Vec<String> {
        self.shared
            .errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until at least `count` requests are recorded and returns all
    /// records; fails after `timeout` saying what did arrive.
    pub async fn wait_for_requests(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>> {
        let mut counter = self.shared.request_count.subscribe();
        match tokio::time::timeout(timeout, counter.wait_for(|n| *n >= count)).await {
            Ok(Ok(_)) => Ok(self.requests()),
            // The sender lives in `self.shared`, so the channel cannot close
            // while we hold `self`; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(Error::Timeout {
                what: format!(
                    "{count} request(s) at the recording upstream on {}",
                    self.local_addr
                ),
                after: timeout,
                last: format!(
                    "{} request(s) recorded over {} connection(s); connection errors: {:?}",
                    self.request_count(),
                    self.connections(),
                    self.connection_errors()
                ),
            }),
        }
    }

    /// Stops serving and waits until the listener and every connection are
    /// closed (dropping also stops it, without waiting).
    pub async fn shutdown(mut self) {
        self.task.abort();
        // The outcome of an aborted task (cancelled) carries nothing to report.
        let _ = (&mut self.task).await;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection task, so nothing keeps serving after the fixture is gone.
        self.task.abort();
    }
}

/// State shared between the [`Upstream`] handle and its server tasks.
struct Shared {
    behaviour: RwLock<Behaviour>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Mirrors `requests.len()` so waiters can be woken.
    request_count: watch::Sender<usize>,
    connections: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn behaviour(&self) -> Behaviour {
        self.behaviour
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, request: RecordedRequest) {
        let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        requests.push(request);
        // Sent under the lock so the count never goes backwards.
        self.request_count.send_replace(requests.len());
    }

    fn error(&self, message: String) {
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(message);
    }
}

/// The CA and leaf of one HTTPS upstream.
struct TlsMaterial {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    ca_file: PathBuf,
    _ca_dir: tempfile::TempDir,
}

impl TlsMaterial {
    fn generate(names: &[String]) -> Result<(Self, TlsAcceptor)> {
        if names.is_empty() {
            return Err(Error::Other(
                "an HTTPS upstream needs at least one DNS name or IP address for its certificate"
                    .into(),
            ));
        }
        // A fresh CA per upstream: a test that trusts one upstream's CA can
        // never accidentally trust another's.
        let ca = TestCa::new("credbroker test upstream CA")?;
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let leaf = ca.issue_server(&name_refs)?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Other(format!("configuring upstream TLS versions: {e}")))?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.cert_der],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der)),
            )
            .map_err(|e| {
                Error::Other(format!("configuring the upstream leaf for {names:?}: {e}"))
            })?;
        config.alpn_protocols = DEFAULT_ALPN.iter().map(|p| p.to_vec()).collect();

        let ca_pem = ca.cert_pem().to_string();
        let (ca_dir, ca_file) = write_public_pem(&ca_pem)?;
        let material = Self {
            ca_pem,
            ca_der: ca.cert_der().clone(),
            ca_file,
            _ca_dir: ca_dir,
        };
        Ok((material, TlsAcceptor::from(Arc::new(config))))
    }
}

/// Writes the CA to a temporary `ca.pem` that any UID can read: tests run
/// clients as unprivileged users, and a CA certificate is public anyway.
fn write_public_pem(pem: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::Builder::new()
        .prefix("credbroker-upstream-ca-")
        .tempdir()
        .map_err(|e| Error::Io("creating a folder for the upstream CA".into(), e))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::Io(format!("making {} readable", dir.path().display()), e))?;
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, pem).map_err(|e| Error::Io(format!("writing {}", path.display()), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::Io(format!("making {} readable", path.display()), e))?;
    Ok((dir, path))
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    // Owning the connection tasks here means aborting this loop aborts them.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let id = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    connections.spawn(serve_connection(tcp, peer, id, tls.clone(), shared.clone()));
                }
                Err(e) => {
                    // E.g. out of file descriptors: note it and back off
                    // rather than spin.
                    shared.error(format!("accepting a connection: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let local = match tcp.local_addr() {
        Ok(local) => SocketAddr::new(local.ip().to_canonical(), local.port()),
        Err(e) => {
            return shared.error(format!(
                "connection {id} from {peer}: reading its local address: {e}"
            ));
        }
    };
    let info = ConnectionInfo {
        id,
        peer,
        local,
        sni: None,
        alpn: None,
    };
    let Some(acceptor) = tls else {
        return serve_http(tcp, info, shared).await;
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let (_, session) = stream.get_ref();
            let info = ConnectionInfo {
                sni: session.server_name().map(str::to_owned),
                alpn: session
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned()),
                ..info
            };
            serve_http(stream, info, shared).await;
        }
        Ok(Err(e)) => shared.error(format!("connection {id} from {peer}: TLS handshake: {e}")),
        Err(_) => shared.error(format!(
            "connection {id} from {peer}: no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}"
        )),
    }
}

async fn serve_http<S>(stream: S, info: ConnectionInfo, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let service = {
        let (info, shared) = (info.clone(), shared.clone());
        service_fn(move |request| {
            let (info, shared) = (info.clone(), shared.clone());
            async move { Ok::<_, Infallible>(handle(request, &info, &shared).await) }
        })
    };
    // The auto builder serves HTTP/1.1 or HTTP/2 by the client's preface, so
    // one path covers ALPN-negotiated h2, h2c with prior knowledge, and 1.1.
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        shared.error(format!("connection {} from {}: {e}", info.id, info.peer));
    }
}

async fn handle(
    request: Request<Incoming>,
    info: &ConnectionInfo,
    shared: &Shared,
) -> Response<ResponseBody> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            shared.error(format!(
                "connection {} from {}: reading the body of {} {}: {e}",
                info.id, info.peer, parts.method, parts.uri
            ));
            return Reply::new(StatusCode::BAD_REQUEST)
                .body(format!(
                    "recording upstream: could not read the request body: {e}\n"
                ))
                .into_response();
        }
    };
    let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
    });
    let record = RecordedRequest {
        version: parts.version,
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_string(), |p| p.to_string()),
        uri: parts.uri,
        authority,
        headers: parts.headers,
        body,
        connection: (*info).clone(),
    };
    let reply = shared.behaviour().respond(&record);
    shared.record(record);
    reply.into_response()
}

/// A body that yields its chunks one at a time with a pause between them.
struct PacedBody {
    chunks: VecDeque<Bytes>,
    interval: Duration,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PacedBody {
    fn new(chunks: Vec<Bytes>, interval: Duration) -> Self {
        Self {
            chunks: chunks.into(),
            interval,
            pause: None,
        }
    }
}

impl Body for PacedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(pause) = this.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.pause = None;
        }
        let Some(chunk) = this.chunks.pop_front() else {
            return Poll::Ready(None);
        };
        if !this.chunks.is_empty() {
            this.pause = Some(Box::pin(tokio::time::sleep(this.interval)));
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    //! Loopback-only checks with a Rust client, so plain `cargo test` covers
    //! the upstream; the curl-and-namespace acceptance is in tests/netns.rs.

    use super::*;
    use hyper::client::conn::{http1, http2};
    use rustls::pki_types::ServerName;

    fn loopback() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    }

    /// Sends one request over a fresh TLS connection offering only `alpn`,
    /// returning the status, headers and body frames as received.
    async fn tls_request(
        upstream: &Upstream,
        alpn: &[u8],
        request: Request<Full<Bytes>>,
    ) -> (StatusCode, HeaderMap, Vec<Bytes>) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(upstream.ca_der().unwrap().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(upstream.local_addr()).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("upstream.test").unwrap(), tcp)
            .await
            .unwrap();
        let io = TokioIo::new(tls);
        let response = if alpn == b"h2" {
            let (mut sender, connection) =
                http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        } else {
            let (mut sender, connection) = http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        };
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, frames(body).await)
    }

    async fn frames(mut body: Incoming) -> Vec<Bytes> {
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                frames.push(data);
            }
        }
        frames
    }

    #[tokio::test]
    async fn records_requests_and_echoes_a_header_over_http1_and_http2() {
        let upstream = Upstream::https(["upstream.test"])
            .behaviour(Behaviour::echo_header(
                HeaderName::from_static("x-secret"),
                EchoTo::Both,
            ))
            .start(loopback())
            .unwrap();
        for (alpn, uri) in [
            (&b"http/1.1"[..], "/v1/a?b=c".to_string()),
            (
                &b"h2"[..],
                format!(
                    "https://upstream.test:{}/v1/a?b=c",
                    upstream.local_addr().port()
                ),
            ),
        ] {
            let request = Request::post(uri)
                .header(header::HOST, "upstream.test")
                .header("x-secret", "cbph-1")
                .body(Full::new(Bytes::from_static(b"payload")))
                .unwrap();
            let (status, headers, body) = tls_request(&upstream, alpn, request).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers.get(ECHO_HEADER).unwrap(), "cbph-1");
            assert_eq!(body.concat(), b"cbph-1");
        }

        let requests = upstream
            .wait_for_requests(2, Duration::from_secs(5))
            .await
            .unwrap();
        let versions: Vec<_> = requests
            .iter()
            .map(|r| (r.version, r.connection.alpn.clone()))
            .collect();
        assert_eq!(
            versions,
            [
                (Version::HTTP_11, Some("http/1.1".into())),
                (Version::HTTP_2, Some("h2".into()))
            ]
        );
        for request in &requests {
            assert_eq!(request.method, Method::POST);
            assert_eq!(request.path, "/v1/a?b=c");
            assert_eq!(
                request
                    .authority
                    .as_deref()
                    .map(|a| a.starts_with("upstream.test")),
                Some(true)
            );
            assert_eq!(request.header("x-secret"), Some("cbph-1"));
            assert_eq!(request.body, "payload");
            assert_eq!(request.connection.sni.as_deref(), Some("upstream.test"));
            assert_eq!(request.connection.peer.ip(), IpAddr::from([127, 0, 0, 1]));
        }
        assert_ne!(requests[0].connection.id, requests[1].connection.id);
        assert_eq!(upstream.connections(), 2);
    }

    #[tokio::test]
    async fn paced_replies_stream_chunk_by_chunk() {
        let upstream = Upstream::http()
            .behaviour(Behaviour::reply(
                Reply::ok().paced(["a", "b", "c"], Duration::from_millis(10)),
            ))
            .start(loopback())
            .unwrap();
        let tcp = TcpStream::connect(upstream.local_addr()).await.unwrap();
        let (mut sender, connection) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(connection);
        let request = Request::get("/stream")
            .header(header::HOST, "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        // No length up front: the body really is streamed.
        assert_eq!(
            response.headers().get(header::TRANSFER_ENCODING).unwrap(),
            "chunked"
        );
        assert_eq!(frames(response.into_body()).await, ["a", "b", "c"]);
        assert!(upstream.ca_pem().is_none());
    }

    #[tokio::test]
    async fn waiting_for_requests_that_never_come_says_what_arrived() {
        let upstream = Upstream::http().start(loopback()).unwrap();
        let error = upstream
            .wait_for_requests(1, Duration::from_millis(100))
            .await
            .unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("0 request(s) recorded over 0 connection(s)"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn shutdown_closes_the_listener() {
        let upstream = Upstream::https(["127.0.0.1"]).start(loopback()).unwrap();
        let addr = upstream.local_addr();
        let ca_file = upstream.ca_file().unwrap().to_path_buf();
        assert!(
            std::fs::read_to_string(&ca_file)
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        let elsewhere = tempfile::tempdir().unwrap();
        let copy = elsewhere.path().join("ca.pem");
        upstream.write_ca_pem(&copy).unwrap();
        assert_eq!(
            std::fs::read_to_string(&copy).unwrap(),
            upstream.ca_pem().unwrap()
        );
        upstream.shutdown().await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts connections"
        );
        assert!(!ca_file.exists(), "the CA file outlived the upstream");
    }

    #[test]
    fn starting_outside_a_runtime_is_an_error_not_a_panic() {
        let error = Upstream::http().start(loopback()).unwrap_err();
        assert!(error.to_string().contains("Tokio runtime"), "{error}");
    }
}
