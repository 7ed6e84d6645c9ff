//! Table tests of the request plan: one request head, one connection, one
//! snapshot in; a plan or a refusal out.

use std::sync::Arc;
use std::time::Duration;

use credbroker_crds::config::{PodPlaceholders, SidecarBindings};
use http::Request;

use super::*;
use crate::echo::EchoDetector;
use crate::engine::Slot;
use crate::metrics::BindingLabel;
use crate::store::{Secret, SecretState};
use crate::substitute::PlaceholderSet;
use crate::upstream::{DestinationTrust, UpstreamSettings, Upstreams};

const ALPHA: &str = "sk-alpha0123456789abcdefghijkl";
const BETA: &str = "sk-beta00123456789abcdefghijkl";
const PLAIN: &str = "sk-plain0123456789abcdefghijkl";
const ALPHA_SECRET: &str = "alpha-secret-value&x=1";

fn bindings() -> SidecarBindings {
    SidecarBindings::from_json(
        r#"{"formatVersion":1,"bindings":[
        {"id":"alpha","secret":{"mount":"s","path":"alpha","key":"k"},
         "destinations":[{"host":"api.alpha.test","methods":["GET","POST"],"paths":["/v1/*"]}],
         "surfaces":["header","basicAuth","query","body"]},
        {"id":"beta","secret":{"mount":"s","path":"beta","key":"k"},
         "destinations":[{"host":"*.beta.test","port":8443}]},
        {"id":"plain","secret":{"mount":"s","path":"plain","key":"k"},
         "destinations":[{"host":"plain.test","port":80,"allowCleartext":true},
                         {"host":"*.wild.test","port":8080,"allowCleartext":true}]}
        ]}"#,
    )
    .unwrap()
}

fn snapshot_with(states: [SecretState; 3]) -> Snapshot {
    let bindings = bindings().bindings;
    let placeholders = PodPlaceholders(
        [("alpha", ALPHA), ("beta", BETA), ("plain", PLAIN)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    );
    let set = PlaceholderSet::from_config(&bindings, &placeholders).unwrap();
    let tls = crate::tls::throwaway_upstream_tls();
    let settings = UpstreamSettings::for_tests();
    Snapshot {
        labels: bindings
            .iter()
            .map(|b| BindingLabel(Arc::from(b.id.as_str())))
            .collect(),
        bindings,
        placeholders: Arc::new(set),
        secrets: states.into_iter().map(Slot::State).collect(),
        echo: Arc::new(EchoDetector::empty()),
        upstreams: Arc::new(Upstreams::new(tls, DestinationTrust::default(), settings)),
    }
}

fn ready(value: &str) -> SecretState {
    SecretState::Ready(Secret::usable_for(
        value.as_bytes(),
        Some(1),
        Duration::from_secs(60),
    ))
}

fn snapshot() -> Snapshot {
    snapshot_with([
        ready(ALPHA_SECRET),
        ready("beta-secret-value"),
        ready("plain-secret-value"),
    ])
}

fn tls(sni: &'static str, port: u16) -> ConnFacts<'static> {
    ConnFacts {
        sni: Some(sni),
        port,
        original: None,
        tunnel_host: None,
        proxy_form: false,
        egress: EgressMode::Passthrough,
    }
}

fn cleartext(port: u16) -> ConnFacts<'static> {
    ConnFacts {
        sni: None,
        port,
        original: Some(SocketAddr::from(([10, 1, 2, 3], port))),
        tunnel_host: None,
        proxy_form: false,
        egress: EgressMode::Passthrough,
    }
}

fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut builder = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(()).unwrap().into_parts().0
}

fn run(mut parts: Parts, body_empty: bool, conn: ConnFacts<'_>) -> (Result<Plan, Refusal>, Parts) {
    let result = plan(&mut parts, body_empty, &conn, &snapshot());
    (result, parts)
}

/// The code and the detail of a refusal, for assertions on either.
fn why(r: &Refusal) -> String {
    format!("{} {}", r.code, r.detail)
}

fn refused(result: Result<Plan, Refusal>) -> Refusal {
    match result {
        Ok(plan) => panic!("forwarded: {plan:?}"),
        Err(r) => r,
    }
}

/// `GET /v1/x` with alpha's placeholder as a bearer token, planned with
/// alpha's secret in `state`; it must be refused. The refusal, and the head
/// as the planner left it.
fn alpha_bearer_refused_with(state: SecretState) -> (Refusal, Parts) {
    let snap = snapshot_with([
        state,
        ready("beta-secret-value"),
        ready("plain-secret-value"),
    ]);
    let mut parts = head(
        "GET",
        "/v1/x",
        &[
            ("host", "api.alpha.test"),
            ("authorization", &format!("Bearer {ALPHA}")),
        ],
    );
    match plan(&mut parts, true, &tls("api.alpha.test", 443), &snap) {
        Ok(p) => panic!("forwarded: {p:?}"),
        Err(r) => (r, parts),
    }
}

fn planned(result: Result<Plan, Refusal>) -> Plan {
    match result {
        Ok(plan) => plan,
        Err(r) => panic!("refused: {r:?}"),
    }
}

#[test]
fn a_header_placeholder_toward_its_host_is_swapped_and_marked_sensitive() {
    let parts = head(
        "POST",
        "/v1/chat",
        &[
            ("host", "api.alpha.test"),
            ("authorization", &format!("Bearer {ALPHA}")),
        ],
    );
    let (result, parts) = run(parts, true, tls("api.alpha.test", 443));
    let plan = planned(result);
    assert_eq!(plan.injected.iter().collect::<Vec<_>>(), vec![0]);
    assert!(plan.bound);
    assert_eq!(
        plan.route,
        Route::Named {
            tls: true,
            host: "api.alpha.test".into(),
            port: 443
        }
    );
    assert_eq!(plan.destination, "api.alpha.test:443");
    let auth = parts.headers.get("authorization").unwrap();
    assert_eq!(auth.as_bytes(), format!("Bearer {ALPHA_SECRET}").as_bytes());
    assert!(auth.is_sensitive());
    assert_eq!(parts.headers.get("accept-encoding").unwrap(), "identity");
    assert_eq!(plan.body, BodyPlan::Untouched);
}

#[test]
fn the_query_gets_the_percent_encoded_value_and_basic_auth_the_password() {
    let parts = head(
        "GET",
        &format!("/v1/q?key={ALPHA}&b=2"),
        &[("host", "api.alpha.test")],
    );
    let (result, parts) = run(parts, true, tls("api.alpha.test", 443));
    planned(result);
    assert_eq!(
        parts.uri.query(),
        Some("key=alpha-secret-value%26x%3D1&b=2")
    );
    assert_eq!(parts.uri.path(), "/v1/q");

    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let creds = b64.encode(format!("bob:{ALPHA}"));
    let parts = head(
        "GET",
        "/v1/basic",
        &[
            ("host", "api.alpha.test"),
            ("authorization", &format!("Basic {creds}")),
        ],
    );
    let (result, parts) = run(parts, true, tls("api.alpha.test", 443));
    planned(result);
    let sent = parts
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let decoded = b64.decode(sent.strip_prefix("Basic ").unwrap()).unwrap();
    assert_eq!(decoded, format!("bob:{ALPHA_SECRET}").as_bytes());
}

#[test]
fn refusals_name_the_reason() {
    let bearer = |p: &str| format!("Bearer {p}");
    let cases: Vec<(Parts, bool, ConnFacts<'_>, StatusCode, &str, &str)> = vec![
        (
            head("GET", "/v1/x", &[("host", "evil.test")]),
            true,
            tls("api.alpha.test", 443),
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected",
            "",
        ),
        (
            head("GET", "/v1/x", &[("host", "api.alpha.test:8443")]),
            true,
            tls("api.alpha.test", 443),
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected",
            "",
        ),
        (
            head(
                "GET",
                "https://other.test/v1/x",
                &[("host", "api.alpha.test")],
            ),
            true,
            tls("api.alpha.test", 443),
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected",
            "Host",
        ),
        (
            head(
                "GET",
                "/v1/x",
                &[("host", "api.alpha.test"), ("host", "api.alpha.test")],
            ),
            true,
            tls("api.alpha.test", 443),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "duplicate Host",
        ),
        (
            head(
                "GET",
                "/x",
                &[
                    ("host", "a.beta.test:8443"),
                    ("authorization", &bearer(ALPHA)),
                ],
            ),
            true,
            tls("a.beta.test", 8443),
            StatusCode::FORBIDDEN,
            "exfiltration_blocked",
            "destination_not_bound",
        ),
        (
            head(
                "DELETE",
                "/v1/x",
                &[
                    ("host", "api.alpha.test"),
                    ("authorization", &bearer(ALPHA)),
                ],
            ),
            true,
            tls("api.alpha.test", 443),
            StatusCode::FORBIDDEN,
            "exfiltration_blocked",
            "method_not_allowed",
        ),
        (
            head(
                "GET",
                &format!("/v1/{ALPHA}"),
                &[("host", "api.alpha.test")],
            ),
            true,
            tls("api.alpha.test", 443),
            StatusCode::FORBIDDEN,
            "exfiltration_blocked",
            "placeholder_in_path",
        ),
        (
            head("GET", "/v1/x", &[("host", "api.alpha.test"), (ALPHA, "1")]),
            true,
            tls("api.alpha.test", 443),
            StatusCode::FORBIDDEN,
            "exfiltration_blocked",
            "placeholder_in_header_name",
        ),
        (
            head(
                "GET",
                &format!("/x?k={BETA}"),
                &[("host", "a.beta.test:8443")],
            ),
            true,
            tls("a.beta.test", 8443),
            StatusCode::FORBIDDEN,
            "exfiltration_blocked",
            "in the query toward",
        ),
        (
            head(
                "CONNECT",
                "elsewhere.test:443",
                &[("host", "elsewhere.test:443")],
            ),
            true,
            tls("api.alpha.test", 443),
            StatusCode::METHOD_NOT_ALLOWED,
            "bad_request",
            "CONNECT",
        ),
        (
            head(
                "POST",
                "/v1/x",
                &[("host", "api.alpha.test"), ("content-encoding", "gzip")],
            ),
            false,
            tls("api.alpha.test", 443),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported",
            "compressed",
        ),
    ];
    for (parts, body_empty, conn, status, decision, reason) in cases {
        let what = format!("{} {}", parts.method, parts.uri);
        let r = refused(run(parts, body_empty, conn).0);
        assert_eq!(
            (r.status, r.decision.as_str()),
            (status, decision),
            "{what}: {r:?}"
        );
        assert!(why(&r).contains(reason), "{what}: {}", why(&r));
    }
}

#[test]
fn an_unusable_secret_is_503_never_forwarded_without_it() {
    let failed = SecretState::Failed(Arc::new(crate::store::Failure {
        step: "not_found",
        message: "s/alpha: not found".into(),
    }));
    for (state, expected) in [
        (SecretState::Pending, "not been read"),
        (failed, "not found"),
        (
            SecretState::Ready(Secret::usable_for(
                b"stale-value-123",
                Some(1),
                Duration::ZERO,
            )),
            "staleness",
        ),
    ] {
        let (r, parts) = alpha_bearer_refused_with(state);
        assert_eq!(
            (r.status, r.decision.as_str(), r.binding),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "secret_unavailable",
                Some(0)
            )
        );
        assert!(why(&r).contains(expected), "{}", why(&r));
        // Nothing of the refused request was rewritten.
        assert_eq!(
            parts.headers.get("authorization").unwrap().as_bytes(),
            format!("Bearer {ALPHA}").as_bytes()
        );
    }
}

#[test]
fn a_value_a_header_cannot_carry_is_refused() {
    let (r, _) = alpha_bearer_refused_with(ready("bad\r\nX-Injected: 1"));
    assert_eq!(
        (r.status, r.decision.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "secret_unavailable")
    );
}

#[test]
fn bodies_get_the_form_of_their_content_type() {
    for (content_type, form) in [
        ("application/json", Form::Json),
        ("application/vnd.api+json; charset=utf-8", Form::Json),
        ("application/x-www-form-urlencoded", Form::Percent),
        ("text/plain", Form::Raw),
    ] {
        let parts = head(
            "POST",
            "/v1/x",
            &[("host", "api.alpha.test"), ("content-type", content_type)],
        );
        let plan = planned(run(parts, false, tls("api.alpha.test", 443)).0);
        match plan.body {
            BodyPlan::Replace { allowed, form: got } => {
                assert_eq!(got, form, "{content_type}");
                assert_eq!(allowed.iter().collect::<Vec<_>>(), vec![0]);
            }
            other => panic!("{content_type}: {other:?}"),
        }
    }
    // No binding may be swapped on this body: scanned, never swapped.
    let parts = head("POST", "/x", &[("host", "a.beta.test:8443")]);
    assert_eq!(
        planned(run(parts, false, tls("a.beta.test", 8443)).0).body,
        BodyPlan::Detect
    );
    // A path alpha does not allow: its placeholder would be refused in the body.
    let parts = head("POST", "/v2/x", &[("host", "api.alpha.test")]);
    assert_eq!(
        planned(run(parts, false, tls("api.alpha.test", 443)).0).body,
        BodyPlan::Detect
    );
}

#[test]
fn cleartext_goes_where_the_agent_was_going_unless_bound_and_allowed() {
    // Unbound: to the original destination, Host kept, no identity asked.
    let parts = head(
        "GET",
        "/",
        &[("host", "10.1.2.3:8080"), ("accept-encoding", "gzip")],
    );
    let (result, parts) = run(parts, true, cleartext(8080));
    let plan = planned(result);
    assert_eq!(
        plan.route,
        Route::Original(SocketAddr::from(([10, 1, 2, 3], 8080)))
    );
    assert!(!plan.bound);
    assert_eq!(parts.headers.get("accept-encoding").unwrap(), "gzip");
    // A placeholder there is blocked.
    let parts = head("GET", "/", &[("host", "example.test"), ("x-key", PLAIN)]);
    let r = refused(run(parts, true, cleartext(80)).0);
    assert_eq!(
        (r.decision.as_str(), r.code),
        ("exfiltration_blocked", "destination_not_bound")
    );
    // A binding without allowCleartext: blocked as cleartext.
    let parts = head(
        "GET",
        "/v1/x",
        &[
            ("host", "api.alpha.test:8080"),
            ("authorization", &format!("Bearer {ALPHA}")),
        ],
    );
    let mut conn = cleartext(8080);
    conn.port = 443;
    let r = refused(run(parts, true, conn).0);
    assert_eq!(r.decision.as_str(), "misdirected", "{r:?}");
    let parts = head(
        "GET",
        "/v1/x",
        &[
            ("host", "api.alpha.test"),
            ("authorization", &format!("Bearer {ALPHA}")),
        ],
    );
    let r = refused(run(parts, true, cleartext(443)).0);
    assert_eq!(r.code, "cleartext_not_allowed");
    // With allowCleartext: swapped, and the sidecar dials the name itself.
    let parts = head("GET", "/", &[("host", "plain.test"), ("x-key", PLAIN)]);
    let (result, parts) = run(parts, true, cleartext(80));
    let plan = planned(result);
    assert_eq!(
        plan.route,
        Route::Named {
            tls: false,
            host: "plain.test".into(),
            port: 80
        }
    );
    assert_eq!(parts.headers.get("x-key").unwrap(), "plain-secret-value");
    // Deny egress refuses the unbound request.
    let mut conn = cleartext(8080);
    conn.egress = EgressMode::Deny;
    let r = refused(run(head("GET", "/", &[("host", "x.test:8080")]), true, conn).0);
    assert_eq!(r.decision.as_str(), "egress_denied");
}

#[test]
fn a_host_that_another_parser_would_read_differently_is_refused() {
    // With a wildcard cleartext destination, the Host decides where the
    // secret goes: it must be a plain DNS name, or a URI built from it
    // could name another host (an authority ends at '/', '?', '#').
    for host in [
        "16909060:9999/x.wild.test:8080",
        "evil:x.wild.test:8080",
        "x?y.wild.test:8080",
        "x#y.wild.test:8080",
        "u@x.wild.test:8080",
        "x%2fy.wild.test:8080",
    ] {
        let parts = head("GET", "/", &[("host", host), ("x-key", PLAIN)]);
        let r = refused(run(parts, true, cleartext(8080)).0);
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{host}: {r:?}");
    }
    let parts = head(
        "GET",
        "/",
        &[("host", "a.wild.test:8080"), ("x-key", PLAIN)],
    );
    let (result, parts) = run(parts, true, cleartext(8080));
    let plan = planned(result);
    assert_eq!(
        plan.route,
        Route::Named {
            tls: false,
            host: "a.wild.test".into(),
            port: 8080
        }
    );
    assert_eq!(parts.headers.get("x-key").unwrap(), "plain-secret-value");
}

#[test]
fn override_and_reflected_headers_and_ranges_are_handled() {
    let auth = format!("Bearer {ALPHA}");
    // alpha limits methods and paths: an override would walk around them.
    for h in ["x-http-method-override", "X-Original-URL"] {
        let parts = head(
            "POST",
            "/v1/x",
            &[
                ("host", "api.alpha.test"),
                ("authorization", &auth),
                (h, "DELETE"),
            ],
        );
        let r = refused(run(parts, true, tls("api.alpha.test", 443)).0);
        assert!(
            r.code.starts_with("override_header_not_allowed"),
            "{h}: {r:?}"
        );
    }
    // beta limits nothing: nothing to walk around.
    let beta = format!("Bearer {BETA}");
    let parts = head(
        "POST",
        "/x",
        &[
            ("host", "a.beta.test:8443"),
            ("authorization", &beta),
            ("x-http-method-override", "PUT"),
        ],
    );
    planned(run(parts, true, tls("a.beta.test", 8443)).0);
    // Placeholders never go in headers that servers echo or store.
    for h in ["user-agent", "referer", "x-amz-meta-note"] {
        let parts = head("GET", "/v1/x", &[("host", "api.alpha.test"), (h, ALPHA)]);
        let r = refused(run(parts, true, tls("api.alpha.test", 443)).0);
        assert!(
            r.code.starts_with("placeholder_in_reflected_header"),
            "{h}: {r:?}"
        );
    }
    // A request that carries a secret asks for the whole response.
    let parts = head(
        "GET",
        "/v1/x",
        &[
            ("host", "api.alpha.test"),
            ("authorization", &auth),
            ("range", "bytes=0-3"),
            ("if-range", "x"),
        ],
    );
    let (result, parts) = run(parts, true, tls("api.alpha.test", 443));
    planned(result);
    assert!(parts.headers.get("range").is_none() && parts.headers.get("if-range").is_none());
    // So does any request to a bound host: a secret stored there through an
    // allowed swap must not come back in slices.
    let parts = head(
        "GET",
        "/v1/x",
        &[("host", "api.alpha.test"), ("x-ms-range", "bytes=0-3")],
    );
    let (result, parts) = run(parts, true, tls("api.alpha.test", 443));
    planned(result);
    assert!(parts.headers.get("x-ms-range").is_none());
    let parts = head(
        "GET",
        "/x",
        &[("host", "other.test"), ("range", "bytes=0-3")],
    );
    let (result, parts) = run(parts, true, cleartext(80));
    planned(result);
    assert!(
        parts.headers.get("range").is_some(),
        "a request to an unbound host keeps its range"
    );
}

#[test]
fn overrides_are_refused_in_every_spelling_and_for_body_secrets_too() {
    let auth = format!("Bearer {ALPHA}");
    // (target, headers besides Host, whether the body is empty)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, bool);
    let cases: Vec<Case<'_>> = vec![
        // As CGI-style gateways read header names.
        (
            "/v1/x",
            vec![
                ("authorization", &auth),
                ("x_http_method_override", "DELETE"),
            ],
            true,
        ),
        // The framework parameter, plain and percent-encoded.
        (
            "/v1/x?a=1&_method=DELETE",
            vec![("authorization", &auth)],
            true,
        ),
        (
            "/v1/x?%5FMETHOD=DELETE",
            vec![("authorization", &auth)],
            true,
        ),
        // No secret in the head, but alpha's may go into the body.
        (
            "/v1/x",
            vec![
                ("content-type", "application/json"),
                ("x-http-method-override", "DELETE"),
            ],
            false,
        ),
    ];
    for (uri, headers, body_empty) in cases {
        let mut all = vec![("host", "api.alpha.test")];
        all.extend(headers.iter().copied());
        let r = refused(
            run(
                head("POST", uri, &all),
                body_empty,
                tls("api.alpha.test", 443),
            )
            .0,
        );
        assert_eq!(
            (r.code, r.binding),
            ("override_header_not_allowed", Some(0)),
            "{uri} {headers:?}"
        );
    }
    // A parameter that only looks like it stays.
    let parts = head(
        "POST",
        "/v1/x?x_method=1&_methods=2",
        &[("host", "api.alpha.test"), ("authorization", &auth)],
    );
    planned(run(parts, true, tls("api.alpha.test", 443)).0);
    // Reflected headers in their underscore spelling too.
    let parts = head(
        "GET",
        "/v1/x",
        &[("host", "api.alpha.test"), ("user_agent", ALPHA)],
    );
    let r = refused(run(parts, true, tls("api.alpha.test", 443)).0);
    assert_eq!(r.code, "placeholder_in_reflected_header");
}

#[test]
fn a_placeholder_in_a_header_connection_drops_is_not_swapped_or_counted() {
    let parts = head(
        "GET",
        "/v1/x",
        &[
            ("host", "api.alpha.test"),
            ("connection", "authorization"),
            ("authorization", &format!("Bearer {ALPHA}")),
        ],
    );
    let (result, parts) = run(parts, true, tls("api.alpha.test", 443));
    let plan = planned(result);
    assert!(plan.injected.is_empty(), "{:?}", plan.injected);
    assert!(parts.headers.get("authorization").is_none());
}

#[test]
fn the_buffered_size_bound_covers_a_body_of_nothing_but_placeholders() {
    // A value longer than its placeholder, and longer still in JSON.
    let value = "\"".repeat(100);
    let snapshot = snapshot_with([
        ready(&value),
        ready("beta-secret-value"),
        ready("plain-secret-value"),
    ]);
    let alpha: BindingSet = [0].into_iter().collect();
    let placeholder = ALPHA.len() as u64;
    assert_eq!(snapshot.swapped_size_bound(0, &alpha, Form::Raw), 0);
    assert_eq!(
        snapshot.swapped_size_bound(placeholder * 10, &alpha, Form::Raw),
        1000
    );
    assert_eq!(
        snapshot.swapped_size_bound(placeholder * 10, &alpha, Form::Json),
        2000
    );
    // A body shorter than a placeholder is bounded all the same.
    assert_eq!(snapshot.swapped_size_bound(1, &alpha, Form::Raw), 4);
    // Nothing allowed: the body stays as it is.
    assert_eq!(
        snapshot.swapped_size_bound(1000, &BindingSet::new(), Form::Raw),
        1000
    );
}

#[test]
fn hop_by_hop_headers_are_dropped_and_upgrades_kept() {
    let parts = head(
        "GET",
        "/v1/x",
        &[
            ("host", "api.alpha.test"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "gzip"),
            ("expect", "100-continue"),
            ("x-end-to-end", "kept"),
        ],
    );
    let (result, parts) = run(parts, true, tls("api.alpha.test", 443));
    planned(result);
    for gone in [
        "connection",
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "te",
        "expect",
    ] {
        assert!(parts.headers.get(gone).is_none(), "{gone} was forwarded");
    }
    assert_eq!(parts.headers.get("x-end-to-end").unwrap(), "kept");

    let parts = head(
        "GET",
        "/v1/ws",
        &[
            ("host", "api.alpha.test"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("sec-websocket-extensions", "permessage-deflate"),
        ],
    );
    let (result, parts) = run(parts, true, tls("api.alpha.test", 443));
    assert!(planned(result).upgrade);
    assert!(parts.headers.get("sec-websocket-extensions").is_none());
    assert_eq!(parts.headers.get("upgrade").unwrap(), "websocket");
    assert_eq!(parts.headers.get("connection").unwrap(), "upgrade");
    assert_eq!(parts.headers.get("te").unwrap(), "trailers");
}

#[test]
fn the_local_proxy_takes_absolute_form_http_and_tunnels_keep_their_host() {
    let local = ConnFacts {
        sni: None,
        port: 0,
        original: None,
        tunnel_host: None,
        proxy_form: true,
        egress: EgressMode::Passthrough,
    };
    let r = refused(
        run(
            head("GET", "/", &[("host", "127.0.0.1:15080")]),
            true,
            local,
        )
        .0,
    );
    assert!(why(&r).contains("HTTPS_PROXY"), "{r:?}");
    let r = refused(
        run(
            head("GET", "https://plain.test/", &[("host", "plain.test")]),
            true,
            local,
        )
        .0,
    );
    assert!(why(&r).contains("CONNECT"), "{r:?}");
    let (result, parts) = run(
        head(
            "GET",
            "http://plain.test/p",
            &[("host", "plain.test"), ("x-key", PLAIN)],
        ),
        true,
        local,
    );
    let plan = planned(result);
    assert_eq!(
        plan.route,
        Route::Named {
            tls: false,
            host: "plain.test".into(),
            port: 80
        }
    );
    assert_eq!(parts.headers.get("x-key").unwrap(), "plain-secret-value");

    let tunnel = ConnFacts {
        sni: Some("api.alpha.test"),
        port: 443,
        original: None,
        tunnel_host: Some("api.alpha.test"),
        proxy_form: false,
        egress: EgressMode::Passthrough,
    };
    let r = refused(
        run(
            head("GET", "/v1/x", &[("host", "other.test")]),
            true,
            tunnel,
        )
        .0,
    );
    assert_eq!(r.decision.as_str(), "misdirected");
}

#[test]
fn decision_refusals_say_what_was_refused_in_words() {
    let bearer = format!("Bearer {ALPHA}");
    let cases = [
        (
            head(
                "GET",
                "/x",
                &[("host", "a.beta.test:8443"), ("authorization", &bearer)],
            ),
            tls("a.beta.test", 8443),
            "a.beta.test:8443 is not a destination of the placeholder's binding",
        ),
        (
            head(
                "DELETE",
                "/v1/x",
                &[("host", "api.alpha.test"), ("authorization", &bearer)],
            ),
            tls("api.alpha.test", 443),
            "the binding does not allow DELETE to api.alpha.test:443",
        ),
    ];
    for (parts, conn, detail) in cases {
        let r = refused(run(parts, true, conn).0);
        assert_eq!(r.detail, detail);
    }
}
