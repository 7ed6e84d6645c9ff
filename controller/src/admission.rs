//! Policy admission, default deny: whether some `ClusterCredentialPolicy`
//! allows a binding, and if not, what no policy allows. Pure.
//!
//! A binding is admitted when a policy selecting its namespace has an
//! allowance covering its mount and path, and every one of its
//! destinations is allowed (host, port, surfaces, cleartext, custom CA) by
//! an allowance that also covers that mount and path. A policy that fails
//! the schema's checks (the schema can be bypassed, e.g. by an old CRD)
//! allows nothing.

use std::collections::BTreeMap;

use credbroker_crds::validate::{path_under_prefix, policy_host_admits, policy_spec};
use credbroker_crds::{
    Allowance, ClusterCredentialPolicy, ClusterCredentialPolicySpec, CredentialBindingSpec,
    Destination,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Why no policy admits a binding: a sentence naming what is not allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial(pub String);

/// Whether a label selector selects an object with these labels. An
/// operator the API does not define selects nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or(&[]);
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// Whether a policy applies to a namespace with these labels.
pub fn policy_selects(
    spec: &ClusterCredentialPolicySpec,
    labels: &BTreeMap<String, String>,
) -> bool {
    if policy_spec(spec).is_err() {
        return false;
    }
    spec.all_namespaces || selector_matches(&spec.namespace_selector, labels)
}

/// Admits `binding` (in namespace `namespace`, labelled `labels`), or says
/// what no policy allows.
pub fn admit(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    binding: &CredentialBindingSpec,
    policies: &[ClusterCredentialPolicy],
) -> Result<(), Denial> {
    let selecting: Vec<&ClusterCredentialPolicy> = policies
        .iter()
        .filter(|p| policy_selects(&p.spec, labels))
        .collect();
    if selecting.is_empty() {
        return Err(Denial(format!(
            "no ClusterCredentialPolicy selects namespace {namespace}"
        )));
    }
    let vault = &binding.source.vault;
    let secret = format!("{}/{}", vault.mount, vault.path);
    let covering: Vec<&Allowance> = selecting
        .iter()
        .flat_map(|p| p.spec.allow.iter())
        .filter(|a| {
            a.vault.mount == vault.mount && path_under_prefix(&vault.path, &a.vault.path_prefix)
        })
        .collect();
    if covering.is_empty() {
        return Err(Denial(format!(
            "no ClusterCredentialPolicy allows Vault path {secret} for namespace {namespace}"
        )));
    }
    // The mount's KV version decides which Vault paths a grant names; only
    // the admin's word for it counts, and only when the admins agree.
    let mut versions: Vec<u8> = covering.iter().map(|a| a.vault.kv_version).collect();
    versions.sort_unstable();
    versions.dedup();
    if versions.len() > 1 {
        return Err(Denial(format!(
            "the ClusterCredentialPolicies covering Vault path {secret} disagree on the KV version of mount {}; no grant until they agree",
            vault.mount
        )));
    }
    let covering: Vec<&Allowance> = covering
        .into_iter()
        .filter(|a| a.vault.kv_version == vault.kv_version)
        .collect();
    if covering.is_empty() {
        return Err(Denial(format!(
            "no ClusterCredentialPolicy allows Vault path {secret} as KV version {} for namespace {namespace} (the policy gives the mount another version)",
            vault.kv_version
        )));
    }
    for d in &binding.destinations {
        if !covering.iter().any(|a| allows_destination(a, d, binding)) {
            return Err(Denial(explain(&covering, d, binding, &secret, namespace)));
        }
    }
    Ok(())
}

fn allows_destination(a: &Allowance, d: &Destination, binding: &CredentialBindingSpec) -> bool {
    allows_host(a, d)
        && a.ports.contains(&d.port)
        && binding
            .inject
            .surfaces
            .iter()
            .all(|s| a.surfaces.contains(s))
        && (!d.allow_cleartext || a.allow_cleartext)
        && (d.ca_config_map.is_none() || a.allow_custom_ca)
}

fn allows_host(a: &Allowance, d: &Destination) -> bool {
    a.destinations
        .iter()
        .any(|p| policy_host_admits(p, &d.host))
}

/// The most specific reason no covering allowance admits `d`: the host
/// first, then the port, the surfaces, cleartext and a custom CA.
fn explain(
    covering: &[&Allowance],
    d: &Destination,
    binding: &CredentialBindingSpec,
    secret: &str,
    namespace: &str,
) -> String {
    let host = &d.host;
    let hosts: Vec<&&Allowance> = covering.iter().filter(|a| allows_host(a, d)).collect();
    if hosts.is_empty() {
        return format!(
            "no ClusterCredentialPolicy allows host {host} for Vault path {secret} in namespace {namespace}"
        );
    }
    let ports: Vec<&&&Allowance> = hosts.iter().filter(|a| a.ports.contains(&d.port)).collect();
    if ports.is_empty() {
        return format!(
            "no ClusterCredentialPolicy allows port {} of host {host} for Vault path {secret} in namespace {namespace}",
            d.port
        );
    }
    let missing: Vec<&str> = binding
        .inject
        .surfaces
        .iter()
        .filter(|s| !ports.iter().any(|a| a.surfaces.contains(s)))
        .map(|s| surface_name(*s))
        .collect();
    if !missing.is_empty() {
        return format!(
            "no ClusterCredentialPolicy allows injecting into {} toward host {host} in namespace {namespace}",
            missing.join(", ")
        );
    }
    if d.allow_cleartext && !ports.iter().any(|a| a.allow_cleartext) {
        return format!(
            "no ClusterCredentialPolicy allows cleartext HTTP to host {host} in namespace {namespace}"
        );
    }
    if d.ca_config_map.is_some() && !ports.iter().any(|a| a.allow_custom_ca) {
        return format!(
            "no ClusterCredentialPolicy allows a custom CA (caConfigMap) for host {host} in namespace {namespace}"
        );
    }
    // Each condition holds for some allowance, but no one allowance holds
    // them all.
    format!(
        "no single ClusterCredentialPolicy allowance allows every setting of host {host} (port, surfaces, cleartext, custom CA) in namespace {namespace}"
    )
}

fn surface_name(s: credbroker_crds::Surface) -> &'static str {
    use credbroker_crds::Surface;
    match s {
        Surface::Header => "header",
        Surface::Query => "query",
        Surface::Body => "body",
        Surface::BasicAuth => "basicAuth",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn policy(yaml: &str) -> ClusterCredentialPolicy {
        let spec: ClusterCredentialPolicySpec = json(yaml);
        ClusterCredentialPolicy::new("p", spec)
    }

    fn binding(yaml: &str) -> CredentialBindingSpec {
        json(yaml)
    }

    fn json<T: serde::de::DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const RESEARCH: &str = r#"{"namespaceSelector":{"matchLabels":{"team":"research"}},
        "allow":[{"vault":{"mount":"secret","pathPrefix":"teams/research/"},
                  "destinations":["api.openai.com","*.anthropic.com"]}]}"#;

    fn openai(host: &str) -> String {
        format!(
            r#"{{"serviceAccountName":"agent","source":{{"vault":{{"mount":"secret","path":"teams/research/openai","key":"k"}}}},
            "placeholder":{{"env":"OPENAI_API_KEY"}},"destinations":[{{"host":"{host}"}}]}}"#
        )
    }

    #[test]
    fn default_deny_names_what_is_missing() {
        let team = labels(&[("team", "research")]);
        let b = binding(&openai("api.openai.com"));
        let e = admit("agents", &team, &b, &[]).unwrap_err();
        assert_eq!(e.0, "no ClusterCredentialPolicy selects namespace agents");

        let p = [policy(RESEARCH)];
        assert_eq!(admit("agents", &team, &b, &p), Ok(()));
        let e = admit("agents", &labels(&[("team", "other")]), &b, &p).unwrap_err();
        assert!(e.0.contains("selects namespace agents"), "{e:?}");

        let e = admit("agents", &team, &binding(&openai("api.example.com")), &p).unwrap_err();
        assert_eq!(
            e.0,
            "no ClusterCredentialPolicy allows host api.example.com for Vault path secret/teams/research/openai in namespace agents"
        );
        // One label under the wildcard, and the same wildcard, are admitted.
        assert!(admit("agents", &team, &binding(&openai("api.anthropic.com")), &p).is_ok());
        assert!(admit("agents", &team, &binding(&openai("*.anthropic.com")), &p).is_ok());
        assert!(admit("agents", &team, &binding(&openai("a.b.anthropic.com")), &p).is_err());
        assert!(admit("agents", &team, &binding(&openai("*.openai.com")), &p).is_err());
    }

    #[test]
    fn paths_are_matched_on_whole_segments() {
        let team = labels(&[("team", "research")]);
        let p = [policy(RESEARCH)];
        for (path, ok) in [
            ("teams/research/openai", true),
            ("teams/research/a/b", true),
            ("teams/research-evil/x", false),
            ("teams/researchx", false),
            ("teams/other/x", false),
        ] {
            let b = binding(&openai("api.openai.com").replace("teams/research/openai", path));
            let got = admit("agents", &team, &b, &p);
            assert_eq!(got.is_ok(), ok, "{path}: {got:?}");
            if !ok {
                assert!(
                    got.unwrap_err()
                        .0
                        .contains(&format!("Vault path secret/{path}"))
                );
            }
        }
        let mut v1 = binding(&openai("api.openai.com"));
        v1.source.vault.kv_version = 1;
        let e = admit("agents", &team, &v1, &p).unwrap_err();
        assert!(e.0.contains("as KV version 1"), "{e:?}");
        let mut both = p.to_vec();
        let mut v1_policy = policy(RESEARCH);
        v1_policy.spec.allow[0].vault.kv_version = 1;
        both.push(v1_policy);
        let e = admit("agents", &team, &binding(&openai("api.openai.com")), &both).unwrap_err();
        assert!(e.0.contains("disagree on the KV version"), "{e:?}");
        let other_mount =
            binding(&openai("api.openai.com").replace(r#""mount":"secret""#, r#""mount":"kv""#));
        assert!(admit("agents", &team, &other_mount, &p).is_err());
    }

    #[test]
    fn ports_surfaces_cleartext_and_custom_ca_need_the_policy() {
        let team = labels(&[("team", "research")]);
        let p = [policy(RESEARCH)];
        let with = |extra: &str, inject: &str| {
            binding(&openai("api.openai.com").replace(
                r#""host":"api.openai.com"}]"#,
                &format!(r#""host":"api.openai.com"{extra}}}]{inject}"#),
            ))
        };
        let cases = [
            (with(r#","port":8443"#, ""), "port 8443"),
            (
                with(
                    r#","methods":["POST"],"paths":["/v1/x"]"#,
                    r#","inject":{"in":["body"]}"#,
                ),
                "injecting into body",
            ),
            (with(r#","allowCleartext":true"#, ""), "cleartext"),
            (
                with(r#","caConfigMap":{"name":"ca","key":"ca.crt"}"#, ""),
                "custom CA",
            ),
        ];
        for (b, want) in cases {
            let e = admit("agents", &team, &b, &p).unwrap_err();
            assert!(e.0.contains(want), "{want}: {e:?}");
        }
        let generous = policy(&RESEARCH.replace(
            r#""destinations":["api.openai.com","*.anthropic.com"]"#,
            r#""destinations":["api.openai.com"],"ports":[443,8443],"surfaces":["header","body"],"allowCleartext":true,"allowCustomCa":true"#,
        ));
        assert!(
            admit(
                "agents",
                &team,
                &with(r#","port":8443"#, ""),
                std::slice::from_ref(&generous)
            )
            .is_ok()
        );
        assert!(
            admit(
                "agents",
                &team,
                &with(r#","allowCleartext":true"#, ""),
                &[generous]
            )
            .is_ok()
        );
    }

    #[test]
    fn selectors_and_invalid_policies() {
        let mut sel = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "team".into(),
                operator: "NotIn".into(),
                values: Some(vec!["blue".into()]),
            }]),
            ..Default::default()
        };
        assert!(selector_matches(&sel, &labels(&[])));
        assert!(!selector_matches(&sel, &labels(&[("team", "blue")])));
        sel.match_expressions.as_mut().unwrap()[0].operator = "Bogus".into();
        assert!(!selector_matches(&sel, &labels(&[])));

        // An empty selector without allNamespaces fails validation: it
        // selects nothing, rather than everything.
        let empty = policy(&RESEARCH.replace(r#"{"matchLabels":{"team":"research"}}"#, "{}"));
        assert!(!policy_selects(
            &empty.spec,
            &labels(&[("team", "research")])
        ));
        let all = policy(&RESEARCH.replace(
            r#""namespaceSelector":{"matchLabels":{"team":"research"}}"#,
            r#""namespaceSelector":{},"allNamespaces":true"#,
        ));
        assert!(policy_selects(&all.spec, &labels(&[])));
    }
}
