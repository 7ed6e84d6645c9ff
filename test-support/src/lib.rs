//! Fixtures that start the real parts credbroker's tests run against
//! (DESIGN.md section 6): OpenBao, kube-apiserver + etcd, Linux network
//! namespaces, a DNS server, and recording TLS upstreams.
//!
//! Every fixture owns its processes and files and tears them down on drop, so
//! a panicking test leaves nothing behind. A missing part is an error that
//! says which command installs it, never a silent skip.
//!
//! Binaries are found through the environment `hack/setup.sh` prints:
//! - `CREDBROKER_BAO`: the `bao` binary (else `bao` on `PATH`);
//! - `KUBEBUILDER_ASSETS`: a folder with `etcd`, `kube-apiserver`, `kubectl`
//!   (the envtest convention; `setup-envtest` users need nothing else).

#![forbid(unsafe_code)]

pub mod apiserver;
pub mod dns;
pub mod netns;
pub mod openbao;
pub mod pki;
pub mod process;
pub mod upstream;

use std::path::PathBuf;
use std::time::Duration;

/// What failed while starting or driving a fixture.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} is missing: {hint}")]
    MissingPart { what: String, hint: String },
    #[error("this test needs root ({why}); run it as root, as `make test` does in CI")]
    NotRoot { why: String },
    #[error("could not start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{name} exited ({status}); its output ends with:\n{output}")]
    ProcessExited {
        name: String,
        status: String,
        output: String,
    },
    #[error("{what} was not ready after {after:?}; last error: {last}")]
    Timeout {
        what: String,
        after: Duration,
        last: String,
    },
    #[error("command `{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A test's failure, printing the error's message (which says what is
/// missing and how to install it) rather than its `Debug` form. Any error
/// converts into it, so tests use `?` on fixtures and clients alike.
pub struct Failure(pub String);

impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self(e.to_string())
    }
}

/// What a test returns.
pub type TestResult<T = ()> = std::result::Result<T, Failure>;

/// The command that installs every part the tests use.
pub const SETUP_HINT: &str =
    "run `make test`, or `eval \"$(hack/setup.sh)\"` in the shell that runs cargo test";

/// Finds a binary: `$env_var` if set, else `name` on `PATH`.
pub fn find_binary(env_var: &str, name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(Error::MissingPart {
            what: name.to_string(),
            hint: format!("{env_var}={} is not a file; {SETUP_HINT}", p.display()),
        });
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::MissingPart {
            what: name.to_string(),
            hint: format!("set {env_var} or put {name} on PATH; {SETUP_HINT}"),
        })
}

/// Fails unless the test runs as root (network namespaces, iptables, setuid).
pub fn require_root(why: &str) -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot {
            why: why.to_string(),
        })
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::Io("binding an ephemeral port".into(), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Io("reading an ephemeral port".into(), e))
}

/// Polls `probe` until it returns `Ok`, or fails after `timeout` with the last error.
pub async fn wait_until<T, E: std::fmt::Display, F, Fut>(
    what: &str,
    timeout: Duration,
    mut probe: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Each probe gets only the time left, so a probe that hangs (a
        // client with a long default timeout) cannot stretch the deadline.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let last = match tokio::time::timeout(left.max(Duration::from_millis(100)), probe()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the probe did not answer in time".to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                after: timeout,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` over `stream` (an admin port: health, metrics), as (status,
/// body). Plain HTTP/1.1 by hand, so no client's proxy settings apply.
pub fn http_get(mut stream: std::net::TcpStream, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let io = |e| Error::Io(format!("GET {path}"), e);
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Other(format!("GET {path}: no status line in {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The forms a leaked secret most often takes in text: raw, base64 (padded,
/// unpadded, URL-safe) and hex (both cases). Leak scans look for each.
pub fn encoded_forms(secret: &str) -> Vec<String> {
    use base64::Engine as _;
    let b = secret.as_bytes();
    vec![
        secret.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(b),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(b),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
        b.iter().map(|c| format!("{c:02x}")).collect(),
        b.iter().map(|c| format!("{c:02X}")).collect(),
    ]
}

/// How long [`run`] lets a command take before killing it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs a command to completion (killed after [`COMMAND_TIMEOUT`]); a
/// non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut std::process::Command) -> Result<String> {
    use std::io::Read;
    use std::process::Stdio;
    let command = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Spawn {
            what: command.clone(),
            source: e,
        })?;
    // Drain both pipes on their own threads so a chatty command cannot
    // block on a full pipe while we wait for it.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout {
                    what: command,
                    after: COMMAND_TIMEOUT,
                    last: "killed".into(),
                });
            }
            Err(e) => return Err(Error::Io(format!("waiting for {command}"), e)),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if status.success() {
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    } else {
        Err(Error::Command {
            command,
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }
}

/// A binary from `KUBEBUILDER_ASSETS` (the envtest convention).
pub fn require_binary_in_assets(name: &str) -> Result<PathBuf> {
    binary_in_assets(std::env::var_os("KUBEBUILDER_ASSETS"), name)
}

fn binary_in_assets(assets: Option<std::ffi::OsString>, name: &str) -> Result<PathBuf> {
    let Some(dir) = assets else {
        return Err(Error::MissingPart {
            what: format!("{name} (KUBEBUILDER_ASSETS is not set)"),
            hint: SETUP_HINT.to_string(),
        });
    };
    let path = PathBuf::from(dir).join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingPart {
            what: format!("{name} in KUBEBUILDER_ASSETS={}", path.display()),
            hint: SETUP_HINT.to_string(),
        })
    }
}

/// This test process's scratch root, `$TMPDIR/credbroker-tests/<pid>`
/// (mode 0700: fixtures keep keys there). Roots of test processes that are
/// gone are removed on the way, so nothing piles up even after a SIGKILL.
pub fn process_scratch_root() -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let root = std::env::temp_dir().join("credbroker-tests");
    let dir = root.join(std::process::id().to_string());
    if !dir.is_dir() {
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let pid = entry.file_name().to_string_lossy().parse::<i32>().ok();
                let alive =
                    pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
                if pid.is_some() && !alive {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
    }
    // $TMPDIR is shared: refuse a root or folder that is a symlink or
    // belongs to someone else (planted to receive our keys), rather than
    // following it.
    for d in [&root, &dir] {
        let meta = std::fs::symlink_metadata(d)
            .map_err(|e| Error::Io(format!("inspecting {}", d.display()), e))?;
        use std::os::unix::fs::MetadataExt;
        if meta.file_type().is_symlink()
            || !meta.is_dir()
            || meta.uid() != nix::unistd::geteuid().as_raw()
        {
            return Err(Error::Other(format!(
                "{} is not a directory owned by this user; remove it and rerun",
                d.display()
            )));
        }
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::Io(format!("restricting {}", dir.display()), e))?;
    Ok(dir)
}

/// A directory for a fixture that lives as long as this test process (a
/// shared fixture is a `static`, never dropped); see [`process_scratch_root`].
pub fn process_scratch_dir(what: &str) -> Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{what}-"))
        .tempdir_in(process_scratch_root()?)
        .map_err(|e| Error::Io(format!("creating a directory for {what}"), e))?;
    Ok(dir.keep())
}

/// A directory other UIDs may enter (mode 0755), for files a test hands to
/// processes it runs as other users (a sidecar's config, say): under
/// `$TMPDIR/credbroker-tests-shared/<pid>`, removed with the test process's
/// other leftovers once it is gone. Removed on drop.
pub fn shared_scratch_dir(what: &str) -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let root = std::env::temp_dir().join("credbroker-tests-shared");
    let mine = root.join(std::process::id().to_string());
    if !mine.is_dir() {
        sweep_dead(&root);
        std::fs::create_dir_all(&mine)
            .map_err(|e| Error::Io(format!("creating {}", mine.display()), e))?;
    }
    for d in [&root, &mine] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::Io(format!("opening {} to other users", d.display()), e))?;
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("{what}-"))
        .tempdir_in(&mine)
        .map_err(|e| Error::Io(format!("creating a directory for {what}"), e))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).map_err(|e| {
        Error::Io(
            format!("opening {} to other users", dir.path().display()),
            e,
        )
    })?;
    Ok(dir)
}

/// Removes the per-process folders under `root` whose process is gone.
fn sweep_dead(root: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().parse::<i32>().ok();
            let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            if pid.is_some() && !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Raises this process's open-file limit to its hard limit: tests that
/// hold a thousand connections open (and serve the other ends) need more
/// than Debian's default 1,024.
pub fn raise_fd_limit() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| Error::Io("reading RLIMIT_NOFILE".into(), e.into()))?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .map_err(|e| Error::Io("raising RLIMIT_NOFILE".into(), e.into()))?;
    }
    Ok(hard)
}

/// Finds a system tool on `PATH` or in the sbin folders (which a non-login
/// root shell may not have on `PATH`), or says which Debian package has it.
pub fn require_tool(name: &str, debian_package: &str) -> Result<PathBuf> {
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    path_dirs
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::MissingPart {
            what: format!("`{name}`"),
            hint: format!("install it with `apt-get install {debian_package}`; {SETUP_HINT}"),
        })
}

/// Selects ring as the process's rustls provider. Both ring and aws-lc end up
/// linked (vaultrs's reqwest brings aws-lc), and rustls then refuses to guess;
/// every fixture that speaks TLS calls this first. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Four random bytes from the kernel, for unique names and tokens.
pub fn random_u32() -> Result<u32> {
    use std::io::Read;
    let mut bytes = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::Io("reading /dev/urandom".into(), e))?;
    Ok(u32::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_kubernetes_binaries_name_the_part_and_the_command() {
        let unset = binary_in_assets(None, "kube-apiserver")
            .unwrap_err()
            .to_string();
        assert!(
            unset.contains("kube-apiserver (KUBEBUILDER_ASSETS is not set)"),
            "{unset}"
        );
        assert!(unset.contains("make test"), "{unset}");
        let empty = tempfile::tempdir().unwrap();
        let absent = binary_in_assets(Some(empty.path().into()), "etcd")
            .unwrap_err()
            .to_string();
        assert!(absent.contains("etcd in KUBEBUILDER_ASSETS="), "{absent}");
        assert!(absent.contains("hack/setup.sh"), "{absent}");
    }

    #[test]
    fn a_command_that_fails_reports_its_stderr() {
        let err = run(std::process::Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("oops") && err.contains("exit status: 3"),
            "{err}"
        );
    }
}
