//! The pod CA (DESIGN.md section 4): an ECDSA P-256 CA generated once per
//! pod, whose certificate agents trust and whose key signs the leaves the
//! sidecar presents for bound hosts.
//!
//! The key lives in the CA directory (an in-memory volume mounted only in the
//! sidecar) as `ca.key`, mode 0600, and is written nowhere else; the
//! certificate sits next to it as `ca.crt`. A sidecar restart in the same pod
//! finds both and reuses them, so agents that already trust the CA keep
//! working.
//!
//! # What an interrupted or damaged directory means
//!
//! Agents trust the CA's *key* (through a certificate naming it), so the rule
//! is: never throw away a usable key, and only ever regenerate what cannot be
//! used anyway.
//!
//! | `ca.key`                         | `ca.crt`                              | result                    |
//! |----------------------------------|---------------------------------------|---------------------------|
//! | absent                           | absent                                | new CA ([`CaOrigin::Generated`]) |
//! | P-256 key                        | CA cert for that key, valid ≥ 30 days | reused ([`CaOrigin::Loaded`]) |
//! | P-256 key                        | absent, corrupt, another key's, expiring | certificate re-issued for the same key and subject ([`CaOrigin::Reissued`]): leaves still chain to what agents trust |
//! | absent, or not a P-256 PKCS#8 key | anything                             | new CA ([`CaOrigin::Replaced`]), logged as a warning: the old key is gone, so agents that trusted it must re-read the bundle whatever we do, and refusing to start would only crash-loop the pod |
//! | readable by group/others, a symlink, or unreadable (I/O error) | anything | **error**: a key that may have been exposed, or a transient fault, is never silently reused nor replaced |
//!
//! Files are written key first, then certificate, each atomically, so a crash
//! during generation leaves at worst a key without a certificate, which the
//! next start repairs without changing the key.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, GeneralSubtree,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, PublicKeyData, SerialNumber,
    SignatureAlgorithm, SigningKey,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use zeroize::{Zeroize, Zeroizing};

use super::{ensure_dir, parse_pem_certs, remove_stale_temp_files, write_atomic};
use crate::{Error, Result};

/// The key's file name in the CA directory.
pub const KEY_FILE: &str = "ca.key";
/// The certificate's file name in the CA directory.
pub const CERT_FILE: &str = "ca.crt";

/// Subject of every pod CA. Fixed, so that a certificate re-issued for the
/// same key has the same subject and leaves keep chaining to the old one.
const CA_COMMON_NAME: &str = "credbroker pod CA";
const CA_ORGANIZATION: &str = "credbroker";

/// Longer than any pod lives: the CA is never rotated while a pod runs.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Tolerance for agents whose clock is a little behind ours.
const CA_BACKDATE: Duration = Duration::from_secs(3600);
/// A loaded certificate with less validity left than this is re-issued.
const CA_MIN_REMAINING: Duration = Duration::from_secs(30 * 24 * 3600);

/// How this process came by its CA, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaOrigin {
    /// Key and certificate found and reused (a sidecar restart).
    Loaded,
    /// Nothing there: a fresh CA (the pod's first start).
    Generated,
    /// The key was reused and a new certificate issued for it.
    Reissued,
    /// The key was missing or unusable; a new CA replaced it.
    Replaced,
}

/// The CA's private key. Deliberately neither `Debug` nor `Display` nor
/// `Clone`; its serialized form is wiped on drop.
struct CaKey(KeyPair);

impl Drop for CaKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        PublicKeyData::algorithm(&self.0)
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

/// The pod CA: its certificate (public) and its signing key (never printed).
pub struct PodCa {
    dir: PathBuf,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: SystemTime,
    issuer: Issuer<'static, CaKey>,
    origin: CaOrigin,
}

impl PodCa {
    /// Reuses the CA in `dir`, or creates one there; see the module docs for
    /// how a partial or damaged directory is handled. Creates `dir` (0700) if
    /// needed.
    pub fn load_or_generate(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        ensure_dir(dir, 0o700)?;
        remove_stale_temp_files(dir)?;
        let now = OffsetDateTime::now_utc();

        let (key, origin) = match read_key(dir)? {
            KeyState::Usable(key) => match read_cert(dir, &key, now)? {
                CertState::Usable(der) => {
                    tracing::info!(dir = %dir.display(), "reusing the pod CA");
                    return Self::assemble(dir, der, *key, CaOrigin::Loaded);
                }
                CertState::Unusable(reason) => {
                    tracing::warn!(
                        dir = %dir.display(),
                        %reason,
                        "pod CA certificate unusable; re-issuing it for the existing key"
                    );
                    (*key, CaOrigin::Reissued)
                }
            },
            KeyState::Absent if !dir.join(CERT_FILE).exists() => {
                tracing::info!(dir = %dir.display(), "generating the pod CA");
                (new_key()?, CaOrigin::Generated)
            }
            KeyState::Absent => {
                tracing::warn!(
                    dir = %dir.display(),
                    "pod CA certificate found without its key; generating a new CA \
                     (agents must re-read the trust bundle)"
                );
                (new_key()?, CaOrigin::Replaced)
            }
            KeyState::Unusable(reason) => {
                tracing::warn!(
                    dir = %dir.display(),
                    %reason,
                    "pod CA key unusable; generating a new CA (agents must re-read the trust bundle)"
                );
                (new_key()?, CaOrigin::Replaced)
            }
        };

        if origin != CaOrigin::Reissued {
            let pem = Zeroizing::new(key.serialize_pem());
            write_atomic(dir, KEY_FILE, pem.as_bytes(), 0o600)?;
        }
        let cert = ca_params(now)?
            .self_signed(&key)
            .map_err(|e| Error::Tls(format!("signing the pod CA certificate: {e}")))?;
        write_atomic(dir, CERT_FILE, cert.pem().as_bytes(), 0o644)?;
        Self::assemble(dir, cert.der().clone(), key, origin)
    }

    fn assemble(
        dir: &Path,
        cert_der: CertificateDer<'static>,
        key: KeyPair,
        origin: CaOrigin,
    ) -> Result<Self> {
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| Error::Tls(format!("parsing the pod CA certificate: {e}")))?;
        let not_after = unix_to_system(parsed.validity().not_after.timestamp());
        // The issuer's subject comes from the certificate itself, so leaves
        // name exactly the subject agents trust.
        let issuer = Issuer::from_ca_cert_der(&cert_der, CaKey(key))
            .map_err(|e| Error::Tls(format!("reading the pod CA certificate: {e}")))?;
        let cert_pem = super::certs_to_pem([&cert_der]);
        Ok(Self {
            dir: dir.to_path_buf(),
            cert_der,
            cert_pem,
            not_after,
            issuer,
            origin,
        })
    }

    /// The CA certificate (DER), what agents trust.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The directory holding the key; the bundle writer refuses to write
    /// agent-readable files there.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// When the CA certificate expires; leaves never outlive it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether this CA was reused, generated, re-issued or replaced.
    pub fn origin(&self) -> CaOrigin {
        self.origin
    }

    /// Signs `params` for `public_key` (a leaf) with the CA key.
    pub(crate) fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<rcgen::Certificate> {
        params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| Error::Tls(format!("signing a leaf certificate: {e}")))
    }
}

enum KeyState {
    Absent,
    Usable(Box<KeyPair>),
    /// Present but not a key we could have written (the reason says why).
    Unusable(String),
}

enum CertState {
    Usable(CertificateDer<'static>),
    Unusable(String),
}

fn new_key() -> Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::Tls(format!("generating the pod CA key: {e}")))
}

fn read_key(dir: &Path) -> Result<KeyState> {
    let path = dir.join(KEY_FILE);
    let meta = match fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(KeyState::Absent),
        Err(e) => {
            return Err(Error::Io {
                what: format!("reading the pod CA key {}", path.display()),
                source: e,
            });
        }
    };
    if !meta.file_type().is_file() {
        return Err(Error::Tls(format!(
            "pod CA key {} is not a regular file (a symlink?); refusing to use or replace it",
            path.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Tls(format!(
            "pod CA key {} has mode {mode:04o}, readable beyond its owner; refusing to use a key \
             others may have read (it must be 0600; delete the pod to start a new CA)",
            path.display()
        )));
    }
    let bytes = Zeroizing::new(fs::read(&path).map_err(|e| Error::Io {
        what: format!("reading the pod CA key {}", path.display()),
        source: e,
    })?);
    let Ok(pem) = std::str::from_utf8(&bytes) else {
        return Ok(KeyState::Unusable("not PEM text".into()));
    };
    // rcgen's error names the parse failure, never key bytes.
    match KeyPair::from_pem(pem) {
        Ok(key) if key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 => {
            Ok(KeyState::Usable(Box::new(key)))
        }
        Ok(_) => Ok(KeyState::Unusable("not an ECDSA P-256 key".into())),
        Err(e) => Ok(KeyState::Unusable(format!("not a PKCS#8 PEM key: {e}"))),
    }
}

fn read_cert(dir: &Path, key: &KeyPair, now: OffsetDateTime) -> Result<CertState> {
    let path = dir.join(CERT_FILE);
    let pem = match fs::read_to_string(&path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Ok(CertState::Unusable(format!(
                "{} is missing",
                path.display()
            )));
        }
        Err(e) if e.kind() == ErrorKind::InvalidData => {
            return Ok(CertState::Unusable(format!(
                "{} is not text",
                path.display()
            )));
        }
        Err(e) => {
            return Err(Error::Io {
                what: format!("reading the pod CA certificate {}", path.display()),
                source: e,
            });
        }
    };
    let certs = match parse_pem_certs(&pem, &path.display().to_string()) {
        Ok(certs) => certs,
        Err(e) => return Ok(CertState::Unusable(e.to_string())),
    };
    let Ok([der]) = <[CertificateDer<'static>; 1]>::try_from(certs) else {
        return Ok(CertState::Unusable(format!(
            "{} must hold exactly one certificate",
            path.display()
        )));
    };
    let reason = match x509_parser::parse_x509_certificate(&der) {
        Err(e) => Some(format!("unparseable: {e}")),
        Ok((_, cert)) => {
            let remaining = cert.validity().not_after.timestamp() - now.unix_timestamp();
            if !cert.is_ca() {
                Some("not a CA certificate".into())
            } else if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                Some("certifies a different key".into())
            } else if cert.validity().not_before.timestamp() > now.unix_timestamp() {
                Some("not valid yet".into())
            } else if remaining < secs(CA_MIN_REMAINING) {
                Some("expires within 30 days".into())
            } else {
                None
            }
        }
    };
    Ok(match reason {
        None => CertState::Usable(der),
        Some(reason) => CertState::Unusable(reason),
    })
}

/// The CA's certificate parameters. Deterministic apart from dates and
/// serial, so re-issuing for the same key yields the same subject.
fn ca_params(now: OffsetDateTime) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = dn;
    // Path length 0: the pod CA signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Name constraints: the CA mints leaves for bound DNS names only, so it
    // is barred from vouching for any IP address; an agent dialling an IP
    // literal can never be handed a pod-CA certificate.
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: Vec::new(),
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    params.not_before = now - CA_BACKDATE;
    params.not_after = now + CA_LIFETIME;
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// A random positive 128-bit serial (RFC 5280 allows up to 20 octets).
pub(crate) fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| Error::Tls(format!("random serial number: {e}")))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero octet to be stripped
    Ok(SerialNumber::from_slice(&bytes))
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn unix_to_system(ts: i64) -> SystemTime {
    match u64::try_from(ts) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn files(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        (
            fs::read(dir.join(KEY_FILE)).unwrap(),
            fs::read(dir.join(CERT_FILE)).unwrap(),
        )
    }

    #[test]
    fn fresh_directory_generates_then_restart_reuses() {
        let tmp = dir();
        let ca_dir = tmp.path().join("ca");
        let first = PodCa::load_or_generate(&ca_dir).unwrap();
        assert_eq!(first.origin(), CaOrigin::Generated);
        let before = files(&ca_dir);
        let second = PodCa::load_or_generate(&ca_dir).unwrap();
        assert_eq!(second.origin(), CaOrigin::Loaded);
        assert_eq!(first.cert_der(), second.cert_der());
        assert_eq!(before, files(&ca_dir));
        let dir_mode = fs::metadata(&ca_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn key_without_certificate_keeps_the_key() {
        let tmp = dir();
        let first = PodCa::load_or_generate(tmp.path()).unwrap();
        let (key, _) = files(tmp.path());
        fs::remove_file(tmp.path().join(CERT_FILE)).unwrap();
        let second = PodCa::load_or_generate(tmp.path()).unwrap();
        assert_eq!(second.origin(), CaOrigin::Reissued);
        assert_eq!(files(tmp.path()).0, key);
        // Same key and subject: an agent trusting the first certificate
        // verifies leaves signed under the second.
        let spki = |der: &CertificateDer<'_>| {
            let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
            (c.public_key().raw.to_vec(), c.subject().to_string())
        };
        assert_eq!(spki(first.cert_der()), spki(second.cert_der()));
    }

    #[test]
    fn corrupt_certificate_is_reissued_for_the_same_key() {
        let tmp = dir();
        PodCa::load_or_generate(tmp.path()).unwrap();
        let (key, _) = files(tmp.path());
        fs::write(tmp.path().join(CERT_FILE), "garbage").unwrap();
        let ca = PodCa::load_or_generate(tmp.path()).unwrap();
        assert_eq!(ca.origin(), CaOrigin::Reissued);
        assert_eq!(files(tmp.path()).0, key);
    }

    #[test]
    fn certificate_for_another_key_is_reissued() {
        let a = dir();
        let b = dir();
        PodCa::load_or_generate(a.path()).unwrap();
        PodCa::load_or_generate(b.path()).unwrap();
        fs::copy(b.path().join(CERT_FILE), a.path().join(CERT_FILE)).unwrap();
        let ca = PodCa::load_or_generate(a.path()).unwrap();
        assert_eq!(ca.origin(), CaOrigin::Reissued);
    }

    #[test]
    fn certificate_without_key_is_replaced() {
        let tmp = dir();
        let first = PodCa::load_or_generate(tmp.path()).unwrap();
        fs::remove_file(tmp.path().join(KEY_FILE)).unwrap();
        let second = PodCa::load_or_generate(tmp.path()).unwrap();
        assert_eq!(second.origin(), CaOrigin::Replaced);
        assert_ne!(first.cert_der(), second.cert_der());
    }

    #[test]
    fn corrupt_key_is_replaced() {
        let tmp = dir();
        PodCa::load_or_generate(tmp.path()).unwrap();
        let path = tmp.path().join(KEY_FILE);
        fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let ca = PodCa::load_or_generate(tmp.path()).unwrap();
        assert_eq!(ca.origin(), CaOrigin::Replaced);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn key_readable_by_others_is_refused_not_replaced() {
        let tmp = dir();
        PodCa::load_or_generate(tmp.path()).unwrap();
        let path = tmp.path().join(KEY_FILE);
        let before = fs::read(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = PodCa::load_or_generate(tmp.path()).err().unwrap();
        assert!(err.to_string().contains("0644"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);
    }

    #[test]
    fn symlinked_key_is_refused() {
        let tmp = dir();
        let other = dir();
        PodCa::load_or_generate(other.path()).unwrap();
        std::os::unix::fs::symlink(other.path().join(KEY_FILE), tmp.path().join(KEY_FILE)).unwrap();
        let err = PodCa::load_or_generate(tmp.path()).err().unwrap();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn stale_temporary_files_are_removed() {
        let tmp = dir();
        let stale = tmp
            .path()
            .join(format!("{}{KEY_FILE}.1", super::super::TMP_PREFIX));
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&stale)
            .unwrap();
        PodCa::load_or_generate(tmp.path()).unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn ca_certificate_shape() {
        let tmp = dir();
        let ca = PodCa::load_or_generate(tmp.path()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(cert.is_ca());
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert_eq!(bc.path_len_constraint, Some(0));
        assert!(cert.name_constraints().unwrap().is_some());
        let alg = cert.public_key().algorithm.parameters.as_ref().unwrap();
        // prime256v1
        assert_eq!(
            alg.as_oid().unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
        let remaining = ca.not_after().duration_since(SystemTime::now()).unwrap();
        assert!(remaining > Duration::from_secs(9 * 365 * 24 * 3600));
    }
}
