//! The data plane's pure cores, per KiB (DESIGN.md section 7: p50 added
//! latency <= 0.1 ms per request): placeholder scanning with 1, 10 and 100
//! bindings, with and without a placeholder present, and echo detection.
//! Figures are reported, never asserted.
//!
//! `cargo bench -p credbroker-sidecar --bench data_plane`

// A benchmark is a test harness: failing setup should stop it loudly.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use bytes::Bytes;
use credbroker_sidecar::echo::{EchoDetector, EchoStream};
use credbroker_sidecar::secret::{Placeholder, SecretValue};
use credbroker_sidecar::substitute::{BodyReplacer, PlaceholderSet};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const KIB: usize = 1024;

/// A request or response body as an LLM API sees them: JSON text.
fn json_body(len: usize) -> Vec<u8> {
    let unit = br#"{"model":"gpt-x","messages":[{"role":"user","content":"Summarise the attached report in three bullet points, keeping numbers exact."}],"temperature":0.2,"stream":true}"#;
    unit.iter().copied().cycle().take(len).collect()
}

/// `n` bindings with random placeholders (as the webhook makes them) and
/// fake 40-byte values.
fn fixture(n: usize) -> (Vec<Placeholder>, Vec<Option<SecretValue>>) {
    let placeholders = (0..n)
        .map(|_| Placeholder::generate(Some("sk-")).expect("placeholder"))
        .collect();
    let secrets = (0..n)
        .map(|i| {
            Some(SecretValue::from_string(format!(
                "FAKE-{i:04}-aB3dE5gH7jK9mN1pQ3sT5vX7zZ"
            )))
        })
        .collect();
    (placeholders, secrets)
}

fn set_of(placeholders: &[Placeholder]) -> PlaceholderSet {
    PlaceholderSet::new(
        placeholders
            .iter()
            .enumerate()
            .map(|(i, p)| (i, "bench", p)),
    )
    .expect("placeholder set")
}

fn scanning(c: &mut Criterion) {
    let mut group = c.benchmark_group("placeholders_1KiB");
    group.throughput(Throughput::Bytes(KIB as u64));
    let clean = json_body(KIB);
    for n in [1, 10, 100] {
        let (placeholders, secrets) = fixture(n);
        let set = set_of(&placeholders);
        // One placeholder (the last binding's) in the middle of the body.
        let mut matching = clean[..KIB / 2].to_vec();
        matching.extend_from_slice(placeholders[n - 1].as_bytes());
        matching.extend_from_slice(&clean[KIB / 2 + placeholders[n - 1].as_bytes().len()..]);
        assert_eq!(matching.len(), KIB);

        group.bench_with_input(BenchmarkId::new("find_matchless", n), &n, |b, _| {
            b.iter(|| set.find(black_box(&clean)))
        });
        group.bench_with_input(BenchmarkId::new("find_matching", n), &n, |b, _| {
            b.iter(|| set.find(black_box(&matching)))
        });
        group.bench_with_input(BenchmarkId::new("replace_matchless", n), &n, |b, _| {
            b.iter(|| {
                let out = set.replace(black_box(&clean), &secrets).expect("replace");
                black_box(out.is_unchanged())
            })
        });
        group.bench_with_input(BenchmarkId::new("replace_matching", n), &n, |b, _| {
            b.iter(|| {
                let out = set
                    .replace(black_box(&matching), &secrets)
                    .expect("replace");
                black_box(out.expose_secret().len())
            })
        });
        let clean_bytes = Bytes::from(clean.clone());
        let matching_bytes = Bytes::from(matching.clone());
        group.bench_with_input(BenchmarkId::new("stream_matchless", n), &n, |b, _| {
            b.iter(|| {
                let mut r = BodyReplacer::replacing(&set, &secrets);
                let out = r.feed(clean_bytes.clone()).expect("feed");
                black_box((out, r.finish().expect("finish")))
            })
        });
        group.bench_with_input(BenchmarkId::new("stream_matching", n), &n, |b, _| {
            b.iter(|| {
                let mut r = BodyReplacer::replacing(&set, &secrets);
                let out = r.feed(matching_bytes.clone()).expect("feed");
                black_box((out, r.finish().expect("finish")))
            })
        });
    }
    group.finish();

    // Per header value: the common request, `Authorization: Bearer <ph>`.
    let mut group = c.benchmark_group("placeholders_header");
    for n in [1, 10, 100] {
        let (placeholders, secrets) = fixture(n);
        let set = set_of(&placeholders);
        let header = format!("Bearer {}", placeholders[n - 1]);
        group.bench_with_input(BenchmarkId::new("bearer", n), &n, |b, _| {
            b.iter(|| {
                let out = set
                    .replace_in_header(black_box(header.as_bytes()), &secrets)
                    .expect("replace");
                black_box(out.expose_secret().len())
            })
        });
        group.bench_with_input(BenchmarkId::new("content_type", n), &n, |b, _| {
            b.iter(|| {
                let out = set
                    .replace_in_header(black_box(b"application/json".as_slice()), &secrets)
                    .expect("replace");
                black_box(out.is_unchanged())
            })
        });
    }
    // Building the automaton: once per config load, never per request.
    for n in [1, 10, 100] {
        let (placeholders, _) = fixture(n);
        group.bench_with_input(BenchmarkId::new("build_set", n), &n, |b, _| {
            b.iter(|| set_of(black_box(&placeholders)))
        });
    }
    group.finish();
}

fn echoes(c: &mut Criterion) {
    let mut group = c.benchmark_group("echo_1KiB");
    group.throughput(Throughput::Bytes(KIB as u64));
    let clean = json_body(KIB);
    for n in [1, 10, 100] {
        let (_, secrets) = fixture(n);
        let detector = EchoDetector::new(
            secrets
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| (i, "bench", s))),
        )
        .expect("detector");
        let clean_bytes = Bytes::from(clean.clone());
        group.bench_with_input(BenchmarkId::new("check", n), &n, |b, _| {
            b.iter(|| detector.check(black_box(&clean)))
        });
        group.bench_with_input(BenchmarkId::new("stream", n), &n, |b, _| {
            b.iter(|| {
                let mut s = EchoStream::new(&detector);
                let out = s.feed(clean_bytes.clone()).expect("no echo");
                black_box((out, s.finish().expect("no echo")))
            })
        });
    }
    group.finish();

    // A long streamed response in 16 KiB chunks, the held-back bytes of
    // each chunk carried into the next (the copying path).
    let mut group = c.benchmark_group("echo_stream_256KiB");
    group.throughput(Throughput::Bytes(256 * KIB as u64));
    let chunks: Vec<Bytes> = json_body(256 * KIB)
        .chunks(16 * KIB)
        .map(Bytes::copy_from_slice)
        .collect();
    for n in [1, 10] {
        let (_, secrets) = fixture(n);
        let detector = EchoDetector::new(
            secrets
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| (i, "bench", s))),
        )
        .expect("detector");
        group.bench_with_input(BenchmarkId::new("chunks_16KiB", n), &n, |b, _| {
            b.iter(|| {
                let mut s = EchoStream::new(&detector);
                for c in &chunks {
                    black_box(s.feed(c.clone()).expect("no echo"));
                }
                black_box(s.finish().expect("no echo"))
            })
        });
    }
    group.finish();

    // Building the detector: once per secret rotation.
    let mut group = c.benchmark_group("echo_build");
    for n in [1, 10, 100] {
        let (_, secrets) = fixture(n);
        group.bench_with_input(BenchmarkId::new("build_detector", n), &n, |b, _| {
            b.iter(|| {
                EchoDetector::new(
                    secrets
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| s.as_ref().map(|s| (i, "bench", s))),
                )
                .expect("detector")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, scanning, echoes);
criterion_main!(benches);
