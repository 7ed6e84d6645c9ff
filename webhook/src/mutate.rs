//! The pure core: a pod, the settings and its service account's bindings
//! in; the injected pod and the JSON patch to it out, or a refusal that
//! names the container and the field.
//!
//! The pod is edited as JSON, not through the typed API: a field this
//! build's API types do not know (a newer cluster's) must survive the
//! round trip, and a patch that replaced `containers` from the typed form
//! would drop it. The typed form is used only to read.
//!
//! Idempotent by construction: the broker's containers and volumes are
//! rebuilt from the settings and put in their place, every agent edit is
//! "ensure", and placeholders already recorded on an injected pod are kept.
//! So mutating an injected pod yields an empty patch, while a pod that
//! merely carries our names or annotations gets the real thing.

use std::collections::BTreeMap;

use credbroker_crds::PlaceholderSpec;
use credbroker_crds::config::PodPlaceholders;
use credbroker_crds::keys::{self, injected};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, DownwardAPIVolumeFile, DownwardAPIVolumeSource,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, Pod,
    Probe, ProjectedVolumeSource, SeccompProfile, SecurityContext, ServiceAccountTokenProjection,
    Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use crate::settings::InjectSettings;

/// Where the default service-account token is mounted.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The name prefix of the volume the ServiceAccount admission plugin adds.
pub const DEFAULT_TOKEN_VOLUME_PREFIX: &str = "kube-api-access-";
/// The annotation `kubectl logs` and `exec` use to pick a container.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// The CA trust variables every agent container gets, unless it sets them.
pub fn trust_variables() -> Vec<(&'static str, String)> {
    let bundle = format!("{}/{}", injected::TRUST_DIR, injected::TRUST_BUNDLE_FILE);
    let java = format!(
        "-Djavax.net.ssl.trustStore={}/{} -Djavax.net.ssl.trustStoreType=PKCS12 \
         -Djavax.net.ssl.trustStorePassword={}",
        injected::TRUST_DIR,
        injected::TRUSTSTORE_FILE,
        injected::TRUSTSTORE_PASSWORD
    );
    vec![
        ("SSL_CERT_FILE", bundle.clone()),
        ("REQUESTS_CA_BUNDLE", bundle.clone()),
        ("CURL_CA_BUNDLE", bundle.clone()),
        ("NODE_EXTRA_CA_CERTS", bundle.clone()),
        ("GIT_SSL_CAINFO", bundle.clone()),
        ("DENO_CERT", bundle),
        ("JAVA_TOOL_OPTIONS", java),
    ]
}

/// A pod the webhook will not admit, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Names the container (or the pod) and the field.
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn refuse(message: String) -> Refusal {
    Refusal { message }
}

/// The injected pod, the patch that makes it, and warnings for the user.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    pub pod: Value,
    /// JSON Patch (RFC 6902) operations; empty when nothing changes.
    pub patch: Vec<Value>,
    pub warnings: Vec<String>,
    /// Binding id → placeholder, as recorded in the pod annotation.
    pub placeholders: BTreeMap<String, String>,
}

/// One binding of the pod's service account, as far as the pod is
/// concerned: its id (the CredentialBinding's name) and its placeholder.
#[derive(Debug, Clone, PartialEq)]
pub struct PodBinding {
    pub id: String,
    pub placeholder: PlaceholderSpec,
}

/// Draws a new placeholder with a prefix (the real one is
/// [`credbroker_crds::config::generate_placeholder`]; the golden tests
/// pass a deterministic one).
pub type NewPlaceholder<'a> = dyn FnMut(Option<&str>) -> Result<String, String> + 'a;

/// The pod's service account, as the API server will default it.
pub fn service_account(pod: &Pod) -> &str {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .or_else(|| spec.and_then(|s| s.service_account.as_deref()))
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// Whether the pod (as JSON) asks for injection: the annotation or the
/// label `credbroker.dev/inject: "true"`. Read from the JSON, so a pod that
/// does not opt in is never held to this build's typed pod schema.
pub fn opted_in(pod: &Value) -> bool {
    ["annotations", "labels"]
        .iter()
        .any(|m| pod["metadata"][m][keys::INJECT] == "true")
}

/// Whether injection is ever allowed in a namespace.
pub fn namespace_allowed(namespace: &str, settings: &InjectSettings) -> bool {
    namespace != settings.broker_namespace && namespace != "kube-system"
}

/// Injects the broker into `pod`, or refuses it. `bindings` are the
/// service account's bindings, oldest first.
pub fn mutate(
    pod_json: &Value,
    settings: &InjectSettings,
    bindings: &[PodBinding],
    new_placeholder: &mut NewPlaceholder<'_>,
) -> Result<Mutation, Refusal> {
    let pod: Pod = serde_json::from_value(pod_json.clone()).map_err(|e| {
        refuse(format!(
            "the pod could not be read: {}",
            crate::review::json_error(&e)
        ))
    })?;
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| refuse("the pod has no spec".into()))?;
    check_pod(&pod, settings)?;
    let keep_token = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(keys::KEEP_SERVICE_ACCOUNT_TOKEN))
        .is_some_and(|v| v == "true");
    // The broker's parts, built once: compared with what the pod has,
    // then put in.
    let built = Built::new(settings, service_account(&pod));
    let already_injected = built.is_in(pod_json);
    // A pod being created has no uid yet; one that carries a uid is a copy
    // of a stored pod (`kubectl get -o yaml`, uid left in), and gets
    // placeholders of its own. A copy made without the uid (`kubectl debug
    // --copy-to`) looks injected, and keeps the original's placeholders.
    let is_copy = pod.metadata.uid.as_ref().is_some_and(|u| !u.is_empty());
    let mut warnings = Vec::new();

    // Placeholders: kept from an injected pod's annotation (so a second
    // pass changes nothing), drawn fresh otherwise (so a copied
    // annotation never makes two pods share one).
    let recorded = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(keys::PLACEHOLDERS))
        .and_then(|json| PodPlaceholders::from_json(json).ok())
        .unwrap_or_default();
    let mut placeholders = BTreeMap::new();
    let mut env_of_binding: Vec<(String, String)> = Vec::new();
    let mut placeholder_ids: Vec<String> = Vec::new();
    let sa = service_account(&pod).to_owned();
    match bindings {
        [] => warnings.push(format!(
            "service account {sa} has no credbroker bindings yet: the broker is injected, \
             but no placeholder is"
        )),
        bindings => {
            for binding in bindings {
                let spec = &binding.placeholder;
                if let Some((_, other)) = env_of_binding
                    .iter()
                    .zip(&placeholder_ids)
                    .find(|((env, _), _)| *env == spec.env)
                {
                    // The controller resolves such conflicts the same way
                    // (the older binding wins; bindings come oldest first).
                    warnings.push(format!(
                        "binding {}: placeholder env {} is already binding {other}'s; skipped",
                        binding.id, spec.env
                    ));
                    continue;
                }
                let value = match recorded.0.get(&binding.id) {
                    Some(kept) if already_injected && !is_copy => kept.clone(),
                    _ => new_placeholder(spec.prefix.as_deref()).map_err(|e| {
                        refuse(format!("binding {}: no placeholder: {e}", binding.id))
                    })?,
                };
                env_of_binding.push((spec.env.clone(), value.clone()));
                placeholder_ids.push(binding.id.clone());
                placeholders.insert(binding.id.clone(), value);
            }
        }
    }
    // The sidecar refuses overlapping placeholders; so does this, early.
    let annotation = serde_json::to_string(&PodPlaceholders(placeholders.clone()))
        .map_err(|e| refuse(format!("placeholders: {e}")))?;
    PodPlaceholders::from_json(&annotation).map_err(|e| refuse(format!("placeholders: {e}")))?;

    let mut out = pod_json.clone();
    // Init containers: the broker's two first, then the pod's own.
    let user_inits: Vec<Value> = array(pod_json, &["spec", "initContainers"])
        .into_iter()
        .filter(|c| !is_broker_container_name(name_of(c)))
        .collect();
    let default_token_volumes: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| is_default_token_volume(v))
        .map(|v| v.name.clone())
        .collect();
    let agent_edit = |c: &Value, warnings: &mut Vec<String>| {
        edit_agent(
            c,
            &env_of_binding,
            keep_token,
            &default_token_volumes,
            warnings,
        )
    };
    let existing_inits = array(pod_json, &["spec", "initContainers"]);
    let mut inits: Vec<Value> = built
        .inits
        .iter()
        .map(|c| keep_if(&existing_inits, c, covers_container))
        .collect();
    for c in &user_inits {
        inits.push(agent_edit(c, &mut warnings));
    }
    let containers: Vec<Value> = array(pod_json, &["spec", "containers"])
        .iter()
        .map(|c| agent_edit(c, &mut warnings))
        .collect();
    let first_agent = containers.first().map(|c| name_of(c).to_owned());
    out["spec"]["initContainers"] = Value::Array(inits);
    out["spec"]["containers"] = Value::Array(containers);

    // Volumes: the pod's own (less any default token when it goes, and
    // less anything wearing a broker name), then the broker's.
    let existing_volumes = array(pod_json, &["spec", "volumes"]);
    let mut volumes: Vec<Value> = existing_volumes
        .iter()
        .filter(|v| !injected::VOLUMES.contains(&name_of(v)))
        .filter(|v| keep_token || !default_token_volumes.iter().any(|n| n == name_of(v)))
        .cloned()
        .collect();
    volumes.extend(
        built
            .volumes
            .iter()
            .map(|v| keep_if(&existing_volumes, v, covers)),
    );
    out["spec"]["volumes"] = Value::Array(volumes);
    if keep_token {
        warnings.push(format!(
            "{} is set: agent containers keep the default service-account token and can reach \
             the Kubernetes API with it (never the broker's token)",
            keys::KEEP_SERVICE_ACCOUNT_TOKEN
        ));
    } else {
        out["spec"]["automountServiceAccountToken"] = Value::Bool(false);
    }

    // Annotations.
    let mut annotations = out["metadata"]["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    annotations.insert(keys::PLACEHOLDERS.into(), Value::String(annotation));
    if let Some(first) = first_agent
        && !annotations.contains_key(DEFAULT_CONTAINER_ANNOTATION)
    {
        annotations.insert(DEFAULT_CONTAINER_ANNOTATION.into(), Value::String(first));
    }
    if !out["metadata"].is_object() {
        out["metadata"] = json!({});
    }
    out["metadata"]["annotations"] = Value::Object(annotations);

    if is_copy && let Some(meta) = out["metadata"].as_object_mut() {
        // The API server gives every new pod a uid of its own; without the
        // copied one, a second pass sees a pod being created.
        meta.remove("uid");
    }
    let mut patch = diff(pod_json, &out);
    if is_copy {
        patch.push(json!({ "op": "remove", "path": "/metadata/uid" }));
    }
    Ok(Mutation {
        pod: out,
        patch,
        warnings,
        placeholders,
    })
}

/// The refusals (DESIGN.md invariant 5): anything in the pod that could
/// reach around the broker.
fn check_pod(pod: &Pod, settings: &InjectSettings) -> Result<(), Refusal> {
    let Some(spec) = &pod.spec else {
        return Ok(());
    };
    for (field, on) in [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
        ("shareProcessNamespace", spec.share_process_namespace),
    ] {
        if on == Some(true) {
            return Err(refuse(format!(
                "pod: spec.{field} is true; an agent could reach around the broker (its \
                 traffic, or the sidecar's memory)"
            )));
        }
    }
    if let Some(os) = spec.os.as_ref().filter(|os| os.name != "linux") {
        return Err(refuse(format!(
            "pod: spec.os.name is {}; the broker runs on Linux only",
            os.name
        )));
    }
    // The node's files hold every other pod's tokens, the broker's among
    // them. Injected namespaces cannot use Pod Security's baseline level
    // (the init container needs NET_ADMIN), so this check, with the
    // capability allow-list below, stands in for the parts of it that
    // reach the broker (not all of baseline: seccomp, AppArmor, SELinux,
    // procMount, host ports and sysctls are not checked).
    if let Some(v) = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.host_path.is_some())
    {
        return Err(refuse(format!(
            "volume {}: a hostPath volume; the node's files hold other pods' tokens, the \
             broker's among them",
            v.name
        )));
    }
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    if pod_uid == Some(settings.proxy_uid) {
        return Err(refuse(format!(
            "pod: spec.securityContext.runAsUser is {}, the broker's proxy UID, whose traffic \
             is never captured",
            settings.proxy_uid
        )));
    }
    for c in &spec.containers {
        if is_broker_container_name(&c.name) {
            return Err(refuse(format!(
                "container {}: the name is reserved for the broker's own containers",
                c.name
            )));
        }
    }
    let agents = spec.containers.iter().map(|c| ("containers", c)).chain(
        spec.init_containers
            .iter()
            .flatten()
            .filter(|c| !is_broker_container_name(&c.name))
            .map(|c| ("initContainers", c)),
    );
    for (list, c) in agents {
        let at = |field: &str| format!("container {} (spec.{list}): {field}", c.name);
        let sc = c.security_context.as_ref();
        if sc.and_then(|s| s.privileged) == Some(true) {
            return Err(refuse(format!(
                "{} is true; a privileged agent can rewrite the pod's packet filter",
                at("securityContext.privileged")
            )));
        }
        for cap in sc
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.as_ref())
            .into_iter()
            .flatten()
        {
            let cap = normalize_capability(cap);
            if ["NET_ADMIN", "SYS_ADMIN", "ALL"].contains(&cap.as_str()) {
                return Err(refuse(format!(
                    "{} adds {cap}; an agent with it can rewrite the pod's packet filter",
                    at("securityContext.capabilities.add")
                )));
            }
            if ["SETUID", "SETGID"].contains(&cap.as_str()) {
                return Err(refuse(format!(
                    "{} adds {cap}; an agent with it can become the proxy UID, whose traffic \
                     is never captured",
                    at("securityContext.capabilities.add")
                )));
            }
            if !ALLOWED_CAPABILITIES.contains(&cap.as_str()) && cap != "NET_RAW" {
                return Err(refuse(format!(
                    "{} adds {cap}, beyond Pod Security's baseline; an agent with it could \
                     read or reach around the broker",
                    at("securityContext.capabilities.add")
                )));
            }
        }
        if sc.and_then(|s| s.allow_privilege_escalation) == Some(true) {
            return Err(refuse(format!(
                "{} is true; a set-user-ID file could then make an agent the proxy UID, whose \
                 traffic is never captured",
                at("securityContext.allowPrivilegeEscalation")
            )));
        }
        // Env from a file names a volume without mounting it.
        if let Some(e) = c.env.iter().flatten().find(|e| {
            e.value_from
                .as_ref()
                .and_then(|v| v.file_key_ref.as_ref())
                .is_some_and(|f| injected::VOLUMES.contains(&f.volume_name.as_str()))
        }) {
            return Err(refuse(format!(
                "{} {} reads a file of a broker volume; only the credbroker sidecar may",
                at("env"),
                e.name
            )));
        }
        if sc.and_then(|s| s.run_as_user) == Some(settings.proxy_uid) {
            return Err(refuse(format!(
                "{} is {}, the broker's proxy UID, whose traffic is never captured",
                at("securityContext.runAsUser"),
                settings.proxy_uid
            )));
        }
        for m in c.volume_mounts.iter().flatten() {
            if m.mount_path.trim_end_matches('/') == injected::TRUST_DIR
                && m.name != injected::TRUST_VOLUME
            {
                return Err(refuse(format!(
                    "{} mounts {} at {}, where the broker's trust bundle goes",
                    at("volumeMounts"),
                    m.name,
                    injected::TRUST_DIR
                )));
            }
            // The trust bundle is the one broker volume agents read, and
            // the webhook mounts it itself.
            if injected::VOLUMES.contains(&m.name.as_str())
                && !(m.name == injected::TRUST_VOLUME && is_trust_mount(m))
            {
                return Err(refuse(format!(
                    "{} includes the broker volume {}; only the credbroker sidecar may mount it",
                    at("volumeMounts"),
                    m.name
                )));
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if v.name == injected::TOKEN_VOLUME {
            // Rebuilt from the settings; an agent mounting it is refused above.
            continue;
        }
        let broker_token = v
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|s| s.service_account_token.as_ref())
            .any(|t| t.audience.as_deref() == Some(settings.audience.as_str()));
        if broker_token {
            return Err(refuse(format!(
                "volume {}: a projected service-account token with the broker audience {:?}; \
                 only the credbroker sidecar may hold one",
                v.name, settings.audience
            )));
        }
    }
    Ok(())
}

/// The capabilities an agent container may add: Pod Security's baseline
/// list, less SETUID and SETGID (a root agent with them becomes the proxy
/// UID and GID, whose traffic is never captured) and NET_RAW (taken back).
const ALLOWED_CAPABILITIES: [&str; 11] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETPCAP",
    "SYS_CHROOT",
];

/// What every agent container has dropped: the packet filter's
/// capabilities, raw sockets, and changing user or group (to the proxy
/// UID and GID, whose traffic is never captured).
const DROPPED_CAPABILITIES: [&str; 4] = ["NET_ADMIN", "NET_RAW", "SETUID", "SETGID"];

fn is_trust_mount(m: &VolumeMount) -> bool {
    m.mount_path == injected::TRUST_DIR && m.read_only == Some(true) && m.sub_path.is_none()
}

/// `CAP_NET_ADMIN`, `net_admin` → `NET_ADMIN` (runtimes accept every form).
fn normalize_capability(cap: &str) -> String {
    let upper = cap.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_owned()
}

fn is_broker_container_name(name: &str) -> bool {
    name == injected::INIT_CONTAINER || name == injected::SIDECAR_CONTAINER
}

/// The volume the ServiceAccount admission plugin adds: a projected token
/// for the API server's own audience.
fn is_default_token_volume(v: &Volume) -> bool {
    v.name.starts_with(DEFAULT_TOKEN_VOLUME_PREFIX)
        && v.projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .into_iter()
            .flatten()
            .any(|s| {
                s.service_account_token
                    .as_ref()
                    .is_some_and(|t| t.audience.is_none())
            })
}

/// Whether the pod already carries exactly what [`mutate`] would put in:
/// the broker's two init containers first and its volumes, as the
/// settings build them. A pod with our names but other content is not.
pub fn is_injected(pod: &Value, settings: &InjectSettings, service_account: &str) -> bool {
    Built::new(settings, service_account).is_in(pod)
}

/// The broker's containers and volumes as JSON, as the settings build them.
struct Built {
    inits: [Value; 2],
    volumes: Vec<Value>,
}

impl Built {
    fn new(settings: &InjectSettings, service_account: &str) -> Self {
        Self {
            inits: [
                to_value(&init_container(settings)),
                to_value(&sidecar_container(settings)),
            ],
            volumes: broker_volumes(settings, service_account)
                .iter()
                .map(to_value)
                .collect(),
        }
    }

    fn is_in(&self, pod: &Value) -> bool {
        let inits = pod["spec"]["initContainers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let volumes = pod["spec"]["volumes"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        inits.len() >= 2
            && covers_container(&inits[0], &self.inits[0])
            && covers_container(&inits[1], &self.inits[1])
            && self
                .volumes
                .iter()
                .all(|v| volumes.iter().any(|have| covers(have, v)))
    }
}

/// The fields the API server defaults in what the webhook builds, with
/// the values it defaults them to. Only these may appear in a stored
/// broker container or volume beyond what the webhook wrote.
fn is_default(key: &str, value: &Value) -> bool {
    match key {
        "terminationMessagePath" => value == "/dev/termination-log",
        "terminationMessagePolicy" => value == "File",
        // IfNotPresent, or Always for a `:latest` or untagged image.
        "imagePullPolicy" => value == "IfNotPresent" || value == "Always",
        "successThreshold" => value == 1,
        "timeoutSeconds" => value == 1,
        "periodSeconds" => value == 10,
        "failureThreshold" => value == 3,
        "scheme" => value == "HTTP",
        "defaultMode" => value == 420,
        "apiVersion" => value == "v1",
        _ => false,
    }
}

/// Whether `have` is `want` plus, at most, the API server's defaults.
/// It fills in defaults (`terminationMessagePath`, a volume's
/// `defaultMode`, a field reference's `apiVersion`) after the webhook's
/// patch, so what it stores is a superset of what was built; it never
/// changes a value that was set. Any other extra field (an `envFrom`, a
/// `lifecycle` hook, another mount), or a default with another value,
/// means the item is not ours.
pub fn covers(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(have), Value::Object(want)) => {
            want.iter()
                .all(|(k, w)| have.get(k).is_some_and(|h| covers(h, w)))
                && have
                    .iter()
                    .all(|(k, v)| want.contains_key(k) || is_default(k, v))
        }
        (Value::Array(have), Value::Array(want)) => {
            have.len() == want.len() && have.iter().zip(want).all(|(h, w)| covers(h, w))
        }
        (have, want) => have == want,
    }
}

/// [`covers`] for a broker container, whose cpu, memory and
/// ephemeral-storage requests and limits are the one part kept as found:
/// the API server rewrites quantities (`0.05` to `50m`) and copies limits
/// into missing requests, and none of those widens what the container can
/// do. Anything else under `resources` (claims, extended resources a device
/// plugin answers with mounts, env or devices) means it is not ours.
fn covers_container(have: &Value, want: &Value) -> bool {
    const PLAIN: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];
    let plain_resources = have["resources"].as_object().is_none_or(|r| {
        r.iter().all(|(k, v)| {
            (k == "requests" || k == "limits")
                && v.as_object()
                    .is_some_and(|list| list.keys().all(|name| PLAIN.contains(&name.as_str())))
        })
    });
    let without = |v: &Value| {
        let mut v = v.clone();
        if let Some(obj) = v.as_object_mut() {
            obj.remove("resources");
        }
        v
    };
    plain_resources && covers(&without(have), &without(want))
}

/// The existing item of the same name when `same` says it is what was
/// built (so the defaults the API server added stay and a second pass
/// changes nothing), else `built`.
fn keep_if(existing: &[Value], built: &Value, same: fn(&Value, &Value) -> bool) -> Value {
    existing
        .iter()
        .find(|have| name_of(have) == name_of(built) && same(have, built))
        .unwrap_or(built)
        .clone()
}

/// One agent container, edited: placeholders and trust variables in its
/// env, the trust bundle mounted read-only, NET_RAW and NET_ADMIN dropped,
/// and the default token unmounted (unless kept).
fn edit_agent(
    c: &Value,
    placeholders: &[(String, String)],
    keep_token: bool,
    default_token_volumes: &[String],
    warnings: &mut Vec<String>,
) -> Value {
    let mut c = c.clone();
    let name = name_of(&c).to_owned();
    let mut env = c["env"].as_array().cloned().unwrap_or_default();
    for (var, value) in placeholders {
        let ours = json!({ "name": var, "value": value });
        let same_name = |e: &Value| e["name"] == json!(var);
        // Kubernetes takes the last of several entries of one name: every
        // one goes, so none of the pod's own can win over the placeholder.
        if env.iter().filter(|e| same_name(e)).count() == 1 && env.contains(&ours) {
            continue;
        }
        if env.iter().any(same_name) {
            warnings.push(format!(
                "container {name}: env {var} is set by the pod; credbroker replaced it with \
                 the binding's placeholder"
            ));
            env.retain(|e| !same_name(e));
        }
        env.push(ours);
    }
    for (var, value) in trust_variables() {
        // Kubernetes takes the last entry of a name.
        let Some(i) = env.iter().rposition(|e| e["name"] == json!(var)) else {
            env.push(json!({ "name": var, "value": value }));
            continue;
        };
        if !env[i]["valueFrom"].is_null() {
            warnings.push(format!(
                "container {name}: env {var} comes from valueFrom and is kept; unless what it \
                 names trusts credbroker's pod CA, TLS to bound hosts fails from this container"
            ));
            continue;
        }
        let theirs = env[i]["value"].as_str().unwrap_or_default().to_owned();
        if theirs == value || (var == "JAVA_TOOL_OPTIONS" && theirs.ends_with(&value)) {
            continue;
        }
        if var == "JAVA_TOOL_OPTIONS" && !theirs.contains("-Djavax.net.ssl.trustStore=") {
            // JVM options add up: the truststore joins the pod's own.
            env[i] = json!({ "name": var, "value": format!("{theirs} {value}") });
            continue;
        }
        warnings.push(format!(
            "container {name}: env {var} is set by the pod and kept; unless what it names \
             trusts credbroker's pod CA ({value}), TLS to bound hosts fails from this container"
        ));
    }
    c["env"] = Value::Array(env);

    let mut mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
    if !keep_token {
        mounts.retain(|m| {
            let volume = m["name"].as_str().unwrap_or_default();
            let path = m["mountPath"].as_str().unwrap_or_default();
            !default_token_volumes.iter().any(|n| n == volume)
                && path.trim_end_matches('/') != DEFAULT_TOKEN_PATH
        });
    }
    let trust = to_value(&VolumeMount {
        name: injected::TRUST_VOLUME.into(),
        mount_path: injected::TRUST_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    if !mounts.iter().any(|m| covers(m, &trust)) {
        mounts.retain(|m| m["name"] != json!(injected::TRUST_VOLUME));
        mounts.push(trust);
    }
    c["volumeMounts"] = Value::Array(mounts);

    // Capabilities: NET_RAW and NET_ADMIN dropped; a NET_RAW the pod
    // added is taken back (raw sockets can send what the capture misses).
    if !c["securityContext"].is_object() {
        c["securityContext"] = json!({});
    }
    if !c["securityContext"]["capabilities"].is_object() {
        c["securityContext"]["capabilities"] = json!({});
    }
    let caps = &mut c["securityContext"]["capabilities"];
    if let Some(add) = caps["add"].as_array().cloned() {
        let kept: Vec<Value> = add
            .into_iter()
            .filter(|cap| normalize_capability(cap.as_str().unwrap_or_default()) != "NET_RAW")
            .collect();
        if kept.len() != caps["add"].as_array().map_or(0, Vec::len) {
            warnings.push(format!(
                "container {name}: securityContext.capabilities.add NET_RAW removed; agents may \
                 not open raw sockets"
            ));
        }
        if kept.is_empty() {
            if let Some(obj) = caps.as_object_mut() {
                obj.remove("add");
            }
        } else {
            caps["add"] = Value::Array(kept);
        }
    }
    let mut drop = caps["drop"].as_array().cloned().unwrap_or_default();
    let dropped = |drop: &[Value], cap: &str| {
        drop.iter().any(|d| {
            let d = normalize_capability(d.as_str().unwrap_or_default());
            d == cap || d == "ALL"
        })
    };
    for cap in DROPPED_CAPABILITIES {
        if !dropped(&drop, cap) {
            drop.push(Value::String(cap.into()));
        }
    }
    caps["drop"] = Value::Array(drop);
    // no_new_privs: set-user-ID and file-capability bits stop working, so
    // no file an agent writes can make it the proxy UID.
    if c["securityContext"]["allowPrivilegeEscalation"].is_null() {
        c["securityContext"]["allowPrivilegeEscalation"] = Value::Bool(false);
    }
    c
}

fn name_of(v: &Value) -> &str {
    v["name"].as_str().unwrap_or_default()
}

fn array(v: &Value, path: &[&str]) -> Vec<Value> {
    let mut at = v;
    for p in path {
        at = &at[*p];
    }
    at.as_array().cloned().unwrap_or_default()
}

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    // The k8s-openapi types always serialize.
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// JSON Patch from `before` to `after`, one `add` (which replaces an
/// existing member) per top-level field the webhook edits.
fn diff(before: &Value, after: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    for path in [
        ["metadata", "annotations"],
        ["spec", "initContainers"],
        ["spec", "containers"],
        ["spec", "volumes"],
        ["spec", "automountServiceAccountToken"],
    ] {
        let (old, new) = (&before[path[0]][path[1]], &after[path[0]][path[1]]);
        if old != new && !new.is_null() {
            ops.push(json!({
                "op": "add",
                "path": format!("/{}/{}", path[0], path[1]),
                "value": new,
            }));
        }
    }
    if !before["metadata"].is_object() && !ops.is_empty() {
        ops.insert(0, json!({ "op": "add", "path": "/metadata", "value": {} }));
    }
    ops
}

/// The init container: programs the packet filter, then exits. The only
/// image with iptables; root with NET_ADMIN and NET_RAW and nothing else.
pub fn init_container(settings: &InjectSettings) -> Container {
    let mut args = vec![
        "init".to_owned(),
        format!("--proxy-uid={}", settings.proxy_uid),
        format!("--proxy-gid={}", settings.proxy_gid),
        format!("--proxy-port={}", settings.proxy_port),
    ];
    if !settings.exclude_ports.is_empty() {
        let ports: Vec<String> = settings.exclude_ports.iter().map(u16::to_string).collect();
        args.push(format!("--exclude-port={}", ports.join(",")));
    }
    if !settings.exclude_cidrs.is_empty() {
        args.push(format!(
            "--exclude-cidr={}",
            settings.exclude_cidrs.join(",")
        ));
    }
    Container {
        name: injected::INIT_CONTAINER.into(),
        image: Some(settings.init_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        command: Some(vec![injected::SIDECAR_BINARY.into()]),
        args: Some(args),
        resources: Some(settings.sidecar_resources.clone()),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: injected::XTABLES_VOLUME.into(),
            mount_path: injected::XTABLES_DIR.into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The broker as a native sidecar: it starts before the agents and keeps
/// running; its startupProbe holds the agents back until the trust bundle
/// is written and the secrets are loaded.
pub fn sidecar_container(settings: &InjectSettings) -> Container {
    let mut env_vars = vec![
        env("CREDBROKER_VAULT_ADDR", settings.vault.addr.clone()),
        env("CREDBROKER_VAULT_AUTH", "kubernetes"),
        env(
            "CREDBROKER_VAULT_AUTH_MOUNT",
            settings.vault.auth_mount.clone(),
        ),
        env(
            "CREDBROKER_VAULT_JWT_FILE",
            format!("{}/{}", injected::TOKEN_DIR, injected::TOKEN_FILE),
        ),
        env(
            "CREDBROKER_BINDINGS_FILE",
            format!(
                "{}/{}",
                injected::BINDINGS_DIR,
                keys::BINDINGS_CONFIGMAP_KEY
            ),
        ),
        env(
            "CREDBROKER_PLACEHOLDERS_FILE",
            format!("{}/{}", injected::POD_INFO_DIR, injected::PLACEHOLDERS_FILE),
        ),
        env("CREDBROKER_CA_DIR", injected::CA_DIR),
        env("CREDBROKER_BUNDLE_DIR", injected::TRUST_DIR),
        env("CREDBROKER_PROXY_PORT", settings.proxy_port.to_string()),
        env("CREDBROKER_PROXY_UID", settings.proxy_uid.to_string()),
        env("CREDBROKER_PROXY_GID", settings.proxy_gid.to_string()),
        env(
            "CREDBROKER_ADMIN_ADDR",
            format!("[::]:{}", settings.admin_port),
        ),
        field_env("CREDBROKER_POD_NAME", "metadata.name"),
        field_env("CREDBROKER_POD_NAMESPACE", "metadata.namespace"),
    ];
    if let Some(ns) = &settings.vault.namespace {
        env_vars.push(env("CREDBROKER_VAULT_NAMESPACE", ns.clone()));
    }
    if let Some(pem) = &settings.vault.ca_pem {
        env_vars.push(env("CREDBROKER_VAULT_CA_PEM", pem.clone()));
    }
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(settings.admin_port)),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    };
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    Container {
        name: injected::SIDECAR_CONTAINER.into(),
        image: Some(settings.sidecar_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        command: Some(vec![injected::SIDECAR_BINARY.into()]),
        args: Some(vec!["proxy".into()]),
        restart_policy: Some("Always".into()),
        env: Some(env_vars),
        resources: Some(settings.sidecar_resources.clone()),
        // Up to two minutes to log in and read every secret.
        startup_probe: Some(probe("/readyz", 1, 120)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        security_context: Some(SecurityContext {
            run_as_user: Some(settings.proxy_uid),
            run_as_group: Some(settings.proxy_gid),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount(injected::TOKEN_VOLUME, injected::TOKEN_DIR, true),
            mount(injected::BINDINGS_VOLUME, injected::BINDINGS_DIR, true),
            mount(injected::POD_INFO_VOLUME, injected::POD_INFO_DIR, true),
            mount(injected::CA_VOLUME, injected::CA_DIR, false),
            mount(injected::TRUST_VOLUME, injected::TRUST_DIR, false),
        ]),
        ..Container::default()
    }
}

fn memory_dir(name: &str, size: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity(size.into())),
        }),
        ..Volume::default()
    }
}

fn downward(path: &str, field: &str) -> DownwardAPIVolumeFile {
    DownwardAPIVolumeFile {
        path: path.into(),
        field_ref: Some(ObjectFieldSelector {
            field_path: field.into(),
            ..ObjectFieldSelector::default()
        }),
        ..DownwardAPIVolumeFile::default()
    }
}

/// The broker's volumes, in order.
pub fn broker_volumes(settings: &InjectSettings, service_account: &str) -> Vec<Volume> {
    vec![
        Volume {
            name: injected::TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(settings.audience.clone()),
                        expiration_seconds: Some(settings.token_expiration_seconds),
                        path: injected::TOKEN_FILE.into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: injected::BINDINGS_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: keys::bindings_configmap_name(service_account),
                optional: Some(true),
                items: Some(vec![KeyToPath {
                    key: keys::BINDINGS_CONFIGMAP_KEY.into(),
                    path: keys::BINDINGS_CONFIGMAP_KEY.into(),
                    ..KeyToPath::default()
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: injected::POD_INFO_VOLUME.into(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![
                    downward(
                        injected::PLACEHOLDERS_FILE,
                        &format!("metadata.annotations['{}']", keys::PLACEHOLDERS),
                    ),
                    downward("name", "metadata.name"),
                    downward("namespace", "metadata.namespace"),
                    downward("uid", "metadata.uid"),
                ]),
                ..DownwardAPIVolumeSource::default()
            }),
            ..Volume::default()
        },
        memory_dir(injected::CA_VOLUME, "1Mi"),
        memory_dir(injected::TRUST_VOLUME, "8Mi"),
        memory_dir(injected::XTABLES_VOLUME, "1Mi"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_allows_only_the_api_servers_defaults() {
        let built = json!({ "name": "c", "image": "i", "env": [ { "name": "A", "value": "1" } ] });
        let defaulted = json!({ "name": "c", "image": "i", "env": [ { "name": "A", "value": "1" } ],
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File" });
        assert!(covers(&defaulted, &built));
        for (what, have) in [
            (
                "an envFrom",
                json!({ "name": "c", "image": "i", "env": [ { "name": "A", "value": "1" } ],
                "envFrom": [ { "configMapRef": { "name": "x" } } ] }),
            ),
            (
                "a default with another value",
                json!({ "name": "c", "image": "i",
                "env": [ { "name": "A", "value": "1" } ],
                "terminationMessagePath": "/var/run/secrets/credbroker/token" }),
            ),
            (
                "another env entry",
                json!({ "name": "c", "image": "i",
                "env": [ { "name": "A", "value": "1" }, { "name": "B", "value": "2" } ] }),
            ),
            (
                "another image",
                json!({ "name": "c", "image": "j", "env": [ { "name": "A", "value": "1" } ] }),
            ),
            (
                "a missing field",
                json!({ "name": "c", "env": [ { "name": "A", "value": "1" } ] }),
            ),
        ] {
            assert!(!covers(&have, &built), "{what} was taken for ours");
        }
        // Only a container's resources are kept as found.
        let with = |r: Value| json!({ "name": "c", "resources": r });
        assert!(covers_container(
            &with(json!({ "requests": { "cpu": "50m" }, "limits": { "cpu": "50m" } })),
            &with(json!({ "limits": { "cpu": "0.05" } }))
        ));
        assert!(!covers(
            &with(json!({ "requests": { "cpu": "50m" } })),
            &with(json!({ "requests": { "cpu": "0.05" } }))
        ));
        // Claims and extended resources reach devices and mounts: not ours.
        for extra in [
            json!({ "claims": [ { "name": "gpu" } ] }),
            json!({ "limits": { "vendor.example/device": "1" } }),
        ] {
            assert!(
                !covers_container(&with(extra.clone()), &with(json!({}))),
                "{extra}"
            );
        }
    }

    #[test]
    fn capabilities_are_compared_in_every_spelling() {
        for spelling in ["NET_ADMIN", "net_admin", "CAP_NET_ADMIN", " cap_net_admin "] {
            assert_eq!(normalize_capability(spelling), "NET_ADMIN", "{spelling}");
        }
    }
}
