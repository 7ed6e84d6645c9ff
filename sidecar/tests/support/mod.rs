//! A broker pod on real parts, for the sidecar's acceptance tests:
//!
//! - a "pod" network namespace with the rules the real
//!   `credbroker-sidecar init` applies, and a "far" namespace beyond it,
//!   joined by a veth (IPv4 and IPv6);
//! - dnsmasq in the far namespace, answering the test's names with the far
//!   side's addresses, as the pod's resolver;
//! - the real `credbroker-sidecar proxy` (or `local`) running in the pod
//!   as the proxy UID, with files laid out as in a pod (bindings,
//!   placeholders, a file secret source, CA and trust directories);
//! - agent commands (curl) run in the pod as UID 2000;
//! - recording TLS upstreams served in the far namespace.
//!
//! Everything is torn down on drop.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use credbroker_sidecar::init::{DEFAULT_PROXY_GID, DEFAULT_PROXY_UID};
use credbroker_test_support::dns::Dns;
use credbroker_test_support::netns::{IpFamily, Netns, NetnsPair, RunAs};
use credbroker_test_support::process::ChildGuard;
use credbroker_test_support::upstream::{Behaviour, Upstream};

pub const SIDECAR: &str = env!("CARGO_BIN_EXE_credbroker-sidecar");
pub const AGENT: RunAs = RunAs::new(2000, 2000);
pub const PROXY: RunAs = RunAs::new(DEFAULT_PROXY_UID, DEFAULT_PROXY_GID);
pub const ADMIN_PORT: u16 = credbroker_sidecar::run::DEFAULT_ADMIN_PORT;
pub const LOCAL_PORT: u16 = 15080;

pub use credbroker_test_support::{Failure, TestResult};

/// What curl saw.
#[derive(Debug, Clone)]
pub struct Curl {
    /// 0 when curl failed before a response.
    pub status: u16,
    pub body: String,
    /// The response headers, as curl's JSON.
    pub headers: String,
    pub stderr: String,
    pub exit: i32,
    /// `%{http_version}`.
    pub version: String,
}

impl Curl {
    pub fn all_text(&self) -> String {
        format!("{}\n{}\n{}", self.body, self.headers, self.stderr)
    }
}

/// A random placeholder shaped like the webhook's.
pub fn placeholder(prefix: &str) -> String {
    credbroker_sidecar::secret::Placeholder::generate(Some(prefix))
        .unwrap()
        .to_string()
}

/// A random secret value that can be told apart from anything else in a log.
pub fn secret_value(name: &str) -> String {
    format!("real-{name}-{}", placeholder("v"))
}

/// The addresses a DNS name gets, from the far side's IPv4 and IPv6.
pub type AddressesOf = fn(IpAddr, IpAddr) -> Vec<IpAddr>;

pub struct Pod {
    // Fields drop in this order: the sidecar goes first, then its files,
    // then the resolver and the namespaces.
    sidecar: Option<ChildGuard>,
    dir: tempfile::TempDir,
    pub dns: Dns,
    pub pair: NetnsPair,
    /// Output of sidecar processes that have ended.
    past_output: String,
    /// Every secret value this pod was given, for leak scans.
    pub secrets: Vec<String>,
    /// What agents saw (bodies, headers, errors), for leak scans.
    agent_saw: std::sync::Mutex<String>,
}

impl Pod {
    /// A pod whose resolver answers each of `names` with the far side's
    /// addresses, with the real `init` rules applied.
    pub async fn new(names: &[&str]) -> TestResult<Self> {
        Self::with_records(names, &[]).await
    }

    /// A pod whose resolver answers each of `names` with both of the far
    /// side's addresses, and each of `records` with the addresses given
    /// (as functions of the far side's IPv4 and IPv6).
    pub async fn with_records(names: &[&str], records: &[(&str, AddressesOf)]) -> TestResult<Self> {
        credbroker_test_support::raise_fd_limit()?;
        let pair = NetnsPair::new()?;
        let far = pair.b();
        let (v4, v6): (IpAddr, IpAddr) = (far.ipv4().into(), far.ipv6().into());
        let mut all: Vec<(&str, Vec<IpAddr>)> = names.iter().map(|n| (*n, vec![v4, v6])).collect();
        all.extend(records.iter().map(|(n, f)| (*n, f(v4, v6))));
        let mut dns = Dns::start(far.netns(), v4, &all)?;
        dns.serve(pair.a().netns())?;
        let dir = credbroker_test_support::shared_scratch_dir("pod")?;
        for (sub, mode, owner) in [
            ("config", 0o755, None),
            ("secrets", 0o700, Some(PROXY)),
            ("ca", 0o700, Some(PROXY)),
            ("trust", 0o755, Some(PROXY)),
        ] {
            let path = dir.path().join(sub);
            std::fs::create_dir(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            if let Some(user) = owner {
                std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))?;
            }
        }
        let pod = Self {
            sidecar: None,
            dir,
            dns,
            pair,
            past_output: String::new(),
            secrets: Vec::new(),
            agent_saw: std::sync::Mutex::new(String::new()),
        };
        let init = pod.netns().exec(SIDECAR).arg("init").output_async().await?;
        if !init.status.success() {
            return Err(Failure(format!(
                "credbroker-sidecar init failed: {}",
                String::from_utf8_lossy(&init.stderr)
            )));
        }
        Ok(pod)
    }

    pub fn netns(&self) -> &Netns {
        self.pair.a().netns()
    }

    pub fn far(&self) -> &Netns {
        self.pair.b().netns()
    }

    pub fn far_ip(&self, family: IpFamily) -> IpAddr {
        self.pair.b().ip(family)
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn bundle(&self) -> PathBuf {
        self.path("trust/ca-bundle.crt")
    }

    pub fn bundle_str(&self) -> String {
        self.bundle().display().to_string()
    }

    /// A recording HTTPS upstream in the far namespace on `port` (every
    /// address), with a certificate for `names`.
    pub fn upstream(
        &self,
        names: &[&str],
        port: u16,
        behaviour: Behaviour,
    ) -> TestResult<Upstream> {
        let listener = self
            .far()
            .bind_tcp(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))?;
        Ok(Upstream::https(names.iter().map(|n| n.to_string()))
            .behaviour(behaviour)
            .start(listener)?)
    }

    /// A cleartext recording upstream in the far namespace on `port`.
    pub fn http_upstream(&self, port: u16, behaviour: Behaviour) -> TestResult<Upstream> {
        let listener = self
            .far()
            .bind_tcp(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))?;
        Ok(Upstream::http().behaviour(behaviour).start(listener)?)
    }

    /// Writes the bindings file (the controller's ConfigMap key).
    pub fn write_bindings(&self, bindings: &serde_json::Value) -> TestResult {
        write_replacing(
            &self.path("config/bindings.v1.json"),
            bindings.to_string().as_bytes(),
        )
    }

    pub fn remove_bindings(&self) -> TestResult {
        let _ = std::fs::remove_file(self.path("config/bindings.v1.json"));
        Ok(())
    }

    /// Writes the placeholders file (the pod annotation, through the
    /// downward API).
    pub fn write_placeholders(&self, placeholders: &serde_json::Value) -> TestResult {
        write_replacing(
            &self.path("config/placeholders"),
            placeholders.to_string().as_bytes(),
        )
    }

    /// Writes a secret for the file source: `path` (`mount/path`) holds the
    /// KV data `{key: value}`.
    pub fn write_secret(&mut self, path: &str, key: &str, value: &str) -> TestResult {
        self.secrets.push(value.to_owned());
        let file = self.path(&format!("secrets/{path}"));
        let mut dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        std::fs::create_dir_all(&dir)?;
        while dir != self.path("secrets") {
            std::os::unix::fs::chown(&dir, Some(PROXY.uid), Some(PROXY.gid))?;
            dir.pop();
        }
        let data = serde_json::json!({ key: value }).to_string();
        write_replacing(&file, data.as_bytes())?;
        std::os::unix::fs::chown(&file, Some(PROXY.uid), Some(PROXY.gid))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        Ok(())
    }

    fn common_args(&self) -> Vec<String> {
        vec![
            "--secret-source".into(),
            "file".into(),
            "--secrets-dir".into(),
            self.path("secrets").display().to_string(),
            "--ca-dir".into(),
            self.path("ca").display().to_string(),
            "--bundle-dir".into(),
            self.path("trust").display().to_string(),
            "--reload-interval".into(),
            "200ms".into(),
            "--log-format".into(),
            "json".into(),
        ]
    }

    /// Starts `credbroker-sidecar proxy` as the proxy UID and waits until
    /// `/readyz` answers 200.
    pub async fn start(&mut self, extra: &[&str]) -> TestResult {
        self.spawn_proxy(extra)?;
        self.wait_ready().await
    }

    /// Starts the proxy without waiting for readiness.
    pub fn spawn_proxy(&mut self, extra: &[&str]) -> TestResult {
        assert!(self.sidecar.is_none(), "a sidecar is already running");
        let mut args = vec!["proxy".to_string()];
        args.extend(self.common_args());
        args.extend([
            "--bindings-file".into(),
            self.path("config/bindings.v1.json").display().to_string(),
            "--placeholders-file".into(),
            self.path("config/placeholders").display().to_string(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = self
            .netns()
            .exec(SIDECAR)
            .user(PROXY)
            .args(&args)
            .env("CREDBROKER_POD_NAME", "agent-0")
            .env("CREDBROKER_POD_NAMESPACE", "agents")
            .spawn("credbroker-sidecar")?;
        self.sidecar = Some(child);
        Ok(())
    }

    /// Starts `credbroker-sidecar local --config FILE` as the proxy UID on
    /// 127.0.0.1:15080 (and the admin port), and waits until it is ready.
    pub async fn start_local(&mut self, config: &Path, extra: &[&str]) -> TestResult {
        assert!(self.sidecar.is_none(), "a sidecar is already running");
        let mut args = vec!["local".to_string()];
        args.extend(self.common_args());
        args.extend([
            "--config".into(),
            config.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{LOCAL_PORT}"),
            "--admin-addr".into(),
            format!("127.0.0.1:{ADMIN_PORT}"),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = self
            .netns()
            .exec(SIDECAR)
            .user(PROXY)
            .args(&args)
            .spawn("credbroker-sidecar-local")?;
        self.sidecar = Some(child);
        self.wait_ready().await
    }

    /// Waits until `/readyz` answers 200 (or the sidecar exits).
    pub async fn wait_ready(&self) -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(child) = &self.sidecar
                && let Err(e) = child.check_running()
            {
                return Err(Failure(format!("the sidecar exited: {e}")));
            }
            match self.admin("/readyz") {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => last = format!("{status} {body}"),
                Err(e) => last = e.0,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Failure(format!(
            "the sidecar was not ready within 15s (last: {last}); its output:\n{}",
            self.output()
        )))
    }

    /// Stops the sidecar with SIGTERM (it drains), keeping its output.
    pub fn stop(&mut self) {
        if let Some(child) = self.sidecar.take() {
            child.stop(Duration::from_secs(10));
            self.past_output.push_str(&child.output());
        }
    }

    pub fn sidecar(&self) -> &ChildGuard {
        self.sidecar.as_ref().expect("the sidecar is not running")
    }

    /// Everything every sidecar of this pod printed (logs and audit lines).
    pub fn output(&self) -> String {
        let mut out = self.past_output.clone();
        if let Some(child) = &self.sidecar {
            out.push_str(&child.output());
        }
        out
    }

    /// The audit records printed so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.output()
            .lines()
            .filter(|l| l.starts_with(r#"{"kind":"audit""#))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for an audit record matching `pred`.
    pub async fn wait_audit(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> TestResult<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(r) = self.audit().into_iter().find(|r| pred(r)) {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Failure(format!(
            "no matching audit record; output:\n{}",
            self.output()
        )))
    }

    /// `GET path` on the admin port, from inside the pod.
    pub fn admin(&self, path: &str) -> TestResult<(u16, String)> {
        let addr: SocketAddr = ([127, 0, 0, 1], ADMIN_PORT).into();
        admin_get(
            self.netns().connect_tcp(addr, Duration::from_secs(2))?,
            path,
        )
    }

    pub fn metrics(&self) -> TestResult<String> {
        Ok(self.admin("/metrics")?.1)
    }

    /// Runs curl in the pod as `user` and records what it saw.
    pub async fn curl_as(&mut self, user: RunAs, args: &[&str]) -> TestResult<Curl> {
        // Proxy variables of the test's environment never apply; a test that
        // wants a proxy says --proxy.
        let proxied = args.contains(&"--proxy");
        let output = self
            .netns()
            .exec("curl")
            .user(user)
            .args(["-q", "--silent", "--show-error", "--max-time", "15"])
            .args(if proxied {
                &[][..]
            } else {
                &["--noproxy", "*"][..]
            })
            .args(["-w", CURL_WRITE_OUT])
            .args(args)
            .output_async()
            .await?;
        let curl = parse_curl(&output);
        self.saw(&curl.all_text());
        Ok(curl)
    }

    /// curl as the agent.
    pub async fn curl(&mut self, args: &[&str]) -> TestResult<Curl> {
        self.curl_as(AGENT, args).await
    }

    /// curl as the agent, trusting the pod's bundle (as the webhook's trust
    /// env vars make agents do).
    pub async fn curl_trusting(&mut self, args: &[&str]) -> TestResult<Curl> {
        let bundle = self.bundle_str();
        let mut all = vec!["--cacert", bundle.as_str()];
        all.extend_from_slice(args);
        self.curl_as(AGENT, &all).await
    }

    /// Records what an agent-side client received, for the leak scan.
    pub fn saw(&self, text: &str) {
        self.agent_saw.lock().unwrap().push_str(text);
    }

    /// Checks that no secret value appears in the sidecar's output (logs
    /// and audit), its metrics, or anything an agent saw: raw, and in the
    /// encodings an echo takes (base64, hex), found by this test's own
    /// encoders and again by the sidecar's echo detector (which knows every
    /// alignment and escape).
    pub fn assert_no_secret_leaked(&self) -> TestResult {
        let metrics = match self.sidecar.as_ref().map(|c| c.check_running()) {
            Some(Ok(())) => self.metrics()?,
            _ => String::new(),
        };
        let output = self.output();
        let saw = self.agent_saw.lock().unwrap().clone();
        assert_no_secret_in(
            &self.secrets,
            &[
                ("the sidecar's output", &output),
                ("/metrics", &metrics),
                ("what the agent saw", &saw),
            ],
        )
    }

    /// The sidecar's resident memory, from /proc.
    pub fn sidecar_rss_kib(&self) -> TestResult<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.sidecar().pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| Failure("no VmRSS".into()))
    }
}

/// `GET path` over `stream` (an admin port), as (status, body).
pub fn admin_get(stream: std::net::TcpStream, path: &str) -> TestResult<(u16, String)> {
    Ok(credbroker_test_support::http_get(stream, path)?)
}

/// Fails if any of `secrets` appears in any of `texts` (`(where, text)`):
/// raw, and in the encodings an echo takes, found by this test's own
/// encoders (base64, base64url, hex) and again by the sidecar's echo
/// detector (which knows every alignment and escape).
pub fn assert_no_secret_in(secrets: &[String], texts: &[(&str, &str)]) -> TestResult {
    let values: Vec<credbroker_sidecar::secret::SecretValue> = secrets
        .iter()
        .filter(|s| s.len() >= credbroker_sidecar::echo::MIN_SECRET_LEN)
        .map(|s| credbroker_sidecar::secret::SecretValue::copy_from(s.as_bytes()))
        .collect();
    let detector = credbroker_sidecar::echo::EchoDetector::new(
        values.iter().enumerate().map(|(i, v)| (i, "test", v)),
    )
    .map_err(|e| Failure(e.to_string()))?;
    for (what, text) in texts {
        for secret in secrets {
            let forms = credbroker_test_support::encoded_forms(secret);
            if forms.iter().any(|f| text.contains(f.as_str())) {
                return Err(Failure(format!("a secret value appears in {what}")));
            }
        }
        if let Err(found) = detector.check(text.as_bytes()) {
            return Err(Failure(format!(
                "a secret value appears in {what} ({})",
                found.encoding
            )));
        }
    }
    Ok(())
}

/// What curl writes after the body: a marker, the response headers as
/// JSON (so the leak scan sees them), then status and version.
const CURL_WRITE_OUT: &str = "\n--credbroker-curl--\n%{header_json}\n%{http_code} %{http_version}";

fn parse_curl(output: &Output) -> Curl {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, rest) = stdout
        .rsplit_once("\n--credbroker-curl--\n")
        .unwrap_or(("", stdout.as_str()));
    let (headers, tail) = rest.rsplit_once('\n').unwrap_or(("", rest));
    let mut parts = tail.split_whitespace();
    let status = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = parts.next().unwrap_or("").to_string();
    Curl {
        status,
        body: body.to_string(),
        headers: headers.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        exit: output.status.code().unwrap_or(-1),
        version,
    }
}

/// Writes a file so a reader sees the old or the new content, never half
/// (as a ConfigMap volume update does).
fn write_replacing(path: &Path, contents: &[u8]) -> TestResult {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Waits until `probe` holds, or fails saying `what`.
pub async fn eventually(what: &str, mut probe: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if probe() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Failure(format!("{what}: not within 10s")))
}
