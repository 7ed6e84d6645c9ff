//! One request head through the sidecar's per-request decision and rewrite
//! ([`credbroker_sidecar::exchange::plan::plan`]): the part of the added latency
//! that is ours, not the network's or TLS's (DESIGN.md section 7: p50 added
//! latency <= 0.1 ms). With 1, 10 and 100 bindings, a head that carries a
//! placeholder (swapped) and one that carries none.
//!
//! `cargo bench -p credbroker-sidecar --bench request`

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use credbroker_crds::config::{PodPlaceholders, SidecarBindings};
use credbroker_sidecar::config::EgressMode;
use credbroker_sidecar::echo::EchoDetector;
use credbroker_sidecar::engine::{Slot, Snapshot};
use credbroker_sidecar::exchange::plan::{ConnFacts, plan};
use credbroker_sidecar::metrics::BindingLabel;
use credbroker_sidecar::secret::Placeholder;
use credbroker_sidecar::store::{Secret, SecretState};
use credbroker_sidecar::substitute::PlaceholderSet;
use credbroker_sidecar::tls::UpstreamTls;
use credbroker_sidecar::upstream::{DestinationTrust, UpstreamSettings, Upstreams};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn snapshot(n: usize) -> (Snapshot, Vec<String>) {
    let bindings: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "id": format!("b{i}"),
                "secret": {"mount": "secret", "path": format!("p{i}"), "key": "k"},
                "destinations": [{"host": format!("api{i}.example.com"), "methods": ["POST"], "paths": ["/v1/*"]}],
            })
        })
        .collect();
    let bindings = SidecarBindings::from_json(
        &serde_json::json!({"formatVersion": 1, "bindings": bindings}).to_string(),
    )
    .unwrap()
    .bindings;
    let placeholders: Vec<String> = (0..n)
        .map(|_| Placeholder::generate(Some("sk-")).unwrap().to_string())
        .collect();
    let pod = PodPlaceholders(
        bindings
            .iter()
            .zip(&placeholders)
            .map(|(b, p)| (b.id.clone(), p.clone()))
            .collect(),
    );
    let set = PlaceholderSet::from_config(&bindings, &pod).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = credbroker_sidecar::tls::PodCa::load_or_generate(dir.path())
        .unwrap()
        .cert_der()
        .clone();
    let tls = Arc::new(UpstreamTls::new(&[ca], &[]).unwrap());
    let settings = UpstreamSettings::for_tests();
    let secrets = (0..n)
        .map(|i| {
            Slot::State(SecretState::Ready(Secret::usable_for(
                format!("FAKE-{i:04}-aB3dE5gH7jK9mN1pQ3sT5vX7zZ").as_bytes(),
                Some(1),
                Duration::from_secs(3600),
            )))
        })
        .collect();
    let snapshot = Snapshot {
        labels: bindings
            .iter()
            .map(|b| BindingLabel(Arc::from(b.id.as_str())))
            .collect(),
        bindings,
        placeholders: Arc::new(set),
        secrets,
        echo: Arc::new(EchoDetector::empty()),
        upstreams: Arc::new(Upstreams::new(tls, DestinationTrust::default(), settings)),
    };
    (snapshot, placeholders)
}

/// A typical LLM API call's head.
fn head(host: &str, auth: &str) -> http::request::Parts {
    http::Request::post("/v1/chat/completions")
        .header("host", host)
        .header("authorization", auth)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .header("user-agent", "openai-python/1.50.0")
        .header("x-stainless-lang", "python")
        .header("accept-encoding", "gzip, deflate")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn planning(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_head");
    // `tokio::time::Instant` (used for staleness) needs no runtime, but keep
    // one entered so the bench measures what the proxy runs.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    for n in [1, 10, 100] {
        let (snapshot, placeholders) = snapshot(n);
        let last = n - 1;
        let host = format!("api{last}.example.com");
        let conn = ConnFacts {
            sni: Some(&host),
            port: 443,
            original: None,
            tunnel_host: None,
            proxy_form: false,
            egress: EgressMode::Passthrough,
        };
        let with = format!("Bearer {}", placeholders[last]);
        group.bench_with_input(BenchmarkId::new("swap", n), &n, |b, _| {
            b.iter_batched(
                || head(&host, &with),
                |mut parts| black_box(plan(&mut parts, false, &conn, &snapshot).is_ok()),
                criterion::BatchSize::SmallInput,
            )
        });
        group.bench_with_input(BenchmarkId::new("no_placeholder", n), &n, |b, _| {
            b.iter_batched(
                || head(&host, "Bearer not-a-placeholder"),
                |mut parts| black_box(plan(&mut parts, false, &conn, &snapshot).is_ok()),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, planning);
criterion_main!(benches);
