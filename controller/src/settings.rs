//! What the controller grants with: the knobs that shape every generated
//! policy and role. Parsed from flags in `run.rs`; plain data here so the
//! pure modules and their tests take it directly.

use std::time::Duration;

/// The settings every generated grant shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSettings {
    /// Distinguishes this cluster's names from other clusters' in a shared
    /// Vault (see [`crate::names`]).
    pub cluster_id: String,
    /// The Kubernetes auth mount the roles are written under (`kubernetes`).
    pub auth_mount: String,
    /// The audience the sidecar's projected token must carry.
    pub audience: String,
    /// The TTL of a token the sidecar gets at login; it renews before expiry.
    pub token_ttl: Duration,
    /// The most a token can be renewed to; then the sidecar logs in again.
    pub token_max_ttl: Duration,
}

impl GrantSettings {
    /// The flags' defaults (mount `kubernetes`, audience `credbroker`, TTL
    /// 10 minutes, max TTL 1 hour) for `cluster_id`: what the pure modules'
    /// tests grant with.
    pub fn new(cluster_id: impl Into<String>) -> Self {
        Self {
            cluster_id: cluster_id.into(),
            auth_mount: "kubernetes".into(),
            audience: credbroker_crds::keys::DEFAULT_BROKER_AUDIENCE.into(),
            token_ttl: Duration::from_secs(600),
            token_max_ttl: Duration::from_secs(3600),
        }
    }
}
