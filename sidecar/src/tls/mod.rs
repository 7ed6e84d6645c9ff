//! TLS for the sidecar (DESIGN.md section 4): the pod CA that agents trust,
//! the leaf certificates minted from it for bound SNI names, the trust files
//! written for agent containers, and the verified client side toward real
//! upstreams.
//!
//! - [`ca`]: the pod CA, generated once per pod and reused across sidecar
//!   restarts (its key never leaves the CA directory);
//! - [`leaf`]: [`LeafCertCache`], the per-SNI leaf cache and rustls resolver;
//! - [`bundle`]: `ca.crt`, `ca-bundle.crt` and `truststore.p12` for agents;
//! - [`upstream`]: rustls client configs that always verify (invariant 3).
//!
//! Every config here is built with the ring provider named explicitly, never
//! a process-wide default, so no other crate's choice can change ours.

pub mod bundle;
pub mod ca;
pub mod leaf;
pub mod upstream;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;

pub use bundle::{BundleSummary, TRUSTSTORE_PASSWORD, system_roots, write_bundle};
pub use ca::{CaOrigin, PodCa};
pub use leaf::{LeafCacheStats, LeafCertCache, LeafPolicy};
pub use upstream::UpstreamTls;

use crate::{Error, Result};

/// Upstream TLS that trusts only a freshly generated CA, for unit tests
/// that build engine snapshots but never dial TLS.
#[cfg(test)]
pub(crate) fn throwaway_upstream_tls() -> Arc<UpstreamTls> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca = PodCa::load_or_generate(dir.path()).expect("a throwaway CA");
    Arc::new(UpstreamTls::new(&[ca.cert_der().clone()], &[]).expect("upstream TLS"))
}

/// ALPN protocol ids, in our order of preference, for both sides.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The ALPN list offered (client) and accepted (server): HTTP/2 first.
pub fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
}

/// The ring crypto provider every config in this module is built with.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Every certificate in a PEM text. `what` names the source for errors (a
/// file, a binding's destination). Text that holds no certificate at all is
/// an error: an extra CA that silently adds no trust would fail later, far
/// from its cause.
pub fn parse_pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{what}: unreadable PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{what}: no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(certs)
}

/// PEM text for DER certificates, one block each.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for cert in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in b64.as_bytes().chunks(64) {
            // Base64 output is ASCII, so every 64-byte chunk is valid UTF-8.
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Writes `contents` to `dir/name` so that a reader sees either the old file
/// or the new one, never a partial one: a temporary file in the same
/// directory, created with `mode` from the start (no window in which a key is
/// readable by others), synced, renamed over the target, and the directory
/// synced so the rename survives a crash.
pub(crate) fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<()> {
    let target = dir.join(name);
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix)
        .map_err(|e| Error::Tls(format!("random name for a temporary file: {e}")))?;
    let tmp = dir.join(format!("{TMP_PREFIX}{name}.{}", u64::from_le_bytes(suffix)));
    let io = |what: &str, source| Error::Io {
        what: format!("{what} {}", tmp.display()),
        source,
    };
    let result = (|| {
        // create_new: O_EXCL, so a planted symlink or stale file is never
        // followed or reused; mode applies at creation (minus umask, which
        // can only remove bits).
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| io("creating", e))?;
        // Set the exact mode in case the umask removed bits we want (0644
        // files must stay readable by agent containers).
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io("setting the mode of", e))?;
        file.write_all(contents).map_err(|e| io("writing", e))?;
        file.sync_all().map_err(|e| io("syncing", e))?;
        drop(file);
        fs::rename(&tmp, &target).map_err(|e| Error::Io {
            what: format!("renaming {} to {}", tmp.display(), target.display()),
            source: e,
        })?;
        sync_dir(dir)
    })();
    if result.is_err() {
        // Best effort: the write already failed, and that error is the one
        // worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Prefix of [`write_atomic`]'s temporary files, so leftovers of a crash can
/// be recognised and removed.
pub(crate) const TMP_PREFIX: &str = ".credbroker-tmp-";

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::Io {
            what: format!("syncing directory {}", dir.display()),
            source: e,
        })
}

/// Removes temporary files a crash in [`write_atomic`] left in `dir`. They
/// may hold a CA key, so they are not left lying around, but they never left
/// the directory either.
pub(crate) fn remove_stale_temp_files(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::Io {
        what: format!("listing {}", dir.display()),
        source: e,
    })?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| Error::Io {
                what: format!("removing stale temporary file {}", path.display()),
                source: e,
            })?;
        }
    }
    Ok(())
}

/// Creates `dir` with `mode` if it does not exist (missing parents get the
/// default mode, so a 0700 CA directory does not hide a sibling bundle
/// directory); an existing directory is left as it is (Kubernetes owns
/// volume permissions).
pub(crate) fn ensure_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let creating = |e| Error::Io {
        what: format!("creating directory {}", dir.display()),
        source: e,
    };
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Error::Tls(format!(
            "{} exists and is not a directory",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(creating)?;
            }
            match fs::DirBuilder::new().mode(mode).create(dir) {
                // Lost a race with another creator: fine if it is a directory.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
                other => other.map_err(creating),
            }
        }
        Err(e) => Err(Error::Io {
            what: format!("reading {}", dir.display()),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip() {
        let der = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let pem = certs_to_pem([&der, &der]);
        let back = parse_pem_certs(&pem, "test").unwrap();
        assert_eq!(back, vec![der.clone(), der]);
    }

    #[test]
    fn pem_without_certificates_is_an_error_naming_the_source() {
        let err = parse_pem_certs("nothing here", "binding x").unwrap_err();
        assert!(err.to_string().contains("binding x"), "{err}");
    }

    #[test]
    fn atomic_write_sets_the_mode_and_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_atomic(dir, "f", b"one", 0o600).unwrap();
        write_atomic(dir, "f", b"two", 0o644).unwrap();
        assert_eq!(fs::read(dir.join("f")).unwrap(), b"two");
        let mode = fs::metadata(dir.join("f")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
