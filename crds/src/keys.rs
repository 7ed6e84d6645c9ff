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

/// What the webhook injects, by name. The admission policy
/// (`webhook/deploy/admission-policy.yaml`) and the pod-runner of the tests
/// recognise an injected pod by these names and paths; changing one is an
/// API change.
pub mod injected {
    /// The init container that programs the packet filter, first in `initContainers`.
    pub const INIT_CONTAINER: &str = "credbroker-init";
    /// The native sidecar (`restartPolicy: Always`), right after [`INIT_CONTAINER`].
    pub const SIDECAR_CONTAINER: &str = "credbroker-sidecar";
    /// The sidecar binary in both the sidecar and the init image.
    pub const SIDECAR_BINARY: &str = "/usr/local/bin/credbroker-sidecar";

    /// The projected service-account token with the broker audience.
    pub const TOKEN_VOLUME: &str = "credbroker-token";
    /// Where [`TOKEN_VOLUME`] is mounted in the sidecar (only there).
    pub const TOKEN_DIR: &str = "/var/run/secrets/credbroker";
    /// The token's file in [`TOKEN_DIR`].
    pub const TOKEN_FILE: &str = "token";
    /// The controller's bindings ConfigMap (optional).
    pub const BINDINGS_VOLUME: &str = "credbroker-bindings";
    pub const BINDINGS_DIR: &str = "/etc/credbroker/bindings";
    /// The downward API: the placeholders annotation, pod name, namespace, UID.
    pub const POD_INFO_VOLUME: &str = "credbroker-pod";
    pub const POD_INFO_DIR: &str = "/etc/credbroker/pod";
    /// The downward-API file holding the placeholders annotation.
    pub const PLACEHOLDERS_FILE: &str = "placeholders";
    /// The in-memory volume holding the pod CA's key (sidecar only).
    pub const CA_VOLUME: &str = "credbroker-ca";
    pub const CA_DIR: &str = "/var/run/credbroker/ca";
    /// The in-memory volume the sidecar writes the trust bundle to;
    /// read-only in agent containers, at the same path.
    pub const TRUST_VOLUME: &str = "credbroker-trust";
    pub const TRUST_DIR: &str = "/var/run/credbroker/trust";
    /// The combined PEM bundle in [`TRUST_DIR`] (system roots, the pod CA,
    /// the bindings' extra CAs): what `SSL_CERT_FILE` and its kin point at.
    pub const TRUST_BUNDLE_FILE: &str = "ca-bundle.crt";
    /// The same certificates as a PKCS#12 truststore, for Java.
    pub const TRUSTSTORE_FILE: &str = "truststore.p12";
    /// The truststore's password: public, documented, the JDK's own
    /// default (the file holds public certificates only; Java needs some).
    pub const TRUSTSTORE_PASSWORD: &str = "changeit";
    /// The xtables lock directory of the init container (iptables writes
    /// `/run/xtables.lock`; the root filesystem is read-only).
    pub const XTABLES_VOLUME: &str = "credbroker-xtables";
    pub const XTABLES_DIR: &str = "/run";

    /// Every volume the webhook adds. No agent container may mount one.
    pub const VOLUMES: [&str; 6] = [
        TOKEN_VOLUME,
        BINDINGS_VOLUME,
        POD_INFO_VOLUME,
        CA_VOLUME,
        TRUST_VOLUME,
        XTABLES_VOLUME,
    ];
}

/// The default audience of the projected token the sidecar logs in to Vault
/// with. It is never one of the API server's own audiences.
pub const DEFAULT_BROKER_AUDIENCE: &str = "credbroker";

/// The name of the bindings ConfigMap of service account `sa` in its
/// namespace. The controller writes it and the webhook mounts it, so both
/// compute it here. A service-account name may be 253 characters, a
/// ConfigMap name too: the readable part is cut, and a hash of the whole
/// name keeps two long names that share a beginning apart.
pub fn bindings_configmap_name(sa: &str) -> String {
    let readable: String = sa.chars().take(40).collect();
    let readable = readable.trim_end_matches(['-', '.']);
    format!("{NAME_PREFIX}{readable}-{}", short_hash(&[sa], 8))
}

/// The first `hex_len` hex digits of SHA-256 over `parts`, each followed by
/// a NUL (no Kubernetes name holds one), so `("a-b", "c")` and `("a", "b-c")`
/// hash apart.
pub fn short_hash(parts: &[&str], hex_len: usize) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        ctx.update(part.as_bytes());
        ctx.update(&[0]);
    }
    let digest = ctx.finish();
    let mut out = String::with_capacity(hex_len);
    for byte in digest.as_ref() {
        if out.len() >= hex_len {
            break;
        }
        out.push_str(&format!("{byte:02x}"));
    }
    out.truncate(hex_len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configmap_names_are_valid_and_distinct() {
        let long = "a".repeat(253);
        let long2 = format!("{}b", "a".repeat(252));
        for sa in ["research-agent", long.as_str(), "a.b-"] {
            let name = bindings_configmap_name(sa);
            assert!(name.len() <= 63, "{name}");
            assert!(crate::validate::dns_subdomain("n", &name).is_ok(), "{name}");
        }
        assert_ne!(
            bindings_configmap_name(&long),
            bindings_configmap_name(&long2)
        );
        assert_eq!(short_hash(&["a-b", "c"], 16).len(), 16);
        assert_ne!(short_hash(&["a-b", "c"], 16), short_hash(&["a", "b-c"], 16));
    }
}
