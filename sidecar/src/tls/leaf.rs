//! Leaf certificates for intercepted connections: one per SNI name, minted
//! from the pod CA on first use, cached, and re-minted before it expires.
//!
//! The cache is the TLS server's certificate resolver, so it sits on the
//! handshake path of every intercepted connection. A hit takes one read lock
//! on one of [`SHARDS`] shards; minting (key generation and signing, the slow
//! part) happens outside any lock, and only the insert takes a shard's write
//! lock. Two handshakes that miss on the same name at once may both mint;
//! the first insert wins and both get the same certificate.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::ca::{PodCa, random_serial};
use super::{alpn_protocols, provider};
use crate::{Error, Result};

/// Number of independently locked parts of the cache.
pub const SHARDS: usize = 16;

/// How long leaves live and how many are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafPolicy {
    /// Validity from now (a leaf never outlives the CA).
    pub lifetime: Duration,
    /// How far `notBefore` lies in the past, for agents whose clock lags.
    pub backdate: Duration,
    /// A cached leaf with less validity left than this is re-minted.
    pub renew_before: Duration,
    /// Most leaves kept; beyond it the one closest to renewal is dropped.
    pub capacity: usize,
}

impl Default for LeafPolicy {
    /// Three days, backdated one hour, renewed with a day to spare: short
    /// enough that a leaked leaf key is soon worthless, long enough that a
    /// leaf never expires under a long-lived connection's feet. 256 leaves
    /// is far more bound names than a pod has, and stays well under a MiB.
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(72 * 3600),
            backdate: Duration::from_secs(3600),
            renew_before: Duration::from_secs(24 * 3600),
            capacity: 256,
        }
    }
}

/// Counters for metrics: plain numbers, never names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeafCacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Leaves minted (first use, renewal, or after eviction).
    pub mints: u64,
    /// Leaves dropped to stay within capacity.
    pub evictions: u64,
    /// Leaves held now.
    pub entries: usize,
}

struct Entry {
    key: Arc<CertifiedKey>,
    /// A server config that presents only this leaf, and only to a client
    /// asking for this name.
    config: Arc<ServerConfig>,
    /// Monotonic: a wall-clock jump neither keeps a leaf past its renewal
    /// nor throws every leaf away at once.
    renew_at: Instant,
}

type Shard = RwLock<HashMap<Box<str>, Entry>>;

/// Leaf certificates per SNI name, signed by the pod CA; also the rustls
/// certificate resolver for intercepted connections.
pub struct LeafCertCache {
    ca: Arc<PodCa>,
    policy: LeafPolicy,
    provider: Arc<CryptoProvider>,
    shards: Box<[Shard]>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
    hits: AtomicU64,
    mints: AtomicU64,
    evictions: AtomicU64,
}

impl fmt::Debug for LeafCertCache {
    /// Counters only: the CA key is not printable, and names are not needed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCertCache")
            .field("policy", &self.policy)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl LeafCertCache {
    /// A cache with the [default policy](LeafPolicy::default).
    pub fn new(ca: Arc<PodCa>) -> Self {
        Self::build(ca, LeafPolicy::default())
    }

    /// A cache with `policy`; a zero capacity or lifetime is an error.
    pub fn with_policy(ca: Arc<PodCa>, policy: LeafPolicy) -> Result<Self> {
        if policy.capacity == 0 || policy.lifetime.is_zero() {
            return Err(Error::Config(
                "leaf certificate cache: capacity and lifetime must be positive".into(),
            ));
        }
        Ok(Self::build(ca, policy))
    }

    fn build(ca: Arc<PodCa>, policy: LeafPolicy) -> Self {
        let shards = (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect();
        Self {
            ca,
            per_shard: policy.capacity.div_ceil(SHARDS),
            policy,
            provider: provider(),
            shards,
            hasher: Default::default(),
            hits: AtomicU64::new(0),
            mints: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The CA leaves are signed by.
    pub fn ca(&self) -> &Arc<PodCa> {
        &self.ca
    }

    /// The leaf for `sni`, from the cache or freshly minted. `sni` must be a
    /// DNS name (case and one trailing dot are ignored); IP addresses,
    /// wildcards and anything else are refused.
    pub fn get(&self, sni: &str) -> Result<Arc<CertifiedKey>> {
        self.entry(sni).map(|(key, _)| key)
    }

    /// The TLS server config for a connection the proxy terminates for
    /// `sni`: it presents the leaf for `sni` and refuses a handshake that
    /// asks for any other name, so the parser that routed the connection
    /// and the TLS stack cannot disagree about which name is served.
    pub fn config_for(&self, sni: &str) -> Result<Arc<ServerConfig>> {
        self.entry(sni).map(|(_, config)| config)
    }

    /// The config for `sni` if it is cached and fresh: no minting, so it
    /// is cheap enough for the accept path. `None`: call
    /// [`Self::config_for`] off the async threads.
    pub fn cached_config(&self, sni: &str) -> Option<Arc<ServerConfig>> {
        let name = normalize_sni(sni).ok()?;
        let shard = &self.shards[self.shard_of(&name)];
        let map = read(shard);
        let entry = map.get(name.as_ref())?;
        if entry.renew_at > Instant::now() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            Some(entry.config.clone())
        } else {
            None
        }
    }

    fn entry(&self, sni: &str) -> Result<(Arc<CertifiedKey>, Arc<ServerConfig>)> {
        let name = normalize_sni(sni)?;
        let shard = &self.shards[self.shard_of(&name)];
        if let Some(entry) = read(shard).get(name.as_ref())
            && entry.renew_at > Instant::now()
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((entry.key.clone(), entry.config.clone()));
        }
        let minted = self.mint(&name)?;
        self.mints.fetch_add(1, Ordering::Relaxed);

        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some(existing) = map.get(name.as_ref())
            && existing.renew_at > now
        {
            // Another handshake minted it meanwhile: keep one certificate
            // per name.
            return Ok((existing.key.clone(), existing.config.clone()));
        }
        if !map.contains_key(name.as_ref()) && map.len() >= self.per_shard {
            let oldest = map
                .iter()
                .min_by_key(|(_, e)| e.renew_at)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        let found = (minted.key.clone(), minted.config.clone());
        map.insert(name.into_owned().into_boxed_str(), minted);
        Ok(found)
    }

    /// Hit, mint and eviction counts, and the current size.
    pub fn stats(&self) -> LeafCacheStats {
        LeafCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            mints: self.mints.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries: self.shards.iter().map(|s| read(s).len()).sum(),
        }
    }

    /// The TLS server config for intercepted connections: certificates from
    /// this cache by SNI, HTTP/2 and HTTP/1.1 by ALPN, no client auth. One
    /// config serves every connection.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(format!("server TLS config: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = alpn_protocols();
        Ok(Arc::new(config))
    }

    fn shard_of(&self, name: &str) -> usize {
        // The modulo keeps the value below SHARDS, so the cast is lossless.
        (self.hasher.hash_one(name) % SHARDS as u64) as usize
    }

    fn mint(&self, name: &str) -> Result<Entry> {
        let now_wall = SystemTime::now();
        let now = Instant::now();
        let not_after = (now_wall + self.policy.lifetime).min(self.ca.not_after());

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // RFC 5280 caps a common name at 64 characters; the SAN is what
        // clients check, the CN is for humans and very old clients.
        if name.len() <= 64 {
            dn.push(DnType::CommonName, name);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(
            name.try_into()
                .map_err(|e| Error::Tls(format!("leaf for {name}: {e}")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = OffsetDateTime::from(now_wall - self.policy.backdate);
        params.not_after = OffsetDateTime::from(not_after);

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Tls(format!("leaf key for {name}: {e}")))?;
        let cert = self.ca.sign(&params, &key)?;
        let pkcs8 = Zeroizing::new(key.serialize_der());
        // Borrowing loader: the PKCS#8 bytes stay in our zeroizing buffer.
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
        ))
        .map_err(|e| Error::Tls(format!("leaf key for {name}: {e}")))?;

        let renew_in = not_after
            .duration_since(now_wall)
            .unwrap_or_default()
            .saturating_sub(self.policy.renew_before);
        let key = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing_key));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(format!("server TLS config for {name}: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(PinnedResolver {
                name: name.into(),
                key: key.clone(),
            }));
        config.alpn_protocols = alpn_protocols();
        Ok(Entry {
            key,
            config: Arc::new(config),
            renew_at: now + renew_in,
        })
    }
}

/// Presents one leaf, only for its own name.
#[derive(Debug)]
struct PinnedResolver {
    name: Box<str>,
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for PinnedResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let asked = normalize_sni(client_hello.server_name()?).ok()?;
        (asked.as_ref() == &*self.name).then(|| self.key.clone())
    }
}

impl ResolvesServerCert for LeafCertCache {
    /// No SNI, or an SNI that is not a DNS name, aborts the handshake: the
    /// proxy only terminates TLS for bound names, which are DNS names.
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = client_hello.server_name()?;
        match self.get(sni) {
            Ok(key) => Some(key),
            Err(error) => {
                tracing::warn!(sni, %error, "no leaf certificate for this name");
                None
            }
        }
    }
}

/// `sni` as a cache key: lowercase, without a trailing dot, and only if it
/// is a DNS name (no IP address, no wildcard, no empty label). Borrows when
/// the name is already in that form, as SNI from rustls is.
pub fn normalize_sni(sni: &str) -> Result<Cow<'_, str>> {
    let trimmed = sni.strip_suffix('.').unwrap_or(sni);
    if DnsName::try_from(trimmed).is_err() || trimmed.ends_with('.') {
        return Err(Error::Tls(format!("{sni:?} is not a DNS name")));
    }
    Ok(if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        Cow::Borrowed(trimmed)
    })
}

fn read(shard: &Shard) -> std::sync::RwLockReadGuard<'_, HashMap<Box<str>, Entry>> {
    shard.read().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_normalization() {
        assert_eq!(normalize_sni("api.example.com").unwrap(), "api.example.com");
        assert!(matches!(
            normalize_sni("api.example.com").unwrap(),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            normalize_sni("API.Example.COM.").unwrap(),
            "api.example.com"
        );
        assert_eq!(
            normalize_sni("under_score.test").unwrap(),
            "under_score.test"
        );
        for bad in [
            "",
            ".",
            "10.0.0.1",
            "::1",
            "[::1]",
            "*.example.com",
            "a..b",
            "-a.test",
            "a-.test",
            "exa mple.com",
            "example.com..",
            "ex\u{e4}mple.com",
            "a/b",
        ] {
            assert!(normalize_sni(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}.test", "a".repeat(64));
        assert!(normalize_sni(&long).is_err(), "64-character label accepted");
    }

    #[test]
    fn default_policy_is_short_and_renews_early() {
        let p = LeafPolicy::default();
        assert!(p.lifetime >= Duration::from_secs(24 * 3600));
        assert!(p.lifetime <= Duration::from_secs(7 * 24 * 3600));
        assert!(p.renew_before < p.lifetime);
        assert!(p.backdate <= Duration::from_secs(3600));
    }
}
