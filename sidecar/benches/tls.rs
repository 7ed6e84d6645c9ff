//! Leaf certificate minting, cold and cached (DESIGN.md section 7: a cold
//! leaf in at most 1 ms). Figures are reported, never asserted.
//!
//! `cargo bench -p credbroker-sidecar --bench tls`

// A benchmark is a test harness: failing setup should stop it loudly.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use credbroker_sidecar::tls::{LeafCertCache, LeafPolicy, PodCa};
use criterion::{Criterion, criterion_group, criterion_main};

fn leaf(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca = Arc::new(PodCa::load_or_generate(dir.path()).expect("pod CA"));

    let mut group = c.benchmark_group("leaf");
    // Cold: a policy under which every leaf is due for renewal as soon as it
    // is minted, so each lookup pays key generation, signing and the insert,
    // exactly as a first handshake for a name does.
    let always_mint = LeafPolicy {
        renew_before: LeafPolicy::default().lifetime,
        ..LeafPolicy::default()
    };
    let cold = LeafCertCache::with_policy(ca.clone(), always_mint).expect("cache");
    group.bench_function("cold", |b| {
        b.iter(|| cold.get(black_box("api.example.test")).expect("leaf"))
    });

    let cached = LeafCertCache::new(ca.clone());
    cached.get("api.example.test").expect("leaf");
    group.bench_function("cached", |b| {
        b.iter(|| cached.get(black_box("api.example.test")).expect("leaf"))
    });
    // SNI in another case and with a trailing dot: the normalising path.
    group.bench_function("cached_unnormalised", |b| {
        b.iter(|| cached.get(black_box("API.example.test.")).expect("leaf"))
    });
    group.finish();

    c.bench_function("ca/load_on_restart", |b| {
        b.iter(|| PodCa::load_or_generate(black_box(dir.path())).expect("pod CA"))
    });
}

criterion_group!(benches, leaf);
criterion_main!(benches);
