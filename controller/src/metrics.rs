//! The controller's Prometheus metrics: one registry, every name prefixed
//! `credbroker_controller_`, durations in seconds. Labels are results,
//! reasons and operations, never a name a tenant chose.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpResultLabels {
    op: &'static str,
    result: &'static str,
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
    reconcile_duration: Histogram,
    vault_writes: Family<OpLabels, Counter>,
    vault_requests: Family<OpResultLabels, Counter>,
    vault_logins: Family<ResultLabels, Counter>,
    swept: Family<KindLabels, Counter>,
    sweeps: Family<ResultLabels, Counter>,
    leader: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("credbroker_controller");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles of a CredentialBinding, by result (ok, error)",
            reconciles.clone(),
        );
        let errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by reason",
            errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Time to reconcile one CredentialBinding",
            reconcile_duration.clone(),
        );
        let vault_writes = Family::<OpLabels, Counter>::default();
        registry.register(
            "vault_writes",
            "Writes and deletes sent to Vault (attempted), by operation (policy_write, policy_delete, role_write, role_delete)",
            vault_writes.clone(),
        );
        let vault_requests = Family::<OpResultLabels, Counter>::default();
        registry.register(
            "vault_requests",
            "Requests sent to Vault, by operation and result (2xx, 4xx, 5xx, no_answer)",
            vault_requests.clone(),
        );
        let vault_logins = Family::<ResultLabels, Counter>::default();
        registry.register(
            "vault_logins",
            "The controller's own logins to Vault, by result",
            vault_logins.clone(),
        );
        let swept = Family::<KindLabels, Counter>::default();
        registry.register(
            "swept",
            "Orphaned credbroker-* policies, roles and ConfigMaps the sweep deleted, by kind",
            swept.clone(),
        );
        let sweeps = Family::<ResultLabels, Counter>::default();
        registry.register(
            "sweeps",
            "Sweeps run, by result (ok, error)",
            sweeps.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            reconcile_duration,
            vault_writes,
            vault_requests,
            vault_logins,
            swept,
            sweeps,
            leader,
        }
    }

    pub fn reconciled(&self, seconds: f64, error: Option<&'static str>) {
        self.reconcile_duration.observe(seconds);
        let result = if error.is_some() { "error" } else { "ok" };
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
        if let Some(reason) = error {
            self.errors.get_or_create(&ReasonLabels { reason }).inc();
        }
    }

    pub fn vault_write(&self, op: &'static str) {
        self.vault_writes.get_or_create(&OpLabels { op }).inc();
    }

    pub fn vault_request(&self, op: &'static str, result: &'static str) {
        self.vault_requests
            .get_or_create(&OpResultLabels { op, result })
            .inc();
    }

    pub fn vault_login(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.vault_logins
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn swept(&self, kind: &'static str) {
        self.swept.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn sweep_done(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.sweeps.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            return "# encoding the metrics failed\n".into();
        }
        out
    }
}
