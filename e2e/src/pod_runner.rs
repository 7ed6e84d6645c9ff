//! A test pod-runner: plays the kubelet for one pod, executing the spec the
//! API server stored, as written.
//!
//! There is no container runtime on the machines that run `make test`, so
//! the runner builds each container from what Linux offers a root process:
//!
//! - **network**: the pod's network namespace (a [`Netns`] the test made,
//!   with the pod's address and a route to the test's "world"), shared by
//!   all containers, as in a pod;
//! - **filesystem**: a private mount namespace per container whose root is
//!   an overlay over the host's root (the "image"; writes land in a tmpfs,
//!   never on the host), plus the files the [`ImageMap`] names for the
//!   container's image, the pod's volumes at their mount paths, a fresh
//!   `/proc`, `/tmp` and `/run`, and `/etc/resolv.conf` pointing at the
//!   cluster DNS (`dnsPolicy: ClusterFirst`);
//! - **processes**: a PID namespace per container, so a container sees only
//!   its own processes (`shareProcessNamespace` is refused);
//! - **identity**: `setpriv` sets the UID, the GID (no supplementary
//!   groups), the capability bounding set (the runtime's defaults, minus
//!   `drop`, plus `add`) and `no_new_privs` (`allowPrivilegeEscalation:
//!   false`);
//! - **seccomp** `RuntimeDefault`: a filter (libseccomp, through Debian's
//!   python3-seccomp) refusing with EPERM the syscalls the container
//!   runtimes' default profile refuses to an unprivileged container
//!   ([`RUNTIME_DEFAULT_DENIED`]);
//! - **resources**: memory and CPU limits and CPU requests through a cgroup
//!   per container (v1 or v2, whichever the machine mounts).
//!
//! Volumes are materialised on the host under a root-only folder (`0700`),
//! so a container reaches a volume only through its own mounts: the
//! projected token from a real TokenRequest (the volume's audience and
//! expiry, bound to the pod), ConfigMaps and the downward API read from the
//! API server (and refreshed), emptyDirs (a tmpfs of the size limit for
//! `medium: Memory`).
//!
//! Every field of the spec is either honoured or refused: [`check_fields`]
//! walks the stored pod and fails, naming the field, on anything it does not
//! know. A few fields only the scheduler or the kubelet's reporting reads
//! (`tolerations`, `priority`, `terminationMessagePath` at its default…) are
//! accepted because a single node has nothing to do with them; each says
//! why in [`check_fields`]. One deliberate difference: a container that
//! exits (or fails its liveness probe) is not restarted; [`RunningPod::check`]
//! reports it, which fails the test, where the kubelet would restart it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use credbroker_test_support::netns::Netns;
use credbroker_test_support::process::ChildGuard;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, ServiceAccount, Volume};
use kube::Api;
use kube::api::PostParams;
use serde_json::Value;

use crate::{Error, Result};

/// The capabilities a container runtime (containerd, CRI-O) grants a
/// container that neither adds nor drops any.
pub const RUNTIME_DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Syscalls containerd's default seccomp profile refuses to a container
/// without CAP_SYS_ADMIN (and friends): mounting, namespaces, kernel
/// modules and keyrings, clocks, BPF, tracing of the kernel.
pub const RUNTIME_DEFAULT_DENIED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
];

/// The PATH a container gets when its image names none (containerd's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How often projected tokens, ConfigMaps and the downward API are re-read.
const VOLUME_REFRESH: Duration = Duration::from_secs(1);

/// What each image holds beyond the host's own filesystem: files placed at
/// their path inside the container (e.g. the broker binary at the path the
/// injected `command` names). An image the map does not know is refused.
#[derive(Debug, Default, Clone)]
pub struct ImageMap {
    images: BTreeMap<String, Vec<(String, PathBuf)>>,
}

impl ImageMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// `reference` holds `files`: (path inside the image, host file).
    pub fn image(mut self, reference: &str, files: &[(&str, &Path)]) -> Self {
        self.images.insert(
            reference.to_owned(),
            files
                .iter()
                .map(|(inside, host)| ((*inside).to_owned(), host.to_path_buf()))
                .collect(),
        );
        self
    }
}

/// What the node provides the pod: the API server, the pod's network, the
/// cluster DNS and the images.
#[derive(Clone)]
pub struct Node {
    pub client: kube::Client,
    /// `/run/netns/<name>` of the pod's network namespace.
    pub netns: PathBuf,
    /// The node's side, where the kubelet's probes come from (to the pod IP).
    pub node_netns: PathBuf,
    pub pod_ip: IpAddr,
    pub cluster_dns: IpAddr,
    pub images: ImageMap,
}

impl Node {
    pub fn new(
        client: kube::Client,
        netns: &Netns,
        node_netns: &Netns,
        pod_ip: IpAddr,
        cluster_dns: IpAddr,
        images: ImageMap,
    ) -> Self {
        Self {
            client,
            netns: netns.path(),
            node_netns: node_netns.path(),
            pod_ip,
            cluster_dns,
            images,
        }
    }
}

/// A container the runner started.
struct RunningContainer {
    name: String,
    process: ChildGuard,
    identity: Identity,
    env: Vec<(String, String)>,
    liveness_failures: Arc<AtomicU32>,
    liveness_threshold: u32,
    cgroups: Vec<PathBuf>,
    grace: Duration,
}

/// A pod the runner is running. Dropping it kills every container and
/// removes its volumes and cgroups.
pub struct RunningPod {
    pub name: String,
    pub namespace: String,
    node: Node,
    containers: Vec<RunningContainer>,
    /// Init containers that ran to completion, with their output.
    finished: Vec<(String, String)>,
    state: tempfile::TempDir,
    tmpfs: Vec<PathBuf>,
    shim: PathBuf,
    stop_refresh: Arc<AtomicBool>,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RunningPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningPod")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn unsupported(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Unsupported {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Fails, naming the field, unless every field of `pod` is one the runner
/// honours (or, for a scheduler-only field, has nothing to do with).
pub fn check_fields(pod: &Value) -> Result<()> {
    let spec = &pod["spec"];
    let Some(spec_map) = spec.as_object() else {
        return Err(unsupported("spec", "the pod has no spec"));
    };
    for (key, value) in spec_map {
        let field = format!("spec.{key}");
        match key.as_str() {
            "containers" | "initContainers" => {
                for (i, c) in value.as_array().into_iter().flatten().enumerate() {
                    check_container(&format!("{field}[{i}]"), c, key == "initContainers")?;
                }
            }
            "volumes" => {
                for (i, v) in value.as_array().into_iter().flatten().enumerate() {
                    check_volume(&format!("{field}[{i}]"), v)?;
                }
            }
            // The runner requests tokens for this account.
            "serviceAccountName" | "serviceAccount" => {}
            "automountServiceAccountToken" => {
                // Honoured by the admission chain: with it unset or true the
                // ServiceAccount plugin adds a kube-api-access volume, which
                // check_volume refuses (its configMap source) unless absent.
            }
            "restartPolicy" if value == "Always" || value == "Never" => {
                // Always: an exit fails the test instead of a restart (see
                // the module docs); Never: an exit is an exit.
            }
            "terminationGracePeriodSeconds" if value.is_u64() => {}
            "dnsPolicy" if value == "ClusterFirst" => {}
            // Only the scheduler reads these; this runner is the one node.
            "schedulerName" if value == "default-scheduler" => {}
            "tolerations" | "priority" | "preemptionPolicy" => {}
            "enableServiceLinks" => {
                // Checked at run time: the runner refuses when the namespace
                // has Services whose variables it would have to add.
            }
            "securityContext" => check_pod_security(&field, value)?,
            _ => {
                return Err(unsupported(
                    field,
                    format!("the pod-runner does not implement {value}"),
                ));
            }
        }
    }
    Ok(())
}

fn check_pod_security(field: &str, value: &Value) -> Result<()> {
    for (key, v) in value.as_object().into_iter().flatten() {
        match key.as_str() {
            "runAsUser" | "runAsGroup" | "runAsNonRoot" => {}
            "seccompProfile" => check_seccomp(&format!("{field}.{key}"), v)?,
            _ => return Err(unsupported(format!("{field}.{key}"), "not implemented")),
        }
    }
    Ok(())
}

fn check_seccomp(field: &str, v: &Value) -> Result<()> {
    match v["type"].as_str() {
        Some("RuntimeDefault" | "Unconfined") if v.as_object().is_some_and(|o| o.len() == 1) => {
            Ok(())
        }
        _ => Err(unsupported(
            field,
            "only RuntimeDefault and Unconfined are implemented",
        )),
    }
}

fn check_container(field: &str, c: &Value, init: bool) -> Result<()> {
    for (key, v) in c.as_object().into_iter().flatten() {
        let f = format!("{field}.{key}");
        match key.as_str() {
            "name" | "image" | "command" | "args" => {}
            // Images are the runner's own map: nothing is pulled.
            "imagePullPolicy" => {}
            "restartPolicy" if init && v == "Always" => {}
            // The runner reports exits itself; it accepts only the default
            // path and policy, which nothing in the pod reads.
            "terminationMessagePath" if v == "/dev/termination-log" => {}
            "terminationMessagePolicy" if v == "File" => {}
            "env" => {
                for (i, e) in v.as_array().into_iter().flatten().enumerate() {
                    let ef = format!("{f}[{i}]");
                    for (k, ev) in e.as_object().into_iter().flatten() {
                        match k.as_str() {
                            "name" | "value" => {}
                            "valueFrom" => {
                                let path = ev["fieldRef"]["fieldPath"].as_str();
                                if ev.as_object().is_none_or(|o| o.len() != 1)
                                    || path.is_none_or(|p| field_path_value_known(p).is_none())
                                {
                                    return Err(unsupported(
                                        format!("{ef}.valueFrom"),
                                        "only fieldRef to metadata.name, metadata.namespace, \
                                         metadata.uid, metadata.annotations/labels, \
                                         spec.serviceAccountName and status.podIP is implemented",
                                    ));
                                }
                            }
                            _ => return Err(unsupported(format!("{ef}.{k}"), "not implemented")),
                        }
                    }
                }
            }
            "volumeMounts" => {
                for (i, m) in v.as_array().into_iter().flatten().enumerate() {
                    for k in m.as_object().into_iter().flatten().map(|(k, _)| k) {
                        if !matches!(k.as_str(), "name" | "mountPath" | "readOnly") {
                            return Err(unsupported(format!("{f}[{i}].{k}"), "not implemented"));
                        }
                    }
                }
            }
            "securityContext" => {
                for (k, sv) in v.as_object().into_iter().flatten() {
                    let sf = format!("{f}.{k}");
                    match k.as_str() {
                        "runAsUser"
                        | "runAsGroup"
                        | "runAsNonRoot"
                        | "readOnlyRootFilesystem"
                        | "allowPrivilegeEscalation" => {}
                        "privileged" if sv == false => {}
                        "capabilities" => {
                            for ck in sv.as_object().into_iter().flatten().map(|(k, _)| k) {
                                if !matches!(ck.as_str(), "add" | "drop") {
                                    return Err(unsupported(format!("{sf}.{ck}"), "unknown"));
                                }
                            }
                        }
                        "seccompProfile" => check_seccomp(&sf, sv)?,
                        _ => return Err(unsupported(sf, "not implemented")),
                    }
                }
            }
            "resources" => {
                for (k, rv) in v.as_object().into_iter().flatten() {
                    if !matches!(k.as_str(), "limits" | "requests") {
                        return Err(unsupported(format!("{f}.{k}"), "not implemented"));
                    }
                    for r in rv.as_object().into_iter().flatten().map(|(k, _)| k) {
                        if !matches!(r.as_str(), "cpu" | "memory") {
                            return Err(unsupported(
                                format!("{f}.{k}.{r}"),
                                "only cpu and memory are implemented",
                            ));
                        }
                    }
                }
            }
            // readinessProbe is refused: nothing here routes traffic by it.
            "startupProbe" | "livenessProbe" => check_probe(&f, v)?,
            _ => return Err(unsupported(f, "not implemented")),
        }
    }
    Ok(())
}

fn check_probe(field: &str, v: &Value) -> Result<()> {
    for (k, pv) in v.as_object().into_iter().flatten() {
        match k.as_str() {
            "periodSeconds" | "timeoutSeconds" | "failureThreshold" | "initialDelaySeconds" => {}
            // The only value the API server allows for startup and liveness
            // probes, and what the runner does.
            "successThreshold" if pv == 1 => {}
            "httpGet" => {
                for (hk, hv) in pv.as_object().into_iter().flatten() {
                    match hk.as_str() {
                        "path" => {}
                        "port" if hv.is_u64() => {}
                        "scheme" if hv == "HTTP" => {}
                        _ => {
                            return Err(unsupported(
                                format!("{field}.httpGet.{hk}"),
                                "only path, a numeric port and scheme HTTP are implemented",
                            ));
                        }
                    }
                }
            }
            _ => return Err(unsupported(format!("{field}.{k}"), "not implemented")),
        }
    }
    Ok(())
}

fn check_volume(field: &str, v: &Value) -> Result<()> {
    for (k, vv) in v.as_object().into_iter().flatten() {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "name" => {}
            "emptyDir" => {
                for ek in vv.as_object().into_iter().flatten().map(|(k, _)| k) {
                    if !matches!(ek.as_str(), "medium" | "sizeLimit") {
                        return Err(unsupported(format!("{f}.{ek}"), "not implemented"));
                    }
                }
                if !matches!(vv["medium"].as_str(), None | Some("" | "Memory")) {
                    return Err(unsupported(format!("{f}.medium"), "not implemented"));
                }
                // On disk the kubelet enforces the limit by eviction; the
                // runner only sizes a tmpfs.
                if vv.get("sizeLimit").is_some() && vv["medium"] != "Memory" {
                    return Err(unsupported(
                        format!("{f}.sizeLimit"),
                        "only for medium: Memory (a tmpfs of that size)",
                    ));
                }
            }
            "configMap" => {
                for ck in vv.as_object().into_iter().flatten().map(|(k, _)| k) {
                    if !matches!(ck.as_str(), "name" | "items" | "optional" | "defaultMode") {
                        return Err(unsupported(format!("{f}.{ck}"), "not implemented"));
                    }
                }
                for (i, item) in vv["items"].as_array().into_iter().flatten().enumerate() {
                    if item.get("mode").is_some() {
                        return Err(unsupported(
                            format!("{f}.items[{i}].mode"),
                            "per-item modes are not implemented",
                        ));
                    }
                }
            }
            "downwardAPI" => {
                for (i, item) in vv["items"].as_array().into_iter().flatten().enumerate() {
                    let known = item["fieldRef"]["fieldPath"]
                        .as_str()
                        .is_some_and(|p| field_path_value_known(p).is_some());
                    if !known
                        || item.get("resourceFieldRef").is_some()
                        || item.get("mode").is_some()
                    {
                        return Err(unsupported(
                            format!("{f}.items[{i}]"),
                            "only fieldRef items without a mode are implemented",
                        ));
                    }
                }
            }
            "projected" => {
                for (i, s) in vv["sources"].as_array().into_iter().flatten().enumerate() {
                    let only_token = s
                        .as_object()
                        .is_some_and(|o| o.len() == 1 && o.contains_key("serviceAccountToken"));
                    if !only_token {
                        return Err(unsupported(
                            format!("{f}.sources[{i}]"),
                            "only serviceAccountToken sources are implemented",
                        ));
                    }
                }
            }
            _ => return Err(unsupported(f, "this volume type is not implemented")),
        }
    }
    Ok(())
}

/// `Some(kind)` for a downward-API field path the runner can resolve.
fn field_path_value_known(path: &str) -> Option<()> {
    matches!(
        path,
        "metadata.name"
            | "metadata.namespace"
            | "metadata.uid"
            | "spec.serviceAccountName"
            | "status.podIP"
    )
    .then_some(())
    .or_else(|| {
        (path.starts_with("metadata.annotations['") || path.starts_with("metadata.labels['"))
            .then_some(())
    })
}

/// The value of a downward-API field path for `pod`.
fn field_path_value(pod: &Pod, path: &str, pod_ip: IpAddr) -> Result<String> {
    let map_value = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.as_ref()?.get(key).cloned().unwrap_or_default())
    };
    let value = match path {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "metadata.uid" => pod.metadata.uid.clone(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone()),
        "status.podIP" => Some(pod_ip.to_string()),
        _ => map_value(&pod.metadata.annotations, "metadata.annotations['")
            .or_else(|| map_value(&pod.metadata.labels, "metadata.labels['")),
    };
    value.ok_or_else(|| unsupported(path, "cannot resolve this field path"))
}

/// Who a container runs as, and with what privileges.
#[derive(Clone, Debug)]
struct Identity {
    uid: u32,
    gid: u32,
    bounding: Vec<String>,
    no_new_privs: bool,
    seccomp: bool,
    /// The spec sets LC_CTYPE, so the seccomp shim must not drop it.
    keep_lc_ctype: bool,
}

fn identity(pod: &Pod, c: &Container, field: &str) -> Result<Identity> {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.clone());
    let sc = c.security_context.clone().unwrap_or_default();
    let uid = sc
        .run_as_user
        .or(psc.as_ref().and_then(|p| p.run_as_user))
        // An image with no USER runs as root; our images are the host's.
        .unwrap_or(0);
    let gid = sc
        .run_as_group
        .or(psc.as_ref().and_then(|p| p.run_as_group))
        .unwrap_or(0);
    let non_root = sc
        .run_as_non_root
        .or(psc.as_ref().and_then(|p| p.run_as_non_root))
        .unwrap_or(false);
    if non_root && uid == 0 {
        return Err(Error::Other(format!(
            "{field}: runAsNonRoot is set but the container would run as UID 0 \
             (the kubelet refuses to start it: CreateContainerConfigError)"
        )));
    }
    let (uid, gid) = (
        u32::try_from(uid).map_err(|_| {
            unsupported(format!("{field}.securityContext.runAsUser"), "out of range")
        })?,
        u32::try_from(gid).map_err(|_| {
            unsupported(
                format!("{field}.securityContext.runAsGroup"),
                "out of range",
            )
        })?,
    );
    let caps = sc.capabilities.unwrap_or_default();
    // As the runtimes take them: any case, with or without CAP_.
    let normalise = |list: Option<Vec<String>>, which: &str| -> Result<Vec<String>> {
        list.unwrap_or_default()
            .into_iter()
            .map(|c| {
                let up = c.to_uppercase();
                let name = up.strip_prefix("CAP_").unwrap_or(&up).to_owned();
                if name.is_empty() || !name.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_') {
                    Err(unsupported(
                        format!("{field}.securityContext.capabilities.{which}"),
                        format!("{c:?} is not a capability name"),
                    ))
                } else {
                    Ok(name)
                }
            })
            .collect()
    };
    let drop: Vec<String> = normalise(caps.drop, "drop")?;
    let add: Vec<String> = normalise(caps.add, "add")?;
    let mut bounding: Vec<String> = if drop.iter().any(|d| d == "ALL") {
        Vec::new()
    } else {
        RUNTIME_DEFAULT_CAPABILITIES
            .iter()
            .map(|c| (*c).to_owned())
            .filter(|c| !drop.contains(c))
            .collect()
    };
    for a in &add {
        if a == "ALL" {
            return Err(unsupported(
                format!("{field}.securityContext.capabilities.add"),
                "ALL is not implemented",
            ));
        }
        if !bounding.contains(a) {
            bounding.push(a.clone());
        }
    }
    if uid != 0 && !add.is_empty() {
        return Err(unsupported(
            format!("{field}.securityContext.capabilities.add"),
            "added capabilities for a non-root user (ambient capabilities) are not implemented",
        ));
    }
    let no_new_privs = sc.allow_privilege_escalation == Some(false);
    let profile = sc
        .seccomp_profile
        .or(psc.and_then(|p| p.seccomp_profile))
        .map(|p| p.type_);
    let seccomp = match profile.as_deref() {
        Some("RuntimeDefault") => true,
        None | Some("Unconfined") => false,
        Some(other) => {
            return Err(unsupported(
                format!("{field}.securityContext.seccompProfile"),
                format!("{other} is not implemented"),
            ));
        }
    };
    if seccomp && !no_new_privs && !bounding.iter().any(|c| c == "SYS_ADMIN") {
        // libseccomp must set no_new_privs to load a filter without
        // CAP_SYS_ADMIN, which would change what the container may do.
        return Err(unsupported(
            format!("{field}.securityContext.seccompProfile"),
            "RuntimeDefault without allowPrivilegeEscalation: false is not implemented",
        ));
    }
    Ok(Identity {
        uid,
        gid,
        bounding,
        no_new_privs,
        seccomp,
        keep_lc_ctype: false,
    })
}

/// Bytes of a Kubernetes memory quantity (`128Mi`, `1G`, `1048576`).
pub fn parse_memory(q: &str) -> Option<u64> {
    let units: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok()?.checked_mul(*factor);
        }
    }
    q.parse().ok()
}

/// Millicores of a CPU quantity (`50m`, `1`, `0.5`).
pub fn parse_cpu(q: &str) -> Option<u64> {
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().ok();
    }
    let cores: f64 = q.parse().ok()?;
    (cores >= 0.0).then(|| (cores * 1000.0).round() as u64)
}

/// The kubelet's `$(NAME)` expansion in command, args and env values: a
/// defined variable is replaced, `$$` is a literal `$`, anything else (an
/// undefined name, `$((…))`) is kept as written.
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
            && let Some((_, value)) = env.iter().rev().find(|(k, _)| *k == body[..end])
        {
            out.push_str(value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The seccomp shim: loads the filter, then execs the container's command
/// with the environment it was given.
const SECCOMP_SHIM: &str = r#"import errno, os, sys
import seccomp
denied = sys.argv[1].split(",")
argv = sys.argv[3:]
f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
for name in denied:
    try:
        f.add_rule(seccomp.ERRNO(errno.EPERM), name)
    except (RuntimeError, ValueError, OSError):
        pass  # unknown on this architecture or kernel
f.load()
env = dict(os.environ)
env.pop("PYTHONCOERCECLOCALE", None)
if sys.argv[2] != "keep-lc-ctype":
    env.pop("LC_CTYPE", None)  # Python's C-locale coercion set it
os.execvpe(argv[0], argv, env)
"#;

/// One container's mount-namespace set-up and exec, as a shell script the
/// host's `/bin/sh` runs inside the new namespaces before the container's
/// own command replaces it.
struct Launch {
    script: String,
    argv: Vec<String>,
}

impl RunningPod {
    /// Runs `pod` (as stored by the API server) on `node`: init containers in
    /// order (a native sidecar started and its startupProbe passed before the
    /// next), then the app containers.
    pub async fn start(node: Node, pod: &Pod) -> Result<Self> {
        crate::require_tools(&["nsenter", "unshare", "setpriv", "chroot", "mount"])?;
        let json = serde_json::to_value(pod).map_err(|e| Error::Other(e.to_string()))?;
        check_fields(&json)?;
        require_seccomp_module(pod)?;
        let spec = pod
            .spec
            .clone()
            .ok_or_else(|| unsupported("spec", "missing"))?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        if spec.enable_service_links != Some(false) {
            let services = Api::<k8s_openapi::api::core::v1::Service>::namespaced(
                node.client.clone(),
                &namespace,
            )
            .list(&Default::default())
            .await
            .map_err(|e| Error::Kube("listing Services for enableServiceLinks".into(), e))?;
            if !services.items.is_empty() {
                return Err(unsupported(
                    "spec.enableServiceLinks",
                    "the namespace has Services; their variables are not implemented",
                ));
            }
        }
        let state = tempfile::Builder::new()
            .prefix(&format!("pod-runner-{name}-"))
            .tempdir()
            .map_err(|e| Error::Io("creating the pod's state folder".into(), e))?;
        // Root only: a container reaches a volume through its mounts, never
        // through this host path.
        std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::Io("restricting the pod's state folder".into(), e))?;
        let shim = state.path().join("seccomp-shim.py");
        std::fs::write(&shim, SECCOMP_SHIM)
            .map_err(|e| Error::Io("writing the seccomp shim".into(), e))?;
        let resolv = state.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            format!(
                "nameserver {}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:1 attempts:3\n",
                node.cluster_dns
            ),
        )
        .map_err(|e| Error::Io("writing resolv.conf".into(), e))?;
        let mut running = Self {
            name: name.clone(),
            namespace: namespace.clone(),
            node: node.clone(),
            containers: Vec::new(),
            finished: Vec::new(),
            state,
            tmpfs: Vec::new(),
            shim,
            stop_refresh: Arc::new(AtomicBool::new(false)),
            refresher: None,
        };
        let mut issued = BTreeMap::new();
        let volumes = running
            .materialise_volumes(pod, &spec.volumes.clone().unwrap_or_default(), &mut issued)
            .await?;
        running.refresher = Some(running.start_refresher(
            pod.clone(),
            spec.volumes.clone().unwrap_or_default(),
            volumes.clone(),
            issued,
        ));
        let grace =
            Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
        for (i, c) in spec
            .init_containers
            .clone()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let field = format!("spec.initContainers[{i}]");
            let native_sidecar = c.restart_policy.as_deref() == Some("Always");
            let container = running
                .spawn_container(pod, c, &field, &volumes, &resolv_path(&running), grace)
                .await?;
            if native_sidecar {
                running.containers.push(container);
                let index = running.containers.len() - 1;
                running.wait_startup(c, index, &field).await?;
                running.start_liveness(c, index);
            } else {
                let output = wait_exit(&container, &field).await?;
                running.cleanup_cgroups(&container.cgroups);
                running.finished.push((c.name.clone(), output));
            }
        }
        for (i, c) in spec.containers.iter().enumerate() {
            let field = format!("spec.containers[{i}]");
            let container = running
                .spawn_container(pod, c, &field, &volumes, &resolv_path(&running), grace)
                .await?;
            running.containers.push(container);
            let index = running.containers.len() - 1;
            running.wait_startup(c, index, &field).await?;
            running.start_liveness(c, index);
        }
        Ok(running)
    }

    /// Each volume's folder on the host.
    async fn materialise_volumes(
        &mut self,
        pod: &Pod,
        volumes: &[Volume],
        issued: &mut BTreeMap<String, (Instant, Duration)>,
    ) -> Result<BTreeMap<String, PathBuf>> {
        let mut dirs = BTreeMap::new();
        let base = self.state.path().join("volumes");
        for v in volumes {
            let dir = base.join(&v.name);
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Io(format!("creating volume {}", v.name), e))?;
            if let Some(empty) = &v.empty_dir {
                if empty.medium.as_deref() == Some("Memory") {
                    let size = match &empty.size_limit {
                        Some(q) => parse_memory(&q.0).ok_or_else(|| {
                            unsupported(
                                format!("volumes[{}].emptyDir.sizeLimit", v.name),
                                "unparsable",
                            )
                        })?,
                        None => 64 << 20,
                    };
                    run_host(
                        Command::new("mount")
                            .args([
                                "-t",
                                "tmpfs",
                                "-o",
                                &format!("size={size},mode=0777"),
                                "tmpfs",
                            ])
                            .arg(&dir),
                    )?;
                    self.tmpfs.push(dir.clone());
                } else {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                        .map_err(|e| Error::Io(format!("opening volume {}", v.name), e))?;
                }
            }
            dirs.insert(v.name.clone(), dir);
        }
        refresh_volumes(&self.node, pod, volumes, &dirs, issued).await?;
        Ok(dirs)
    }

    fn start_refresher(
        &self,
        pod: Pod,
        volumes: Vec<Volume>,
        dirs: BTreeMap<String, PathBuf>,
        mut issued: BTreeMap<String, (Instant, Duration)>,
    ) -> tokio::task::JoinHandle<()> {
        let node = self.node.clone();
        let stop = self.stop_refresh.clone();
        let name = self.name.clone();
        let namespace = self.namespace.clone();
        tokio::spawn(async move {
            let api = Api::<Pod>::namespaced(node.client.clone(), &namespace);
            let mut current = pod;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(VOLUME_REFRESH).await;
                if let Ok(p) = api.get(&name).await {
                    current = p;
                }
                // A failed refresh keeps the files the container has, as the
                // kubelet does.
                let _ = refresh_volumes(&node, &current, &volumes, &dirs, &mut issued).await;
            }
        })
    }

    async fn spawn_container(
        &self,
        pod: &Pod,
        c: &Container,
        field: &str,
        volumes: &BTreeMap<String, PathBuf>,
        resolv: &Path,
        grace: Duration,
    ) -> Result<RunningContainer> {
        let mut identity = identity(pod, c, field)?;
        let image = c.image.clone().unwrap_or_default();
        let files = self.node.images.images.get(&image).ok_or_else(|| {
            unsupported(
                format!("{field}.image"),
                format!("no image {image} on this node"),
            )
        })?;
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            ("HOSTNAME".into(), self.name.clone()),
        ];
        let mut spec_env: Vec<(String, String)> = Vec::new();
        for (i, e) in c.env.clone().unwrap_or_default().iter().enumerate() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), None) => v.clone(),
                (None, Some(from)) => {
                    let path = from
                        .field_ref
                        .as_ref()
                        .map(|f| f.field_path.clone())
                        .ok_or_else(|| {
                            unsupported(format!("{field}.env[{i}].valueFrom"), "not a fieldRef")
                        })?;
                    field_path_value(pod, &path, self.node.pod_ip)?
                }
                (None, None) => String::new(),
                (Some(_), Some(_)) => {
                    return Err(unsupported(
                        format!("{field}.env[{i}]"),
                        "value and valueFrom",
                    ));
                }
            };
            // `$(NAME)` in a literal value refers to the spec's entries
            // before this one (not a fieldRef's result, not PATH/HOSTNAME).
            let value = if e.value.is_some() {
                expand(&value, &spec_env)
            } else {
                value
            };
            spec_env.retain(|(k, _)| k != &e.name);
            spec_env.push((e.name.clone(), value.clone()));
            // A later entry of the same name wins, as in the kubelet.
            env.retain(|(k, _)| k != &e.name);
            env.push((e.name.clone(), value));
        }
        let argv: Vec<String> = c
            .command
            .clone()
            .unwrap_or_default()
            .into_iter()
            .chain(c.args.clone().unwrap_or_default())
            .map(|a| expand(&a, &spec_env))
            .collect();
        if argv.is_empty() {
            return Err(unsupported(
                format!("{field}.command"),
                "an image's default entrypoint is not implemented: give command",
            ));
        }
        identity.keep_lc_ctype = env.iter().any(|(k, _)| k == "LC_CTYPE");
        let cgroups = self.cgroups_for(c, field)?;
        let launch = self.launch(
            c, field, &identity, files, volumes, resolv, &cgroups, &env, argv,
        )?;
        let script_path = self.state.path().join(format!("launch-{}.sh", c.name));
        std::fs::write(&script_path, &launch.script)
            .map_err(|e| Error::Io(format!("writing the launch script of {}", c.name), e))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node.netns.display()))
            .args([
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--propagation",
                "private",
                "/bin/sh",
            ])
            .arg(&script_path)
            .args(&launch.argv);
        // The runner's own tools run with the test's environment; the
        // container gets exactly its own (`env -i` at the last exec).
        let process = ChildGuard::spawn(&format!("{}-{}", self.name, c.name), cmd)?;
        Ok(RunningContainer {
            name: c.name.clone(),
            process,
            identity,
            env,
            liveness_failures: Arc::new(AtomicU32::new(0)),
            liveness_threshold: c
                .liveness_probe
                .as_ref()
                .and_then(|p| p.failure_threshold)
                .unwrap_or(3)
                .max(1) as u32,
            cgroups,
            grace,
        })
    }

    /// The cgroups of one container, with its limits written.
    fn cgroups_for(&self, c: &Container, field: &str) -> Result<Vec<PathBuf>> {
        let resources = c.resources.clone().unwrap_or_default();
        let limits = resources.limits.unwrap_or_default();
        let requests = resources.requests.unwrap_or_default();
        let memory_limit = match limits.get("memory") {
            Some(q) => Some(parse_memory(&q.0).ok_or_else(|| {
                unsupported(format!("{field}.resources.limits.memory"), "unparsable")
            })?),
            None => None,
        };
        let cpu_limit = limits
            .get("cpu")
            .map(|q| parse_cpu(&q.0))
            .transpose_none(|| {
                unsupported(format!("{field}.resources.limits.cpu"), "unparsable")
            })?;
        let cpu_request = requests
            .get("cpu")
            .map(|q| parse_cpu(&q.0))
            .transpose_none(|| {
                unsupported(format!("{field}.resources.requests.cpu"), "unparsable")
            })?;
        // A memory request only guides the scheduler (and eviction order):
        // nothing for one node to enforce.
        if memory_limit.is_none() && cpu_limit.is_none() && cpu_request.is_none() {
            return Ok(Vec::new());
        }
        let leaf = format!("{}-{}-{}", self.namespace, self.name, c.name);
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let write = |dir: &Path, file: &str, value: String, what: &str| -> Result<()> {
            std::fs::write(dir.join(file), value).map_err(|e| {
                Error::Io(
                    format!(
                        "{field}.{what}: writing {} (the pod-runner needs a writable cgroup \
                         hierarchy: run the tests as root on a machine with cgroups mounted)",
                        dir.join(file).display()
                    ),
                    e,
                )
            })
        };
        let mkdir = |dir: &Path, what: &str| -> Result<()> {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Io(
                    format!("{field}.{what}: creating cgroup {}", dir.display()),
                    e,
                )
            })
        };
        let mut dirs = Vec::new();
        if v2 {
            let parent = Path::new("/sys/fs/cgroup/credbroker-pod-runner");
            mkdir(parent, "resources")?;
            let _ = std::fs::write(
                Path::new("/sys/fs/cgroup/cgroup.subtree_control"),
                "+memory +cpu",
            );
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu");
            let dir = parent.join(&leaf);
            mkdir(&dir, "resources")?;
            if let Some(bytes) = memory_limit {
                write(
                    &dir,
                    "memory.max",
                    bytes.to_string(),
                    "resources.limits.memory",
                )?;
            }
            if let Some(m) = cpu_limit {
                write(
                    &dir,
                    "cpu.max",
                    format!("{} 100000", m * 100),
                    "resources.limits.cpu",
                )?;
            }
            if let Some(m) = cpu_request {
                // The kubelet's mapping of shares to weight.
                let shares = (m * 1024 / 1000).max(2);
                let weight = 1 + ((shares - 2) * 9999) / 262142;
                write(
                    &dir,
                    "cpu.weight",
                    weight.to_string(),
                    "resources.requests.cpu",
                )?;
            }
            dirs.push(dir);
        } else {
            if let Some(bytes) = memory_limit {
                let dir = Path::new("/sys/fs/cgroup/memory/credbroker-pod-runner").join(&leaf);
                mkdir(&dir, "resources.limits.memory")?;
                write(
                    &dir,
                    "memory.limit_in_bytes",
                    bytes.to_string(),
                    "resources.limits.memory",
                )?;
                dirs.push(dir);
            }
            if cpu_limit.is_some() || cpu_request.is_some() {
                let dir = Path::new("/sys/fs/cgroup/cpu/credbroker-pod-runner").join(&leaf);
                mkdir(&dir, "resources")?;
                if let Some(m) = cpu_limit {
                    write(
                        &dir,
                        "cpu.cfs_period_us",
                        "100000".into(),
                        "resources.limits.cpu",
                    )?;
                    write(
                        &dir,
                        "cpu.cfs_quota_us",
                        (m * 100).to_string(),
                        "resources.limits.cpu",
                    )?;
                }
                if let Some(m) = cpu_request {
                    write(
                        &dir,
                        "cpu.shares",
                        (m * 1024 / 1000).max(2).to_string(),
                        "resources.requests.cpu",
                    )?;
                }
                dirs.push(dir);
            }
        }
        Ok(dirs)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        c: &Container,
        field: &str,
        id: &Identity,
        files: &[(String, PathBuf)],
        volumes: &BTreeMap<String, PathBuf>,
        resolv: &Path,
        cgroups: &[PathBuf],
        env: &[(String, String)],
        argv: Vec<String>,
    ) -> Result<Launch> {
        let dir = self.state.path().join(format!("container-{}", c.name));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Io(format!("creating the folder of {}", c.name), e))?;
        let d = sh_quote(&dir.display().to_string());
        let mut s = String::new();
        let _ = writeln!(s, "set -eu");
        for cg in cgroups {
            let _ = writeln!(
                s,
                "echo $$ > {}",
                sh_quote(&cg.join("cgroup.procs").display().to_string())
            );
        }
        let _ = writeln!(s, "mount -t tmpfs -o mode=0700 tmpfs {d}");
        let _ = writeln!(s, "mkdir {d}/upper {d}/work {d}/root");
        let _ = writeln!(
            s,
            "mount -t overlay overlay -o lowerdir=/,upperdir={d}/upper,workdir={d}/work {d}/root"
        );
        let _ = writeln!(s, "R={d}/root");
        let _ = writeln!(s, "mount -t proc proc \"$R/proc\"");
        let _ = writeln!(s, "mount --rbind /dev \"$R/dev\"");
        let _ = writeln!(s, "mount --rbind /sys \"$R/sys\"");
        let _ = writeln!(s, "mount -t tmpfs -o mode=1777 tmpfs \"$R/tmp\"");
        let _ = writeln!(s, "mount -t tmpfs -o mode=0755 tmpfs \"$R/run\"");
        let _ = writeln!(
            s,
            "rm -f \"$R/etc/resolv.conf\"; touch \"$R/etc/resolv.conf\"; mount --bind {} \"$R/etc/resolv.conf\"",
            sh_quote(&resolv.display().to_string())
        );
        // Mount points are made first, then the root goes read-only (if
        // the spec says so), then the binds: a volume on top of a read-only
        // path stays writable, as in a runtime.
        let mut binds = String::new();
        for (inside, host) in files {
            let q = sh_quote(&resolve_in_root(inside).display().to_string());
            let _ = writeln!(s, "mkdir -p \"$R$(dirname {q})\"; touch \"$R\"{q}");
            let _ = writeln!(
                binds,
                "mount --bind {} \"$R\"{q}",
                sh_quote(&host.display().to_string())
            );
            let _ = writeln!(binds, "mount -o remount,bind,ro \"$R\"{q}");
        }
        for (i, m) in c
            .volume_mounts
            .clone()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let host = volumes.get(&m.name).ok_or_else(|| {
                unsupported(
                    format!("{field}.volumeMounts[{i}].name"),
                    format!("no volume {}", m.name),
                )
            })?;
            if !m.mount_path.starts_with('/') || m.mount_path.contains("..") {
                return Err(unsupported(
                    format!("{field}.volumeMounts[{i}].mountPath"),
                    "not an absolute path",
                ));
            }
            let q = sh_quote(&resolve_in_root(&m.mount_path).display().to_string());
            let _ = writeln!(s, "mkdir -p \"$R\"{q}");
            let _ = writeln!(
                binds,
                "mount --bind {} \"$R\"{q}",
                sh_quote(&host.display().to_string())
            );
            if m.read_only == Some(true) {
                let _ = writeln!(binds, "mount -o remount,bind,ro \"$R\"{q}");
            }
        }
        let _ = writeln!(
            s,
            "mkdir -p \"$R/.pod-runner\"; touch \"$R/.pod-runner/seccomp.py\""
        );
        let _ = writeln!(
            binds,
            "mount --bind {} \"$R/.pod-runner/seccomp.py\"",
            sh_quote(&self.shim.display().to_string())
        );
        let read_only_root = c
            .security_context
            .as_ref()
            .and_then(|sc| sc.read_only_root_filesystem)
            == Some(true);
        if read_only_root {
            // The runner's fresh /tmp and /run are part of the image's root
            // for a runtime: read-only with it.
            // (bind: this mount point only, never a volume's filesystem)
            let _ = writeln!(
                s,
                "mount -o remount,bind,ro \"$R/tmp\"; mount -o remount,bind,ro \"$R/run\""
            );
            let _ = writeln!(s, "mount -o remount,ro \"$R\"");
        }
        s.push_str(&binds);
        let _ = writeln!(s, "cd \"$R\"");
        let _ = writeln!(
            s,
            "exec chroot \"$R\" /usr/bin/env -i {} {} \"$@\"",
            env.iter()
                .map(|(k, v)| sh_quote(&format!("{k}={v}")))
                .collect::<Vec<_>>()
                .join(" "),
            self.privileges(id)
                .iter()
                .map(|p| sh_quote(p))
                .collect::<Vec<_>>()
                .join(" ")
        );
        Ok(Launch { script: s, argv })
    }

    /// `setpriv …` (and the seccomp shim) ending in `--`, for a shell line.
    fn privileges(&self, id: &Identity) -> Vec<String> {
        let bounding = std::iter::once("-all".to_owned())
            .chain(id.bounding.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let mut p = vec![
            "/usr/bin/setpriv".to_owned(),
            format!("--reuid={}", id.uid),
            format!("--regid={}", id.gid),
            "--clear-groups".to_owned(),
            format!("--bounding-set={bounding}"),
            "--inh-caps=-all".to_owned(),
        ];
        if id.no_new_privs {
            p.push("--no-new-privs".to_owned());
        }
        p.push("--".to_owned());
        if id.seccomp {
            p.extend([
                "/usr/bin/env".to_owned(),
                "PYTHONCOERCECLOCALE=0".to_owned(),
                "/usr/bin/python3".to_owned(),
                "-I".to_owned(),
                "/.pod-runner/seccomp.py".to_owned(),
                RUNTIME_DEFAULT_DENIED.join(","),
                if id.keep_lc_ctype {
                    "keep-lc-ctype"
                } else {
                    "--"
                }
                .to_owned(),
            ]);
        }
        p
    }

    /// Waits for the startupProbe (if any) of container `index`.
    async fn wait_startup(&self, c: &Container, index: usize, field: &str) -> Result<()> {
        let Some(probe) = &c.startup_probe else {
            return Ok(());
        };
        let get = probe
            .http_get
            .as_ref()
            .ok_or_else(|| unsupported(format!("{field}.startupProbe"), "only httpGet"))?;
        let port = probe_port(get, field)?;
        let path = get.path.clone().unwrap_or_else(|| "/".into());
        let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
        let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        let failures = probe.failure_threshold.unwrap_or(3).max(1) as u32;
        tokio::time::sleep(Duration::from_secs(
            probe.initial_delay_seconds.unwrap_or(0).max(0) as u64,
        ))
        .await;
        let container = &self.containers[index];
        for _ in 0..failures {
            container
                .process
                .check_running()
                .map_err(|e| Error::Container {
                    name: c.name.clone(),
                    detail: format!("exited before its startupProbe passed: {e}"),
                })?;
            if http_probe(
                &self.node.node_netns,
                self.node.pod_ip,
                port,
                &path,
                timeout,
            )
            .await
            {
                return Ok(());
            }
            tokio::time::sleep(period).await;
        }
        Err(Error::Container {
            name: c.name.clone(),
            detail: format!(
                "startupProbe GET :{port}{path} failed {failures} times; output:\n{}",
                container.process.output_tail(4000)
            ),
        })
    }

    fn start_liveness(&self, c: &Container, index: usize) {
        let Some(probe) = c.liveness_probe.clone() else {
            return;
        };
        let Some(get) = probe.http_get.clone() else {
            return;
        };
        let Ok(port) = probe_port(&get, "") else {
            return;
        };
        let path = get.path.unwrap_or_else(|| "/".into());
        let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
        let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        let failures = self.containers[index].liveness_failures.clone();
        let stop = self.stop_refresh.clone();
        let netns = self.node.node_netns.clone();
        let pod_ip = self.node.pod_ip;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(period).await;
                if http_probe(&netns, pod_ip, port, &path, timeout).await {
                    failures.store(0, Ordering::Relaxed);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    /// Fails if a started container exited or failed its liveness probe
    /// (the kubelet would restart it; a test must not miss it).
    pub fn check(&self) -> Result<()> {
        for c in &self.containers {
            c.process.check_running().map_err(|e| Error::Container {
                name: c.name.clone(),
                detail: e.to_string(),
            })?;
            let failed = c.liveness_failures.load(Ordering::Relaxed);
            if failed >= c.liveness_threshold {
                return Err(Error::Container {
                    name: c.name.clone(),
                    detail: format!("livenessProbe failed {failed} times in a row"),
                });
            }
        }
        Ok(())
    }

    fn container(&self, name: &str) -> Result<&RunningContainer> {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::Other(format!("no running container {name}")))
    }

    /// What a container printed so far (an init container's whole output).
    pub fn logs(&self, name: &str) -> String {
        if let Some((_, out)) = self.finished.iter().find(|(n, _)| n == name) {
            return out.clone();
        }
        self.container(name)
            .map(|c| c.process.output())
            .unwrap_or_default()
    }

    /// The host folder behind a volume (root only), for tests that check
    /// what a container could not reach.
    pub fn volume_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.state.path().join("volumes").join(name);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(Error::Other(format!("no volume {name}")))
        }
    }

    /// The cgroup folders that hold a container's limits.
    pub fn cgroups_of(&self, name: &str) -> Result<Vec<PathBuf>> {
        Ok(self.container(name)?.cgroups.clone())
    }

    /// The environment of a container's first process, as the kernel holds
    /// it (`/proc/<pid>/environ`).
    pub fn process_environ(&self, name: &str) -> Result<Vec<(String, String)>> {
        let pid = container_init_pid(self.container(name)?.process.pid())?;
        let raw = std::fs::read(format!("/proc/{pid}/environ"))
            .map_err(|e| Error::Io(format!("reading the environment of {name}"), e))?;
        Ok(raw
            .split(|b| *b == 0)
            .filter(|e| !e.is_empty())
            .map(|e| {
                let e = String::from_utf8_lossy(e);
                let (k, v) = e.split_once('=').unwrap_or((&e, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect())
    }

    /// The environment the runner gave a container.
    pub fn env_of(&self, name: &str) -> Result<Vec<(String, String)>> {
        Ok(self.container(name)?.env.clone())
    }

    /// Like `kubectl exec`: runs `argv` inside a running container (its
    /// network, mount and PID namespaces, root, user, capabilities and
    /// seccomp filter, and its environment).
    pub async fn exec(&self, name: &str, argv: &[&str]) -> Result<Output> {
        let c = self.container(name)?;
        let init = container_init_pid(c.process.pid())?;
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.arg(format!("--target={init}"))
            .args(["--mount", "--pid", "--net", "--root", "--wd"])
            .args(self.privileges(&c.identity))
            .args(argv)
            .env_clear()
            .kill_on_drop(true);
        for (k, v) in &c.env {
            cmd.env(k, v);
        }
        tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .map_err(|_| Error::Other(format!("exec in {name}: {argv:?} took over 60 s")))?
            .map_err(|e| Error::Io(format!("exec in {name}"), e))
    }

    /// Stops the app containers, then the sidecars (in reverse order), each
    /// with SIGTERM and the pod's grace period before SIGKILL.
    pub async fn stop(mut self) {
        self.stop_refresh.store(true, Ordering::Relaxed);
        while let Some(c) = self.containers.pop() {
            if let Ok(pid) = container_init_pid(c.process.pid()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + c.grace;
            while Instant::now() < deadline && c.process.check_running().is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            kill_container(&c);
            let cgroups = c.cgroups.clone();
            drop(c);
            self.cleanup_cgroups(&cgroups);
        }
    }

    fn cleanup_cgroups(&self, dirs: &[PathBuf]) {
        for dir in dirs {
            // Empty once its processes are gone; a moment after a kill.
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        self.stop_refresh.store(true, Ordering::Relaxed);
        // No refresh may write into the folders removed below.
        if let Some(refresher) = self.refresher.take() {
            refresher.abort();
        }
        let cgroups: Vec<PathBuf> = self
            .containers
            .iter()
            .flat_map(|c| c.cgroups.clone())
            .collect();
        for c in &self.containers {
            kill_container(c);
        }
        self.containers.clear();
        self.cleanup_cgroups(&cgroups);
        for dir in self.tmpfs.drain(..) {
            let _ = Command::new("umount").arg("-l").arg(&dir).status();
        }
    }
}

/// `path` with every symlink along it resolved as the container sees them
/// (its root is an overlay of the host's, so the host's links are its
/// links). Without this, `mkdir -p "$R/var/run/…"` would follow Debian's
/// absolute `/var/run -> /run` out of the container's root onto the host.
fn resolve_in_root(path: &str) -> PathBuf {
    let mut resolved = PathBuf::from("/");
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .rev()
        .collect();
    let mut hops = 0;
    while let Some(component) = pending.pop() {
        let candidate = resolved.join(&component);
        match std::fs::read_link(&candidate) {
            Ok(target) if hops < 32 => {
                hops += 1;
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                for c in target
                    .to_string_lossy()
                    .split('/')
                    .filter(|c| !c.is_empty())
                    .rev()
                {
                    pending.push(c.to_owned());
                }
            }
            _ if component == ".." => {
                resolved.pop();
            }
            _ if component == "." => {}
            _ => resolved = candidate,
        }
    }
    resolved
}

fn resolv_path(pod: &RunningPod) -> PathBuf {
    pod.state.path().join("resolv.conf")
}

trait TransposeNone<T> {
    fn transpose_none(self, err: impl FnOnce() -> Error) -> Result<Option<T>>;
}

impl<T> TransposeNone<T> for Option<Option<T>> {
    fn transpose_none(self, err: impl FnOnce() -> Error) -> Result<Option<T>> {
        match self {
            None => Ok(None),
            Some(Some(v)) => Ok(Some(v)),
            Some(None) => Err(err()),
        }
    }
}

fn probe_port(get: &k8s_openapi::api::core::v1::HTTPGetAction, field: &str) -> Result<u16> {
    match &get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => u16::try_from(*p)
            .map_err(|_| unsupported(format!("{field}.httpGet.port"), "out of range")),
        _ => Err(unsupported(format!("{field}.httpGet.port"), "named ports")),
    }
}

/// Fails, saying what to install, when a container asks for RuntimeDefault
/// and Debian's python3-seccomp is missing (else the container would die
/// with an ImportError buried in its log).
fn require_seccomp_module(pod: &Pod) -> Result<()> {
    let wants = |p: &Option<k8s_openapi::api::core::v1::SeccompProfile>| {
        p.as_ref().is_some_and(|p| p.type_ == "RuntimeDefault")
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let pod_level = wants(
        &spec
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.clone()),
    );
    let any = pod_level
        || spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| {
                wants(
                    &c.security_context
                        .as_ref()
                        .and_then(|s| s.seccomp_profile.clone()),
                )
            });
    if !any {
        return Ok(());
    }
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import seccomp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(())
    } else {
        Err(Error::Other(
            "seccompProfile RuntimeDefault needs Debian's python3-seccomp for /usr/bin/python3 \
             (apt-get install python3-seccomp, or run make setup)"
                .into(),
        ))
    }
}

/// SIGKILLs the container's first process, which ends its PID namespace and
/// with it every process inside. Killing `unshare` alone is not enough: the
/// UID change at the last exec clears the parent-death signal.
fn kill_container(c: &RunningContainer) {
    if let Ok(pid) = container_init_pid(c.process.pid()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // Wait briefly for the namespace to empty, so cgroups can be removed.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && c.process.check_running().is_ok() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The PID (in the host's namespace) of the container's first process: the
/// child `unshare --fork` started.
fn container_init_pid(unshare: u32) -> Result<u32> {
    let children = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
        .map_err(|e| Error::Io(format!("reading the children of {unshare}"), e))?;
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| Error::Other(format!("process {unshare} has no container process")))
}

async fn wait_exit(container: &RunningContainer, field: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match container.process.check_running() {
            Ok(()) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(()) => {
                return Err(Error::Container {
                    name: container.name.clone(),
                    detail: format!("{field} did not exit within 120 s"),
                });
            }
            Err(credbroker_test_support::Error::ProcessExited { status, output, .. }) => {
                if status.contains("exit status: 0") {
                    return Ok(container.process.output());
                }
                return Err(Error::Container {
                    name: container.name.clone(),
                    detail: format!(
                        "{field} failed ({status}): the pod stays in Init; output:\n{output}"
                    ),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// GET `http://<pod IP>:port/path` from the node's network, as the kubelet
/// does; 200–399 passes.
async fn http_probe(
    netns: &Path,
    pod_ip: IpAddr,
    port: u16,
    path: &str,
    timeout: Duration,
) -> bool {
    let netns = netns.to_path_buf();
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let Ok(file) = std::fs::File::open(&netns) else {
            return false;
        };
        let stream = std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            std::net::TcpStream::connect_timeout(&SocketAddr::new(pod_ip, port), timeout).ok()
        })
        .join()
        .ok()
        .flatten();
        let Some(stream) = stream else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(timeout));
        matches!(
            credbroker_test_support::http_get(stream, &path),
            Ok((200..=399, _))
        )
    })
    .await
    .unwrap_or(false)
}

/// Writes `name` in `dir` atomically (a reader sees the old or the new file).
fn write_atomic(dir: &Path, name: &str, content: &[u8], mode: u32) -> Result<()> {
    let target = dir.join(name);
    if std::fs::read(&target).is_ok_and(|old| old == content) {
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Io(format!("creating {}", parent.display()), e))?;
    }
    let tmp = dir.join(format!(".{}.tmp", name.replace('/', "_")));
    std::fs::write(&tmp, content)
        .map_err(|e| Error::Io(format!("writing {}", tmp.display()), e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Io(format!("chmod {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &target)
        .map_err(|e| Error::Io(format!("renaming to {}", target.display()), e))
}

/// Brings the files of ConfigMap, downward-API and projected-token volumes
/// up to date. `issued` remembers when each token was requested, so a token
/// is renewed at 80% of its lifetime, as the kubelet does.
async fn refresh_volumes(
    node: &Node,
    pod: &Pod,
    volumes: &[Volume],
    dirs: &BTreeMap<String, PathBuf>,
    issued: &mut BTreeMap<String, (Instant, Duration)>,
) -> Result<()> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    for v in volumes {
        let Some(dir) = dirs.get(&v.name) else {
            continue;
        };
        if let Some(cm) = &v.config_map {
            let mode = cm.default_mode.unwrap_or(0o644) as u32;
            let found = Api::<ConfigMap>::namespaced(node.client.clone(), &namespace)
                .get_opt(&cm.name)
                .await
                .map_err(|e| Error::Kube(format!("reading ConfigMap {}", cm.name), e))?;
            match found {
                None if cm.optional == Some(true) => {}
                None => {
                    return Err(Error::Other(format!(
                        "volume {}: ConfigMap {} not found (the kubelet keeps the pod in \
                         ContainerCreating)",
                        v.name, cm.name
                    )));
                }
                Some(found) => {
                    let data = found.data.unwrap_or_default();
                    let items: Vec<(String, String)> = match &cm.items {
                        Some(items) => items
                            .iter()
                            .map(|i| (i.key.clone(), i.path.clone()))
                            .collect(),
                        None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
                    };
                    for (key, path) in items {
                        if let Some(value) = data.get(&key) {
                            write_atomic(dir, &path, value.as_bytes(), mode)?;
                        }
                    }
                }
            }
        }
        if let Some(down) = &v.downward_api {
            let mode = down.default_mode.unwrap_or(0o644) as u32;
            for item in down.items.clone().unwrap_or_default() {
                let path = item
                    .field_ref
                    .map(|f| f.field_path)
                    .ok_or_else(|| unsupported(format!("volumes[{}]", v.name), "not a fieldRef"))?;
                let value = field_path_value(pod, &path, node.pod_ip)?;
                write_atomic(dir, &item.path, value.as_bytes(), mode)?;
            }
        }
        if let Some(projected) = &v.projected {
            let mode = projected.default_mode.unwrap_or(0o644) as u32;
            for source in projected.sources.clone().unwrap_or_default() {
                let Some(token) = source.service_account_token else {
                    continue;
                };
                let key = format!("{}/{}", v.name, token.path);
                let expiry =
                    Duration::from_secs(token.expiration_seconds.unwrap_or(3600).max(600) as u64);
                if issued
                    .get(&key)
                    .is_some_and(|(at, life)| at.elapsed() < life.mul_f64(0.8))
                {
                    continue;
                }
                let jwt = request_token(node, pod, token.audience.as_deref(), expiry).await?;
                write_atomic(dir, &token.path, jwt.as_bytes(), mode)?;
                issued.insert(key, (Instant::now(), expiry));
            }
        }
    }
    Ok(())
}

/// A TokenRequest for the pod's ServiceAccount, bound to the pod.
async fn request_token(
    node: &Node,
    pod: &Pod,
    audience: Option<&str>,
    expiry: Duration,
) -> Result<String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]),
            expiration_seconds: Some(expiry.as_secs() as i64),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    let response: TokenRequest = Api::<ServiceAccount>::namespaced(node.client.clone(), &namespace)
        .create_subresource("token", &sa, &PostParams::default(), &request)
        .await
        .map_err(|e| Error::Kube(format!("requesting a token for {namespace}/{sa}"), e))?;
    response.status.and_then(|s| s.token).ok_or_else(|| {
        Error::Other(format!(
            "TokenRequest for {namespace}/{sa} returned no token"
        ))
    })
}

fn run_host(cmd: &mut Command) -> Result<()> {
    credbroker_test_support::run(cmd)
        .map(drop)
        .map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: Value) -> Value {
        json!({ "metadata": { "name": "p" }, "spec": spec })
    }

    fn refused(spec: Value) -> String {
        match check_fields(&pod(spec)) {
            Err(Error::Unsupported { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_field_the_runner_does_not_implement_is_refused_by_name() {
        let c = json!({ "name": "a", "image": "i", "command": ["sh"] });
        assert!(check_fields(&pod(json!({ "containers": [c.clone()] }))).is_ok());
        assert_eq!(
            refused(json!({ "containers": [c.clone()], "hostAliases": [] })),
            "spec.hostAliases"
        );
        let mut ports = c.clone();
        ports["ports"] = json!([{ "containerPort": 80 }]);
        assert_eq!(
            refused(json!({ "containers": [ports] })),
            "spec.containers[0].ports"
        );
        let mut sub = c.clone();
        sub["volumeMounts"] = json!([{ "name": "v", "mountPath": "/x", "subPath": "y" }]);
        assert_eq!(
            refused(json!({ "containers": [sub] })),
            "spec.containers[0].volumeMounts[0].subPath"
        );
        let mut secret_env = c.clone();
        secret_env["env"] =
            json!([{ "name": "X", "valueFrom": { "secretKeyRef": { "name": "s", "key": "k" } } }]);
        assert_eq!(
            refused(json!({ "containers": [secret_env] })),
            "spec.containers[0].env[0].valueFrom"
        );
        let mut privileged = c.clone();
        privileged["securityContext"] = json!({ "privileged": true });
        assert_eq!(
            refused(json!({ "containers": [privileged] })),
            "spec.containers[0].securityContext.privileged"
        );
        let mut storage = c.clone();
        storage["resources"] = json!({ "limits": { "ephemeral-storage": "1Gi" } });
        assert_eq!(
            refused(json!({ "containers": [storage] })),
            "spec.containers[0].resources.limits.ephemeral-storage"
        );
        assert_eq!(
            refused(
                json!({ "containers": [c.clone()], "volumes": [{ "name": "h", "hostPath": { "path": "/" } }] })
            ),
            "spec.volumes[0].hostPath"
        );
        assert_eq!(
            refused(
                json!({ "containers": [c.clone()], "volumes": [{ "name": "k", "projected": { "sources": [{ "configMap": { "name": "kube-root-ca.crt" } }] } }] })
            ),
            "spec.volumes[0].projected.sources[0]"
        );
        assert_eq!(
            refused(json!({ "containers": [c], "dnsPolicy": "Default" })),
            "spec.dnsPolicy"
        );
    }

    #[test]
    fn quantities_parse_as_the_api_server_writes_them() {
        assert_eq!(parse_memory("128Mi"), Some(128 << 20));
        assert_eq!(parse_memory("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory("1048576"), Some(1 << 20));
        assert_eq!(parse_memory("lots"), None);
        assert_eq!(parse_cpu("50m"), Some(50));
        assert_eq!(parse_cpu("1"), Some(1000));
        assert_eq!(parse_cpu("0.5"), Some(500));
    }

    #[test]
    fn mount_paths_resolve_through_the_hosts_symlinks() {
        // Debian's /var/run is a link to /run; a container's view is the same.
        if std::fs::read_link("/var/run").is_ok() {
            assert_eq!(
                resolve_in_root("/var/run/secrets/x"),
                PathBuf::from("/run/secrets/x")
            );
        }
        assert_eq!(
            resolve_in_root("/etc/credbroker/../credbroker/pod"),
            PathBuf::from("/etc/credbroker/pod")
        );
    }
}

#[cfg(test)]
mod expand_tests {
    use super::expand;

    #[test]
    fn dollar_references_expand_as_the_kubelet_does() {
        let env = vec![
            ("A".to_owned(), "x".to_owned()),
            ("B".to_owned(), "y".to_owned()),
        ];
        assert_eq!(expand("$(A)-$(B)", &env), "x-y");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(
            expand("$(C) $((i+1)) $(curl -s)", &env),
            "$(C) $((i+1)) $(curl -s)"
        );
        assert_eq!(expand("cost $5", &env), "cost $5");
    }
}
