//! The admission policies (`deploy/admission-policy.yaml`, which also holds
//! the one that lets the webhook change only the caBundle of its
//! registration, and `deploy/bindings-configmap-policy.yaml`) against a
//! real kube-apiserver + etcd, as a user meets them: pods and ConfigMaps go in through the real
//! `kubectl apply -f -`, whose stderr must carry the policy's message, and
//! ephemeral containers through the `pods/ephemeralcontainers` subresource,
//! whose API error must. The policies are applied as written; the cases
//! take the audience, images and proxy UID from the policy's own settings
//! variables, so they follow the file, not a copy of it. One API server for
//! every case; each test works in its own namespace. The upgrade test
//! renders the settings as the chart does during an upgrade, on an API
//! server of its own.
//!
//! The API server runs no ServiceAccount admission plugin, so pods need no
//! real service account, and no kubelet, so no pod ever runs: admission is
//! all there is to see.
//!
//! The drift test needs no API server: the names and values in the YAML
//! match what the webhook injects and its defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use credbroker_crds::keys::{self, injected};
use credbroker_test_support::apiserver::{
    Cluster, SERVICE_ACCOUNT_ISSUER, TestApiServer, client_from_kubeconfig,
};
use credbroker_test_support::{Failure, TestResult, wait_until};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};

const BROKER_NS: &str = "credbroker-system";
const POLICY: &str = "credbroker-broker-token";
const BINDINGS_POLICY: &str = "credbroker-bindings-configmaps";
const WEBHOOK_CONFIGURATION_POLICY: &str = "credbroker-webhook-configuration";
/// The webhook's registration (deploy/mutating-webhook.yaml).
const REGISTRATION: &str = "credbroker-webhook";
/// How long a new policy may take to become effective.
const EFFECTIVE_WITHIN: Duration = Duration::from_secs(30);

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn read_deploy(file: &str) -> TestResult<String> {
    std::fs::read_to_string(deploy(file)).map_err(|e| Failure(format!("reading {file}: {e}")))
}

// ---------------------------------------------------------------------------
// The policies' settings: the literal CEL values at the top of their
// `spec.variables`, the lines the chart templates.

/// The YAML documents of a deploy file.
fn documents(text: &str) -> TestResult<Vec<Value>> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).map_err(|e| Failure(format!("YAML: {e}"))))
        .collect()
}

/// The ValidatingAdmissionPolicy `name` in `file`, and its variables
/// (name to expression).
fn policy(file: &str, name: &str) -> TestResult<(Value, BTreeMap<String, String>)> {
    let doc = documents(&read_deploy(file)?)?
        .into_iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy" && d["metadata"]["name"] == name)
        .ok_or_else(|| Failure(format!("{file} has no ValidatingAdmissionPolicy {name}")))?;
    let variables = variables_of(&doc);
    Ok((doc, variables))
}

/// A policy's `spec.variables`, name to expression.
fn variables_of(policy: &Value) -> BTreeMap<String, String> {
    policy["spec"]["variables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_owned(),
                v["expression"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

fn variable<'a>(vars: &'a BTreeMap<String, String>, name: &str) -> TestResult<&'a str> {
    vars.get(name)
        .map(|e| e.trim())
        .ok_or_else(|| Failure(format!("the policy has no variable {name}")))
}

/// A CEL string literal in single quotes, with no quote or escape inside:
/// all the chart renders.
fn cel_string(expr: &str) -> TestResult<String> {
    expr.strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .filter(|s| !s.contains(['\'', '"', '\\']))
        .map(str::to_owned)
        .ok_or_else(|| Failure(format!("{expr:?} is not a plain CEL string literal")))
}

/// A CEL list literal of such strings.
fn cel_strings(expr: &str) -> TestResult<Vec<String>> {
    let inner = expr
        .trim()
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| Failure(format!("{expr:?} is not a CEL list literal")))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(cel_string)
        .collect()
}

fn cel_int(expr: &str) -> TestResult<i64> {
    expr.parse()
        .map_err(|e| Failure(format!("{expr:?} is not a CEL int literal: {e}")))
}

/// The broker-token policy's settings, as the file (or a rendering of it)
/// gives them.
#[derive(Clone, Debug)]
struct Params {
    broker_namespace: String,
    audience: String,
    sidecar_images: Vec<String>,
    init_images: Vec<String>,
    proxy_uid: i64,
}

impl Params {
    fn parse(vars: &BTreeMap<String, String>) -> TestResult<Self> {
        let p = Self {
            broker_namespace: cel_string(variable(vars, "brokerNamespace")?)?,
            audience: cel_string(variable(vars, "audience")?)?,
            sidecar_images: cel_strings(variable(vars, "sidecarImages")?)?,
            init_images: cel_strings(variable(vars, "initImages")?)?,
            proxy_uid: cel_int(variable(vars, "proxyUID")?)?,
        };
        if p.sidecar_images.is_empty() || p.init_images.is_empty() || p.audience.is_empty() {
            return Err(Failure(format!("empty settings: {p:?}")));
        }
        Ok(p)
    }

    fn from_file() -> TestResult<Self> {
        Self::parse(&policy("admission-policy.yaml", POLICY)?.1)
    }

    /// The image a webhook with these settings injects (the first).
    fn sidecar_image(&self) -> &str {
        &self.sidecar_images[0]
    }
    fn init_image(&self) -> &str {
        &self.init_images[0]
    }
}

// ---------------------------------------------------------------------------
// Installing the policies.

/// The shared API server with the namespaces and both policies installed
/// as written, and in force.
async fn setup() -> TestResult<(Arc<TestApiServer>, Params)> {
    static INSTALLED: tokio::sync::OnceCell<Result<Params, String>> =
        tokio::sync::OnceCell::const_new();
    let server = TestApiServer::shared().await?;
    let params = INSTALLED
        .get_or_init(|| {
            let server = server.clone();
            async move {
                eprintln!("kube-apiserver + etcd started in {:?}", server.startup);
                let token = read_deploy("admission-policy.yaml").map_err(|e| e.0)?;
                let bindings = read_deploy("bindings-configmap-policy.yaml").map_err(|e| e.0)?;
                install(&server, &token, Some(&bindings))
                    .await
                    .map_err(|e| e.0)
            }
        })
        .await
        .clone()
        .map_err(|e| Failure(format!("installing the admission policies: {e}")))?;
    Ok((server, params))
}

/// Applies the broker-token policy `token_yaml` (and the bindings policy)
/// and waits until both are in force. Returns the token policy's settings.
async fn install(
    server: &TestApiServer,
    token_yaml: &str,
    bindings_yaml: Option<&str>,
) -> TestResult<Params> {
    let started = Instant::now();
    let token_policy = documents(token_yaml)?
        .into_iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .ok_or_else(|| Failure("no ValidatingAdmissionPolicy to install".into()))?;
    let params = Params::parse(&variables_of(&token_policy))?;
    if params.broker_namespace != BROKER_NS {
        return Err(Failure(format!(
            "the policy names broker namespace {}, the tests expect {BROKER_NS}",
            params.broker_namespace
        )));
    }
    let cluster = Cluster::new(server.client().await?);
    cluster.create_namespace(BROKER_NS, &[]).await?;
    cluster.create_namespace("probe", &[]).await?;
    // No parameter objects: the policies stand alone, in any order.
    server.kubectl_apply(token_yaml, &[]).map_err(Failure)?;
    if let Some(bindings) = bindings_yaml {
        server.kubectl_apply(bindings, &[]).map_err(Failure)?;
    }

    // A new policy reaches the admission plugin a moment later: probe with
    // objects it must refuse, server-side dry run so nothing is stored,
    // until the refusal is ours.
    let mut probes = vec![(
        "the broker-token policy",
        pod(
            "probe",
            "probe",
            json!({
                "serviceAccountName": "agent",
                "containers": [agent("probe", &["credbroker-token"])],
                "volumes": [token_volume("credbroker-token", &params.audience)],
            }),
        ),
        "container probe: volumeMounts mounts",
    )];
    if bindings_yaml.is_some() {
        probes.push((
            "the bindings-ConfigMap policy",
            bindings_configmap("probe", "probe"),
            "only the credbroker controller",
        ));
    }
    for (what, probe, ours) in probes {
        wait_until(
            &format!("{what} to refuse a probe"),
            EFFECTIVE_WITHIN,
            || {
                let outcome = server.kubectl_apply(&probe.to_string(), &["--dry-run=server"]);
                async move {
                    match outcome {
                        Err(stderr) if stderr.contains(ours) => Ok(()),
                        Err(stderr) => Err(format!("refused, but not by the policy yet: {stderr}")),
                        Ok(stdout) => Err(format!("still admitted: {stdout}")),
                    }
                }
            },
        )
        .await?;
    }
    eprintln!(
        "policies in force {:?} after install started",
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
                    "image": p.init_image(),
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
                    "image": p.sidecar_image(),
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

/// A ConfigMap that holds bindings, as only the controller may write one.
fn bindings_configmap(name: &str, ns: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": { "app.kubernetes.io/managed-by": keys::MANAGED_BY },
        },
        "data": { keys::BINDINGS_CONFIGMAP_KEY: "{}" },
    })
}

fn sidecar_mut(pod: &mut Value) -> &mut Value {
    &mut pod["spec"]["initContainers"][1]
}

// ---------------------------------------------------------------------------
// What the user sees.

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

    /// `kubectl apply` must be refused by our policy for the manifest's
    /// kind (a Pod's or a ConfigMap's), and stderr must carry every
    /// fragment of `expect`.
    fn refused(&mut self, what: &str, manifest: &Value, expect: &[&str]) {
        let name = manifest["metadata"]["name"].as_str().unwrap_or_default();
        let (resource, policy) = match manifest["kind"].as_str() {
            Some("ConfigMap") => ("configmaps", BINDINGS_POLICY),
            _ => ("pods", POLICY),
        };
        match self.server.kubectl_apply(&manifest.to_string(), &[]) {
            Ok(stdout) => self.record(what, false, format!("admitted: {stdout}")),
            Err(stderr) => {
                let ours = format!(
                    "{resource} \"{name}\" is forbidden: ValidatingAdmissionPolicy '{policy}' \
                     with binding '{policy}' denied request: "
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
    }

    /// `kubectl apply` must succeed.
    fn admitted(&mut self, what: &str, manifest: &Value) {
        match self.server.kubectl_apply(&manifest.to_string(), &[]) {
            Ok(_) => self.record(what, true, String::new()),
            Err(stderr) => self.record(what, false, format!("refused:\n{stderr}")),
        }
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
// Drift: no API server.

/// The values of the `kubernetes.io/metadata.name NotIn` expressions of a
/// namespaceSelector.
fn excluded_namespaces(selector: &Value) -> Vec<String> {
    selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
        .flat_map(|e| e["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_policies_name_what_the_webhook_injects_and_match_its_defaults() -> TestResult {
    let mut wrong: Vec<String> = Vec::new();
    let mut check = |what: &str, ok: bool, detail: String| {
        if !ok {
            wrong.push(format!("{what}: {detail}"));
        }
    };
    let token_text = read_deploy("admission-policy.yaml")?;
    let (token, vars) = policy("admission-policy.yaml", POLICY)?;
    let p = Params::parse(&vars)?;

    // The names the webhook injects (crds/src/keys.rs).
    let listed = variable(&vars, "brokerVolumes")?
        .split_once('+')
        .map(|(list, _)| list)
        .ok_or_else(|| Failure("brokerVolumes is not <list> + variables.tokenVolumes".into()))?;
    let mut listed = cel_strings(listed)?;
    listed.sort();
    let mut volumes = injected::VOLUMES.map(str::to_owned).to_vec();
    volumes.sort();
    check(
        "brokerVolumes lists exactly injected::VOLUMES",
        listed == volumes,
        format!("{listed:?} vs {volumes:?}"),
    );
    for name in injected::VOLUMES.iter().chain(&[
        injected::INIT_CONTAINER,
        injected::SIDECAR_CONTAINER,
        injected::SIDECAR_BINARY,
    ]) {
        check(
            &format!("admission-policy.yaml names '{name}'"),
            token_text.contains(&format!("'{name}'")),
            "missing".into(),
        );
    }
    check(
        "the sidecar's command is the sidecar binary",
        variable(&vars, "sidecarFaults")?.contains(&format!(
            "command.orValue([]) == ['{}']",
            injected::SIDECAR_BINARY
        )),
        variable(&vars, "sidecarFaults")?.to_owned(),
    );

    // The webhook's defaults (run::Args).
    let args = <credbroker_webhook::run::Args as clap::Parser>::try_parse_from([
        "credbroker-webhook",
        "--namespace",
        &p.broker_namespace,
        "--sidecar-image",
        p.sidecar_image(),
        "--init-image",
        p.init_image(),
        "--vault-addr",
        "https://vault.example:8200",
        "--cert-mode",
        "self-managed",
    ])
    .map_err(|e| Failure(e.to_string()))?;
    check(
        "proxyUID is the webhook's default --proxy-uid",
        args.proxy_uid == p.proxy_uid,
        format!("{} vs {}", p.proxy_uid, args.proxy_uid),
    );
    check(
        "audience is the webhook's default --audience",
        args.audience == p.audience && p.audience == keys::DEFAULT_BROKER_AUDIENCE,
        format!("{} vs {}", p.audience, args.audience),
    );
    check(
        "the images are pinned names (no blanks, a tag or a digest)",
        p.sidecar_images.iter().chain(&p.init_images).all(|i| {
            !i.contains(char::is_whitespace)
                && (i.contains('@') || i.rsplit('/').next().is_some_and(|n| n.contains(':')))
        }),
        format!("{:?} {:?}", p.sidecar_images, p.init_images),
    );

    // One broker namespace everywhere, excluded at match time.
    check(
        "the token policy's namespaceSelector excludes brokerNamespace only",
        excluded_namespaces(&token["spec"]["matchConstraints"]["namespaceSelector"])
            == [p.broker_namespace.clone()],
        format!(
            "{:?}",
            token["spec"]["matchConstraints"]["namespaceSelector"]
        ),
    );
    let bindings_text = read_deploy("bindings-configmap-policy.yaml")?;
    let (bindings, bvars) = policy("bindings-configmap-policy.yaml", BINDINGS_POLICY)?;
    let b_ns = cel_string(variable(&bvars, "brokerNamespace")?)?;
    check(
        "both policies name the same broker namespace",
        b_ns == p.broker_namespace,
        format!("{b_ns} vs {}", p.broker_namespace),
    );
    check(
        "the bindings policy's namespaceSelector excludes brokerNamespace only",
        excluded_namespaces(&bindings["spec"]["matchConstraints"]["namespaceSelector"])
            == [b_ns.clone()],
        format!(
            "{:?}",
            bindings["spec"]["matchConstraints"]["namespaceSelector"]
        ),
    );
    // The controller's ServiceAccount, as controller/deploy/rbac.yaml makes it.
    let controller_rbac = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../controller/deploy/rbac.yaml"),
    )?;
    let sa = documents(&controller_rbac)?
        .into_iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .ok_or_else(|| Failure("controller/deploy/rbac.yaml has no ServiceAccount".into()))?;
    let expected_user = format!(
        "system:serviceaccount:{}:{}",
        sa["metadata"]["namespace"].as_str().unwrap_or_default(),
        sa["metadata"]["name"].as_str().unwrap_or_default()
    );
    let user = cel_string(variable(&bvars, "controllerServiceAccount")?)?;
    check(
        "controllerServiceAccount is the controller's ServiceAccount",
        user == expected_user
            && sa["metadata"]["namespace"].as_str() == Some(p.broker_namespace.as_str()),
        format!("{user} vs {expected_user}"),
    );
    for key in [keys::MANAGED_BY, keys::BINDINGS_CONFIGMAP_KEY] {
        check(
            &format!("bindings-configmap-policy.yaml names '{key}'"),
            bindings_text.contains(&format!("'{key}'")),
            "missing".into(),
        );
    }

    // No parameter object left to go missing.
    for (file, text) in [
        ("admission-policy.yaml", &token_text),
        ("bindings-configmap-policy.yaml", &bindings_text),
    ] {
        for doc in documents(text)? {
            check(
                &format!("{file}: {} takes no parameters", doc["kind"]),
                doc["spec"]["paramKind"].is_null() && doc["spec"]["paramRef"].is_null(),
                format!("{:?}", doc["spec"]),
            );
        }
    }
    check(
        "there is no parameters ConfigMap",
        !deploy("admission-params.yaml").exists(),
        "deploy/admission-params.yaml exists".into(),
    );

    // The webhook-configuration policy holds exactly the webhook's
    // ServiceAccount (rbac.yaml) to exactly the registration it may update,
    // and compares every field of an entry but clientConfig.caBundle.
    let (mwc_policy, mwc_vars) = policy("admission-policy.yaml", WEBHOOK_CONFIGURATION_POLICY)?;
    let rbac = documents(&read_deploy("rbac.yaml")?)?;
    let webhook_sa = rbac
        .iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .ok_or_else(|| Failure("rbac.yaml has no ServiceAccount".into()))?;
    let webhook_user = format!(
        "system:serviceaccount:{}:{}",
        webhook_sa["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default(),
        webhook_sa["metadata"]["name"].as_str().unwrap_or_default()
    );
    let conditions: Vec<&str> = mwc_policy["spec"]["matchConditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["expression"].as_str())
        .collect();
    check(
        "the webhook-configuration policy matches only the webhook's ServiceAccount",
        conditions == [format!("request.userInfo.username == '{webhook_user}'")]
            && webhook_sa["metadata"]["namespace"].as_str() == Some(p.broker_namespace.as_str()),
        format!("{conditions:?} vs {webhook_user}"),
    );
    let may_update: Vec<Value> = rbac
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .flat_map(|d| d["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["resources"] == json!(["mutatingwebhookconfigurations"]))
        .flat_map(|r| r["resourceNames"].as_array().cloned().unwrap_or_default())
        .collect();
    let matched = &mwc_policy["spec"]["matchConstraints"]["resourceRules"];
    check(
        "the webhook-configuration policy covers every UPDATE of what the webhook may update",
        may_update == [json!(REGISTRATION)]
            && matched
                == &json!([{
                    "apiGroups": ["admissionregistration.k8s.io"],
                    "apiVersions": ["v1"],
                    "operations": ["UPDATE"],
                    "resources": ["mutatingwebhookconfigurations"],
                    "resourceNames": [REGISTRATION],
                }]),
        format!("RBAC {may_update:?}, policy {matched}"),
    );
    // Every field of a MutatingWebhook (a struct literal: a field
    // k8s-openapi adds fails to compile here) and of its clientConfig.
    let every_field = serde_json::to_value(MutatingWebhook {
        admission_review_versions: vec![],
        client_config: WebhookClientConfig::default(),
        failure_policy: Some(String::new()),
        match_conditions: Some(vec![]),
        match_policy: Some(String::new()),
        name: String::new(),
        namespace_selector: Some(Default::default()),
        object_selector: Some(Default::default()),
        reinvocation_policy: Some(String::new()),
        rules: Some(vec![]),
        side_effects: String::new(),
        timeout_seconds: Some(0),
    })?;
    let WebhookClientConfig {
        ca_bundle: _,
        service: _,
        url: _,
    } = WebhookClientConfig::default();
    let changes = variable(&mwc_vars, "changes")?;
    let compared: Vec<String> = every_field
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .filter(|k| k != "name" && k != "clientConfig")
        .map(|k| format!("w.?{k} == o.?{k}"))
        .chain(
            ["service", "url"]
                .iter()
                .map(|k| format!("w.?clientConfig.?{k} == o.?clientConfig.?{k}")),
        )
        .collect();
    let missing: Vec<&String> = compared.iter().filter(|c| !changes.contains(*c)).collect();
    check(
        "the webhook-configuration policy compares every field but clientConfig.caBundle",
        compared.len() == 12 && missing.is_empty() && !changes.contains("caBundle"),
        format!("missing {missing:?}"),
    );

    // The registration: opt-in decided before the call, never the broker's
    // namespace or kube-system.
    let registration = documents(&read_deploy("mutating-webhook.yaml")?)?;
    let hooks = registration
        .first()
        .and_then(|d| d["webhooks"].as_array().cloned())
        .unwrap_or_default();
    check(
        "two webhook entries",
        hooks.len() == 2,
        format!("{}", hooks.len()),
    );
    check(
        "the registration is the one the webhook-configuration policy names",
        registration.first().map(|d| &d["metadata"]["name"]) == Some(&json!(REGISTRATION)),
        format!("{:?}", registration.first().map(|d| &d["metadata"])),
    );
    for hook in &hooks {
        let name = hook["name"].as_str().unwrap_or_default();
        let conditions: Vec<&str> = hook["matchConditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["expression"].as_str())
            .collect();
        let inject = format!("[?'{}'].orValue('') == 'true'", keys::INJECT);
        check(
            &format!(
                "{name}: one matchCondition on the annotation and the label {}",
                keys::INJECT
            ),
            conditions.len() == 1
                && conditions[0].contains(&format!("annotations{inject}"))
                && conditions[0].contains(&format!("labels{inject}")),
            format!("{conditions:?}"),
        );
        let excluded = excluded_namespaces(&hook["namespaceSelector"]);
        check(
            &format!("{name}: never the broker's namespace or kube-system"),
            excluded.contains(&p.broker_namespace) && excluded.iter().any(|n| n == "kube-system"),
            format!("{excluded:?}"),
        );
    }

    if wrong.is_empty() {
        Ok(())
    } else {
        Err(Failure(format!(
            "the deploy files drifted:\n- {}",
            wrong.join("\n- ")
        )))
    }
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
    );
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
    );
    let mut init_holder = plain("init-holder", "credbroker-token");
    init_holder["spec"]["initContainers"] = json!([agent("setup", &["credbroker-token"])]);
    init_holder["spec"]["containers"] = json!([agent("agent", &[])]);
    cases.refused(
        "an ordinary init container mounting the token",
        &init_holder,
        &["init container setup: volumeMounts mounts credbroker-token"],
    );
    // kube-system stays covered: a forged token pod is as dangerous there.
    let mut in_kube_system = plain("forged-kube-system", "credbroker-token");
    in_kube_system["metadata"]["namespace"] = json!("kube-system");
    cases.refused(
        "a broker-audience token in a container in kube-system",
        &in_kube_system,
        &["container agent: volumeMounts mounts credbroker-token"],
    );

    cases.admitted(
        "an injected pod: the token only in the sidecar",
        &injected_pod("injected", ns, &p),
    );
    let mut agent_too = injected_pod("agent-too", ns, &p);
    agent_too["spec"]["containers"] = json!([agent("agent", &["credbroker-token"])]);
    cases.refused(
        "an injected pod whose agent mounts the token too",
        &agent_too,
        &["container agent: volumeMounts mounts credbroker-token"],
    );

    for field in ["shareProcessNamespace", "hostPID"] {
        let mut shared = injected_pod(&format!("shared-{}", field.to_lowercase()), ns, &p);
        shared["spec"][field] = json!(true);
        cases.refused(
            &format!("an injected pod with {field}"),
            &shared,
            &[&format!(
                "pod: spec.{field} is true in a pod with volume credbroker-token"
            )],
        );
    }

    // Fake sidecars: the name alone is not the sidecar.
    // (pod name, what, the edit to the sidecar, what the message must say)
    let not_the_image = format!(
        "image registry.example/evil:1 is not one of the sidecar images [{}]",
        p.sidecar_images.join(", ")
    );
    type Fake<'m> = (&'static str, &'static str, fn(&mut Value), &'m str);
    let fakes: [Fake; 6] = [
        (
            "fake-image",
            "a sidecar with another image",
            |s| s["image"] = json!("registry.example/evil:1"),
            &not_the_image,
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
        );
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
    );
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
    );
    let mut fake_init = injected_pod("fake-init", ns, &p);
    fake_init["spec"]["initContainers"][0]["image"] = json!("registry.example/evil-init:1");
    cases.refused(
        "an injected pod whose credbroker-init is another image",
        &fake_init,
        &[&format!(
            "init container credbroker-init: image registry.example/evil-init:1 is not one of \
             the broker init images [{}]",
            p.init_images.join(", ")
        )],
    );

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
    );
    let mut in_broker_ns = plain("broker-own", "credbroker-token");
    in_broker_ns["metadata"]["namespace"] = json!(BROKER_NS);
    cases.admitted(
        "a broker-audience token in a container in the broker's namespace",
        &in_broker_ns,
    );

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
    cases.admitted("the injected pod", &original);

    let mut sidecar_image = original.clone();
    sidecar_image["spec"]["initContainers"][1]["image"] = json!("registry.example/evil:1");
    cases.refused(
        "kubectl apply changing the sidecar's image",
        &sidecar_image,
        &[&format!(
            "init container credbroker-sidecar: image may not change (from {} to registry.example/evil:1)",
            p.sidecar_image()
        )],
    );
    let mut init_image = original.clone();
    init_image["spec"]["initContainers"][0]["image"] = json!("registry.example/evil-init:1");
    cases.refused(
        "kubectl apply changing credbroker-init's image",
        &init_image,
        &["init container credbroker-init: image may not change"],
    );

    let mut agent_image = original.clone();
    agent_image["spec"]["containers"][0]["image"] = json!("registry.example/agent:2");
    agent_image["metadata"]["labels"] = json!({ "rollout": "2" });
    cases.admitted(
        "kubectl apply changing the agent's image and a label",
        &agent_image,
    );
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
        agent_now == "registry.example/agent:2" && sidecar_now == p.sidecar_image(),
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
    cases.admitted("the injected pod", &injected_pod("debugged", ns, &p));
    // The token under a name of its own: still found by content.
    let mut renamed = injected_pod("renamed", ns, &p);
    renamed["spec"]["volumes"][0]["name"] = json!("vault-login");
    sidecar_mut(&mut renamed)["volumeMounts"][0]["name"] = json!("vault-login");
    cases.admitted(
        "an injected pod whose token volume has another name",
        &renamed,
    );
    cases.admitted(
        "a pod with no broker token",
        &pod(
            "plain-debugged",
            ns,
            json!({ "containers": [agent("agent", &[])] }),
        ),
    );

    // A debugger as `kubectl debug --profile=restricted` makes it (all
    // capabilities dropped), with `extra` merged over it.
    let debugger = |name: &str, extra: Value| {
        let mut c = json!({
            "name": name,
            "image": "registry.example/debug:1",
            "securityContext": { "capabilities": { "drop": ["ALL"] } },
        });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        c
    };
    let d = |extra: Value| debugger("debugger", extra);
    cases.api_refused(
        "an ephemeral container mounting credbroker-token",
        add_ephemeral(
            &pods,
            "debugged",
            d(json!({ "volumeMounts": [{ "name": "credbroker-token", "mountPath": "/t" }] })),
        )
        .await,
        &["ephemeral container debugger: mounts broker volume credbroker-token; only the injected credbroker-sidecar may"],
    );
    cases.api_refused(
        "an ephemeral container mounting the pod CA's key volume",
        add_ephemeral(
            &pods,
            "debugged",
            d(json!({ "volumeMounts": [{ "name": "credbroker-ca", "mountPath": "/ca" }] })),
        )
        .await,
        &["ephemeral container debugger: mounts broker volume credbroker-ca"],
    );
    cases.api_refused(
        "an ephemeral container mounting a renamed token volume",
        add_ephemeral(
            &pods,
            "renamed",
            d(json!({ "volumeMounts": [{ "name": "vault-login", "mountPath": "/t" }] })),
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
                d(json!({ "targetContainerName": target })),
            )
            .await,
            &[&format!(
                "ephemeral container debugger: targetContainerName {target} is a broker container"
            )],
        );
    }
    // (what, securityContext, what the message must say)
    let escapes: Vec<(&str, Value, String)> = vec![
        (
            "running as the proxy UID",
            json!({ "runAsUser": p.proxy_uid, "capabilities": { "drop": ["ALL"] } }),
            format!(
                "ephemeral container debugger: securityContext.runAsUser is the proxy UID {}, \
                 which capture exempts",
                p.proxy_uid
            ),
        ),
        (
            "privileged",
            json!({ "privileged": true, "capabilities": { "drop": ["ALL"] } }),
            "ephemeral container debugger: securityContext.privileged is true".into(),
        ),
        (
            "adding net_admin",
            json!({ "capabilities": { "add": ["net_admin"], "drop": ["ALL"] } }),
            "ephemeral container debugger: securityContext.capabilities.add has net_admin".into(),
        ),
        (
            "adding SETUID",
            json!({ "capabilities": { "add": ["SETUID"], "drop": ["ALL"] } }),
            "ephemeral container debugger: securityContext.capabilities.add has SETUID".into(),
        ),
        (
            "adding cap_setgid",
            json!({ "capabilities": { "add": ["cap_setgid"], "drop": ["ALL"] } }),
            "ephemeral container debugger: securityContext.capabilities.add has cap_setgid".into(),
        ),
        (
            "allowing privilege escalation",
            json!({ "allowPrivilegeEscalation": true, "capabilities": { "drop": ["ALL"] } }),
            "ephemeral container debugger: securityContext.allowPrivilegeEscalation is not false"
                .into(),
        ),
        (
            "as root with the runtime's default capabilities (SETUID, SETGID)",
            json!({ "runAsUser": 0 }),
            "ephemeral container debugger: securityContext.capabilities.drop lacks SETUID and \
             SETGID (or ALL)"
                .into(),
        ),
        (
            "dropping SETUID but keeping SETGID",
            json!({ "capabilities": { "drop": ["SETUID", "NET_RAW"] } }),
            "ephemeral container debugger: securityContext.capabilities.drop lacks SETUID and \
             SETGID (or ALL)"
                .into(),
        ),
    ];
    for (what, security, expect) in escapes {
        cases.api_refused(
            &format!("an ephemeral container {what}"),
            add_ephemeral(&pods, "debugged", d(json!({ "securityContext": security }))).await,
            &[
                &expect,
                "in a pod with the broker sidecar it could bypass the broker",
            ],
        );
    }
    cases.api_admitted(
        "kubectl debug --profile=restricted targeting the agent",
        add_ephemeral(
            &pods,
            "debugged",
            debugger(
                "restricted",
                json!({
                    "targetContainerName": "agent",
                    "securityContext": {
                        "runAsNonRoot": true, "allowPrivilegeEscalation": false,
                        "capabilities": { "drop": ["ALL"] },
                        "seccompProfile": { "type": "RuntimeDefault" },
                    },
                }),
            ),
        )
        .await,
    );
    cases.api_admitted(
        "a root debugger dropping setuid, CAP_SETGID and net_raw, without privilege escalation",
        add_ephemeral(
            &pods,
            "debugged",
            debugger(
                "dropper",
                json!({ "securityContext": { "allowPrivilegeEscalation": false,
                    "capabilities": { "drop": ["setuid", "CAP_SETGID", "net_raw"] } } }),
            ),
        )
        .await,
    );
    cases.api_refused(
        "a root debugger dropping setuid and setgid, with privilege escalation left unset",
        add_ephemeral(
            &pods,
            "debugged",
            debugger(
                "unset-escalation",
                json!({ "securityContext": {
                    "capabilities": { "drop": ["SETUID", "SETGID", "NET_RAW"] } } }),
            ),
        )
        .await,
        &["allowPrivilegeEscalation is not false"],
    );
    cases.api_admitted(
        "a root debugger with default capabilities in a pod with no broker token",
        add_ephemeral(
            &pods,
            "plain-debugged",
            json!({ "name": "debugger", "image": "registry.example/debug:1" }),
        )
        .await,
    );
    // The real `kubectl debug`: its default profile (general) adds
    // SYS_PTRACE and keeps SETUID and SETGID; --profile=restricted drops
    // ALL and passes.
    let kubectl_debug = |profile: &str| {
        let out = server
            .kubectl()
            .args([
                "debug",
                "-n",
                ns,
                "debugged",
                "--image=registry.example/debug:1",
                "--target=agent",
                &format!("--profile={profile}"),
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
            Err(e) => Err(format!("running kubectl debug: {e}")),
        }
    };
    match kubectl_debug("general") {
        Ok(out) => cases.record(
            "kubectl debug (profile general)",
            false,
            format!("admitted: {out}"),
        ),
        Err(stderr) => cases.record(
            "kubectl debug (profile general) is refused, naming SYS_PTRACE and the kept SETUID",
            stderr.contains(&format!("ValidatingAdmissionPolicy '{POLICY}'"))
                && stderr.contains("securityContext.capabilities.add has SYS_PTRACE")
                && stderr.contains("capabilities.drop lacks SETUID and SETGID"),
            stderr,
        ),
    }
    match kubectl_debug("restricted") {
        Ok(_) => cases.record(
            "kubectl debug --profile=restricted is admitted",
            true,
            String::new(),
        ),
        Err(stderr) => cases.record(
            "kubectl debug --profile=restricted is admitted",
            false,
            stderr,
        ),
    }
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
        "only the harmless ephemeral containers were stored",
        stored.len() == 3
            && stored[..2] == ["restricted->agent", "dropper->"]
            && stored[2].starts_with("debugger-")
            && stored[2].ends_with("->agent"),
        format!("{stored:?}"),
    );
    cases.finish()
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn only_the_controller_writes_bindings_configmaps_and_nothing_else_is_locked() -> TestResult {
    let (server, _) = setup().await?;
    let client = server.client().await?;
    let ns = "agents-configmaps";
    Cluster::new(client.clone())
        .create_namespace(ns, &[])
        .await?;
    let mut cases = Cases::new(&server, "configmaps");
    let controller = "system:serviceaccount:credbroker-system:credbroker-controller";
    cases.refused(
        "an admin creating a bindings ConfigMap",
        &bindings_configmap("credbroker-research-0123abcd", ns),
        &[&format!(
            "ConfigMap credbroker-research-0123abcd holds credbroker bindings (where secrets may \
             go); only the credbroker controller ({controller}) may create it"
        )],
    );
    let mut key_only = bindings_configmap("sneaky", ns);
    if let Some(meta) = key_only["metadata"].as_object_mut() {
        meta.remove("labels");
    }
    cases.refused(
        "an admin putting the bindings key into a ConfigMap without the label",
        &key_only,
        &["ConfigMap sneaky holds credbroker bindings"],
    );
    // The sidecar mounts its account's ConfigMap by name, and the kubelet
    // reads the key from data or binaryData: neither way around is open.
    let binary = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "sneaky-binary", "namespace": ns },
        "binaryData": { "bindings.v1.json": "e30=" },
    });
    cases.refused(
        "an admin putting the bindings key into binaryData",
        &binary,
        &["ConfigMap sneaky-binary holds credbroker bindings"],
    );
    let named = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "credbroker-research-agent-d243772f", "namespace": ns },
        "data": { "other": "x" },
    });
    cases.refused(
        "an admin pre-creating an unlabelled ConfigMap under a bindings name",
        &named,
        &["ConfigMap credbroker-research-agent-d243772f holds credbroker bindings"],
    );
    let plain = |name: &str, ns: &str| {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": name, "namespace": ns },
            "data": { "settings.json": "{}" },
        })
    };
    // With no parameter object, nothing can lock the cluster: ordinary
    // ConfigMaps and pods go in everywhere, kube-system included.
    cases.admitted(
        "an ordinary ConfigMap in an agent namespace",
        &plain("settings", ns),
    );
    cases.admitted(
        "an ordinary ConfigMap in kube-system",
        &plain("cluster-settings", "kube-system"),
    );
    cases.admitted(
        "a pod with no broker token in kube-system",
        &pod(
            "plain-kube-system",
            "kube-system",
            json!({ "containers": [agent("agent", &[])] }),
        ),
    );
    cases.admitted(
        "a bindings-like ConfigMap in the broker's own namespace (not matched there)",
        &bindings_configmap("credbroker-admin-notes", BROKER_NS),
    );
    cases.finish()
}

/// The chart's rendering during an upgrade: each image list holds the new
/// release's image (pinned by digest) and the previous release's, and
/// nothing else of the file changes.
fn upgrade_rendering(written: &Params) -> TestResult<(String, Params)> {
    let mut text = read_deploy("admission-policy.yaml")?;
    let digest = format!("@sha256:{}", "0123456789abcdef".repeat(4));
    let next = |image: &str| {
        let repository = image.split_once('@').map_or_else(
            || image.rsplit_once(':').map_or(image, |(r, _)| r),
            |(r, _)| r,
        );
        format!("{repository}{digest}")
    };
    let mut rendered = written.clone();
    rendered.sidecar_images = vec![
        next(written.sidecar_image()),
        written.sidecar_image().into(),
    ];
    rendered.init_images = vec![next(written.init_image()), written.init_image().into()];
    let (_, vars) = policy("admission-policy.yaml", POLICY)?;
    for (name, images) in [
        ("sidecarImages", &rendered.sidecar_images),
        ("initImages", &rendered.init_images),
    ] {
        let line = format!("expression: \"{}\"", variable(&vars, name)?);
        if text.matches(&line).count() != 1 {
            return Err(Failure(format!(
                "the {name} line {line:?} is not in the file exactly once"
            )));
        }
        let list: Vec<String> = images.iter().map(|i| format!("'{i}'")).collect();
        text = text.replace(&line, &format!("expression: \"[{}]\"", list.join(", ")));
    }
    Ok((text, rendered))
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn during_an_upgrade_both_releases_images_are_the_broker() -> TestResult {
    // An API server of its own: the shared one holds the policy as written.
    let server = TestApiServer::start().await?;
    eprintln!(
        "kube-apiserver + etcd (upgrade) started in {:?}",
        server.startup
    );
    let written = Params::from_file()?;
    let (text, rendered) = upgrade_rendering(&written)?;
    let p = install(&server, &text, None).await?;
    if p.sidecar_images != rendered.sidecar_images || p.init_images != rendered.init_images {
        return Err(Failure(format!("rendered {rendered:?}, installed {p:?}")));
    }
    let client = server.client().await?;
    let ns = "agents-upgrade";
    Cluster::new(client.clone())
        .create_namespace(ns, &[])
        .await?;
    let mut cases = Cases::new(&server, "upgrade");

    let previous = Params {
        sidecar_images: vec![written.sidecar_image().into()],
        init_images: vec![written.init_image().into()],
        ..p.clone()
    };
    let old_pod = injected_pod("by-old-replica", ns, &previous);
    cases.admitted(
        "a pod an old webhook replica injected (the previous release's images)",
        &old_pod,
    );
    cases.admitted(
        "a pod a new webhook replica injected (the new images, by digest)",
        &injected_pod("by-new-replica", ns, &p),
    );
    let mut unlisted = injected_pod("unlisted", ns, &p);
    let third = format!(
        "{}:9.9.9",
        written
            .sidecar_image()
            .rsplit_once(':')
            .map_or("", |(r, _)| r)
    );
    sidecar_mut(&mut unlisted)["image"] = json!(third);
    cases.refused(
        "a sidecar image the chart does not list",
        &unlisted,
        &[&format!(
            "init container credbroker-sidecar: image {third} is not one of the sidecar images [{}]",
            p.sidecar_images.join(", ")
        )],
    );
    // Rule 2 stays strict: a running pod keeps the image it was created with.
    let mut moved = old_pod.clone();
    sidecar_mut(&mut moved)["image"] = json!(p.sidecar_image());
    cases.refused(
        "updating an old pod's sidecar to the new (listed) image",
        &moved,
        &[&format!(
            "init container credbroker-sidecar: image may not change (from {} to {})",
            written.sidecar_image(),
            p.sidecar_image()
        )],
    );
    cases.finish()
}

// ---------------------------------------------------------------------------
// The webhook's registration: its ServiceAccount changes only caBundle.

/// Reads the registration through `api`, lets `edit` change it (as JSON),
/// and replaces it as the webhook does (webhook/src/certs.rs, publish): a
/// PUT of the object read, so the API server sees an UPDATE.
async fn replace_registration(
    api: &Api<MutatingWebhookConfiguration>,
    dry_run: bool,
    edit: impl FnOnce(&mut Value),
) -> Result<MutatingWebhookConfiguration, kube::Error> {
    let current = api.get(REGISTRATION).await?;
    let mut value = serde_json::to_value(&current).map_err(kube::Error::SerdeError)?;
    edit(&mut value);
    let edited: MutatingWebhookConfiguration =
        serde_json::from_value(value).map_err(kube::Error::SerdeError)?;
    let params = PostParams {
        dry_run,
        field_manager: Some("credbroker-webhook".into()),
    };
    api.replace(REGISTRATION, &params, &edited).await
}

fn ca_bundle(pem: &str) -> Value {
    use base64::Engine as _;
    json!(base64::engine::general_purpose::STANDARD.encode(pem))
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd (KUBEBUILDER_ASSETS): run make setup"]
async fn the_webhook_may_change_only_the_ca_bundle_of_its_registration() -> TestResult {
    let (server, _) = setup().await?;
    let admin_client = server.client().await?;
    // The webhook's ServiceAccount bound to exactly its RBAC, and its
    // registration as the chart installs it (the Service reference: the
    // API server calls it only for opted-in pods, and no case here makes
    // one).
    server
        .kubectl_apply(&read_deploy("rbac.yaml")?, &[])
        .map_err(Failure)?;
    server
        .kubectl_apply(&read_deploy("mutating-webhook.yaml")?, &[])
        .map_err(Failure)?;
    let token = Cluster::new(admin_client.clone())
        .token(
            BROKER_NS,
            "credbroker-webhook",
            &[SERVICE_ACCOUNT_ISSUER],
            Duration::from_secs(3600),
        )
        .await?;
    let kubeconfig = server.dir().join("credbroker-webhook-sa.kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_for_token(&token))?;
    let as_webhook =
        Api::<MutatingWebhookConfiguration>::all(client_from_kubeconfig(&kubeconfig).await?);
    let as_admin = Api::<MutatingWebhookConfiguration>::all(admin_client);
    let user = format!("system:serviceaccount:{BROKER_NS}:credbroker-webhook");
    let ours = format!(
        "ValidatingAdmissionPolicy '{WEBHOOK_CONFIGURATION_POLICY}' with binding \
         '{WEBHOOK_CONFIGURATION_POLICY}' denied request: credbroker: {user} may change only \
         clientConfig.caBundle of MutatingWebhookConfiguration {REGISTRATION}"
    );
    // In force once a change it must refuse is refused by it (dry run).
    wait_until(
        "the webhook-configuration policy to refuse a probe",
        EFFECTIVE_WITHIN,
        || {
            let (api, ours) = (&as_webhook, &ours);
            async move {
                let outcome = replace_registration(api, true, |v| {
                    v["webhooks"][0]["failurePolicy"] = json!("Ignore");
                })
                .await;
                match outcome {
                    Err(kube::Error::Api(s)) if s.message.contains(ours.as_str()) => Ok(()),
                    Err(e) => Err(format!("refused, but not by the policy yet: {e}")),
                    Ok(_) => Err("still admitted".into()),
                }
            }
        },
    )
    .await?;

    let mut cases = Cases::new(&server, "webhook-configuration");
    let refused = |cases: &mut Cases<'_>,
                   what: &str,
                   result: Result<MutatingWebhookConfiguration, kube::Error>,
                   expect: &str| {
        match result {
            Ok(_) => cases.record(what, false, "admitted".into()),
            Err(kube::Error::Api(status)) => {
                let message = &status.message;
                cases.record(
                    what,
                    status.code == 403 && message.contains(&ours) && message.contains(expect),
                    format!(
                        "refused ({}), message lacks {expect:?}: {message}",
                        status.code
                    ),
                )
            }
            Err(e) => cases.record(what, false, format!("failed otherwise: {e}")),
        }
    };

    // What the webhook does: every entry's caBundle to its CA bundle.
    let bundle = ca_bundle("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
    let result = replace_registration(&as_webhook, false, |v| {
        for hook in v["webhooks"].as_array_mut().into_iter().flatten() {
            hook["clientConfig"]["caBundle"] = bundle.clone();
        }
    })
    .await;
    cases.api_admitted(
        "the webhook's ServiceAccount changing every caBundle",
        result,
    );
    let rotated = ca_bundle("-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n");
    let result = replace_registration(&as_webhook, false, |v| {
        v["webhooks"][1]["clientConfig"]["caBundle"] = rotated.clone();
    })
    .await;
    cases.api_admitted("the webhook's ServiceAccount changing one caBundle", result);

    // Anything else it may not, however it is dressed.
    let namespaced = "webhook namespaced.inject.credbroker.dev";
    let labelled = "webhook labelled.inject.credbroker.dev";
    let result = replace_registration(&as_webhook, false, |v| {
        v["webhooks"][0]["rules"][0]["resources"] = json!(["*"]);
        v["webhooks"][0]["rules"][0]["apiGroups"] = json!(["*"]);
    })
    .await;
    refused(
        &mut cases,
        "the webhook's ServiceAccount widening the rules to every resource",
        result,
        &format!("; it changed {namespaced}: rules"),
    );
    let result = replace_registration(&as_webhook, false, |v| {
        v["webhooks"][1]["namespaceSelector"] = json!({});
    })
    .await;
    refused(
        &mut cases,
        "the webhook's ServiceAccount widening the namespaceSelector to every namespace",
        result,
        &format!("; it changed {labelled}: namespaceSelector"),
    );
    let result = replace_registration(&as_webhook, false, |v| {
        for hook in v["webhooks"].as_array_mut().into_iter().flatten() {
            hook["failurePolicy"] = json!("Ignore");
        }
    })
    .await;
    refused(
        &mut cases,
        "the webhook's ServiceAccount setting failurePolicy Ignore",
        result,
        &format!("; it changed {namespaced}: failurePolicy; {labelled}: failurePolicy"),
    );
    let result = replace_registration(&as_webhook, false, |v| {
        let mut extra = v["webhooks"][0].clone();
        extra["name"] = json!("everything.example.dev");
        if let Some(hooks) = v["webhooks"].as_array_mut() {
            hooks.push(extra);
        }
    })
    .await;
    refused(
        &mut cases,
        "the webhook's ServiceAccount adding a webhook",
        result,
        ", not which webhooks it has: [namespaced.inject.credbroker.dev, \
         labelled.inject.credbroker.dev] became [namespaced.inject.credbroker.dev, \
         labelled.inject.credbroker.dev, everything.example.dev]",
    );
    for (what, field, value) in [
        (
            "an ownerReference to a missing owner (the garbage collector would delete it)",
            "ownerReferences",
            json!([{ "apiVersion": "v1", "kind": "ConfigMap", "name": "gone",
                     "uid": "00000000-0000-0000-0000-000000000000" }]),
        ),
        ("a finalizer", "finalizers", json!(["example.dev/hold"])),
        (
            "an annotation",
            "annotations",
            json!({ "cert-manager.io/inject-ca-from": "elsewhere/ca" }),
        ),
        ("a label", "labels", json!({ "example.dev/x": "y" })),
    ] {
        let result = replace_registration(&as_webhook, false, |v| {
            v["metadata"][field] = value.clone();
        })
        .await;
        refused(
            &mut cases,
            &format!("the webhook's ServiceAccount adding {what}"),
            result,
            "not its labels, annotations, ownerReferences or finalizers",
        );
    }
    let result = replace_registration(&as_webhook, false, |v| {
        if let Some(hooks) = v["webhooks"].as_array_mut() {
            hooks.truncate(1);
        }
    })
    .await;
    refused(
        &mut cases,
        "the webhook's ServiceAccount removing a webhook",
        result,
        "not which webhooks it has",
    );
    let result = replace_registration(&as_webhook, false, |v| {
        v["webhooks"][0]["clientConfig"] = json!({
            "url": "https://collector.example/mutate",
            "caBundle": v["webhooks"][0]["clientConfig"]["caBundle"].clone(),
        });
    })
    .await;
    refused(
        &mut cases,
        "the webhook's ServiceAccount pointing a webhook at a URL",
        result,
        &format!("; it changed {namespaced}: clientConfig.service, clientConfig.url"),
    );
    let result = replace_registration(&as_webhook, false, |v| {
        if let Some(hook) = v["webhooks"][1].as_object_mut() {
            hook.remove("matchConditions");
            hook.remove("objectSelector");
        }
        v["webhooks"][1]["timeoutSeconds"] = json!(30);
    })
    .await;
    refused(
        &mut cases,
        "the webhook's ServiceAccount dropping the opt-in and the timeout",
        result,
        &format!("; it changed {labelled}: objectSelector, matchConditions, timeoutSeconds"),
    );
    // A caBundle change does not carry another one through.
    let result = replace_registration(&as_webhook, false, |v| {
        v["webhooks"][0]["clientConfig"]["caBundle"] = bundle.clone();
        v["webhooks"][0]["reinvocationPolicy"] = json!("Never");
    })
    .await;
    refused(
        &mut cases,
        "the webhook's ServiceAccount changing a caBundle and reinvocationPolicy at once",
        result,
        &format!("; it changed {namespaced}: reinvocationPolicy"),
    );

    // The configuration holds the webhook's caBundles and nothing else of
    // what it tried.
    let stored = serde_json::to_value(as_admin.get(REGISTRATION).await?)?;
    let expected: Value = documents(&read_deploy("mutating-webhook.yaml")?)?
        .into_iter()
        .next()
        .unwrap_or_default();
    let same = stored["webhooks"].as_array().map(Vec::len) == Some(2)
        && stored["webhooks"][0]["clientConfig"]["caBundle"] == bundle
        && stored["webhooks"][1]["clientConfig"]["caBundle"] == rotated
        && [
            "rules",
            "namespaceSelector",
            "failurePolicy",
            "matchConditions",
        ]
        .iter()
        .all(|f| (0..2).all(|i| stored["webhooks"][i][f] == expected["webhooks"][i][f]));
    cases.record(
        "the registration holds the new caBundles and nothing else changed",
        same,
        format!("{stored}"),
    );

    // Admins (and anyone but the webhook) are not held to it.
    let result = replace_registration(&as_admin, false, |v| {
        v["webhooks"][0]["failurePolicy"] = json!("Ignore");
        v["webhooks"][1]["namespaceSelector"] = json!({});
        v["webhooks"][1]["rules"][0]["operations"] = json!(["CREATE", "UPDATE"]);
    })
    .await;
    cases.api_admitted(
        "an admin changing failurePolicy, namespaceSelector and rules",
        result,
    );
    // Put back as the file has it.
    let result = replace_registration(&as_admin, false, |v| {
        v["webhooks"] = expected["webhooks"].clone();
    })
    .await;
    cases.api_admitted(
        "an admin putting the registration back as the file has it",
        result,
    );
    cases.finish()
}
