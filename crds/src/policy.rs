//! `ClusterCredentialPolicy`: what platform admins allow teams to bind.
//! Nothing is bindable until some policy allows it (default deny).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::binding::Surface;
use crate::validate::{HOST_PATTERN, VAULT_MOUNT_PATTERN, VAULT_PATH_PREFIX_PATTERN};

/// Which namespaces may bind which Vault paths to which destination hosts.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "credbroker.dev",
    version = "v1alpha1",
    kind = "ClusterCredentialPolicy",
    shortname = "ccp",
    category = "credbroker",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new(
    "(has(self.allNamespaces) && self.allNamespaces) || (has(self.namespaceSelector.matchLabels) && size(self.namespaceSelector.matchLabels) > 0) || (has(self.namespaceSelector.matchExpressions) && size(self.namespaceSelector.matchExpressions) > 0)"
).message("namespaceSelector: must select by labels or expressions; set allNamespaces: true to apply to every namespace").field_path(".namespaceSelector"))]
#[x_kube(validation = Rule::new(
    "!has(self.namespaceSelector.matchExpressions) || self.namespaceSelector.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'] && ((e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0)))"
).message("namespaceSelector.matchExpressions: operator must be In, NotIn, Exists or DoesNotExist; In and NotIn need values, Exists and DoesNotExist take none").field_path(".namespaceSelector.matchExpressions"))]
#[serde(rename_all = "camelCase")]
pub struct ClusterCredentialPolicySpec {
    /// The namespaces this policy applies to, by labels or expressions. It
    /// must not be empty; see `allNamespaces`.
    pub namespace_selector: LabelSelector,

    /// Apply to every namespace. An empty `namespaceSelector` is refused
    /// unless this is set, so a mistyped selector (which the API server
    /// prunes to `{}`) can never silently select every namespace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_namespaces: bool,

    /// What bindings in those namespaces may use. A binding is admitted when
    /// one allowance covers its mount, its path and every one of its
    /// destination hosts.
    #[schemars(length(min = 1, max = 64))]
    pub allow: Vec<Allowance>,
}

/// One set of Vault paths and the hosts they may be sent to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Allowance {
    /// The Vault paths this allowance covers.
    pub vault: VaultPathGrant,
    /// The destination hosts, exact or `*.`-wildcard. A wildcard admits the
    /// hosts exactly one label under it (`*.example.com` admits
    /// `api.example.com`, not `example.com` or `a.b.example.com`) and the
    /// same wildcard in a binding.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 253), regex(pattern = HOST_PATTERN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub destinations: Vec<String>,

    /// The destination ports bindings may use with these hosts.
    #[serde(default = "default_ports")]
    #[schemars(length(min = 1, max = 16), inner(range(min = 1, max = 65535)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub ports: Vec<u16>,

    /// Whether bindings may send these credentials over plain HTTP. Off by
    /// default: a credential in cleartext can be read on the wire.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_cleartext: bool,

    /// The request surfaces bindings may inject into. `query` and `body` are
    /// riskier (an echo of them is harder to catch) and must be allowed here
    /// explicitly.
    #[serde(default = "default_surfaces")]
    #[schemars(length(min = 1, max = 4), extend("x-kubernetes-list-type" = "set"))]
    pub surfaces: Vec<Surface>,

    /// Whether bindings may add trust for these hosts with a `caConfigMap`.
    /// Off by default: whoever can write ConfigMaps in a namespace could
    /// otherwise make the broker trust a CA of their own for a bound host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_custom_ca: bool,
}

fn default_ports() -> Vec<u16> {
    vec![443]
}

fn default_surfaces() -> Vec<Surface> {
    vec![Surface::Header, Surface::BasicAuth]
}

/// A subtree of one KV mount.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VaultPathGrant {
    /// The KV mount. Never `sys`, `auth`, `identity` or `cubbyhole`.
    #[schemars(length(min = 1, max = 128), regex(pattern = VAULT_MOUNT_PATTERN))]
    #[x_kube(validation = Rule::new("!(self in ['sys', 'auth', 'identity', 'cubbyhole'])").message("must not be a Vault system mount (sys, auth, identity, cubbyhole)"))]
    pub mount: String,
    /// The path prefix, matched on whole segments: `teams/research/` (or
    /// `teams/research`) covers `teams/research/openai` but not
    /// `teams/research-evil/x`. Required; `""` covers the whole mount, so
    /// granting a whole mount is always written down.
    #[schemars(length(max = 512), regex(pattern = VAULT_PATH_PREFIX_PATTERN))]
    #[x_kube(validation = Rule::new("!self.contains('..') && !self.startsWith('./') && !self.contains('/./') && !self.endsWith('/.') && self != '.'").message("must not contain a '.' or '..' segment"))]
    pub path_prefix: String,
    /// The KV secrets engine version of the mount: 1 or 2 (default). A
    /// binding must name the same version. The admin states it because a
    /// wrong version widens a grant: on a KV v1 mount, the v2 paths
    /// `<mount>/data/<path>` are ordinary secrets outside `pathPrefix`.
    #[serde(default = "default_kv_version")]
    #[schemars(range(min = 1, max = 2))]
    pub kv_version: u8,
}

fn default_kv_version() -> u8 {
    2
}
