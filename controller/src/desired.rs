//! The desired state: from every binding, the policies and the namespaces'
//! labels, what should exist for each (namespace, service account), and
//! what each binding's verdict is. Pure: no clients, no clock.
//!
//! This is where the least-privilege guarantee is made: a grant names only
//! exact KV paths of effective bindings, each checked again here against
//! the schema's allowlist, plus the token self-service paths.

use std::collections::{BTreeMap, BTreeSet};

use credbroker_crds::config::{
    FORMAT_VERSION, SidecarBinding, SidecarBindings, SidecarDestination,
};
use credbroker_crds::keys::bindings_configmap_name;
use credbroker_crds::{ClusterCredentialPolicy, CredentialBinding, VaultSecretRef, validate};
use serde::{Deserialize, Serialize};

use crate::admission::{Denial, admit};
use crate::names::vault_name;
use crate::settings::GrantSettings;

/// One (namespace, service account).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountKey {
    pub namespace: String,
    pub service_account: String,
}

/// A binding, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BindingKey {
    pub namespace: String,
    pub name: String,
}

/// Why a binding does or does not count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted and granted.
    Effective,
    /// No policy allows it.
    Denied(Denial),
    /// It fails the schema's checks, run again here.
    Invalid(String),
    /// It clashes with another binding of the same service account.
    Conflict(String),
    /// Its CA ConfigMap is missing or holds no certificate.
    CaUnavailable(String),
    /// It is being deleted.
    Deleting,
}

/// What should exist for one service account with effective bindings.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub key: AccountKey,
    /// The Vault policy's and role's name.
    pub vault_name: String,
    /// The ACL policy, as the JSON text written to Vault.
    pub policy: String,
    pub role: KubernetesRole,
    /// The ConfigMap's name and content.
    pub configmap_name: String,
    pub sidecar: SidecarBindings,
    /// The effective bindings (name, uid), the ConfigMap's owners.
    pub owners: Vec<(String, String)>,
}

/// The Kubernetes-auth role, as written to and compared with
/// `auth/<mount>/role/<name>`. Every field that could widen what a token
/// gets is set explicitly, because a write merges into the stored role: a
/// hand-set `token_period` (renewable forever), `token_num_uses`,
/// `token_bound_cidrs` or `token_type` would otherwise survive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesRole {
    pub bound_service_account_names: Vec<String>,
    pub bound_service_account_namespaces: Vec<String>,
    pub audience: String,
    pub token_ttl: u64,
    pub token_max_ttl: u64,
    pub token_explicit_max_ttl: u64,
    pub token_period: u64,
    pub token_num_uses: u64,
    pub token_bound_cidrs: Vec<String>,
    pub token_type: String,
    pub token_no_default_policy: bool,
    pub token_policies: Vec<String>,
}

/// Every account that should exist, and every binding's verdict.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub accounts: BTreeMap<AccountKey, Account>,
    pub verdicts: BTreeMap<BindingKey, Verdict>,
}

/// What the desired state is computed from.
pub struct Inputs<'a> {
    pub bindings: &'a [&'a CredentialBinding],
    pub policies: &'a [ClusterCredentialPolicy],
    /// Namespace name → its labels. A namespace missing here (not yet seen,
    /// or gone) has no labels, so only `allNamespaces` policies select it.
    pub namespace_labels: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// (namespace, ConfigMap name, key) → PEM, for every `caConfigMap` the
    /// bindings name that exists. `None` assumes every one exists and
    /// leaves the PEM out: the sweep asks only which grants may stay.
    pub ca_pems: Option<&'a BTreeMap<(String, String, String), String>>,
    pub settings: &'a GrantSettings,
}

/// The token paths every sidecar token may use on itself, with the
/// capability each needs.
const SELF_SERVICE: [(&str, &str); 3] = [
    ("auth/token/lookup-self", "read"),
    ("auth/token/renew-self", "update"),
    ("auth/token/revoke-self", "update"),
];

/// Computes the desired state.
pub fn desired_state(inputs: &Inputs<'_>) -> Desired {
    let mut desired = Desired::default();
    // Bindings by account, oldest first, so a conflict resolves the same
    // way every time and a new binding never displaces one already working.
    let mut by_account: BTreeMap<AccountKey, Vec<(&CredentialBinding, SidecarBinding)>> =
        BTreeMap::new();
    let mut sorted: Vec<&CredentialBinding> = inputs.bindings.to_vec();
    sorted.sort_by_key(|b| {
        (
            b.metadata.creation_timestamp.as_ref().map(|t| t.0),
            key_of(b),
        )
    });
    let no_labels = BTreeMap::new();
    for binding in sorted {
        let key = key_of(binding);
        let verdict = (|| {
            if binding.metadata.deletion_timestamp.is_some() {
                return Err(Verdict::Deleting);
            }
            validate::binding_spec(&binding.spec).map_err(|e| Verdict::Invalid(e.to_string()))?;
            let labels = inputs
                .namespace_labels
                .get(&key.namespace)
                .unwrap_or(&no_labels);
            admit(&key.namespace, labels, &binding.spec, inputs.policies)
                .map_err(Verdict::Denied)?;
            sidecar_binding(binding, &key, inputs.ca_pems)
        })();
        match verdict {
            Ok(sidecar) => {
                let account = AccountKey {
                    namespace: key.namespace.clone(),
                    service_account: binding.spec.service_account_name.clone(),
                };
                let siblings = by_account.entry(account).or_default();
                if let Some((other, _)) = siblings
                    .iter()
                    .find(|(o, _)| o.spec.placeholder.env == binding.spec.placeholder.env)
                {
                    desired.verdicts.insert(
                        key,
                        Verdict::Conflict(format!(
                            "placeholder env {} is already used by binding {} of service account {}",
                            binding.spec.placeholder.env,
                            other.metadata.name.as_deref().unwrap_or_default(),
                            binding.spec.service_account_name
                        )),
                    );
                    continue;
                }
                siblings.push((binding, sidecar));
                desired.verdicts.insert(key, Verdict::Effective);
            }
            Err(verdict) => {
                desired.verdicts.insert(key, verdict);
            }
        }
    }
    for (key, members) in by_account {
        let name = vault_name(
            &inputs.settings.cluster_id,
            &key.namespace,
            &key.service_account,
        );
        let secrets: Vec<&VaultSecretRef> = members.iter().map(|(_, s)| &s.secret).collect();
        let Some(policy) = policy_document(&secrets) else {
            // Unreachable after validation; refusing is the safe answer.
            for (b, _) in &members {
                desired.verdicts.insert(
                    key_of(b),
                    Verdict::Invalid("the Vault path is not an exact KV path".into()),
                );
            }
            continue;
        };
        let role = KubernetesRole {
            bound_service_account_names: vec![key.service_account.clone()],
            bound_service_account_namespaces: vec![key.namespace.clone()],
            audience: inputs.settings.audience.clone(),
            token_ttl: inputs.settings.token_ttl.as_secs(),
            token_max_ttl: inputs.settings.token_max_ttl.as_secs(),
            token_explicit_max_ttl: 0,
            token_period: 0,
            token_num_uses: 0,
            token_bound_cidrs: Vec::new(),
            token_type: "default".into(),
            token_no_default_policy: true,
            token_policies: vec![name.clone()],
        };
        let owners = members
            .iter()
            .map(|(b, _)| {
                (
                    b.metadata.name.clone().unwrap_or_default(),
                    b.metadata.uid.clone().unwrap_or_default(),
                )
            })
            .collect();
        let sidecar = SidecarBindings {
            format_version: FORMAT_VERSION,
            vault_role: Some(name.clone()),
            bindings: members.into_iter().map(|(_, s)| s).collect(),
        };
        desired.accounts.insert(
            key.clone(),
            Account {
                configmap_name: bindings_configmap_name(&key.service_account),
                key,
                vault_name: name,
                policy,
                role,
                sidecar,
                owners,
            },
        );
    }
    desired
}

/// The bindings ConfigMap an account should have: its content, the
/// controller's labels, and an owner reference to each effective binding.
pub fn desired_configmap(account: &Account) -> Option<k8s_openapi::api::core::v1::ConfigMap> {
    use credbroker_crds::keys::{BINDINGS_CONFIGMAP_KEY, MANAGED_BY, SERVICE_ACCOUNT_LABEL};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    let json = serde_json::to_string_pretty(&account.sidecar).ok()?;
    let sa: String = account.key.service_account.chars().take(63).collect();
    let labels: BTreeMap<String, String> = [
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
        (
            SERVICE_ACCOUNT_LABEL.to_owned(),
            sa.trim_end_matches(['-', '.', '_']).to_owned(),
        ),
    ]
    .into();
    let owners = account
        .owners
        .iter()
        .map(|(name, uid)| OwnerReference {
            api_version: format!("{}/{}", credbroker_crds::GROUP, credbroker_crds::VERSION),
            kind: "CredentialBinding".into(),
            name: name.clone(),
            uid: uid.clone(),
            controller: Some(false),
            block_owner_deletion: Some(false),
        })
        .collect();
    Some(k8s_openapi::api::core::v1::ConfigMap {
        metadata: ObjectMeta {
            name: Some(account.configmap_name.clone()),
            namespace: Some(account.key.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(owners),
            ..Default::default()
        },
        data: Some([(BINDINGS_CONFIGMAP_KEY.to_owned(), json)].into()),
        ..Default::default()
    })
}

/// Whether `current` already says what `desired` says (data, the
/// controller's labels, owners), so no write is needed.
pub fn configmap_is_current(
    current: &k8s_openapi::api::core::v1::ConfigMap,
    desired: &k8s_openapi::api::core::v1::ConfigMap,
) -> bool {
    let labels = desired
        .metadata
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| current.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
    current.data == desired.data
        && labels
        && current.metadata.owner_references == desired.metadata.owner_references
}

pub fn key_of(binding: &CredentialBinding) -> BindingKey {
    BindingKey {
        namespace: binding.metadata.namespace.clone().unwrap_or_default(),
        name: binding.metadata.name.clone().unwrap_or_default(),
    }
}

/// A binding as the sidecar enforces it, with CA ConfigMaps resolved.
fn sidecar_binding(
    binding: &CredentialBinding,
    key: &BindingKey,
    ca_pems: Option<&BTreeMap<(String, String, String), String>>,
) -> Result<SidecarBinding, Verdict> {
    let spec = &binding.spec;
    let mut destinations = Vec::with_capacity(spec.destinations.len());
    for d in &spec.destinations {
        let extra_ca_pem = match &d.ca_config_map {
            None => None,
            Some(_) if ca_pems.is_none() => None,
            Some(ca) => {
                let found = ca_pems.and_then(|pems| {
                    pems.get(&(key.namespace.clone(), ca.name.clone(), ca.key.clone()))
                });
                match found {
                    Some(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => Some(pem.clone()),
                    Some(_) => {
                        return Err(Verdict::CaUnavailable(format!(
                            "key {} of ConfigMap {}/{} holds no PEM certificate",
                            ca.key, key.namespace, ca.name
                        )));
                    }
                    None => {
                        return Err(Verdict::CaUnavailable(format!(
                            "ConfigMap {}/{} with key {} (caConfigMap of host {}) not found",
                            key.namespace, ca.name, ca.key, d.host
                        )));
                    }
                }
            }
        };
        destinations.push(SidecarDestination {
            host: d.host.clone(),
            port: d.port,
            methods: d.methods.clone().unwrap_or_default(),
            paths: d.paths.clone().unwrap_or_default(),
            extra_ca_pem,
            allow_cleartext: d.allow_cleartext,
        });
    }
    Ok(SidecarBinding {
        id: key.name.clone(),
        secret: spec.source.vault.clone(),
        destinations,
        surfaces: spec.inject.surfaces.clone(),
        refresh_interval: spec.refresh_interval.clone(),
        placeholder: Some(spec.placeholder.clone()),
    })
}

/// The ACL policy granting `read` on exactly these secrets (KV v2: their
/// data and metadata paths; KV v1: the path) and the token self-service
/// paths, as JSON. `None` if any path is not an exact KV path, so no grant
/// is ever wider than what was bound: a glob (`*`, `+`) or a `..` segment
/// cannot reach Vault from here, whatever the schema let through.
pub fn policy_document(secrets: &[&VaultSecretRef]) -> Option<String> {
    let mut paths: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for s in secrets {
        let exact = validate::vault_mount("mount", &s.mount).is_ok()
            && validate::vault_path("path", &s.path).is_ok()
            && (s.mount.as_str(), s.path.as_str()) != ("", "")
            && s.mount
                .bytes()
                .chain(s.path.bytes())
                .all(|c| c.is_ascii_alphanumeric() || b"._-/".contains(&c));
        if !exact {
            return None;
        }
        match s.kv_version {
            2 => {
                paths
                    .entry(format!("{}/data/{}", s.mount, s.path))
                    .or_default()
                    .insert("read");
                paths
                    .entry(format!("{}/metadata/{}", s.mount, s.path))
                    .or_default()
                    .insert("read");
            }
            1 => {
                paths
                    .entry(format!("{}/{}", s.mount, s.path))
                    .or_default()
                    .insert("read");
            }
            _ => return None,
        }
    }
    for (path, capability) in SELF_SERVICE {
        paths.entry(path.to_owned()).or_default().insert(capability);
    }
    Some(acl_document(paths))
}

/// An ACL policy as JSON text: each path with its capabilities, in path
/// order, so the same grant always reads the same (compare-before-write
/// relies on it).
fn acl_document<C: Serialize>(paths: BTreeMap<String, C>) -> String {
    let document = serde_json::json!({
        "path": paths
            .into_iter()
            .map(|(path, caps)| (path, serde_json::json!({ "capabilities": caps })))
            .collect::<serde_json::Map<_, _>>()
    });
    serde_json::to_string_pretty(&document).unwrap_or_default()
}

/// The Vault policy the controller itself needs, as JSON: write, read and
/// delete on this cluster's `credbroker-<tag>-*` policies and roles, list on
/// both (for the sweep), read on the KV v2 metadata of `kv_mounts` (for
/// `SecretFound`; never data), and its own token's self-service paths.
pub fn controller_policy(cluster_id: &str, auth_mount: &str, kv_mounts: &[String]) -> String {
    let prefix = crate::names::cluster_prefix(cluster_id);
    let manage = ["create", "read", "update", "delete"];
    let mut paths: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    paths.insert(format!("sys/policies/acl/{prefix}*"), manage.to_vec());
    paths.insert("sys/policies/acl".into(), vec!["list"]);
    paths.insert(format!("auth/{auth_mount}/role/{prefix}*"), manage.to_vec());
    paths.insert(format!("auth/{auth_mount}/role"), vec!["list"]);
    for mount in kv_mounts {
        paths.insert(format!("{mount}/metadata/*"), vec!["read"]);
    }
    for (path, capability) in SELF_SERVICE {
        paths.insert(path.to_owned(), vec![capability]);
    }
    acl_document(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use credbroker_crds::CredentialBindingSpec;

    pub(crate) fn binding(ns: &str, name: &str, sa: &str, path: &str) -> CredentialBinding {
        let spec: CredentialBindingSpec = serde_json::from_value(serde_json::json!({
            "serviceAccountName": sa,
            "source": { "vault": { "mount": "secret", "path": path, "key": "api_key" } },
            "placeholder": { "env": format!("KEY_{}", name.to_uppercase().replace('-', "_")) },
            "destinations": [{ "host": "api.openai.com" }]
        }))
        .unwrap();
        let mut b = CredentialBinding::new(name, spec);
        b.metadata.namespace = Some(ns.into());
        b.metadata.uid = Some(format!("uid-{ns}-{name}"));
        b
    }

    fn allow_all() -> ClusterCredentialPolicy {
        ClusterCredentialPolicy::new(
            "all",
            serde_json::from_value(serde_json::json!({
                "namespaceSelector": {}, "allNamespaces": true,
                "allow": [{ "vault": { "mount": "secret", "pathPrefix": "teams/" },
                            "destinations": ["api.openai.com"] },
                          { "vault": { "mount": "kv1", "pathPrefix": "teams/", "kvVersion": 1 },
                            "destinations": ["api.openai.com"] }]
            }))
            .unwrap(),
        )
    }

    fn run(bindings: &[CredentialBinding], policies: &[ClusterCredentialPolicy]) -> Desired {
        let refs: Vec<&CredentialBinding> = bindings.iter().collect();
        desired_state(&Inputs {
            bindings: &refs,
            policies,
            namespace_labels: &BTreeMap::new(),
            ca_pems: Some(&BTreeMap::new()),
            settings: &GrantSettings::new("test"),
        })
    }

    #[test]
    fn one_account_one_policy_with_exactly_the_bound_paths() {
        let mut v1 = binding("agents", "b", "research", "teams/x/b");
        v1.spec.source.vault.kv_version = 1;
        v1.spec.source.vault.mount = "kv1".into();
        let d = run(
            &[binding("agents", "a", "research", "teams/x/a"), v1],
            &[allow_all()],
        );
        assert_eq!(d.accounts.len(), 1);
        let account = d.accounts.values().next().unwrap();
        let policy: serde_json::Value = serde_json::from_str(&account.policy).unwrap();
        assert_eq!(
            policy,
            serde_json::json!({ "path": {
                "secret/data/teams/x/a": { "capabilities": ["read"] },
                "secret/metadata/teams/x/a": { "capabilities": ["read"] },
                "kv1/teams/x/b": { "capabilities": ["read"] },
                "auth/token/lookup-self": { "capabilities": ["read"] },
                "auth/token/renew-self": { "capabilities": ["update"] },
                "auth/token/revoke-self": { "capabilities": ["update"] },
            }})
        );
        assert_eq!(
            account.role.token_policies,
            vec![account.vault_name.clone()]
        );
        assert!(account.role.token_no_default_policy);
        assert_eq!(account.role.audience, "credbroker");
        assert_eq!(account.role.bound_service_account_names, ["research"]);
        assert_eq!(account.role.bound_service_account_namespaces, ["agents"]);
        assert_eq!(account.sidecar.bindings.len(), 2);
        assert_eq!(
            account.sidecar.vault_role.as_deref(),
            Some(account.vault_name.as_str())
        );
        assert!(account.sidecar.validate().is_ok());
        assert_eq!(account.owners.len(), 2);
    }

    #[test]
    fn denied_invalid_deleting_and_conflicting_bindings_grant_nothing() {
        let mut deleting = binding("agents", "gone", "research", "teams/x/gone");
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let mut invalid = binding("agents", "bad", "research", "teams/x/bad");
        invalid.spec.source.vault.path = "teams/../sys".into();
        let mut glob = binding("agents", "glob", "research", "teams/*");
        glob.spec.source.vault.path = "teams/*".into();
        let outside = binding("agents", "outside", "research", "other/x");
        let mut twin = binding("agents", "twin", "research", "teams/x/twin");
        twin.spec.placeholder.env = "KEY_A".into();
        let d = run(
            &[
                binding("agents", "a", "research", "teams/x/a"),
                deleting,
                invalid,
                glob,
                outside,
                twin,
            ],
            &[allow_all()],
        );
        let verdict = |n: &str| {
            d.verdicts[&BindingKey {
                namespace: "agents".into(),
                name: n.into(),
            }]
                .clone()
        };
        assert_eq!(verdict("a"), Verdict::Effective);
        assert_eq!(verdict("gone"), Verdict::Deleting);
        assert!(
            matches!(verdict("bad"), Verdict::Invalid(m) if m.contains("spec.source.vault.path"))
        );
        assert!(matches!(verdict("glob"), Verdict::Invalid(_)));
        assert!(matches!(verdict("outside"), Verdict::Denied(_)));
        assert!(matches!(verdict("twin"), Verdict::Conflict(m) if m.contains("binding a")));
        let account = d.accounts.values().next().unwrap();
        assert_eq!(account.sidecar.bindings.len(), 1);
        assert!(!account.policy.contains("gone") && !account.policy.contains("other/"));

        assert!(
            run(&[binding("agents", "a", "research", "teams/x/a")], &[])
                .accounts
                .is_empty()
        );
    }

    #[test]
    fn policy_documents_refuse_anything_but_exact_paths() {
        let mut s = VaultSecretRef {
            mount: "secret".into(),
            path: "teams/a".into(),
            key: "k".into(),
            kv_version: 2,
        };
        assert!(policy_document(&[&s]).is_some());
        for bad in [
            "teams/*",
            "teams/+/a",
            "teams/../a",
            "/teams",
            "teams/",
            "te ams",
        ] {
            s.path = bad.into();
            assert!(policy_document(&[&s]).is_none(), "{bad}");
        }
        s.path = "teams/a".into();
        for bad in ["sys", "auth", "se/cret", "*"] {
            s.mount = bad.into();
            assert!(policy_document(&[&s]).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_controllers_own_policy_covers_only_this_clusters_names() {
        let text = controller_policy("prod", "kubernetes", &["secret".into(), "kv".into()]);
        let policy: serde_json::Value = serde_json::from_str(&text).unwrap();
        let prefix = crate::names::cluster_prefix("prod");
        let paths: BTreeSet<&str> = policy["path"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let expected: BTreeSet<String> = [
            format!("sys/policies/acl/{prefix}*"),
            "sys/policies/acl".into(),
            format!("auth/kubernetes/role/{prefix}*"),
            "auth/kubernetes/role".into(),
            "secret/metadata/*".into(),
            "kv/metadata/*".into(),
            "auth/token/lookup-self".into(),
            "auth/token/renew-self".into(),
            "auth/token/revoke-self".into(),
        ]
        .into();
        assert_eq!(paths, expected.iter().map(String::as_str).collect());
        // Never data, never another cluster's names, never sudo.
        assert!(!text.contains("/data/") && !text.contains("sudo"));
        assert!(!text.contains(&crate::names::cluster_prefix("staging")));
        assert_eq!(
            policy["path"]["sys/policies/acl"]["capabilities"],
            serde_json::json!(["list"])
        );
    }

    #[test]
    fn accounts_in_colliding_namespaces_get_distinct_names() {
        let d = run(
            &[
                binding("a-b", "x", "c", "teams/x/a"),
                binding("a", "x", "b-c", "teams/x/a"),
            ],
            &[allow_all()],
        );
        let names: BTreeSet<&str> = d.accounts.values().map(|a| a.vault_name.as_str()).collect();
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn a_missing_ca_configmap_keeps_the_binding_out() {
        let mut b = binding("agents", "ca", "research", "teams/x/ca");
        b.spec.destinations[0].ca_config_map = Some(credbroker_crds::CaConfigMapRef {
            name: "internal-ca".into(),
            key: "ca.crt".into(),
        });
        let mut p = allow_all();
        p.spec.allow[0].allow_custom_ca = true;
        let refs = [&b];
        let mut pems = BTreeMap::new();
        let settings = GrantSettings::new("t");
        let labels = BTreeMap::new();
        let inputs = |pems: &BTreeMap<_, _>| {
            desired_state(&Inputs {
                bindings: &refs,
                policies: std::slice::from_ref(&p),
                namespace_labels: &labels,
                ca_pems: Some(pems),
                settings: &settings,
            })
        };
        let d = inputs(&pems);
        assert!(
            matches!(d.verdicts.values().next(), Some(Verdict::CaUnavailable(m)) if m.contains("internal-ca"))
        );
        pems.insert(
            ("agents".into(), "internal-ca".into(), "ca.crt".into()),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        );
        let d = inputs(&pems);
        let account = d.accounts.values().next().unwrap();
        assert!(
            account.sidecar.bindings[0].destinations[0]
                .extra_ca_pem
                .is_some()
        );
    }
}
