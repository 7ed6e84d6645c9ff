//! The webhook's acceptance tests: the real kube-apiserver (and etcd) calls
//! the real `credbroker-webhook` over TLS, with the registration
//! (`deploy/mutating-webhook.yaml`) and the admission policies
//! (`deploy/*-policy.yaml`) the chart ships. The webhook runs as its own
//! ServiceAccount, bound to exactly `deploy/rbac.yaml`, in self-managed
//! certificate mode. What is asserted is what a user sees: the pod the API
//! server stores, and `kubectl`'s own error output.
//!
//! Run with `make test` (or `cargo test -p credbroker-webhook --test webhook
//! -- --include-ignored` with the test environment loaded).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use credbroker_crds::keys::{self, injected};
use credbroker_test_support::apiserver::{Cluster, SERVICE_ACCOUNT_ISSUER, TestApiServer};
use credbroker_test_support::process::ChildGuard;
use credbroker_test_support::{Failure, TestResult, free_port, run, wait_until};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const SYSTEM_NS: &str = "credbroker-system";
/// The images the webhook runs with: the first of the broker-token
/// policy's `sidecarImages` and `initImages` (the policies are applied as
/// written, so a pod the webhook injects must pass them).
const SIDECAR_IMAGE: &str = "ghcr.io/credbroker/credbroker-sidecar:0.1.0";
const INIT_IMAGE: &str = "ghcr.io/credbroker/credbroker-init:0.1.0";
const SA: &str = "research-agent";

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

/// Fails unless the broker-token policy's settings variables list exactly
/// [`SIDECAR_IMAGE`] and [`INIT_IMAGE`] (literal CEL lists of quoted
/// strings, as the chart renders them).
fn the_policy_lists_the_test_images() -> TestResult {
    let text = std::fs::read_to_string(deploy("admission-policy.yaml"))?;
    let policy: Value = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|doc| serde::Deserialize::deserialize(doc).ok())
        .find(|d: &Value| d["kind"] == "ValidatingAdmissionPolicy")
        .ok_or_else(|| Failure("admission-policy.yaml has no policy".into()))?;
    for (name, image) in [("sidecarImages", SIDECAR_IMAGE), ("initImages", INIT_IMAGE)] {
        let expression = policy["spec"]["variables"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .and_then(|v| v["expression"].as_str())
            .ok_or_else(|| Failure(format!("admission-policy.yaml has no variable {name}")))?;
        if expression.trim() != format!("['{image}']") {
            return Err(Failure(format!(
                "admission-policy.yaml: {name} is {expression}, but the webhook here injects \
                 {image}: keep them the same"
            )));
        }
    }
    Ok(())
}

#[test]
fn the_webhook_here_injects_the_images_the_policy_lists() -> TestResult {
    the_policy_lists_the_test_images()
}

fn golden(case: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case)
        .join(file)
}

struct Env {
    server: TestApiServer,
    cluster: Cluster,
    dir: tempfile::TempDir,
    webhook_kubeconfig: PathBuf,
    controller_client: kube::Client,
}

struct Webhook {
    process: ChildGuard,
    admin_port: u16,
}

impl Webhook {
    fn metrics(&self) -> TestResult<String> {
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.admin_port))?;
        let (status, body) = credbroker_test_support::http_get(stream, "/metrics")?;
        if status != 200 {
            return Err(Failure(format!("/metrics answered {status}")));
        }
        Ok(body)
    }

    /// Admission reviews answered so far, all results.
    fn admissions(&self) -> TestResult<u64> {
        Ok(self
            .metrics()?
            .lines()
            .filter(|l| l.starts_with("credbroker_webhook_admissions_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }
}

impl Env {
    async fn start() -> TestResult<Self> {
        // With the ServiceAccount admission plugin on, as on a real
        // cluster: it adds the default token volume the webhook removes.
        let server = TestApiServer::start_with_service_account_admission().await?;
        let cluster = Cluster::new(server.client().await?);
        cluster.create_namespace(SYSTEM_NS, &[]).await?;
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/generated");
        cluster
            .install_crds(&[
                crds.join("credbroker.dev_credentialbindings.yaml"),
                crds.join("credbroker.dev_clustercredentialpolicies.yaml"),
            ])
            .await?;
        run(server
            .kubectl()
            .args(["apply", "-f", &deploy("rbac.yaml").display().to_string()]))?;
        // The controller's identity, the only one that may write bindings
        // ConfigMaps once the policy is in.
        run(server.kubectl().args([
            "apply",
            "-f",
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../controller/deploy/rbac.yaml")
                .display()
                .to_string(),
        ]))?;
        // The policies as written: their settings variables name the
        // images the webhook runs with here (checked before anything runs).
        the_policy_lists_the_test_images()?;
        for file in ["admission-policy.yaml", "bindings-configmap-policy.yaml"] {
            run(server
                .kubectl()
                .args(["apply", "-f", &deploy(file).display().to_string()]))?;
        }
        let dir = tempfile::tempdir()?;
        let token = |sa: &'static str| {
            let cluster = &cluster;
            async move {
                cluster
                    .token(
                        SYSTEM_NS,
                        sa,
                        &[SERVICE_ACCOUNT_ISSUER],
                        Duration::from_secs(3600),
                    )
                    .await
            }
        };
        let webhook_kubeconfig = dir.path().join("webhook.kubeconfig");
        std::fs::write(
            &webhook_kubeconfig,
            server.kubeconfig_for_token(&token("credbroker-webhook").await?),
        )?;
        let controller_kubeconfig = dir.path().join("controller.kubeconfig");
        std::fs::write(
            &controller_kubeconfig,
            server.kubeconfig_for_token(&token("credbroker-controller").await?),
        )?;
        let controller_client =
            credbroker_test_support::apiserver::client_from_kubeconfig(&controller_kubeconfig)
                .await?;
        Ok(Self {
            server,
            cluster,
            dir,
            webhook_kubeconfig,
            controller_client,
        })
    }

    /// Registers `deploy/mutating-webhook.yaml` with a loopback URL in
    /// place of the Service, and an empty caBundle the webhook fills in.
    async fn register(&self, port: u16) -> TestResult {
        let text = std::fs::read_to_string(deploy("mutating-webhook.yaml"))?;
        let mut config: Value = serde_yaml::from_str(&text)
            .map_err(|e| Failure(format!("mutating-webhook.yaml: {e}")))?;
        for hook in config["webhooks"].as_array_mut().into_iter().flatten() {
            hook["clientConfig"] = json!({ "url": format!("https://127.0.0.1:{port}/mutate") });
        }
        self.server
            .kubectl_apply(&config.to_string(), &[])
            .map_err(Failure)?;
        Ok(())
    }

    async fn webhook(&self, name: &str, port: u16) -> TestResult<Webhook> {
        let admin_port = free_port()?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_credbroker-webhook"));
        cmd.args([
            "--namespace",
            SYSTEM_NS,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
            "--sidecar-image",
            SIDECAR_IMAGE,
            "--init-image",
            INIT_IMAGE,
            "--vault-addr",
            "https://vault.vault.svc:8200",
            "--cert-mode",
            "self-managed",
            "--extra-san",
            "127.0.0.1",
            "--identity",
            name,
            "--propagation-delay",
            "2s",
            "--cert-check-interval",
            "500ms",
            "--lease-duration",
            "6s",
            "--lease-renew-deadline",
            "4s",
            "--lease-retry-period",
            "1s",
            "--log-format",
            "text",
        ])
        .env("KUBECONFIG", &self.webhook_kubeconfig)
        .env("RUST_LOG", "info");
        for proxy in [
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "all_proxy",
        ] {
            cmd.env_remove(proxy);
        }
        let process = ChildGuard::spawn(name, cmd)?;
        let webhook = Webhook {
            process,
            admin_port,
        };
        wait_until(
            &format!("webhook {name} ready"),
            Duration::from_secs(30),
            || async {
                webhook.process.check_running().map_err(|e| e.to_string())?;
                let stream = std::net::TcpStream::connect(("127.0.0.1", admin_port))
                    .map_err(|e| e.to_string())?;
                match credbroker_test_support::http_get(stream, "/readyz") {
                    Ok((200, _)) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await?;
        Ok(webhook)
    }

    /// Waits until every entry of the registration carries a caBundle.
    async fn wait_ca_bundle(&self) -> TestResult {
        let api: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
            Api::all(self.cluster.client.clone());
        wait_until(
            "the caBundle published",
            Duration::from_secs(30),
            || async {
                let config = api
                    .get("credbroker-webhook")
                    .await
                    .map_err(|e| e.to_string())?;
                let hooks = config.webhooks.unwrap_or_default();
                if !hooks.is_empty()
                    && hooks.iter().all(|h| {
                        h.client_config
                            .ca_bundle
                            .as_ref()
                            .is_some_and(|b| !b.0.is_empty())
                    })
                {
                    Ok(())
                } else {
                    Err("not yet".to_owned())
                }
            },
        )
        .await?;
        Ok(())
    }

    /// The bindings ConfigMap of `sa` in `ns`, as the controller writes it.
    async fn publish_bindings(&self, ns: &str, sa: &str) -> TestResult {
        let json = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/bindings.json"),
        )?;
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {
                "name": keys::bindings_configmap_name(sa),
                "namespace": ns,
                "labels": {
                    "app.kubernetes.io/managed-by": keys::MANAGED_BY,
                    keys::SERVICE_ACCOUNT_LABEL: sa,
                },
            },
            "data": { keys::BINDINGS_CONFIGMAP_KEY: json },
        }))?;
        Api::<ConfigMap>::namespaced(self.controller_client.clone(), ns)
            .create(&PostParams::default(), &cm)
            .await
            .map_err(|e| {
                Failure(format!(
                    "creating the bindings ConfigMap as the controller: {e}"
                ))
            })?;
        // The webhook draws placeholders from the CredentialBindings
        // themselves: the same bindings, as the team applied them.
        let published = credbroker_crds::config::SidecarBindings::from_json(&json)
            .map_err(|e| Failure(e.to_string()))?;
        let api =
            Api::<credbroker_crds::CredentialBinding>::namespaced(self.cluster.client.clone(), ns);
        for b in published.bindings {
            let binding: credbroker_crds::CredentialBinding = serde_json::from_value(json!({
                "apiVersion": "credbroker.dev/v1alpha1",
                "kind": "CredentialBinding",
                "metadata": { "name": b.id, "namespace": ns },
                "spec": {
                    "serviceAccountName": sa,
                    "source": { "vault": b.secret },
                    "placeholder": b.placeholder,
                    "destinations": b.destinations.iter()
                        .map(|d| json!({ "host": d.host, "port": d.port }))
                        .collect::<Vec<_>>(),
                },
            }))?;
            api.create(&PostParams::default(), &binding)
                .await
                .map_err(|e| Failure(format!("creating CredentialBinding {ns}/{}: {e}", b.id)))?;
        }
        Ok(())
    }

    async fn pod(&self, ns: &str, name: &str) -> TestResult<Pod> {
        Ok(Api::<Pod>::namespaced(self.cluster.client.clone(), ns)
            .get(name)
            .await?)
    }
}

fn agent_pod(ns: &str, name: &str, opt_in: &str) -> String {
    let meta = match opt_in {
        "annotation" => "  annotations: { credbroker.dev/inject: \"true\" }\n",
        "label" => "  labels: { credbroker.dev/inject: \"true\" }\n",
        "annotation-false" => "  annotations: { credbroker.dev/inject: \"false\" }\n",
        _ => "",
    };
    // The ServiceAccount admission plugin adds the default token volume.
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n{meta}spec:\n  serviceAccountName: {SA}\n  containers:\n    - name: agent\n      image: python:3.13-slim\n"
    )
}

/// Checks a stored pod is exactly as [`agent_pod`] wrote it: no broker
/// containers, volumes, env or annotations, and the default token kept.
fn assert_untouched(pod: &Pod) -> TestResult {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| Failure(format!("{name}: no spec")))?;
    let containers: Vec<(&str, usize, Vec<&str>)> = spec
        .containers
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.env.as_ref().map_or(0, Vec::len),
                c.volume_mounts
                    .iter()
                    .flatten()
                    .map(|m| m.name.as_str())
                    .collect(),
            )
        })
        .collect();
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let touched = spec.init_containers.is_some()
        || spec.automount_service_account_token.is_some()
        || containers.len() != 1
        || containers[0].0 != "agent"
        || containers[0].1 != 0
        || !matches!(containers[0].2.as_slice(), [m] if m.starts_with("kube-api-access-"))
        || !matches!(volumes.as_slice(), [v] if v.starts_with("kube-api-access-"))
        || pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(keys::PLACEHOLDERS));
    if touched {
        return Err(Failure(format!(
            "{name} did not opt in, but was changed: containers {containers:?}, volumes \
             {volumes:?}, init containers {:?}",
            spec.init_containers
                .iter()
                .flatten()
                .map(|c| &c.name)
                .collect::<Vec<_>>()
        )));
    }
    Ok(())
}

/// Checks a stored pod is injected as a user would: the broker's two init
/// containers first, no agent with a token, and each placeholder the same
/// in the annotation and the env. Returns the placeholders.
fn assert_injected(pod: &Pod) -> TestResult<std::collections::BTreeMap<String, String>> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| Failure(format!("{name}: no spec")))?;
    let inits: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    if inits.len() < 2
        || inits[0] != injected::INIT_CONTAINER
        || inits[1] != injected::SIDECAR_CONTAINER
    {
        return Err(Failure(format!("{name}: init containers {inits:?}")));
    }
    if spec.automount_service_account_token != Some(false) {
        return Err(Failure(format!(
            "{name}: automountServiceAccountToken is not false"
        )));
    }
    let token_volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| {
            v.projected
                .as_ref()
                .and_then(|p| p.sources.as_ref())
                .is_some_and(|s| s.iter().any(|s| s.service_account_token.is_some()))
        })
        .map(|v| v.name.as_str())
        .collect();
    if token_volumes != [injected::TOKEN_VOLUME] {
        return Err(Failure(format!("{name}: token volumes {token_volumes:?}")));
    }
    let annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(keys::PLACEHOLDERS))
        .ok_or_else(|| Failure(format!("{name}: no placeholders annotation")))?;
    let placeholders: std::collections::BTreeMap<String, String> =
        serde_json::from_str(annotation)?;
    for c in &spec.containers {
        for m in c.volume_mounts.iter().flatten() {
            if m.name == injected::TOKEN_VOLUME
                || m.mount_path
                    .starts_with("/var/run/secrets/kubernetes.io/serviceaccount")
            {
                return Err(Failure(format!(
                    "{name}: agent {} mounts a token ({})",
                    c.name, m.name
                )));
            }
        }
        let env = |var: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == var)
                .and_then(|e| e.value.clone())
        };
        for (id, var) in [("openai", "OPENAI_API_KEY"), ("github", "GITHUB_TOKEN")] {
            if env(var).as_ref() != placeholders.get(id) || env(var).is_none() {
                return Err(Failure(format!(
                    "{name}: container {}: env {var} {:?}, annotation {:?}",
                    c.name,
                    env(var),
                    placeholders.get(id)
                )));
            }
        }
        if env("SSL_CERT_FILE").is_none() {
            return Err(Failure(format!("{name}: {} has no SSL_CERT_FILE", c.name)));
        }
    }
    Ok(placeholders)
}

/// Creates a pod through the real kubectl and returns its error output.
fn refused(server: &TestApiServer, yaml: &str) -> TestResult<String> {
    match server.kubectl_apply(yaml, &[]) {
        Ok(out) => Err(Failure(format!("admitted, but should be refused: {out}"))),
        Err(stderr) => Ok(stderr),
    }
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (make setup)"]
async fn the_api_server_calls_the_webhook_and_the_policies_hold() -> TestResult {
    let env = Env::start().await?;
    let port = free_port()?;
    env.register(port).await?;
    let webhook = env.webhook("webhook-a", port).await?;
    env.wait_ca_bundle().await?;
    env.cluster
        .create_namespace(
            "agents",
            &[(keys::NAMESPACE_INJECTION, keys::NAMESPACE_INJECTION_ENABLED)],
        )
        .await?;
    env.cluster.create_namespace("other", &[]).await?;
    for ns in ["agents", "other"] {
        env.cluster.create_service_account(ns, SA).await?;
    }
    env.publish_bindings("agents", SA).await?;
    env.publish_bindings("other", SA).await?;
    // The cache sees the ConfigMaps within moments.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Annotated pod in a labelled namespace, labelled pod elsewhere.
    env.server
        .kubectl_apply(&agent_pod("agents", "annotated", "annotation"), &[])
        .map_err(Failure)?;
    env.server
        .kubectl_apply(&agent_pod("other", "labelled", "label"), &[])
        .map_err(Failure)?;
    let first = assert_injected(&env.pod("agents", "annotated").await?)?;
    assert_injected(&env.pod("other", "labelled").await?)?;
    // Idempotent against the real API server's defaulting: the stored pod,
    // mutated again with the webhook's own settings, yields an empty patch.
    let settings = <credbroker_webhook::run::Args as clap::Parser>::try_parse_from([
        "credbroker-webhook",
        "--namespace",
        SYSTEM_NS,
        "--sidecar-image",
        SIDECAR_IMAGE,
        "--init-image",
        INIT_IMAGE,
        "--vault-addr",
        "https://vault.vault.svc:8200",
        "--cert-mode",
        "self-managed",
    ])
    .map_err(|e| Failure(e.to_string()))?
    .inject_settings()
    .map_err(|e| Failure(e.to_string()))?;
    let bindings: Vec<credbroker_webhook::mutate::PodBinding> =
        credbroker_crds::config::SidecarBindings::from_json(&std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/bindings.json"),
        )?)
        .map_err(|e| Failure(e.to_string()))?
        .bindings
        .into_iter()
        .filter_map(|b| {
            Some(credbroker_webhook::mutate::PodBinding {
                id: b.id,
                placeholder: b.placeholder?,
            })
        })
        .collect();
    for (ns, name) in [("agents", "annotated"), ("other", "labelled")] {
        let mut stored: Value = serde_json::from_str(&run(env
            .server
            .kubectl()
            .args(["get", "pod", "-n", ns, name, "-o", "json"]))?)?;
        // As a reinvocation sees it: a pod being created has no uid,
        // resourceVersion or status yet (a uid would mark it a copy).
        if let Some(meta) = stored["metadata"].as_object_mut() {
            for field in [
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "managedFields",
            ] {
                meta.remove(field);
            }
        }
        let mut fresh = |p: Option<&str>| {
            credbroker_crds::config::generate_placeholder(p).map_err(|e| e.to_string())
        };
        let again = credbroker_webhook::mutate::mutate(&stored, &settings, &bindings, &mut fresh)
            .map_err(|r| Failure(format!("{ns}/{name}: the stored pod is refused: {r}")))?;
        if !again.patch.is_empty() {
            return Err(Failure(format!(
                "{ns}/{name}: mutating the stored pod again is not a no-op: {}",
                serde_json::to_string(&again.patch).unwrap_or_default()
            )));
        }
    }

    // 7. A second pod of the same ServiceAccount gets its own placeholders.
    env.server
        .kubectl_apply(&agent_pod("agents", "second", "annotation"), &[])
        .map_err(Failure)?;
    let second = assert_injected(&env.pod("agents", "second").await?)?;
    for (id, value) in &first {
        if second.get(id) == Some(value) {
            return Err(Failure(format!(
                "binding {id}: two pods share placeholder {value}"
            )));
        }
    }

    // 2. Every refusal, as kubectl shows it.
    let mut checked = 0;
    for entry in std::fs::read_dir(golden("", ""))? {
        let case = entry?.path();
        let Some(name) = case.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if !name.starts_with("refuse-") {
            continue;
        }
        let pod = std::fs::read_to_string(case.join("pod.yaml"))?.replace(
            "name: agent, namespace: agents",
            &format!("name: {name}, namespace: agents"),
        );
        let message = std::fs::read_to_string(case.join("refusal.txt"))?;
        let stderr = refused(&env.server, &pod)?;
        // The broker-audience token is refused by the admission policy
        // too; the webhook, called first, answers with its own message.
        if !stderr.contains(message.trim()) {
            return Err(Failure(format!(
                "{name}: kubectl said\n{stderr}\nexpected\n{message}"
            )));
        }
        checked += 1;
    }
    if checked < 10 {
        return Err(Failure(format!("only {checked} refusal cases")));
    }

    // 3. Without the webhook: the policies alone.
    let forged = std::fs::read_to_string(golden("refuse-broker-audience-token", "pod.yaml"))?
        .replace(
            "name: agent, namespace: agents, annotations: { credbroker.dev/inject: \"true\" }",
            "name: forged, namespace: other",
        );
    let stderr = refused(&env.server, &forged)?;
    if !stderr.contains("credbroker") || !stderr.contains("ValidatingAdmissionPolicy") {
        return Err(Failure(format!(
            "a forged token pod outside the webhook: {stderr}"
        )));
    }
    let pods = Api::<Pod>::namespaced(env.cluster.client.clone(), "agents");
    let mut pod = pods.get("annotated").await?;
    if let Some(c) = pod
        .spec
        .as_mut()
        .and_then(|s| s.init_containers.as_mut())
        .and_then(|c| c.get_mut(1))
    {
        c.image = Some("evil.example/sidecar:latest".into());
    }
    let update = pods
        .replace("annotated", &PostParams::default(), &pod)
        .await;
    match update {
        Ok(_) => return Err(Failure("the sidecar image was updated".into())),
        Err(e)
            if e.to_string().contains(
                "init container credbroker-sidecar: image may not change (from \
                 ghcr.io/credbroker/credbroker-sidecar:0.1.0 to evil.example/sidecar:latest)",
            ) => {}
        Err(e) => {
            return Err(Failure(format!(
                "the sidecar image update was refused, but not by the policy: {e}"
            )));
        }
    }
    let ephemeral = json!({ "spec": { "ephemeralContainers": [ {
        "name": "debugger", "image": "busybox:1.37",
        "volumeMounts": [ { "name": injected::TOKEN_VOLUME, "mountPath": "/t" } ],
    } ] } });
    let debug = pods
        .patch_subresource(
            "ephemeralcontainers",
            "annotated",
            &PatchParams::default(),
            &Patch::Strategic(ephemeral),
        )
        .await;
    match debug {
        Ok(_) => {
            return Err(Failure(
                "an ephemeral container mounted the broker token".into(),
            ));
        }
        Err(e) if e.to_string().contains("credbroker") => {}
        Err(e) => {
            return Err(Failure(format!(
                "the ephemeral container was refused, but not by us: {e}"
            )));
        }
    }
    // The bindings ConfigMaps are the controller's alone.
    let mut cm = Api::<ConfigMap>::namespaced(env.cluster.client.clone(), "agents")
        .get(&keys::bindings_configmap_name(SA))
        .await?;
    cm.data
        .get_or_insert_default()
        .insert(keys::BINDINGS_CONFIGMAP_KEY.into(), "{}".into());
    let edit = Api::<ConfigMap>::namespaced(env.cluster.client.clone(), "agents")
        .replace(
            &keys::bindings_configmap_name(SA),
            &PostParams::default(),
            &cm,
        )
        .await;
    match edit {
        Ok(_) => return Err(Failure("an admin rewrote a bindings ConfigMap".into())),
        Err(e) if e.to_string().contains("only the credbroker controller") => {}
        Err(e) => return Err(Failure(format!("editing a bindings ConfigMap: {e}"))),
    }

    // 4. Not opted in: the API server never calls the webhook (the
    // registration's matchCondition), in a labelled namespace or not, and
    // stores the pod as sent.
    let before = webhook.admissions()?;
    for (ns, name, opt_in) in [
        ("other", "plain-other", ""),
        ("agents", "plain-agents", ""),
        ("agents", "opted-out-agents", "annotation-false"),
    ] {
        env.server
            .kubectl_apply(&agent_pod(ns, name, opt_in), &[])
            .map_err(Failure)?;
        assert_untouched(&env.pod(ns, name).await?)?;
    }
    let after = webhook.admissions()?;
    if after != before {
        return Err(Failure(format!(
            "the webhook was called {} time(s) for pods that did not opt in",
            after - before
        )));
    }

    // 6. A forced rotation under load: no admission fails across it.
    let secrets = Api::<Secret>::namespaced(env.cluster.client.clone(), SYSTEM_NS);
    let served_ca = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    let old = secrets.get("credbroker-webhook-tls").await?;
    let old_cert = old.data.as_ref().and_then(|d| d.get("tls.crt")).cloned();
    secrets
        .patch(
            "credbroker-webhook-tls",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "annotations": { "credbroker.dev/rotate": "test-1" } } }),
            ),
        )
        .await?;
    let started = Instant::now();
    let mut created = 0;
    let mut rotated_at = None;
    while started.elapsed() < Duration::from_secs(40) {
        let name = format!("load-{created}");
        if let Err(stderr) = env
            .server
            .kubectl_apply(&agent_pod("agents", &name, "annotation"), &[])
        {
            return Err(Failure(format!(
                "admission {created} failed during the rotation ({:?} in): {stderr}\nwebhook:\n{}",
                started.elapsed(),
                webhook.process.output_tail(4000)
            )));
        }
        created += 1;
        let now = secrets.get("credbroker-webhook-tls").await?;
        let cert = now.data.as_ref().and_then(|d| d.get("tls.crt")).cloned();
        if rotated_at.is_none() && cert != old_cert {
            rotated_at = Some((
                started.elapsed(),
                served_ca(&now).matches("BEGIN CERTIFICATE").count(),
            ));
        }
        if let Some((at, _)) = rotated_at
            && started.elapsed() > at + Duration::from_secs(4)
        {
            break;
        }
    }
    let Some((at, cas)) = rotated_at else {
        return Err(Failure(format!(
            "the serving certificate did not change within 40 s of the forced rotation\n{}",
            webhook.process.output_tail(4000)
        )));
    };
    if cas < 2 {
        return Err(Failure(format!(
            "the bundle held {cas} CA(s) when the new certificate was served"
        )));
    }
    eprintln!("rotation: new serving certificate after {at:?}; {created} pods admitted across it");
    // The old CA then leaves the published bundle, and pods still go in:
    // the API server trusts only the new CA now.
    let old_ca = served_ca(&old);
    let configs: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(env.cluster.client.clone());
    wait_until(
        "the old CA out of the caBundle",
        Duration::from_secs(30),
        || async {
            let config = configs
                .get("credbroker-webhook")
                .await
                .map_err(|e| e.to_string())?;
            let bundles: Vec<String> = config
                .webhooks
                .unwrap_or_default()
                .iter()
                .filter_map(|h| h.client_config.ca_bundle.as_ref())
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .collect();
            let only_new = !bundles.is_empty()
                && bundles.iter().all(|b| {
                    b.matches("BEGIN CERTIFICATE").count() == 1 && !old_ca.contains(b.trim())
                });
            if only_new {
                Ok(())
            } else {
                Err(format!("{} bundle(s) still with the old CA", bundles.len()))
            }
        },
    )
    .await?;
    for i in 0..3 {
        env.server
            .kubectl_apply(
                &agent_pod("agents", &format!("after-{i}"), "annotation"),
                &[],
            )
            .map_err(|e| Failure(format!("admission after the old CA left the bundle: {e}")))?;
    }

    // 5. The webhook down: opted-in pods fail closed, others are created.
    webhook.process.pause()?;
    let stderr = refused(
        &env.server,
        &agent_pod("agents", "while-down", "annotation"),
    )?;
    if !stderr.contains("failed calling webhook") {
        return Err(Failure(format!("with the webhook down: {stderr}")));
    }
    // Pods that did not opt in are not sent, so they are created while the
    // webhook is down, in a labelled namespace too.
    for (ns, name) in [
        ("other", "while-down-other"),
        ("agents", "while-down-plain"),
    ] {
        let created = env.server.kubectl_apply(&agent_pod(ns, name, ""), &[]);
        if let Err(stderr) = created {
            let _ = webhook.process.resume();
            return Err(Failure(format!(
                "{ns}/{name}, not opted in, was not created while the webhook was down: {stderr}"
            )));
        }
        assert_untouched(&env.pod(ns, name).await?)?;
    }
    webhook.process.resume()?;

    // No secret is involved here, but no pod env value may reach the logs:
    // the user-set key of the golden case is the canary.
    let canary = "sk-not-a-real-key-but-the-user-set-one";
    let _ = env.server.kubectl_apply(
        &std::fs::read_to_string(golden("user-ca-variables", "pod.yaml"))?,
        &[],
    );
    let output = webhook.process.output();
    if output.contains(canary) {
        return Err(Failure("a pod env value reached the webhook's log".into()));
    }
    let _ = &env.dir;
    Ok(())
}
