//! The webhook's Prometheus metrics, every name prefixed
//! `credbroker_webhook_`, durations in seconds. Labels are outcomes, never
//! a pod's name or anything from its spec.
//!
//! The serving certificate's metrics are read from
//! [`ServingCert`] at each scrape (a collector), so every load is counted
//! wherever it happened (the provided files, the Secret) and the expiry is
//! that of the certificate served at that moment.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::certs::ServingCert;
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
    overloaded: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The metrics, the serving certificate's read from `serving`.
    pub fn new(serving: Arc<ServingCert>) -> Self {
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
            "Time to answer one admission review that could be read, from the request's last \
             byte to the answer",
            duration.clone(),
        );
        let overloaded = Counter::default();
        registry.register(
            "overloaded_requests",
            "Requests answered 503 because too many request bodies were being read at once",
            overloaded.clone(),
        );
        registry.register_collector(Box::new(ServingCertCollector(serving)));
        Self {
            registry,
            admissions,
            duration,
            overloaded,
        }
    }

    /// One review answered, `seconds` after its body was read.
    pub fn admission(&self, outcome: Outcome, seconds: f64) {
        self.count(outcome);
        self.duration.observe(seconds);
    }

    /// A body that could not be read (too large, cut off, too slow):
    /// counted as malformed, but kept out of the latency histogram, which
    /// measures answering a review, not a client's upload.
    pub fn malformed_body(&self) {
        self.count(Outcome::Malformed);
    }

    /// A request turned away because too many bodies were being read.
    pub fn overloaded(&self) {
        self.overloaded.inc();
    }

    fn count(&self, outcome: Outcome) {
        self.admissions
            .get_or_create(&ResultLabels {
                result: outcome.label(),
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

/// `serving_certificate_loads_total{result}` and
/// `serving_certificate_expiry_timestamp_seconds`, read at each scrape.
#[derive(Debug)]
struct ServingCertCollector(Arc<ServingCert>);

impl Collector for ServingCertCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let loads = self.0.loads();
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "serving_certificate_loads",
            "Serving-certificate pairs given to the server, by result (ok: swapped in; error: \
             refused, the previous pair kept serving)",
            None,
            counter.metric_type(),
        )?;
        for (result, n) in [("ok", loads.ok), ("error", loads.failed)] {
            let labels = ResultLabels { result };
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        // No sample before the first load: there is nothing to expire.
        let Some(not_after) = self.0.not_after() else {
            return Ok(());
        };
        let seconds = not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let gauge = ConstGauge::new(seconds);
        gauge.encode(encoder.encode_descriptor(
            "serving_certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate served now (Unix time)",
            None,
            gauge.metric_type(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_pair() -> (String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["webhook.test".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2051, 12, 31);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn unreadable_bodies_are_counted_but_not_timed() {
        let metrics = Metrics::new(ServingCert::new());
        metrics.malformed_body();
        metrics.admission(Outcome::Injected, 0.01);
        let text = metrics.render();
        assert!(
            text.contains("credbroker_webhook_admissions_total{result=\"malformed\"} 1"),
            "{text}"
        );
        assert_eq!(
            line(&text, "credbroker_webhook_admission_duration_seconds_count"),
            Some("credbroker_webhook_admission_duration_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn certificate_loads_and_expiry_are_read_from_the_serving_certificate() {
        let serving = ServingCert::new();
        let metrics = Metrics::new(serving.clone());
        let text = metrics.render();
        assert!(
            text.contains("credbroker_webhook_serving_certificate_loads_total{result=\"ok\"} 0"),
            "{text}"
        );
        assert!(
            line(&text, "credbroker_webhook_serving_certificate_expiry").is_none(),
            "{text}"
        );

        let (crt, key) = pem_pair();
        serving.set_pem(&crt, &key).unwrap();
        assert!(serving.set_pem(&crt, "not a key").is_err());
        serving.set_pem(&crt, &key).unwrap();
        let text = metrics.render();
        assert!(
            text.contains("credbroker_webhook_serving_certificate_loads_total{result=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("credbroker_webhook_serving_certificate_loads_total{result=\"error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE credbroker_webhook_serving_certificate_loads counter"),
            "{text}"
        );
        // 2051-12-31T00:00:00Z
        assert_eq!(
            line(
                &text,
                "credbroker_webhook_serving_certificate_expiry_timestamp_seconds "
            ),
            Some("credbroker_webhook_serving_certificate_expiry_timestamp_seconds 2587593600"),
            "{text}"
        );
    }
}
