//! `helm uninstall` never fails open: while CredentialBindings exist, the
//! chart's pre-delete hook (`credbroker-controller --check-no-bindings`)
//! fails, so Helm aborts the uninstall before the admission policies go and
//! while the controller still runs to withdraw the bindings' Vault grants.
//!
//! - the rendering: the pre-delete Job, the controller image, its flags, its
//!   own list-only ServiceAccount and RBAC, created before it (hook weights)
//!   and deleted whether it succeeds or fails; none of it with
//!   `uninstall.allowWithBindings=true`;
//! - the real binary, as the hook's ServiceAccount with exactly the rendered
//!   RBAC, against the test kube-apiserver: without the CRD and without
//!   bindings it succeeds, with a binding it fails naming it.
//!
//! The helpers are minimal copies of e2e/tests/chart.rs's.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use credbroker_e2e::chart::{BROKER_NS, documents, find, root, template};
use credbroker_test_support::apiserver::{Cluster, SERVICE_ACCOUNT_ISSUER, TestApiServer};
use credbroker_test_support::{Failure, TestResult, run};
use serde_json::{Value, json};

/// The Kubernetes version the chart is rendered for: the test API server's.
const CHECK: &str = "credbroker-uninstall-check";

fn check(ok: bool, what: impl FnOnce() -> String) -> TestResult {
    if ok { Ok(()) } else { Err(Failure(what())) }
}

fn annotation<'a>(doc: &'a Value, key: &str) -> &'a str {
    doc["metadata"]["annotations"][key]
        .as_str()
        .unwrap_or_default()
}

fn delete_policies(doc: &Value) -> Vec<&str> {
    annotation(doc, "helm.sh/hook-delete-policy")
        .split(',')
        .map(str::trim)
        .collect()
}

fn weight(doc: &Value) -> TestResult<i64> {
    annotation(doc, "helm.sh/hook-weight")
        .parse()
        .map_err(|e| Failure(format!("hook weight of {}: {e}", doc["metadata"])))
}

#[test]
#[ignore = "needs helm and kube-apiserver: run make test"]
fn the_pre_delete_hook_checks_for_bindings_with_list_only_rights() -> TestResult {
    let docs = documents(&template(BROKER_NS, &[])?)?;
    let job = find(&docs, "Job", CHECK)?;
    let pod = &job["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let controller = find(&docs, "Deployment", "credbroker-controller")?;
    let args: Vec<&str> = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    check(
        args.contains(&"--check-no-bindings")
            && args.iter().any(|a| a.starts_with("--cluster-id="))
            && !args.iter().any(|a| a.starts_with("--remove-finalizers")),
        || format!("pre-delete Job args {args:?}"),
    )?;
    check(
        c["image"] == controller["spec"]["template"]["spec"]["containers"][0]["image"],
        || format!("the pre-delete Job does not run the controller image: {c}"),
    )?;
    check(pod["serviceAccountName"] == CHECK, || {
        format!("the pre-delete Job runs as {}", pod["serviceAccountName"])
    })?;
    check(job["spec"]["backoffLimit"] == 0, || {
        format!(
            "a refusal is not retried: backoffLimit {}",
            job["spec"]["backoffLimit"]
        )
    })?;
    // A failed Job stays for its logs.
    check(
        annotation(job, "helm.sh/hook") == "pre-delete"
            && delete_policies(job).contains(&"hook-succeeded")
            && !delete_policies(job).contains(&"hook-failed"),
        || {
            format!(
                "pre-delete Job annotations {}",
                job["metadata"]["annotations"]
            )
        },
    )?;
    // Its ServiceAccount and RBAC come first and never outlive the hook.
    for kind in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] {
        let d = find(&docs, kind, CHECK)?;
        let p = delete_policies(d);
        check(
            annotation(d, "helm.sh/hook") == "pre-delete"
                && weight(d)? < weight(job)?
                && p.contains(&"hook-succeeded")
                && p.contains(&"hook-failed"),
            || format!("{kind} {CHECK}: {}", d["metadata"]["annotations"]),
        )?;
    }
    let role = find(&docs, "ClusterRole", CHECK)?;
    check(
        role["rules"]
            == json!([{
                "apiGroups": ["credbroker.dev"],
                "resources": ["credentialbindings"],
                "verbs": ["list"]
            }]),
        || format!("the check needs only list: {}", role["rules"]),
    )?;
    let crb = find(&docs, "ClusterRoleBinding", CHECK)?;
    check(
        crb["roleRef"]["name"] == CHECK
            && crb["subjects"]
                == json!([{"kind": "ServiceAccount", "name": CHECK, "namespace": BROKER_NS}]),
        || format!("ClusterRoleBinding {CHECK}: {crb}"),
    )?;
    // The post-delete hook's RBAC does not outlive a failed hook either.
    for kind in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] {
        let d = find(&docs, kind, "credbroker-uninstall")?;
        check(delete_policies(d).contains(&"hook-failed"), || {
            format!(
                "{kind} credbroker-uninstall: {}",
                d["metadata"]["annotations"]
            )
        })?;
    }
    Ok(())
}

#[test]
#[ignore = "needs helm and kube-apiserver: run make test"]
fn allow_with_bindings_renders_no_pre_delete_hook() -> TestResult {
    let docs = documents(&template(
        BROKER_NS,
        &["--set", "uninstall.allowWithBindings=true"],
    )?)?;
    check(
        !docs.iter().any(|d| {
            d["metadata"]["name"] == CHECK || annotation(d, "helm.sh/hook") == "pre-delete"
        }),
        || "uninstall.allowWithBindings=true still renders the pre-delete check".into(),
    )?;
    // The post-delete finalizer removal stays.
    find(&docs, "Job", "credbroker-uninstall")?;
    Ok(())
}

/// Runs `credbroker-controller --check-no-bindings` with `kubeconfig`:
/// (succeeded, stdout + stderr).
fn check_no_bindings(controller: &Path, kubeconfig: &Path) -> TestResult<(bool, String)> {
    let out = Command::new(controller)
        .args([
            "--cluster-id=ci-cluster",
            "--check-no-bindings",
            "--log-format=text",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("VAULT_ADDR")
        .output()
        .map_err(|e| Failure(format!("running {}: {e}", controller.display())))?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

// One test, in order: the steps share the API server (the CRD absent, then
// installed; a binding present, then gone).
#[tokio::test]
#[ignore = "needs helm and kube-apiserver: run make test"]
async fn the_check_refuses_while_a_binding_exists() -> TestResult {
    let controller = credbroker_e2e::workspace_binary("credbroker-controller")?;
    let api = TestApiServer::shared().await?;
    let cluster = Cluster::new(api.client().await?);
    match api.kubectl_apply(
        &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {BROKER_NS} }}\n"),
        &[],
    ) {
        Err(e) if !e.contains("AlreadyExists") => {
            return Err(Failure(format!("creating namespace {BROKER_NS}: {e}")));
        }
        _ => {}
    }
    // The hook's ServiceAccount and RBAC, as rendered, applied for real.
    let docs = documents(&template(BROKER_NS, &[])?)?;
    let hook_rbac: Vec<Value> = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
        .iter()
        .map(|k| find(&docs, k, CHECK).cloned())
        .collect::<credbroker_e2e::Result<_>>()?;
    api.kubectl_apply(
        &json!({"apiVersion": "v1", "kind": "List", "items": hook_rbac}).to_string(),
        &[],
    )
    .map_err(|e| Failure(format!("applying the hook's RBAC: {e}")))?;
    let token = cluster
        .token(
            BROKER_NS,
            CHECK,
            &[SERVICE_ACCOUNT_ISSUER],
            Duration::from_secs(600),
        )
        .await?;
    let kubeconfig = api.dir().join("uninstall-check.kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig_for_token(&token))
        .map_err(|e| Failure(e.to_string()))?;

    // No CRD (deleted before the uninstall): nothing to withdraw.
    let crd_installed = run(api.kubectl().args([
        "get",
        "crd",
        "credentialbindings.credbroker.dev",
        "--ignore-not-found",
        "-o",
        "name",
    ]))?;
    if crd_installed.trim().is_empty() {
        let (ok, out) = check_no_bindings(&controller, &kubeconfig)?;
        check(ok, || format!("without the CRD the check failed:\n{out}"))?;
    }
    cluster
        .install_crds(&[root().join("crds/generated/credbroker.dev_credentialbindings.yaml")])
        .await?;

    let ns = "uninstall-check";
    cluster.create_namespace(ns, &[]).await?;
    let (ok, out) = check_no_bindings(&controller, &kubeconfig)?;
    check(ok, || format!("with no binding the check failed:\n{out}"))?;

    let binding = json!({
        "apiVersion": "credbroker.dev/v1alpha1",
        "kind": "CredentialBinding",
        "metadata": {"name": "openai", "namespace": ns},
        "spec": {
            "serviceAccountName": "agent",
            "source": {"vault": {"mount": "secret", "path": "teams/a/openai", "key": "api_key"}},
            "placeholder": {"env": "OPENAI_API_KEY"},
            "destinations": [{"host": "api.openai.com"}]
        }
    });
    api.kubectl_apply(&binding.to_string(), &[])
        .map_err(|e| Failure(format!("creating the binding: {e}")))?;
    let (ok, out) = check_no_bindings(&controller, &kubeconfig)?;
    check(
        !ok && out.contains("1 CredentialBinding still exists (uninstall-check/openai)")
            && out.contains("kubectl delete credentialbindings --all -A")
            && out.contains("uninstall.allowWithBindings=true"),
        || format!("with a binding the check did not refuse, naming it:\n{out}"),
    )?;

    run(api.kubectl().args([
        "delete",
        "credentialbinding",
        "openai",
        "-n",
        ns,
        "--timeout=20s",
    ]))?;
    let (ok, out) = check_no_bindings(&controller, &kubeconfig)?;
    check(ok, || {
        format!("once the binding is gone the check failed:\n{out}")
    })
}
