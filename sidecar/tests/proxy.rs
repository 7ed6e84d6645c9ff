//! Issue 3's acceptance, on real parts: the real `credbroker-sidecar` in a
//! pod network namespace whose rules the real `init` applied, agents
//! (curl, and raw TLS/HTTP clients) as another UID, recording TLS
//! upstreams in a far namespace reached by name through dnsmasq.
//!
//! Each test ends by scanning the sidecar's output (logs and audit
//! records), its metrics, and everything the agent saw for every secret
//! value (acceptance item 12).
//!
//! Needs root, iproute2, iptables, dnsmasq and curl (`make setup`); run
//! with `cargo test -p credbroker-sidecar --test proxy -- --include-ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use credbroker_test_support::netns::IpFamily;
use credbroker_test_support::upstream::{
    Behaviour, ECHO_HEADER, HeaderValue, Reply, StatusCode, Upstream, header,
};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use support::{AGENT, PROXY, Pod, TestResult, eventually, placeholder, secret_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALPHA_HOST: &str = "api.bound.test";
const ALPHA_PORT: u16 = 8443;
const BETA_HOST: &str = "other.bound.test";
const BETA_PORT: u16 = 9443;
const UNBOUND_HOST: &str = "unbound.test";
const UNBOUND_PORT: u16 = 10443;
const BAD_HOST: &str = "badcert.bound.test";
const BAD_PORT: u16 = 11443;
const DELTA_HOST: &str = "delta.bound.test";
const DELTA_PORT: u16 = 12443;
const NAMES: &[&str] = &[ALPHA_HOST, BETA_HOST, UNBOUND_HOST, BAD_HOST, DELTA_HOST];

/// The test's world: a pod, its bindings, and upstreams for them.
struct World {
    pod: Pod,
    alpha: Upstream,
    beta: Upstream,
    unbound: Upstream,
    bad: Upstream,
    alpha_secret: String,
    alpha_ph: String,
    beta_ph: String,
    bad_ph: String,
}

fn alpha_url(path: &str) -> String {
    format!("https://{ALPHA_HOST}:{ALPHA_PORT}{path}")
}

fn beta_url(path: &str) -> String {
    format!("https://{BETA_HOST}:{BETA_PORT}{path}")
}

fn bearer(ph: &str) -> String {
    format!("Authorization: Bearer {ph}")
}

/// Echo behaviours by path, for acceptance item 6; `200 ok` elsewhere.
fn echoing() -> Behaviour {
    Behaviour::custom(|r| {
        let auth = r.header("authorization").unwrap_or("").to_owned();
        let value = auth.strip_prefix("Bearer ").unwrap_or("").to_owned();
        let path = r.path.split('?').next().unwrap_or("");
        match path {
            "/v1/echo/header" => Reply::ok()
                .header(ECHO_HEADER, HeaderValue::from_str(&auth).unwrap())
                .body("fine\n"),
            "/v1/echo/json" => Reply::ok()
                .header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )
                .body(json!({"you_sent": value, "padding": "x".repeat(3000)}).to_string()),
            p if p.starts_with("/v1/echo/b64/") => {
                let k: usize = p.rsplit('/').next().unwrap().parse().unwrap();
                let mut blob = vec![b'#'; k];
                blob.extend_from_slice(value.as_bytes());
                blob.extend_from_slice(b" trailing");
                let b64 = base64::engine::general_purpose::STANDARD.encode(&blob);
                Reply::ok().body(format!("{{\"blob\":\"{b64}\"}}"))
            }
            "/v1/stream" => Reply::ok()
                .header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                )
                .paced(
                    ["data: one\n\n", "data: two\n\n", "data: three\n\n"],
                    Duration::from_secs(3),
                ),
            "/v1/gzip" => Reply::ok()
                .header(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"))
                .body(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]),
            _ => Reply::ok().body("ok\n"),
        }
    })
}

fn bindings(w: &World) -> serde_json::Value {
    json!({
        "formatVersion": 1,
        "bindings": [
            {
                "id": "alpha",
                "secret": {"mount": "secret", "path": "teams/alpha", "key": "api_key"},
                "destinations": [{
                    "host": ALPHA_HOST, "port": ALPHA_PORT,
                    "methods": ["GET", "POST"], "paths": ["/v1/*"],
                    "extraCaPem": w.alpha.ca_pem().unwrap(),
                }],
                "surfaces": ["header", "basicAuth", "query", "body"],
            },
            {
                "id": "beta",
                "secret": {"mount": "secret", "path": "teams/beta", "key": "api_key"},
                "destinations": [{
                    "host": BETA_HOST, "port": BETA_PORT,
                    "extraCaPem": w.beta.ca_pem().unwrap(),
                }],
            },
            {
                "id": "gamma",
                "secret": {"mount": "secret", "path": "teams/gamma", "key": "api_key"},
                "destinations": [{
                    "host": BAD_HOST, "port": BAD_PORT,
                    "extraCaPem": w.bad.ca_pem().unwrap(),
                }],
            },
        ],
    })
}

impl World {
    async fn new() -> TestResult<Self> {
        let mut pod = Pod::new(NAMES).await?;
        let alpha = pod.upstream(&[ALPHA_HOST], ALPHA_PORT, echoing())?;
        let beta = pod.upstream(&[BETA_HOST], BETA_PORT, Behaviour::default())?;
        // Its certificate also names the far side's address, for clients
        // that connect by IP (and so send no SNI).
        let far_ip = pod.far_ip(IpFamily::V4).to_string();
        let unbound = pod.upstream(
            &[UNBOUND_HOST, &far_ip],
            UNBOUND_PORT,
            Behaviour::echo_body(),
        )?;
        // A certificate for another name, from the CA the binding trusts:
        // trusted issuer, wrong name.
        let bad = pod.upstream(&["wrong.test"], BAD_PORT, Behaviour::default())?;
        let alpha_secret = secret_value("alpha");
        let beta_secret = secret_value("beta");
        pod.write_secret("secret/teams/alpha", "api_key", &alpha_secret)?;
        pod.write_secret("secret/teams/beta", "api_key", &beta_secret)?;
        pod.write_secret("secret/teams/gamma", "api_key", &secret_value("gamma"))?;
        let w = Self {
            pod,
            alpha,
            beta,
            unbound,
            bad,
            alpha_secret,
            alpha_ph: placeholder("sk-"),
            beta_ph: placeholder("sk-"),
            bad_ph: placeholder("sk-"),
        };
        w.pod.write_bindings(&bindings(&w))?;
        w.pod.write_placeholders(&json!({
            "alpha": w.alpha_ph, "beta": w.beta_ph, "gamma": w.bad_ph,
        }))?;
        Ok(w)
    }

    fn proxy_args(&self) -> Vec<String> {
        vec![
            "--extra-ca-file".into(),
            self.unbound.ca_file().unwrap().display().to_string(),
        ]
    }

    async fn start(&mut self, extra: &[&str]) -> TestResult {
        let mut args = self.proxy_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.pod.start(&refs).await
    }

    fn far(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.pod.far_ip(IpFamily::V4), port)
    }
}

/// A TLS connection from inside the pod (captured like an agent's), trusting
/// the pod CA, offering `alpn`.
async fn tls_from_pod(
    pod: &Pod,
    to: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> TestResult<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tcp_from_pod(pod, to)?;
    let ca_pem = std::fs::read_to_string(pod.path("trust/ca.crt"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in credbroker_sidecar::tls::parse_pem_certs(&ca_pem, "pod CA")? {
        roots.add(cert)?;
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(credbroker_sidecar::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned())?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?)
}

fn tcp_from_pod(pod: &Pod, to: SocketAddr) -> TestResult<tokio::net::TcpStream> {
    let std = pod.netns().connect_tcp(to, Duration::from_secs(5))?;
    std.set_nonblocking(true)?;
    Ok(tokio::net::TcpStream::from_std(std)?)
}

/// Sends raw bytes over TLS and returns what comes back until close (or 5 s).
async fn raw_exchange(pod: &Pod, to: SocketAddr, sni: &str, request: &[u8]) -> TestResult<String> {
    let mut tls = tls_from_pod(pod, to, sni, &[b"http/1.1"]).await?;
    tls.write_all(request).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    pod.saw(&text);
    Ok(text)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn a_placeholder_becomes_the_secret_toward_its_bound_host_over_http1_and_http2() -> TestResult
{
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let auth = bearer(&w.alpha_ph);
    let h1 = w
        .pod
        .curl_trusting(&["--http1.1", "-H", &auth, &alpha_url("/v1/chat")])
        .await?;
    assert_eq!(
        (h1.status, h1.body.as_str(), h1.version.as_str()),
        (200, "ok\n", "1.1"),
        "{h1:?}"
    );
    let h2 = w
        .pod
        .curl_trusting(&["--http2", "-H", &auth, &alpha_url("/v1/chat")])
        .await?;
    assert_eq!((h2.status, h2.version.as_str()), (200, "2"), "{h2:?}");

    // Basic auth (the password), the query and a JSON body, where allowed.
    let basic = w
        .pod
        .curl_trusting(&[
            "-u",
            &format!("bob:{}", w.alpha_ph),
            &alpha_url("/v1/basic"),
        ])
        .await?;
    assert_eq!(basic.status, 200, "{basic:?}");
    let query = w
        .pod
        .curl_trusting(&[&alpha_url(&format!("/v1/query?key={}&x=1", w.alpha_ph))])
        .await?;
    assert_eq!(query.status, 200, "{query:?}");
    let body = json!({"api_key": w.alpha_ph, "note": "hi"}).to_string();
    let json_body = w
        .pod
        .curl_trusting(&[
            "-H",
            "content-type: application/json",
            "--data",
            &body,
            &alpha_url("/v1/body"),
        ])
        .await?;
    assert_eq!(json_body.status, 200, "{json_body:?}");

    let requests = w.alpha.wait_for_requests(5, Duration::from_secs(5)).await?;
    let expected = format!("Bearer {}", w.alpha_secret);
    for r in &requests[..2] {
        assert_eq!(r.header("authorization"), Some(expected.as_str()));
        assert_eq!(r.header("accept-encoding"), Some("identity"));
        assert_eq!(r.path, "/v1/chat");
    }
    let basic_sent =
        base64::engine::general_purpose::STANDARD.encode(format!("bob:{}", w.alpha_secret));
    assert_eq!(
        requests[2].header("authorization"),
        Some(format!("Basic {basic_sent}").as_str())
    );
    assert_eq!(
        requests[3].path,
        format!("/v1/query?key={}&x=1", w.alpha_secret)
    );
    let sent: serde_json::Value = serde_json::from_slice(&requests[4].body)?;
    assert_eq!(sent["api_key"], w.alpha_secret.as_str());
    assert_eq!(
        requests[4].header("content-length"),
        Some(requests[4].body.len().to_string().as_str()),
        "the length is recomputed after the body swap"
    );
    // The agent never saw the value; the upstream never saw the placeholder.
    assert!(
        requests
            .iter()
            .all(|r| !format!("{:?}{}", r.headers, r.body_text()).contains(&w.alpha_ph))
    );

    let record = w
        .pod
        .wait_audit(|r| r["decision"] == "injected" && r["path"] == "/v1/chat")
        .await?;
    assert_eq!(record["bindings"], json!(["alpha"]));
    assert_eq!(record["destination"], format!("{ALPHA_HOST}:{ALPHA_PORT}"));
    assert_eq!(record["status"], 200);
    assert_eq!(record["pod"], "agent-0");
    // A HEAD (hyper drops its empty body unpolled) is a complete answer,
    // over either protocol (beta allows any method).
    for http in ["--http1.1", "--http2"] {
        let head = w
            .pod
            .curl_trusting(&[http, "-I", "-H", &bearer(&w.beta_ph), &beta_url("/head")])
            .await?;
        assert_eq!(head.status, 200, "{head:?}");
    }
    let head_record = w.pod.wait_audit(|r| r["path"] == "/head").await?;
    assert_eq!(head_record["decision"], "injected");
    assert!(head_record.get("detail").is_none(), "{head_record}");
    // A refused HEAD over HTTP/2 is a clean 403 (no body).
    let refused_head = w
        .pod
        .curl_trusting(&["--http2", "-I", "-H", &auth, &alpha_url("/v1/head")])
        .await?;
    assert_eq!(refused_head.status, 403, "{refused_head:?}");
    let query_record = w.pod.wait_audit(|r| r["path"] == "/v1/query").await?;
    assert!(
        !query_record.to_string().contains("key="),
        "the audit path has no query"
    );
    let metrics = w.pod.metrics()?;
    assert!(
        metrics.contains(
            r#"credbroker_sidecar_requests_total{binding="alpha",decision="injected",status="200"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("credbroker_sidecar_leaf_cache_mints_total 2"),
        "{metrics}"
    );
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn a_placeholder_toward_another_bound_host_or_a_disallowed_method_or_path_is_blocked()
-> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let auth = bearer(&w.alpha_ph);
    let cross = w
        .pod
        .curl_trusting(&["-H", &auth, &beta_url("/anything")])
        .await?;
    assert_eq!(cross.status, 403, "{cross:?}");
    let answer: serde_json::Value = serde_json::from_str(&cross.body)?;
    assert_eq!(answer["error"], "exfiltration_blocked");
    assert_eq!(answer["binding"], "alpha");
    assert_eq!(answer["reason"], "destination_not_bound");

    for (args, reason) in [
        (
            vec!["-X", "DELETE", "-H", &auth, &alpha_url("/v1/x")],
            "method_not_allowed",
        ),
        (vec!["-H", &auth, &alpha_url("/v2/x")], "path_not_allowed"),
        (
            vec!["-H", &auth, &alpha_url("/v1/../admin"), "--path-as-is"],
            "path_not_normalized",
        ),
    ] {
        let reply = w.pod.curl_trusting(&args).await?;
        assert_eq!(reply.status, 403, "{args:?}: {reply:?}");
        let answer: serde_json::Value = serde_json::from_str(&reply.body)?;
        assert_eq!(answer["reason"], reason, "{args:?}");
    }
    // beta's placeholder in a header beta allows, but on a surface it does
    // not: the body.
    let on_body = w
        .pod
        .curl_trusting(&["--data", &format!("k={}", w.beta_ph), &beta_url("/x")])
        .await?;
    assert_eq!(on_body.status, 403, "{on_body:?}");
    // A placeholder in a header name or the path is never swapped.
    let in_path = w
        .pod
        .curl_trusting(&[&alpha_url(&format!("/v1/{}", w.alpha_ph))])
        .await?;
    assert_eq!(in_path.status, 403, "{in_path:?}");
    assert!(in_path.body.contains("placeholder_in_path"));

    assert_eq!(
        w.beta.request_count(),
        0,
        "beta's upstream received a request"
    );
    assert_eq!(
        w.alpha.request_count(),
        0,
        "alpha's upstream received a request"
    );
    let record = w
        .pod
        .wait_audit(|r| r["decision"] == "exfiltration_blocked")
        .await?;
    assert_eq!(record["bindings"], json!(["alpha"]));
    let metrics = w.pod.metrics()?;
    assert!(
        metrics.contains(
            r#"credbroker_sidecar_blocked_total{binding="alpha",reason="destination_not_bound"}"#
        ),
        "{metrics}"
    );
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn a_placeholder_toward_an_unbound_host_leaves_as_a_placeholder_or_is_refused_in_deny_mode()
-> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let url = format!("https://{UNBOUND_HOST}:{UNBOUND_PORT}/echo");
    let reply = w
        .pod
        .curl_trusting(&["--data", &w.alpha_ph.clone(), &url])
        .await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.body, w.alpha_ph,
        "the unbound host got the placeholder, unchanged"
    );
    let requests = w
        .unbound
        .wait_for_requests(1, Duration::from_secs(5))
        .await?;
    assert_eq!(requests[0].body_text(), w.alpha_ph);

    w.pod.stop();
    w.start(&["--egress", "deny"]).await?;
    let refused = w
        .pod
        .curl_trusting(&["--data", &w.alpha_ph.clone(), &url])
        .await?;
    assert_eq!(refused.status, 0, "deny mode let it through: {refused:?}");
    assert_ne!(refused.exit, 0);
    // Bound hosts still work in deny mode.
    let bound = w
        .pod
        .curl_trusting(&["-H", &bearer(&w.alpha_ph), &alpha_url("/v1/x")])
        .await?;
    assert_eq!(bound.status, 200, "{bound:?}");
    assert_eq!(w.unbound.request_count(), 1);
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn an_authority_other_than_the_sni_gets_421_also_on_a_reused_http2_connection() -> TestResult
{
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let reply = w
        .pod
        .curl_trusting(&[
            "-H",
            &format!("Host: {BETA_HOST}:{BETA_PORT}"),
            "-H",
            &bearer(&w.beta_ph),
            &alpha_url("/v1/x"),
        ])
        .await?;
    assert_eq!(reply.status, 421, "{reply:?}");

    // One HTTP/2 connection, SNI = alpha's host: a first request for it,
    // then one whose :authority is beta's, carrying beta's placeholder.
    let tls = tls_from_pod(&w.pod, w.far(ALPHA_PORT), ALPHA_HOST, &[b"h2"]).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let first = hyper::Request::get(alpha_url("/v1/first"))
        .header("authorization", format!("Bearer {}", w.alpha_ph))
        .body(Empty::<Bytes>::new())?;
    assert_eq!(sender.send_request(first).await?.status(), 200);
    let second = hyper::Request::get(beta_url("/second"))
        .header("authorization", format!("Bearer {}", w.beta_ph))
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(second).await?;
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(
        w.beta.request_count(),
        0,
        "the misdirected request was forwarded"
    );
    // The sidecar dials what the SNI names, so a forwarded misdirected
    // request would have reached alpha: it must have seen only the first.
    w.alpha.wait_for_requests(1, Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        w.alpha.request_count(),
        1,
        "the misdirected request reached the upstream"
    );
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn an_unbound_tls_host_is_reached_untouched_with_its_own_certificate() -> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let url = format!("https://{UNBOUND_HOST}:{UNBOUND_PORT}/");
    // The combined bundle (system roots + pod CA + extra CAs) verifies it.
    let via_bundle = w.pod.curl_trusting(&[&url]).await?;
    assert_eq!(via_bundle.status, 200, "{via_bundle:?}");
    // Its own CA alone verifies it: the certificate is the upstream's own.
    let own = w.unbound.ca_file().unwrap().display().to_string();
    let via_own = w.pod.curl(&["--cacert", &own, &url]).await?;
    assert_eq!(via_own.status, 200, "{via_own:?}");
    // The pod CA alone does not: the sidecar did not terminate it.
    let pod_ca = w.pod.path("trust/ca.crt").display().to_string();
    let via_pod_ca = w.pod.curl(&["--cacert", &pod_ca, &url]).await?;
    assert_eq!(via_pod_ca.status, 0, "{via_pod_ca:?}");
    let requests = w
        .unbound
        .wait_for_requests(2, Duration::from_secs(5))
        .await?;
    assert_eq!(requests[0].connection.sni.as_deref(), Some(UNBOUND_HOST));
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn echoes_of_the_secret_abort_the_response_and_other_responses_stream() -> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let auth = bearer(&w.alpha_ph);
    let header_echo = w
        .pod
        .curl_trusting(&["-H", &auth, &alpha_url("/v1/echo/header")])
        .await?;
    assert_eq!(header_echo.status, 502, "{header_echo:?}");
    assert!(header_echo.body.contains("echo_blocked"), "{header_echo:?}");
    for path in [
        "/v1/echo/json",
        "/v1/echo/b64/0",
        "/v1/echo/b64/1",
        "/v1/echo/b64/2",
    ] {
        for http in ["--http1.1", "--http2"] {
            let reply = w
                .pod
                .curl_trusting(&[http, "-H", &auth, &alpha_url(path)])
                .await?;
            assert_ne!(
                reply.exit, 0,
                "{path} {http}: the echo was delivered: {reply:?}"
            );
        }
    }
    // Audit lines come from a writer thread: wait for all nine.
    let pod = &w.pod;
    eventually("nine echo_blocked records", || {
        pod.audit()
            .iter()
            .filter(|r| r["decision"] == "echo_blocked")
            .count()
            >= 9
    })
    .await?;
    let blocked: Vec<_> = w
        .pod
        .audit()
        .into_iter()
        .filter(|r| r["decision"] == "echo_blocked")
        .collect();
    assert_eq!(blocked.len(), 9, "{blocked:#?}");
    // Not the upstream's answer, whatever curl made of the cut.
    let not_inspectable = w
        .pod
        .curl_trusting(&["-H", &auth, &alpha_url("/v1/gzip")])
        .await?;
    assert_eq!(not_inspectable.status, 502, "{not_inspectable:?}");
    assert!(
        not_inspectable.body.contains("compressed_response"),
        "{not_inspectable:?}"
    );
    assert!(
        blocked
            .iter()
            .any(|r| r["reason"].as_str().unwrap().contains("base64@1"))
    );

    // A response with no echo streams: the first event arrives before the
    // upstream has even sent the second (3 s apart).
    let tls = tls_from_pod(&w.pod, w.far(ALPHA_PORT), ALPHA_HOST, &[b"http/1.1"]).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get("/v1/stream")
        .header("host", format!("{ALPHA_HOST}:{ALPHA_PORT}"))
        .header("authorization", format!("Bearer {}", w.alpha_ph))
        .body(Empty::<Bytes>::new())?;
    let started = Instant::now();
    let mut body = sender.send_request(request).await?.into_body();
    let first = body.frame().await.unwrap()?.into_data().unwrap();
    let first_at = started.elapsed();
    assert_eq!(first, "data: one\n\n");
    // (A margin of half a pause, for a loaded machine: a held-back first
    // event would wait the whole 3 s.)
    assert!(
        first_at < Duration::from_millis(1500),
        "the first event waited {first_at:?}"
    );
    let rest = body.collect().await?.to_bytes();
    assert_eq!(rest, "data: two\n\ndata: three\n\n");
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn smuggling_attempts_are_refused_and_never_reach_the_upstream() -> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let host = format!("Host: {ALPHA_HOST}:{ALPHA_PORT}");
    let auth = bearer(&w.alpha_ph);
    for (what, request) in [
        (
            "CL then TE",
            format!(
                "POST /v1/x HTTP/1.1\r\n{host}\r\n{auth}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "TE then CL",
            format!(
                "POST /v1/x HTTP/1.1\r\n{host}\r\n{auth}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "duplicate Host",
            format!("GET /v1/x HTTP/1.1\r\n{host}\r\n{host}\r\n{auth}\r\n\r\n"),
        ),
        (
            "obs-fold",
            format!("GET /v1/x HTTP/1.1\r\n{host}\r\nX-Folded: a\r\n b\r\n{auth}\r\n\r\n"),
        ),
    ] {
        let answer =
            raw_exchange(&w.pod, w.far(ALPHA_PORT), ALPHA_HOST, request.as_bytes()).await?;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer:?}");
    }
    // A clean request on the same kind of connection goes through.
    let clean = raw_exchange(
        &w.pod,
        w.far(ALPHA_PORT),
        ALPHA_HOST,
        format!("GET /v1/x HTTP/1.1\r\n{host}\r\n{auth}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    assert!(clean.starts_with("HTTP/1.1 200"), "{clean:?}");
    let requests = w.alpha.wait_for_requests(1, Duration::from_secs(5)).await?;
    assert_eq!(
        requests.len(),
        1,
        "a smuggling attempt reached the upstream: {requests:#?}"
    );
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn capture_is_complete_for_the_agent_and_skips_the_proxy_uid() -> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    // IPv6 TCP from the agent is captured like IPv4: the agent trusts only
    // the bundle, which does not hold alpha's CA, so only the sidecar can
    // have answered it, and the upstream got the secret.
    let v6 = w
        .pod
        .curl_trusting(&["-6", "-H", &bearer(&w.alpha_ph), &alpha_url("/v1/v6")])
        .await?;
    assert_eq!(v6.status, 200, "{v6:?}");
    let requests = w.alpha.wait_for_requests(1, Duration::from_secs(5)).await?;
    assert_eq!(
        requests[0].header("authorization"),
        Some(format!("Bearer {}", w.alpha_secret).as_str())
    );

    // The proxy UID is not captured: straight to the upstream, placeholder
    // and all.
    let own_ca = w.alpha.ca_file().unwrap().display().to_string();
    let direct = w
        .pod
        .curl_as(
            PROXY,
            &[
                "--cacert",
                &own_ca,
                "-H",
                &bearer(&w.alpha_ph),
                &alpha_url("/v1/direct"),
            ],
        )
        .await?;
    assert_eq!(direct.status, 200, "{direct:?}");
    let requests = w.alpha.wait_for_requests(2, Duration::from_secs(5)).await?;
    assert_eq!(
        requests[1].header("authorization"),
        Some(format!("Bearer {}", w.alpha_ph).as_str())
    );

    // UDP 443 is rejected, so QUIC falls back to TCP.
    let far = w.pod.far_ip(IpFamily::V4).to_string();
    let probe = w
        .pod
        .netns()
        .exec("/usr/bin/python3")
        .user(AGENT)
        .args([
            "-c",
            "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.connect((sys.argv[1],443))\ntry:\n s.send(b'q');s.recv(9);print('answered')\nexcept (ConnectionRefusedError,PermissionError):\n print('refused')\nexcept socket.timeout:\n print('timeout')",
            &far,
        ])
        .output_async()
        .await?;
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        "refused",
        "{probe:?}"
    );

    // A server-speaks-first service is reached through passthrough.
    let listener = w.pod.far().bind_tcp(SocketAddr::new(
        std::net::Ipv6Addr::UNSPECIFIED.into(),
        2525,
    ))?;
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            use std::io::Write;
            let _ = s.write_all(b"220 far.test ESMTP ready\r\n");
        }
    });
    let banner = w
        .pod
        .netns()
        .exec("/usr/bin/python3")
        .user(AGENT)
        .args([
            "-c",
            "import socket,sys\ns=socket.create_connection((sys.argv[1],2525),5)\ns.settimeout(5)\nprint(s.recv(100).decode().strip())",
            &far,
        ])
        .output_async()
        .await?;
    assert_eq!(
        String::from_utf8_lossy(&banner.stdout).trim(),
        "220 far.test ESMTP ready",
        "{banner:?}"
    );
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn an_upstream_with_an_invalid_certificate_fails_clearly_and_gets_no_secret() -> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let url = format!("https://{BAD_HOST}:{BAD_PORT}/");
    let reply = w
        .pod
        .curl_trusting(&["-H", &bearer(&w.bad_ph), &url])
        .await?;
    assert_eq!(reply.status, 502, "{reply:?}");
    let answer: serde_json::Value = serde_json::from_str(&reply.body)?;
    assert_eq!(answer["error"], "upstream_error");
    assert_eq!(answer["reason"], "tls");
    let detail = answer["detail"].as_str().unwrap();
    assert!(
        detail.contains(BAD_HOST) && detail.contains("certificate"),
        "{detail}"
    );
    assert_eq!(w.bad.request_count(), 0);
    assert!(
        w.bad
            .connection_errors()
            .iter()
            .any(|e| e.contains("TLS handshake")),
        "{:?}",
        w.bad.connection_errors()
    );
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn a_restart_keeps_the_pod_ca_and_reloads_add_bindings_keep_connections_and_survive_bad_files()
-> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let ca_before = std::fs::read_to_string(w.pod.path("trust/ca.crt"))?;
    let auth = bearer(&w.alpha_ph);
    w.pod.stop();
    w.start(&[]).await?;
    assert_eq!(
        std::fs::read_to_string(w.pod.path("trust/ca.crt"))?,
        ca_before,
        "a restart changed the pod CA"
    );
    let after_restart = w
        .pod
        .curl_trusting(&["-H", &auth, &alpha_url("/v1/after-restart")])
        .await?;
    assert_eq!(after_restart.status, 200, "{after_restart:?}");

    // An open HTTP/2 connection survives a reload that adds a binding.
    let tls = tls_from_pod(&w.pod, w.far(ALPHA_PORT), ALPHA_HOST, &[b"h2"]).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let request = |path: &str| {
        hyper::Request::get(alpha_url(path))
            .header("authorization", format!("Bearer {}", w.alpha_ph))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    assert_eq!(
        sender
            .send_request(request("/v1/before-reload"))
            .await?
            .status(),
        200
    );

    let delta = w
        .pod
        .upstream(&[DELTA_HOST], DELTA_PORT, Behaviour::default())?;
    let delta_secret = secret_value("delta");
    w.pod
        .write_secret("secret/teams/delta", "api_key", &delta_secret)?;
    let delta_ph = placeholder("dk-");
    let mut config = bindings(&w);
    config["bindings"].as_array_mut().unwrap().push(json!({
        "id": "delta",
        "secret": {"mount": "secret", "path": "teams/delta", "key": "api_key"},
        "destinations": [{"host": DELTA_HOST, "port": DELTA_PORT, "extraCaPem": delta.ca_pem().unwrap()}],
    }));
    w.pod.write_placeholders(&json!({
        "alpha": w.alpha_ph, "beta": w.beta_ph, "gamma": w.bad_ph, "delta": delta_ph,
    }))?;
    w.pod.write_bindings(&config)?;
    let delta_url = format!("https://{DELTA_HOST}:{DELTA_PORT}/d");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = w
            .pod
            .curl_trusting(&["-H", &bearer(&delta_ph), &delta_url])
            .await?;
        if reply.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new binding never worked: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = delta.wait_for_requests(1, Duration::from_secs(5)).await?;
    assert_eq!(
        got[0].header("authorization"),
        Some(format!("Bearer {delta_secret}").as_str())
    );
    assert_eq!(
        sender
            .send_request(request("/v1/after-reload"))
            .await?
            .status(),
        200,
        "the open connection was dropped"
    );

    // A broken bindings file keeps the previous config.
    std::fs::write(w.pod.path("config/bindings.v1.json"), "{ not json")?;
    let pod = &w.pod;
    eventually("the bad file is reported", || {
        pod.metrics()
            .map(|m| m.contains(r#"credbroker_sidecar_config_last_load_ok{part="bindings"} 0"#))
            .unwrap_or(false)
    })
    .await?;
    let still = w
        .pod
        .curl_trusting(&["-H", &auth, &alpha_url("/v1/still")])
        .await?;
    assert_eq!(still.status, 200, "{still:?}");
    assert!(
        w.pod
            .output()
            .contains("config change refused; keeping the previous config")
    );
    // Removed at runtime: no bindings, so nothing is intercepted any more
    // (the agent, trusting only the bundle, cannot verify alpha itself).
    w.pod.remove_bindings()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = w
            .pod
            .curl_trusting(&["-H", &auth, &alpha_url("/v1/gone")])
            .await?;
        if reply.status == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still intercepted after the bindings went: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn with_no_bindings_file_the_sidecar_is_ready_at_once_and_injects_nothing() -> TestResult {
    let mut pod = Pod::new(NAMES).await?;
    let alpha = pod.upstream(&[ALPHA_HOST], ALPHA_PORT, Behaviour::default())?;
    pod.start(&[]).await?;
    assert_eq!(pod.admin("/readyz")?.0, 200);
    let ph = placeholder("sk-");
    let own_ca = alpha.ca_file().unwrap().display().to_string();
    let reply = pod
        .curl(&["--cacert", &own_ca, "-H", &bearer(&ph), &alpha_url("/v1/x")])
        .await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = alpha.wait_for_requests(1, Duration::from_secs(5)).await?;
    assert_eq!(
        got[0].header("authorization"),
        Some(format!("Bearer {ph}").as_str())
    );
    pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn local_mode_gives_curl_proxy_the_same_results() -> TestResult {
    let mut w = World::new().await?;
    let config = w.pod.path("config/local.yaml");
    let local = json!({
        "formatVersion": 1,
        "bindings": bindings(&w)["bindings"],
        "placeholders": {"alpha": w.alpha_ph, "beta": w.beta_ph},
    });
    std::fs::write(&config, serde_yaml::to_string(&local)?)?;
    w.pod.start_local(&config, &[]).await?;
    let proxy = format!("http://127.0.0.1:{}", support::LOCAL_PORT);
    let auth = bearer(&w.alpha_ph);
    let injected = w
        .pod
        .curl_trusting(&["--proxy", &proxy, "-H", &auth, &alpha_url("/v1/local")])
        .await?;
    assert_eq!(injected.status, 200, "{injected:?}");
    let got = w.alpha.wait_for_requests(1, Duration::from_secs(5)).await?;
    assert_eq!(
        got[0].header("authorization"),
        Some(format!("Bearer {}", w.alpha_secret).as_str())
    );
    let cross = w
        .pod
        .curl_trusting(&["--proxy", &proxy, "-H", &auth, &beta_url("/x")])
        .await?;
    assert_eq!(cross.status, 403, "{cross:?}");
    assert_eq!(w.beta.request_count(), 0);
    // The same method and path limits as in a pod.
    for (args, reason) in [
        (vec!["-X", "DELETE"], "method_not_allowed"),
        (vec![], "path_not_allowed"),
    ] {
        let url = if reason == "path_not_allowed" {
            alpha_url("/v2/x")
        } else {
            alpha_url("/v1/x")
        };
        let mut all = vec!["--proxy", proxy.as_str(), "-H", auth.as_str()];
        all.extend(args);
        all.push(&url);
        let reply = w.pod.curl_trusting(&all).await?;
        assert_eq!(reply.status, 403, "{reason}: {reply:?}");
        assert!(reply.body.contains(reason), "{reply:?}");
    }
    // Over HTTP/2 inside the tunnel too.
    let h2 = w
        .pod
        .curl_trusting(&[
            "--http2",
            "--proxy",
            &proxy,
            "-H",
            &auth,
            &alpha_url("/v1/h2"),
        ])
        .await?;
    assert_eq!((h2.status, h2.version.as_str()), (200, "2"), "{h2:?}");
    // Echoes, every alignment.
    for path in [
        "/v1/echo/json",
        "/v1/echo/b64/0",
        "/v1/echo/b64/1",
        "/v1/echo/b64/2",
    ] {
        let echo = w
            .pod
            .curl_trusting(&["--proxy", &proxy, "-H", &auth, &alpha_url(path)])
            .await?;
        assert_ne!(echo.exit, 0, "{path}: {echo:?}");
    }
    let header_echo = w
        .pod
        .curl_trusting(&[
            "--proxy",
            &proxy,
            "-H",
            &auth,
            &alpha_url("/v1/echo/header"),
        ])
        .await?;
    assert_eq!(header_echo.status, 502, "{header_echo:?}");
    // Cleartext to a host whose binding does not allow it: refused.
    let cleartext = w
        .pod
        .curl(&[
            "--proxy",
            &proxy,
            "-H",
            &auth,
            &format!("http://{ALPHA_HOST}:{ALPHA_PORT}/v1/x"),
        ])
        .await?;
    assert_eq!(cleartext.status, 403, "{cleartext:?}");
    assert!(
        cleartext.body.contains("cleartext_not_allowed"),
        "{cleartext:?}"
    );
    // Not a proxy request at all.
    let direct = w
        .pod
        .curl(&[&format!("http://127.0.0.1:{}/", support::LOCAL_PORT)])
        .await?;
    assert_eq!(direct.status, 400, "{direct:?}");
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn bad_input_leaves_the_sidecar_up_serving_others_and_bounded() -> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let to = w.far(ALPHA_PORT);
    // A real ClientHello for alpha's host, to cut up.
    let hello = {
        let config =
            rustls::ClientConfig::builder_with_provider(credbroker_sidecar::tls::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            rustls::pki_types::ServerName::try_from(ALPHA_HOST)?,
        )?;
        let mut out = Vec::new();
        conn.write_tls(&mut out)?;
        out
    };
    // Truncated, garbage, and trickled ClientHellos.
    let mut truncated = tcp_from_pod(&w.pod, to)?;
    truncated.write_all(&hello[..hello.len() / 2]).await?;
    drop(truncated);
    let mut garbage = tcp_from_pod(&w.pod, to)?;
    garbage
        .write_all(b"\x16\x03\x01\xff\xff\x01garbage garbage garbage")
        .await?;
    let mut slow = tcp_from_pod(&w.pod, to)?;
    let trickle = tokio::spawn(async move {
        for b in hello.iter().take(30) {
            if slow.write_all(std::slice::from_ref(b)).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slow
    });
    // Headers over the limit: 431.
    let big = format!("X-Big: {}", "a".repeat(70 * 1024));
    let too_big = w
        .pod
        .curl_trusting(&["--http1.1", "-H", &big, &alpha_url("/v1/x")])
        .await?;
    assert_eq!(
        too_big.status,
        431,
        "{:?}",
        (too_big.status, &too_big.stderr)
    );

    // 1,000 idle connections at once.
    let rss_before = w.pod.sidecar_rss_kib()?;
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(tcp_from_pod(&w.pod, to)?);
    }
    let pod = &w.pod;
    eventually("the sidecar holds 1,000 connections", || {
        pod.metrics()
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("credbroker_sidecar_open_connections "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .is_some_and(|n| n >= 1000.0)
    })
    .await?;
    let rss_loaded = w.pod.sidecar_rss_kib()?;
    // Others are still served.
    let served = w
        .pod
        .curl_trusting(&["-H", &bearer(&w.alpha_ph), &alpha_url("/v1/while-busy")])
        .await?;
    assert_eq!(served.status, 200, "{served:?}");
    eprintln!("sidecar RSS: {rss_before} KiB before, {rss_loaded} KiB with 1,000 idle connections");
    assert!(
        rss_loaded < 96 * 1024,
        "the sidecar grew to {rss_loaded} KiB with 1,000 idle connections"
    );
    drop(idle);
    drop(trickle.await?);
    drop(garbage);
    w.pod.sidecar().check_running()?;
    let after = w
        .pod
        .curl_trusting(&["-H", &bearer(&w.alpha_ph), &alpha_url("/v1/after")])
        .await?;
    assert_eq!(after.status, 200, "{after:?}");
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn cleartext_is_injected_only_where_allowed_and_a_placeholder_in_other_cleartext_is_blocked()
-> TestResult {
    const PLAIN_HOST: &str = "plain.bound.test";
    let mut pod = Pod::new(&[PLAIN_HOST, UNBOUND_HOST]).await?;
    let plain = pod.http_upstream(8080, Behaviour::default())?;
    let other = pod.http_upstream(8081, Behaviour::default())?;
    let secret = secret_value("plain");
    pod.write_secret("secret/plain", "token", &secret)?;
    let ph = placeholder("pt-");
    pod.write_bindings(&json!({"formatVersion": 1, "bindings": [{
        "id": "plain",
        "secret": {"mount": "secret", "path": "plain", "key": "token"},
        "destinations": [
            {"host": PLAIN_HOST, "port": 8080, "allowCleartext": true},
            {"host": "*.wild.bound.test", "port": 8080, "allowCleartext": true},
        ],
    }]}))?;
    pod.write_placeholders(&json!({"plain": ph}))?;
    pod.start(&[]).await?;

    // A Host crafted to name a bound wildcard here and another address to
    // the next parser (the far side's IPv4 as a decimal number, port 9999):
    // refused, and the "attacker" never hears from the sidecar.
    let attacker = pod.far().bind_tcp(SocketAddr::new(
        std::net::Ipv6Addr::UNSPECIFIED.into(),
        9999,
    ))?;
    attacker.set_nonblocking(true)?;
    let far_v4 = match pod.far_ip(IpFamily::V4) {
        std::net::IpAddr::V4(v4) => u32::from(v4),
        std::net::IpAddr::V6(_) => unreachable!("the far side's IPv4"),
    };
    for host in [
        format!("{far_v4}:9999/x.wild.bound.test:8080"),
        format!("{far_v4}:9999?x.wild.bound.test:8080"),
    ] {
        let crafted = pod
            .curl(&[
                "-H",
                &format!("Host: {host}"),
                "-H",
                &format!("x-token: {ph}"),
                &format!("http://{}:8080/p", pod.far_ip(IpFamily::V4)),
            ])
            .await?;
        assert_eq!(crafted.status, 400, "{host}: {crafted:?}");
    }
    assert!(
        attacker.accept().is_err(),
        "the sidecar connected to the address hidden in the Host"
    );

    let ok = pod
        .curl(&[
            "-H",
            &format!("x-token: {ph}"),
            &format!("http://{PLAIN_HOST}:8080/p"),
        ])
        .await?;
    assert_eq!(ok.status, 200, "{ok:?}");
    let got = plain.wait_for_requests(1, Duration::from_secs(5)).await?;
    assert_eq!(got[0].header("x-token"), Some(secret.as_str()));

    // Cleartext HTTP to an unbound host: forwarded where the agent was
    // going, without a placeholder; with one, blocked.
    let far = pod.far_ip(IpFamily::V4);
    let plain_url = format!("http://{far}:8081/q");
    let fine = pod.curl(&[&plain_url]).await?;
    assert_eq!(fine.status, 200, "{fine:?}");
    let blocked = pod
        .curl(&["-H", &format!("x-token: {ph}"), &plain_url])
        .await?;
    assert_eq!(blocked.status, 403, "{blocked:?}");
    assert_eq!(
        other.request_count(),
        1,
        "the placeholder reached an unbound host"
    );

    // A cleartext stream that is not HTTP: cut off at the placeholder.
    let listener = pod.far().bind_tcp(SocketAddr::new(
        std::net::Ipv6Addr::UNSPECIFIED.into(),
        2626,
    ))?;
    let received = std::thread::spawn(move || {
        let mut got = Vec::new();
        if let Ok((mut s, _)) = listener.accept() {
            use std::io::Read;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let _ = s.read_to_end(&mut got);
        }
        got
    });
    let sent = pod
        .netns()
        .exec("/usr/bin/python3")
        .user(AGENT)
        .args([
            "-c",
            "import socket,sys,time\ns=socket.create_connection((sys.argv[1],2626),5)\ns.sendall(b'HELO x\\r\\n')\ntime.sleep(0.3)\ns.sendall(b'AUTH '+sys.argv[2].encode()+b'\\r\\n')\ntime.sleep(1)",
            &far.to_string(),
            &ph,
        ])
        .output_async()
        .await?;
    assert!(sent.status.success(), "{sent:?}");
    let got = String::from_utf8_lossy(&received.join().unwrap()).into_owned();
    assert!(got.starts_with("HELO x"), "{got:?}");
    assert!(
        !got.contains(&ph),
        "the placeholder left in cleartext: {got:?}"
    );
    pod.wait_audit(|r| {
        r["decision"] == "exfiltration_blocked" && r["destination"] == format!("{far}:2626")
    })
    .await?;
    pod.assert_no_secret_leaked()
}

/// A TLS server that accepts one WebSocket-style upgrade: it records the
/// request head, answers 101, then echoes every byte it gets.
async fn websocket_upstream(
    pod: &Pod,
    port: u16,
    name: &str,
) -> TestResult<(String, tokio::task::JoinHandle<String>)> {
    let ca = credbroker_test_support::pki::TestCa::new("websocket upstream CA")?;
    let leaf = ca.issue_server(&[name])?;
    let config = rustls::ServerConfig::builder_with_provider(credbroker_sidecar::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.cert_der],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf.key_der.into()),
        )?;
    let listener = pod.far().bind_tcp(SocketAddr::new(
        std::net::Ipv6Addr::UNSPECIFIED.into(),
        port,
    ))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tls.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        tls.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await
            .unwrap();
        let head = String::from_utf8_lossy(&head).into_owned();
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("authorization: Bearer "))
            .unwrap_or("")
            .trim()
            .to_owned();
        let mut buf = [0u8; 1024];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // On request, a server frame that carries the key back.
                    let reply = if buf[..n].ends_with(b"echo-the-key") {
                        format!("\u{81}you sent {key}").into_bytes()
                    } else {
                        buf[..n].to_vec()
                    };
                    if tls.write_all(&reply).await.is_err() {
                        break;
                    }
                }
            }
        }
        head
    });
    Ok((ca.cert_pem().to_owned(), task))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn a_websocket_upgrade_gets_the_secret_in_its_handshake_and_frames_pass_untouched()
-> TestResult {
    const WS_HOST: &str = "ws.bound.test";
    let mut pod = Pod::new(&[WS_HOST]).await?;
    let (ca_pem, upstream) = websocket_upstream(&pod, 7443, WS_HOST).await?;
    let secret = secret_value("ws");
    pod.write_secret("secret/ws", "token", &secret)?;
    let ph = placeholder("ws-");
    pod.write_bindings(&json!({"formatVersion": 1, "bindings": [{
        "id": "ws",
        "secret": {"mount": "secret", "path": "ws", "key": "token"},
        "destinations": [{"host": WS_HOST, "port": 7443, "extraCaPem": ca_pem}],
    }]}))?;
    pod.write_placeholders(&json!({"ws": ph}))?;
    pod.start(&[]).await?;
    let to = SocketAddr::new(pod.far_ip(IpFamily::V4), 7443);
    let mut tls = tls_from_pod(&pod, to, WS_HOST, &[b"http/1.1"]).await?;
    let request = format!(
        "GET /socket HTTP/1.1\r\nHost: {WS_HOST}:7443\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {ph}\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Frames (here: raw bytes) pass untouched both ways, placeholder and all.
    let frame = format!("\u{81}frame with {ph}");
    tls.write_all(frame.as_bytes()).await?;
    let mut back = vec![0u8; frame.len()];
    tls.read_exact(&mut back).await?;
    assert_eq!(back, frame.as_bytes());
    // A server frame carrying the secret closes the tunnel before it
    // reaches the agent.
    tls.write_all(b"\x81echo-the-key").await?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(
        !String::from_utf8_lossy(&rest).contains(&secret),
        "the echoed secret reached the agent"
    );
    pod.saw(&String::from_utf8_lossy(&rest));
    pod.wait_audit(|r| r["decision"] == "echo_blocked" && r["path"] == "/socket")
        .await?;
    drop(tls);
    let seen = tokio::time::timeout(Duration::from_secs(10), upstream).await??;
    assert!(
        seen.contains(&format!("authorization: Bearer {secret}")),
        "{seen}"
    );
    assert!(
        seen.to_ascii_lowercase().contains("upgrade: websocket"),
        "{seen}"
    );
    pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn sigterm_drains_open_requests_and_the_process_is_hardened() -> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    let pid = w.pod.sidecar().pid();
    // PR_SET_DUMPABLE=0: the kernel hands the process's /proc files to root,
    // so another process of the proxy UID cannot read its memory or environ.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/{pid}/environ"))?;
    assert_eq!(
        meta.uid(),
        0,
        "/proc/{pid}/environ belongs to uid {}",
        meta.uid()
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert!(
        core.split_whitespace().skip(4).take(2).all(|v| v == "0"),
        "{core}"
    );

    // A streaming response in flight when SIGTERM arrives completes.
    let tls = tls_from_pod(&w.pod, w.far(ALPHA_PORT), ALPHA_HOST, &[b"h2"]).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(alpha_url("/v1/stream"))
        .header("authorization", format!("Bearer {}", w.alpha_ph))
        .body(Empty::<Bytes>::new())?;
    let mut body = sender.send_request(request).await?.into_body();
    let first = body.frame().await.unwrap()?.into_data().unwrap();
    assert_eq!(first, "data: one\n\n");
    w.pod.sidecar().signal(nix::sys::signal::Signal::SIGTERM)?;
    let rest = body.collect().await?.to_bytes();
    assert_eq!(
        rest, "data: two\n\ndata: three\n\n",
        "the in-flight response was cut"
    );
    let pod = &w.pod;
    eventually("the sidecar exits after draining", || {
        pod.sidecar().check_running().is_err()
    })
    .await?;
    assert!(
        w.pod
            .output()
            .contains("shutting down: draining open connections")
    );
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn tls_without_sni_is_spliced_or_refused_and_http2_headers_have_limits() -> TestResult {
    let mut w = World::new().await?;
    w.start(&[]).await?;
    // By IP: no SNI, so never terminated; the upstream's own certificate
    // (which names the IP) verifies.
    let far = w.pod.far_ip(IpFamily::V4);
    let own = w.unbound.ca_file().unwrap().display().to_string();
    let by_ip = format!("https://{far}:{UNBOUND_PORT}/");
    let spliced = w.pod.curl(&["--cacert", &own, &by_ip]).await?;
    assert_eq!(spliced.status, 200, "{spliced:?}");
    // Headers over the limit on HTTP/2 are refused too.
    let big = format!("X-Big: {}", "a".repeat(70 * 1024));
    let too_big = w
        .pod
        .curl_trusting(&["--http2", "-H", &big, &alpha_url("/v1/x")])
        .await?;
    assert_ne!(
        too_big.status,
        200,
        "{:?}",
        (too_big.status, &too_big.stderr)
    );
    assert!(
        w.alpha.requests().iter().all(|r| r.path != "/v1/x"),
        "the oversized request was forwarded"
    );

    w.pod.stop();
    w.start(&["--egress", "deny"]).await?;
    let refused = w.pod.curl(&["--cacert", &own, &by_ip]).await?;
    assert_eq!(refused.status, 0, "{refused:?}");
    w.pod
        .wait_audit(|r| r["decision"] == "refused" && r["reason"] == "egress_deny")
        .await?;
    w.pod.assert_no_secret_leaked()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, network namespaces, iptables, dnsmasq and curl"]
async fn strict_destination_refuses_an_address_the_name_does_not_have() -> TestResult {
    const STRICT_HOST: &str = "strict.bound.test";
    // The name has only the far side's IPv6 address.
    let mut pod = Pod::with_records(&[], &[(STRICT_HOST, |_v4, v6| vec![v6])]).await?;
    let upstream = pod.upstream(&[STRICT_HOST], 8443, Behaviour::default())?;
    let secret = secret_value("strict");
    pod.write_secret("secret/strict", "token", &secret)?;
    let ph = placeholder("st-");
    pod.write_bindings(&json!({"formatVersion": 1, "bindings": [{
        "id": "strict",
        "secret": {"mount": "secret", "path": "strict", "key": "token"},
        "destinations": [{"host": STRICT_HOST, "port": 8443, "extraCaPem": upstream.ca_pem().unwrap()}],
    }]}))?;
    pod.write_placeholders(&json!({"strict": ph}))?;
    pod.start(&["--strict-destination"]).await?;
    let url = format!("https://{STRICT_HOST}:8443/s");
    // The agent connects to an address the name does not have (the far
    // side's IPv4), naming it in SNI: refused.
    let far_v4 = pod.far_ip(IpFamily::V4);
    let pinned = format!("{STRICT_HOST}:8443:{far_v4}");
    let foreign = pod
        .curl_trusting(&["--resolve", &pinned, "-H", &bearer(&ph), &url])
        .await?;
    assert_eq!(foreign.status, 0, "{foreign:?}");
    pod.wait_audit(|r| r["decision"] == "refused" && r["reason"] == "strict_destination")
        .await?;
    // Through its real address: injected.
    let real = pod.curl_trusting(&["-H", &bearer(&ph), &url]).await?;
    assert_eq!(real.status, 200, "{real:?}");
    let got = upstream
        .wait_for_requests(1, Duration::from_secs(5))
        .await?;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].header("authorization"),
        Some(format!("Bearer {secret}").as_str())
    );
    pod.assert_no_secret_leaked()
}
