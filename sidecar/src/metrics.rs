//! The sidecar's Prometheus metrics: one registry, every name prefixed
//! `credbroker_sidecar_`, durations in seconds.
//!
//! Labels are binding ids, decisions, reasons and steps: never a value, a
//! placeholder, a host the agent chose freely, or a path. (Hosts in labels
//! would let an agent grow the series without bound.)

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::tls::LeafCertCache;

/// A binding id as a label value, shared rather than copied per request.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct BindingLabel(pub Arc<str>);

impl BindingLabel {
    /// The label of requests that carried no placeholder.
    pub fn none() -> Self {
        Self(Arc::from(""))
    }
}

impl EncodeLabelValue for BindingLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    binding: BindingLabel,
    decision: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlockedLabels {
    binding: BindingLabel,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    part: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabels {
    part: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    binding: BindingLabel,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BindingOnly {
    binding: BindingLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    binding: BindingLabel,
    state: &'static str,
}

/// Every metric, registered once; cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<DecisionLabels, Histogram>,
    blocked: Family<BlockedLabels, Counter>,
    connections: Family<RouteLabels, Counter>,
    open_connections: Gauge,
    config_reloads: Family<ReloadLabels, Counter>,
    config_valid: Family<PartLabels, Gauge>,
    secret_refreshes: Family<RefreshLabels, Counter>,
    secret_version: Family<BindingOnly, Gauge>,
    secret_last_success: Family<BindingOnly, Gauge<f64, AtomicU64>>,
    secret_state: Family<StateLabels, Gauge>,
    upstream_errors: Family<StepLabels, Counter>,
    audit_dropped: Counter,
    vault_requests: Family<VaultRequestLabels, Counter>,
    vault_logins: Family<VaultLoginLabels, Counter>,
    vault_login_duration: Histogram,
    vault_token_ttl: Gauge<f64, AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VaultRequestLabels {
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VaultLoginLabels {
    method: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: &'static str,
}

/// Every state `secret_state` reports.
const SECRET_STATES: [&str; 5] = ["pending", "ready", "stale", "failed", "no_placeholder"];

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

/// Latency buckets (seconds): the broker adds well under a millisecond; the
/// upstream's time dominates, up to minutes for a long completion.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0,
];

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("credbroker_sidecar");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Intercepted requests, by the binding whose placeholder they carried, the decision and the status returned",
            requests.clone(),
        );
        let request_duration = Family::<DecisionLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(LATENCY_BUCKETS)
        });
        registry.register(
            "request_duration_seconds",
            "Time from an intercepted request's arrival to its response head, by decision",
            request_duration.clone(),
        );
        let blocked = Family::<BlockedLabels, Counter>::default();
        registry.register(
            "blocked",
            "Requests, responses and connections blocked to keep a secret where it belongs, by binding and reason (destination_not_bound, method_not_allowed, ..., an echo's encoding)",
            blocked.clone(),
        );
        let connections = Family::<RouteLabels, Counter>::default();
        registry.register(
            "connections",
            "Accepted connections, by what was done with them",
            connections.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Connections open now",
            open_connections.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config file (re)loads, by part (bindings, placeholders, local) and result",
            config_reloads.clone(),
        );
        let config_valid = Family::<PartLabels, Gauge>::default();
        registry.register(
            "config_last_load_ok",
            "1 when the last load of the part succeeded, 0 when the previous config is kept because it failed",
            config_valid.clone(),
        );
        let secret_refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "secret_refreshes",
            "Reads of bindings' secrets from the source, by result",
            secret_refreshes.clone(),
        );
        let secret_version = Family::<BindingOnly, Gauge>::default();
        registry.register(
            "secret_version",
            "The version of the secret in use (KV v2 current_version; 0 when unversioned)",
            secret_version.clone(),
        );
        let secret_last_success = Family::<BindingOnly, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "secret_last_success_timestamp_seconds",
            "When the secret was last read or confirmed, as a Unix time",
            secret_last_success.clone(),
        );
        let secret_state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "secret_state",
            "1 for the binding's current state (pending, ready, stale, failed, no_placeholder)",
            secret_state.clone(),
        );
        let upstream_errors = Family::<StepLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstreams that could not be reached or answered badly, by step (dns, connect, tls, timeout, exchange)",
            upstream_errors.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_records_dropped",
            "Audit records lost because the audit writer fell behind",
            audit_dropped.clone(),
        );
        let vault_requests = Family::<VaultRequestLabels, Counter>::default();
        registry.register(
            "vault_requests",
            "Requests to Vault, by operation (login, kv_metadata, kv_data, kv_read, renew_self, lookup_self, revoke_self) and result (2xx, 403, 404, 5xx, no_answer...)",
            vault_requests.clone(),
        );
        let vault_logins = Family::<VaultLoginLabels, Counter>::default();
        registry.register(
            "vault_logins",
            "Logins to Vault, by auth method and result",
            vault_logins.clone(),
        );
        let vault_login_duration = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "vault_login_duration_seconds",
            "How long logins to Vault took",
            vault_login_duration.clone(),
        );
        let vault_token_ttl = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "vault_token_ttl_seconds",
            "The TTL of the Vault token at its last login or renewal (0: it does not expire)",
            vault_token_ttl.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            blocked,
            connections,
            open_connections,
            config_reloads,
            config_valid,
            secret_refreshes,
            secret_version,
            secret_last_success,
            secret_state,
            upstream_errors,
            audit_dropped,
            vault_requests,
            vault_logins,
            vault_login_duration,
            vault_token_ttl,
        }
    }

    pub fn vault_request(&self, op: &'static str, result: &'static str) {
        self.vault_requests
            .get_or_create(&VaultRequestLabels { op, result })
            .inc();
    }

    pub fn vault_login(&self, method: &'static str, ok: bool, took: std::time::Duration) {
        let result = if ok { "ok" } else { "error" };
        self.vault_logins
            .get_or_create(&VaultLoginLabels { method, result })
            .inc();
        if ok {
            self.vault_login_duration.observe(took.as_secs_f64());
        }
    }

    pub fn vault_token_ttl(&self, seconds: f64) {
        self.vault_token_ttl.set(seconds);
    }

    pub fn upstream_error(&self, step: &'static str) {
        self.upstream_errors
            .get_or_create(&StepLabels { step })
            .inc();
    }

    /// Drops the series of a binding that is gone from the config, so it
    /// no longer shows as ready (or anything else).
    pub fn forget_binding(&self, binding: &BindingLabel) {
        for state in SECRET_STATES {
            self.secret_state.remove(&StateLabels {
                binding: binding.clone(),
                state,
            });
        }
        self.secret_version.remove(&BindingOnly {
            binding: binding.clone(),
        });
        self.secret_last_success.remove(&BindingOnly {
            binding: binding.clone(),
        });
    }

    /// Adds the leaf-certificate cache's counters (read at each scrape).
    pub fn register_leaf_cache(&mut self, cache: Arc<LeafCertCache>) {
        self.registry
            .register_collector(Box::new(LeafCacheCollector(cache)));
    }

    pub fn request(
        &self,
        binding: &BindingLabel,
        decision: &'static str,
        status: u16,
        seconds: f64,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                binding: binding.clone(),
                decision,
                status,
            })
            .inc();
        self.request_duration
            .get_or_create(&DecisionLabels { decision })
            .observe(seconds);
    }

    pub fn blocked(&self, binding: &BindingLabel, reason: &'static str) {
        self.blocked
            .get_or_create(&BlockedLabels {
                binding: binding.clone(),
                reason,
            })
            .inc();
    }

    pub fn connection(&self, route: &'static str) {
        self.connections.get_or_create(&RouteLabels { route }).inc();
    }

    /// Counts a connection open until the guard drops.
    pub fn open_connection(self: &Arc<Self>) -> OpenConnection {
        self.open_connections.inc();
        OpenConnection(self.clone())
    }

    pub fn config_reload(&self, part: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.config_reloads
            .get_or_create(&ReloadLabels { part, result })
            .inc();
        self.config_valid
            .get_or_create(&PartLabels { part })
            .set(i64::from(ok));
    }

    pub fn secret_refreshed(&self, binding: &str, result: &'static str, version: Option<u64>) {
        let binding = BindingLabel(Arc::from(binding));
        self.secret_refreshes
            .get_or_create(&RefreshLabels {
                binding: binding.clone(),
                result,
            })
            .inc();
        if matches!(result, "unchanged" | "new_value") {
            if let Some(v) = version {
                self.secret_version
                    .get_or_create(&BindingOnly {
                        binding: binding.clone(),
                    })
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.secret_last_success
                .get_or_create(&BindingOnly { binding })
                .set(now);
        }
    }

    /// Sets the state gauges of a binding: 1 for `state`, 0 for the others.
    pub fn secret_state(&self, binding: &BindingLabel, state: &'static str) {
        for s in SECRET_STATES {
            self.secret_state
                .get_or_create(&StateLabels {
                    binding: binding.clone(),
                    state: s,
                })
                .set(i64::from(s == state));
        }
    }

    pub fn audit_dropped(&self) {
        self.audit_dropped.inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Writing to a String cannot fail; say so rather than serve half.
            out.clear();
            let _ = writeln!(out, "# encoding the metrics failed");
        }
        out
    }
}

/// Decrements the open-connection gauge on drop.
pub struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}

#[derive(Debug)]
struct LeafCacheCollector(Arc<LeafCertCache>);

impl prometheus_client::collector::Collector for LeafCacheCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let stats = self.0.stats();
        for (name, help, value) in [
            (
                "leaf_cache_hits",
                "Leaf certificates served from the cache",
                stats.hits,
            ),
            (
                "leaf_cache_mints",
                "Leaf certificates minted from the pod CA",
                stats.mints,
            ),
            (
                "leaf_cache_evictions",
                "Leaf certificates dropped to stay within the cache's capacity",
                stats.evictions,
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let gauge = ConstGauge::new(i64::try_from(stats.entries).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "leaf_cache_entries",
            "Leaf certificates held now",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_names_with_labels() {
        let m = Metrics::new();
        let b = BindingLabel(Arc::from("openai"));
        m.request(&b, "injected", 200, 0.002);
        m.blocked(&b, "destination_not_bound");
        m.config_reload("bindings", false);
        m.secret_refreshed("openai", "new_value", Some(7));
        m.secret_state(&b, "ready");
        let text = m.render();
        for want in [
            r#"credbroker_sidecar_requests_total{binding="openai",decision="injected",status="200"} 1"#,
            r#"credbroker_sidecar_blocked_total{binding="openai",reason="destination_not_bound"} 1"#,
            r#"credbroker_sidecar_config_reloads_total{part="bindings",result="error"} 1"#,
            r#"credbroker_sidecar_config_last_load_ok{part="bindings"} 0"#,
            r#"credbroker_sidecar_secret_version{binding="openai"} 7"#,
            r#"credbroker_sidecar_secret_state{binding="openai",state="ready"} 1"#,
            "credbroker_sidecar_request_duration_seconds_bucket",
        ] {
            assert!(text.contains(want), "{want} not in:\n{text}");
        }
    }
}
