//! Golden files for the pure core, `mutate`: each case in `tests/golden/`
//! is an input pod (`pod.yaml`) and either the injected pod with the
//! admission warnings (`expected.yaml`) or the refusal (`refusal.txt`).
//! Every admitted case is also checked for idempotency (mutating the
//! output yields an empty patch) and for the patch itself (applying it
//! to the input gives the output).
//!
//! After a deliberate change, `CREDBROKER_BLESS=1 cargo test -p
//! credbroker-webhook --test golden` rewrites the expected files; review
//! the diff before committing it.

use std::path::{Path, PathBuf};

use credbroker_crds::config::SidecarBindings;
use credbroker_webhook::mutate::{Mutation, PodBinding, mutate};
use credbroker_webhook::settings::{InjectSettings, SidecarVault};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;

fn settings() -> InjectSettings {
    InjectSettings {
        sidecar_image: "ghcr.io/credbroker/sidecar:0.1.0".into(),
        init_image: "ghcr.io/credbroker/init:0.1.0".into(),
        image_pull_policy: Some("IfNotPresent".into()),
        proxy_uid: 15017,
        proxy_gid: 15017,
        proxy_port: 15101,
        admin_port: 15121,
        exclude_ports: vec![22],
        exclude_cidrs: vec!["10.0.0.1/32".into()],
        audience: "credbroker".into(),
        token_expiration_seconds: 3600,
        vault: SidecarVault {
            addr: "https://vault.vault.svc:8200".into(),
            auth_mount: "kubernetes".into(),
            namespace: None,
            ca_pem: None,
        },
        sidecar_resources: ResourceRequirements {
            requests: Some(
                [
                    ("cpu".to_owned(), Quantity("50m".into())),
                    ("memory".to_owned(), Quantity("32Mi".into())),
                ]
                .into(),
            ),
            limits: Some([("memory".to_owned(), Quantity("128Mi".into()))].into()),
            ..ResourceRequirements::default()
        },
        broker_namespace: "credbroker-system".into(),
    }
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The bindings of service account `research-agent` (every case's pod
/// uses it unless it names `lonely`, which has none), oldest first: those
/// of `bindings.json`, as the webhook sees them.
fn bindings_for(pod: &Value) -> Vec<PodBinding> {
    let sa = pod["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default");
    if sa != "research-agent" {
        return Vec::new();
    }
    let text = std::fs::read_to_string(golden_dir().join("bindings.json"))
        .unwrap_or_else(|e| panic!("tests/golden/bindings.json: {e}"));
    SidecarBindings::from_json(&text)
        .unwrap_or_else(|e| panic!("bindings.json: {e}"))
        .bindings
        .into_iter()
        .map(|b| PodBinding {
            id: b.id,
            placeholder: b
                .placeholder
                .unwrap_or_else(|| panic!("bindings.json: a binding without a placeholder")),
        })
        .collect()
}

/// Deterministic placeholders: the prefix and `tag` with a counter, padded to 26.
fn counter(tag: &'static str) -> impl FnMut(Option<&str>) -> Result<String, String> {
    let mut n = 0;
    move |prefix| {
        n += 1;
        Ok(format!(
            "{}{:0>26}",
            prefix.unwrap_or(""),
            format!("{tag}{n}")
        ))
    }
}

fn run_with(pod: &Value, tag: &'static str) -> Result<Mutation, String> {
    let bindings = bindings_for(pod);
    mutate(pod, &settings(), &bindings, &mut counter(tag)).map_err(|r| r.message)
}

fn run(pod: &Value) -> Result<Mutation, String> {
    run_with(pod, "golden")
}

/// JSON Patch `add` at `/a/b`, and `remove` of `/metadata/uid` (all the
/// webhook emits), as the API server applies it.
fn apply(pod: &Value, patch: &[Value]) -> Value {
    let mut out = pod.clone();
    for op in patch {
        if op["op"] == "remove" && op["path"] == "/metadata/uid" {
            if let Some(meta) = out["metadata"].as_object_mut() {
                meta.remove("uid");
            }
            continue;
        }
        assert_eq!(op["op"], "add", "{op}");
        let path: Vec<&str> = op["path"]
            .as_str()
            .unwrap_or_default()
            .split('/')
            .skip(1)
            .collect();
        match path.as_slice() {
            [a] => out[*a] = op["value"].clone(),
            [a, b] => out[*a][*b] = op["value"].clone(),
            other => panic!("unexpected patch path {other:?}"),
        }
    }
    out
}

fn yaml(text: &str, what: &Path) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{}: {e}", what.display()))
}

#[test]
fn golden_cases() {
    let bless = std::env::var_os("CREDBROKER_BLESS").is_some();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/golden")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "only {} golden cases found", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap_or_default().to_string_lossy();
        let input_path = case.join("pod.yaml");
        let input = yaml(
            &std::fs::read_to_string(&input_path).expect("pod.yaml"),
            &input_path,
        );
        let refusal_path = case.join("refusal.txt");
        let expected_path = case.join("expected.yaml");
        match run(&input) {
            Err(message) => {
                if bless && !expected_path.exists() {
                    std::fs::write(&refusal_path, format!("{message}\n")).expect("write");
                    continue;
                }
                match std::fs::read_to_string(&refusal_path) {
                    Ok(want) if want.trim() == message => {}
                    Ok(want) => failures.push(format!(
                        "{name}: refused with\n  {message}\nbut refusal.txt says\n  {}",
                        want.trim()
                    )),
                    Err(_) => failures.push(format!("{name}: refused unexpectedly: {message}")),
                }
            }
            Ok(mutation) => {
                let got = serde_json::json!({
                    "warnings": mutation.warnings,
                    "pod": mutation.pod,
                });
                if bless && !refusal_path.exists() {
                    std::fs::write(&expected_path, serde_yaml::to_string(&got).expect("yaml"))
                        .expect("write");
                } else {
                    match std::fs::read_to_string(&expected_path) {
                        Ok(text) if yaml(&text, &expected_path) == got => {}
                        Ok(_) => failures.push(format!(
                            "{name}: the injected pod differs from expected.yaml; got:\n{}",
                            serde_yaml::to_string(&got).unwrap_or_default()
                        )),
                        Err(_) => failures
                            .push(format!("{name}: admitted, but the case expects a refusal")),
                    }
                }
                // The patch makes the output from the input.
                if apply(&input, &mutation.patch) != mutation.pod {
                    failures.push(format!(
                        "{name}: the patch does not produce the injected pod"
                    ));
                }
                // A stored injected pod needs nothing at all.
                if name.starts_with("stored-") && !mutation.patch.is_empty() {
                    failures.push(format!(
                        "{name}: an injected pod as stored got a patch: {}",
                        serde_json::to_string(&mutation.patch).unwrap_or_default()
                    ));
                }
                // Idempotent: a second pass changes nothing, even with a
                // generator that would draw other placeholders (so the
                // recorded ones must be kept, not redrawn).
                match run_with(&mutation.pod, "again") {
                    Ok(again) if again.patch.is_empty() => {}
                    Ok(again) => failures.push(format!(
                        "{name}: mutating the injected pod gave a non-empty patch: {}",
                        serde_json::to_string(&again.patch).unwrap_or_default()
                    )),
                    Err(m) => failures.push(format!("{name}: the injected pod is refused: {m}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
