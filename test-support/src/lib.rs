//! Fixtures that start the real parts credbroker's tests run against
//! (DESIGN.md section 6): OpenBao, kube-apiserver + etcd, Linux network
//! namespaces, and recording TLS upstreams.
//!
//! Every fixture owns its processes and files and tears them down on drop, so
//! a panicking test leaves nothing behind. A missing part is an error that
//! says which command installs it, never a silent skip.
//!
//! Binaries are found through the environment `make setup` prints:
//! - `CREDBROKER_BAO`: the `bao` binary (else `bao` on `PATH`);
//! - `KUBEBUILDER_ASSETS`: a folder with `etcd`, `kube-apiserver`, `kubectl`
//!   (the envtest convention; `setup-envtest` users need nothing else).

#![forbid(unsafe_code)]

pub mod apiserver;
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

/// The command that installs every part the tests use.
pub const SETUP_HINT: &str = "run `make setup` (or `eval \"$(hack/setup.sh | tail -n1)\"`)";

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
        let last = match probe().await {
            Ok(v) => return Ok(v),
            Err(e) => e.to_string(),
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

/// Runs a command to completion; a non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut std::process::Command) -> Result<String> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| Error::Spawn {
        what: command.clone(),
        source: e,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// A binary from `KUBEBUILDER_ASSETS` (the envtest convention).
pub fn require_binary_in_assets(name: &str) -> Result<PathBuf> {
    let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS") else {
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

/// A directory for a fixture that lives as long as this test process (a
/// shared fixture is a `static`, never dropped). Directories of test
/// processes that are gone are removed on the way, so none pile up.
pub fn process_scratch_dir(what: &str) -> Result<PathBuf> {
    let root = std::env::temp_dir().join("credbroker-tests");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().parse::<i32>().ok();
            let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            if pid.is_some() && !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = root.join(std::process::id().to_string());
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{what}-"))
        .tempdir_in(&dir)
        .map_err(|e| Error::Io(format!("creating a directory for {what}"), e))?;
    Ok(dir.keep())
}

/// Selects ring as the process's rustls provider. Both ring and aws-lc end up
/// linked (vaultrs's reqwest brings aws-lc), and rustls then refuses to guess;
/// every fixture that speaks TLS calls this first. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
