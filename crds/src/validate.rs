//! The allowlists every credbroker name must pass, written twice on purpose:
//! as the regular expressions the CRD schema carries (so the API server
//! rejects bad objects and names the field), and as plain Rust checks (so the
//! controller re-validates before it grants anything in Vault and never
//! relies on the schema alone). Tests run one case table through both.

use crate::binding::{CredentialBindingSpec, Surface};
use crate::policy::ClusterCredentialPolicySpec;
use crate::{Error, Result};

// One DNS label: lower-case letters, digits and inner hyphens, 1-63 chars.
macro_rules! label {
    () => {
        "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
    };
}

// The last label of a host starts with a letter, as every top-level domain
// does: that refuses IP addresses and the numeric and hex forms inet_aton
// resolves to them (`2130706433`, `0x7f000001` are 127.0.0.1). SNI never
// carries an IP, so an IP destination could never be matched anyway.
macro_rules! last_label {
    () => {
        "[a-z]([-a-z0-9]{0,61}[a-z0-9])?"
    };
}

/// A host name, or `*.` followed by at least two labels (so `*.com` is
/// refused); never an IP address.
pub const HOST_PATTERN: &str = concat!(
    r"^(\*\.(",
    label!(),
    r"\.)+",
    last_label!(),
    r"|(",
    label!(),
    r"\.)*",
    last_label!(),
    r")$"
);
/// A Kubernetes object name (DNS-1123 subdomain), e.g. a ServiceAccount's.
/// No glob characters: Vault's `bound_service_account_names` treats `*` as
/// a wildcard, so a name must never be able to carry one.
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A POSIX-portable environment variable name.
pub const ENV_NAME_PATTERN: &str = r"^[A-Za-z_][A-Za-z0-9_]*$";
/// A Vault mount name.
pub const VAULT_MOUNT_PATTERN: &str = r"^[A-Za-z0-9_-]+$";
/// A Vault secret path: segments joined by `/`, no leading or trailing `/`.
pub const VAULT_PATH_PATTERN: &str = r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$";
/// A Vault path prefix: like a path, optionally ending in `/`, or empty.
pub const VAULT_PATH_PREFIX_PATTERN: &str = r"^([A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/?)?$";
/// An HTTP path glob: starts with `/`, RFC 3986 path characters plus `*`.
pub const HTTP_PATH_PATTERN: &str = r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$";

/// Mounts that are Vault's own and never hold a bindable secret.
pub const RESERVED_MOUNTS: [&str; 4] = ["sys", "auth", "identity", "cubbyhole"];

fn is_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A destination host: exact, or `*.` plus at least two labels.
pub fn host(field: &str, value: &str) -> Result<()> {
    let reject = |why: &str| Err(Error::invalid(field, format!("{value:?} {why}")));
    if value.is_empty() || value.len() > 253 {
        return reject("must be 1 to 253 characters");
    }
    let (wildcard, rest) = match value.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let labels: Vec<&str> = rest.split('.').collect();
    let last_starts_with_letter = labels
        .last()
        .and_then(|l| l.bytes().next())
        .is_some_and(|c| c.is_ascii_lowercase());
    if !labels.iter().all(|l| is_label(l)) || !last_starts_with_letter {
        return reject(
            "must be a lower-case host name (not an IP address) with no scheme, port, \
             path or spaces, and a wildcard only as one leading '*.' label",
        );
    }
    if wildcard && labels.len() < 2 {
        return reject("is a wildcard over a top-level domain");
    }
    Ok(())
}

/// Whether `label` is one DNS label as hosts use them: 1 to 63 letters,
/// digits, `-` or `_`, not starting or ending with `-`.
fn is_host_label(label: &[u8]) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        && label[0] != b'-'
        && label[label.len() - 1] != b'-'
}

/// Whether `host` is a DNS host name: labels of letters, digits, `-` and
/// `_`, at most 253 characters, one trailing dot allowed. Not an IP address
/// check (`10.0.0.1` passes); callers that must tell them apart parse the
/// address first. Anything with `:`, `/`, `?`, `#`, `@`, `%`, spaces or
/// other bytes is refused: such a "host" would be read differently by the
/// next parser (a URI's authority ends at `/`), which is how a request could
/// name one host here and be sent to another.
pub fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.as_bytes().split(|b| *b == b'.').all(is_host_label)
}

/// Whether a destination pattern (exact, or `*.` plus a suffix) matches
/// `host`: a wildcard matches exactly one more label, which must be a DNS
/// label. Case and a trailing dot on `host` are ignored. The one definition
/// the controller (policy admission) and the sidecar (routing) share.
/// Allocation-free: it runs for every destination on every request.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host).as_bytes();
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            let suffix = suffix.as_bytes();
            // host = label "." suffix
            host.len() > suffix.len() + 1
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && host[host.len() - suffix.len() - 1] == b'.'
                && is_host_label(&host[..host.len() - suffix.len() - 1])
        }
        None => host.eq_ignore_ascii_case(pattern.as_bytes()),
    }
}

/// Whether a policy's destination pattern admits a binding's destination
/// pattern: an exact host it matches, or the very same wildcard.
pub fn policy_host_admits(policy_pattern: &str, binding_host: &str) -> bool {
    if binding_host.starts_with("*.") {
        policy_pattern.eq_ignore_ascii_case(binding_host)
    } else {
        host_matches(policy_pattern, binding_host)
    }
}

/// Environment variables a placeholder may not take: the broker sets the
/// trust ones, and the rest change where traffic goes or how programs load.
pub const RESERVED_ENV_NAMES: [&str; 21] = [
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "NODE_OPTIONS",
    "GIT_SSL_CAINFO",
    "DENO_CERT",
    "JAVA_TOOL_OPTIONS",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "PATH",
    "HOME",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
];

fn max_len(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(())
}

fn max_items<T>(field: &str, items: &[T], max: usize) -> Result<()> {
    if items.len() > max {
        return Err(Error::invalid(
            field,
            format!("must have at most {max} items"),
        ));
    }
    Ok(())
}

/// A Vault mount: `[A-Za-z0-9_-]+` and not one of [`RESERVED_MOUNTS`].
pub fn vault_mount(field: &str, value: &str) -> Result<()> {
    if value.is_empty()
        || value.len() > 128
        || !value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        return Err(Error::invalid(
            field,
            format!("{value:?} must match [A-Za-z0-9_-]+"),
        ));
    }
    if RESERVED_MOUNTS.contains(&value) {
        return Err(Error::invalid(
            field,
            format!("{value:?} is a Vault system mount"),
        ));
    }
    Ok(())
}

fn is_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && !s.contains("..")
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A Vault secret path inside a mount: segments of `[A-Za-z0-9._-]` joined by
/// `/`, with no `.` or `..` segment and no leading or trailing `/`.
pub fn vault_path(field: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > 512 || !value.split('/').all(is_path_segment) {
        return Err(Error::invalid(
            field,
            format!(
                "{value:?} must be segments of [A-Za-z0-9._-] joined by '/', \
                 with no '.' or '..' segment and no leading or trailing '/'"
            ),
        ));
    }
    Ok(())
}

/// A Vault path prefix: empty (the whole mount) or a path with an optional
/// trailing `/`.
pub fn vault_path_prefix(field: &str, value: &str) -> Result<()> {
    let trimmed = value.strip_suffix('/').unwrap_or(value);
    if value.is_empty() {
        return Ok(());
    }
    vault_path(field, trimmed)
}

/// Whether `prefix` covers `path`, on whole segments: `a/b` and `a/b/` cover
/// `a/b` and `a/b/c` but not `a/bc`.
pub fn path_under_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A Kubernetes object name: a DNS-1123 subdomain of at most 253 characters.
pub fn dns_subdomain(field: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{value:?} must be a lower-case DNS-1123 name (letters, digits, '-', '.')"),
        ))
    }
}

/// A refresh interval: a duration between 1s and 24h.
pub fn refresh_interval(field: &str, value: &str) -> Result<()> {
    let d = crate::duration::parse(value).map_err(|e| Error::invalid(field, e.to_string()))?;
    if (crate::duration::MIN_REFRESH_INTERVAL..=crate::duration::MAX_REFRESH_INTERVAL).contains(&d)
    {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{value:?} must be between 1s and 24h"),
        ))
    }
}

/// The query and body surfaces are hard to guard against echoes, so they
/// need every destination scoped to methods and paths.
pub fn scoped_surfaces(
    field: &str,
    surfaces: &[Surface],
    mut destinations_scoped: impl Iterator<Item = bool>,
) -> Result<()> {
    let needs_scope = surfaces
        .iter()
        .any(|s| matches!(s, Surface::Query | Surface::Body));
    if needs_scope && !destinations_scoped.all(|scoped| scoped) {
        return Err(Error::invalid(
            field,
            "query and body surfaces need methods and paths on every destination",
        ));
    }
    Ok(())
}

/// An environment variable name.
pub fn env_name(field: &str, value: &str) -> Result<()> {
    let mut bytes = value.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_');
    if !first_ok || !bytes.all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        return Err(Error::invalid(
            field,
            format!("{value:?} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"),
        ));
    }
    Ok(())
}

/// An HTTP path glob.
pub fn http_path(field: &str, value: &str) -> Result<()> {
    let ok = value.starts_with('/')
        && value.len() <= 1024
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._~!$&'()*+,;=:@%/-".contains(&c));
    if !ok {
        return Err(Error::invalid(
            field,
            format!("{value:?} must start with '/' and hold only URL path characters or '*'"),
        ));
    }
    Ok(())
}

/// Everything the schema checks on a binding spec, checked again in Rust.
/// Returns the first problem, naming its field as the API server would.
pub fn binding_spec(spec: &CredentialBindingSpec) -> Result<()> {
    dns_subdomain("spec.serviceAccountName", &spec.service_account_name)?;
    max_len("spec.source.vault.key", &spec.source.vault.key, 256)?;
    if spec.source.vault.key.bytes().any(|c| c < 0x20 || c == 0x7f) {
        return Err(Error::invalid(
            "spec.source.vault.key",
            "must not contain control characters",
        ));
    }
    max_len("spec.placeholder.env", &spec.placeholder.env, 128)?;
    if RESERVED_ENV_NAMES.contains(&spec.placeholder.env.as_str()) {
        return Err(Error::invalid("spec.placeholder.env", "is reserved"));
    }
    if let Some(prefix) = &spec.placeholder.prefix {
        max_len("spec.placeholder.prefix", prefix, 32)?;
    }
    max_items("spec.destinations", &spec.destinations, 32)?;
    if spec.inject.surfaces.is_empty() {
        return Err(Error::invalid(
            "spec.inject.in",
            "must list at least one surface",
        ));
    }
    max_items("spec.inject.in", &spec.inject.surfaces, 4)?;
    let vault = &spec.source.vault;
    vault_mount("spec.source.vault.mount", &vault.mount)?;
    vault_path("spec.source.vault.path", &vault.path)?;
    if vault.key.is_empty() {
        return Err(Error::invalid("spec.source.vault.key", "must not be empty"));
    }
    if !matches!(vault.kv_version, 1 | 2) {
        return Err(Error::invalid(
            "spec.source.vault.kvVersion",
            format!("{} is not 1 or 2", vault.kv_version),
        ));
    }
    env_name("spec.placeholder.env", &spec.placeholder.env)?;
    if let Some(prefix) = &spec.placeholder.prefix
        && !prefix
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~".contains(&c))
    {
        return Err(Error::invalid(
            "spec.placeholder.prefix",
            "must hold only RFC 3986 unreserved characters",
        ));
    }
    if spec.destinations.is_empty() {
        return Err(Error::invalid(
            "spec.destinations",
            "must list at least one destination",
        ));
    }
    for (i, d) in spec.destinations.iter().enumerate() {
        host(&format!("spec.destinations[{i}].host"), &d.host)?;
        if d.port == 0 {
            return Err(Error::invalid(
                format!("spec.destinations[{i}].port"),
                "must be 1-65535",
            ));
        }
        max_items(
            &format!("spec.destinations[{i}].methods"),
            d.methods.as_deref().unwrap_or(&[]),
            7,
        )?;
        max_items(
            &format!("spec.destinations[{i}].paths"),
            d.paths.as_deref().unwrap_or(&[]),
            64,
        )?;
        for (j, p) in d.paths.iter().flatten().enumerate() {
            http_path(&format!("spec.destinations[{i}].paths[{j}]"), p)?;
        }
        if let Some(ca) = &d.ca_config_map {
            dns_subdomain(
                &format!("spec.destinations[{i}].caConfigMap.name"),
                &ca.name,
            )?;
        }
    }
    scoped_surfaces(
        "spec.destinations",
        &spec.inject.surfaces,
        spec.destinations.iter().map(|d| {
            d.methods.as_ref().is_some_and(|m| !m.is_empty())
                && d.paths
                    .as_ref()
                    .is_some_and(|p| !p.is_empty() && !p.iter().any(|g| g == "/*"))
        }),
    )?;
    refresh_interval("spec.refreshInterval", &spec.refresh_interval)
}

/// Everything the schema checks on a policy spec, checked again in Rust.
pub fn policy_spec(spec: &ClusterCredentialPolicySpec) -> Result<()> {
    let selector = &spec.namespace_selector;
    let labels = selector
        .match_labels
        .as_ref()
        .is_some_and(|m| !m.is_empty());
    let expressions = selector
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty());
    if !spec.all_namespaces && !labels && !expressions {
        return Err(Error::invalid(
            "spec.namespaceSelector",
            "must select by labels or expressions; set allNamespaces: true to apply to every namespace",
        ));
    }
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
        let ok = match e.operator.as_str() {
            "In" | "NotIn" => has_values,
            "Exists" | "DoesNotExist" => !has_values,
            _ => false,
        };
        if !ok {
            return Err(Error::invalid(
                format!("spec.namespaceSelector.matchExpressions[{i}]"),
                "operator must be In or NotIn with values, or Exists or DoesNotExist without",
            ));
        }
    }
    max_items("spec.allow", &spec.allow, 64)?;
    if spec.allow.is_empty() {
        return Err(Error::invalid(
            "spec.allow",
            "must list at least one allowance",
        ));
    }
    for (i, a) in spec.allow.iter().enumerate() {
        vault_mount(&format!("spec.allow[{i}].vault.mount"), &a.vault.mount)?;
        vault_path_prefix(
            &format!("spec.allow[{i}].vault.pathPrefix"),
            &a.vault.path_prefix,
        )?;
        if !matches!(a.vault.kv_version, 1 | 2) {
            return Err(Error::invalid(
                format!("spec.allow[{i}].vault.kvVersion"),
                format!("{} is not 1 or 2", a.vault.kv_version),
            ));
        }
        if a.destinations.is_empty() {
            return Err(Error::invalid(
                format!("spec.allow[{i}].destinations"),
                "must not be empty",
            ));
        }
        for (j, d) in a.destinations.iter().enumerate() {
            host(&format!("spec.allow[{i}].destinations[{j}]"), d)?;
        }
        if a.ports.is_empty() {
            return Err(Error::invalid(
                format!("spec.allow[{i}].ports"),
                "must list a port",
            ));
        }
        if let Some(j) = a.ports.iter().position(|p| *p == 0) {
            return Err(Error::invalid(
                format!("spec.allow[{i}].ports[{j}]"),
                "must be 1-65535",
            ));
        }
        if a.surfaces.is_empty() {
            return Err(Error::invalid(
                format!("spec.allow[{i}].surfaces"),
                "must not be empty",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "api.openai.com",
            "*.anthropic.com",
            "localhost",
            "a-b.c9.io",
            "upstream",
        ] {
            host("h", ok).unwrap();
        }
        for bad in [
            "",
            "https://a.com",
            "a.com/v1",
            "a.com:443",
            "a .com",
            " a.com",
            "*.com",
            "a.*.com",
            "*a.com",
            "10.0.0.1",
            "169.254.169.254",
            "2130706433",
            "0x7f000001",
            "*.0.1",
            "a.b.9z",
            "**.a.com",
            "A.com",
            "-a.com",
            "a-.com",
            "a..com",
            ".a.com",
            "a.com.",
        ] {
            assert!(host("h", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn host_matching_is_one_label_deep() {
        assert!(host_matches("*.anthropic.com", "api.anthropic.com"));
        assert!(host_matches("*.anthropic.com", "API.anthropic.com."));
        assert!(!host_matches("*.anthropic.com", "anthropic.com"));
        assert!(!host_matches("*.anthropic.com", "a.b.anthropic.com"));
        assert!(!host_matches("*.anthropic.com", "evilanthropic.com"));
        assert!(!host_matches("*.anthropic.com", ".anthropic.com"));
        assert!(host_matches("api.openai.com", "API.openai.com."));
        assert!(!host_matches("api.openai.com", "api.openai.com.evil"));
        // The wildcard label must be a DNS label: a "host" that another
        // parser reads as something else never matches (a URI authority ends
        // at '/', '?', '#'; ':' starts a port; '@' ends userinfo).
        for sneaky in [
            "16909060:9999/x.anthropic.com",
            "evil:x.anthropic.com",
            "a?b.anthropic.com",
            "a#b.anthropic.com",
            "u@evil.anthropic.com",
            "a b.anthropic.com",
            "a%2fb.anthropic.com",
            "-a.anthropic.com",
        ] {
            assert!(!host_matches("*.anthropic.com", sneaky), "{sneaky}");
        }
    }

    #[test]
    fn dns_names() {
        for ok in [
            "api.openai.com",
            "API.example.com.",
            "under_score.test",
            "localhost",
            "10.0.0.1",
        ] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "a..b",
            "evil:x.bound.com",
            "16909060:9999/x.bound.com",
            "a/b",
            "a?b",
            "a#b",
            "u@h",
            "[::1]",
            "a b",
            "-a.com",
            "a-.com",
            "é.com",
            &"a".repeat(64),
        ] {
            assert!(!is_dns_name(bad), "{bad:?}");
        }
        assert!(policy_host_admits("*.anthropic.com", "*.anthropic.com"));
        assert!(policy_host_admits("*.anthropic.com", "api.anthropic.com"));
        assert!(!policy_host_admits("*.anthropic.com", "*.b.anthropic.com"));
        assert!(!policy_host_admits("api.anthropic.com", "*.anthropic.com"));
    }

    #[test]
    fn mounts_and_paths() {
        vault_mount("m", "secret").unwrap();
        vault_mount("m", "kv-v1_x").unwrap();
        for bad in [
            "",
            "sys",
            "auth",
            "identity",
            "cubbyhole",
            "a/b",
            "a.b",
            "a b",
        ] {
            assert!(vault_mount("m", bad).is_err(), "{bad:?} accepted");
        }
        vault_path("p", "teams/research/openai").unwrap();
        vault_path("p", "a.b_c-d").unwrap();
        for bad in [
            "", "/a", "a/", "a//b", "a/../b", "..", ".", "a/./b", "a*", "a+b", "a'b", "a\"b", "a b",
        ] {
            assert!(vault_path("p", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn prefixes_match_on_whole_segments() {
        assert!(path_under_prefix(
            "teams/research/openai",
            "teams/research/"
        ));
        assert!(path_under_prefix("teams/research/openai", "teams/research"));
        assert!(path_under_prefix("teams/research", "teams/research/"));
        assert!(path_under_prefix("anything/at/all", ""));
        assert!(!path_under_prefix(
            "teams/research-evil/x",
            "teams/research"
        ));
        assert!(!path_under_prefix("teams/researchx", "teams/research/"));
        assert!(!path_under_prefix("teams", "teams/research"));
    }

    #[test]
    fn env_names() {
        env_name("e", "OPENAI_API_KEY").unwrap();
        env_name("e", "_x1").unwrap();
        for bad in ["", "1A", "A-B", "A B", "A=B", "A.B"] {
            assert!(env_name("e", bad).is_err(), "{bad:?} accepted");
        }
    }
}
