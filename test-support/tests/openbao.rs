//! The OpenBao fixture against a real `bao` (issue 2, "OpenBao KV"): KV v2 and
//! v1 round trips, refused tokens, an outage made with SIGSTOP, data kept
//! across a restart, and the errors a missing or dying server gives.
//!
//! Values are obviously-test strings; assertions print them only on failure.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use credbroker_test_support::Error;
use credbroker_test_support::openbao::{KV2_MOUNT, OpenBao};
use serde::{Deserialize, Serialize};
use vaultrs::error::ClientError;
use vaultrs::{kv1, kv2};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct ApiKey {
    api_key: String,
}

fn api_key(value: &str) -> ApiKey {
    ApiKey {
        api_key: value.to_string(),
    }
}

/// Starts a dev server, failing the test with the fixture's own message.
async fn dev() -> OpenBao {
    OpenBao::start().await.unwrap_or_else(|e| panic!("{e}"))
}

/// The error and its sources, as one line, for assertion messages.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

fn is_timeout(e: &ClientError) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<reqwest::Error>()
            .is_some_and(reqwest::Error::is_timeout)
        {
            return true;
        }
        source = s.source();
    }
    false
}

fn is_permission_denied(e: &ClientError) -> bool {
    matches!(e, ClientError::APIError { code: 403, errors }
        if errors.iter().any(|m| m.contains("permission denied")))
}

#[tokio::test]
#[ignore = "needs OpenBao (bao): run make setup"]
async fn kv2_secret_reads_back_and_its_version_rises_on_update() {
    let bao = dev().await;
    eprintln!("dev server start-up: {:?}", bao.startup_time());
    let client = bao.client();
    let path = "teams/research/openai";

    let written = kv2::set(client, KV2_MOUNT, path, &api_key("test-value-v1"))
        .await
        .unwrap();
    assert_eq!(written.version, 1);
    let read: ApiKey = kv2::read(client, KV2_MOUNT, path).await.unwrap();
    assert_eq!(read, api_key("test-value-v1"));
    let metadata = kv2::read_metadata(client, KV2_MOUNT, path).await.unwrap();
    assert_eq!(metadata.current_version, 1);

    kv2::set(client, KV2_MOUNT, path, &api_key("test-value-v2"))
        .await
        .unwrap();
    let metadata = kv2::read_metadata(client, KV2_MOUNT, path).await.unwrap();
    assert_eq!(metadata.current_version, 2);
    let read: ApiKey = kv2::read(client, KV2_MOUNT, path).await.unwrap();
    assert_eq!(read, api_key("test-value-v2"));
}

#[tokio::test]
#[ignore = "needs OpenBao (bao): run make setup"]
async fn kv1_mount_beside_kv2_reads_back_and_updates() {
    let bao = dev().await;
    bao.mount_kv1("kv1").await.unwrap_or_else(|e| panic!("{e}"));
    let client = bao.client();
    let path = "teams/research/openai";

    kv1::set(
        client,
        "kv1",
        path,
        &HashMap::from([("api_key", "test-value-v1")]),
    )
    .await
    .unwrap();
    let read: ApiKey = kv1::get(client, "kv1", path).await.unwrap();
    assert_eq!(read, api_key("test-value-v1"));

    kv1::set(
        client,
        "kv1",
        path,
        &HashMap::from([("api_key", "test-value-v2")]),
    )
    .await
    .unwrap();
    let read: ApiKey = kv1::get(client, "kv1", path).await.unwrap();
    assert_eq!(read, api_key("test-value-v2"));

    // The engines really are v1 and v2, as the server reports them.
    let mounts: serde_json::Value =
        serde_json::from_str(&bao.bao(&["secrets", "list", "-format=json"]).unwrap()).unwrap();
    assert_eq!(mounts["kv1/"]["options"]["version"], "1", "{mounts:#}");
    assert_eq!(mounts["secret/"]["options"]["version"], "2", "{mounts:#}");
}

#[tokio::test]
#[ignore = "needs OpenBao (bao): run make setup"]
async fn wrong_token_is_refused_with_permission_denied() {
    let bao = dev().await;
    let path = "teams/research/openai";
    kv2::set(bao.client(), KV2_MOUNT, path, &api_key("test-value"))
        .await
        .unwrap();

    let intruder = bao.client_with_token("not-a-real-token").unwrap();
    let err = kv2::read::<ApiKey>(&intruder, KV2_MOUNT, path)
        .await
        .unwrap_err();
    assert!(
        is_permission_denied(&err),
        "expected 403 permission denied, got {err:?}"
    );
}

#[tokio::test]
#[ignore = "needs OpenBao (bao): run make setup"]
async fn a_policy_limits_a_token_to_its_paths() {
    let bao = dev().await;
    let root = bao.client();
    kv2::set(root, KV2_MOUNT, "allowed", &api_key("test-value-a"))
        .await
        .unwrap();
    kv2::set(root, KV2_MOUNT, "other", &api_key("test-value-b"))
        .await
        .unwrap();
    let policy = serde_json::json!({
        "path": { "secret/data/allowed": { "capabilities": ["read"] } }
    });
    bao.write_policy("read-allowed", &policy.to_string())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let token = bao
        .create_token(&["read-allowed"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let reader = bao.client_with_token(&token).unwrap();

    let read: ApiKey = kv2::read(&reader, KV2_MOUNT, "allowed").await.unwrap();
    assert_eq!(read, api_key("test-value-a"));
    let err = kv2::read::<ApiKey>(&reader, KV2_MOUNT, "other")
        .await
        .unwrap_err();
    assert!(is_permission_denied(&err), "reading another path: {err:?}");
    let err = kv2::set(&reader, KV2_MOUNT, "allowed", &api_key("x"))
        .await
        .unwrap_err();
    assert!(
        is_permission_denied(&err),
        "writing with read only: {err:?}"
    );
}

#[tokio::test]
#[ignore = "needs OpenBao (bao): run make setup"]
async fn paused_server_times_out_the_client_and_answers_once_resumed() {
    let bao = dev().await;
    let path = "teams/research/openai";
    kv2::set(bao.client(), KV2_MOUNT, path, &api_key("test-value"))
        .await
        .unwrap();
    let timeout = Duration::from_secs(1);
    let client = bao.client_with_timeout(timeout).unwrap();
    // A pooled connection from before the outage, as a long-lived client has.
    let _: ApiKey = kv2::read(&client, KV2_MOUNT, path).await.unwrap();

    bao.pause().unwrap();
    let began = Instant::now();
    let result = kv2::read::<ApiKey>(&client, KV2_MOUNT, path).await;
    let elapsed = began.elapsed();
    bao.resume().unwrap();

    let err = result.expect_err("a paused server must not answer");
    assert!(is_timeout(&err), "expected a timeout, got: {}", chain(&err));
    // The timer never fires early; the upper bound leaves room for a busy machine.
    assert!(
        elapsed >= timeout,
        "gave up after {elapsed:?}, before the {timeout:?} timeout"
    );
    assert!(
        elapsed < timeout + Duration::from_secs(2),
        "took {elapsed:?} for a {timeout:?} timeout"
    );

    let read: ApiKey = kv2::read(&client, KV2_MOUNT, path).await.unwrap();
    assert_eq!(read, api_key("test-value"));
}

#[tokio::test]
#[ignore = "needs OpenBao (bao): run make setup"]
async fn persistent_server_keeps_a_secret_across_restart() {
    let mut bao = OpenBao::start_persistent()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "persistent (raft) server start-up: {:?}",
        bao.startup_time()
    );
    let path = "teams/research/openai";
    kv2::set(bao.client(), KV2_MOUNT, path, &api_key("test-value-kept"))
        .await
        .unwrap();
    let addr = bao.addr().to_string();

    let began = Instant::now();
    bao.restart().await.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("persistent server restart: {:?}", began.elapsed());

    assert_eq!(
        bao.addr(),
        addr,
        "a restart keeps the address clients were given"
    );
    let read: ApiKey = kv2::read(bao.client(), KV2_MOUNT, path).await.unwrap();
    assert_eq!(read, api_key("test-value-kept"));
    let metadata = kv2::read_metadata(bao.client(), KV2_MOUNT, path)
        .await
        .unwrap();
    assert_eq!(metadata.current_version, 1);
}

#[tokio::test]
#[ignore = "needs OpenBao (bao): run make setup"]
async fn restart_refuses_the_in_memory_dev_server() {
    let mut bao = dev().await;
    let err = bao
        .restart()
        .await
        .expect_err("a dev server cannot keep data");
    assert!(err.to_string().contains("persistent"), "{err}");
}

#[tokio::test]
#[ignore = "needs OpenBao (bao): run make setup"]
async fn cli_and_auth_helpers_drive_the_same_server() {
    let bao = dev().await;
    bao.bao(&[
        "kv",
        "put",
        "-mount=secret",
        "cli/written",
        "api_key=test-value-cli",
    ])
    .unwrap();
    let read: ApiKey = kv2::read(bao.client(), KV2_MOUNT, "cli/written")
        .await
        .unwrap();
    assert_eq!(read, api_key("test-value-cli"));

    bao.enable_auth("kubernetes-test", "kubernetes")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let auths: serde_json::Value =
        serde_json::from_str(&bao.bao(&["auth", "list", "-format=json"]).unwrap()).unwrap();
    assert_eq!(auths["kubernetes-test/"]["type"], "kubernetes", "{auths:#}");
}

#[tokio::test]
#[ignore = "needs OpenBao (bao): run make setup"]
async fn dropping_the_fixture_kills_even_a_paused_server() {
    let bao = dev().await;
    let port = bao.port();
    bao.pause().unwrap();
    // The kernel still accepts connections for a stopped process.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(bao);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts connections after drop"
    );
}

#[tokio::test]
#[ignore = "needs OpenBao (bao): run make setup"]
async fn server_dying_at_start_up_reports_its_output() {
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let Err(err) = OpenBao::builder().port(port).start().await else {
        panic!("bao started on port {port}, which this test holds");
    };
    assert!(matches!(err, Error::ProcessExited { .. }), "{err}");
    assert!(err.to_string().contains("address already in use"), "{err}");
}

/// Needs no `bao`, so it runs in plain `cargo test` too.
#[tokio::test]
async fn missing_bao_names_it_and_the_setup_command() {
    let bogus = "/nonexistent/credbroker-test/bao";
    let Err(err) = OpenBao::builder().binary(bogus).start().await else {
        panic!("started OpenBao from {bogus}");
    };
    let message = err.to_string();
    assert!(matches!(err, Error::MissingPart { .. }), "{message}");
    assert!(message.starts_with("bao is missing"), "{message}");
    assert!(message.contains(bogus), "{message}");
    assert!(message.contains("make test"), "{message}");
}
