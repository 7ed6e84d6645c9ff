//! The trust files agent containers read (DESIGN.md section 4), so that the
//! trust env vars the webhook sets *add* the pod CA instead of replacing the
//! system roots:
//!
//! - `ca.crt`: the pod CA alone (`NODE_EXTRA_CA_CERTS` and other "extra" vars);
//! - `ca-bundle.crt`: system roots + pod CA + configured extra CAs, PEM
//!   (`SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`, ...);
//! - `truststore.p12`: the same certificates as a PKCS#12 truststore for
//!   Java (`-Djavax.net.ssl.trustStore`), each a trusted-certificate entry.
//!   Its password is [`TRUSTSTORE_PASSWORD`], public on purpose: the file
//!   holds public certificates only, and Java requires some password. It is
//!   written as current JDKs write PKCS#12 (PBES2/AES-256, HMAC-SHA256),
//!   which JDK 8u301+, 11.0.12+ and 12+ read.
//!
//! All three are public and written atomically (readers see the old or the
//! new file, never half of one). The directory must never be, or contain,
//! the CA key's directory: [`write_bundle`] refuses that.
//!
//! System roots come from `rustls-native-certs` ([`system_roots`]), the same
//! set the sidecar verifies upstreams against: it finds the distribution's
//! bundle (`/etc/ssl/certs/ca-certificates.crt` on Debian) wherever the
//! image keeps it and honours `SSL_CERT_FILE`/`SSL_CERT_DIR`, so agents trust
//! exactly what the sidecar trusts.

use std::collections::HashSet;
use std::path::Path;

use p12_keystore::{KeyStore, KeyStoreEntry};
use rustls::pki_types::CertificateDer;

use super::ca::{self, PodCa};
use super::{certs_to_pem, ensure_dir, remove_stale_temp_files, write_atomic};
use crate::{Error, Result};

/// The pod CA alone.
pub const CA_FILE: &str = "ca.crt";
/// System roots + pod CA + extra CAs, PEM.
pub const BUNDLE_FILE: &str = credbroker_crds::keys::injected::TRUST_BUNDLE_FILE;
/// The same as [`BUNDLE_FILE`], as a PKCS#12 truststore for Java.
pub const TRUSTSTORE_FILE: &str = credbroker_crds::keys::injected::TRUSTSTORE_FILE;
/// The truststore's password: public, documented, the JDK's own default.
pub const TRUSTSTORE_PASSWORD: &str = credbroker_crds::keys::injected::TRUSTSTORE_PASSWORD;
/// The pod CA's alias in the truststore.
pub const POD_CA_ALIAS: &str = "credbroker-pod-ca";

/// What [`write_bundle`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleSummary {
    /// Certificates in `ca-bundle.crt`, the pod CA included.
    pub bundle_certs: usize,
    /// Trusted-certificate entries in `truststore.p12`.
    pub truststore_entries: usize,
    /// System roots Java's format could not take (they are still in the PEM
    /// bundle); normally zero.
    pub skipped_in_truststore: usize,
}

/// The platform's trusted roots. Finding none is an error: a bundle without
/// them would break every TLS connection the agent makes to unbound hosts.
pub fn system_roots() -> Result<Vec<CertificateDer<'static>>> {
    let loaded = rustls_native_certs::load_native_certs();
    if loaded.certs.is_empty() {
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        return Err(Error::Tls(format!(
            "no system root certificates found (install ca-certificates, or point \
             SSL_CERT_FILE at a bundle){}",
            if errors.is_empty() {
                String::new()
            } else {
                format!(": {}", errors.join("; "))
            }
        )));
    }
    for error in &loaded.errors {
        tracing::warn!(%error, "some system root certificates could not be read");
    }
    Ok(loaded.certs)
}

/// Writes `ca.crt`, `ca-bundle.crt` and `truststore.p12` into `dir`
/// (created 0755 if missing). Duplicates (an extra CA that is also a system
/// root) appear once.
pub fn write_bundle(
    dir: &Path,
    ca: &PodCa,
    system_roots: &[CertificateDer<'static>],
    extra_cas: &[CertificateDer<'static>],
) -> Result<BundleSummary> {
    ensure_dir(dir, 0o755)?;
    refuse_key_directory(dir, ca)?;
    remove_stale_temp_files(dir)?;

    let mut seen = HashSet::new();
    let mut certs: Vec<(Source, &CertificateDer<'static>)> = Vec::new();
    let sources = system_roots
        .iter()
        .map(|c| (Source::System, c))
        .chain([(Source::PodCa, ca.cert_der())])
        .chain(extra_cas.iter().map(|c| (Source::Extra, c)));
    for (source, cert) in sources {
        if seen.insert(cert.as_ref()) {
            certs.push((source, cert));
        }
    }

    let mut store = KeyStore::new();
    let mut skipped = 0;
    let (mut n_system, mut n_extra) = (0, 0);
    for (source, cert) in &certs {
        let alias = match source {
            Source::PodCa => POD_CA_ALIAS.to_owned(),
            Source::Extra => {
                n_extra += 1;
                format!("extra-ca-{n_extra}")
            }
            Source::System => {
                n_system += 1;
                format!("system-root-{n_system}")
            }
        };
        match p12_keystore::Certificate::from_der(cert.as_ref()) {
            Ok(c) => store.add_entry(&alias, KeyStoreEntry::Certificate(c)),
            Err(error) if *source == Source::System => {
                tracing::warn!(%alias, %error, "system root left out of the Java truststore");
                skipped += 1;
            }
            Err(e) => {
                return Err(Error::Tls(format!(
                    "{alias}: not a certificate the Java truststore can hold: {e}"
                )));
            }
        }
    }
    let p12 = store
        .writer(TRUSTSTORE_PASSWORD)
        .write()
        .map_err(|e| Error::Tls(format!("writing the Java truststore: {e}")))?;

    write_atomic(dir, CA_FILE, ca.cert_pem().as_bytes(), 0o644)?;
    let bundle = certs_to_pem(certs.iter().map(|(_, c)| *c));
    write_atomic(dir, BUNDLE_FILE, bundle.as_bytes(), 0o644)?;
    write_atomic(dir, TRUSTSTORE_FILE, &p12, 0o644)?;
    Ok(BundleSummary {
        bundle_certs: certs.len(),
        truststore_entries: store.entries_len(),
        skipped_in_truststore: skipped,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    System,
    PodCa,
    Extra,
}

/// The bundle directory is readable by agents; the CA key must never be
/// reachable from it.
fn refuse_key_directory(dir: &Path, ca: &PodCa) -> Result<()> {
    let canonical = |p: &Path| {
        p.canonicalize().map_err(|e| Error::Io {
            what: format!("resolving {}", p.display()),
            source: e,
        })
    };
    let bundle_dir = canonical(dir)?;
    let key_dir = canonical(ca.dir())?;
    if key_dir.starts_with(&bundle_dir) || bundle_dir.join(ca::KEY_FILE).exists() {
        return Err(Error::Config(format!(
            "the trust bundle directory {} would expose the pod CA key in {}; \
             use separate directories",
            dir.display(),
            ca.dir().display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_the_ca_directory_and_its_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        let ca = PodCa::load_or_generate(&ca_dir).unwrap();
        let roots = [ca.cert_der().clone()];
        for dir in [ca_dir.as_path(), tmp.path()] {
            let err = write_bundle(dir, &ca, &roots, &[]).unwrap_err();
            assert!(err.to_string().contains("expose the pod CA key"), "{err}");
        }
        assert!(!ca_dir.join(BUNDLE_FILE).exists());
    }

    #[test]
    fn duplicates_appear_once() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = PodCa::load_or_generate(tmp.path().join("ca")).unwrap();
        let other = PodCa::load_or_generate(tmp.path().join("other")).unwrap();
        let extra = other.cert_der().clone();
        let summary = write_bundle(
            &tmp.path().join("bundle"),
            &ca,
            std::slice::from_ref(&extra),
            &[extra.clone(), ca.cert_der().clone()],
        )
        .unwrap();
        assert_eq!(summary.bundle_certs, 2);
        assert_eq!(summary.truststore_entries, 2);
    }
}
