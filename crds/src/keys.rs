//! Annotation, label and file names shared by the webhook, the controller and
//! the sidecar. Changing one is an API change.

/// Pod annotation (or label) that opts a pod into injection: `"true"`.
pub const INJECT: &str = "credbroker.dev/inject";
/// Namespace label that enables the namespace-wide webhook entry: `"enabled"`.
pub const NAMESPACE_INJECTION: &str = "credbroker.dev/injection";
/// The value of [`NAMESPACE_INJECTION`] that turns injection on.
pub const NAMESPACE_INJECTION_ENABLED: &str = "enabled";
/// Pod annotation with the pod's placeholders ([`crate::config::PodPlaceholders`]
/// as JSON). Placeholders are not secrets; the sidecar reads this annotation
/// through the downward API.
pub const PLACEHOLDERS: &str = "credbroker.dev/placeholders";
/// Pod annotation that keeps the default service-account token in agent
/// containers, for agents that truly need the Kubernetes API. It never gives
/// them the broker-audience token.
pub const KEEP_SERVICE_ACCOUNT_TOKEN: &str = "credbroker.dev/keep-service-account-token";

/// Label on objects the controller owns, naming the service account they serve.
pub const SERVICE_ACCOUNT_LABEL: &str = "credbroker.dev/service-account";
/// `app.kubernetes.io/managed-by` value on objects the controller owns.
pub const MANAGED_BY: &str = "credbroker-controller";

/// The key of the bindings ConfigMap that holds [`crate::config::SidecarBindings`].
/// The format version is in the key, so during an upgrade the controller
/// can write both versions and every sidecar reads the one it knows.
pub const BINDINGS_CONFIGMAP_KEY: &str = "bindings.v1.json";
/// Prefix of every name credbroker creates in Kubernetes and in Vault.
pub const NAME_PREFIX: &str = "credbroker-";

/// The default audience of the projected token the sidecar logs in to Vault
/// with. It is never one of the API server's own audiences.
pub const DEFAULT_BROKER_AUDIENCE: &str = "credbroker";
