//! `make demo` as a test: demo/run.sh against a real OpenBao, the built
//! broker and the demo upstream, then a check of where the secret's two
//! values showed up. They may appear in the step-1 `bao kv get` output and
//! in the upstream's lines, and nowhere else: not in what the agent sent or
//! got, not in the narration, not in the broker's log or audit records.
//!
//! The broker is another package's binary, which Cargo names to no test but
//! its own package's (artifact dependencies are unstable). It is found beside
//! this package's binary (`<target>/<profile>/credbroker-sidecar`), which
//! `cargo test --workspace` (and so `make test`) builds in the same run; a
//! missing or out-of-date one fails the test with the command that builds
//! it, judged from Cargo's own list of its sources (`credbroker-sidecar.d`).
//! `DEMO_SIDECAR_BIN` names another one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;

/// Far more than the demo takes (a few seconds): a hung demo is stopped and
/// its output shown.
const TIMEOUT: Duration = Duration::from_secs(120);
const UPSTREAM: &str = env!("CARGO_BIN_EXE_credbroker-demo-upstream");
const RUN_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/run.sh");

#[test]
#[ignore = "needs OpenBao (bao): run make setup"]
fn the_demo_runs_its_five_steps_and_the_values_reach_only_the_upstream() {
    let bao = bao();
    let sidecar = sidecar();
    let dir = tempfile::tempdir().unwrap();
    let broker_log = dir.path().join("broker.log");
    let output_file = dir.path().join("output");
    let v1 = format!("demo-key-v1-{}", random_hex());
    let v2 = format!("demo-key-v2-{}", random_hex());

    let output = File::create(&output_file).unwrap();
    let mut demo = Command::new(RUN_SH)
        .env("CREDBROKER_BAO", &bao)
        .env("DEMO_SIDECAR_BIN", &sidecar)
        .env("DEMO_UPSTREAM_BIN", UPSTREAM)
        .env("DEMO_BROKER_LOG", &broker_log)
        .env("DEMO_KEY_V1", &v1)
        .env("DEMO_KEY_V2", &v2)
        .stdin(Stdio::null())
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {RUN_SH}: {e}"));
    let status = wait_or_stop(&mut demo, &output_file);
    let output = std::fs::read_to_string(&output_file).unwrap();
    assert!(status.success(), "demo/run.sh failed ({status}):\n{output}");

    let lines = by_step(&output);
    for step in 1..=5 {
        assert!(
            output.contains(&format!("\n==> step {step}/5: ")),
            "no step {step} in:\n{output}"
        );
    }
    assert!(output.contains("\n==> done."), "no ending in:\n{output}");

    // Where each value may be, and where it must be.
    for (step, line) in &lines {
        let from_upstream = line.trim_start().starts_with("upstream: received ");
        if line.contains(&v1) {
            assert!(
                *step == 1 || from_upstream,
                "the first value shows outside the step-1 `bao kv get` and the upstream's lines \
                 (step {step}): {line:?}\n{output}"
            );
        }
        if line.contains(&v2) {
            assert!(
                from_upstream,
                "the second value shows outside the upstream's lines (step {step}): \
                 {line:?}\n{output}"
            );
        }
    }
    let in_step = |n: u32, pred: &dyn Fn(&str) -> bool| {
        lines.iter().any(|(step, line)| *step == n && pred(line))
    };
    assert!(
        in_step(1, &|l| l.trim_start().starts_with("api_key")
            && l.contains(&v1)),
        "step 1 does not show the secret as bao has it:\n{output}"
    );
    assert!(
        in_step(3, &|l| l.contains("agent sends:")) && in_step(3, &|l| l.contains("agent got:")),
        "step 3 does not show what the agent sent and got:\n{output}"
    );
    assert!(
        in_step(3, &|l| l.contains("Authorization: Bearer sk-demo-")),
        "step 3 does not show the agent's placeholder:\n{output}"
    );
    let upstream_got = |n: u32, value: &str| {
        let bearer = format!("Bearer {value}");
        in_step(n, &|l| {
            l.trim_start().starts_with("upstream: received ") && l.contains(&bearer)
        })
    };
    assert!(
        upstream_got(3, &v1),
        "in step 3 the upstream did not get the first value:\n{output}"
    );
    assert!(
        upstream_got(5, &v2),
        "in step 5 the upstream did not get the rotated value:\n{output}"
    );
    assert!(
        in_step(5, &|l| l.contains("ms after the write")),
        "step 5 does not say how long the rotation took:\n{output}"
    );

    let log = std::fs::read_to_string(&broker_log)
        .unwrap_or_else(|e| panic!("reading the broker's log {}: {e}", broker_log.display()));
    assert!(
        log.contains(r#""kind":"audit""#),
        "the broker's log has no audit records; is it the right file?\n{log}"
    );
    for value in [&v1, &v2] {
        for (encoding, form) in encodings(value) {
            assert!(
                !log.contains(&form),
                "the broker's log holds a secret value ({encoding}):\n{log}"
            );
        }
    }
}

/// `$CREDBROKER_BAO`, which `make setup` provides; without it the test fails.
fn bao() -> PathBuf {
    const HOW: &str = "run `make setup`, then `set -a; source target/credbroker-test.env; set +a` \
                       in the shell that runs cargo test (`make test` does both)";
    let Some(path) = std::env::var_os("CREDBROKER_BAO") else {
        panic!("CREDBROKER_BAO is not set: the demo needs OpenBao's bao binary; {HOW}");
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "CREDBROKER_BAO={} is not a file; {HOW}",
        path.display()
    );
    path
}

/// The broker binary: `$DEMO_SIDECAR_BIN`, else the one beside this
/// package's binary, checked to be there and built from the current sources.
fn sidecar() -> PathBuf {
    if let Some(path) = std::env::var_os("DEMO_SIDECAR_BIN") {
        return PathBuf::from(path);
    }
    const BUILD: &str = "build it with `cargo build -p credbroker-sidecar` \
                         (`make test` and `cargo test --workspace` do), or name one in DEMO_SIDECAR_BIN";
    let dir = Path::new(UPSTREAM)
        .parent()
        .expect("a binary lives in a folder");
    let binary = dir.join("credbroker-sidecar");
    let built = modified(&binary)
        .unwrap_or_else(|e| panic!("the broker {} is missing ({e}); {BUILD}", binary.display()));
    // Cargo's dep-info for the binary lists every source file it was built
    // from; one changed since means the binary is stale.
    if let Ok(deps) = std::fs::read_to_string(dir.join("credbroker-sidecar.d")) {
        for source in dep_info_sources(&deps) {
            if modified(&source).is_ok_and(|changed| changed > built) {
                panic!(
                    "the broker {} is older than {}; {BUILD}",
                    binary.display(),
                    source.display()
                );
            }
        }
    }
    binary
}

fn modified(path: &Path) -> std::io::Result<SystemTime> {
    std::fs::metadata(path)?.modified()
}

/// The prerequisites of the first rule of a Makefile-style dep-info file
/// (`target: src1 src2`, spaces in names escaped as `\ `).
fn dep_info_sources(deps: &str) -> Vec<PathBuf> {
    let Some(first) = deps.lines().next() else {
        return Vec::new();
    };
    let Some((_, sources)) = first.split_once(": ") else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    let mut current = String::new();
    let mut chars = sources.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                current.push(' ');
                chars.next();
            }
            ' ' => {
                if !current.is_empty() {
                    paths.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        paths.push(PathBuf::from(current));
    }
    paths
}

/// Waits for the demo; one that outlives [`TIMEOUT`] is stopped (SIGTERM,
/// so its trap stops what it started) and the test fails with its output.
fn wait_or_stop(demo: &mut Child, output: &Path) -> ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = demo.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(demo.id()).unwrap());
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let stopping = Instant::now() + Duration::from_secs(20);
    while Instant::now() < stopping && demo.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = demo.kill();
    let _ = demo.wait();
    panic!(
        "demo/run.sh did not finish within {TIMEOUT:?}; its output:\n{}",
        std::fs::read_to_string(output).unwrap_or_default()
    );
}

/// Each line with the step it is under (0 before step 1).
fn by_step(output: &str) -> Vec<(u32, &str)> {
    let mut step = 0;
    output
        .lines()
        .map(|line| {
            if let Some(n) = line
                .strip_prefix("==> step ")
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(n, _)| n.parse().ok())
            {
                step = n;
            }
            (step, line)
        })
        .collect()
}

/// The forms a leaked value would most likely take in a log.
fn encodings(value: &str) -> [(&'static str, String); 4] {
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(value);
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value);
    let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
    [
        ("raw", value.to_string()),
        ("base64", b64),
        ("base64url", b64url),
        ("hex", hex),
    ]
}

fn random_hex() -> String {
    format!("{:016x}", RandomState::new().build_hasher().finish())
}

#[test]
fn dep_info_lists_the_sources_of_the_binary() {
    let deps = "/t/debug/bin: /w/a.rs /w/with\\ space.rs  /w/b.rs\n\n/w/a.rs:\n";
    assert_eq!(
        dep_info_sources(deps),
        [
            PathBuf::from("/w/a.rs"),
            PathBuf::from("/w/with space.rs"),
            PathBuf::from("/w/b.rs")
        ]
    );
    assert!(dep_info_sources("").is_empty());
}

#[test]
fn lines_are_grouped_under_their_step() {
    let output = "setup\n==> step 1/5: a\nx\n==> step 2/5: b\ny\n";
    assert_eq!(
        by_step(output),
        [
            (0, "setup"),
            (1, "==> step 1/5: a"),
            (1, "x"),
            (2, "==> step 2/5: b"),
            (2, "y")
        ]
    );
}
