//! The certificate the webhook serves, and where it comes from.
//!
//! [`ServingCert`] is the rustls resolver the HTTPS server uses; it holds
//! one certificate and key, swapped atomically, so rotation needs no
//! restart. Two modes fill it:
//!
//! - **provided** ([`load_provided`], then [`poll_provided`]; both in
//!   [`watch_provided`]): a mounted `tls.crt`/`tls.key` pair (cert-manager
//!   or any other issuer). Read and loaded once at start (the webhook does
//!   not start without it), then the files' *contents* are polled:
//!   Secret volumes change through a `..data` symlink swap, so mtimes say
//!   nothing. A changed pair that does not parse or does not match (a
//!   half-written update) is logged with the reason and the old pair keeps
//!   serving.
//! - **self-managed** ([`run_self_managed`]): the webhook is its own CA.
//!   Every replica serves what the Secret holds; the replica holding a
//!   Lease (the controller's [`Elector`]) alone writes the Secret and the
//!   `caBundle` of every entry of the MutatingWebhookConfiguration.
//!
//! # The Secret (self-managed)
//!
//! Type `kubernetes.io/tls`, labelled
//! `app.kubernetes.io/managed-by: credbroker-webhook` (a Secret of that name
//! without the label is never touched: the webhook stops with an error).
//!
//! | key       | holds |
//! |-----------|-------|
//! | `tls.crt` | the serving certificate (leaf only) |
//! | `tls.key` | its key (PKCS#8) |
//! | `ca.crt`  | the CA bundle, oldest first: exactly what `caBundle` must hold |
//! | `ca.key`  | the key of the newest CA, the only one that signs (older CAs' keys are dropped) |
//!
//! | annotation | meaning |
//! |------------|---------|
//! | `credbroker.dev/ca-bundle-published` | `<RFC 3339> <sha256 prefix of ca.crt>`: every `caBundle` has held exactly this `ca.crt` since then |
//! | `credbroker.dev/serving-since` | `<RFC 3339> <sha256 prefix of tls.crt>`: when this `tls.crt` was written |
//! | `credbroker.dev/rotate` | set by an admin or a test, to any new value: start a CA rotation |
//! | `credbroker.dev/rotated` | the last `rotate` value acted upon (so each request is done once) |
//! | `credbroker.dev/written-by` | the replica (lease identity) that last wrote the Secret |
//!
//! Both time records carry a hash of what they are about, so a hand edit of
//! `ca.crt` or `tls.crt` voids them (and the safe, slower path is taken).
//!
//! **Forced rotation**: `kubectl annotate secret <name> --overwrite
//! credbroker.dev/rotate="$(date +%s)"` makes the leader add a new CA and walk
//! through the same steps as a scheduled rotation.
//!
//! # Rotation never breaks admission
//!
//! The API server verifies the webhook against `caBundle`, and neither the
//! API servers nor the replicas see a change at once. So the decision is a
//! pure function, [`plan`], run by the leader every `check_interval`:
//!
//! 1. No Secret, or nothing usable in it: a new CA (ECDSA P-256) and a
//!    serving certificate signed by it, written together, then published.
//!    Nothing working was served before, so there is nothing to wait for.
//! 2. The newest CA is past 2/3 of its validity, or its key is missing, or
//!    a rotation was requested: a new CA is *appended* to `ca.crt` (the old
//!    one stays) and published to every `caBundle`; the time of that
//!    publication is recorded.
//! 3. The serving certificate is signed by an older CA, past 2/3 of its
//!    validity, or misses a configured name: it is reissued from the newest
//!    CA, but only once the current `ca.crt` has been in every `caBundle` for
//!    `propagation_delay`. A serving certificate that is absent, expired or
//!    chains to nothing in `ca.crt` is reissued at once (it cannot be
//!    verified anyway).
//! 4. An older CA leaves `ca.crt` (and then `caBundle`) when it has expired,
//!    or when no serving certificate written to the Secret within the last
//!    `propagation_delay + 2 × check_interval` could chain to it (replicas
//!    poll the Secret every `check_interval`). The CA that signed the current
//!    serving certificate is never dropped before that certificate expires.
//! 5. Whenever `caBundle` differs from `ca.crt` (a hand edit, a chart
//!    upgrade) the leader writes it back and restarts the publication clock.
//!
//! Writes carry the resourceVersion they were computed from (a conflict
//! means: re-read and re-plan) and go out only while the Lease surely holds
//! ([`Fence::check`]). Private keys are never logged, and errors name the
//! object and the step.
//!
//! # RBAC (self-managed)
//!
//! `get`, `create`, `update` on the Secret and on the Lease in the webhook's
//! namespace; `get`, `update` on the one MutatingWebhookConfiguration.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use credbroker_controller::leader::{Elector, Fence, LeaseSettings};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{Error, Result};

/// `app.kubernetes.io/managed-by` on the self-managed Secret.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value: this webhook.
pub const MANAGED_BY: &str = "credbroker-webhook";
/// Set to any new value to start a CA rotation (see the module docs).
pub const ROTATE_ANNOTATION: &str = "credbroker.dev/rotate";
/// The last [`ROTATE_ANNOTATION`] value the leader acted upon.
pub const ROTATED_ANNOTATION: &str = "credbroker.dev/rotated";
/// Since when every `caBundle` has held this `ca.crt`.
pub const BUNDLE_PUBLISHED_ANNOTATION: &str = "credbroker.dev/ca-bundle-published";
/// When this `tls.crt` was written.
pub const SERVING_SINCE_ANNOTATION: &str = "credbroker.dev/serving-since";
/// The lease identity of the replica that last wrote the Secret.
pub const WRITTEN_BY_ANNOTATION: &str = "credbroker.dev/written-by";

/// Keys of the self-managed Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";

pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
pub const DEFAULT_PROPAGATION_DELAY: Duration = Duration::from_secs(30);
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(60);

const SECRET_TYPE: &str = "kubernetes.io/tls";
const FIELD_MANAGER: &str = "credbroker-webhook";
/// Common name of every CA, followed by a random suffix so two CAs of one
/// rotation are told apart by people and tools.
const CA_COMMON_NAME: &str = "credbroker-webhook CA";
const ORGANIZATION: &str = "credbroker";
/// Hex digits of SHA-256 in fingerprints and time records.
const HASH_HEX: usize = 16;

/// The ring provider, chosen explicitly: the process may link more than one
/// and rustls then refuses to guess a default.
fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
}

// ---------------------------------------------------------------------------
// The served certificate
// ---------------------------------------------------------------------------

/// The certificate the webhook serves, swapped atomically (a rustls
/// resolver: every handshake reads the current one). It counts its own
/// loads, so whatever fills it (the provided files, the Secret) is seen in
/// the metrics without each caller having to report.
pub struct ServingCert {
    current: ArcSwapOption<CertifiedKey>,
    loads_ok: AtomicU64,
    loads_failed: AtomicU64,
}

/// How many pairs [`ServingCert`] was given, by result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CertLoads {
    /// Swapped in.
    pub ok: u64,
    /// Refused (the previous pair kept serving).
    pub failed: u64,
}

impl ServingCert {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::empty(),
            loads_ok: AtomicU64::new(0),
            loads_failed: AtomicU64::new(0),
        })
    }

    /// The loads so far (for the metrics).
    pub fn loads(&self) -> CertLoads {
        CertLoads {
            ok: self.loads_ok.load(Ordering::Relaxed),
            failed: self.loads_failed.load(Ordering::Relaxed),
        }
    }

    /// The served leaf's notAfter (for the expiry metric); `None` before
    /// the first load.
    pub fn not_after(&self) -> Option<SystemTime> {
        let current = self.current.load();
        let leaf = current.as_ref()?.cert.first()?;
        cert_fields(leaf.as_ref()).ok().map(|f| f.not_after)
    }

    /// Whether a certificate has been loaded (readiness).
    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }

    /// The certificate served now.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    /// SHA-256 (first 16 hex digits) of the served leaf, for logs and status.
    pub fn fingerprint(&self) -> Option<String> {
        let current = self.current.load();
        let key = current.as_ref()?;
        key.cert.first().map(|leaf| sha256_hex(leaf.as_ref()))
    }

    /// Parses a PEM chain (leaf first) and a PEM private key (PKCS#8, SEC1
    /// EC or PKCS#1 RSA) and swaps them in. A bad pair leaves the current
    /// one in place and says what is wrong (never quoting the key).
    pub fn set_pem(&self, chain_pem: &str, key_pem: &str) -> Result<()> {
        self.load(chain_pem, key_pem).map_err(Error::Certificate)
    }

    /// [`Self::set_pem`], the error left for the caller to place.
    fn load(&self, chain_pem: &str, key_pem: &str) -> std::result::Result<(), String> {
        match certified_key(chain_pem, key_pem) {
            Ok(key) => {
                self.current.store(Some(Arc::new(key)));
                self.loads_ok.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.loads_failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

fn parse_certs(pem: &str, what: &str) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: unreadable PEM certificate: {}", pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(format!(
            "{what}: no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok(certs)
}

/// A PEM error in words that cannot carry the text it was reading.
fn pem_problem(e: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "a section has no END line (cut short?)",
        E::IllegalSectionStart { .. } => "a malformed BEGIN line",
        E::Base64Decode(_) => "bad base64",
        E::NoItemsFound => "nothing of the expected kind",
        E::SectionTooLarge => "a section is too large",
        _ => "unreadable",
    }
}

/// The chain and key as rustls serves them, checked to belong together.
fn certified_key(chain_pem: &str, key_pem: &str) -> std::result::Result<CertifiedKey, String> {
    let chain = parse_certs(chain_pem, "the certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        format!(
            "the private key: not a PEM private key (PKCS#8, EC or RSA): {}",
            pem_problem(&e)
        )
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("the private key: unusable: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err("the private key does not match the certificate".into())
        }
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err("cannot tell whether the private key matches the certificate".into())
        }
        Err(e) => Err(format!("the certificate: {e}")),
    }
}

// ---------------------------------------------------------------------------
// Provided mode
// ---------------------------------------------------------------------------

/// Mode "provided": a mounted `tls.crt`/`tls.key` pair.
#[derive(Debug, Clone)]
pub struct ProvidedFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub reload_interval: Duration,
}

impl ProvidedFiles {
    /// Checks what the types cannot; errors name the flag.
    fn validate(&self) -> Result<()> {
        if self.reload_interval.is_zero() {
            return Err(Error::Config(
                "--cert-reload-interval must be more than zero".into(),
            ));
        }
        Ok(())
    }
}

/// What [`load_provided`] loaded, for [`poll_provided`] to compare the
/// files against (a digest only: no key material is kept).
#[derive(Debug, Clone)]
pub struct LoadedPair {
    digest: Vec<u8>,
}

/// Reads and loads the pair once, at start. An error names the flag or
/// both files, and the problem.
pub fn load_provided(files: &ProvidedFiles, serving: &ServingCert) -> Result<LoadedPair> {
    files.validate()?;
    let (cert, key) = read_pair(files)?;
    load_pair(files, serving, &cert, &key)?;
    info!(cert = %files.cert_file.display(), fingerprint = ?serving.fingerprint(), "loaded the serving certificate");
    Ok(LoadedPair {
        digest: pair_digest(&cert, &key),
    })
}

fn read_pair(files: &ProvidedFiles) -> Result<(String, String)> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read_to_string(path)
            .map_err(Error::io(format!("reading the {what} {}", path.display())))
    };
    Ok((
        read(&files.cert_file, "serving certificate")?,
        read(&files.key_file, "serving key")?,
    ))
}

fn load_pair(files: &ProvidedFiles, serving: &ServingCert, cert: &str, key: &str) -> Result<()> {
    serving.load(cert, key).map_err(|e| {
        Error::Certificate(format!(
            "{} and {}: {e}",
            files.cert_file.display(),
            files.key_file.display()
        ))
    })
}

/// [`load_provided`], then [`poll_provided`]: an `Err` at once if the pair
/// cannot be loaded (the webhook must not start without a certificate),
/// `Ok` at shutdown.
pub async fn watch_provided(
    files: ProvidedFiles,
    serving: Arc<ServingCert>,
    shutdown: CancellationToken,
) -> Result<()> {
    let loaded = load_provided(&files, &serving)?;
    poll_provided(files, serving, loaded, shutdown).await
}

/// Polls the files' contents every `reload_interval` and swaps in a
/// changed, valid pair; `loaded` is what [`load_provided`] loaded, so the
/// pair is read once at start, not twice. Returns `Ok` at shutdown.
pub async fn poll_provided(
    files: ProvidedFiles,
    serving: Arc<ServingCert>,
    loaded: LoadedPair,
    shutdown: CancellationToken,
) -> Result<()> {
    files.validate()?;
    // Only a digest of what was last tried is kept, so an invalid pair is
    // reported once, and retried as soon as either file changes again.
    let mut last = loaded.digest;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(files.reload_interval) => {}
        }
        let (cert, key) = match read_pair(&files) {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "cannot read the serving certificate files; keeping the current certificate");
                continue;
            }
        };
        let digest = pair_digest(&cert, &key);
        if digest == last {
            continue;
        }
        last = digest;
        match load_pair(&files, &serving, &cert, &key) {
            Ok(()) => info!(
                cert = %files.cert_file.display(),
                fingerprint = ?serving.fingerprint(),
                "reloaded the serving certificate"
            ),
            Err(e) => warn!(
                reason = %e,
                "the changed serving certificate files are unusable (mid-update?); keeping the current certificate"
            ),
        }
    }
}

fn pair_digest(cert: &str, key: &str) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(cert.as_bytes());
    ctx.update(&[0]);
    ctx.update(key.as_bytes());
    ctx.finish().as_ref().to_vec()
}

// ---------------------------------------------------------------------------
// Self-managed mode: settings
// ---------------------------------------------------------------------------

/// Mode "self-managed".
#[derive(Debug, Clone)]
pub struct SelfManaged {
    /// The webhook's namespace (the Secret and the Lease live there).
    pub namespace: String,
    /// E.g. `credbroker-webhook-tls`.
    pub secret_name: String,
    /// The MutatingWebhookConfiguration whose every
    /// `webhooks[].clientConfig.caBundle` is kept equal to `ca.crt`.
    pub webhook_configuration: String,
    /// Subject alternative names: DNS names, or IP addresses written as
    /// strings (`127.0.0.1`). The first is also the common name.
    pub dns_names: Vec<String>,
    /// Default [`DEFAULT_CA_VALIDITY`].
    pub ca_validity: Duration,
    /// Default [`DEFAULT_CERT_VALIDITY`].
    pub cert_validity: Duration,
    /// How long a CA bundle must have been in every `caBundle` before a
    /// serving certificate it newly covers is used. Default
    /// [`DEFAULT_PROPAGATION_DELAY`].
    pub propagation_delay: Duration,
    /// How often every replica re-reads the Secret and the leader re-plans.
    /// Default [`DEFAULT_CHECK_INTERVAL`].
    pub check_interval: Duration,
    pub lease: LeaseSettings,
}

impl SelfManaged {
    /// Checks what the types cannot; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let config = |m: String| Err(Error::Config(m));
        for (flag, value) in [
            ("--namespace", &self.namespace),
            ("--tls-secret", &self.secret_name),
            ("--webhook-configuration", &self.webhook_configuration),
        ] {
            if value.is_empty() {
                return config(format!(
                    "self-managed certificate: {flag} must not be empty"
                ));
            }
        }
        if self.dns_names.is_empty() {
            return config(
                "self-managed certificate: at least one DNS name is needed (--service-name, \
                 --extra-san)"
                    .into(),
            );
        }
        for name in &self.dns_names {
            if ServerName::try_from(name.as_str()).is_err() {
                return config(format!(
                    "self-managed certificate: {name:?} (from --service-name, --namespace or \
                     --extra-san) is neither a DNS name nor an IP address"
                ));
            }
        }
        if self.check_interval.is_zero() {
            return config(
                "self-managed certificate: --cert-check-interval must be more than zero".into(),
            );
        }
        if self.cert_validity > self.ca_validity {
            return config(format!(
                "self-managed certificate: --cert-validity ({:?}) must not exceed --ca-validity ({:?})",
                self.cert_validity, self.ca_validity
            ));
        }
        // A renewal starts with a third of the validity left and may have
        // to wait for the publication delay and the replicas' polls.
        if self.cert_validity <= 3 * settle(self) {
            return config(format!(
                "self-managed certificate: --cert-validity ({:?}) must exceed 3 × (--propagation-delay + 2 × --cert-check-interval) = {:?}",
                self.cert_validity,
                3 * settle(self)
            ));
        }
        Ok(())
    }
}

/// How long after a serving certificate is written every replica surely
/// serves it: the publication margin plus two polls.
fn settle(settings: &SelfManaged) -> Duration {
    settings.propagation_delay + 2 * settings.check_interval
}

/// Certificates start a little in the past, so a verifier whose clock is
/// behind ours accepts a fresh one.
fn backdate(validity: Duration) -> Duration {
    (validity / 10).min(Duration::from_secs(300))
}

// ---------------------------------------------------------------------------
// Self-managed mode: what is stored, and the pure plan
// ---------------------------------------------------------------------------

/// One CA of `ca.crt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCert {
    pub der: CertificateDer<'static>,
    /// SHA-256 of the DER, first 16 hex digits.
    pub fingerprint: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The serving certificate of `tls.crt`, when usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// Index in [`StoredTls::bundle`] of the CA it chains to.
    pub issuer: usize,
    pub fingerprint: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// It verifies for every configured name.
    pub names_match: bool,
}

/// What the Secret holds, as the planner needs it: public facts only (no
/// key material; whether a key is usable is a boolean here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTls {
    /// `ca.crt` exactly as stored (compared with `caBundle`).
    pub ca_crt: String,
    /// The CAs of `ca.crt` that could be read, in order (newest last).
    pub bundle: Vec<CaCert>,
    /// `ca.crt` is exactly the rendering of `bundle` (nothing unreadable,
    /// duplicated or oddly formatted in it).
    pub bundle_clean: bool,
    /// Index of the CA that `ca.key` belongs to, if that is the newest CA
    /// and the key can sign.
    pub signing: Option<usize>,
    /// The serving certificate, or why it is unusable.
    pub serving: std::result::Result<Leaf, String>,
    /// Since when every `caBundle` has held this `ca.crt`.
    pub published_at: Option<SystemTime>,
    /// When this `tls.crt` was written.
    pub serving_since: Option<SystemTime>,
    pub rotate_requested: Option<String>,
    pub rotated: Option<String>,
}

/// One thing the leader does. A plan lists them in the order they apply:
/// Secret changes (one write), then publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Remove a CA from `ca.crt`.
    DropCa {
        fingerprint: String,
        reason: &'static str,
    },
    /// Re-render `ca.crt` from the CAs that could be read.
    RewriteBundle,
    /// Generate a CA, append it to `ca.crt`; its key becomes `ca.key`.
    NewCa { reason: &'static str },
    /// Issue a serving certificate from the newest CA.
    IssueServing { reason: &'static str },
    /// Record that the rotation request `value` has been acted upon.
    ConsumeRotate { value: String },
    /// `tls.crt` has no (valid) write time: record now.
    RecordServingSince,
    /// After the Secret is written: set every `caBundle` to `ca.crt`, then
    /// record the time.
    Publish,
    /// Every `caBundle` already holds `ca.crt` but the Secret does not say
    /// since when: record now.
    RecordPublished,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DropCa {
                fingerprint,
                reason,
            } => write!(f, "drop CA {fingerprint} from the bundle ({reason})"),
            Self::RewriteBundle => {
                f.write_str("rewrite ca.crt (it holds unreadable or stray entries)")
            }
            Self::NewCa { reason } => write!(f, "add a new CA ({reason})"),
            Self::IssueServing { reason } => write!(f, "issue a serving certificate ({reason})"),
            Self::ConsumeRotate { value } => write!(f, "record rotation request {value:?} as done"),
            Self::RecordServingSince => {
                f.write_str("record when the serving certificate was written")
            }
            Self::Publish => f.write_str("publish ca.crt to every caBundle"),
            Self::RecordPublished => f.write_str("record that every caBundle holds ca.crt"),
        }
    }
}

/// Whether a certificate has a third or less of its validity left.
fn renewal_due(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    now + life / 3 >= not_after
}

/// What the leader should do now. `stored` is `None` when there is no
/// Secret; `published` is the bundle every `caBundle` holds (`None` when
/// the configuration is missing or its entries disagree).
pub fn plan(
    now: SystemTime,
    stored: Option<&StoredTls>,
    published: Option<&str>,
    settings: &SelfManaged,
) -> Vec<Step> {
    let Some(s) = stored else {
        return vec![
            Step::NewCa {
                reason: "no Secret yet",
            },
            Step::IssueServing {
                reason: "no Secret yet",
            },
            Step::Publish,
        ];
    };
    let in_sync = published == Some(s.ca_crt.as_str());
    let newest = s.bundle.len().checked_sub(1);
    let signing = s
        .signing
        .filter(|&i| Some(i) == newest && s.bundle[i].not_after > now);
    let rotate = s
        .rotate_requested
        .as_ref()
        .filter(|&v| s.rotated.as_ref() != Some(v));

    let new_ca = match signing {
        None => Some("no usable CA key"),
        Some(i) if renewal_due(s.bundle[i].not_before, s.bundle[i].not_after, now) => {
            Some("the CA is past 2/3 of its validity")
        }
        Some(_) if rotate.is_some() => Some("rotation requested"),
        Some(_) => None,
    };

    let leaf = s.serving.as_ref().ok();
    let issue = match leaf {
        None => Some("no usable serving certificate"),
        Some(l) => {
            let due = if signing != Some(l.issuer) {
                Some("signed by an older CA")
            } else if renewal_due(l.not_before, l.not_after, now) {
                Some("past 2/3 of its validity")
            } else if !l.names_match {
                Some("the names changed")
            } else {
                None
            };
            // The newest CA must have been in every caBundle long enough
            // for every API server to trust it.
            let ready = new_ca.is_none()
                && in_sync
                && s.published_at
                    .is_some_and(|t| now >= t + settings.propagation_delay);
            due.filter(|_| ready)
        }
    };

    let mut steps = Vec::new();
    // A certificate written less than `settle` ago may not be served by
    // every replica yet: the one before it (whatever signed it) still is.
    let settled = s.serving_since.is_some_and(|t| now >= t + settle(settings));
    for (i, ca) in s.bundle.iter().enumerate() {
        let reason = if ca.not_after <= now {
            "expired"
        } else if (Some(i) == signing && new_ca.is_none())
            || leaf.is_some_and(|l| l.issuer == i)
            || issue.is_some()
            || !settled
        {
            continue;
        } else {
            "superseded, and no served certificate chains to it"
        };
        steps.push(Step::DropCa {
            fingerprint: ca.fingerprint.clone(),
            reason,
        });
    }
    if !s.bundle_clean {
        steps.push(Step::RewriteBundle);
    }
    let bundle_changes = new_ca.is_some() || !steps.is_empty();
    if let Some(reason) = new_ca {
        steps.push(Step::NewCa { reason });
    }
    if let Some(reason) = issue {
        steps.push(Step::IssueServing { reason });
    }
    if let Some(value) = rotate {
        steps.push(Step::ConsumeRotate {
            value: value.clone(),
        });
    }
    if issue.is_none() && s.serving_since.is_none() {
        steps.push(Step::RecordServingSince);
    }
    if bundle_changes || !in_sync {
        steps.push(Step::Publish);
    } else if s.published_at.is_none() {
        steps.push(Step::RecordPublished);
    }
    steps
}

// ---------------------------------------------------------------------------
// Reading the Secret
// ---------------------------------------------------------------------------

fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

fn annotation<'a>(secret: &'a Secret, key: &str) -> Option<&'a String> {
    secret.metadata.annotations.as_ref()?.get(key)
}

/// Parses the Secret for [`plan`]. Never fails: whatever cannot be used is
/// reported as unusable, and the plan replaces it.
pub fn read_stored(secret: &Secret, dns_names: &[String], now: SystemTime) -> StoredTls {
    let ca_crt = secret_text(secret, CA_CERT_KEY).unwrap_or_default();
    let tls_crt = secret_text(secret, TLS_CERT_KEY);
    let (bundle, bundle_clean) = read_bundle(&ca_crt);
    let signing = match (bundle.last(), secret_text(secret, CA_KEY_KEY)) {
        (Some(ca), Some(key_pem)) if ca_issuer(ca, &key_pem).is_ok() => Some(bundle.len() - 1),
        _ => None,
    };
    let serving = read_leaf(
        tls_crt.as_deref(),
        secret_text(secret, TLS_KEY_KEY).as_deref(),
        &bundle,
        dns_names,
        now,
    );
    StoredTls {
        published_at: read_record(annotation(secret, BUNDLE_PUBLISHED_ANNOTATION), &ca_crt),
        serving_since: tls_crt
            .as_deref()
            .and_then(|crt| read_record(annotation(secret, SERVING_SINCE_ANNOTATION), crt)),
        rotate_requested: annotation(secret, ROTATE_ANNOTATION).cloned(),
        rotated: annotation(secret, ROTATED_ANNOTATION).cloned(),
        ca_crt,
        bundle,
        bundle_clean,
        signing,
        serving,
    }
}

fn read_bundle(ca_crt: &str) -> (Vec<CaCert>, bool) {
    let mut bundle: Vec<CaCert> = Vec::new();
    for item in CertificateDer::pem_slice_iter(ca_crt.as_bytes()) {
        let Ok(der) = item else { break };
        let Ok((not_before, not_after)) = cert_fields(&der).map(|f| (f.not_before, f.not_after))
        else {
            continue;
        };
        let fingerprint = sha256_hex(der.as_ref());
        if bundle.iter().any(|c| c.fingerprint == fingerprint) {
            continue;
        }
        bundle.push(CaCert {
            der,
            fingerprint,
            not_before,
            not_after,
        });
    }
    let clean = render_bundle(&bundle) == ca_crt;
    (bundle, clean)
}

fn render_bundle(bundle: &[CaCert]) -> String {
    bundle.iter().map(|c| der_to_pem(c.der.as_ref())).collect()
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 is ASCII: every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn read_leaf(
    crt: Option<&str>,
    key: Option<&str>,
    bundle: &[CaCert],
    dns_names: &[String],
    now: SystemTime,
) -> std::result::Result<Leaf, String> {
    let crt = crt.ok_or("tls.crt is missing")?;
    let key = key.ok_or("tls.key is missing")?;
    let certified = certified_key(crt, key).map_err(|e| format!("tls.crt/tls.key: {e}"))?;
    let (leaf, intermediates) = certified
        .cert
        .split_first()
        .ok_or("tls.crt holds no certificate")?;
    let fields = cert_fields(leaf).map_err(|e| format!("tls.crt: {e}"))?;
    if fields.not_after <= now {
        return Err("tls.crt has expired".into());
    }
    let verifiers: Vec<_> = bundle.iter().map(|ca| verifier_for(&ca.der)).collect();
    let verifies = |i: usize, name: &str| {
        verifiers[i]
            .as_ref()
            .is_some_and(|v| verify_leaf(v.as_ref(), leaf, intermediates, name, now).is_ok())
    };
    let issuer = (0..bundle.len())
        .find(|&i| dns_names.iter().any(|n| verifies(i, n)))
        .ok_or("tls.crt does not verify against any CA of ca.crt for any configured name")?;
    Ok(Leaf {
        issuer,
        fingerprint: sha256_hex(leaf.as_ref()),
        not_before: fields.not_before,
        not_after: fields.not_after,
        names_match: dns_names.iter().all(|n| verifies(issuer, n)),
    })
}

fn verifier_for(ca: &CertificateDer<'static>) -> Option<Arc<rustls::client::WebPkiServerVerifier>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).ok()?;
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider().clone())
        .build()
        .ok()
}

/// Full verification, as a TLS client (the API server) would do it.
fn verify_leaf(
    verifier: &dyn ServerCertVerifier,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    name: &str,
    now: SystemTime,
) -> std::result::Result<(), String> {
    let name = ServerName::try_from(name).map_err(|e| e.to_string())?;
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    verifier
        .verify_server_cert(
            leaf,
            intermediates,
            &name,
            &[],
            UnixTime::since_unix_epoch(since),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `<RFC 3339> <hash of what it is about>`.
fn record(at: SystemTime, about: &str) -> Option<String> {
    let at = Timestamp::try_from(at).ok()?;
    Some(format!("{at} {}", sha256_hex(about.as_bytes())))
}

fn read_record(value: Option<&String>, about: &str) -> Option<SystemTime> {
    let (at, hash) = value?.split_once(' ')?;
    if hash != sha256_hex(about.as_bytes()) {
        return None;
    }
    at.parse::<Timestamp>().ok().map(SystemTime::from)
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = String::with_capacity(HASH_HEX);
    for byte in digest.as_ref().iter().take(HASH_HEX / 2) {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

// ---------------------------------------------------------------------------
// Issuing
// ---------------------------------------------------------------------------

/// The CA `ca` signing with `key_pem`, if the key is a P-256 key of that
/// very certificate and its subject is one this webhook writes.
fn ca_issuer(ca: &CaCert, key_pem: &str) -> std::result::Result<Issuer<'static, KeyPair>, String> {
    let key =
        KeyPair::from_pem(key_pem).map_err(|_| "ca.key is not a PKCS#8 PEM key".to_owned())?;
    if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err("ca.key is not an ECDSA P-256 key".into());
    }
    let fields = cert_fields(&ca.der)?;
    if fields.spki != key.subject_public_key_info().as_slice() {
        return Err(format!("ca.key does not belong to CA {}", ca.fingerprint));
    }
    issuer_of(&ca.der, key)
}

/// What every CA of this webhook is, apart from its name and dates.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Certificate("the system random generator failed".into()))?;
    Ok(bytes)
}

fn serial() -> Result<SerialNumber> {
    let mut bytes = random_bytes::<16>()?;
    // Positive, and never shortened by a leading zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A new CA valid from (about) `now` for `validity`.
fn issue_ca(now: SystemTime, validity: Duration) -> Result<(CaCert, KeyPair)> {
    let fail = |e: rcgen::Error| Error::Certificate(format!("creating a CA: {e}"));
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let suffix: String = random_bytes::<4>()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut params = ca_params();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{CA_COMMON_NAME} {suffix}"));
    params.not_before = (now - backdate(validity)).into();
    params.not_after = (now + validity).into();
    params.serial_number = Some(serial()?);
    let cert = params.self_signed(&key).map_err(fail)?;
    let der = cert.der().clone();
    let (not_before, not_after) = cert_fields(&der)
        .map(|f| (f.not_before, f.not_after))
        .map_err(|e| Error::Certificate(format!("reading back the new CA: {e}")))?;
    Ok((
        CaCert {
            fingerprint: sha256_hex(der.as_ref()),
            not_before,
            not_after,
            der,
        },
        key,
    ))
}

/// A serving certificate for `names`, signed by `ca`, never outliving it.
/// Returns (certificate PEM, key PEM).
fn issue_serving(
    ca: &CaCert,
    issuer: &Issuer<'_, KeyPair>,
    names: &[String],
    now: SystemTime,
    validity: Duration,
) -> Result<(String, String)> {
    let fail =
        |e: rcgen::Error| Error::Certificate(format!("issuing the serving certificate: {e}"));
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    // `new` reads "127.0.0.1" as an IP SAN and anything else as a DNS SAN.
    let mut params = CertificateParams::new(names.to_vec()).map_err(fail)?;
    params.distinguished_name = DistinguishedName::new();
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - backdate(validity)).into();
    params.not_after = (now + validity).min(ca.not_after).into();
    params.serial_number = Some(serial()?);
    let cert = params.signed_by(&key, issuer).map_err(fail)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The Secret after `steps` (all but the publication itself), checked
/// before it is returned: its serving certificate must verify against its
/// own newest CA and its CA key must sign. Generates keys; no other I/O.
fn build_secret(
    current: Option<&Secret>,
    stored: Option<&StoredTls>,
    steps: &[Step],
    settings: &SelfManaged,
    now: SystemTime,
) -> Result<Secret> {
    let mut secret = current.cloned().unwrap_or_else(|| Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret_name.clone()),
            namespace: Some(settings.namespace.clone()),
            ..Default::default()
        },
        ..Default::default()
    });
    secret.type_ = Some(SECRET_TYPE.into());
    secret
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    let mut data = secret.data.take().unwrap_or_default();
    let mut annotations = secret.metadata.annotations.take().unwrap_or_default();

    let mut bundle = stored.map(|s| s.bundle.clone()).unwrap_or_default();
    let mut signer: Option<(CaCert, Issuer<'static, KeyPair>)> = None;
    if let (Some(i), Some(s)) = (stored.and_then(|s| s.signing), stored)
        && let Some(key_pem) = current.and_then(|c| secret_text(c, CA_KEY_KEY))
    {
        let ca = s.bundle[i].clone();
        let issuer = ca_issuer(&ca, &key_pem).map_err(Error::Certificate)?;
        signer = Some((ca, issuer));
    }
    let bytes = |s: String| ByteString(s.into_bytes());
    let mut record_published = false;
    for step in steps {
        match step {
            Step::DropCa { fingerprint, .. } => {
                bundle.retain(|c| &c.fingerprint != fingerprint);
                if signer
                    .as_ref()
                    .is_some_and(|(ca, _)| &ca.fingerprint == fingerprint)
                {
                    signer = None;
                    data.remove(CA_KEY_KEY);
                }
            }
            Step::RewriteBundle | Step::Publish => {}
            Step::NewCa { .. } => {
                let (ca, key) = issue_ca(now, settings.ca_validity)?;
                data.insert(CA_KEY_KEY.into(), bytes(key.serialize_pem()));
                bundle.push(ca.clone());
                let issuer = issuer_of(&ca.der, key).map_err(Error::Certificate)?;
                signer = Some((ca, issuer));
            }
            Step::IssueServing { .. } => {
                let (ca, issuer) = signer.as_ref().ok_or_else(|| {
                    Error::Certificate(
                        "issuing the serving certificate: no CA key to sign with".into(),
                    )
                })?;
                let (crt, key) =
                    issue_serving(ca, issuer, &settings.dns_names, now, settings.cert_validity)?;
                if let Some(r) = record(now, &crt) {
                    annotations.insert(SERVING_SINCE_ANNOTATION.into(), r);
                }
                data.insert(TLS_CERT_KEY.into(), bytes(crt));
                data.insert(TLS_KEY_KEY.into(), bytes(key));
            }
            Step::ConsumeRotate { value } => {
                annotations.insert(ROTATED_ANNOTATION.into(), value.clone());
            }
            Step::RecordServingSince => {
                let crt = data
                    .get(TLS_CERT_KEY)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .unwrap_or_default();
                if let Some(r) = record(now, &crt) {
                    annotations.insert(SERVING_SINCE_ANNOTATION.into(), r);
                }
            }
            Step::RecordPublished => record_published = true,
        }
    }
    let ca_crt = render_bundle(&bundle);
    // Publication is recorded only after the caBundles are written; until
    // then the Secret claims nothing.
    if steps.contains(&Step::Publish) {
        annotations.remove(BUNDLE_PUBLISHED_ANNOTATION);
    } else if record_published && let Some(r) = record(now, &ca_crt) {
        annotations.insert(BUNDLE_PUBLISHED_ANNOTATION.into(), r);
    }
    data.insert(CA_CERT_KEY.into(), bytes(ca_crt));
    annotations.insert(
        WRITTEN_BY_ANNOTATION.into(),
        settings.lease.identity.clone(),
    );
    secret.data = Some(data);
    secret.metadata.annotations = Some(annotations);

    // Never write a Secret that would break what it is for.
    let check = read_stored(&secret, &settings.dns_names, now);
    let problem = if check.signing.is_none() {
        Some("its CA key does not sign for its newest CA".to_owned())
    } else if let Err(e) = &check.serving {
        Some(format!("its serving certificate is unusable: {e}"))
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(Error::Certificate(format!(
            "the Secret {}/{} about to be written failed its own check ({problem}); not writing it",
            settings.namespace, settings.secret_name
        )));
    }
    Ok(secret)
}

// ---------------------------------------------------------------------------
// Reading certificates back (x509-parser, which rcgen uses for the same)
// ---------------------------------------------------------------------------

struct CertFields {
    not_before: SystemTime,
    not_after: SystemTime,
    /// The whole SubjectPublicKeyInfo.
    spki: Vec<u8>,
}

fn cert_fields(der: &[u8]) -> std::result::Result<CertFields, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| "not an X.509 certificate".to_owned())?;
    if !rest.is_empty() {
        return Err("not an X.509 certificate (bytes after it)".into());
    }
    let time = |t: x509_parser::time::ASN1Time, what: &str| {
        u64::try_from(t.timestamp())
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .map_err(|_| format!("its {what} is before 1970"))
    };
    let validity = cert.validity();
    Ok(CertFields {
        not_before: time(validity.not_before, "notBefore")?,
        not_after: time(validity.not_after, "notAfter")?,
        spki: cert.public_key().raw.to_vec(),
    })
}

/// An issuer that signs as the CA certificate `der` (its subject, key
/// usages and key identifier method), with `key`.
fn issuer_of(
    der: &CertificateDer<'static>,
    key: KeyPair,
) -> std::result::Result<Issuer<'static, KeyPair>, String> {
    Issuer::from_ca_cert_der(der, key).map_err(|e| format!("reading the CA certificate: {e}"))
}

// ---------------------------------------------------------------------------
// Self-managed mode: I/O
// ---------------------------------------------------------------------------

/// Every replica keeps `serving` loaded from the Secret; the replica that
/// holds the Lease also creates, rotates and publishes (see the module
/// docs). Returns `Ok` on shutdown (the lease released) or the first fatal
/// error: bad settings, or a Secret of that name this webhook does not own.
/// Failures of single API calls are logged and retried.
pub async fn run_self_managed(
    client: kube::Client,
    settings: SelfManaged,
    serving: Arc<ServingCert>,
    shutdown: CancellationToken,
) -> Result<()> {
    settings.validate()?;
    let settings = Arc::new(settings);
    let reload = Arc::new(Notify::new());
    // Either half failing stops the other, which then ends cleanly.
    let stop = shutdown.child_token();
    let follow = async {
        let result = follow_secret(&client, &settings, &serving, &reload, &stop).await;
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let lead = async {
        let result = elect_and_lead(&client, &settings, &reload, &stop).await;
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let (followed, led) = tokio::join!(follow, lead);
    followed.and(led)
}

fn secret_ref(settings: &SelfManaged) -> String {
    format!("Secret {}/{}", settings.namespace, settings.secret_name)
}

/// A Secret of our name that we did not make is a misconfiguration: never
/// serve it, never overwrite it.
fn check_owned(secret: &Secret, settings: &SelfManaged) -> Result<()> {
    let labelled = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY);
    if !labelled {
        return Err(Error::Config(format!(
            "{} exists but is not labelled {MANAGED_BY_LABEL}={MANAGED_BY}: the webhook neither \
             serves nor overwrites a Secret it did not create (delete it, choose another name, \
             or use the provided-certificate mode)",
            secret_ref(settings)
        )));
    }
    if secret.type_.as_deref() != Some(SECRET_TYPE) {
        return Err(Error::Config(format!(
            "{} has type {:?}, not {SECRET_TYPE} (the type cannot be changed: delete it and the \
             webhook recreates it)",
            secret_ref(settings),
            secret.type_.as_deref().unwrap_or("")
        )));
    }
    Ok(())
}

/// Every replica: loads `tls.crt`/`tls.key` whenever they change.
async fn follow_secret(
    client: &kube::Client,
    settings: &SelfManaged,
    serving: &ServingCert,
    reload: &Notify,
    stop: &CancellationToken,
) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let mut last: Option<Vec<u8>> = None;
    let mut said_waiting = false;
    loop {
        let got = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            got = api.get_opt(&settings.secret_name) => got,
        };
        match got {
            Ok(Some(secret)) => {
                check_owned(&secret, settings)?;
                let crt = secret_text(&secret, TLS_CERT_KEY).unwrap_or_default();
                let key = secret_text(&secret, TLS_KEY_KEY).unwrap_or_default();
                let digest = pair_digest(&crt, &key);
                if last.as_ref() != Some(&digest) {
                    last = Some(digest);
                    match serving.set_pem(&crt, &key) {
                        Ok(()) => info!(
                            secret = %secret_ref(settings),
                            fingerprint = ?serving.fingerprint(),
                            "serving the certificate from the Secret"
                        ),
                        Err(e) => warn!(
                            secret = %secret_ref(settings),
                            reason = %e,
                            "the Secret holds an unusable serving certificate; keeping the current one"
                        ),
                    }
                }
            }
            Ok(None) => {
                if !said_waiting {
                    info!(secret = %secret_ref(settings), "waiting for the leader to create the Secret");
                    said_waiting = true;
                }
            }
            Err(e) => warn!(
                secret = %secret_ref(settings),
                error = %e,
                "reading the Secret failed; keeping the current certificate"
            ),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(settings.check_interval) => {}
            _ = reload.notified() => {}
        }
    }
}

/// Aborts the task when dropped, so no writer outlives its caller.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn joined(result: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    result.unwrap_or_else(|e| {
        Err(Error::Certificate(format!(
            "the certificate writer stopped unexpectedly: {e}"
        )))
    })
}

/// Waits for the lease, writes while it holds, and stands by again when it
/// is lost (the writer is cut off first: the fence refuses its writes).
async fn elect_and_lead(
    client: &kube::Client,
    settings: &Arc<SelfManaged>,
    reload: &Arc<Notify>,
    stop: &CancellationToken,
) -> Result<()> {
    let fence = Fence::elected();
    let mut elector = Elector::new(client.clone(), settings.lease.clone(), fence.clone())
        .map_err(|e| Error::Config(format!("the serving certificate's lease: {e}")))?;
    let lease = &settings.lease;
    loop {
        info!(lease = %lease.name, identity = %lease.identity, "standing by for the serving certificate's lease");
        if !elector.acquire(stop).await {
            return Ok(());
        }
        let leader = Leader {
            secrets: Api::namespaced(client.clone(), &settings.namespace),
            mwcs: Api::all(client.clone()),
            settings: settings.clone(),
            fence: fence.clone(),
            reload: reload.clone(),
        };
        let work = stop.child_token();
        let mut writer = AbortOnDrop(tokio::spawn(leader.run(work.clone())));
        tokio::select! {
            lost = elector.hold(stop) => match lost {
                None => {
                    // Shutdown: let a round in progress finish while the
                    // lease surely holds, then hand the lease over.
                    work.cancel();
                    let drain = lease
                        .lease_duration
                        .saturating_sub(lease.renew_deadline)
                        .max(Duration::from_secs(1));
                    return match tokio::time::timeout(drain, &mut writer.0).await {
                        Ok(result) => {
                            release_lease(&mut elector, lease).await;
                            joined(result)
                        }
                        Err(_) => {
                            // Writes may still land: let the lease expire
                            // rather than hand it over now.
                            fence.close();
                            writer.0.abort();
                            warn!("a certificate write was still running at shutdown; the lease is left to expire");
                            Ok(())
                        }
                    };
                }
                Some(reason) => {
                    writer.0.abort();
                    warn!(lease = %lease.name, %reason, "lost the serving certificate's lease; no longer writing");
                }
            },
            result = &mut writer.0 => {
                // The writer ends early only on a fatal error.
                work.cancel();
                release_lease(&mut elector, lease).await;
                return joined(result);
            }
        }
    }
}

/// Hands the lease over at once (bounded: an API server that does not
/// answer leaves it to expire).
async fn release_lease(elector: &mut Elector, lease: &LeaseSettings) {
    if tokio::time::timeout(lease.renew_deadline, elector.release())
        .await
        .is_err()
    {
        warn!(lease = %lease.name, "releasing the lease timed out; it will expire");
    }
}

/// The leader's handles.
struct Leader {
    secrets: Api<Secret>,
    mwcs: Api<MutatingWebhookConfiguration>,
    settings: Arc<SelfManaged>,
    fence: Arc<Fence>,
    reload: Arc<Notify>,
}

impl Leader {
    async fn run(self, work: CancellationToken) -> Result<()> {
        info!(secret = %secret_ref(&self.settings), "leading: managing the serving certificate");
        loop {
            match self.round().await {
                Ok(()) => {}
                Err(e @ Error::Config(_)) => return Err(e),
                Err(Error::Kube { doing, source }) if matches!(&*source, kube::Error::Api(s) if s.code == 409) =>
                {
                    info!(%doing, "the object changed since it was read; planning again");
                }
                Err(e) => warn!(error = %e, "managing the serving certificate failed; retrying"),
            }
            tokio::select! {
                _ = work.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.settings.check_interval) => {}
            }
        }
    }

    /// Read, plan, write: one pass.
    async fn round(&self) -> Result<()> {
        let s = &*self.settings;
        let current = self
            .secrets
            .get_opt(&s.secret_name)
            .await
            .map_err(Error::kube(format!("reading {}", secret_ref(s))))?;
        if let Some(secret) = &current {
            check_owned(secret, s)?;
        }
        let mwc = self
            .mwcs
            .get_opt(&s.webhook_configuration)
            .await
            .map_err(Error::kube(format!(
                "reading MutatingWebhookConfiguration {}",
                s.webhook_configuration
            )))?;
        let now = SystemTime::now();
        let stored = current.as_ref().map(|c| read_stored(c, &s.dns_names, now));
        let published = mwc
            .as_ref()
            .and_then(|m| common_bundle(m, stored.as_ref().map(|st| st.ca_crt.as_str())));
        let steps = plan(now, stored.as_ref(), published.as_deref(), s);
        if steps.is_empty() {
            return Ok(());
        }
        for step in &steps {
            info!(secret = %secret_ref(s), %step, "serving certificate");
        }
        let desired = build_secret(current.as_ref(), stored.as_ref(), &steps, s, now)?;
        let written = if current.as_ref().is_some_and(|c| same_content(c, &desired)) {
            desired
        } else {
            let written = self.write_secret(current.is_some(), &desired).await?;
            self.reload.notify_one();
            written
        };
        if !steps.contains(&Step::Publish) {
            return Ok(());
        }
        let mwc = mwc.ok_or_else(|| {
            Error::Certificate(format!(
                "cannot publish the CA bundle: MutatingWebhookConfiguration {} does not exist",
                s.webhook_configuration
            ))
        })?;
        let ca_crt = secret_text(&written, CA_CERT_KEY).unwrap_or_default();
        self.publish(mwc, &ca_crt).await?;
        let mut stamped = written;
        if let Some(r) = record(SystemTime::now(), &ca_crt) {
            stamped
                .metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(BUNDLE_PUBLISHED_ANNOTATION.into(), r);
        }
        self.write_secret(true, &stamped).await?;
        info!(
            secret = %secret_ref(s),
            webhook_configuration = %s.webhook_configuration,
            "published the CA bundle to every caBundle"
        );
        Ok(())
    }

    async fn write_secret(&self, exists: bool, secret: &Secret) -> Result<Secret> {
        let s = &*self.settings;
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        if exists {
            let doing = format!("updating {}", secret_ref(s));
            fenced(
                &self.fence,
                &doing,
                self.secrets.replace(&s.secret_name, &params, secret),
            )
            .await
        } else {
            let doing = format!("creating {}", secret_ref(s));
            fenced(&self.fence, &doing, self.secrets.create(&params, secret)).await
        }
    }

    /// Every entry's caBundle := `ca_crt`, as one compare-and-swap.
    async fn publish(&self, mut mwc: MutatingWebhookConfiguration, ca_crt: &str) -> Result<()> {
        let name = &self.settings.webhook_configuration;
        let mut changed = false;
        for webhook in mwc.webhooks.iter_mut().flatten() {
            let bundle = Some(ByteString(ca_crt.as_bytes().to_vec()));
            if webhook.client_config.ca_bundle != bundle {
                webhook.client_config.ca_bundle = bundle;
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let doing = format!("updating the caBundle of MutatingWebhookConfiguration {name}");
        fenced(&self.fence, &doing, self.mwcs.replace(name, &params, &mwc)).await?;
        Ok(())
    }
}

/// The bundle every entry holds, if they agree (a configuration without
/// entries has nothing to disagree with: it holds whatever `ours` is).
fn common_bundle(mwc: &MutatingWebhookConfiguration, ours: Option<&str>) -> Option<String> {
    let webhooks = mwc.webhooks.as_deref().unwrap_or_default();
    let Some(first) = webhooks.first() else {
        return ours.map(str::to_owned);
    };
    let bundle = first.client_config.ca_bundle.as_ref()?;
    if webhooks
        .iter()
        .any(|w| w.client_config.ca_bundle.as_ref() != Some(bundle))
    {
        return None;
    }
    String::from_utf8(bundle.0.clone()).ok()
}

fn same_content(a: &Secret, b: &Secret) -> bool {
    a.data == b.data
        && a.type_ == b.type_
        && a.metadata.labels == b.metadata.labels
        && a.metadata.annotations == b.metadata.annotations
}

/// Sends a write only while this replica surely holds the lease, and gives
/// up on it before a standby could take over.
async fn fenced<T>(
    fence: &Fence,
    doing: &str,
    write: impl std::future::Future<Output = std::result::Result<T, kube::Error>>,
) -> Result<T> {
    let left = fence
        .check(doing)
        .map_err(|e| Error::LeadershipLost(e.to_string()))?;
    let result = match left {
        None => write.await,
        Some(left) => tokio::time::timeout(left, write).await.map_err(|_| {
            Error::LeadershipLost(format!(
                "{doing} did not finish before the lease could pass to another replica"
            ))
        })?,
    };
    result.map_err(Error::kube(doing))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DNS: &str = "credbroker-webhook.credbroker.svc";

    fn lease() -> LeaseSettings {
        LeaseSettings {
            namespace: "credbroker".into(),
            name: "credbroker-webhook-tls".into(),
            identity: "replica-a".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn settings(ca: u64, cert: u64, delay: u64, check_ms: u64) -> SelfManaged {
        SelfManaged {
            namespace: "credbroker".into(),
            secret_name: "credbroker-webhook-tls".into(),
            webhook_configuration: "credbroker-webhook".into(),
            dns_names: vec![DNS.into(), "127.0.0.1".into()],
            ca_validity: Duration::from_secs(ca),
            cert_validity: Duration::from_secs(cert),
            propagation_delay: Duration::from_secs(delay),
            check_interval: Duration::from_millis(check_ms),
            lease: lease(),
        }
    }

    /// The integration test's timings.
    fn fast() -> SelfManaged {
        settings(60, 30, 2, 500)
    }

    fn t(secs: f64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_secs_f64(secs)
    }

    fn kinds(steps: &[Step]) -> Vec<&'static str> {
        steps
            .iter()
            .map(|s| match s {
                Step::DropCa { .. } => "DropCa",
                Step::RewriteBundle => "RewriteBundle",
                Step::NewCa { .. } => "NewCa",
                Step::IssueServing { .. } => "IssueServing",
                Step::ConsumeRotate { .. } => "ConsumeRotate",
                Step::RecordServingSince => "RecordServingSince",
                Step::Publish => "Publish",
                Step::RecordPublished => "RecordPublished",
            })
            .collect()
    }

    // -- the planner, on hand-made states ---------------------------------

    fn ca(name: &str, from: f64, to: f64) -> CaCert {
        CaCert {
            der: CertificateDer::from(Vec::new()),
            fingerprint: name.into(),
            not_before: t(from),
            not_after: t(to),
        }
    }

    fn leaf(issuer: usize, from: f64, to: f64) -> std::result::Result<Leaf, String> {
        Ok(Leaf {
            issuer,
            fingerprint: format!("leaf-{from}"),
            not_before: t(from),
            not_after: t(to),
            names_match: true,
        })
    }

    /// One CA (0..60 s), a leaf from it (0..30 s), published and served
    /// since 0.
    fn steady() -> StoredTls {
        StoredTls {
            ca_crt: "A".into(),
            bundle: vec![ca("A", 0.0, 60.0)],
            bundle_clean: true,
            signing: Some(0),
            serving: leaf(0, 0.0, 30.0),
            published_at: Some(t(0.0)),
            serving_since: Some(t(0.0)),
            rotate_requested: None,
            rotated: None,
        }
    }

    #[test]
    fn a_fresh_start_makes_a_ca_and_a_certificate_and_publishes_at_once() {
        let steps = plan(t(0.0), None, None, &fast());
        assert_eq!(kinds(&steps), ["NewCa", "IssueServing", "Publish"]);
    }

    #[test]
    fn a_steady_state_needs_nothing() {
        assert_eq!(plan(t(5.0), Some(&steady()), Some("A"), &fast()), []);
    }

    #[test]
    fn a_drifted_or_missing_ca_bundle_is_written_back() {
        let s = steady();
        for published in [None, Some(""), Some("someone else's CA")] {
            assert_eq!(plan(t(5.0), Some(&s), published, &fast()), [Step::Publish]);
        }
        // ...and a certificate change waits for the delay after that.
        let mut s = steady();
        s.published_at = Some(t(20.0));
        let steps = plan(t(21.0), Some(&s), Some("A"), &fast());
        assert_eq!(
            steps,
            [],
            "due for renewal, but the bundle was just re-published"
        );
        let steps = plan(t(22.0), Some(&s), Some("A"), &fast());
        assert_eq!(kinds(&steps), ["IssueServing"]);
    }

    #[test]
    fn missing_time_records_are_recorded_as_now() {
        let mut s = steady();
        s.published_at = None;
        assert_eq!(
            plan(t(5.0), Some(&s), Some("A"), &fast()),
            [Step::RecordPublished]
        );
        let mut s = steady();
        s.serving_since = None;
        assert_eq!(
            plan(t(5.0), Some(&s), Some("A"), &fast()),
            [Step::RecordServingSince]
        );
    }

    #[test]
    fn a_corrupt_secret_is_replaced_like_a_fresh_start() {
        let s = StoredTls {
            ca_crt: "garbage".into(),
            bundle: vec![],
            bundle_clean: false,
            signing: None,
            serving: Err("tls.crt/tls.key: unreadable".into()),
            published_at: None,
            serving_since: None,
            rotate_requested: None,
            rotated: None,
        };
        let steps = plan(t(5.0), Some(&s), Some("garbage"), &fast());
        assert_eq!(
            kinds(&steps),
            ["RewriteBundle", "NewCa", "IssueServing", "Publish"]
        );
    }

    #[test]
    fn a_lost_ca_key_starts_a_rotation_and_keeps_the_served_certificate() {
        let mut s = steady();
        s.signing = None;
        let steps = plan(t(5.0), Some(&s), Some("A"), &fast());
        assert_eq!(
            steps,
            [
                Step::NewCa {
                    reason: "no usable CA key"
                },
                Step::Publish
            ]
        );
    }

    #[test]
    fn a_forced_rotation_is_done_once() {
        let mut s = steady();
        s.rotate_requested = Some("2024-01-01".into());
        let steps = plan(t(5.0), Some(&s), Some("A"), &fast());
        assert_eq!(
            steps,
            [
                Step::NewCa {
                    reason: "rotation requested"
                },
                Step::ConsumeRotate {
                    value: "2024-01-01".into()
                },
                Step::Publish
            ]
        );
        s.rotated = Some("2024-01-01".into());
        assert_eq!(plan(t(5.0), Some(&s), Some("A"), &fast()), []);
        s.rotate_requested = Some("again".into());
        assert_eq!(
            kinds(&plan(t(5.0), Some(&s), Some("A"), &fast())),
            ["NewCa", "ConsumeRotate", "Publish"]
        );
    }

    #[test]
    fn a_ca_rotation_overlaps_waits_and_drops_in_order() {
        let cfg = fast();
        // CA A (0..60) is past 2/3 at 40 s: B is added, A stays.
        let mut s = steady();
        s.serving = leaf(0, 20.0, 50.0);
        s.serving_since = Some(t(20.0));
        let steps = plan(t(40.0), Some(&s), Some("A"), &cfg);
        assert_eq!(
            steps,
            [
                Step::NewCa {
                    reason: "the CA is past 2/3 of its validity"
                },
                Step::Publish
            ]
        );
        // Published at 40.5: [A, B], B signs, the leaf is still A's.
        s.bundle.push(ca("B", 40.0, 100.0));
        s.ca_crt = "A+B".into();
        s.signing = Some(1);
        s.published_at = Some(t(40.5));
        for now in [40.5, 41.0, 42.4] {
            assert_eq!(
                plan(t(now), Some(&s), Some("A+B"), &cfg),
                [],
                "at {now} s: the new CA is not published long enough"
            );
        }
        // Published for the delay, but not in sync (an API read raced a
        // chart upgrade): still wait, and re-publish.
        assert_eq!(plan(t(42.5), Some(&s), Some("A"), &cfg), [Step::Publish]);
        assert_eq!(
            plan(t(42.5), Some(&s), Some("A+B"), &cfg),
            [Step::IssueServing {
                reason: "signed by an older CA"
            }]
        );
        // Served from B since 42.5; A stays until every replica has it.
        s.serving = leaf(1, 42.5, 72.5);
        s.serving_since = Some(t(42.5));
        let settle = 2.0 + 2.0 * 0.5;
        assert_eq!(
            plan(t(42.5 + settle - 0.1), Some(&s), Some("A+B"), &cfg),
            []
        );
        assert_eq!(
            plan(t(42.5 + settle), Some(&s), Some("A+B"), &cfg),
            [
                Step::DropCa {
                    fingerprint: "A".into(),
                    reason: "superseded, and no served certificate chains to it"
                },
                Step::Publish
            ]
        );
    }

    #[test]
    fn the_ca_of_the_served_certificate_is_never_dropped_before_it_expires() {
        let mut s = steady();
        s.bundle.push(ca("B", 10.0, 70.0));
        s.ca_crt = "A+B".into();
        s.signing = Some(1);
        // Published at 10 but never in sync: the leaf stays A's, and so does A.
        s.published_at = None;
        for now in [15.0, 25.0, 29.0] {
            let steps = plan(t(now), Some(&s), Some("A"), &fast());
            assert!(
                !steps.iter().any(|s| matches!(s, Step::DropCa { .. })),
                "{now}: {steps:?}"
            );
        }
        // Once the leaf has expired, it is replaced at once, from B.
        s.serving = Err("tls.crt has expired".into());
        let steps = plan(t(31.0), Some(&s), Some("A"), &fast());
        assert_eq!(kinds(&steps), ["IssueServing", "Publish"]);
        // An expired CA goes, whatever it signed.
        let steps = plan(t(61.0), Some(&s), Some("A+B"), &fast());
        assert_eq!(
            steps[0],
            Step::DropCa {
                fingerprint: "A".into(),
                reason: "expired"
            }
        );
    }

    #[test]
    fn a_serving_certificate_past_two_thirds_is_reissued_from_the_newest_ca() {
        let s = steady();
        // 0..30: due at 20.
        assert_eq!(plan(t(19.9), Some(&s), Some("A"), &fast()), []);
        assert_eq!(
            plan(t(20.0), Some(&s), Some("A"), &fast()),
            [Step::IssueServing {
                reason: "past 2/3 of its validity"
            }]
        );
    }

    #[test]
    fn changed_names_are_reissued_and_an_unusable_certificate_at_once() {
        let mut s = steady();
        if let Ok(l) = &mut s.serving {
            l.names_match = false;
        }
        assert_eq!(
            plan(t(5.0), Some(&s), Some("A"), &fast()),
            [Step::IssueServing {
                reason: "the names changed"
            }]
        );
        // A just-published bundle holds back a renewal, not a repair.
        let mut s = steady();
        s.published_at = Some(t(5.0));
        s.serving = Err("tls.crt/tls.key: the private key does not match the certificate".into());
        assert_eq!(
            plan(t(5.0), Some(&s), Some("A"), &fast()),
            [Step::IssueServing {
                reason: "no usable serving certificate"
            }]
        );
    }

    // -- the planner over whole lifetimes ----------------------------------

    #[derive(Clone)]
    struct ModelLeaf {
        issuer: String,
        not_before: SystemTime,
        not_after: SystemTime,
    }

    /// The Secret and the caBundle as the leader's steps change them,
    /// without real certificates.
    struct Model {
        bundle: Vec<CaCert>,
        key_ok: bool,
        leaf: Option<ModelLeaf>,
        published_at: Option<SystemTime>,
        serving_since: Option<SystemTime>,
        rotate_requested: Option<String>,
        rotated: Option<String>,
        exists: bool,
        mwc: Option<String>,
        made: usize,
    }

    impl Model {
        fn ca_crt(&self) -> String {
            self.bundle
                .iter()
                .map(|c| c.fingerprint.as_str())
                .collect::<Vec<_>>()
                .join("+")
        }

        fn stored(&self, now: SystemTime) -> Option<StoredTls> {
            if !self.exists {
                return None;
            }
            let serving = match &self.leaf {
                None => Err("absent".into()),
                Some(l) if l.not_after <= now => Err("expired".into()),
                Some(l) => match self.bundle.iter().position(|c| c.fingerprint == l.issuer) {
                    None => Err("chains to nothing".into()),
                    Some(issuer) => Ok(Leaf {
                        issuer,
                        fingerprint: String::new(),
                        not_before: l.not_before,
                        not_after: l.not_after,
                        names_match: true,
                    }),
                },
            };
            Some(StoredTls {
                ca_crt: self.ca_crt(),
                bundle: self.bundle.clone(),
                bundle_clean: true,
                signing: (self.key_ok && !self.bundle.is_empty()).then(|| self.bundle.len() - 1),
                serving,
                published_at: self.published_at,
                serving_since: self.serving_since,
                rotate_requested: self.rotate_requested.clone(),
                rotated: self.rotated.clone(),
            })
        }

        fn apply(&mut self, steps: &[Step], now: SystemTime, cfg: &SelfManaged) {
            let before = self.ca_crt();
            self.exists = true;
            for step in steps {
                match step {
                    Step::DropCa { fingerprint, .. } => {
                        self.bundle.retain(|c| &c.fingerprint != fingerprint)
                    }
                    Step::RewriteBundle | Step::Publish => {}
                    Step::NewCa { .. } => {
                        self.made += 1;
                        self.bundle.push(CaCert {
                            der: CertificateDer::from(Vec::new()),
                            fingerprint: format!("ca{}", self.made),
                            not_before: now - backdate(cfg.ca_validity),
                            not_after: now + cfg.ca_validity,
                        });
                        self.key_ok = true;
                    }
                    Step::IssueServing { .. } => {
                        let ca = self.bundle.last().expect("a CA to sign with");
                        self.leaf = Some(ModelLeaf {
                            issuer: ca.fingerprint.clone(),
                            not_before: now - backdate(cfg.cert_validity),
                            not_after: (now + cfg.cert_validity).min(ca.not_after),
                        });
                        self.serving_since = Some(now);
                    }
                    Step::ConsumeRotate { value } => self.rotated = Some(value.clone()),
                    Step::RecordServingSince => self.serving_since = Some(now),
                    Step::RecordPublished => self.published_at = Some(now),
                }
            }
            if self.ca_crt() != before {
                self.published_at = None;
            }
            if steps.contains(&Step::Publish) {
                self.mwc = Some(self.ca_crt());
                self.published_at = Some(now);
            }
        }
    }

    struct Snapshot {
        at: SystemTime,
        /// The CAs in caBundle, with their expiry.
        published: Vec<(String, SystemTime)>,
        leaf: Option<ModelLeaf>,
    }

    fn state_at(history: &[Snapshot], at: SystemTime) -> Option<&Snapshot> {
        history.iter().rev().find(|s| s.at <= at)
    }

    /// Runs the leader every check interval for `lifetimes` CA validities,
    /// with forced rotations at the given ticks, and checks at every tick
    /// that whatever any replica may still serve (the Secret up to two
    /// polls ago) verifies against whatever any API server may still use
    /// (caBundle up to the propagation delay ago). Returns (CAs made,
    /// largest bundle, writes).
    fn simulate(cfg: &SelfManaged, lifetimes: u32, force_at: &[u64]) -> (usize, usize, usize) {
        let mut m = Model {
            bundle: vec![],
            key_ok: false,
            leaf: None,
            published_at: None,
            serving_since: None,
            rotate_requested: None,
            rotated: None,
            exists: false,
            mwc: None,
            made: 0,
        };
        let tick = cfg.check_interval;
        let ticks = (cfg.ca_validity * lifetimes).as_nanos() / tick.as_nanos();
        let (mut widest, mut writes) = (0, 0);
        let mut history: Vec<Snapshot> = Vec::new();
        let mut first_published = None;
        for i in 0..u64::try_from(ticks).unwrap() {
            let now = t(0.0) + tick * u32::try_from(i).unwrap();
            if force_at.contains(&i) {
                m.rotate_requested = Some(format!("force-{i}"));
            }
            let steps = plan(now, m.stored(now).as_ref(), m.mwc.as_deref(), cfg);
            if !steps.is_empty() {
                writes += 1;
            }
            m.apply(&steps, now, cfg);
            // The plan is a fixed point: running it again at once changes nothing.
            assert_eq!(
                plan(now, m.stored(now).as_ref(), m.mwc.as_deref(), cfg),
                [],
                "tick {i}: not settled after {steps:?}"
            );
            widest = widest.max(m.bundle.len());
            let published: Vec<_> = match &m.mwc {
                None => vec![],
                Some(text) => text
                    .split('+')
                    .filter_map(|fp| {
                        m.bundle
                            .iter()
                            .find(|c| c.fingerprint == fp)
                            .map(|c| (fp.to_owned(), c.not_after))
                    })
                    .collect(),
            };
            if first_published.is_none() && m.mwc.is_some() {
                first_published = Some(now);
            }
            history.push(Snapshot {
                at: now,
                published,
                leaf: m.leaf.clone(),
            });
            let Some(start) = first_published else {
                continue;
            };
            let replica_lags = [Duration::ZERO, tick, 2 * tick];
            let apiserver_lags = [
                Duration::ZERO,
                cfg.propagation_delay / 2,
                cfg.propagation_delay,
            ];
            for r in replica_lags {
                for a in apiserver_lags {
                    if now < start + r.max(a) {
                        continue;
                    }
                    let served = state_at(&history, now - r).and_then(|s| s.leaf.clone());
                    let bundle = &state_at(&history, now - a).expect("history").published;
                    let served = served.expect("a certificate is served after publication");
                    assert!(
                        served.not_after > now,
                        "tick {i}: a replica {r:?} behind serves an expired certificate"
                    );
                    let trusted = bundle
                        .iter()
                        .find(|(fp, _)| *fp == served.issuer)
                        .unwrap_or_else(|| {
                            panic!(
                                "tick {i}: a replica {r:?} behind serves a certificate of {} \
                                 that an API server {a:?} behind does not trust ({bundle:?})",
                                served.issuer
                            )
                        });
                    assert!(trusted.1 > now, "tick {i}: the trusted CA has expired");
                }
            }
        }
        (m.made, widest, writes)
    }

    #[test]
    fn over_many_lifetimes_every_served_certificate_is_trusted_everywhere() {
        // The integration test's timings, and a wider spread.
        for (cfg, lifetimes) in [
            (fast(), 4),
            (settings(30, 12, 2, 500), 6),
            (settings(600, 120, 10, 1000), 4),
            (settings(3600, 1800, 30, 60_000), 3),
        ] {
            let (made, widest, writes) = simulate(&cfg, lifetimes, &[]);
            // A new CA every 2/3 of a lifetime.
            assert!(
                made >= lifetimes as usize,
                "{made} CAs in {lifetimes} lifetimes"
            );
            assert!(
                made <= 2 * lifetimes as usize,
                "{made} CAs in {lifetimes} lifetimes"
            );
            assert_eq!(widest, 2, "old and new overlap, never more");
            // Per CA: add, switch, drop; and a renewal per half validity.
            let renewals =
                (cfg.ca_validity * lifetimes).as_secs() / (cfg.cert_validity.as_secs() / 2);
            let bound = 3 * made + usize::try_from(renewals).unwrap() + 2;
            assert!(
                writes <= bound,
                "{writes} writes (at most {bound} expected): the leader churns"
            );
        }
    }

    #[test]
    fn forced_rotations_at_any_moment_keep_every_served_certificate_trusted() {
        let cfg = fast();
        // Ticks of 0.5 s: during an overlap, right after a drop, twice in a row.
        for force in [
            vec![10],
            vec![10, 11],
            vec![10, 14],
            vec![10, 20, 30],
            vec![79, 80],
        ] {
            let (made, widest, _) = simulate(&cfg, 3, &force);
            assert!(made > 3, "{force:?}: {made} CAs: one more than scheduled");
            assert!(widest <= 2 + force.len(), "{force:?}: {widest} CAs at once");
        }
    }

    // -- real certificates -------------------------------------------------

    /// A CA and a serving certificate for `names` from it: (cert PEM, key PEM, CA).
    fn pem_pair(names: &[&str]) -> (String, String, CaCert) {
        let (ca, key) = issue_ca(SystemTime::now(), Duration::from_secs(3600)).unwrap();
        let issuer = issuer_of(&ca.der, key).unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let (crt, key) = issue_serving(
            &ca,
            &issuer,
            &names,
            SystemTime::now(),
            Duration::from_secs(600),
        )
        .unwrap();
        (crt, key, ca)
    }

    #[test]
    fn set_pem_loads_a_good_pair_and_keeps_it_through_bad_ones() {
        let serving = ServingCert::new();
        assert!(!serving.is_loaded());
        let (crt, key, _) = pem_pair(&[DNS]);
        serving.set_pem(&crt, &key).unwrap();
        assert!(serving.is_loaded());
        let loaded = serving.fingerprint().unwrap();

        let (other_crt, other_key, _) = pem_pair(&[DNS]);
        let cases = [
            (crt.as_str(), "not a key", "not a PEM private key"),
            (crt.as_str(), other_key.as_str(), "does not match"),
            ("", key.as_str(), "no PEM certificate"),
            (
                &crt[..crt.len() / 2],
                key.as_str(),
                "unreadable PEM certificate",
            ),
            (
                crt.as_str(),
                &key[..key.len() - 30],
                "not a PEM private key",
            ),
        ];
        for (chain, k, expected) in cases {
            let err = serving.set_pem(chain, k).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert!(!err.contains("MII"), "an error quotes PEM: {err}");
            assert_eq!(
                serving.fingerprint().unwrap(),
                loaded,
                "the old pair keeps serving"
            );
        }
        serving.set_pem(&other_crt, &other_key).unwrap();
        assert_ne!(serving.fingerprint().unwrap(), loaded);
        assert_eq!(
            serving.loads(),
            CertLoads {
                ok: 2,
                failed: cases.len() as u64
            }
        );
        let debug = format!("{serving:?}");
        assert!(
            debug.starts_with("ServingCert") && !debug.contains("key"),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn the_resolver_serves_the_current_certificate_in_a_handshake() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let serving = ServingCert::new();
        let (crt, key, ca) = pem_pair(&[DNS, "127.0.0.1"]);
        serving.set_pem(&crt, &key).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider().clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(serving.clone());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider().clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        for name in [DNS, "127.0.0.1"] {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server.clone()));
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client.clone()));
            let srv = tokio::spawn(async move {
                let mut tls = acceptor.accept(a).await?;
                tls.write_all(b"ok").await?;
                tls.shutdown().await
            });
            let mut tls = connector
                .connect(ServerName::try_from(name).unwrap().to_owned(), b)
                .await
                .unwrap();
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.unwrap();
            assert_eq!(buf, b"ok");
            srv.await.unwrap().unwrap();
        }
    }

    #[test]
    fn dates_are_read_from_utc_and_generalized_time() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.not_before = rcgen::date_time_ymd(2025, 2, 3);
        params.not_after = rcgen::date_time_ymd(2051, 12, 31);
        let cert = params.self_signed(&key).unwrap();
        let fields = cert_fields(cert.der()).unwrap();
        let secs = |st: SystemTime| st.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(fields.not_before), 1_738_540_800); // 2025-02-03T00:00:00Z
        assert_eq!(secs(fields.not_after), 2_587_593_600); // 2051-12-31T00:00:00Z
        assert_eq!(fields.spki, key.subject_public_key_info().as_slice());
        assert!(cert_fields(b"\x30\x03\x02\x01\x01").is_err());
        assert!(cert_fields(b"").is_err());
    }

    fn apply_real(
        current: Option<&Secret>,
        cfg: &SelfManaged,
        now: SystemTime,
        published: &mut Option<String>,
    ) -> (Vec<Step>, Secret) {
        let stored = current.map(|c| read_stored(c, &cfg.dns_names, now));
        let steps = plan(now, stored.as_ref(), published.as_deref(), cfg);
        let mut secret = build_secret(current, stored.as_ref(), &steps, cfg, now).unwrap();
        if steps.contains(&Step::Publish) {
            let ca_crt = secret_text(&secret, CA_CERT_KEY).unwrap();
            *published = Some(ca_crt.clone());
            secret.metadata.annotations.as_mut().unwrap().insert(
                BUNDLE_PUBLISHED_ANNOTATION.into(),
                record(now, &ca_crt).unwrap(),
            );
        }
        (steps, secret)
    }

    #[test]
    fn a_real_rotation_issues_from_a_ca_read_back_from_the_secret() {
        let cfg = fast();
        let now0 = SystemTime::now();
        let at = |s: f64| now0 + Duration::from_secs_f64(s);
        let mut published = None;
        let (steps, secret) = apply_real(None, &cfg, at(0.0), &mut published);
        assert_eq!(kinds(&steps), ["NewCa", "IssueServing", "Publish"]);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(
            secret.metadata.labels.as_ref().unwrap()[MANAGED_BY_LABEL],
            MANAGED_BY
        );
        let keys: Vec<_> = secret.data.as_ref().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["ca.crt", "ca.key", "tls.crt", "tls.key"]);
        let s0 = read_stored(&secret, &cfg.dns_names, at(0.1));
        assert_eq!(s0.signing, Some(0));
        assert!(s0.bundle_clean);
        let l0 = s0.serving.clone().unwrap();
        assert_eq!((l0.issuer, l0.names_match), (0, true));
        assert!(s0.published_at.is_some() && s0.serving_since.is_some());
        assert_eq!(plan(at(0.1), Some(&s0), published.as_deref(), &cfg), []);

        // Forced rotation.
        let mut secret = secret;
        secret
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ROTATE_ANNOTATION.into(), "now".into());
        let (steps, secret) = apply_real(Some(&secret), &cfg, at(1.0), &mut published);
        assert_eq!(kinds(&steps), ["NewCa", "ConsumeRotate", "Publish"]);
        let s1 = read_stored(&secret, &cfg.dns_names, at(1.0));
        assert_eq!((s1.bundle.len(), s1.signing), (2, Some(1)));
        assert_eq!(s1.serving.as_ref().unwrap().issuer, 0, "still the old CA's");
        assert_eq!(s1.serving.as_ref().unwrap().fingerprint, l0.fingerprint);
        assert_eq!(s1.rotated.as_deref(), Some("now"));

        // Too early, then the switch, from the CA key read back from the Secret.
        let (steps, secret) = apply_real(Some(&secret), &cfg, at(2.0), &mut published);
        assert_eq!(steps, []);
        let (steps, secret) = apply_real(Some(&secret), &cfg, at(3.1), &mut published);
        assert_eq!(kinds(&steps), ["IssueServing"]);
        let s2 = read_stored(&secret, &cfg.dns_names, at(3.1));
        assert_eq!(s2.serving.as_ref().unwrap().issuer, 1);
        assert!(s2.serving.as_ref().unwrap().names_match);

        // The old CA goes once every replica serves the new certificate.
        let (steps, secret) = apply_real(Some(&secret), &cfg, at(5.0), &mut published);
        assert_eq!(steps, []);
        let (steps, secret) = apply_real(Some(&secret), &cfg, at(6.2), &mut published);
        assert_eq!(kinds(&steps), ["DropCa", "Publish"]);
        let s3 = read_stored(&secret, &cfg.dns_names, at(6.2));
        assert_eq!(s3.bundle, s1.bundle[1..]);
        assert_eq!((s3.signing, s3.serving.unwrap().issuer), (Some(0), 0));
        assert_eq!(
            annotation(&secret, WRITTEN_BY_ANNOTATION).map(String::as_str),
            Some("replica-a")
        );
    }

    #[test]
    fn a_damaged_secret_is_read_as_unusable_and_rebuilt() {
        let cfg = fast();
        let now = SystemTime::now();
        let mut published = None;
        let (_, good) = apply_real(None, &cfg, now, &mut published);
        let mut damaged = good.clone();
        let data = damaged.data.as_mut().unwrap();
        data.insert(
            CA_CERT_KEY.into(),
            ByteString(b"-----BEGIN CERTIFICATE-----\nAAAA".to_vec()),
        );
        data.insert(TLS_KEY_KEY.into(), ByteString(b"garbage".to_vec()));
        let stored = read_stored(&damaged, &cfg.dns_names, now);
        assert!(stored.bundle.is_empty() && !stored.bundle_clean);
        assert_eq!(stored.signing, None);
        assert!(
            stored
                .serving
                .as_ref()
                .unwrap_err()
                .contains("not a PEM private key")
        );
        assert_eq!(
            stored.published_at, None,
            "the record no longer matches ca.crt"
        );
        let (steps, rebuilt) = apply_real(Some(&damaged), &cfg, now, &mut published);
        assert_eq!(
            kinds(&steps),
            ["RewriteBundle", "NewCa", "IssueServing", "Publish"]
        );
        let stored = read_stored(&rebuilt, &cfg.dns_names, now);
        assert!(stored.bundle_clean && stored.signing == Some(0) && stored.serving.is_ok());

        // A CA key that belongs to another CA does not sign.
        let mut swapped = good.clone();
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        swapped.data.as_mut().unwrap().insert(
            CA_KEY_KEY.into(),
            ByteString(other.serialize_pem().into_bytes()),
        );
        let stored = read_stored(&swapped, &cfg.dns_names, now);
        assert_eq!(stored.signing, None);
        assert!(
            stored.serving.is_ok(),
            "the served certificate is still fine"
        );

        // A certificate for other names.
        let mut other_names = cfg.clone();
        other_names.dns_names = vec!["elsewhere.example".into()];
        let stored = read_stored(&good, &other_names.dns_names, now);
        assert!(stored.serving.unwrap_err().contains("does not verify"));
        let mut one_more = cfg.clone();
        one_more.dns_names.push("new.credbroker.svc".into());
        let stored = read_stored(&good, &one_more.dns_names, now);
        assert!(!stored.serving.unwrap().names_match);

        // And the check before writing refuses a Secret that cannot serve.
        let stored = read_stored(&damaged, &cfg.dns_names, now);
        let err = build_secret(
            Some(&damaged),
            Some(&stored),
            &[Step::RecordPublished],
            &cfg,
            now,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("failed its own check"), "{err}");
    }

    #[test]
    fn settings_are_validated() {
        assert!(fast().validate().is_ok());
        let mut s = fast();
        s.dns_names = vec![];
        assert!(s.validate().is_err());
        let mut s = fast();
        s.dns_names = vec!["not a name!".into()];
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("not a name!")
        );
        let mut s = fast();
        s.cert_validity = Duration::from_secs(9);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("must exceed")
        );
        let mut s = fast();
        s.cert_validity = Duration::from_secs(61);
        assert!(s.validate().is_err());
        let mut s = fast();
        s.check_interval = Duration::ZERO;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("--cert-check-interval")
        );
        let mut s = fast();
        s.cert_validity = s.ca_validity + Duration::from_secs(1);
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("--cert-validity") && err.contains("--ca-validity"),
            "{err}"
        );
    }

    // -- provided files ----------------------------------------------------

    /// A Secret volume: files are symlinks into `..data`, itself a symlink
    /// to a timestamped directory, swapped atomically on update.
    struct SecretVolume {
        dir: tempfile::TempDir,
        generation: u32,
    }

    impl SecretVolume {
        fn new(crt: &str, key: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mut v = Self { dir, generation: 0 };
            v.update(crt, key);
            for name in ["tls.crt", "tls.key"] {
                std::os::unix::fs::symlink(format!("..data/{name}"), v.dir.path().join(name))
                    .unwrap();
            }
            v
        }

        fn update(&mut self, crt: &str, key: &str) {
            self.generation += 1;
            let data = format!("..gen_{}", self.generation);
            let path = self.dir.path().join(&data);
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join("tls.crt"), crt).unwrap();
            std::fs::write(path.join("tls.key"), key).unwrap();
            let tmp = self.dir.path().join("..data_tmp");
            std::os::unix::fs::symlink(&data, &tmp).unwrap();
            std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
        }

        fn files(&self) -> ProvidedFiles {
            ProvidedFiles {
                cert_file: self.dir.path().join("tls.crt"),
                key_file: self.dir.path().join("tls.key"),
                reload_interval: Duration::from_millis(20),
            }
        }
    }

    async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn provided_files_are_reloaded_when_their_contents_change() {
        let (crt1, key1, _) = pem_pair(&[DNS]);
        let (crt2, key2, _) = pem_pair(&[DNS]);
        let (crt3, key3, _) = pem_pair(&[DNS]);
        let mut volume = SecretVolume::new(&crt1, &key1);
        let serving = ServingCert::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch_provided(
            volume.files(),
            serving.clone(),
            shutdown.clone(),
        ));
        wait_for("the first load", || serving.is_loaded()).await;
        let fp = |crt: &str| sha256_hex(parse_certs(crt, "x").unwrap()[0].as_ref());
        assert_eq!(serving.fingerprint().unwrap(), fp(&crt1));

        volume.update(&crt2, &key2);
        wait_for("the reload", || serving.fingerprint() == Some(fp(&crt2))).await;

        // Half-written: a new certificate with the old key. Then a pair
        // whose key is cut short. Neither replaces what serves.
        volume.update(&crt3, &key2);
        volume.update(&crt3, &key3[..40]);
        // Proof that the watcher has looked past both: a good pair lands.
        volume.update(&crt1, &key1);
        wait_for("the next good pair", || {
            serving.fingerprint() == Some(fp(&crt1))
        })
        .await;
        volume.update(&crt3, &key2);
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(
                serving.fingerprint().unwrap(),
                fp(&crt1),
                "a mismatched pair was loaded"
            );
        }
        volume.update(&crt3, &key3);
        wait_for("the completed update", || {
            serving.fingerprint() == Some(fp(&crt3))
        })
        .await;

        shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn provided_files_must_load_at_start() {
        let (crt, _, _) = pem_pair(&[DNS]);
        let (_, other_key, _) = pem_pair(&[DNS]);
        let volume = SecretVolume::new(&crt, &other_key);
        let serving = ServingCert::new();
        let err = watch_provided(volume.files(), serving.clone(), CancellationToken::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tls.crt") && err.contains("does not match"),
            "{err}"
        );
        assert!(!serving.is_loaded());

        let mut files = volume.files();
        files.key_file = volume.dir.path().join("missing.key");
        let err = load_provided(&files, &serving).unwrap_err().to_string();
        assert!(err.contains("missing.key"), "{err}");
    }

    #[tokio::test]
    async fn provided_files_are_read_once_at_start_and_every_load_is_counted() {
        let (crt1, key1, _) = pem_pair(&[DNS]);
        let (crt2, key2, _) = pem_pair(&[DNS]);
        let mut volume = SecretVolume::new(&crt1, &key1);
        let serving = ServingCert::new();
        assert_eq!(serving.loads(), CertLoads::default());
        assert_eq!(serving.not_after(), None);
        let loaded = load_provided(&volume.files(), &serving).unwrap();
        assert_eq!(serving.loads(), CertLoads { ok: 1, failed: 0 });
        let leaf = parse_certs(&crt1, "x").unwrap();
        assert_eq!(
            serving.not_after(),
            Some(cert_fields(leaf[0].as_ref()).unwrap().not_after)
        );

        let shutdown = CancellationToken::new();
        let task = tokio::spawn(poll_provided(
            volume.files(),
            serving.clone(),
            loaded,
            shutdown.clone(),
        ));
        // The pair loaded at start is not loaded again by the poller.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(serving.loads(), CertLoads { ok: 1, failed: 0 });
        // A mismatched pair is counted once (then only retried on change);
        // the next good one is loaded.
        volume.update(&crt2, &key1);
        wait_for("the refused pair", || serving.loads().failed == 1).await;
        volume.update(&crt2, &key2);
        wait_for("the reload", || serving.loads().ok == 2).await;
        assert_eq!(serving.loads().failed, 1);
        shutdown.cancel();
        task.await.unwrap().unwrap();

        let mut files = volume.files();
        files.reload_interval = Duration::ZERO;
        let err = load_provided(&files, &serving).unwrap_err().to_string();
        assert!(err.contains("--cert-reload-interval"), "{err}");
    }
}
