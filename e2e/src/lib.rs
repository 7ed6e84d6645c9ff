//! End-to-end checks that span every binary (the tests live in `tests/`),
//! and the test pod-runner ([`pod_runner`]) that plays the kubelet for one
//! injected pod.
//!
//! The binaries under test are the workspace's own builds, found next to the
//! test executable (`cargo test --workspace` builds them before any test
//! runs), so one test can start the controller, the webhook and the sidecar.

use std::path::PathBuf;

pub mod chart;
pub mod pod_runner;

/// What went wrong in a pod-runner or journey step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pod spec has a field the runner cannot honour: it never ignores one.
    #[error("pod-runner: {field} is not supported: {reason}")]
    Unsupported { field: String, reason: String },
    /// A container failed to start, exited, or failed a probe.
    #[error("container {name}: {detail}")]
    Container { name: String, detail: String },
    #[error("{0}: {1}")]
    Kube(String, #[source] kube::Error),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error(transparent)]
    Support(#[from] credbroker_test_support::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Fails, saying what to install, unless each host tool is on `PATH`.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    for tool in tools {
        credbroker_test_support::require_tool(tool, "util-linux")?;
    }
    Ok(())
}

/// A workspace binary, built next to the running test executable.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe =
        std::env::current_exe().map_err(|e| Error::Io("finding the test binary".into(), e))?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(name))
        .ok_or_else(|| Error::Other(format!("no target folder above {}", exe.display())))?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Other(format!(
            "{} is not built: run `cargo build --workspace` (or `make test`, which builds it)",
            path.display()
        )))
    }
}
