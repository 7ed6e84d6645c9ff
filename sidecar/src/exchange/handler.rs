//! One intercepted request, end to end: the framing guard's verdict, the
//! [`plan`](super::plan), the body, the upstream call, the response's
//! checks, and its accounting ([`Txn`]: exactly one audit record and one
//! metrics observation per request, whatever happens, also when the agent
//! goes away and the handler is dropped mid-way).

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{
    OnEnd, RequestBodyOutcome, SECRET_UNAVAILABLE_MID_BODY, ToAgent, ToUpstream, check_headers,
};
use super::guard::{Verdict, Verdicts};
use super::plan::{BodyPlan, ConnFacts, Plan, Refusal, Route, plan, strip_hop_by_hop};
use super::{ConnInfo, RespBody, json_response};
use crate::audit::{AuditRecord, Outcome};
use crate::echo::EchoFound;
use crate::engine::{Engine, Lookup, Snapshot};
use crate::metrics::BindingLabel;
use crate::substitute::{BindingSet, PlaceholderSet};
use crate::upstream::{OutBody, upstream_error};

/// Handles one request of a connection.
pub async fn handle(
    engine: Arc<Engine>,
    info: Arc<ConnInfo>,
    verdicts: Option<Verdicts>,
    mut request: Request<Incoming>,
) -> Response<RespBody> {
    let snapshot = engine.snapshot();
    let mut txn = Txn::new(&engine, &snapshot, &info, &request);

    if let Some(verdicts) = &verdicts
        && let Some(why) = framing_refused(verdicts.next())
    {
        let refusal = Refusal::bad_request("request_framing", why).at(&info.describe());
        let mut response = txn.refuse(&refusal);
        // The framing of what follows cannot be trusted either.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }

    // The agent's side of a WebSocket upgrade, taken before the head is
    // split off (hyper keeps it in the request).
    let agent_upgrade = looks_like_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let method = request.method().clone();
    let (mut parts, body) = request.into_parts();
    let body_empty = hyper::body::Body::is_end_stream(&body);
    // What a retry after a rotation needs: the head as the agent sent it
    // (placeholders, not values), for a request safe to send twice.
    let mut retry_head = (body_empty && agent_upgrade.is_none() && idempotent(&method))
        .then(|| RetryHead::of(&parts));
    let conn = ConnFacts {
        sni: info.sni.as_deref(),
        port: info.port,
        original: info.original,
        tunnel_host: info.tunnel_host.as_deref(),
        proxy_form: info.proxy_form,
        egress: engine.settings.egress,
    };
    let mut snapshot = snapshot;
    let mut plan = match plan(&mut parts, body_empty, &conn, &snapshot) {
        Ok(plan) => plan,
        Err(refusal) => return txn.refuse(&at_connection(refusal, &info)),
    };
    txn.planned(&plan, &snapshot);

    let mut outcome = Arc::new(RequestBodyOutcome::default());
    txn.body = Some(outcome.clone());
    let out_body = match request_body(&engine, &snapshot, &plan, &mut parts, body, &outcome).await {
        Ok(body) => body,
        Err(refusal) => return txn.refuse(&refusal),
    };
    if let Err(refusal) = aim_upstream(&mut parts, &plan) {
        return txn.refuse(&refusal);
    }

    let Ok(slot) = engine.upstream_requests.clone().try_acquire_owned() else {
        engine.metrics.upstream_error("busy");
        return txn.refuse(
            &Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Outcome::UpstreamError,
                "busy",
                "too many requests are in flight upstream (--max-connections); retry later",
            )
            .at(&plan.destination),
        );
    };
    // Held until the response ends (the accounting's end).
    txn.upstream_slot = Some(slot);
    let answer = send(&engine, &snapshot, &plan, parts, out_body, &outcome).await;
    if let Some((binding, code)) = outcome.blocked() {
        return txn.refuse(&body_refusal(binding, code, &plan.destination));
    }
    let mut response = match answer {
        Ok(response) => response,
        Err(refusal) => return txn.refuse(refusal.counted(&engine)),
    };
    txn.add_swapped(&outcome.swapped(), &snapshot);
    if matches!(response.status().as_u16(), 401 | 403) && txn.injected() {
        // The value may have been rotated: look now rather than at the next
        // poll (rate-limited by the store), and if a new value turns up,
        // send a request that is safe to repeat once more with it.
        let used = used_secrets(&snapshot, &txn.injected);
        // Only a request that could be sent again waits for the read.
        let rotated = match retry_head {
            Some(_) => {
                engine
                    .store()
                    .refresh_and_wait(&used, ROTATION_RETRY_WAIT)
                    .await
            }
            None => {
                for (id, _) in &used {
                    engine.store().refresh_now(id);
                }
                false
            }
        };
        if rotated
            && let Some(head) = retry_head.take()
            && let Some(fresh) = snapshot_with_new_values(&engine, &used).await
        {
            drop(response);
            let mut parts = head.into_parts();
            plan = match super::plan::plan(&mut parts, true, &conn, &fresh) {
                Ok(plan) => plan,
                Err(refusal) => return txn.refuse(&at_connection(refusal, &info)),
            };
            snapshot = fresh;
            txn.planned(&plan, &snapshot);
            txn.record.retried = true;
            if let Err(refusal) = aim_upstream(&mut parts, &plan) {
                return txn.refuse(&refusal);
            }
            outcome = Arc::new(RequestBodyOutcome::default());
            txn.body = Some(outcome.clone());
            let idle = engine.settings.idle_timeout;
            let empty = ToUpstream::passing(
                http_body_util::Empty::<bytes::Bytes>::new(),
                outcome.clone(),
                idle,
            )
            .boxed_unsync();
            response = match send(&engine, &snapshot, &plan, parts, empty, &outcome).await {
                Ok(response) => response,
                Err(refusal) => return txn.refuse(refusal.counted(&engine)),
            };
        }
    }
    let status = response.status();
    // hyper keeps an HTTP/1.1 reason phrase that is not the standard one and
    // writes it back out to the agent: a line the echo checks never see.
    response
        .extensions_mut()
        .remove::<hyper::ext::ReasonPhrase>();
    if let Err(refusal) = inspect_response_head(&snapshot, &response, &plan) {
        return txn.refuse(&refusal);
    }
    let upgrade = plan.upgrade && status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), upgrade);
    if upgrade {
        if let Some(verdicts) = &verdicts {
            // From here the connection carries frames, not requests.
            verdicts.upgraded();
        }
        if let Some(agent_side) = agent_upgrade {
            spawn_tunnel(
                &engine,
                &snapshot,
                &info,
                &plan,
                &txn,
                agent_side,
                &mut response,
            );
        }
    }

    txn.answered(status);
    let detector = plan.bound.then(|| snapshot.echo.clone());
    let idle = engine.settings.idle_timeout;
    let on_end: Box<dyn OnEnd> = Box::new(txn);
    if no_body(&method, status) {
        // No content whatever the upstream's body claims (an HTTP/2 HEAD
        // answer's body reports its Content-Length as its size).
        return response.map(|_| {
            let empty = http_body_util::Empty::<bytes::Bytes>::new();
            ToAgent::new(empty, None, on_end, idle).boxed_unsync()
        });
    }
    response.map(|body| ToAgent::new(body, detector, on_end, idle).boxed_unsync())
}

/// A plan's refusal, naming the connection's destination when the plan
/// named none.
fn at_connection(refusal: Refusal, info: &ConnInfo) -> Refusal {
    if refusal.destination.is_empty() {
        refusal.at(&info.describe())
    } else {
        refusal
    }
}

/// How long a request refused with 401/403 waits for a fresh read of its
/// secrets before the refusal goes to the agent.
const ROTATION_RETRY_WAIT: Duration = Duration::from_secs(5);

/// Methods a retry may repeat (RFC 9110 9.2.2), given an empty body.
fn idempotent(method: &http::Method) -> bool {
    use http::Method as M;
    [M::GET, M::HEAD, M::OPTIONS, M::PUT, M::DELETE].contains(method)
}

/// A request head as the agent sent it, kept for one retry.
struct RetryHead {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
}

impl RetryHead {
    fn of(parts: &http::request::Parts) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn into_parts(self) -> http::request::Parts {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method;
        parts.uri = self.uri;
        parts.version = self.version;
        parts.headers = self.headers;
        parts
    }
}

/// The values a request carried: `(binding id, value)` of each swapped
/// binding, as the snapshot held them.
fn used_secrets(
    snapshot: &Snapshot,
    injected: &BindingSet,
) -> Vec<(String, Arc<crate::store::Secret>)> {
    injected
        .iter()
        .filter_map(|b| {
            let id = snapshot.binding_id(b)?;
            match snapshot.secrets.get(b)? {
                crate::engine::Slot::State(crate::store::SecretState::Ready(s)) => {
                    Some((id.to_owned(), s.clone()))
                }
                _ => None,
            }
        })
        .collect()
}

/// Waits (briefly) for the engine's snapshot to hold a value other than
/// the one sent for one of `used`: the store has it already, and the
/// snapshot is rebuilt from the store right after.
async fn snapshot_with_new_values(
    engine: &Engine,
    used: &[(String, Arc<crate::store::Secret>)],
) -> Option<Arc<Snapshot>> {
    for _ in 0..100 {
        let snapshot = engine.snapshot();
        let fresh = used.iter().any(|(id, sent)| {
            snapshot.bindings.iter().zip(&snapshot.secrets).any(|(b, slot)| {
                b.id == *id
                    && matches!(slot, crate::engine::Slot::State(crate::store::SecretState::Ready(s))
                        if !s.same_value(sent))
            })
        });
        if fresh {
            return Some(snapshot);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Responses that carry no content (RFC 9110 6.4.1).
fn no_body(method: &http::Method, status: StatusCode) -> bool {
    method == http::Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

fn framing_refused(verdict: Verdict) -> Option<&'static str> {
    match verdict {
        Verdict::Ok => None,
        Verdict::Refused(why) => Some(why),
        Verdict::Unverified => Some("the request's framing could not be verified"),
    }
}

fn looks_like_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11 && request.headers().contains_key(header::UPGRADE)
}

/// The refusal for a request body the scanner stopped.
fn body_refusal(binding: usize, code: &'static str, destination: &str) -> Refusal {
    if code == SECRET_UNAVAILABLE_MID_BODY {
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Outcome::SecretUnavailable,
            "secret_stale",
            "the secret stopped being usable while the body was sent",
        )
        .for_binding(binding)
        .at(destination)
    } else {
        Refusal::blocked(
            binding,
            code,
            "a placeholder in the body may not be sent here",
        )
        .at(destination)
    }
}

/// A refusal from the upstream call, with the step that failed.
struct SendRefusal {
    refusal: Refusal,
    upstream_step: Option<&'static str>,
}

impl SendRefusal {
    /// The refusal, its failed step counted in the metrics.
    fn counted(&self, engine: &Engine) -> &Refusal {
        if let Some(step) = self.upstream_step {
            engine.metrics.upstream_error(step);
        }
        &self.refusal
    }
}

/// Points the request head at the decided upstream: the URI built from
/// the route, no `Host` of the agent's for a named route (the client
/// writes it from the URI, or sends `:authority`), and HTTP/1.1 framing
/// for the pooled client to renegotiate.
fn aim_upstream(parts: &mut http::request::Parts, plan: &Plan) -> Result<(), Refusal> {
    parts.uri = upstream_uri(&plan.route, &parts.uri).map_err(|r| r.at(&plan.destination))?;
    if !matches!(plan.route, Route::Original(_)) {
        parts.headers.remove(header::HOST);
    }
    parts.version = Version::HTTP_11;
    Ok(())
}

/// Sends the request upstream. The response deadline starts once the body
/// has been sent (an upload is timed by the body's idle timeout instead).
async fn send(
    engine: &Engine,
    snapshot: &Snapshot,
    plan: &Plan,
    parts: http::request::Parts,
    body: OutBody,
    outcome: &RequestBodyOutcome,
) -> Result<Response<Incoming>, SendRefusal> {
    let client = snapshot.upstreams.client(plan.upgrade);
    let timeout = engine.settings.response_timeout;
    let idle = engine.settings.idle_timeout;
    let request = client.request(Request::from_parts(parts, body));
    let deadline = async {
        tokio::select! {
            () = async {
                outcome.ended().await;
                tokio::time::sleep(timeout).await;
            } => format!("upstream {} did not answer within {timeout:?}", plan.destination),
            () = outcome.unread_for(idle, tokio::time::Instant::now()) => format!(
                "the request body made no progress toward upstream {} within {idle:?}",
                plan.destination
            ),
        }
    };
    let answer = tokio::select! {
        answer = request => answer,
        detail = deadline => {
            return Err(SendRefusal {
                refusal: Refusal::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    Outcome::UpstreamError,
                    "timeout",
                    detail,
                )
                .at(&plan.destination),
                upstream_step: Some("timeout"),
            });
        }
    };
    answer.map_err(|e| {
        let (step, detail) = match upstream_error(&e) {
            Some(ours) => (ours.step, ours.message.clone()),
            None => (
                "exchange",
                format!(
                    "upstream {}: {}",
                    plan.destination,
                    describe_client_error(&e)
                ),
            ),
        };
        // Out of upstream connections is the sidecar's own limit, not a bad
        // gateway.
        let status = if step == "busy" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_GATEWAY
        };
        SendRefusal {
            refusal: Refusal::new(status, Outcome::UpstreamError, step, detail)
                .at(&plan.destination),
            upstream_step: Some(step),
        }
    })
}

/// Runs the two sides of an accepted WebSocket upgrade, on the engine's
/// task tracker (the drain waits for it), holding the connection's permit.
fn spawn_tunnel(
    engine: &Arc<Engine>,
    snapshot: &Arc<Snapshot>,
    info: &ConnInfo,
    plan: &Plan,
    txn: &Txn,
    agent_side: hyper::upgrade::OnUpgrade,
    response: &mut Response<Incoming>,
) {
    let upstream_side = hyper::upgrade::on(response);
    let echo = plan.bound.then(|| snapshot.echo.clone());
    let (engine, snapshot) = (engine.clone(), snapshot.clone());
    let guard = info.guard.clone();
    let record = txn.record.clone();
    engine.clone().tasks.spawn(async move {
        let _guard = guard;
        let end = crate::splice::tunnel_upgrades(
            agent_side,
            upstream_side,
            engine.settings.idle_timeout,
            echo,
        )
        .await;
        if let crate::splice::SpliceEnd::Echo(found) = end {
            let id = snapshot.binding_id(found.binding).unwrap_or("?").to_owned();
            engine.metrics.blocked(
                &BindingLabel(Arc::from(id.as_str())),
                found.encoding.as_str(),
            );
            let mut record = record;
            record.decision = Outcome::EchoBlocked;
            record.reason = Some(found.encoding.as_str());
            record.detail = Some(format!(
                "the secret of binding {id} came back in a WebSocket frame; the tunnel was closed"
            ));
            record.bindings = vec![Arc::from(id.as_str())];
            record.status = None;
            engine.audit.record(record);
        }
    });
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
    let has_length = parts.headers.contains_key(header::CONTENT_LENGTH);
    let out = match &plan.body {
        BodyPlan::Untouched => ToUpstream::passing(body, outcome.clone(), idle).boxed_unsync(),
        BodyPlan::Detect => ToUpstream::detecting(body, set, outcome.clone(), idle).boxed_unsync(),
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
            // Buffer (to send the true length; some upstreams refuse chunked
            // requests) only a body whose size after the swap is bounded by
            // this request's limit, and only while the budget all requests
            // share holds that bound.
            let budget = length
                .filter(|len| *len <= max as u64)
                .map(|len| snapshot.swapped_size_bound(len, allowed, *form))
                .filter(|bound| *bound <= max.saturating_add(max / 2) as u64)
                .and_then(|bound| u32::try_from(bound.div_ceil(1024).max(1)).ok())
                .and_then(|kib| {
                    let permit = engine
                        .body_budget
                        .clone()
                        .try_acquire_many_owned(kib)
                        .ok()?;
                    Some((permit, kib as usize * 1024))
                });
            match budget {
                Some((_permit, bound)) => {
                    let whole = Limited::new(swapping, bound)
                        .collect()
                        .await
                        .map_err(|_| match outcome.blocked() {
                            Some((binding, code)) => body_refusal(binding, code, &plan.destination),
                            None => Refusal::bad_request(
                                "body_read",
                                "the request body could not be read",
                            )
                            .at(&plan.destination),
                        })?
                        .to_bytes();
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
                    return Ok(Full::new(whole).map_err(|e| match e {}).boxed_unsync());
                }
                None => {
                    // Streamed: the length after the swap is not known.
                    parts.headers.remove(header::CONTENT_LENGTH);
                    swapping.boxed_unsync()
                }
            }
        }
    };
    let streamed_without_length = !hyper::body::Body::is_end_stream(&out)
        && hyper::body::Body::size_hint(&out).exact().is_none()
        && (!has_length || matches!(plan.body, BodyPlan::Replace { .. }));
    if streamed_without_length {
        // hyper's client sends an unknown-length GET or HEAD body as no body
        // at all unless told it is chunked (HTTP/2 drops the header itself).
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    Ok(out)
}

/// The URI the upstream is asked for, built from the decided host and port
/// and checked to name exactly them: whatever parses this URI next (the
/// pool, the connector) must dial the host that was decided on.
fn upstream_uri(route: &Route, original: &Uri) -> Result<Uri, Refusal> {
    let refuse =
        || Refusal::bad_request("rewrite_failed", "the request target cannot be forwarded");
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

/// The checks on a response head before anything of it reaches the agent.
fn inspect_response_head(
    snapshot: &Snapshot,
    response: &Response<Incoming>,
    plan: &Plan,
) -> Result<(), Refusal> {
    let refusal = |code, detail: String| {
        Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            Outcome::NotInspectable,
            code,
            detail,
        )
        .at(&plan.destination))
    };
    if !plan.bound {
        return Ok(());
    }
    if response.status() == StatusCode::PARTIAL_CONTENT {
        // Range was dropped from the request; slices of a response could
        // each be shorter than an echo needle and carry a secret back a few
        // bytes at a time.
        return refusal(
            "partial_response",
            format!(
                "upstream {} answered with a partial response (206), which the echo checks \
                 cannot see whole",
                plan.destination
            ),
        );
    }
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && response
            .headers()
            .contains_key(header::SEC_WEBSOCKET_EXTENSIONS)
    {
        // None was asked for; compressed frames would hide an echo.
        return refusal(
            "websocket_extension",
            format!(
                "upstream {} negotiated a WebSocket extension that was not asked for",
                plan.destination
            ),
        );
    }
    let detector = &snapshot.echo;
    if detector.is_empty() {
        return Ok(());
    }
    if let Err(found) = check_headers(detector, response.headers()) {
        return Err(echo_refusal(snapshot, found, &plan.destination));
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
        return refusal(
            "compressed_response",
            format!(
                "upstream {} answered with a compressed body although identity encoding was asked \
                 for; it cannot be checked for echoed secrets, so it is refused",
                plan.destination
            ),
        );
    }
    Ok(())
}

fn echo_refusal(snapshot: &Snapshot, found: EchoFound, destination: &str) -> Refusal {
    let id = snapshot.binding_id(found.binding).unwrap_or("?");
    Refusal {
        binding: Some(found.binding),
        ..Refusal::new(
            StatusCode::BAD_GATEWAY,
            Outcome::EchoBlocked,
            found.encoding.as_str(),
            format!(
                "the upstream sent the secret of binding {id} back in the response headers; the \
                 response was refused"
            ),
        )
        .at(destination)
    }
}

/// hyper's client errors, in fixed categories.
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

/// The accounting of one request: its audit record and metrics, written
/// exactly once, when the outcome is known (a refusal, the end of the
/// response body, an echo), or on drop if the agent went away first. A
/// request dropped after its head was forwarded is recorded as `cancelled`
/// with the bindings swapped in by then: a secret may have left, and the
/// audit says so. A body the scanner stopped is recorded as
/// `exfiltration_blocked` even then.
pub struct Txn {
    engine: Arc<Engine>,
    placeholders: Arc<PlaceholderSet>,
    labels: Arc<[BindingLabel]>,
    record: AuditRecord,
    label: BindingLabel,
    injected: BindingSet,
    body: Option<Arc<RequestBodyOutcome>>,
    start: Instant,
    /// Time to the response head.
    head_latency: Option<Duration>,
    /// This request's place among those in flight upstream.
    upstream_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    done: bool,
}

impl Txn {
    fn new<B>(
        engine: &Arc<Engine>,
        snapshot: &Snapshot,
        info: &ConnInfo,
        request: &Request<B>,
    ) -> Self {
        let path = request.uri().path();
        // A path holding a placeholder is refused; its record never shows it.
        let path = if snapshot.placeholders.contains_any(path.as_bytes()) {
            "(withheld: it held a placeholder)"
        } else {
            path
        };
        let mut record = AuditRecord::new(&info.describe(), request.method().as_str(), path);
        record.protocol = Some(if request.version() == Version::HTTP_2 {
            "h2"
        } else {
            "h1"
        });
        Self {
            engine: engine.clone(),
            placeholders: snapshot.placeholders.clone(),
            labels: snapshot.labels.clone().into(),
            record,
            label: BindingLabel::none(),
            injected: BindingSet::new(),
            body: None,
            start: Instant::now(),
            head_latency: None,
            upstream_slot: None,
            done: false,
        }
    }

    fn planned(&mut self, plan: &Plan, snapshot: &Snapshot) {
        self.record.destination =
            crate::audit::cut(&plan.destination, crate::audit::MAX_PATH_LEN).to_owned();
        self.add_swapped(&plan.injected, snapshot);
    }

    fn add_swapped(&mut self, swapped: &BindingSet, snapshot: &Snapshot) {
        for b in swapped.iter() {
            if !self.injected.contains(b) {
                self.injected.insert(b);
                if let Some(id) = snapshot.binding_id(b) {
                    self.record.bindings.push(Arc::from(id));
                }
                if self.label.0.is_empty() {
                    self.label = snapshot.label(b);
                }
            }
        }
    }

    fn injected(&self) -> bool {
        !self.injected.is_empty()
    }

    fn decision(&self) -> Outcome {
        if self.injected() {
            Outcome::Injected
        } else {
            Outcome::Forwarded
        }
    }

    fn answered(&mut self, status: StatusCode) {
        self.head_latency = Some(self.start.elapsed());
        self.record.status = Some(status.as_u16());
        self.record.upstream_status = Some(status.as_u16());
    }

    /// Writes the record and the metrics, once.
    fn write(&mut self, decision: Outcome, status: Option<u16>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let latency = self.head_latency.unwrap_or_else(|| self.start.elapsed());
        self.record.decision = decision;
        self.record.status = status;
        self.record.latency_ms = latency.as_secs_f64() * 1000.0;
        self.engine.metrics.request(
            &self.label,
            decision.as_str(),
            status.unwrap_or(0),
            latency.as_secs_f64(),
        );
        self.engine.audit.record(self.record.clone());
    }

    /// Answers a refusal (JSON naming the decision, the reason and the
    /// binding), logs it, and writes the record.
    fn refuse(&mut self, refusal: &Refusal) -> Response<RespBody> {
        let snapshot = self.engine.snapshot();
        // A backstop: a detail is built from our own words, hosts and paths,
        // but nothing that holds a secret may reach the agent, a log or the
        // audit.
        let mut detail = refusal.detail.as_str();
        let mut destination = refusal.destination.as_str();
        if snapshot.echo.check(detail.as_bytes()).is_err()
            || snapshot.echo.check(destination.as_bytes()).is_err()
            || self.placeholders.contains_any(detail.as_bytes())
            || self.placeholders.contains_any(destination.as_bytes())
        {
            detail = "(withheld: it held a secret or a placeholder)";
            destination = "(withheld)";
        }
        let binding_id = refusal
            .binding
            .and_then(|b| snapshot.binding_id(b))
            .map(str::to_owned);
        if let Some(b) = refusal.binding {
            self.label =
                self.labels.get(b).cloned().unwrap_or_else(|| {
                    BindingLabel(Arc::from(binding_id.as_deref().unwrap_or("?")))
                });
        }
        if matches!(
            refusal.decision,
            Outcome::ExfiltrationBlocked | Outcome::EchoBlocked
        ) {
            self.engine.metrics.blocked(&self.label, refusal.code);
        }
        self.record.destination =
            crate::audit::cut(destination, crate::audit::MAX_PATH_LEN).to_owned();
        self.record.reason = Some(refusal.code);
        self.record.detail = Some(detail.to_owned());
        if let Some(id) = &binding_id
            && !self.record.bindings.iter().any(|b| &**b == id)
        {
            self.record.bindings = vec![Arc::from(id.as_str())];
        }
        tracing::info!(
            decision = refusal.decision.as_str(),
            reason = refusal.code,
            status = refusal.status.as_u16(),
            binding = binding_id.as_deref().unwrap_or(""),
            destination = %destination,
            detail = %detail,
            "request refused"
        );
        self.write(refusal.decision, Some(refusal.status.as_u16()));
        let response = json_response(
            refusal.status,
            refusal.decision.as_str(),
            refusal.code,
            detail,
            binding_id.as_deref(),
        );
        if self.record.method == "HEAD" {
            // An answer to HEAD carries no content (HTTP/2 clients reset a
            // stream that does); the decision is in the headers.
            let (mut parts, _) = response.into_parts();
            parts.headers.remove(header::CONTENT_LENGTH);
            let empty = http_body_util::Empty::<bytes::Bytes>::new().map_err(|e| match e {});
            return Response::from_parts(parts, empty.boxed_unsync());
        }
        response
    }
}

impl OnEnd for Txn {
    fn complete(mut self: Box<Self>) {
        let status = self.record.status;
        let decision = self.decision();
        self.write(decision, status);
    }

    fn echo(mut self: Box<Self>, found: EchoFound) {
        let snapshot = self.engine.snapshot();
        let id = snapshot.binding_id(found.binding).unwrap_or("?").to_owned();
        let label = BindingLabel(Arc::from(id.as_str()));
        self.engine.metrics.blocked(&label, found.encoding.as_str());
        tracing::warn!(binding = %id, encoding = %found.encoding,
            "the upstream sent a secret back in a response body; the response was aborted");
        self.record.reason = Some(found.encoding.as_str());
        self.record.detail = Some(format!(
            "the secret of binding {id} came back in the response body"
        ));
        self.record.bindings = vec![Arc::from(id.as_str())];
        self.label = label;
        self.write(Outcome::EchoBlocked, None);
    }

    fn broken(mut self: Box<Self>, why: &str) {
        self.record.detail = Some(why.to_owned());
        let status = self.record.status;
        let decision = self.decision();
        self.write(decision, status);
    }
}

impl Drop for Txn {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The handler was dropped: the agent went away before the answer.
        if let Some((binding, code)) = self.body.as_ref().and_then(|b| b.blocked()) {
            let id = self.labels.get(binding).cloned();
            if let Some(label) = id {
                self.engine.metrics.blocked(&label, code);
                self.record.bindings = vec![label.0.clone()];
                self.label = label;
            }
            self.record.reason = Some(code);
            self.record.detail = Some("a placeholder in the body may not be sent here".into());
            self.write(Outcome::ExfiltrationBlocked, None);
            return;
        }
        self.record.detail = Some(if self.injected() {
            "the agent went away before the answer; the request had been sent with the secrets named".into()
        } else {
            "the agent went away before the answer".into()
        });
        self.write(Outcome::Cancelled, None);
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
