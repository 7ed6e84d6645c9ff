//! Rendering the Helm chart for tests: `helm template` with the CI values,
//! and the rendered YAML as documents.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::{Error, Result};

/// The Kubernetes version the chart is rendered for: the test apiserver's
/// (K8S_VERSION in hack/setup.sh).
pub const KUBE_VERSION: &str = "v1.36.3";
/// The namespace the chart is installed into by default.
pub const BROKER_NS: &str = "credbroker-system";

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `charts/credbroker`.
pub fn chart() -> PathBuf {
    root().join("charts/credbroker")
}

/// The helm binary (`$CREDBROKER_HELM`, as `make setup` writes it).
pub fn helm() -> Result<PathBuf> {
    Ok(credbroker_test_support::find_binary(
        "CREDBROKER_HELM",
        "helm",
    )?)
}

/// `helm template` of the chart into `ns`, with the CI values and `args`.
pub fn template(ns: &str, args: &[&str]) -> Result<String> {
    let chart = chart();
    Ok(credbroker_test_support::run(
        Command::new(helm()?)
            .args(["template", "credbroker"])
            .arg(&chart)
            .args(["--namespace", ns, "--kube-version", KUBE_VERSION, "-f"])
            .arg(chart.join("ci/ci-values.yaml"))
            .args(args),
    )?)
}

/// The YAML documents of a stream (empty ones dropped).
pub fn documents(text: &str) -> Result<Vec<Value>> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).map_err(|e| Error::Other(format!("YAML: {e}")))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// The rendered object of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| Error::Other(format!("the rendering has no {kind} {name}")))
}
