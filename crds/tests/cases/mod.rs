//! One table of invalid objects, run through both validators: the real API
//! server (tests/apiserver.rs) and the Rust mirror the controller uses
//! (tests/validation_mirror.rs). Each case names the field the error must name.

use serde_json::{Value, json};

/// A valid binding in `namespace`, the base every case mutates.
pub fn valid_binding(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "credbroker.dev/v1alpha1",
        "kind": "CredentialBinding",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "serviceAccountName": "research-agent",
            "source": { "vault": { "mount": "secret", "path": "teams/research/openai", "key": "api_key", "kvVersion": 2 } },
            "placeholder": { "env": "OPENAI_API_KEY", "prefix": "sk-" },
            "destinations": [
                { "host": "api.openai.com", "port": 443, "methods": ["POST"], "paths": ["/v1/*"] },
                { "host": "*.anthropic.com" }
            ],
            "inject": { "in": ["header"] },
            "refreshInterval": "30s"
        }
    })
}

/// A valid policy, the base every policy case mutates.
pub fn valid_policy(name: &str) -> Value {
    json!({
        "apiVersion": "credbroker.dev/v1alpha1",
        "kind": "ClusterCredentialPolicy",
        "metadata": { "name": name },
        "spec": {
            "namespaceSelector": { "matchLabels": { "team": "research" } },
            "allow": [ {
                "vault": { "mount": "secret", "pathPrefix": "teams/research/" },
                "destinations": ["api.openai.com", "*.anthropic.com"],
                "ports": [443]
            } ]
        }
    })
}

pub struct Case {
    pub name: &'static str,
    /// JSON pointer under the object, and the value to put there.
    pub pointer: &'static str,
    pub value: Value,
    /// A second edit some cases need (e.g. a surface plus an unscoped destination).
    pub also: Option<(&'static str, Value)>,
    /// The field the error message must name.
    pub field: &'static str,
}

fn case(name: &'static str, pointer: &'static str, value: Value, field: &'static str) -> Case {
    Case {
        name,
        pointer,
        value,
        also: None,
        field,
    }
}

pub fn invalid_binding_cases() -> Vec<Case> {
    let host = "spec.destinations[0].host";
    let path = "spec.source.vault.path";
    let mount = "spec.source.vault.mount";
    let mut cases = vec![
        case(
            "kvVersion 3",
            "/spec/source/vault/kvVersion",
            json!(3),
            "spec.source.vault.kvVersion",
        ),
        case(
            "kvVersion 0",
            "/spec/source/vault/kvVersion",
            json!(0),
            "spec.source.vault.kvVersion",
        ),
        case(
            "no destinations",
            "/spec/destinations",
            json!([]),
            "spec.destinations",
        ),
        case(
            "host with scheme",
            "/spec/destinations/0/host",
            json!("https://api.openai.com"),
            host,
        ),
        case(
            "host with path",
            "/spec/destinations/0/host",
            json!("api.openai.com/v1"),
            host,
        ),
        case(
            "host with port",
            "/spec/destinations/0/host",
            json!("api.openai.com:443"),
            host,
        ),
        case(
            "host with whitespace",
            "/spec/destinations/0/host",
            json!("api .openai.com"),
            host,
        ),
        case(
            "host with trailing space",
            "/spec/destinations/0/host",
            json!("api.openai.com "),
            host,
        ),
        case(
            "inner wildcard",
            "/spec/destinations/0/host",
            json!("api.*.com"),
            host,
        ),
        case(
            "partial wildcard",
            "/spec/destinations/0/host",
            json!("*api.openai.com"),
            host,
        ),
        case(
            "double wildcard",
            "/spec/destinations/0/host",
            json!("*.*.openai.com"),
            host,
        ),
        case(
            "wildcard over a TLD",
            "/spec/destinations/0/host",
            json!("*.com"),
            host,
        ),
        case(
            "env starting with a digit",
            "/spec/placeholder/env",
            json!("1OPENAI"),
            "spec.placeholder.env",
        ),
        case(
            "env with a dash",
            "/spec/placeholder/env",
            json!("OPENAI-KEY"),
            "spec.placeholder.env",
        ),
        case(
            "mount with a slash",
            "/spec/source/vault/mount",
            json!("secret/x"),
            mount,
        ),
        case(
            "mount with a dot",
            "/spec/source/vault/mount",
            json!("secret.x"),
            mount,
        ),
        case(
            "path with a leading slash",
            "/spec/source/vault/path",
            json!("/teams/x"),
            path,
        ),
        case(
            "path with a trailing slash",
            "/spec/source/vault/path",
            json!("teams/x/"),
            path,
        ),
        case(
            "path with ..",
            "/spec/source/vault/path",
            json!("teams/../x"),
            path,
        ),
        case(
            "path with .. inside a segment",
            "/spec/source/vault/path",
            json!("teams/a..b"),
            path,
        ),
        case(
            "path with a . segment",
            "/spec/source/vault/path",
            json!("teams/./x"),
            path,
        ),
        case(
            "path with *",
            "/spec/source/vault/path",
            json!("teams/*"),
            path,
        ),
        case(
            "path with +",
            "/spec/source/vault/path",
            json!("teams/+x"),
            path,
        ),
        case(
            "path with a single quote",
            "/spec/source/vault/path",
            json!("teams/x'y"),
            path,
        ),
        case(
            "path with a double quote",
            "/spec/source/vault/path",
            json!("teams/x\"y"),
            path,
        ),
        case(
            "path with an empty segment",
            "/spec/source/vault/path",
            json!("teams//x"),
            path,
        ),
        case(
            "unknown surface",
            "/spec/inject/in",
            json!(["cookie"]),
            "spec.inject.in[0]",
        ),
        case(
            "refresh interval too short",
            "/spec/refreshInterval",
            json!("100ms"),
            "spec.refreshInterval",
        ),
        case(
            "refresh interval not a duration",
            "/spec/refreshInterval",
            json!("soon"),
            "spec.refreshInterval",
        ),
        Case {
            name: "query surface without methods and paths",
            pointer: "/spec/inject/in",
            value: json!(["header", "query"]),
            also: None, // destinations[1] has neither
            field: "spec.destinations",
        },
        Case {
            name: "body surface without paths",
            pointer: "/spec/inject/in",
            value: json!(["body"]),
            also: Some((
                "/spec/destinations",
                json!([{ "host": "api.openai.com", "methods": ["POST"] }]),
            )),
            field: "spec.destinations",
        },
    ];
    cases.push(Case {
        name: "body surface without methods",
        pointer: "/spec/inject/in",
        value: json!(["body"]),
        also: Some((
            "/spec/destinations",
            json!([{ "host": "api.openai.com", "paths": ["/v1/*"] }]),
        )),
        field: "spec.destinations",
    });
    for (name, sa) in [
        ("service account glob", "*"),
        ("service account with a glob suffix", "agent-*"),
        ("service account in upper case", "Agent"),
    ] {
        cases.push(case(
            name,
            "/spec/serviceAccountName",
            json!(sa),
            "spec.serviceAccountName",
        ));
    }
    for (name, host) in [
        ("an IPv4 address", "169.254.169.254"),
        ("a decimal IP", "2130706433"),
        ("a hex IP", "0x7f000001"),
    ] {
        cases.push(case(
            name,
            "/spec/destinations/0/host",
            json!(host),
            "spec.destinations[0].host",
        ));
    }
    for env in ["SSL_CERT_FILE", "LD_PRELOAD", "https_proxy"] {
        cases.push(case(
            "a reserved env name",
            "/spec/placeholder/env",
            json!(env),
            "spec.placeholder.env",
        ));
    }
    cases.push(case(
        "no surfaces",
        "/spec/inject/in",
        json!([]),
        "spec.inject.in",
    ));
    cases.push(case(
        "a long env name",
        "/spec/placeholder/env",
        json!("A".repeat(129)),
        "spec.placeholder.env",
    ));
    cases.push(case(
        "a long prefix",
        "/spec/placeholder/prefix",
        json!("p".repeat(33)),
        "spec.placeholder.prefix",
    ));
    cases.push(case(
        "a key with a newline",
        "/spec/source/vault/key",
        json!("api\nkey"),
        "spec.source.vault.key",
    ));
    cases.push(Case {
        name: "body surface scoped only to /*",
        pointer: "/spec/inject/in",
        value: json!(["body"]),
        also: Some((
            "/spec/destinations",
            json!([{ "host": "api.openai.com", "methods": ["POST"], "paths": ["/*"] }]),
        )),
        field: "spec.destinations",
    });
    for reserved in ["sys", "auth", "identity", "cubbyhole"] {
        cases.push(case(
            "a reserved mount",
            "/spec/source/vault/mount",
            json!(reserved),
            mount,
        ));
    }
    cases
}

pub fn invalid_policy_cases() -> Vec<Case> {
    vec![
        case(
            "reserved mount",
            "/spec/allow/0/vault/mount",
            json!("sys"),
            "spec.allow[0].vault.mount",
        ),
        case(
            "prefix with a leading slash",
            "/spec/allow/0/vault/pathPrefix",
            json!("/teams"),
            "spec.allow[0].vault.pathPrefix",
        ),
        case(
            "prefix with ..",
            "/spec/allow/0/vault/pathPrefix",
            json!("teams/../"),
            "spec.allow[0].vault.pathPrefix",
        ),
        case(
            "host with scheme",
            "/spec/allow/0/destinations/0",
            json!("https://api.openai.com"),
            "spec.allow[0].destinations[0]",
        ),
        case(
            "inner wildcard",
            "/spec/allow/0/destinations/1",
            json!("api.*.com"),
            "spec.allow[0].destinations[1]",
        ),
        case("no allowances", "/spec/allow", json!([]), "spec.allow"),
        case(
            "port 0",
            "/spec/allow/0/ports",
            json!([0]),
            "spec.allow[0].ports[0]",
        ),
        case(
            "a mistyped selector",
            "/spec/namespaceSelector",
            json!({ "matchlabels": { "team": "research" } }),
            "spec.namespaceSelector",
        ),
        case(
            "an empty selector",
            "/spec/namespaceSelector",
            json!({}),
            "spec.namespaceSelector",
        ),
        case(
            "an unknown operator",
            "/spec/namespaceSelector",
            json!({ "matchExpressions": [{ "key": "team", "operator": "Bogus" }] }),
            "spec.namespaceSelector.matchExpressions",
        ),
        case(
            "In without values",
            "/spec/namespaceSelector",
            json!({ "matchExpressions": [{ "key": "team", "operator": "In" }] }),
            "spec.namespaceSelector.matchExpressions",
        ),
        case(
            "prefix ending in a . segment",
            "/spec/allow/0/vault/pathPrefix",
            json!("teams/."),
            "spec.allow[0].vault.pathPrefix",
        ),
    ]
}

/// `base` with the case's edits applied.
pub fn apply(base: &Value, case: &Case) -> Value {
    let mut v = base.clone();
    for (pointer, value) in
        std::iter::once((case.pointer, &case.value)).chain(case.also.as_ref().map(|(p, v)| (*p, v)))
    {
        *v.pointer_mut(pointer)
            .unwrap_or_else(|| panic!("{}: no {pointer}", case.name)) = value.clone();
    }
    v
}
