//! The generated CRDs against a real kube-apiserver: they install, valid
//! objects round-trip, invalid ones are refused with a message naming the
//! field, and the real kubectl shows the printer columns and the docs.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cases;

use std::path::PathBuf;

use credbroker_crds::{ClusterCredentialPolicy, CredentialBinding};
use credbroker_test_support::apiserver::{Cluster, TestApiServer};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;

fn crd_files() -> Vec<PathBuf> {
    credbroker_crds::generated::all()
        .into_iter()
        .map(|(file, _)| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("generated")
                .join(file)
        })
        .collect()
}

/// The shared apiserver with the CRDs installed and a fresh namespace.
async fn setup(ns: &str) -> (std::sync::Arc<TestApiServer>, Cluster) {
    let server = TestApiServer::shared().await.unwrap();
    let cluster = Cluster::new(server.client().await.unwrap());
    cluster.install_crds(&crd_files()).await.unwrap();
    cluster
        .create_namespace(ns, &[("team", "research")])
        .await
        .unwrap();
    (server, cluster)
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn valid_policy_and_binding_are_accepted_and_read_back_equal() {
    let (_server, cluster) = setup("roundtrip").await;
    let bindings: Api<CredentialBinding> = Api::namespaced(cluster.client.clone(), "roundtrip");
    let policies: Api<ClusterCredentialPolicy> = Api::all(cluster.client.clone());

    let binding: CredentialBinding =
        serde_json::from_value(cases::valid_binding("roundtrip", "openai")).unwrap();
    let created = bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    assert_eq!(created.spec, binding.spec);
    assert_eq!(bindings.get("openai").await.unwrap().spec, binding.spec);

    let policy: ClusterCredentialPolicy =
        serde_json::from_value(cases::valid_policy("team-research")).unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    assert_eq!(
        policies.get("team-research").await.unwrap().spec,
        policy.spec
    );

    // Defaults are applied by the API server, as `kubectl apply` users see them.
    let mut minimal = cases::valid_binding("roundtrip", "minimal");
    let spec = minimal["spec"].as_object_mut().unwrap();
    spec.remove("inject");
    spec.remove("refreshInterval");
    spec["source"]["vault"]
        .as_object_mut()
        .unwrap()
        .remove("kvVersion");
    let minimal: CredentialBinding = serde_json::from_value(minimal).unwrap();
    let back = bindings
        .create(&PostParams::default(), &minimal)
        .await
        .unwrap();
    assert_eq!(back.spec.source.vault.kv_version, 2);
    assert_eq!(back.spec.refresh_interval, "30s");
    assert_eq!(back.spec.destinations[1].port, 443);
    assert_eq!(
        serde_json::to_value(&back.spec.inject).unwrap(),
        json!({ "in": ["header"] })
    );
}

async fn create_raw(cluster: &Cluster, object: &serde_json::Value) -> Result<(), String> {
    let namespaced = object["metadata"]["namespace"].as_str();
    let (plural, ar_kind) = if namespaced.is_some() {
        ("credentialbindings", "CredentialBinding")
    } else {
        ("clustercredentialpolicies", "ClusterCredentialPolicy")
    };
    let ar = kube::api::ApiResource {
        group: "credbroker.dev".into(),
        version: "v1alpha1".into(),
        api_version: "credbroker.dev/v1alpha1".into(),
        kind: ar_kind.into(),
        plural: plural.into(),
    };
    let api: Api<DynamicObject> = match namespaced {
        Some(ns) => Api::namespaced_with(cluster.client.clone(), ns, &ar),
        None => Api::all_with(cluster.client.clone(), &ar),
    };
    let obj: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    api.create(&PostParams::default(), &obj)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn invalid_bindings_are_rejected_with_a_message_naming_the_field() {
    let (_server, cluster) = setup("invalid-bindings").await;
    let objects = cases::invalid_binding_cases()
        .into_iter()
        .enumerate()
        .map(|(i, case)| {
            let obj = cases::apply(
                &cases::valid_binding("invalid-bindings", &format!("case-{i}")),
                &case,
            );
            (case, obj)
        });
    assert_all_refused_naming_the_field(&cluster, objects).await;
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn invalid_policies_are_rejected_with_a_message_naming_the_field() {
    let (_server, cluster) = setup("invalid-policies").await;
    let objects = cases::invalid_policy_cases()
        .into_iter()
        .enumerate()
        .map(|(i, case)| {
            let obj = cases::apply(&cases::valid_policy(&format!("invalid-policy-{i}")), &case);
            (case, obj)
        });
    assert_all_refused_naming_the_field(&cluster, objects).await;
}

/// Creates every object and fails, listing them all, unless each one is
/// refused with a message that names its case's field.
async fn assert_all_refused_naming_the_field(
    cluster: &Cluster,
    objects: impl Iterator<Item = (cases::Case, serde_json::Value)>,
) {
    let mut failures = Vec::new();
    for (case, obj) in objects {
        match create_raw(cluster, &obj).await {
            Ok(()) => failures.push(format!("{}: accepted", case.name)),
            Err(msg) if !msg.contains(case.field) => failures.push(format!(
                "{}: message does not name {}: {msg}",
                case.name, case.field
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn kubectl_shows_printer_columns_and_field_docs() {
    let (server, cluster) = setup("printer").await;
    let bindings: Api<CredentialBinding> = Api::namespaced(cluster.client.clone(), "printer");
    let binding: CredentialBinding =
        serde_json::from_value(cases::valid_binding("printer", "openai")).unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    // Status as the controller will write it (the status subresource).
    let status = json!({ "status": {
        "conditions": [{ "type": "Ready", "status": "True", "reason": "Synced", "message": "",
                         "lastTransitionTime": "2026-01-01T00:00:00Z" }],
        "secretVersion": 7
    }});
    bindings
        .patch_status("openai", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    let out = credbroker_test_support::run(server.kubectl().args([
        "get",
        "credentialbindings",
        "-n",
        "printer",
    ]))
    .unwrap();
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "SERVICE",
            "ACCOUNT",
            "DESTINATION",
            "READY",
            "VERSION",
            "AGE"
        ],
        "{out}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    // CRD printer columns show the first match of a `[*]` path: the first
    // destination. `kubectl get -o wide` shows no more; `describe` shows all.
    assert_eq!(
        &row[..5],
        ["openai", "research-agent", "api.openai.com", "True", "7"],
        "{out}"
    );

    let explain = credbroker_test_support::run(
        server
            .kubectl()
            .args(["explain", "credentialbinding.spec.destinations"]),
    )
    .unwrap();
    for doc in [
        "The only places the real value may be sent",
        "one leading",
        "Allow the credential to be sent over plain HTTP",
    ] {
        assert!(
            explain.contains(doc),
            "kubectl explain lacks {doc:?}:\n{explain}"
        );
    }
}
