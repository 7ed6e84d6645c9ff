//! `CredentialBinding`: a team's request that the pods of one service account
//! get one Vault secret swapped in, toward the listed destinations only.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::validate::{
    DNS_SUBDOMAIN_PATTERN, ENV_NAME_PATTERN, HOST_PATTERN, HTTP_PATH_PATTERN, VAULT_MOUNT_PATTERN,
    VAULT_PATH_PATTERN,
};

/// A binding of one Vault secret to the pods of one service account, usable
/// only toward the listed destinations.
///
/// A binding takes effect only when a ClusterCredentialPolicy admits its
/// namespace, its Vault mount and path, and every destination.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "credbroker.dev",
    version = "v1alpha1",
    kind = "CredentialBinding",
    namespaced,
    status = "CredentialBindingStatus",
    shortname = "cb",
    category = "credbroker",
    printcolumn = r#"{"name":"Service Account","type":"string","jsonPath":".spec.serviceAccountName"}"#,
    printcolumn = r#"{"name":"Destination","type":"string","description":"The first destination host","jsonPath":".spec.destinations[*].host"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.secretVersion"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.size() <= 63").message("metadata.name: must be at most 63 characters")
)]
#[x_kube(validation = Rule::new(
    "!self.inject.__in__.exists(s, s == 'query' || s == 'body') || self.destinations.all(d, has(d.methods) && size(d.methods) > 0 && has(d.paths) && size(d.paths) > 0 && d.paths.all(p, p != '/*'))"
).message("destinations: query and body surfaces need methods and paths (more specific than /*) on every destination").field_path(".destinations"))]
#[serde(rename_all = "camelCase")]
pub struct CredentialBindingSpec {
    /// The service account whose pods get this credential. Only pods running
    /// as this service account, in this namespace, can log in to Vault for it.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub service_account_name: String,

    /// Where the real secret lives.
    pub source: SecretSource,

    /// How the agent sees the credential: the environment variable that holds
    /// its per-pod placeholder.
    pub placeholder: PlaceholderSpec,

    /// The only places the real value may be sent. A placeholder headed
    /// anywhere else is blocked, or leaves as a useless placeholder.
    #[schemars(length(min = 1, max = 32))]
    pub destinations: Vec<Destination>,

    /// Which parts of a request the placeholder may be swapped in.
    #[serde(default)]
    pub inject: Inject,

    /// How often the sidecar checks Vault for a new version of the secret,
    /// as a duration such as `30s` or `5m` (at least 1s, at most 24h).
    #[serde(default = "default_refresh_interval")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("must be a duration between 1s and 24h, such as 30s or 5m"))]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub refresh_interval: String,
}

fn default_refresh_interval() -> String {
    "30s".to_string()
}

/// Where the secret comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretSource {
    /// A key of a KV secret in HashiCorp Vault or OpenBao.
    pub vault: VaultSecretRef,
}

/// A key of a KV secret in Vault.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VaultSecretRef {
    /// The KV secrets engine's mount, e.g. `secret`. Letters, digits, `_` and
    /// `-`; never `sys`, `auth`, `identity` or `cubbyhole`.
    #[schemars(length(min = 1, max = 128), regex(pattern = VAULT_MOUNT_PATTERN))]
    #[x_kube(validation = Rule::new("!(self in ['sys', 'auth', 'identity', 'cubbyhole'])").message("must not be a Vault system mount (sys, auth, identity, cubbyhole)"))]
    pub mount: String,

    /// The secret's path inside the mount, e.g. `teams/research/openai`:
    /// segments of letters, digits, `.`, `_` and `-` joined by `/`, with no
    /// leading or trailing `/` and no `.` or `..` segment.
    #[schemars(length(min = 1, max = 512), regex(pattern = VAULT_PATH_PATTERN))]
    #[x_kube(validation = Rule::new("!self.contains('..') && self != '.' && !self.startsWith('./') && !self.endsWith('/.') && !self.contains('/./')").message("must not contain a '.' or '..' segment"))]
    pub path: String,

    /// The key inside the secret's data whose value is the credential.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[^\x00-\x1f\x7f]+$"))]
    pub key: String,

    /// The KV secrets engine version: 1 or 2.
    #[serde(default = "default_kv_version")]
    #[schemars(range(min = 1, max = 2))]
    pub kv_version: u8,
}

fn default_kv_version() -> u8 {
    2
}

/// How the agent sees its credential.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlaceholderSpec {
    /// The environment variable, in every agent container, that holds this
    /// pod's placeholder for the credential.
    #[schemars(length(min = 1, max = 128), regex(pattern = ENV_NAME_PATTERN))]
    #[x_kube(validation = Rule::new("!(self in ['SSL_CERT_FILE', 'SSL_CERT_DIR', 'REQUESTS_CA_BUNDLE', 'CURL_CA_BUNDLE', 'NODE_EXTRA_CA_CERTS', 'NODE_OPTIONS', 'GIT_SSL_CAINFO', 'DENO_CERT', 'JAVA_TOOL_OPTIONS', 'LD_PRELOAD', 'LD_LIBRARY_PATH', 'PATH', 'HOME', 'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'NO_PROXY', 'http_proxy', 'https_proxy', 'all_proxy', 'no_proxy'])").message("is reserved: the broker sets it (trust and proxy settings) or it changes how programs load"))]
    pub env: String,

    /// A prefix for the placeholder, so SDKs that check a key's shape accept
    /// it (e.g. `sk-`). RFC 3986 unreserved characters only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^[A-Za-z0-9._~-]*$"))]
    pub prefix: Option<String>,
}

/// One place the real value may be sent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// The upstream host name: exact (`api.openai.com`) or with one leading
    /// wildcard label (`*.anthropic.com`). No scheme, path, port or spaces;
    /// lower case.
    #[schemars(length(min = 1, max = 253), regex(pattern = HOST_PATTERN))]
    pub host: String,

    /// The upstream port.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// The HTTP methods allowed to carry the credential. Empty means any.
    /// Required for the query and body surfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 7), extend("x-kubernetes-list-type" = "set"))]
    pub methods: Option<Vec<HttpMethod>>,

    /// Path globs allowed to carry the credential, e.g. `/v1/*` (`*` matches
    /// any run of characters). Empty means any. Required for the query and
    /// body surfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 1024), regex(pattern = HTTP_PATH_PATTERN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub paths: Option<Vec<String>>,

    /// Extra CA certificates to trust for this upstream, from a ConfigMap in
    /// the binding's namespace (added to the system roots, never replacing them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map: Option<CaConfigMapRef>,

    /// Allow the credential to be sent over plain HTTP to this destination.
    /// Off by default: a credential in cleartext can be read on the wire.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_cleartext: bool,
}

fn default_port() -> u16 {
    443
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A key of a ConfigMap holding PEM CA certificates.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaConfigMapRef {
    /// The ConfigMap's name, in the binding's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// The key holding one or more PEM certificates.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// An HTTP method.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Delete => "DELETE",
            Self::Options => "OPTIONS",
        }
    }
}

/// Where in a request the placeholder may be swapped for the secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Inject {
    /// The surfaces: `header` (the default), and the opt-in `query`, `body`
    /// and `basicAuth`. `query` and `body` need methods and paths on every
    /// destination, because an echo of a body is hard to catch.
    #[serde(rename = "in", default = "default_surfaces")]
    #[schemars(length(min = 1, max = 4), extend("x-kubernetes-list-type" = "set"))]
    pub surfaces: Vec<Surface>,
}

impl Default for Inject {
    fn default() -> Self {
        Self {
            surfaces: default_surfaces(),
        }
    }
}

fn default_surfaces() -> Vec<Surface> {
    vec![Surface::Header]
}

/// A part of an HTTP request.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum Surface {
    /// Request header values (e.g. `Authorization: Bearer <placeholder>`).
    Header,
    /// The query string.
    Query,
    /// The request body (JSON, form or raw).
    Body,
    /// The password of HTTP basic auth (inside the base64 of `Authorization: Basic`).
    BasicAuth,
}

/// What the controller last saw and did for this binding. Never holds a
/// secret value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialBindingStatus {
    /// Ready, PolicyAllowed, VaultPolicySynced, VaultRoleSynced, SecretFound.
    /// A map keyed by type, so server-side apply merges conditions per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The KV v2 `current_version` of the secret (never its value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_version: Option<u64>,
    /// The Vault ACL policy that grants this binding's service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault_policy: Option<String>,
    /// The Vault Kubernetes-auth role the sidecar logs in with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault_role: Option<String>,
    /// The service account the grant was last made for, so a change of
    /// `spec.serviceAccountName` withdraws the old account's grant too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_service_account: Option<String>,
}
