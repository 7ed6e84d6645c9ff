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

/// A host name, or `*.` followed by at least two labels (so `*.com` is refused).
pub const HOST_PATTERN: &str = concat!(
    r"^(\*\.",
    label!(),
    r"\.",
    label!(),
    r"(\.",
    label!(),
    r")*|",
    label!(),
    r"(\.",
    label!(),
    r")*)$"
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
    if !labels.iter().all(|l| is_label(l)) {
        return reject(
            "must be a lower-case host name with no scheme, port, path or spaces, \
             and a wildcard only as one leading '*.' label",
        );
    }
    if wildcard && labels.len() < 2 {
        return reject("is a wildcard over a top-level domain");
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
                && d.paths.as_ref().is_some_and(|p| !p.is_empty())
        }),
    )?;
    refresh_interval("spec.refreshInterval", &spec.refresh_interval)
}

/// Everything the schema checks on a policy spec, checked again in Rust.
pub fn policy_spec(spec: &ClusterCredentialPolicySpec) -> Result<()> {
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
            "10.0.0.1",
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
