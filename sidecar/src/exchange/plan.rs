//! The decision on one request and the rewrite of its head, as a pure
//! function of the head, the connection and the snapshot ([`plan`]): what
//! the handler forwards and where, or why it refuses.
//!
//! In order:
//! 1. the head is sane (one Host, no CR/LF/NUL in values, no CONNECT);
//! 2. every authority the request names (`:authority`/the target's, `Host`,
//!    the tunnel's CONNECT target) is the same, and for TLS equals the SNI
//!    (else 421);
//! 3. placeholders are looked for on every surface: header names and the
//!    path can never carry one (403), header values, basic-auth
//!    credentials and the query may, for bindings that allow it;
//! 4. [`crate::decide::decide`]: a placeholder goes only to its binding's
//!    destinations, with an allowed method, path and surface (403);
//! 5. each binding to be swapped has a usable secret (503 otherwise);
//! 6. placeholders are swapped (headers marked sensitive), hop-by-hop
//!    headers dropped, identity encoding asked of bound upstreams;
//! 7. the body gets a plan: untouched, scanned and refused at any
//!    placeholder, or scanned and swapped for the bindings
//!    [`crate::decide::may_swap`] allows on the body.

use std::net::SocketAddr;

use credbroker_crds::Surface;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode, Uri, Version};

use crate::audit::Outcome;
use crate::config::EgressMode;
use crate::decide::{BlockReason, Decision, RequestFacts, SeenOn, decide};
use crate::engine::{Lookup, Snapshot};
use crate::secret::Form;
use crate::substitute::{BindingSet, SubstituteError};

/// What the handler knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnFacts<'a> {
    /// The SNI the sidecar terminated TLS for (lower case); `None` in
    /// cleartext.
    pub sni: Option<&'a str>,
    /// The connection's destination port (its original destination, or
    /// the CONNECT target's port). Unused for absolute-form requests to
    /// the local proxy, whose target names its own port.
    pub port: u16,
    /// Transparent cleartext: where the agent's connection was going; a
    /// request to an unbound host goes there, as the agent asked.
    pub original: Option<SocketAddr>,
    /// Local mode: the host of the CONNECT that opened this tunnel.
    pub tunnel_host: Option<&'a str>,
    /// Local mode, outside a tunnel: requests name their target in
    /// absolute form (`GET http://host/path`).
    pub proxy_form: bool,
    pub egress: EgressMode,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A name the sidecar resolves and dials itself.
    Named { tls: bool, host: String, port: u16 },
    /// The address the agent dialled (cleartext to an unbound host).
    Original(SocketAddr),
}

/// What to do with the request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyPlan {
    /// Forward as it is: no placeholder can be in it (the pod has none, or
    /// there is no body).
    Untouched,
    /// Forward unchanged; refuse the request at the first placeholder.
    Detect,
    /// Swap the placeholders of `allowed`, written in `form`; refuse the
    /// request at any other placeholder.
    Replace { allowed: BindingSet, form: Form },
}

/// A request to forward.
#[derive(Debug)]
pub struct Plan {
    pub route: Route,
    /// `host:port`, for audit records.
    pub destination: String,
    /// A bound destination: identity encoding was asked for, and responses
    /// are checked for echoes.
    pub bound: bool,
    /// The bindings swapped into the head.
    pub injected: BindingSet,
    pub body: BodyPlan,
    /// A WebSocket upgrade: forwarded over HTTP/1.1 with its `Upgrade`.
    pub upgrade: bool,
}

/// A request refused before anything was forwarded (or, from the handler,
/// after the upstream answered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub decision: Outcome,
    /// A stable, bounded code for the reason (`destination_not_bound`,
    /// `duplicate_host`, ...): the `reason` of answers, audit records and
    /// metrics.
    pub code: &'static str,
    /// What a human reads. Built from the request, the config and our own
    /// words; never from a secret source's or an upstream's text.
    pub detail: String,
    /// The binding concerned, if any.
    pub binding: Option<usize>,
    pub destination: String,
}

impl Refusal {
    pub fn new(
        status: StatusCode,
        decision: Outcome,
        code: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            decision,
            code,
            detail: detail.into(),
            binding: None,
            destination: String::new(),
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Outcome::BadRequest, code, detail)
    }

    pub fn blocked(binding: usize, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            binding: Some(binding),
            ..Self::new(
                StatusCode::FORBIDDEN,
                Outcome::ExfiltrationBlocked,
                code,
                detail,
            )
        }
    }

    pub fn at(mut self, destination: &str) -> Self {
        self.destination = destination.to_owned();
        self
    }

    pub fn for_binding(mut self, binding: usize) -> Self {
        self.binding = Some(binding);
        self
    }
}

/// Hop-by-hop headers (RFC 9110 7.6.1) and proxy credentials, never
/// forwarded; `te` is kept only as `trailers`.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
];

/// Plans the request whose head is `parts` (rewritten in place when it is
/// forwarded). `body_empty`: the request is known to have no body.
pub fn plan(
    parts: &mut Parts,
    body_empty: bool,
    conn: &ConnFacts<'_>,
    snapshot: &Snapshot,
) -> Result<Plan, Refusal> {
    check_head(parts)?;
    let target = target(parts, conn)?;
    let destination = format!("{}:{}", target.host, target.port);
    let refuse = |r: Refusal| r.at(&destination);
    let path = parts.uri.path().to_owned();
    let method = parts.method.clone();
    let facts = RequestFacts {
        host: &target.host,
        port: target.port,
        tls: target.tls,
        authority: Some(&target.authority),
        method: method.as_str(),
        path: &path,
    };
    // Bound for this transport, or named by a binding at all (then a
    // placeholder toward it is judged by its destinations' rules).
    let bound = snapshot.covers(&target.host, target.port, target.tls);
    let named = target.tls || snapshot.names(&target.host, target.port);

    // Hop-by-hop headers go before anything is looked for: a header the
    // agent names in `Connection` (`Connection: authorization`) is never
    // forwarded, so a placeholder in it must neither be swapped nor count.
    let upgrade = is_websocket_upgrade(parts);
    if upgrade {
        // No permessage-deflate: compressed frames would hide an echo.
        parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    }
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::EXPECT);

    let seen = scan(parts, snapshot).map_err(refuse)?;
    let inject = if named {
        match decide(&snapshot.bindings, &seen, &facts) {
            Decision::Forward { inject } => inject,
            Decision::Misdirected => {
                return Err(refuse(Refusal::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    Outcome::Misdirected,
                    "authority_mismatch",
                    format!(
                        "the request's authority {:?} is not this connection's destination {}",
                        crate::audit::cut(&target.authority, crate::audit::MAX_PATH_LEN),
                        destination
                    ),
                )));
            }
            Decision::Block { binding, reason } => {
                let (code, detail) = block_reason(&reason, &method, &destination);
                return Err(refuse(Refusal::blocked(binding, code, detail)));
            }
        }
    } else if let Some(binding) = seen.iter().position(|s| s.any()) {
        let (code, detail) = block_reason(&BlockReason::DestinationNotBound, &method, &destination);
        return Err(refuse(Refusal::blocked(binding, code, detail)));
    } else {
        Vec::new()
    };
    if !bound && conn.egress == EgressMode::Deny {
        return Err(refuse(Refusal::new(
            StatusCode::FORBIDDEN,
            Outcome::EgressDenied,
            "egress_deny",
            format!("{destination} is not a bound destination, and egress is deny"),
        )));
    }
    for &i in &inject {
        if let Err(unusable) = snapshot.usable_secret(i) {
            // The step only: the source's own message (paths, library
            // text) is for the logs, not for the agent.
            return Err(refuse(
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Outcome::SecretUnavailable,
                    unusable.code(),
                    unusable.detail(),
                )
                .for_binding(i),
            ));
        }
    }
    let injected: BindingSet = inject.iter().copied().collect();
    let body = body_plan(parts, body_empty, snapshot, &facts).map_err(refuse)?;
    // The bindings whose secrets this request may carry: swapped into the
    // head, or allowed into the body (judged before the body is seen).
    let mut may_carry = injected.clone();
    if let BodyPlan::Replace { allowed, .. } = &body {
        may_carry.union_with(allowed);
    }
    if let Some(limited) = may_carry
        .iter()
        .find(|&b| limits_method_or_path(snapshot, b))
        && let Some(what) = method_or_path_override(parts)
    {
        return Err(refuse(Refusal::blocked(
            limited,
            "override_header_not_allowed",
            format!("{what} would override the method or path this binding limits"),
        )));
    }
    if !injected.is_empty() {
        swap_head(parts, snapshot, &injected, &seen).map_err(refuse)?;
    }
    if bound {
        // So that echoes can be seen (invariant 4): no compression, and no
        // slices, which could each be shorter than the echo checks' needles
        // and carry a stored secret back a few bytes at a time.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        for name in RANGE_HEADERS {
            parts.headers.remove(name);
        }
    }

    let route = match conn.original {
        // An unbound cleartext request carrying no placeholder goes where
        // the agent's connection was going (its Host may be a virtual host
        // the sidecar could not even resolve).
        Some(original) if !target.tls && !bound => Route::Original(original),
        _ => Route::Named {
            tls: target.tls,
            host: target.host.clone(),
            port: target.port,
        },
    };
    Ok(Plan {
        route,
        destination,
        bound,
        injected,
        body,
        upgrade,
    })
}

/// The code and the sentence of a decision's refusal. The path is left out
/// of the sentence: it is the agent's, unbounded, and already in the audit
/// record (cut).
fn block_reason(
    reason: &BlockReason,
    method: &Method,
    destination: &str,
) -> (&'static str, String) {
    let detail = match reason {
        BlockReason::DestinationNotBound => {
            format!("{destination} is not a destination of the placeholder's binding")
        }
        BlockReason::Cleartext => {
            format!("the binding does not allow cleartext HTTP to {destination}")
        }
        BlockReason::MethodNotAllowed => {
            format!("the binding does not allow {method} to {destination}")
        }
        BlockReason::PathNotAllowed => {
            format!("the binding does not allow this path on {destination}")
        }
        BlockReason::PathNotNormalized => format!(
            "the path has dot-segments or encoded separators, and the binding limits paths on \
             {destination}"
        ),
        BlockReason::SurfaceNotAllowed(s) => format!(
            "the binding does not allow its placeholder in the {} toward {destination}",
            surface_name(*s)
        ),
    };
    (reason.as_str(), detail)
}

fn surface_name(s: Surface) -> &'static str {
    match s {
        Surface::Header => "header",
        Surface::Query => "query",
        Surface::Body => "body",
        Surface::BasicAuth => "basicAuth",
    }
}

/// Checks that hold for every request, placeholder or not.
fn check_head(parts: &Parts) -> Result<(), Refusal> {
    if parts.headers.get_all(header::HOST).iter().count() > 1 {
        return Err(Refusal::bad_request(
            "duplicate_host",
            "duplicate Host header",
        ));
    }
    if parts
        .headers
        .values()
        .any(|v| v.as_bytes().iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)))
    {
        return Err(Refusal::bad_request(
            "header_value_control",
            "a header value holds CR, LF or NUL",
        ));
    }
    if parts.method == Method::CONNECT {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Outcome::BadRequest,
            "connect_inside",
            "CONNECT is not allowed inside an intercepted connection",
        ));
    }
    Ok(())
}

struct Target {
    /// The authority as the request wrote it.
    authority: String,
    /// Lower case, no trailing dot.
    host: String,
    port: u16,
    tls: bool,
}

/// Where the request says it is going, checked against the connection.
fn target(parts: &Parts, conn: &ConnFacts<'_>) -> Result<Target, Refusal> {
    let uri_authority = parts.uri.authority().map(|a| a.as_str());
    let host_header = match parts.headers.get(header::HOST) {
        Some(v) => Some(v.to_str().map_err(|_| {
            Refusal::bad_request("invalid_host", "the Host header is not visible ASCII")
        })?),
        None => None,
    };
    if let (Some(a), Some(h)) = (uri_authority, host_header)
        && !a.eq_ignore_ascii_case(h)
    {
        return Err(Refusal::new(
            StatusCode::MISDIRECTED_REQUEST,
            Outcome::Misdirected,
            "authority_mismatch",
            "the request target and the Host header name different hosts",
        ));
    }
    if conn.proxy_form && conn.tunnel_host.is_none() && conn.sni.is_none() {
        // The local proxy itself: absolute-form http:// only.
        match parts.uri.scheme_str() {
            Some("http") => {}
            Some(_) => {
                return Err(Refusal::bad_request(
                    "https_needs_connect",
                    "send https:// requests through the proxy with CONNECT (HTTPS_PROXY)",
                ));
            }
            None => {
                return Err(Refusal::bad_request(
                    "not_a_proxy_request",
                    "this is credbroker's local proxy: use it as HTTP_PROXY / HTTPS_PROXY \
                     (requests in absolute form, or CONNECT)",
                ));
            }
        }
    }
    let Some(authority) = uri_authority.or(host_header) else {
        return Err(Refusal::bad_request(
            "no_host",
            "the request names no host (no Host header)",
        ));
    };
    let (host, port) = split_authority(authority);
    let host = canonical(host);
    // The host must be one the next parser reads the same way: a DNS name
    // or an IP address. Anything else (":", "/", "?", "#" ...) would make
    // the upstream URI name a different host than the one decided on.
    if host.parse::<std::net::IpAddr>().is_err() && !credbroker_crds::validate::is_dns_name(&host) {
        return Err(Refusal::bad_request(
            "invalid_host",
            "the request names something that is not a host name or an IP address",
        ));
    }
    if let Some(tunnel) = conn.tunnel_host
        && host != canonical(tunnel)
    {
        return Err(Refusal::new(
            StatusCode::MISDIRECTED_REQUEST,
            Outcome::Misdirected,
            "authority_mismatch",
            format!("the request names another host inside a tunnel to {tunnel}"),
        ));
    }
    let (host, port, tls) = match conn.sni {
        Some(sni) => (sni.to_owned(), conn.port, true),
        None if conn.proxy_form && conn.tunnel_host.is_none() => (host, port.unwrap_or(80), false),
        None => (host, conn.port, false),
    };
    Ok(Target {
        authority: authority.to_owned(),
        host,
        port,
        tls,
    })
}

/// `host[:port]` or `[v6][:port]`; the port only if it is plain digits.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host, port.parse().ok())
        }
        _ => (authority, None),
    }
}

fn canonical(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// Where each binding's placeholder appears in the head. Placeholders in a
/// header name or the path are refused outright: no surface covers them.
fn scan(parts: &Parts, snapshot: &Snapshot) -> Result<Vec<SeenOn>, Refusal> {
    let set = &*snapshot.placeholders;
    if set.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen = vec![SeenOn::default(); snapshot.bindings.len()];
    let mut found = BindingSet::new();
    for name in parts.headers.keys() {
        if let Some(b) = set.find(name.as_str().as_bytes()).iter().next() {
            return Err(Refusal::blocked(
                b,
                "placeholder_in_header_name",
                "a placeholder is never swapped into a header name",
            ));
        }
    }
    if let Some(b) = set.find(parts.uri.path().as_bytes()).iter().next() {
        return Err(Refusal::blocked(
            b,
            "placeholder_in_path",
            "a placeholder is never swapped into the path",
        ));
    }
    for (name, value) in &parts.headers {
        found.clear();
        set.find_into(value.as_bytes(), &mut found);
        if let Some(b) = found.iter().next()
            && is_reflected_header(name)
        {
            // Servers commonly store these and send them back (listings,
            // CORS, object metadata), in forms the echo checks may not see:
            // a credential never belongs in them.
            return Err(Refusal::blocked(
                b,
                "placeholder_in_reflected_header",
                format!("{name} is a header servers commonly store and send back"),
            ));
        }
        for b in found.iter() {
            if let Some(s) = seen.get_mut(b) {
                s.header = true;
            }
        }
        if *name == header::AUTHORIZATION {
            for b in set.find_in_basic_auth(value.as_bytes()).iter() {
                if let Some(s) = seen.get_mut(b) {
                    s.basic_auth = true;
                }
            }
        }
    }
    if let Some(query) = parts.uri.query() {
        for b in set.find(query.as_bytes()).iter() {
            if let Some(s) = seen.get_mut(b) {
                s.query = true;
            }
        }
    }
    Ok(seen)
}

/// Headers that name or describe content, or are copied along by
/// intermediaries, which servers commonly echo or store: never a place for
/// a credential.
fn is_reflected_header(name: &HeaderName) -> bool {
    const EXACT: [&str; 24] = [
        "user-agent",
        "referer",
        "origin",
        "host",
        "content-type",
        "content-disposition",
        "content-language",
        "content-location",
        "accept",
        "accept-language",
        "accept-charset",
        "accept-encoding",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
        "range",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "via",
        "location",
    ];
    const PREFIXES: [&str; 5] = [
        "x-amz-meta-",
        "x-goog-meta-",
        "x-ms-meta-",
        "x-object-meta-",
        "x-container-meta-",
    ];
    let name = name.as_str();
    EXACT.iter().any(|e| same_header_name(name, e))
        || PREFIXES.iter().any(|p| starts_like_header(name, p))
}

/// Headers that ask the upstream to act as if the method or the path were
/// another one (honoured by Google APIs, IIS, Symfony and many frameworks):
/// on a request carrying a secret toward a destination that limits methods
/// or paths, they would walk around the limit.
const OVERRIDE_HEADERS: [&str; 5] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// The query parameter Rails, Laravel and Symfony read as the method.
const OVERRIDE_PARAMETER: &str = "_method";

/// Range requests, including Azure's own header.
const RANGE_HEADERS: [&str; 3] = ["range", "if-range", "x-ms-range"];

fn limits_method_or_path(snapshot: &Snapshot, binding: usize) -> bool {
    snapshot.bindings.get(binding).is_some_and(|b| {
        b.destinations
            .iter()
            .any(|d| !d.methods.is_empty() || !d.paths.is_empty())
    })
}

/// A header or query parameter that would make the upstream act on another
/// method or path, named for the refusal.
fn method_or_path_override(parts: &Parts) -> Option<String> {
    if let Some(name) = parts.headers.keys().find(|n| {
        OVERRIDE_HEADERS
            .iter()
            .any(|o| same_header_name(n.as_str(), o))
    }) {
        return Some(name.as_str().to_owned());
    }
    let query = parts.uri.query()?;
    query
        .split('&')
        .map(|pair| pair.split('=').next().unwrap_or(""))
        .any(|key| decodes_to_ignoring_case(key, OVERRIDE_PARAMETER))
        .then(|| format!("the query parameter {OVERRIDE_PARAMETER}"))
}

/// Whether the percent-encoded `s` decodes to `want`, ASCII case ignored
/// (`%5Fmethod` and `_METHOD` are `_method` to a framework).
fn decodes_to_ignoring_case(s: &str, want: &str) -> bool {
    let (mut s, mut want) = (s.as_bytes(), want.as_bytes());
    while let Some((&w, rest)) = want.split_first() {
        let (byte, len) = match s {
            [b'%', h, l, ..] => match (hex_value(*h), hex_value(*l)) {
                (Some(h), Some(l)) => ((h << 4) | l, 3),
                _ => (b'%', 1),
            },
            [b, ..] => (*b, 1),
            [] => return false,
        };
        if !byte.eq_ignore_ascii_case(&w) {
            return false;
        }
        (s, want) = (&s[len..], rest);
    }
    s.is_empty()
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Header names as gateways that map them to `HTTP_*` variables (CGI, Rack,
/// WSGI) see them: `_` and `-` are the same there, so `X_HTTP_Method` is
/// `X-HTTP-Method`. `name` is lower case, as `http` keeps names.
fn same_header_name(name: &str, canonical: &str) -> bool {
    name.len() == canonical.len() && starts_like_header(name, canonical)
}

fn starts_like_header(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name
            .bytes()
            .zip(prefix.bytes())
            .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
}

/// Swaps the placeholders of `injected` in header values, basic-auth
/// credentials and the query; every swapped header is marked sensitive.
fn swap_head(
    parts: &mut Parts,
    snapshot: &Snapshot,
    injected: &BindingSet,
    seen: &[SeenOn],
) -> Result<(), Refusal> {
    let set = &*snapshot.placeholders;
    let raw = Lookup {
        snapshot,
        allowed: injected.clone(),
        form: Form::Raw,
    };
    let refused = |e: SubstituteError| match e {
        SubstituteError::UnsafeForHeader { binding, .. } => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Outcome::SecretUnavailable,
            "value_unsafe_for_header",
            "the secret holds CR, LF, NUL or another control character, which a header cannot \
             carry",
        )
        .for_binding(binding),
        other => Refusal::blocked(
            other.binding(),
            other.reason(),
            other.reason().replace('_', " "),
        ),
    };
    for (name, value) in parts.headers.iter_mut() {
        let replaced = if *name == header::AUTHORIZATION
            && let Some(new) = set
                .replace_in_basic_auth(value.as_bytes(), &raw)
                .map_err(refused)?
        {
            Some(sensitive(new.expose_secret())?)
        } else {
            let new = set
                .replace_in_header(value.as_bytes(), &raw)
                .map_err(refused)?;
            if new.is_unchanged() {
                None
            } else {
                Some(sensitive(new.expose_secret())?)
            }
        };
        if let Some(new) = replaced {
            *value = new;
        }
    }
    // The query is not secret (it holds placeholders), so a copy is fine.
    if seen.iter().any(|s| s.query)
        && let Some(query) = parts.uri.query().map(str::to_owned)
    {
        let percent = Lookup {
            snapshot,
            allowed: injected.clone(),
            form: Form::Percent,
        };
        let new = set.replace(query.as_bytes(), &percent).map_err(refused)?;
        if !new.is_unchanged() {
            let mut pq = Vec::with_capacity(parts.uri.path().len() + 1 + new.expose_secret().len());
            pq.extend_from_slice(parts.uri.path().as_bytes());
            pq.push(b'?');
            pq.extend_from_slice(new.expose_secret());
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = Some(
                http::uri::PathAndQuery::from_maybe_shared(bytes::Bytes::from(pq)).map_err(
                    |_| Refusal::bad_request("rewrite_failed", "the query could not be rewritten"),
                )?,
            );
            parts.uri = Uri::from_parts(uri).map_err(|_| {
                Refusal::bad_request(
                    "rewrite_failed",
                    "the request target could not be rewritten",
                )
            })?;
        }
    }
    Ok(())
}

fn sensitive(bytes: &[u8]) -> Result<HeaderValue, Refusal> {
    let mut value = HeaderValue::from_bytes(bytes).map_err(|_| {
        Refusal::bad_request(
            "rewrite_failed",
            "a swapped header value is not a valid header value",
        )
    })?;
    // HPACK never indexes a sensitive value (HTTP/2 header compression
    // would otherwise keep the secret in the connection's table).
    value.set_sensitive(true);
    Ok(value)
}

fn is_websocket_upgrade(parts: &Parts) -> bool {
    parts.version == Version::HTTP_11
        && header_has_token(&parts.headers, header::UPGRADE, "websocket")
        && header_has_token(&parts.headers, header::CONNECTION, "upgrade")
}

fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Drops hop-by-hop headers and those the `Connection` header names. For a
/// WebSocket upgrade, `Connection: upgrade` and `Upgrade` stay.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    let upgrade_value = upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if let Some(te) = headers.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        headers.remove(header::TE);
    }
    if let Some(value) = upgrade_value {
        headers.insert(header::UPGRADE, value);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn body_plan(
    parts: &Parts,
    body_empty: bool,
    snapshot: &Snapshot,
    facts: &RequestFacts<'_>,
) -> Result<BodyPlan, Refusal> {
    if snapshot.placeholders.is_empty() || body_empty {
        return Ok(BodyPlan::Untouched);
    }
    let allowed = snapshot.swappable_on(Surface::Body, facts);
    if allowed.is_empty() {
        return Ok(BodyPlan::Detect);
    }
    let compressed = parts
        .headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if compressed {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Outcome::Unsupported,
            "compressed_request_body",
            "the request body is compressed (Content-Encoding), so a placeholder in it cannot \
             be swapped; send it uncompressed",
        ));
    }
    Ok(BodyPlan::Replace {
        allowed,
        form: body_form(&parts.headers),
    })
}

/// How a secret is written into a body of this content type.
fn body_form(headers: &HeaderMap) -> Form {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return Form::Raw;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Form::Json
    } else if essence == "application/x-www-form-urlencoded" {
        Form::Percent
    } else {
        Form::Raw
    }
}

#[cfg(test)]
mod tests;
