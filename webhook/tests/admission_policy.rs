//! The admission policy (`deploy/admission-policy.yaml`, with the example
//! parameters of `deploy/admission-params.yaml`) against a real
//! kube-apiserver + etcd, as a user meets it: pods go in through the real
//! `kubectl apply -f -`, whose stderr must carry the policy's message, and
//! ephemeral containers through the `pods/ephemeralcontainers` subresource,
//! whose API error must. One API server for every case; each test works in
//! its own namespace.
//!
//! The API server runs no ServiceAccount admission plugin, so pods need no
//! real service account, and no kubelet, so no pod ever runs: admission is
//! all there is to see.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use credbroker_test_support::apiserver::{Cluster, TestApiServer};
use credbroker_test_support::{Failure, TestResult, run, wait_until};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};

const BROKER_NS: &str = "credbroker-system";
const POLICY: &str = "credbroker-broker-token";
const PARAMS: &str = "credbroker-admission";
/// How long a new policy may take to become effective.
const EFFECTIVE_WITHIN: Duration = Duration::from_secs(30);

/// The policy's parameters, as the API server stored them from the
/// example file (so the cases follow the file, not a copy of it).
#[derive(Clone)]
struct Params {
    audience: String,
    sidecar_image: String,
    init_image: String,
    proxy_uid: i64,
}

/// The shared API server with the namespaces, the parameters and the
/// policy installed, and the policy in force.
async fn setup() -> TestResult<(Arc<TestApiServer>, Params)> {
    static INSTALLED: tokio::sync::OnceCell<Result<Params, String>> =
        tokio::sync::OnceCell::const_new();
    let server = TestApiServer::shared().await?;
    let params = INSTALLED
        .get_or_init(|| {
            let server = server.clone();
            async move { install(&server).await.map_err(|e| e.0) }
        })
        .await
        .clone()
        .map_err(|e| Failure(format!("installing the admission policy: {e}")))?;
    Ok((server, params))
}

async fn install(server: &TestApiServer) -> TestResult<Params> {
    eprintln!("kube-apiserver + etcd started in {:?}", server.startup);
    let started = Instant::now();
    let cluster = Cluster::new(server.client().await?);
    cluster.create_namespace(BROKER_NS, &[]).await?;
    let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy");
    // Parameters first: the binding denies everything while they are missing.
    for file in ["admission-params.yaml", "admission-policy.yaml"] {
        run(server
            .kubectl()
            .args(["apply", "-f", &deploy.join(file).display().to_string()]))?;
    }
    let cm = Api::<ConfigMap>::namespaced(cluster.client.clone(), BROKER_NS)
        .get(PARAMS)
        .await?;
    let data = cm.data.unwrap_or_default();
    let key = |k: &str| {
        data.get(k)
            .cloned()
            .ok_or_else(|| Failure(format!("{PARAMS} has no data key {k}")))
    };
    let namespace = key("namespace")?;
    if namespace != BROKER_NS {
        return Err(Failure(format!(
            "{PARAMS} names namespace {namespace}, the tests expect {BROKER_NS}"
        )));
    }
    let params = Params {
        audience: key("audience")?,
        sidecar_image: key("sidecarImage")?,
        init_image: key("initImage")?,
        proxy_uid: key("proxyUID")?
            .parse()
            .map_err(|e| Failure(format!("{PARAMS} proxyUID: {e}")))?,
    };

    // A new policy (and its parameters) reaches the admission plugin a
    // moment later: probe with a pod it must refuse, server-side dry run
    // so nothing is stored, until the refusal is ours.
    cluster.create_namespace("probe", &[]).await?;
    let probe = pod(
        "probe",
        "probe",
        json!({
            "serviceAccountName": "agent",
            "containers": [agent("probe", &["credbroker-token"])],
            "volumes": [token_volume("credbroker-token", &params.audience)],
        }),
    );
    wait_until(
        "the admission policy to refuse a probe pod",
        EFFECTIVE_WITHIN,
        || {
            let outcome = kubectl_apply(server, &probe, &["--dry-run=server"]);
            async move {
                match outcome.map_err(|e| e.0)? {
                    Err(stderr) if stderr.contains("container probe: volumeMounts mounts") => {
                        Ok(())
                    }
                    Err(stderr) => Err(format!("refused, but not by the policy yet: {stderr}")),
                    Ok(stdout) => Err(format!("still admitted: {stdout}")),
                }
            }
        },
    )
    .await?;
    eprintln!(
        "policy in force {:?} after install started",
        started.elapsed()
    );
    Ok(params)
}

// ---------------------------------------------------------------------------
// Pods as the cases write them.

fn pod(name: &str, ns: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": ns },
        "spec": spec,
    })
}

/// A projected service-account token volume with `audience`.
fn token_volume(name: &str, audience: &str) -> Value {
    json!({
        "name": name,
        "projected": { "sources": [{
            "serviceAccountToken": { "audience": audience, "expirationSeconds": 600, "path": "token" }
        }]},
    })
}

/// An app container mounting `volumes`.
fn agent(name: &str, volumes: &[&str]) -> Value {
    let mounts: Vec<Value> = volumes
        .iter()
        .map(|v| json!({ "name": v, "mountPath": format!("/mnt/{v}") }))
        .collect();
    json!({ "name": name, "image": "registry.example/agent:1", "volumeMounts": mounts })
}

/// A pod as the webhook injects it (webhook/src/mutate.rs): credbroker-init,
/// then the native sidecar holding the token, then the agent with only the
/// trust bundle. Cases edit it by index: initContainers[0] is
/// credbroker-init, [1] credbroker-sidecar; containers[0] the agent.
fn injected_pod(name: &str, ns: &str, p: &Params) -> Value {
    let uid = p.proxy_uid;
    let mount = |name: &str, path: &str, read_only: bool| json!({ "name": name, "mountPath": path, "readOnly": read_only });
    let memory = |name: &str| json!({ "name": name, "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } });
    let probe =
        |path: &str| json!({ "httpGet": { "path": path, "port": 15021, "scheme": "HTTP" } });
    pod(
        name,
        ns,
        json!({
            "serviceAccountName": "research",
            "automountServiceAccountToken": false,
            "initContainers": [
                {
                    "name": "credbroker-init",
                    "image": p.init_image,
                    "command": ["/usr/local/bin/credbroker-sidecar"],
                    "args": ["init", format!("--proxy-uid={uid}"), format!("--proxy-gid={uid}"), "--proxy-port=15001"],
                    "securityContext": {
                        "runAsUser": 0, "runAsNonRoot": false, "privileged": false,
                        "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                        "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
                    },
                    "volumeMounts": [mount("credbroker-xtables", "/run", false)],
                },
                {
                    "name": "credbroker-sidecar",
                    "image": p.sidecar_image,
                    "command": ["/usr/local/bin/credbroker-sidecar"],
                    "args": ["proxy"],
                    "restartPolicy": "Always",
                    "env": [
                        { "name": "CREDBROKER_VAULT_ADDR", "value": "https://vault.example:8200" },
                        { "name": "CREDBROKER_VAULT_JWT_FILE", "value": "/var/run/secrets/credbroker/token" },
                    ],
                    "startupProbe": probe("/readyz"),
                    "livenessProbe": probe("/healthz"),
                    "securityContext": {
                        "runAsUser": uid, "runAsGroup": uid, "runAsNonRoot": true,
                        "privileged": false, "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] },
                    },
                    "volumeMounts": [
                        mount("credbroker-token", "/var/run/secrets/credbroker", true),
                        mount("credbroker-bindings", "/etc/credbroker/bindings", true),
                        mount("credbroker-pod", "/etc/credbroker/pod", true),
                        mount("credbroker-ca", "/var/run/credbroker/ca", false),
                        mount("credbroker-trust", "/var/run/credbroker/trust", false),
                    ],
                },
            ],
            "containers": [{
                "name": "agent",
                "image": "registry.example/agent:1",
                "volumeMounts": [mount("credbroker-trust", "/var/run/credbroker/trust", true)],
            }],
            "volumes": [
                token_volume("credbroker-token", &p.audience),
                {
                    "name": "credbroker-bindings",
                    "configMap": { "name": "credbroker-research-0123abcd", "optional": true },
                },
                {
                    "name": "credbroker-pod",
                    "downwardAPI": { "items": [{ "path": "name", "fieldRef": { "fieldPath": "metadata.name" } }] },
                },
                memory("credbroker-ca"),
                memory("credbroker-trust"),
                memory("credbroker-xtables"),
            ],
        }),
    )
}

fn sidecar_mut(pod: &mut Value) -> &mut Value {
    &mut pod["spec"]["initContainers"][1]
}

// ---------------------------------------------------------------------------
// What the user sees.

/// `kubectl apply -f -` of `manifest`: `Ok(stdout)` if applied,
/// `Err(stderr)` if refused. Failing to run kubectl at all is a `Failure`.
fn kubectl_apply(
    server: &TestApiServer,
    manifest: &Value,
    extra: &[&str],
) -> TestResult<Result<String, String>> {
    let mut child = server
        .kubectl()
        .args(["apply", "--request-timeout=30s", "-f", "-"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure(format!("running kubectl: {e}")))?;
    child
        .stdin
        .take()
        .ok_or_else(|| Failure("kubectl has no stdin".into()))?
        .write_all(manifest.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    })
}

/// Runs cases, records every wrong answer, and fails at the end with all of
/// them, so one run shows everything that is off.
struct Cases<'a> {
    server: &'a TestApiServer,
    test: &'static str,
    wrong: Vec<String>,
    started: Instant,
}

impl<'a> Cases<'a> {
    fn new(server: &'a TestApiServer, test: &'static str) -> Self {
        Self {
            server,
            test,
            wrong: Vec::new(),
            started: Instant::now(),
        }
    }

    fn record(&mut self, what: &str, ok: bool, detail: String) {
        let verdict = if ok { "ok   " } else { "WRONG" };
        eprintln!("[{}] {verdict} {what}", self.test);
        if !ok {
            self.wrong.push(format!("{what}: {detail}"));
        }
    }

    /// `kubectl apply` must be refused by this policy, and stderr must
    /// carry every fragment of `expect`.
    fn refused(&mut self, what: &str, manifest: &Value, expect: &[&str]) -> TestResult {
        let name = manifest["metadata"]["name"].as_str().unwrap_or_default();
        match kubectl_apply(self.server, manifest, &[])? {
            Ok(stdout) => self.record(what, false, format!("admitted: {stdout}")),
            Err(stderr) => {
                let ours = format!(
                    "pods \"{name}\" is forbidden: ValidatingAdmissionPolicy '{POLICY}' with binding \
                     '{POLICY}' denied request: "
                );
                let missing: Vec<&str> = std::iter::once(ours.as_str())
                    .chain(expect.iter().copied())
                    .filter(|f| !stderr.contains(f))
                    .collect();
                self.record(
                    what,
                    missing.is_empty(),
                    format!("refused, but stderr lacks {missing:?}:\n{stderr}"),
                );
            }
        }
        Ok(())
    }

    /// `kubectl apply` must succeed.
    fn admitted(&mut self, what: &str, manifest: &Value) -> TestResult {
        match kubectl_apply(self.server, manifest, &[])? {
            Ok(_) => self.record(what, true, String::new()),
            Err(stderr) => self.record(what, false, format!("refused:\n{stderr}")),
        }
        Ok(())
    }

    /// An API call (the ephemeral-containers subresource) must be refused
    /// with 403 by this policy, its message carrying every fragment.
    fn api_refused<T>(&mut self, what: &str, result: Result<T, kube::Error>, expect: &[&str]) {
        match result {
            Ok(_) => self.record(what, false, "admitted".into()),
            Err(kube::Error::Api(status)) => {
                let ours = format!("ValidatingAdmissionPolicy '{POLICY}'");
                let missing: Vec<&str> = std::iter::once(ours.as_str())
                    .chain(expect.iter().copied())
                    .filter(|f| !status.message.contains(f))
                    .collect();
                self.record(
                    what,
                    status.code == 403 && missing.is_empty(),
                    format!(
                        "refused ({}), message lacks {missing:?}: {}",
                        status.code, status.message
                    ),
                );
            }
            Err(e) => self.record(what, false, format!("failed otherwise: {e}")),
        }
    }

    fn api_admitted<T>(&mut self, what: &str, result: Result<T, kube::Error>) {
        match result {
            Ok(_) => self.record(what, true, String::new()),
            Err(e) => self.record(what, false, format!("refused: {e}")),
        }
    }

    fn finish(self) -> TestResult {
        eprintln!("[{}] cases took {:?}", self.test, self.started.elapsed());
        if self.wrong.is_empty() {
            Ok(())
        } else {
            Err(Failure(format!(
                "{} case(s) answered wrong:\n- {}",
                self.wrong.len(),
                self.wrong.join("\n- ")
            )))
        }
    }
}

async fn names_of_pods(client: &kube::Client, ns: &str) -> TestResult<Vec<String>> {
    let mut names: Vec<String> = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    names.sort();
    Ok(names)
}

// ---------------------------------------------------------------------------
// The cases.

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn only_the_injected_sidecar_may_hold_a_broker_audience_token() -> TestResult {
    let (server, p) = setup().await?;
    let client = server.client().await?;
    let ns = "agents-create";
    Cluster::new(client.clone())
        .create_namespace(ns, &[])
        .await?;
    let aud = p.audience.as_str();
    let mut cases = Cases::new(&server, "create");

    let plain = |name: &str, volume: &str| {
        pod(
            name,
            ns,
            json!({
                "serviceAccountName": "research",
                "containers": [agent("agent", &[volume])],
                "volumes": [token_volume(volume, aud)],
            }),
        )
    };
    cases.refused(
        "a plain pod mounting a broker-audience token in its container",
        &plain("plain", "credbroker-token"),
        &[
            "container agent: volumeMounts mounts credbroker-token",
            "broker audience",
        ],
    )?;
    // Judged by content: another name, and the token beside other sources.
    let mut renamed = plain("renamed", "cache");
    renamed["spec"]["volumes"][0]["projected"]["sources"]
        .as_array_mut()
        .ok_or_else(|| Failure("no sources".into()))?
        .insert(0, json!({ "configMap": { "name": "settings" } }));
    cases.refused(
        "the same token in a volume of another name, beside a ConfigMap source",
        &renamed,
        &["container agent: volumeMounts mounts cache"],
    )?;
    let mut init_holder = plain("init-holder", "credbroker-token");
    init_holder["spec"]["initContainers"] = json!([agent("setup", &["credbroker-token"])]);
    init_holder["spec"]["containers"] = json!([agent("agent", &[])]);
    cases.refused(
        "an ordinary init container mounting the token",
        &init_holder,
        &["init container setup: volumeMounts mounts credbroker-token"],
    )?;

    cases.admitted(
        "an injected pod: the token only in the sidecar",
        &injected_pod("injected", ns, &p),
    )?;
    let mut agent_too = injected_pod("agent-too", ns, &p);
    agent_too["spec"]["containers"] = json!([agent("agent", &["credbroker-token"])]);
    cases.refused(
        "an injected pod whose agent mounts the token too",
        &agent_too,
        &["container agent: volumeMounts mounts credbroker-token"],
    )?;

    for field in ["shareProcessNamespace", "hostPID"] {
        let mut shared = injected_pod(&format!("shared-{}", field.to_lowercase()), ns, &p);
        shared["spec"][field] = json!(true);
        cases.refused(
            &format!("an injected pod with {field}"),
            &shared,
            &[&format!(
                "pod: spec.{field} is true in a pod with volume credbroker-token"
            )],
        )?;
    }

    // Fake sidecars: the name alone is not the sidecar.
    // (pod name, what, the edit to the sidecar, what the message must say)
    type Fake = (&'static str, &'static str, fn(&mut Value), &'static str);
    let fakes: [Fake; 6] = [
        (
            "fake-image",
            "a sidecar with another image",
            |s| s["image"] = json!("registry.example/evil:1"),
            "image registry.example/evil:1 is not the sidecar image",
        ),
        (
            "fake-command",
            "a sidecar with another command",
            |s| s["command"] = json!(["/bin/sh", "-c", "cat /var/run/secrets/credbroker/token"]),
            "command is not [\"/usr/local/bin/credbroker-sidecar\"]",
        ),
        (
            "fake-uid",
            "a sidecar running as another UID",
            |s| s["securityContext"]["runAsUser"] = json!(1000),
            "securityContext.runAsUser is not the proxy UID",
        ),
        (
            "fake-args",
            "a sidecar running another subcommand",
            |s| s["args"] = json!(["init"]),
            "args[0] is not proxy",
        ),
        (
            "fake-restart",
            "a sidecar that is a plain init container (no restartPolicy Always)",
            |s| {
                // Probes are for restartable init containers only.
                if let Some(o) = s.as_object_mut() {
                    for k in ["restartPolicy", "startupProbe", "livenessProbe"] {
                        o.remove(k);
                    }
                }
            },
            "restartPolicy is not Always",
        ),
        (
            "fake-privileged",
            "a privileged sidecar",
            |s| {
                s["securityContext"]["privileged"] = json!(true);
                s["securityContext"]["allowPrivilegeEscalation"] = json!(true);
            },
            "securityContext.privileged is true",
        ),
    ];
    for (name, what, edit, expect) in fakes {
        let mut fake = injected_pod(name, ns, &p);
        edit(sidecar_mut(&mut fake));
        cases.refused(
            what,
            &fake,
            &["init container credbroker-sidecar: ", expect],
        )?;
    }
    let mut as_app = injected_pod("sidecar-as-app", ns, &p);
    let sidecar = sidecar_mut(&mut as_app).clone();
    as_app["spec"]["initContainers"] = json!([]);
    as_app["spec"]["containers"] = json!([agent("agent", &[]), {
        "name": "credbroker-sidecar",
        "image": sidecar["image"],
        "command": sidecar["command"],
        "args": sidecar["args"],
        "securityContext": sidecar["securityContext"],
        "volumeMounts": sidecar["volumeMounts"],
    }]);
    cases.refused(
        "a container named credbroker-sidecar among the app containers",
        &as_app,
        &["container credbroker-sidecar: volumeMounts mounts credbroker-token"],
    )?;
    let unheld = pod(
        "unheld",
        ns,
        json!({
            "serviceAccountName": "research",
            "containers": [agent("agent", &[])],
            "volumes": [token_volume("spare", aud)],
        }),
    );
    cases.refused(
        "a broker-audience token volume with no sidecar at all",
        &unheld,
        &["pod: volume spare", "no init container credbroker-sidecar"],
    )?;
    let mut fake_init = injected_pod("fake-init", ns, &p);
    fake_init["spec"]["initContainers"][0]["image"] = json!("registry.example/evil-init:1");
    cases.refused(
        "an injected pod whose credbroker-init is another image",
        &fake_init,
        &["init container credbroker-init: image registry.example/evil-init:1 is not the broker init image"],
    )?;

    // Untouched: other audiences, and the broker's own namespace.
    let other = pod(
        "other-audiences",
        ns,
        json!({
            "serviceAccountName": "research",
            "containers": [agent("agent", &["vault-token", "kube-api-access"])],
            "volumes": [
                token_volume("vault-token", "vault"),
                // As the ServiceAccount admission plugin adds it: no audience
                // (the API server's own).
                { "name": "kube-api-access", "projected": { "sources": [
                    { "serviceAccountToken": { "expirationSeconds": 3607, "path": "token" } },
                    { "configMap": { "name": "kube-root-ca.crt", "items": [{ "key": "ca.crt", "path": "ca.crt" }] } },
                ]}},
            ],
        }),
    );
    cases.admitted(
        "tokens of other audiences (vault, the API server's) in an agent",
        &other,
    )?;
    let mut in_broker_ns = plain("broker-own", "credbroker-token");
    in_broker_ns["metadata"]["namespace"] = json!(BROKER_NS);
    cases.admitted(
        "a broker-audience token in a container in the broker's namespace",
        &in_broker_ns,
    )?;

    // A refusal stores nothing: exactly the admitted pods exist.
    let stored = names_of_pods(&client, ns).await?;
    cases.record(
        "refused pods were not stored",
        stored == ["injected", "other-audiences"],
        format!("pods in {ns}: {stored:?}"),
    );
    cases.finish()
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn the_broker_containers_keep_their_image_command_and_args() -> TestResult {
    let (server, p) = setup().await?;
    let client = server.client().await?;
    let ns = "agents-update";
    Cluster::new(client.clone())
        .create_namespace(ns, &[])
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let mut cases = Cases::new(&server, "update");

    let original = injected_pod("updated", ns, &p);
    cases.admitted("the injected pod", &original)?;

    let mut sidecar_image = original.clone();
    sidecar_image["spec"]["initContainers"][1]["image"] = json!("registry.example/evil:1");
    cases.refused(
        "kubectl apply changing the sidecar's image",
        &sidecar_image,
        &[&format!(
            "init container credbroker-sidecar: image may not change (from {} to registry.example/evil:1)",
            p.sidecar_image
        )],
    )?;
    let mut init_image = original.clone();
    init_image["spec"]["initContainers"][0]["image"] = json!("registry.example/evil-init:1");
    cases.refused(
        "kubectl apply changing credbroker-init's image",
        &init_image,
        &["init container credbroker-init: image may not change"],
    )?;

    let mut agent_image = original.clone();
    agent_image["spec"]["containers"][0]["image"] = json!("registry.example/agent:2");
    agent_image["metadata"]["labels"] = json!({ "rollout": "2" });
    cases.admitted(
        "kubectl apply changing the agent's image and a label",
        &agent_image,
    )?;
    let now = pods.get("updated").await?;
    let spec = now.spec.unwrap_or_default();
    let image_of = |list: &[k8s_openapi::api::core::v1::Container], name: &str| {
        list.iter()
            .find(|c| c.name == name)
            .and_then(|c| c.image.clone())
            .unwrap_or_default()
    };
    let agent_now = image_of(&spec.containers, "agent");
    let init_list = spec.init_containers.unwrap_or_default();
    let sidecar_now = image_of(&init_list, "credbroker-sidecar");
    cases.record(
        "the stored pod has the new agent image and the original sidecar image",
        agent_now == "registry.example/agent:2" && sidecar_now == p.sidecar_image,
        format!("agent {agent_now}, sidecar {sidecar_now}"),
    );
    cases.finish()
}

/// Adds `container` to the pod's ephemeral containers, as `kubectl debug` does.
async fn add_ephemeral(pods: &Api<Pod>, name: &str, container: Value) -> Result<Pod, kube::Error> {
    let mut pod = serde_json::to_value(pods.get(name).await?).map_err(kube::Error::SerdeError)?;
    let list = &mut pod["spec"]["ephemeralContainers"];
    if !list.is_array() {
        *list = json!([]);
    }
    if let Some(list) = list.as_array_mut() {
        list.push(container);
    }
    pods.replace_subresource("ephemeralcontainers", name, &PostParams::default(), &pod)
        .await
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn ephemeral_containers_keep_away_from_the_broker() -> TestResult {
    let (server, p) = setup().await?;
    let client = server.client().await?;
    let ns = "agents-debug";
    Cluster::new(client.clone())
        .create_namespace(ns, &[])
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let mut cases = Cases::new(&server, "ephemeral");
    cases.admitted("the injected pod", &injected_pod("debugged", ns, &p))?;
    // The token under a name of its own: still found by content.
    let mut renamed = injected_pod("renamed", ns, &p);
    renamed["spec"]["volumes"][0]["name"] = json!("vault-login");
    sidecar_mut(&mut renamed)["volumeMounts"][0]["name"] = json!("vault-login");
    cases.admitted(
        "an injected pod whose token volume has another name",
        &renamed,
    )?;

    let debugger = |extra: Value| {
        let mut c = json!({ "name": "debugger", "image": "registry.example/debug:1" });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        c
    };
    cases.api_refused(
        "an ephemeral container mounting credbroker-token",
        add_ephemeral(
            &pods,
            "debugged",
            debugger(json!({ "volumeMounts": [{ "name": "credbroker-token", "mountPath": "/t" }] })),
        )
        .await,
        &["ephemeral container debugger: mounts broker volume credbroker-token; only the injected credbroker-sidecar may"],
    );
    cases.api_refused(
        "an ephemeral container mounting the pod CA's key volume",
        add_ephemeral(
            &pods,
            "debugged",
            debugger(json!({ "volumeMounts": [{ "name": "credbroker-ca", "mountPath": "/ca" }] })),
        )
        .await,
        &["ephemeral container debugger: mounts broker volume credbroker-ca"],
    );
    cases.api_refused(
        "an ephemeral container mounting a renamed token volume",
        add_ephemeral(
            &pods,
            "renamed",
            debugger(json!({ "volumeMounts": [{ "name": "vault-login", "mountPath": "/t" }] })),
        )
        .await,
        &["ephemeral container debugger: mounts broker volume vault-login"],
    );
    for target in ["credbroker-sidecar", "credbroker-init"] {
        cases.api_refused(
            &format!("an ephemeral container targeting {target}"),
            add_ephemeral(
                &pods,
                "debugged",
                debugger(json!({ "targetContainerName": target })),
            )
            .await,
            &[&format!(
                "ephemeral container debugger: targetContainerName {target} is a broker container"
            )],
        );
    }
    cases.api_refused(
        "an ephemeral container running as the proxy UID",
        add_ephemeral(
            &pods,
            "debugged",
            debugger(json!({ "securityContext": { "runAsUser": p.proxy_uid } })),
        )
        .await,
        &[&format!(
            "ephemeral container debugger: securityContext.runAsUser is the proxy UID {}",
            p.proxy_uid
        )],
    );
    cases.api_refused(
        "an ephemeral container adding net_admin",
        add_ephemeral(
            &pods,
            "debugged",
            debugger(json!({ "securityContext": { "capabilities": { "add": ["net_admin"] } } })),
        )
        .await,
        &["ephemeral container debugger: securityContext.capabilities.add has net_admin"],
    );
    cases.api_admitted(
        "a harmless ephemeral container targeting the agent",
        add_ephemeral(
            &pods,
            "debugged",
            debugger(json!({ "targetContainerName": "agent" })),
        )
        .await,
    );
    let stored: Vec<String> = pods
        .get("debugged")
        .await?
        .spec
        .and_then(|s| s.ephemeral_containers)
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            format!(
                "{}->{}",
                c.name,
                c.target_container_name.unwrap_or_default()
            )
        })
        .collect();
    cases.record(
        "only the harmless ephemeral container was stored",
        stored == ["debugger->agent"],
        format!("{stored:?}"),
    );
    cases.finish()
}
