//! Where requests go after the sidecar (invariant 3: the sidecar decides
//! where to connect): names are resolved here, by the sidecar, and it dials
//! what it resolved; TLS to an upstream is always verified for the name,
//! against the system roots plus the configured CAs.
//!
//! [`Upstreams`] holds the pooled clients for one set of destinations and
//! their trust: connections are pooled per scheme, host and port (the
//! hyper-util pool key), so a connection is never reused across
//! destinations, and HTTP/2 or HTTP/1.1 is negotiated with the upstream
//! independently of the agent. It is rebuilt when the destinations' trust
//! changes, so a connection verified under withdrawn trust is not reused.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use credbroker_crds::config::SidecarBinding;
use credbroker_crds::validate::host_matches;
use http::Uri;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::client::TlsStream;

use crate::tls::UpstreamTls;

/// The body type sent upstream.
pub type OutBody = UnsyncBoxBody<Bytes, BoxError>;
/// Errors inside bodies and connectors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an upstream could not be reached: names the host and the step. The
/// handler finds it in the client error's source chain.
#[derive(Debug, Clone)]
pub struct UpstreamError {
    /// `dns`, `connect`, `tls`.
    pub step: &'static str,
    pub message: String,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UpstreamError {}

/// Resolves `host` (a DNS name or an IP literal) with the system resolver.
///
/// A name is looked up as an absolute name (with a trailing dot), never
/// through the resolver's search domains: with Kubernetes' `ndots:5`,
/// `api.example.com` would otherwise first be tried as
/// `api.example.com.<namespace>.svc.cluster.local`, a name anyone who can
/// create a Service there could answer. Anything that is neither a DNS name
/// nor an IP literal is refused rather than handed to getaddrinfo (which
/// reads `16909060` as 1.2.3.4).
pub async fn resolve(
    host: &str,
    port: u16,
    localhost_is_loopback: bool,
) -> Result<Vec<SocketAddr>, UpstreamError> {
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    // A top-level label starts with a letter; what does not (`16909060`,
    // `0x7f000001`, `1.2.3`) is an address in disguise to getaddrinfo.
    let tld_starts_with_letter = host
        .trim_end_matches('.')
        .rsplit('.')
        .next()
        .and_then(|label| label.bytes().next())
        .is_some_and(|b| b.is_ascii_alphabetic());
    if !credbroker_crds::validate::is_dns_name(host) || !tld_starts_with_letter {
        return Err(UpstreamError {
            step: "dns",
            message: format!("upstream {host:?}: not a host name"),
        });
    }
    // Local mode: RFC 6761 `localhost` names are loopback, answered without
    // a resolver (which, asked for the absolute `localhost.`, says nothing:
    // /etc/hosts lists `localhost` without the dot). Never in a pod, whose
    // loopback the agent shares (see EngineSettings).
    let bare = host.trim_end_matches('.').to_ascii_lowercase();
    if localhost_is_loopback && (bare == "localhost" || bare.ends_with(".localhost")) {
        return Ok(vec![
            SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), port),
        ]);
    }
    let absolute = if host.ends_with('.') {
        host.to_owned()
    } else {
        format!("{host}.")
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((absolute.as_str(), port))
        .await
        .map_err(|e| UpstreamError {
            step: "dns",
            message: format!("upstream {host}: could not resolve the name: {e}"),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(UpstreamError {
            step: "dns",
            message: format!("upstream {host}: the name resolves to no address"),
        });
    }
    Ok(addrs)
}

/// Dials the first of `addrs` that answers within `timeout` each.
pub async fn dial(
    what: &str,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let mut last = String::from("no address");
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: no answer within {timeout:?}"),
        }
    }
    Err(UpstreamError {
        step: "connect",
        message: format!("upstream {what}: could not connect ({last})"),
    })
}

/// Extra CA PEM text per destination pattern and port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationTrust(Vec<(String, u16, String)>);

impl DestinationTrust {
    /// The extra CAs of every binding's destinations. A destination's CA is
    /// trusted for that host and port, whichever binding's request it is:
    /// the pool shares connections per host and port.
    pub fn of(bindings: &[SidecarBinding]) -> Self {
        let mut entries: Vec<(String, u16, String)> = bindings
            .iter()
            .flat_map(|b| &b.destinations)
            .filter_map(|d| {
                d.extra_ca_pem
                    .as_ref()
                    .filter(|p| !p.trim().is_empty())
                    .map(|pem| (d.host.clone(), d.port, pem.clone()))
            })
            .collect();
        entries.sort();
        entries.dedup();
        Self(entries)
    }

    /// The PEM text of every extra CA for `host:port`, concatenated.
    fn for_host(&self, host: &str, port: u16) -> Option<String> {
        let pems: Vec<&str> = self
            .0
            .iter()
            .filter(|(pattern, p, _)| *p == port && host_matches(pattern, host))
            .map(|(_, _, pem)| pem.as_str())
            .collect();
        (!pems.is_empty()).then(|| pems.join("\n"))
    }
}

/// Dials for the pooled client: resolves, connects, and for `https` does
/// verified TLS.
#[derive(Clone)]
pub struct Connector {
    tls: Arc<UpstreamTls>,
    trust: Arc<DestinationTrust>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    h1_only: bool,
    slots: Arc<Semaphore>,
    localhost_is_loopback: bool,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamConn>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(uri).await.map_err(|e| Box::new(e) as BoxError) })
    }
}

impl Connector {
    async fn connect(&self, uri: Uri) -> Result<TokioIo<UpstreamConn>, UpstreamError> {
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default().to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let what = format!("{host}:{port}");
        // Pooled connections outlive their requests (idle, up to the pool's
        // timeout), so requests in flight do not bound them: this does, and
        // with it the sidecar's descriptors.
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| UpstreamError {
                step: "busy",
                message: format!(
                    "upstream {what}: too many upstream connections are open (--max-connections)"
                ),
            })?;
        let addrs = resolve(&host, port, self.localhost_is_loopback).await?;
        let tcp = dial(&what, &addrs, self.connect_timeout).await?;
        if !https {
            return Ok(TokioIo::new(UpstreamConn::plain(tcp, slot)));
        }
        let extra = self.trust.for_host(&host, port);
        let tls = tokio::time::timeout(
            self.handshake_timeout,
            self.tls
                .connect_for(&host, extra.as_deref(), self.h1_only, tcp),
        )
        .await
        .map_err(|_| UpstreamError {
            step: "tls",
            message: format!(
                "upstream {what}: no TLS handshake within {:?}",
                self.handshake_timeout
            ),
        })?
        .map_err(|e| UpstreamError {
            step: "tls",
            message: e.to_string(),
        })?;
        Ok(TokioIo::new(UpstreamConn::tls(tls, slot)))
    }
}

/// A connection to an upstream, holding its place among those open.
pub struct UpstreamConn {
    io: UpstreamIo,
    _slot: OwnedSemaphorePermit,
}

impl UpstreamConn {
    /// A cleartext connection holding `slot`.
    pub(crate) fn plain(tcp: TcpStream, slot: OwnedSemaphorePermit) -> Self {
        Self {
            io: UpstreamIo::Plain(tcp),
            _slot: slot,
        }
    }

    /// A TLS connection holding `slot`.
    pub(crate) fn tls(tls: TlsStream<TcpStream>, slot: OwnedSemaphorePermit) -> Self {
        Self {
            io: UpstreamIo::Tls(Box::new(tls)),
            _slot: slot,
        }
    }
}

enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for UpstreamConn {
    fn connected(&self) -> Connected {
        match &self.io {
            UpstreamIo::Plain(_) => Connected::new(),
            UpstreamIo::Tls(tls) => {
                let h2 = tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2);
                if h2 {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

impl AsyncRead for UpstreamConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How the pooled clients are tuned.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_header_bytes: u32,
    /// One permit per open upstream connection, shared by every client
    /// built with these settings (across config reloads).
    pub connection_slots: Arc<Semaphore>,
    /// See [`crate::engine::EngineSettings::localhost_is_loopback`].
    pub localhost_is_loopback: bool,
}

impl UpstreamSettings {
    /// Short timeouts and a few connections, for tests and benchmarks.
    #[doc(hidden)]
    pub fn for_tests() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
            max_header_bytes: 65536,
            connection_slots: Arc::new(Semaphore::new(64)),
            localhost_is_loopback: false,
        }
    }
}

/// The pooled clients for one set of destinations' trust.
pub struct Upstreams {
    trust: Arc<DestinationTrust>,
    /// HTTP/2 or HTTP/1.1, by ALPN.
    client: Client<Connector, OutBody>,
    /// HTTP/1.1 only, for WebSocket upgrades.
    h1_client: Client<Connector, OutBody>,
}

impl Upstreams {
    pub fn new(tls: Arc<UpstreamTls>, trust: DestinationTrust, settings: UpstreamSettings) -> Self {
        let trust = Arc::new(trust);
        let build = |h1_only: bool| {
            let connector = Connector {
                tls: tls.clone(),
                trust: trust.clone(),
                connect_timeout: settings.connect_timeout,
                handshake_timeout: settings.handshake_timeout,
                h1_only,
                slots: settings.connection_slots.clone(),
                localhost_is_loopback: settings.localhost_is_loopback,
            };
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(64)
                .http1_max_buf_size(settings.max_header_bytes as usize)
                .http2_max_header_list_size(settings.max_header_bytes)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .http2_keep_alive_while_idle(false)
                .build(connector)
        };
        let (client, h1_client) = (build(false), build(true));
        Self {
            trust,
            client,
            h1_client,
        }
    }

    /// Whether these clients were built for `trust` (so they can be kept
    /// across a config reload).
    pub fn serves(&self, trust: &DestinationTrust) -> bool {
        *self.trust == *trust
    }

    pub fn client(&self, h1_only: bool) -> &Client<Connector, OutBody> {
        if h1_only {
            &self.h1_client
        } else {
            &self.client
        }
    }
}

/// Finds our [`UpstreamError`] in a client error's source chain.
pub fn upstream_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a UpstreamError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(ours) = e.downcast_ref::<UpstreamError>() {
            return Some(ours);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_trust_matches_wildcards_and_ports() {
        let json = r#"{"formatVersion":1,"bindings":[
          {"id":"a","secret":{"mount":"s","path":"p","key":"k"},
           "destinations":[{"host":"*.example.com","port":443,"extraCaPem":"PEM-A"},
                           {"host":"api.other.com","port":8443,"extraCaPem":"PEM-B"},
                           {"host":"plain.com"}]},
          {"id":"b","secret":{"mount":"s","path":"q","key":"k"},
           "destinations":[{"host":"api.example.com","port":443,"extraCaPem":"PEM-C"}]}]}"#;
        let bindings = credbroker_crds::config::SidecarBindings::from_json(json).unwrap();
        let trust = DestinationTrust::of(&bindings.bindings);
        assert_eq!(
            trust.for_host("api.example.com", 443).unwrap(),
            "PEM-A\nPEM-C"
        );
        assert_eq!(trust.for_host("x.example.com", 443).unwrap(), "PEM-A");
        assert!(trust.for_host("api.example.com", 8443).is_none());
        assert_eq!(trust.for_host("api.other.com", 8443).unwrap(), "PEM-B");
        assert!(trust.for_host("plain.com", 443).is_none());
    }

    #[tokio::test]
    async fn what_is_not_a_host_name_is_never_resolved() {
        for bad in ["16909060", "0x01020304", "a/b", "evil:x", "1.2.3"] {
            let e = resolve(bad, 80, true).await.unwrap_err();
            assert_eq!(e.step, "dns", "{bad}");
            assert!(
                e.message.contains("not a host name"),
                "{bad}: {}",
                e.message
            );
        }
    }

    #[tokio::test]
    async fn localhost_names_are_loopback_in_local_mode_only() {
        // In a pod, `localhost.` goes to the resolver like any name.
        assert!(resolve("localhost", 443, false).await.is_err());
        for name in ["localhost", "LOCALHOST.", "api.localhost"] {
            let addrs = resolve(name, 8443, true).await.unwrap();
            assert_eq!(
                addrs,
                vec![
                    "127.0.0.1:8443".parse().unwrap(),
                    "[::1]:8443".parse().unwrap()
                ],
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn ip_literals_resolve_to_themselves() {
        assert_eq!(
            resolve("[::1]", 443, false).await.unwrap(),
            vec!["[::1]:443".parse().unwrap()]
        );
        assert_eq!(
            resolve("127.0.0.1", 80, false).await.unwrap(),
            vec!["127.0.0.1:80".parse().unwrap()]
        );
    }

    #[tokio::test]
    async fn upstream_connections_are_capped_and_a_closed_one_frees_its_place() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let connector = Connector {
            tls: crate::tls::throwaway_upstream_tls(),
            trust: Arc::default(),
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
            h1_only: false,
            slots: Arc::new(Semaphore::new(1)),
            localhost_is_loopback: false,
        };
        let first = connector.connect(uri.clone()).await.unwrap();
        let e = connector.connect(uri.clone()).await.err().unwrap();
        assert_eq!(e.step, "busy");
        assert!(e.message.contains("--max-connections"), "{}", e.message);
        drop(first);
        connector.connect(uri).await.unwrap();
    }
}
