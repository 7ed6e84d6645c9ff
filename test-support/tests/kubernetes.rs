//! The Kubernetes fixture as Vault's Kubernetes auth will use it: tokens with
//! a custom audience from TokenRequest, TokenReview by audience, and OpenBao's
//! kubernetes auth method doing a real TokenReview against the test
//! apiserver through a reviewer ServiceAccount.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use credbroker_test_support::apiserver::{Cluster, SERVICE_ACCOUNT_ISSUER, TestApiServer};
use credbroker_test_support::openbao::OpenBao;

const BROKER_AUDIENCE: &str = "credbroker";
const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn a_broker_audience_token_passes_review_only_for_that_audience() {
    let server = TestApiServer::shared().await.unwrap();
    let cluster = Cluster::new(server.client().await.unwrap());
    cluster.create_namespace("review", &[]).await.unwrap();
    cluster
        .create_service_account("review", "agent")
        .await
        .unwrap();
    let token = cluster
        .token("review", "agent", &[BROKER_AUDIENCE], HOUR)
        .await
        .unwrap();

    let ok = cluster
        .token_review(&token, &[BROKER_AUDIENCE])
        .await
        .unwrap();
    assert_eq!(ok.authenticated, Some(true), "{ok:?}");
    let user = ok.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:review:agent")
    );
    assert_eq!(ok.audiences.unwrap_or_default(), [BROKER_AUDIENCE]);

    let other = cluster
        .token_review(&token, &["someone-else"])
        .await
        .unwrap();
    assert_ne!(other.authenticated, Some(true), "{other:?}");
    let api_default = cluster
        .token_review(&token, &[SERVICE_ACCOUNT_ISSUER])
        .await
        .unwrap();
    assert_ne!(api_default.authenticated, Some(true), "{api_default:?}");
}

/// Writes `contents` to a file under `dir` and returns `@path`, the way the
/// bao CLI reads a value from a file (tokens stay off command lines).
fn at_file(dir: &std::path::Path, name: &str, contents: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    format!("@{}", p.display())
}

#[tokio::test]
#[ignore = "needs OpenBao and kube-apiserver (make setup)"]
async fn openbao_kubernetes_auth_admits_only_broker_audience_tokens_of_the_bound_account() {
    let server = TestApiServer::shared().await.unwrap();
    let cluster = Cluster::new(server.client().await.unwrap());
    let bao = OpenBao::start().await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let f = |name: &str, contents: &str| at_file(files.path(), name, contents);

    cluster.create_namespace("vault-auth", &[]).await.unwrap();
    let reviewer = cluster
        .create_token_reviewer("vault-auth", "vault-reviewer")
        .await
        .unwrap();
    cluster
        .create_service_account("vault-auth", "agent")
        .await
        .unwrap();
    cluster
        .create_service_account("vault-auth", "intruder")
        .await
        .unwrap();

    bao.enable_auth("kubernetes", "kubernetes").await.unwrap();
    bao.bao(&[
        "write",
        "auth/kubernetes/config",
        &format!("kubernetes_host={}", server.url()),
        &format!("kubernetes_ca_cert={}", f("ca.crt", server.ca_pem())),
        &format!("token_reviewer_jwt={}", f("reviewer.jwt", &reviewer)),
        "disable_local_ca_jwt=true",
    ])
    .unwrap();
    bao.bao(&[
        "write",
        "auth/kubernetes/role/agent",
        "bound_service_account_names=agent",
        "bound_service_account_namespaces=vault-auth",
        &format!("audience={BROKER_AUDIENCE}"),
        "token_ttl=5m",
        "token_policies=default",
    ])
    .unwrap();

    let login = |jwt: String, name: &str| {
        let arg = format!("jwt={}", f(name, &jwt));
        bao.bao(&[
            "write",
            "-format=json",
            "auth/kubernetes/login",
            "role=agent",
            &arg,
        ])
    };

    let broker_token = cluster
        .token("vault-auth", "agent", &[BROKER_AUDIENCE], HOUR)
        .await
        .unwrap();
    let out = login(broker_token, "broker.jwt").expect("a broker-audience token logs in");
    let resp: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        resp["auth"]["metadata"]["service_account_name"], "agent",
        "{resp}"
    );
    assert_eq!(
        resp["auth"]["metadata"]["service_account_namespace"],
        "vault-auth"
    );
    assert!(
        resp["auth"]["client_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );

    let default_token = cluster
        .token("vault-auth", "agent", &[SERVICE_ACCOUNT_ISSUER], HOUR)
        .await
        .unwrap();
    let err = login(default_token, "default.jwt")
        .expect_err("default audience refused")
        .to_string();
    assert!(
        err.contains("invalid audience") || err.contains("permission denied"),
        "{err}"
    );

    let intruder = cluster
        .token("vault-auth", "intruder", &[BROKER_AUDIENCE], HOUR)
        .await
        .unwrap();
    let err = login(intruder, "intruder.jwt")
        .expect_err("other account refused")
        .to_string();
    assert!(
        err.contains("not authorized") || err.contains("permission denied"),
        "{err}"
    );
}
