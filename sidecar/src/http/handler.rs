//! One intercepted request, end to end: the framing guard's verdict, the
//! [`plan`](super::plan), the body, the upstream call, the response's
//! echo checks, metrics, and one audit record.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{OnEnd, RequestBodyOutcome, ToAgent, ToUpstream, check_headers};
use super::guard::{Verdict, Verdicts};
use super::plan::{BodyPlan, Conn, Plan, Refusal, Route, plan, strip_hop_by_hop};
use super::{ConnInfo, RespBody, json_response};
use crate::audit::AuditRecord;
use crate::echo::EchoFound;
use crate::engine::{Engine, Lookup, Snapshot};
use crate::metrics::BindingLabel;
use crate::upstream::{BoxError, OutBody, upstream_error};

/// Handles one request of a connection.
pub async fn handle(
    engine: Arc<Engine>,
    info: Arc<ConnInfo>,
    verdicts: Option<Verdicts>,
    mut request: Request<Incoming>,
) -> Response<RespBody> {
    let start = Instant::now();
    let snapshot = engine.snapshot();
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let destination_guess = info.describe();

    if let Some(verdicts) = &verdicts {
        let refused = match verdicts.next() {
            Verdict::Ok => None,
            Verdict::Refused(why) => Some(why),
            Verdict::Unverified => Some("the request's framing could not be verified"),
        };
        if let Some(why) = refused {
            let refusal = Refusal {
                status: StatusCode::BAD_REQUEST,
                decision: "bad_request",
                reason: why.to_owned(),
                binding: None,
                destination: destination_guess,
            };
            let mut response = refuse(&engine, &snapshot, &refusal, &method, &path, start);
            // The framing of what follows cannot be trusted either.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    }

    // The agent's side of a WebSocket upgrade, taken before the head is
    // split off (hyper keeps it in the request).
    let agent_upgrade = looks_like_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    let body_empty = http_body::Body::is_end_stream(&body);
    let conn = Conn {
        sni: info.sni.as_deref(),
        port: info.port,
        original: info.original,
        tunnel_host: info.tunnel_host.as_deref(),
        proxy_form: info.proxy_form,
        egress: engine.settings.egress,
    };
    let plan = match plan(&mut parts, body_empty, &conn, &snapshot) {
        Ok(plan) => plan,
        Err(mut refusal) => {
            if refusal.destination.is_empty() {
                refusal.destination = destination_guess;
            }
            return refuse(&engine, &snapshot, &refusal, &method, &path, start);
        }
    };

    let outcome = Arc::new(RequestBodyOutcome::default());
    let out_body = match request_body(&engine, &snapshot, &plan, &mut parts, body, &outcome).await {
        Ok(body) => body,
        Err(refusal) => return refuse(&engine, &snapshot, &refusal, &method, &path, start),
    };

    parts.uri = match upstream_uri(&plan.route, &parts.uri) {
        Ok(uri) => uri,
        Err(refusal) => return refuse(&engine, &snapshot, &refusal, &method, &path, start),
    };
    if !matches!(plan.route, Route::Original(_)) {
        // The client writes it from the URI (HTTP/1.1) or sends :authority.
        parts.headers.remove(header::HOST);
    }
    parts.version = Version::HTTP_11;
    let upstream_request = Request::from_parts(parts, out_body);
    let client = snapshot.upstreams.client(plan.upgrade);
    let answer = tokio::time::timeout(
        engine.settings.response_timeout,
        client.request(upstream_request),
    )
    .await;

    let refusal_at = |status, decision, reason: String| Refusal {
        status,
        decision,
        reason,
        binding: None,
        destination: plan.destination.clone(),
    };
    if let Some((binding, reason)) = outcome.blocked() {
        let refusal = Refusal {
            binding: Some(binding),
            ..refusal_at(
                StatusCode::FORBIDDEN,
                "exfiltration_blocked",
                reason.to_owned(),
            )
        };
        return refuse(&engine, &snapshot, &refusal, &method, &path, start);
    }
    let mut response = match answer {
        Err(_) => {
            let refusal = refusal_at(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                format!(
                    "upstream {} did not answer within {:?}",
                    plan.destination, engine.settings.response_timeout
                ),
            );
            return refuse(&engine, &snapshot, &refusal, &method, &path, start);
        }
        Ok(Err(e)) => {
            let reason = match upstream_error(&e) {
                Some(ours) => ours.message.clone(),
                None => format!(
                    "upstream {}: {}",
                    plan.destination,
                    describe_client_error(&e)
                ),
            };
            let refusal = refusal_at(StatusCode::BAD_GATEWAY, "upstream_error", reason);
            return refuse(&engine, &snapshot, &refusal, &method, &path, start);
        }
        Ok(Ok(response)) => response,
    };

    let mut swapped = plan.injected.clone();
    swapped.union_with(&outcome.swapped());
    let upstream_status = response.status();
    // hyper keeps an HTTP/1.1 reason phrase that is not the standard one and
    // writes it back out to the agent: a line the echo checks never see.
    response
        .extensions_mut()
        .remove::<hyper::ext::ReasonPhrase>();
    if matches!(upstream_status.as_u16(), 401 | 403) && !swapped.is_empty() {
        // The value may have been rotated: look now rather than at the
        // next poll.
        for b in swapped.iter() {
            if let Some(id) = snapshot.bindings.get(b).map(|b| b.id.as_str()) {
                engine.store().refresh_now(id);
            }
        }
    }

    if !swapped.is_empty() && upstream_status == StatusCode::PARTIAL_CONTENT {
        // Range was dropped from the request; slices of a response that
        // carries a secret back could each be shorter than an echo needle.
        let refusal = refusal_at(
            StatusCode::BAD_GATEWAY,
            "not_inspectable",
            format!(
                "upstream {} answered a request that carried a secret with a partial response (206)",
                plan.destination
            ),
        );
        return refuse(&engine, &snapshot, &refusal, &method, &path, start);
    }
    if plan.bound
        && let Err(refusal) = inspect_response_head(&snapshot, &response, &plan)
    {
        return refuse(&engine, &snapshot, &refusal, &method, &path, start);
    }
    let upgrade = plan.upgrade && upstream_status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), upgrade);
    if upgrade && let Some(verdicts) = &verdicts {
        // From here the connection carries frames, not requests.
        verdicts.upgraded();
    }
    if upgrade && let Some(agent_side) = agent_upgrade {
        let upstream_side = hyper::upgrade::on(&mut response);
        let echo = plan.bound.then(|| snapshot.echo.clone());
        let (engine, snapshot, destination) =
            (engine.clone(), snapshot.clone(), plan.destination.clone());
        let (method, path) = (method.clone(), path.clone());
        tokio::spawn(async move {
            let end = crate::splice::tunnel_upgrades(
                agent_side,
                upstream_side,
                engine.settings.idle_timeout,
                echo,
            )
            .await;
            if let crate::splice::SpliceEnd::Echo(found) = end {
                let id = snapshot
                    .echo
                    .binding_id(found.binding)
                    .unwrap_or("?")
                    .to_owned();
                engine
                    .metrics
                    .blocked(&BindingLabel(Arc::from(id.as_str())), "echo_blocked");
                let mut record = AuditRecord::new(destination, &method, &path);
                record.decision = "echo_blocked";
                record.reason = Some(format!(
                    "the secret of binding {id} came back in a WebSocket frame ({}); the tunnel was closed",
                    found.encoding
                ));
                record.bindings = vec![Arc::from(id.as_str())];
                engine.audit.record(record);
            }
        });
    }

    let decision = if swapped.is_empty() {
        "forwarded"
    } else {
        "injected"
    };
    let mut record = AuditRecord::new(plan.destination.clone(), &method, &path);
    record.bindings = swapped
        .iter()
        .filter_map(|b| snapshot.bindings.get(b).map(|b| Arc::from(b.id.as_str())))
        .collect();
    record.decision = decision;
    record.status = Some(upstream_status.as_u16());
    record.upstream_status = Some(upstream_status.as_u16());
    let label = swapped
        .iter()
        .next()
        .map(|b| snapshot.label(b))
        .unwrap_or_else(BindingLabel::none);
    let elapsed = start.elapsed();
    engine.metrics.request(
        &label,
        decision,
        upstream_status.as_u16(),
        elapsed.as_secs_f64(),
    );
    record.latency_ms = elapsed.as_secs_f64() * 1000.0;

    let on_end = Box::new(Finish {
        engine: engine.clone(),
        snapshot: snapshot.clone(),
        record: Some(record),
    });
    let detector = plan.bound.then(|| snapshot.echo.clone());
    response.map(|body| {
        ToAgent::new(body, detector, on_end, engine.settings.idle_timeout).boxed_unsync()
    })
}

fn looks_like_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11 && request.headers().contains_key(header::UPGRADE)
}

/// Builds the body sent upstream, following the plan.
async fn request_body(
    engine: &Engine,
    snapshot: &Arc<Snapshot>,
    plan: &Plan,
    parts: &mut http::request::Parts,
    body: Incoming,
    outcome: &Arc<RequestBodyOutcome>,
) -> Result<OutBody, Refusal> {
    let idle = engine.settings.idle_timeout;
    let set = snapshot.placeholders.clone();
    match &plan.body {
        BodyPlan::Untouched => Ok(body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
        BodyPlan::Detect => {
            Ok(ToUpstream::detecting(body, set, outcome.clone(), idle).boxed_unsync())
        }
        BodyPlan::Replace { allowed, form } => {
            let lookup = Lookup {
                snapshot: snapshot.clone(),
                allowed: allowed.clone(),
                form: *form,
            };
            let swapping = ToUpstream::swapping(body, set, lookup, outcome.clone(), idle);
            let length = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let max = engine.settings.max_buffered_body;
            match length {
                Some(len) if len <= max as u64 => {
                    // Small enough to send with its true length: some
                    // upstreams refuse chunked requests.
                    let whole = Limited::new(swapping, max.saturating_add(max / 2))
                        .collect()
                        .await
                        .map_err(|e| match outcome.blocked() {
                            Some((binding, reason)) => Refusal {
                                status: StatusCode::FORBIDDEN,
                                decision: "exfiltration_blocked",
                                reason: reason.to_owned(),
                                binding: Some(binding),
                                destination: plan.destination.clone(),
                            },
                            None => Refusal {
                                status: StatusCode::BAD_REQUEST,
                                decision: "bad_request",
                                reason: format!("reading the request body: {e}"),
                                binding: None,
                                destination: plan.destination.clone(),
                            },
                        })?
                        .to_bytes();
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
                    Ok(Full::new(whole).map_err(|e| match e {}).boxed_unsync())
                }
                _ => {
                    // Streamed, chunked: the length after the swap is not
                    // known up front.
                    parts.headers.remove(header::CONTENT_LENGTH);
                    Ok(swapping.boxed_unsync())
                }
            }
        }
    }
}

/// The URI the upstream is asked for, built from the decided host and port
/// and checked to name exactly them: whatever parses this URI next (the
/// pool, the connector) must dial the host that was decided on.
fn upstream_uri(route: &Route, original: &Uri) -> Result<Uri, Refusal> {
    let refuse = || Refusal {
        status: StatusCode::BAD_REQUEST,
        decision: "bad_request",
        reason: "the request target cannot be forwarded".into(),
        binding: None,
        destination: String::new(),
    };
    let path_and_query = original
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let (scheme, host, port, default) = match route {
        Route::Named {
            tls: true,
            host,
            port,
        } => ("https", host.clone(), *port, 443),
        Route::Named {
            tls: false,
            host,
            port,
        } => ("http", host.clone(), *port, 80),
        Route::Original(addr) => ("http", addr.ip().to_string(), addr.port(), 0),
    };
    // Only an IPv6 address is bracketed; a "host" with ':' in it is not one.
    let bracketed = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(_)) => format!("[{host}]"),
        Ok(_) => host.clone(),
        Err(_) if credbroker_crds::validate::is_dns_name(&host) => host.clone(),
        Err(_) => return Err(refuse()),
    };
    let text = if port == default {
        bracketed
    } else {
        format!("{bracketed}:{port}")
    };
    let authority =
        http::uri::Authority::from_maybe_shared(bytes::Bytes::from(text)).map_err(|_| refuse())?;
    let named = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if !named.eq_ignore_ascii_case(&host) || authority.port_u16().unwrap_or(default) != port {
        return Err(refuse());
    }
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| refuse())
}

/// The echo and encoding checks on a bound upstream's response head.
fn inspect_response_head(
    snapshot: &Snapshot,
    response: &Response<Incoming>,
    plan: &Plan,
) -> Result<(), Refusal> {
    let detector = &snapshot.echo;
    if detector.is_empty() {
        return Ok(());
    }
    if let Err(found) = check_headers(detector, response.headers()) {
        return Err(echo_refusal(
            snapshot,
            found,
            &plan.destination,
            "in the response headers",
        ));
    }
    let headers = response.headers();
    let compressed = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        // hyper decodes only the chunked transfer coding; any other (gzip,
        // chunked) would reach the echo checks still compressed.
        || headers.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
            v.to_str().map_or(true, |s| {
                s.split(',').any(|c| !c.trim().eq_ignore_ascii_case("chunked"))
            })
        });
    if compressed {
        return Err(Refusal {
            status: StatusCode::BAD_GATEWAY,
            decision: "not_inspectable",
            reason: format!(
                "upstream {} answered with a compressed body although identity encoding was asked \
                 for; it cannot be checked for echoed secrets, so it is refused",
                plan.destination
            ),
            binding: None,
            destination: plan.destination.clone(),
        });
    }
    Ok(())
}

fn echo_refusal(snapshot: &Snapshot, found: EchoFound, destination: &str, place: &str) -> Refusal {
    let id = snapshot
        .echo
        .binding_id(found.binding)
        .unwrap_or("?")
        .to_owned();
    Refusal {
        status: StatusCode::BAD_GATEWAY,
        decision: "echo_blocked",
        reason: format!(
            "the upstream sent the secret of binding {id} back {place} ({}); the response was refused",
            found.encoding
        ),
        binding: snapshot.bindings.iter().position(|b| b.id == id),
        destination: destination.to_owned(),
    }
}

/// hyper's client errors, without anything a body could have put there.
///
/// Only fixed categories, never a library error's text: that text can carry
/// what the upstream sent (an HTTP/2 GOAWAY's debug data is printed
/// verbatim), and an upstream may send a secret back that way.
fn describe_client_error(e: &hyper_util::client::legacy::Error) -> &'static str {
    if e.is_connect() {
        return "could not connect";
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return if h.is_timeout() {
                "timed out"
            } else if h.is_incomplete_message() {
                "the connection closed before the response was complete"
            } else if h.is_parse() || h.is_parse_status() {
                "the response was malformed"
            } else if h.is_canceled() || h.is_closed() {
                "the connection was closed"
            } else {
                "the exchange failed (the upstream broke or reset it)"
            };
        }
        source = s.source();
    }
    "the exchange failed"
}

/// Answers a refusal: a JSON body naming the decision, the reason and the
/// binding; metrics; an audit record.
fn refuse(
    engine: &Engine,
    snapshot: &Snapshot,
    refusal: &Refusal,
    method: &str,
    path: &str,
    start: Instant,
) -> Response<RespBody> {
    // A backstop: a reason is built from our own words, hosts and paths, but
    // nothing that holds a secret may reach the agent, a log or the audit.
    let withheld;
    let refusal = if snapshot.echo.check(refusal.reason.as_bytes()).is_err()
        || snapshot.echo.check(refusal.destination.as_bytes()).is_err()
    {
        withheld = Refusal {
            reason: "(withheld: it held a secret)".into(),
            destination: "(withheld)".into(),
            ..refusal.clone()
        };
        &withheld
    } else {
        refusal
    };
    let binding_id = refusal
        .binding
        .and_then(|b| snapshot.bindings.get(b))
        .map(|b| b.id.clone())
        .or_else(|| {
            refusal
                .binding
                .and_then(|b| snapshot.echo.binding_id(b))
                .map(str::to_owned)
        });
    let label = refusal
        .binding
        .filter(|b| *b < snapshot.labels.len())
        .map(|b| snapshot.label(b))
        .unwrap_or_else(BindingLabel::none);
    let elapsed = start.elapsed();
    engine.metrics.request(
        &label,
        refusal.decision,
        refusal.status.as_u16(),
        elapsed.as_secs_f64(),
    );
    if matches!(refusal.decision, "exfiltration_blocked" | "echo_blocked") {
        engine.metrics.blocked(&label, refusal.decision);
    }
    let mut record = AuditRecord::new(refusal.destination.clone(), method, path);
    record.decision = refusal.decision;
    record.reason = Some(refusal.reason.clone());
    record.bindings = binding_id.iter().map(|id| Arc::from(id.as_str())).collect();
    record.status = Some(refusal.status.as_u16());
    record.latency_ms = elapsed.as_secs_f64() * 1000.0;
    engine.audit.record(record);
    tracing::info!(
        decision = refusal.decision,
        status = refusal.status.as_u16(),
        binding = binding_id.as_deref().unwrap_or(""),
        destination = %refusal.destination,
        reason = %refusal.reason,
        "request refused"
    );
    json_response(
        refusal.status,
        refusal.decision,
        &refusal.reason,
        binding_id.as_deref(),
    )
}

/// Writes the audit record once the response body ends.
struct Finish {
    engine: Arc<Engine>,
    snapshot: Arc<Snapshot>,
    record: Option<AuditRecord>,
}

impl OnEnd for Finish {
    fn complete(mut self: Box<Self>) {
        if let Some(record) = self.record.take() {
            self.engine.audit.record(record);
        }
    }

    fn echo(mut self: Box<Self>, found: EchoFound) {
        let id = self
            .snapshot
            .echo
            .binding_id(found.binding)
            .unwrap_or("?")
            .to_owned();
        let label = BindingLabel(Arc::from(id.as_str()));
        self.engine.metrics.blocked(&label, "echo_blocked");
        self.engine
            .metrics
            .request(&label, "echo_blocked", 502, 0.0);
        tracing::warn!(binding = %id, encoding = %found.encoding,
            "the upstream sent a secret back in a response body; the response was aborted");
        if let Some(mut record) = self.record.take() {
            record.decision = "echo_blocked";
            record.reason = Some(format!(
                "the secret of binding {id} came back in the response body ({})",
                found.encoding
            ));
            record.bindings = vec![Arc::from(id.as_str())];
            record.status = None;
            self.engine.audit.record(record);
        }
    }

    fn broken(mut self: Box<Self>, why: &str) {
        if let Some(mut record) = self.record.take() {
            record.reason = Some(why.to_owned());
            self.engine.audit.record(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_uri_names_exactly_the_decided_host_and_port() {
        let original: Uri = "/v1/x?y=1".parse().unwrap();
        for (route, want) in [
            (
                Route::Named {
                    tls: true,
                    host: "api.example.com".into(),
                    port: 443,
                },
                "https://api.example.com/v1/x?y=1",
            ),
            (
                Route::Named {
                    tls: true,
                    host: "api.example.com".into(),
                    port: 8443,
                },
                "https://api.example.com:8443/v1/x?y=1",
            ),
            (
                Route::Named {
                    tls: false,
                    host: "plain.test".into(),
                    port: 80,
                },
                "http://plain.test/v1/x?y=1",
            ),
            (
                Route::Original("[fd00::2]:8080".parse().unwrap()),
                "http://[fd00::2]:8080/v1/x?y=1",
            ),
            (
                Route::Original("10.0.0.5:80".parse().unwrap()),
                "http://10.0.0.5:80/v1/x?y=1",
            ),
        ] {
            assert_eq!(upstream_uri(&route, &original).unwrap().to_string(), want);
        }
        for host in ["evil:x.test", "16909060:9999/x.test", "a@b", "a/b"] {
            let route = Route::Named {
                tls: false,
                host: host.into(),
                port: 8080,
            };
            assert!(upstream_uri(&route, &original).is_err(), "{host}");
        }
    }
}
