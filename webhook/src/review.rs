//! One `admission.k8s.io/v1` AdmissionReview: which pods are injected, and
//! the answer the API server gets. Pure but for the bindings lookup and
//! the placeholder generator it is handed.
//!
//! The review types are written out here (the few fields used) rather
//! than taken from a client library: the response is small, and the patch
//! is ours to encode.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::mutate::{self, NewPlaceholder, PodBinding};
use crate::settings::InjectSettings;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<Request>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    uid: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    resource: Option<Resource>,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct Resource {
    #[serde(default)]
    group: String,
    #[serde(default)]
    resource: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Status {
    code: u16,
    message: String,
}

/// What became of one review, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The broker was injected (a non-empty patch).
    Injected,
    /// Opted in and already injected: an empty patch.
    AlreadyInjected,
    /// Not opted in, not a pod creation, or a namespace never injected.
    Skipped,
    /// Refused, with a message.
    Refused,
    /// The review itself could not be read (answered 400).
    Malformed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::AlreadyInjected => "already_injected",
            Self::Skipped => "skipped",
            Self::Refused => "refused",
            Self::Malformed => "malformed",
        }
    }
}

/// The answer to one review.
#[derive(Debug)]
pub struct Answer {
    /// The AdmissionReview to send back (`None` for a malformed review:
    /// answer 400 with `error`).
    pub body: Option<Value>,
    pub outcome: Outcome,
    /// For logs: why (never a value from the pod's env).
    pub detail: String,
    pub pod: String,
}

fn malformed(detail: String) -> Answer {
    Answer {
        body: None,
        outcome: Outcome::Malformed,
        detail,
        pod: String::new(),
    }
}

/// Reviews one AdmissionReview body. `lookup(namespace, service_account)`
/// gives the account's bindings.
pub fn review(
    body: &[u8],
    settings: &InjectSettings,
    lookup: &dyn Fn(&str, &str) -> Vec<PodBinding>,
    new_placeholder: &mut NewPlaceholder<'_>,
) -> Answer {
    let review: Review = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return malformed(format!("not an AdmissionReview: {}", json_error(&e))),
    };
    if review.api_version.as_deref() != Some("admission.k8s.io/v1")
        || review.kind.as_deref() != Some("AdmissionReview")
    {
        // Whatever the client sent, bounded and escaped for the log.
        let shown = |v: Option<&str>, none: &str| match v {
            Some(v) => format!("{:?}", v.chars().take(64).collect::<String>()),
            None => none.to_owned(),
        };
        return malformed(format!(
            "expected admission.k8s.io/v1 AdmissionReview, got {} {}",
            shown(review.api_version.as_deref(), "no apiVersion"),
            shown(review.kind.as_deref(), "no kind")
        ));
    }
    let Some(request) = review.request else {
        return malformed("the AdmissionReview has no request".into());
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    let is_pod_create = request.operation.as_deref() == Some("CREATE")
        && request
            .resource
            .as_ref()
            .is_some_and(|r| r.group.is_empty() && r.resource == "pods")
        && request.sub_resource.as_deref().unwrap_or("").is_empty();
    let respond = |response: Response| {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        })
    };
    let allow = |warnings: Vec<String>| Response {
        uid: request.uid.clone(),
        allowed: true,
        status: None,
        patch: None,
        patch_type: None,
        warnings,
    };
    let Some(object) = request.object.as_ref().filter(|_| is_pod_create) else {
        return Answer {
            body: Some(respond(allow(Vec::new()))),
            outcome: Outcome::Skipped,
            detail: "not a pod creation".into(),
            pod: String::new(),
        };
    };
    if !mutate::opted_in(object) {
        return Answer {
            body: Some(respond(allow(Vec::new()))),
            outcome: Outcome::Skipped,
            detail: "not opted in".into(),
            pod: String::new(),
        };
    }
    let pod: Pod = match serde_json::from_value(object.clone()) {
        Ok(p) => p,
        Err(e) => {
            return Answer {
                body: Some(respond(deny(
                    &request.uid,
                    format!("the pod could not be read: {}", json_error(&e)),
                ))),
                outcome: Outcome::Refused,
                detail: "unreadable pod".into(),
                pod: String::new(),
            };
        }
    };
    // A pod being created may have only generateName yet.
    let pod_name = format!(
        "{namespace}/{}",
        pod.metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
            .unwrap_or_default()
    );
    if !mutate::namespace_allowed(&namespace, settings) {
        return Answer {
            body: Some(respond(allow(vec![format!(
                "credbroker never injects into namespace {namespace}; the pod starts without \
                 the broker"
            )]))),
            outcome: Outcome::Skipped,
            detail: "namespace never injected".into(),
            pod: pod_name,
        };
    }
    let service_account = mutate::service_account(&pod).to_owned();
    let bindings = lookup(&namespace, &service_account);
    match mutate::mutate(object, settings, &bindings, new_placeholder) {
        Err(refusal) => Answer {
            body: Some(respond(deny(&request.uid, refusal.message.clone()))),
            outcome: Outcome::Refused,
            detail: refusal.message,
            pod: pod_name,
        },
        Ok(mutation) => {
            let outcome = if mutation.patch.is_empty() {
                Outcome::AlreadyInjected
            } else {
                Outcome::Injected
            };
            let mut response = allow(mutation.warnings);
            if !mutation.patch.is_empty() {
                let patch = match serde_json::to_vec(&mutation.patch) {
                    Ok(patch) => patch,
                    // Never an empty patch in its place: that would admit
                    // the pod without the broker.
                    Err(e) => {
                        let message = format!("the patch could not be encoded: {e}");
                        return Answer {
                            body: Some(respond(deny(&request.uid, message.clone()))),
                            outcome: Outcome::Refused,
                            detail: message,
                            pod: pod_name,
                        };
                    }
                };
                response.patch = Some(base64::engine::general_purpose::STANDARD.encode(patch));
                response.patch_type = Some("JSONPatch");
            }
            Answer {
                body: Some(respond(response)),
                outcome,
                detail: format!(
                    "service account {service_account}, {} placeholder(s)",
                    mutation.placeholders.len()
                ),
                pod: pod_name,
            }
        }
    }
}

/// A JSON error without its message: serde's messages quote the input
/// they choke on, and the input is a pod, whose env may hold anything.
pub fn json_error(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "a field of the wrong type or shape",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    if e.line() == 0 {
        kind.to_owned()
    } else {
        format!("{kind} at line {} column {}", e.line(), e.column())
    }
}

fn deny(uid: &str, message: String) -> Response {
    Response {
        uid: uid.to_owned(),
        allowed: false,
        status: Some(Status {
            code: 403,
            message: format!("credbroker: {message}"),
        }),
        patch: None,
        patch_type: None,
        warnings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::SidecarVault;

    fn settings() -> InjectSettings {
        InjectSettings {
            sidecar_image: "sidecar:1".into(),
            init_image: "init:1".into(),
            image_pull_policy: None,
            proxy_uid: 15017,
            proxy_gid: 15017,
            proxy_port: 15101,
            admin_port: 15121,
            exclude_ports: vec![],
            exclude_cidrs: vec![],
            audience: "credbroker".into(),
            token_expiration_seconds: 3600,
            vault: SidecarVault {
                addr: "https://vault:8200".into(),
                auth_mount: "kubernetes".into(),
                namespace: None,
                ca_pem: None,
            },
            sidecar_resources: Default::default(),
            broker_namespace: "credbroker-system".into(),
        }
    }

    fn review_of(namespace: &str, operation: &str, pod: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "1234",
                "namespace": namespace,
                "operation": operation,
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "object": pod,
            }
        }))
        .unwrap_or_default()
    }

    fn pod(annotations: Value, env_value: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "p", "annotations": annotations },
            "spec": { "containers": [ { "name": "agent", "image": "a",
                "env": [ { "name": "SECRETISH", "value": env_value } ] } ] }
        })
    }

    fn answer(body: &[u8]) -> Answer {
        let mut n = 0;
        let mut gen_placeholder = |p: Option<&str>| {
            n += 1;
            Ok(format!("{}{:0>26}", p.unwrap_or(""), n))
        };
        review(body, &settings(), &|_, _| Vec::new(), &mut gen_placeholder)
    }

    #[test]
    fn opted_in_pods_get_a_patch_and_the_uid_back() {
        let a = answer(&review_of(
            "agents",
            "CREATE",
            pod(json!({ "credbroker.dev/inject": "true" }), "x"),
        ));
        assert_eq!(a.outcome, Outcome::Injected);
        let body = a.body.unwrap_or_default();
        assert_eq!(body["response"]["uid"], "1234");
        assert_eq!(body["response"]["allowed"], true);
        assert_eq!(body["response"]["patchType"], "JSONPatch");
        // No bindings: admitted with a warning.
        assert!(
            body["response"]["warnings"][0]
                .as_str()
                .unwrap_or_default()
                .contains("no credbroker bindings")
        );
    }

    #[test]
    fn what_is_not_a_pod_creation_or_not_opted_in_is_allowed_unchanged() {
        for (ns, op, annotations) in [
            (
                "agents",
                "UPDATE",
                json!({ "credbroker.dev/inject": "true" }),
            ),
            (
                "agents",
                "CREATE",
                json!({ "credbroker.dev/inject": "false" }),
            ),
            ("agents", "CREATE", json!({})),
            (
                "kube-system",
                "CREATE",
                json!({ "credbroker.dev/inject": "true" }),
            ),
            (
                "credbroker-system",
                "CREATE",
                json!({ "credbroker.dev/inject": "true" }),
            ),
        ] {
            let a = answer(&review_of(ns, op, pod(annotations.clone(), "x")));
            assert_eq!(a.outcome, Outcome::Skipped, "{ns} {op} {annotations}");
            let body = a.body.unwrap_or_default();
            assert_eq!(body["response"]["allowed"], true);
            assert!(body["response"].get("patch").is_none());
        }
    }

    #[test]
    fn malformed_reviews_are_answered_without_quoting_the_input() {
        for body in [
            b"not json".to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#.to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"1","operation":{"x":"sk-live-canary"}}}"#.to_vec(),
        ] {
            let a = answer(&body);
            assert_eq!(a.outcome, Outcome::Malformed, "{}", String::from_utf8_lossy(&body));
            assert!(!a.detail.contains("sk-live-canary"), "{}", a.detail);
        }
        // A pod whose env has the wrong shape: refused, the value unquoted.
        let mut bad = pod(json!({ "credbroker.dev/inject": "true" }), "x");
        bad["spec"]["containers"][0]["env"][0]["value"] = json!(["sk-live-canary"]);
        let a = answer(&review_of("agents", "CREATE", bad));
        assert_eq!(a.outcome, Outcome::Refused);
        let text = a.body.unwrap_or_default().to_string();
        assert!(!text.contains("sk-live-canary"), "{text}");
        assert!(!a.detail.contains("sk-live-canary"));
    }
}
