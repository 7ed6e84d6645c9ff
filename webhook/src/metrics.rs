//! The webhook's Prometheus metrics, every name prefixed
//! `credbroker_webhook_`, durations in seconds. Labels are outcomes, never
//! a pod's name or anything from its spec.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::review::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    admissions: Family<ResultLabels, Counter>,
    duration: Histogram,
    cert_reloads: Family<ResultLabels, Counter>,
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
        let mut registry = Registry::with_prefix("credbroker_webhook");
        let admissions = Family::<ResultLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission reviews answered, by result (injected, already_injected, skipped, \
             refused, malformed)",
            admissions.clone(),
        );
        // 50 us to ~1.6 s.
        let duration = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        registry.register(
            "admission_duration_seconds",
            "Time to answer one admission review, from the request's last byte to the answer",
            duration.clone(),
        );
        let cert_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "serving_certificate_loads",
            "Serving-certificate loads, by result (ok, error)",
            cert_reloads.clone(),
        );
        Self {
            registry,
            admissions,
            duration,
            cert_reloads,
        }
    }

    pub fn admission(&self, outcome: Outcome, seconds: f64) {
        self.admissions
            .get_or_create(&ResultLabels {
                result: outcome.label(),
            })
            .inc();
        self.duration.observe(seconds);
    }

    pub fn certificate_loaded(&self, ok: bool) {
        self.cert_reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            return "# encoding the metrics failed\n".into();
        }
        out
    }
}

impl credbroker_controller::admin::RenderMetrics for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
}
