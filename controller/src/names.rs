//! The names the controller gives what it creates in Vault.
//!
//! `credbroker-<cluster tag>-<readable>-<hash>`:
//! - the cluster tag is 8 hex digits of a hash of the cluster id, always
//!   the same length, so `credbroker-<tag>-` is a prefix that selects this
//!   cluster's names and no other cluster's (the sweep relies on it);
//! - the readable part is the namespace and service account, cut to 24
//!   characters, for humans reading `vault policy list`;
//! - the hash is 16 hex digits over (cluster id, namespace, service
//!   account), NUL-separated, so `a-b`/`c` and `a`/`b-c` never collide.
//!
//! At most 61 characters, lower case: within Vault's limits for policy and
//! role names (Vault lower-cases policy names).
//!
//! The ConfigMap's name needs no cluster id and lives in the API crate
//! ([`credbroker_crds::keys::bindings_configmap_name`]), where the webhook
//! finds it too.

use credbroker_crds::keys::{NAME_PREFIX, short_hash};

const READABLE_MAX: usize = 24;

/// The prefix of every Vault name of this cluster id.
pub fn cluster_prefix(cluster_id: &str) -> String {
    format!(
        "{NAME_PREFIX}{}-",
        short_hash(&["credbroker-cluster", cluster_id], 8)
    )
}

/// The Vault policy and Kubernetes-auth role name of one service account.
pub fn vault_name(cluster_id: &str, namespace: &str, service_account: &str) -> String {
    let readable: String = format!("{namespace}-{service_account}")
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .take(READABLE_MAX)
        .collect();
    format!(
        "{}{}-{}",
        cluster_prefix(cluster_id),
        readable.trim_matches('-'),
        short_hash(&[cluster_id, namespace, service_account], 16)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_distinct_and_carry_the_cluster_prefix() {
        let a = vault_name("prod", "a-b", "c");
        let b = vault_name("prod", "a", "b-c");
        assert_ne!(a, b);
        assert!(a.starts_with(&cluster_prefix("prod")));
        assert_ne!(
            vault_name("prod", "a", "b"),
            vault_name("staging", "a", "b")
        );
        // A cluster id that extends another never shares its prefix.
        assert!(!vault_name("prod-eu", "a", "b").starts_with(&cluster_prefix("prod")));
        let long = vault_name("prod", &"n".repeat(63), &"s".repeat(253));
        assert!(long.len() <= 61, "{long}");
        assert!(
            long.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        );
        let dotted = vault_name("prod", "ns", "svc.account");
        assert!(dotted.contains("ns-svc-account"), "{dotted}");
    }
}
