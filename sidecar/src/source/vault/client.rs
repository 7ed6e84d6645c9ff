//! The HTTP edge toward Vault: one pooled HTTP/1.1 client, verified TLS
//! (or, in local mode only and only when asked, cleartext or an unverified
//! certificate), a deadline on every call, and bodies held in wiping
//! buffers. It returns a status and the body bytes: what they mean is
//! [`super::response`]'s and the source's business.
//!
//! Errors name Vault's address (the `--vault-addr` flag) and what failed,
//! never a body.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::metrics::Metrics;
use crate::secret::SecretValue;
use crate::upstream::{BoxError, UpstreamConn, UpstreamError, dial};

/// The largest answer read from Vault (a KV secret is far smaller).
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Connections to Vault open at once: as many as the store reads at once
/// (16), plus room for the token's own calls. A call beyond them waits for
/// one to close, within its deadline.
const MAX_CONNECTIONS: usize = 20;

/// Where Vault is, as `--vault-addr` gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultAddr {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl VaultAddr {
    /// Parses `https://host[:port]` (or `http://`), with no path, query or
    /// credentials.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.contains('@') {
            // Never quoted: it may be a password.
            return Err("must not carry credentials (user:password@)".into());
        }
        let uri: Uri = text
            .trim_end_matches('/')
            .parse()
            .map_err(|_| format!("{text:?} is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{text:?} must start with https:// (or http://)")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{text:?} names no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{text:?} must not carry credentials"));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(format!(
                "{text:?} must be only scheme, host and port (the API path is added here)"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(format!("{text:?} names no host"));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Self { https, host, port })
    }

    /// `https://host:port`, as logs and errors show it.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("{scheme}://[{}]:{}", self.host, self.port),
            _ => format!("{scheme}://{}:{}", self.host, self.port),
        }
    }
}

/// How TLS to Vault is done.
#[derive(Clone)]
pub enum VaultTls {
    /// `http://` (local mode with `--vault-allow-http` only).
    Cleartext,
    /// Verified for Vault's host name (or IP) against these roots.
    Verified(Arc<rustls::ClientConfig>),
}

/// An answer: the status and the whole body, in a buffer wiped on drop.
pub struct Answer {
    pub status: u16,
    pub body: Zeroizing<Vec<u8>>,
}

/// One pooled client toward one Vault.
pub struct VaultHttp {
    addr: VaultAddr,
    base: String,
    namespace: Option<HeaderValue>,
    client: Client<VaultConnector, Full<Bytes>>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl VaultHttp {
    pub fn new(
        addr: VaultAddr,
        tls: VaultTls,
        namespace: Option<&str>,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let namespace = namespace
            .map(|ns| {
                HeaderValue::from_str(ns).map_err(|_| format!("namespace {ns:?} is not a header"))
            })
            .transpose()?;
        let connector = VaultConnector {
            addr: Arc::new(addr.clone()),
            tls,
            timeout,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(MAX_CONNECTIONS)
            .build(connector);
        Ok(Self {
            base: addr.url(),
            addr,
            namespace,
            client,
            timeout,
            metrics,
        })
    }

    pub fn addr(&self) -> &VaultAddr {
        &self.addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `method /v1/<path>`, with `token` as `X-Vault-Token` (marked
    /// sensitive) and `body` as JSON. `op` names the call in metrics. An
    /// `Err` says why no answer came (transport, timeout, an oversized
    /// answer), naming Vault's address.
    pub async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        token: Option<&SecretValue>,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Answer, String> {
        let result = tokio::time::timeout(self.timeout, self.exchange(method, path, token, body))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "Vault at {} (--vault-addr) did not answer within {:?}",
                    self.base, self.timeout
                ))
            });
        let label = match &result {
            Ok(answer) => status_class(answer.status),
            Err(_) => "no_answer",
        };
        self.metrics.vault_request(op, label);
        result
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        token: Option<&SecretValue>,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Answer, String> {
        let uri = format!("{}/v1/{path}", self.base);
        let mut request = Request::builder().method(method).uri(&uri);
        if let Some(headers) = request.headers_mut() {
            if let Some(token) = token {
                let mut value = HeaderValue::from_bytes(token.expose_secret())
                    .map_err(|_| "the Vault token is not a valid header value".to_owned())?;
                value.set_sensitive(true);
                headers.insert("x-vault-token", value);
            }
            if let Some(ns) = &self.namespace {
                headers.insert("x-vault-namespace", ns.clone());
            }
            headers.insert("x-vault-request", HeaderValue::from_static("true"));
            if body.is_some() {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
        }
        // The body's bytes are wiped when hyper lets go of them.
        let payload = body.map_or_else(Bytes::new, Bytes::from_owner);
        let request = request
            .body(Full::new(payload))
            .map_err(|e| format!("building a request to {uri}: {e}"))?;
        let response = self.client.request(request).await.map_err(|e| {
            let why = crate::upstream::upstream_error(&e)
                .map(|ours| ours.message.clone())
                .unwrap_or_else(|| chain(&e));
            format!("Vault at {} (--vault-addr): {why}", self.base)
        })?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut bytes = Zeroizing::new(Vec::with_capacity(16 * 1024));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                format!(
                    "Vault at {}: the answer broke off: {}",
                    self.base,
                    chain(&e)
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if bytes.len() + data.len() > MAX_ANSWER_BYTES {
                    return Err(format!(
                        "Vault at {}: the answer is larger than {MAX_ANSWER_BYTES} bytes",
                        self.base
                    ));
                }
                if bytes.len() + data.len() > bytes.capacity() {
                    // Grow by hand so the old buffer is wiped, not just freed.
                    let mut bigger = Zeroizing::new(Vec::with_capacity(
                        (bytes.len() + data.len()).max(bytes.capacity() * 2),
                    ));
                    bigger.extend_from_slice(&bytes);
                    bytes = bigger;
                }
                bytes.extend_from_slice(&data);
            }
        }
        Ok(Answer {
            status,
            body: bytes,
        })
    }
}

/// The metrics label of a status: `2xx`, `403`, `404`, `5xx`...
fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        400 => "400",
        403 => "403",
        404 => "404",
        429 => "429",
        _ if status < 500 => "4xx",
        _ => "5xx",
    }
}

/// `e` and its sources, joined by `: ` (transport errors carry no body).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Dials Vault: the configured address only (whatever the request URI
/// says), resolved with the system resolver (an admin's name, so search
/// domains apply, unlike for agents' upstreams), then TLS as configured.
#[derive(Clone)]
struct VaultConnector {
    addr: Arc<VaultAddr>,
    tls: VaultTls,
    timeout: Duration,
    slots: Arc<Semaphore>,
}

impl tower_service::Service<Uri> for VaultConnector {
    type Response = TokioIo<UpstreamConn>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect().await.map_err(|e| Box::new(e) as BoxError) })
    }
}

impl VaultConnector {
    async fn connect(&self) -> Result<TokioIo<UpstreamConn>, UpstreamError> {
        let VaultAddr { host, port, .. } = &*self.addr;
        let what = format!("{host}:{port}");
        // Waits (the caller's deadline bounds it): hyper-util's pool would
        // otherwise fail a request at once rather than wait for a
        // connection.
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| UpstreamError {
                step: "busy",
                message: format!("{what}: the connection limit is closed"),
            })?;
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, *port)],
            Err(_) => tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|e| UpstreamError {
                    step: "dns",
                    message: format!("could not resolve {host}: {e}"),
                })?
                .collect(),
        };
        let tcp = dial(&what, &addrs, self.timeout).await?;
        let config = match &self.tls {
            VaultTls::Cleartext => return Ok(TokioIo::new(UpstreamConn::plain(tcp, slot))),
            VaultTls::Verified(config) => config.clone(),
        };
        let name = ServerName::try_from(host.clone()).map_err(|_| UpstreamError {
            step: "tls",
            message: format!("{host:?} is not a valid TLS server name"),
        })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| {
                let certificate = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|t| matches!(t, rustls::Error::InvalidCertificate(_)));
                let hint = if certificate {
                    " (Vault's certificate is not trusted for this name: give its CA with \
                     --vault-ca-file)"
                } else {
                    ""
                };
                UpstreamError {
                    step: "tls",
                    message: format!("TLS to {what} failed: {e}{hint}"),
                }
            })?;
        Ok(TokioIo::new(UpstreamConn::tls(tls, slot)))
    }
}

/// A verified client config for Vault: `roots` only (the CA file, or the
/// system roots), HTTP/1.1.
pub fn verified_config(
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return Err("no usable CA certificate to verify Vault with".into());
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS config: {e}"))?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![crate::tls::ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// A client config that accepts any certificate from Vault: only for
/// `local --vault-tls-skip-verify`, which warns loudly at start-up. The
/// handshake's signatures are still checked (so the connection is at least
/// to whoever holds the key of the certificate shown).
pub fn unverified_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = crate::tls::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS config: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![crate::tls::ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_to_scheme_host_and_port_only() {
        let a = VaultAddr::parse("https://vault.example.com:8200/").unwrap();
        assert_eq!(
            a,
            VaultAddr {
                https: true,
                host: "vault.example.com".into(),
                port: 8200
            }
        );
        assert_eq!(a.url(), "https://vault.example.com:8200");
        let b = VaultAddr::parse("http://[::1]").unwrap();
        assert_eq!(
            (b.https, b.port, b.url()),
            (false, 80, "http://[::1]:80".into())
        );
        for bad in [
            "vault:8200",
            "ftp://vault",
            "https://vault/v1/secret",
            "https://user:pw@vault",
            "https://vault?x=1",
            "",
        ] {
            assert!(VaultAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
