//! The client side toward real upstreams (invariant 3): every connection
//! verifies the upstream's certificate for the bound host name against the
//! system roots plus configured CAs. There is no way to skip verification
//! here, by design: no dangerous verifier is ever built.
//!
//! One [`ClientConfig`] exists per distinct set of extra CAs (none, or a
//! destination's `extraCaPem`), built on first use and shared, so handshakes
//! reuse sessions and no connection pays for parsing roots.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{alpn_protocols, parse_pem_certs, provider};
use crate::{Error, Result};

/// Distinct extra-CA sets kept; a config reload that churns through more
/// starts the cache afresh rather than growing without bound.
const MAX_CACHED_CONFIGS: usize = 64;

/// Client configs by (extra-CA PEM text, HTTP/1.1 only).
type ConfigCache = RwLock<HashMap<(Box<str>, bool), Arc<ClientConfig>>>;

/// Verified TLS client configs for upstreams.
pub struct UpstreamTls {
    roots: RootCertStore,
    base: Arc<ClientConfig>,
    /// The base config offering only HTTP/1.1 (for upgrades).
    base_h1: Arc<ClientConfig>,
    /// Keyed by the destination's extra-CA PEM text and whether only
    /// HTTP/1.1 is offered.
    with_extra: ConfigCache,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Trust `system_roots` (unparseable ones are skipped, as every TLS
    /// client does) plus the global `extra_cas` (each must be usable). An
    /// empty result is an error: it would refuse every upstream.
    pub fn new(
        system_roots: &[CertificateDer<'static>],
        extra_cas: &[CertificateDer<'static>],
    ) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        let (_, ignored) = roots.add_parsable_certificates(system_roots.iter().cloned());
        if ignored > 0 {
            tracing::debug!(ignored, "system roots not usable as trust anchors");
        }
        add_extras(&mut roots, extra_cas, "configured extra CA")?;
        if roots.is_empty() {
            return Err(Error::Tls(
                "no trusted roots for upstreams (no system roots and no extra CAs)".into(),
            ));
        }
        let base = build(roots.clone(), false)?;
        let base_h1 = build(roots.clone(), true)?;
        Ok(Self {
            roots,
            base,
            base_h1,
            with_extra: RwLock::new(HashMap::new()),
        })
    }

    /// The config for a destination, trusting also its `extra_ca_pem`.
    pub fn client_config(&self, extra_ca_pem: Option<&str>) -> Result<Arc<ClientConfig>> {
        self.client_config_for(extra_ca_pem, false)
    }

    /// [`Self::client_config`], offering only HTTP/1.1 when `h1_only`
    /// (WebSocket upgrades need an HTTP/1.1 connection).
    pub fn client_config_for(
        &self,
        extra_ca_pem: Option<&str>,
        h1_only: bool,
    ) -> Result<Arc<ClientConfig>> {
        let Some(pem) = extra_ca_pem.filter(|p| !p.trim().is_empty()) else {
            return Ok(if h1_only {
                self.base_h1.clone()
            } else {
                self.base.clone()
            });
        };
        let key: (Box<str>, bool) = (pem.into(), h1_only);
        if let Some(config) = self
            .with_extra
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(config.clone());
        }
        let extras = parse_pem_certs(pem, "a destination's extra CA")?;
        let mut roots = self.roots.clone();
        add_extras(&mut roots, &extras, "a destination's extra CA")?;
        let config = build(roots, h1_only)?;
        let mut cache = self
            .with_extra
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED_CONFIGS {
            cache.clear();
        }
        Ok(cache.entry(key).or_insert(config).clone())
    }

    /// Opens TLS to `host` over `io`, verifying the certificate for `host`.
    /// Errors name the host and say whether its certificate was refused.
    pub async fn connect<IO>(
        &self,
        host: &str,
        extra_ca_pem: Option<&str>,
        io: IO,
    ) -> Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        self.connect_for(host, extra_ca_pem, false, io).await
    }

    /// [`Self::connect`], offering only HTTP/1.1 when `h1_only`.
    pub async fn connect_for<IO>(
        &self,
        host: &str,
        extra_ca_pem: Option<&str>,
        h1_only: bool,
        io: IO,
    ) -> Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| Error::Tls(format!("upstream {host:?}: not a valid server name: {e}")))?;
        let config = self.client_config_for(extra_ca_pem, h1_only)?;
        TlsConnector::from(config)
            .connect(name, io)
            .await
            .map_err(|e| {
                let tls = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>());
                match tls {
                    Some(rustls::Error::InvalidCertificate(reason)) => Error::Tls(format!(
                        "upstream {host}: certificate refused ({}); not trusted by the system \
                         roots or configured CAs for this name",
                        certificate_problem(reason)
                    )),
                    _ => Error::Tls(format!("upstream {host}: TLS handshake failed: {e}")),
                }
            })
    }
}

/// What is wrong with a refused certificate, in our words: rustls's own
/// description may quote the names the certificate carries, which the
/// upstream chose.
fn certificate_problem(reason: &rustls::CertificateError) -> &'static str {
    use rustls::CertificateError as C;
    match reason {
        C::UnknownIssuer => "issued by a CA not trusted here",
        C::NotValidForName | C::NotValidForNameContext { .. } => "not valid for this name",
        C::Expired | C::ExpiredContext { .. } => "expired",
        C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet",
        C::BadSignature => "badly signed",
        C::Revoked => "revoked",
        C::BadEncoding => "malformed",
        C::InvalidPurpose => "not issued for TLS servers",
        _ => "not acceptable",
    }
}

fn add_extras(
    roots: &mut RootCertStore,
    extras: &[CertificateDer<'static>],
    what: &str,
) -> Result<()> {
    for (i, cert) in extras.iter().enumerate() {
        roots.add(cert.clone()).map_err(|e| {
            Error::Tls(format!("{what} #{}: not a usable trust anchor: {e}", i + 1))
        })?;
    }
    Ok(())
}

fn build(roots: RootCertStore, h1_only: bool) -> Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(format!("upstream TLS config: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = if h1_only {
        vec![super::ALPN_HTTP11.to_vec()]
    } else {
        alpn_protocols()
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_ca() -> CertificateDer<'static> {
        let tmp = tempfile::tempdir().unwrap();
        crate::tls::PodCa::load_or_generate(tmp.path())
            .unwrap()
            .cert_der()
            .clone()
    }

    #[test]
    fn configs_are_cached_per_extra_ca() {
        let tls = UpstreamTls::new(&[some_ca()], &[]).unwrap();
        let pem = crate::tls::certs_to_pem([&some_ca()]);
        let a = tls.client_config(Some(&pem)).unwrap();
        let b = tls.client_config(Some(&pem)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&tls.client_config(None).unwrap(), &tls.base));
        assert!(!Arc::ptr_eq(&a, &tls.base));
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[test]
    fn no_roots_at_all_is_an_error() {
        assert!(UpstreamTls::new(&[], &[]).is_err());
    }

    #[test]
    fn bad_extra_ca_is_an_error() {
        let tls = UpstreamTls::new(&[some_ca()], &[]).unwrap();
        let err = tls.client_config(Some("not pem")).unwrap_err();
        assert!(err.to_string().contains("extra CA"), "{err}");
    }
}
