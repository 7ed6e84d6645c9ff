//! Admission latency (issue 6's benchmark): the real `credbroker-webhook`
//! (provided-certificate mode, watching a real kube-apiserver's
//! CredentialBindings) answers AdmissionReviews over HTTPS keep-alive, sent
//! open-loop at a fixed rate (default 200/s) on several connections, as
//! the API server would. Prints latency p50, p99 and p99.9 as the client
//! sees it (TLS, HTTP and the answer), the webhook's own histogram, and its
//! memory. Figures are reported, not asserted (target p99 <= 5 ms).
//!
//! `cargo bench -p credbroker-webhook --bench admission` with the test
//! environment loaded (`set -a; source target/credbroker-test.env`).
//! BENCH_RATE, BENCH_SECONDS and BENCH_CONNECTIONS change the load.

// The figures are the output.
#![allow(clippy::print_stdout)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use credbroker_test_support::apiserver::{Cluster, TestApiServer};
use credbroker_test_support::pki::TestCa;
use credbroker_test_support::process::ChildGuard;
use credbroker_test_support::{Failure, TestResult, free_port, wait_until};
use http_body_util::{BodyExt, Full};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn review(i: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("bench-{i}"),
            "namespace": "agents",
            "operation": "CREATE",
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "generateName": "agent-", "namespace": "agents",
                              "annotations": { "credbroker.dev/inject": "true" },
                              "labels": { "app": "research", "pod-template-hash": "7d9f8c" } },
                "spec": {
                    "serviceAccountName": "research-agent",
                    "containers": [ {
                        "name": "agent", "image": "python:3.13-slim",
                        "command": ["python", "/app/agent.py"],
                        "env": [ { "name": "LOG_LEVEL", "value": "info" } ],
                        "resources": { "requests": { "cpu": "500m", "memory": "512Mi" } },
                        "volumeMounts": [ { "name": "kube-api-access-x7k2p",
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true } ]
                    } ],
                    "volumes": [ { "name": "kube-api-access-x7k2p", "projected": { "sources": [
                        { "serviceAccountToken": { "expirationSeconds": 3607, "path": "token" } },
                        { "configMap": { "name": "kube-root-ca.crt", "items": [ { "key": "ca.crt", "path": "ca.crt" } ] } }
                    ] } } ]
                }
            }
        }
    }))
    .unwrap_or_default()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> TestResult {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary with nothing to say it is a bench run: then it does nothing.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench())
}

async fn bench() -> TestResult {
    let rate = env_u64("BENCH_RATE", 200).max(1);
    let seconds = env_u64("BENCH_SECONDS", 30).max(1);
    let connections = env_u64("BENCH_CONNECTIONS", 4).max(1);
    credbroker_test_support::install_crypto_provider();

    let server = TestApiServer::start().await?;
    let cluster = Cluster::new(server.client().await?);
    cluster.create_namespace("credbroker-system", &[]).await?;
    cluster.create_namespace("agents", &[]).await?;
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/generated");
    cluster
        .install_crds(&[crds.join("credbroker.dev_credentialbindings.yaml")])
        .await?;
    // The two bindings of the golden files, as the team applies them.
    let published = credbroker_crds::config::SidecarBindings::from_json(&std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/bindings.json"),
    )?)
    .map_err(|e| Failure(e.to_string()))?;
    let api =
        Api::<credbroker_crds::CredentialBinding>::namespaced(cluster.client.clone(), "agents");
    for b in published.bindings {
        let binding: credbroker_crds::CredentialBinding = serde_json::from_value(json!({
            "apiVersion": "credbroker.dev/v1alpha1", "kind": "CredentialBinding",
            "metadata": { "name": b.id, "namespace": "agents" },
            "spec": {
                "serviceAccountName": "research-agent",
                "source": { "vault": b.secret },
                "placeholder": b.placeholder,
                "destinations": b.destinations.iter()
                    .map(|d| json!({ "host": d.host, "port": d.port })).collect::<Vec<_>>(),
            },
        }))?;
        api.create(&PostParams::default(), &binding).await?;
    }

    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("bench webhook CA")?;
    let cert = ca.issue_server(&["127.0.0.1"])?;
    std::fs::write(dir.path().join("tls.crt"), &cert.cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), &cert.key_pem)?;
    let (port, admin_port) = (free_port()?, free_port()?);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_credbroker-webhook"));
    cmd.args([
        "--namespace",
        "credbroker-system",
        "--sidecar-image",
        "sidecar:bench",
    ])
    .args([
        "--init-image",
        "init:bench",
        "--vault-addr",
        "https://vault:8200",
    ])
    .args(["--cert-mode", "provided", "--log-format", "json"])
    .arg(format!(
        "--tls-cert-file={}",
        dir.path().join("tls.crt").display()
    ))
    .arg(format!(
        "--tls-key-file={}",
        dir.path().join("tls.key").display()
    ))
    .arg(format!("--listen=127.0.0.1:{port}"))
    .arg(format!("--admin-addr=127.0.0.1:{admin_port}"))
    .env("KUBECONFIG", server.kubeconfig_path())
    // One line per admission at info would measure the log sink.
    .env("RUST_LOG", "warn");
    let webhook = ChildGuard::spawn("webhook", cmd)?;
    wait_until("the webhook ready", Duration::from_secs(30), || async {
        webhook.check_running().map_err(|e| e.to_string())?;
        let stream =
            std::net::TcpStream::connect(("127.0.0.1", admin_port)).map_err(|e| e.to_string())?;
        match credbroker_test_support::http_get(stream, "/readyz") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    let idle_rss = status_kib(webhook.pid(), "VmRSS:");

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.cert_der().clone())
        .map_err(|e| Failure(format!("the bench CA: {e}")))?;
    let tls = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let total = rate * seconds;
    let per_connection = total / connections;
    let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
                .map_err(|e| Failure(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| Failure(e.to_string()))?;
            tokio::spawn(conn);
            // Open loop: each request is due at its slot, whatever the
            // last one took (a late answer shows as latency, not as a
            // lower rate). Connections are staggered across the interval.
            let offset = interval.mul_f64(c as f64 / connections as f64);
            let mut latencies = Vec::with_capacity(per_connection as usize);
            let mut errors = 0u64;
            let begin = tokio::time::Instant::now() + offset;
            for i in 0..per_connection {
                let due = begin + interval.mul_f64(i as f64);
                tokio::time::sleep_until(due).await;
                let body = review(c * per_connection + i);
                let request = http::Request::post("/mutate")
                    .header("host", "127.0.0.1")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .map_err(|e| Failure(e.to_string()))?;
                let answer = send.send_request(request).await;
                let ok = match answer {
                    Ok(response) => {
                        let status = response.status();
                        let body = response.into_body().collect().await;
                        status.is_success()
                            && body.is_ok_and(|b| {
                                serde_json::from_slice::<serde_json::Value>(&b.to_bytes())
                                    .is_ok_and(|v| v["response"]["patchType"] == "JSONPatch")
                            })
                    }
                    Err(_) => false,
                };
                // From when it was due, so a queue behind a slow answer counts.
                latencies.push(due.elapsed());
                if !ok {
                    errors += 1;
                }
            }
            Ok::<_, Failure>((latencies, errors))
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.map_err(|e| Failure(e.to_string()))??;
        latencies.extend(l);
        errors += e;
    }
    let took = started.elapsed();
    latencies.sort();
    let peak = status_kib(webhook.pid(), "VmHWM:");
    let rss = status_kib(webhook.pid(), "VmRSS:");
    let metrics = {
        let stream = std::net::TcpStream::connect(("127.0.0.1", admin_port))?;
        credbroker_test_support::http_get(stream, "/metrics")?.1
    };
    let server_side: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("credbroker_webhook_admission_duration_seconds_"))
        .filter(|l| l.contains("_sum") || l.contains("_count"))
        .collect();
    println!(
        "admission: {} reviews at {rate}/s on {connections} connections over {:.1}s, {errors} errors",
        latencies.len(),
        took.as_secs_f64()
    );
    println!(
        "latency (client, from due time): p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        percentile(&latencies, 0.999).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!("server-side histogram: {}", server_side.join("; "));
    println!(
        "webhook memory: idle RSS {:.1} MiB, after the run RSS {:.1} MiB, peak {:.1} MiB",
        idle_rss as f64 / 1024.0,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    Ok(())
}
