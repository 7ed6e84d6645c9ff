//! How the controller scales (issue 5's benchmark): 1,000 bindings across
//! 100 service accounts on a real kube-apiserver and a real OpenBao.
//! Prints the time to converge, the Vault writes it took, the writes and
//! time of a full resync afterwards (target: zero writes), and the
//! controller's memory. Figures are reported, not asserted.
//!
//! `cargo bench -p credbroker-controller --bench converge` with the test
//! environment loaded (`set -a; source target/credbroker-test.env`).
//! BENCH_BINDINGS and BENCH_ACCOUNTS change the size.

// The figures are the output.
#![allow(clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use credbroker_crds::CredentialBinding;
use kube::api::{Api, ListParams};
use support::*;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Policy, role and metadata reads so far.
fn vault_reads(ctl: &Controller) -> TestResult<u64> {
    let mut total = 0;
    for op in ["policy_read", "role_read", "metadata_read"] {
        total += ctl.counter(
            "credbroker_controller_vault_requests_total",
            &format!("op=\"{op}\""),
        )?;
    }
    Ok(total)
}

async fn count_ready(env: &Env) -> TestResult<usize> {
    let all = Api::<CredentialBinding>::all(env.client())
        .list(&ListParams::default())
        .await?;
    Ok(all
        .items
        .iter()
        .filter(|b| {
            b.status.as_ref().is_some_and(|s| {
                s.observed_generation == b.metadata.generation
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .count())
}

async fn bench() -> TestResult {
    let bindings = env_usize("BENCH_BINDINGS", 1000);
    let accounts = env_usize("BENCH_ACCOUNTS", 100).max(1);
    let namespaces = (accounts / 10).max(1);
    let mut env = Env::start("bench").await?;
    let ctl = env
        .controller(
            "ctl-bench",
            &["--resync-interval", "1h", "--sweep-interval", "1h"],
        )
        .await?;
    env.apply_policy(
        "bench",
        policy_spec("bench", "bench/", &["api.example.com"]),
    )
    .await?;
    for n in 0..namespaces {
        env.namespace(&format!("bench-{n}"), &[("team", "bench")])
            .await?;
    }
    for a in 0..accounts {
        env.cluster
            .create_service_account(&format!("bench-{}", a % namespaces), &format!("sa-{a}"))
            .await?;
    }
    let started = Instant::now();
    // The secrets, eight `bao` processes at a time (not part of the figure).
    let mut pending: Vec<usize> = (0..bindings).collect();
    while !pending.is_empty() {
        let batch: Vec<usize> = pending.drain(..pending.len().min(8)).collect();
        let mut children = Vec::new();
        for i in batch {
            let mut cmd = env.vault.bao_command();
            cmd.args([
                "kv",
                "put",
                "-mount=secret",
                &format!("bench/s{i}"),
                &format!("api_key=bench-value-{i}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
            children.push(cmd.spawn()?);
        }
        for mut child in children {
            let status = child.wait()?;
            if !status.success() {
                return Err(Failure(format!("bao kv put failed: {status}")));
            }
        }
    }
    let secrets_took = started.elapsed();
    let writes_before = ctl.vault_writes()?;
    let started = Instant::now();
    for i in 0..bindings {
        let a = i % accounts;
        let ns = format!("bench-{}", a % namespaces);
        env.apply_binding(
            &ns,
            &format!("b{i}"),
            binding_spec(
                &format!("sa-{a}"),
                &format!("bench/s{i}"),
                &format!("KEY_{i}"),
                "api.example.com",
            ),
        )
        .await?;
    }
    let applied = started.elapsed();
    loop {
        let ready = count_ready(&env).await?;
        if ready == bindings {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(Failure(format!(
                "only {ready} of {bindings} Ready after 10 minutes"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = started.elapsed();
    let writes = ctl.vault_writes()? - writes_before;
    let rss_converged = rss_kib(ctl.process.pid());

    let reads_converged = vault_reads(&ctl)?;
    // A full resync: a policy change re-evaluates every binding.
    let reconciles = ctl.counter("credbroker_controller_reconciles_total", "")?;
    let started = Instant::now();
    let mut spec = policy_spec("bench", "bench/", &["api.example.com"]);
    spec["allow"][0]["destinations"] = serde_json::json!(["api.example.com", "unused.example.com"]);
    env.apply_policy("bench", spec).await?;
    loop {
        let now = ctl.counter("credbroker_controller_reconciles_total", "")?;
        if now >= reconciles + bindings as u64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(Failure(format!(
                "the resync reconciled only {} of {bindings}",
                now - reconciles
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resync = started.elapsed();
    let resync_writes = ctl.vault_writes()? - writes_before - writes;
    let rss_after = rss_kib(ctl.process.pid());
    let errors: Vec<String> = ctl
        .metrics()?
        .lines()
        .filter(|l| l.starts_with("credbroker_controller_reconcile_errors_total"))
        .map(str::to_owned)
        .collect();
    let resync_reads = vault_reads(&ctl)? - reads_converged;
    println!(
        "controller convergence: {bindings} bindings across {accounts} service accounts in {namespaces} namespaces"
    );
    println!("  secrets written beforehand in {secrets_took:.1?} (not counted)");
    println!("  bindings applied in {applied:.1?}; all Ready after {converged:.1?}");
    println!(
        "  Vault writes to converge: {writes} (the minimum is {} : a policy and a role per account)",
        2 * accounts
    );
    println!("  full resync: {bindings} reconciles in {resync:.1?}, {resync_writes} Vault writes");
    println!("  reconcile errors: {errors:?}");
    println!(
        "  Vault reads (policy, role, metadata): {reads_converged} to converge, {resync_reads} in the resync"
    );
    println!(
        "  controller RSS: {} KiB converged, {} KiB after the resync",
        rss_converged, rss_after
    );
    env.secrets.clear();
    Ok(())
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing to
    // run: only a real bench run does the work.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("converge: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(bench()) {
        eprintln!("converge: {e:?}");
        std::process::exit(1);
    }
}
