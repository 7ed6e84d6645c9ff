//! What to do with a connection once its first bytes were peeked (shared
//! by the transparent proxy and the local proxy's CONNECT tunnels):
//!
//! - TLS whose SNI (and destination port) a binding covers: terminate it
//!   with a leaf for that name, pinned so the handshake cannot ask for
//!   another, and serve HTTP/1.1 or HTTP/2 by ALPN;
//! - cleartext HTTP/1.1 or HTTP/2 with prior knowledge: serve it (a
//!   placeholder goes out only where its binding allows cleartext);
//! - anything else (TLS for an unbound name, no SNI, a server-speaks-first
//!   protocol, other cleartext): splice it to where it was going, untouched
//!   (cleartext still scanned for placeholders), or refuse it in `deny`
//!   egress mode.
//!
//! The choice is [`classify`], a pure function; [`route`] carries it out.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::audit::{AuditRecord, Outcome};
use crate::config::EgressMode;
use crate::engine::{Engine, Snapshot};
use crate::exchange::{ConnInfo, Protocol};
use crate::intercept::{PeekVerdict, Peeked, Replay};
use crate::listen::ConnGuard;
use crate::splice::{Checks, SpliceEnd, splice};
use crate::tls::leaf::normalize_sni;
use crate::upstream::{dial, resolve};

/// How to reach where a connection was going, for a splice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dial {
    /// The original destination (transparent mode).
    Addr(SocketAddr),
    /// A name the sidecar resolves (local mode's CONNECT target).
    Name(String, u16),
}

impl std::fmt::Display for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => a.fmt(f),
            Self::Name(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// Where a connection was going.
#[derive(Debug, Clone)]
pub struct Destination {
    pub port: u16,
    pub dial: Dial,
    /// Transparent mode: the original destination.
    pub original: Option<SocketAddr>,
    /// Local mode: the CONNECT target's host.
    pub tunnel_host: Option<String>,
}

/// A stream a refusal can reset: the agent then sees a refusal at once
/// rather than a hang or a clean close.
pub trait Refusable {
    fn reset_on_close(&self) {}
}

impl Refusable for tokio::net::TcpStream {
    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

impl<T> Refusable for hyper_util::rt::TokioIo<T> {}

/// What to do with a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Terminate TLS for this (lower-case) name.
    Terminate(String),
    /// Serve it as cleartext HTTP (after reading enough to tell).
    Cleartext,
    /// Splice it; `scan`: the bytes are cleartext, check for placeholders.
    Splice { scan: bool },
    /// Refuse it, with a stable reason.
    Refuse(&'static str),
    /// Nothing to do (the client gave up).
    Drop,
}

/// Decides what to do with a connection from its first bytes (pure).
pub fn classify(
    snapshot: &Snapshot,
    verdict: &PeekVerdict,
    destination: &Destination,
    egress: EgressMode,
) -> Route {
    let splice = |scan| match egress {
        EgressMode::Deny => Route::Refuse("egress_deny"),
        EgressMode::Passthrough => Route::Splice { scan },
    };
    match verdict {
        PeekVerdict::ClientHello(hello) => {
            let sni = hello
                .sni
                .as_deref()
                .and_then(|s| normalize_sni(s).ok())
                .map(|s| s.into_owned());
            let port = destination.port;
            let sni_covered = sni
                .as_deref()
                .is_some_and(|s| snapshot.covers(s, port, true));
            let tunnel = destination.tunnel_host.as_deref();
            let tunnel_covered = tunnel.is_some_and(|t| snapshot.covers(t, port, true));
            match (sni, tunnel) {
                (Some(sni), None) if sni_covered => Route::Terminate(sni),
                (Some(sni), Some(t)) if sni_covered && sni == t => Route::Terminate(sni),
                // A tunnel to a bound host must carry TLS for that very
                // name, and a bound name must come through its own tunnel:
                // anything else is refused, not spliced.
                _ if sni_covered || tunnel_covered => Route::Refuse("server_name_mismatch"),
                _ => splice(false),
            }
        }
        PeekVerdict::NotTls => Route::Cleartext,
        PeekVerdict::Malformed(_) | PeekVerdict::Silent => splice(true),
        PeekVerdict::Stalled | PeekVerdict::Closed => Route::Drop,
    }
}

/// Handles a connection whose first bytes `peeked` read from `stream`.
pub async fn route<S>(
    engine: Arc<Engine>,
    stream: S,
    peeked: Peeked,
    destination: Destination,
    guard: Arc<ConnGuard>,
) where
    S: AsyncRead + AsyncWrite + Refusable + Unpin + Send + 'static,
{
    let snapshot = engine.snapshot();
    match classify(
        &snapshot,
        &peeked.verdict,
        &destination,
        engine.settings.egress,
    ) {
        Route::Terminate(sni) => {
            terminate(engine, stream, peeked.bytes, sni, destination, guard).await;
        }
        Route::Cleartext => {
            let mut stream = stream;
            let mut bytes = peeked.bytes;
            match sniff_cleartext(&mut stream, &mut bytes, engine.settings.header_timeout).await {
                Sniff::Http1 | Sniff::H2Prior => {
                    let protocol = if bytes.starts_with(H2_PREFACE) {
                        Protocol::Http2
                    } else {
                        Protocol::Http1
                    };
                    engine.metrics.connection("cleartext");
                    let info = ConnInfo {
                        sni: None,
                        port: destination.port,
                        original: destination.original,
                        tunnel_host: destination.tunnel_host.clone(),
                        proxy_form: false,
                        guard: Some(guard),
                    };
                    crate::exchange::serve(Replay::new(bytes, stream), protocol, info, engine)
                        .await;
                }
                Sniff::Other | Sniff::NeedMore => {
                    if engine.settings.egress == EgressMode::Deny {
                        refuse(&engine, &stream, &destination, "egress_deny");
                    } else {
                        passthrough(&engine, stream, bytes, &destination, true).await;
                    }
                }
            }
        }
        Route::Splice { scan } => {
            passthrough(&engine, stream, peeked.bytes, &destination, scan).await
        }
        Route::Refuse(reason) => refuse(&engine, &stream, &destination, reason),
        Route::Drop => engine.metrics.connection("abandoned"),
    }
}

/// Refuses a connection: counted by cause, audited, and reset.
fn refuse<S: Refusable>(
    engine: &Engine,
    stream: &S,
    destination: &Destination,
    reason: &'static str,
) {
    stream.reset_on_close();
    engine.metrics.connection(match reason {
        "egress_deny" => "refused_egress",
        "strict_destination" => "refused_strict",
        _ => "refused_mismatch",
    });
    let mut record = AuditRecord::new(&destination.dial.to_string(), "", "");
    record.protocol = Some("tcp");
    record.decision = Outcome::Refused;
    record.reason = Some(reason);
    engine.audit.record(record);
    tracing::info!(destination = %destination.dial, reason, "connection refused");
}

/// Terminates TLS for a bound `sni` and serves HTTP on it.
async fn terminate<S>(
    engine: Arc<Engine>,
    stream: S,
    prefix: Vec<u8>,
    sni: String,
    destination: Destination,
    guard: Arc<ConnGuard>,
) where
    S: AsyncRead + AsyncWrite + Refusable + Unpin + Send + 'static,
{
    if engine.settings.strict_destination
        && let Some(original) = destination.original
        && !resolves_to(
            &sni,
            destination.port,
            original,
            engine.settings.localhost_is_loopback,
        )
        .await
    {
        tracing::warn!(sni = %sni, original = %original,
            "strict destination: the connection's destination is not an address of its name");
        refuse(&engine, &stream, &destination, "strict_destination");
        return;
    }
    let config = match engine.leaves.cached_config(&sni) {
        Some(config) => config,
        None => {
            // Minting signs with the CA key: off the async threads.
            let leaves = engine.leaves.clone();
            let name = sni.clone();
            match tokio::task::spawn_blocking(move || leaves.config_for(&name)).await {
                Ok(Ok(config)) => config,
                Ok(Err(e)) => {
                    tracing::error!(sni = %sni, error = %e, "no leaf certificate; connection closed");
                    return;
                }
                Err(e) => {
                    tracing::error!(sni = %sni, error = %e, "minting a leaf failed; connection closed");
                    return;
                }
            }
        }
    };
    let timeout = engine.settings.header_timeout;
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
        rustls::server::Acceptor::default(),
        Replay::new(prefix, stream),
    );
    let start = match tokio::time::timeout(timeout, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            tracing::debug!(sni = %sni, error = %e, "TLS handshake from the agent failed");
            return;
        }
        Err(_) => return,
    };
    let asked = start
        .client_hello()
        .server_name()
        .and_then(|s| normalize_sni(s).ok())
        .map(|s| s.into_owned());
    if asked.as_deref() != Some(sni.as_str()) {
        // The TLS stack read another name than the router did: refuse
        // rather than guess which one is meant.
        engine.metrics.connection("refused_mismatch");
        tracing::warn!(sni = %sni, "the TLS handshake names another server than its first bytes did; refused");
        return;
    }
    let tls = match tokio::time::timeout(timeout, start.into_stream(config)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(sni = %sni, error = %e, "TLS handshake from the agent failed");
            return;
        }
        Err(_) => return,
    };
    engine.metrics.connection("terminated");
    let protocol = if tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let info = ConnInfo {
        sni: Some(sni),
        port: destination.port,
        original: destination.original,
        tunnel_host: destination.tunnel_host,
        proxy_form: false,
        guard: Some(guard),
    };
    crate::exchange::serve(tls, protocol, info, engine).await;
}

/// Whether `name` resolves to `original`'s address.
pub async fn resolves_to(
    name: &str,
    port: u16,
    original: SocketAddr,
    localhost_is_loopback: bool,
) -> bool {
    resolve(name, port, localhost_is_loopback)
        .await
        .is_ok_and(|addrs| {
            addrs
                .iter()
                .any(|a| a.ip().to_canonical() == original.ip().to_canonical())
        })
}

/// Splices a connection no binding covers to where it was going.
/// `scan`: the bytes are cleartext, so the agent's side is checked for
/// placeholders.
async fn passthrough<S>(
    engine: &Arc<Engine>,
    stream: S,
    prefix: Vec<u8>,
    destination: &Destination,
    scan: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let timeout = engine.settings.connect_timeout;
    let upstream = match &destination.dial {
        Dial::Addr(addr) => dial(&addr.to_string(), &[*addr], timeout).await,
        Dial::Name(host, port) => {
            match resolve(host, *port, engine.settings.localhost_is_loopback).await {
                Ok(addrs) => dial(&format!("{host}:{port}"), &addrs, timeout).await,
                Err(e) => Err(e),
            }
        }
    };
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(e) => {
            engine.metrics.connection("unreachable");
            tracing::info!(destination = %destination.dial, error = %e, "passthrough: could not reach the destination");
            return;
        }
    };
    engine.metrics.connection("passthrough");
    let snapshot = engine.snapshot();
    let checks = Checks {
        scan: scan.then(|| snapshot.placeholders.clone()),
        echo: None,
    };
    let end = splice(
        stream,
        upstream,
        &prefix,
        engine.settings.idle_timeout,
        checks,
    )
    .await;
    if let SpliceEnd::Placeholder { binding } = end {
        let id = snapshot.binding_id(binding).unwrap_or("?").to_owned();
        let label = snapshot.label(binding);
        engine.metrics.blocked(&label, "destination_not_bound");
        let mut record = AuditRecord::new(&destination.dial.to_string(), "", "");
        record.protocol = Some("tcp");
        record.decision = Outcome::ExfiltrationBlocked;
        record.reason = Some("destination_not_bound");
        record.detail = Some(
            "a placeholder in a cleartext stream to an unbound destination; connection closed"
                .into(),
        );
        record.bindings = vec![Arc::from(id.as_str())];
        engine.audit.record(record);
        tracing::warn!(binding = %id, destination = %destination.dial,
            "a placeholder was sent in cleartext to an unbound destination; connection closed");
    }
}

/// The HTTP/2 client preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest request line looked at before deciding a stream is not HTTP.
const MAX_REQUEST_LINE: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    NeedMore,
    Http1,
    H2Prior,
    Other,
}

/// Whether cleartext bytes begin an HTTP/1.x request line or the HTTP/2
/// preface (pure; every prefix of a request line is `NeedMore`).
pub fn classify_cleartext(bytes: &[u8]) -> Sniff {
    if bytes.is_empty() {
        return Sniff::NeedMore;
    }
    let h2_possible = H2_PREFACE.starts_with(&bytes[..bytes.len().min(H2_PREFACE.len())]);
    if h2_possible && bytes.len() >= H2_PREFACE.len() {
        return Sniff::H2Prior;
    }
    // METHOD SP target SP HTTP/1.x CRLF
    let mut i = 0;
    while i < bytes.len() && bytes[i].is_ascii_uppercase() && i < 20 {
        i += 1;
    }
    if i == bytes.len() {
        return Sniff::NeedMore;
    }
    if i == 0 || bytes[i] != b' ' {
        return Sniff::Other;
    }
    i += 1;
    let target_start = i;
    while i < bytes.len() && bytes[i] > b' ' && bytes[i] != 0x7f {
        i += 1;
    }
    if i == bytes.len() {
        return if bytes.len() > MAX_REQUEST_LINE {
            Sniff::Other
        } else {
            Sniff::NeedMore
        };
    }
    if i == target_start || bytes[i] != b' ' {
        return if h2_possible {
            Sniff::NeedMore
        } else {
            Sniff::Other
        };
    }
    i += 1;
    let version = &bytes[i..];
    let want = b"HTTP/1.";
    let n = version.len().min(want.len());
    if version[..n] != want[..n] {
        return if h2_possible {
            Sniff::NeedMore
        } else {
            Sniff::Other
        };
    }
    if version.len() <= want.len() {
        return Sniff::NeedMore;
    }
    if !version[want.len()].is_ascii_digit() {
        return Sniff::Other;
    }
    match version.get(want.len() + 1) {
        None => Sniff::NeedMore,
        Some(b'\r') | Some(b'\n') => {
            if h2_possible {
                // "PRI * HTTP/1.x" is not the preface; read on.
                Sniff::NeedMore
            } else {
                Sniff::Http1
            }
        }
        Some(_) => Sniff::Other,
    }
}

/// A fuzz target: [`classify_cleartext`] never panics, and once it decides,
/// longer input keeps the decision.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_classify_cleartext(data: &[u8]) {
    let mut decided: Option<(usize, Sniff)> = None;
    for end in 0..=data.len().min(MAX_REQUEST_LINE + 64) {
        let verdict = classify_cleartext(&data[..end]);
        match decided {
            Some((at, first)) => assert_eq!(verdict, first, "decided at {at}, changed at {end}"),
            None if verdict != Sniff::NeedMore => decided = Some((end, verdict)),
            None => {}
        }
    }
}

/// Reads from `stream` into `bytes` until [`classify_cleartext`] decides
/// (or `timeout` passes: then what was read decides).
async fn sniff_cleartext<S: AsyncRead + Unpin>(
    stream: &mut S,
    bytes: &mut Vec<u8>,
    timeout: std::time::Duration,
) -> Sniff {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match classify_cleartext(bytes) {
            Sniff::NeedMore if bytes.len() < MAX_REQUEST_LINE + H2_PREFACE.len() => {}
            Sniff::NeedMore => return Sniff::Other,
            decided => return decided,
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Sniff::Other,
            Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::ClientHello;

    fn snapshot_with_bound(host: &str, port: u16) -> Snapshot {
        let bindings = credbroker_crds::config::SidecarBindings::from_json(&format!(
            r#"{{"formatVersion":1,"bindings":[{{"id":"b","secret":{{"mount":"s","path":"p","key":"k"}},
               "destinations":[{{"host":"{host}","port":{port}}}]}}]}}"#
        ))
        .unwrap()
        .bindings;
        let tls = crate::tls::throwaway_upstream_tls();
        let settings = crate::upstream::UpstreamSettings::for_tests();
        Snapshot {
            labels: vec![crate::metrics::BindingLabel(Arc::from("b"))],
            bindings,
            placeholders: Arc::new(crate::substitute::PlaceholderSet::empty()),
            secrets: vec![crate::engine::Slot::State(
                crate::store::SecretState::Pending,
            )],
            echo: Arc::new(crate::echo::EchoDetector::empty()),
            upstreams: Arc::new(crate::upstream::Upstreams::new(
                tls,
                crate::upstream::DestinationTrust::default(),
                settings,
            )),
        }
    }

    fn hello(sni: Option<&str>) -> PeekVerdict {
        PeekVerdict::ClientHello(ClientHello {
            sni: sni.map(str::to_owned),
            alpn: Vec::new(),
        })
    }

    #[test]
    fn connections_are_terminated_spliced_or_refused_as_the_table_says() {
        let snap = snapshot_with_bound("api.bound.test", 443);
        let transparent = |port| Destination {
            port,
            dial: Dial::Addr(SocketAddr::from(([10, 0, 0, 1], port))),
            original: Some(SocketAddr::from(([10, 0, 0, 1], port))),
            tunnel_host: None,
        };
        let tunnel = |host: &str, port| Destination {
            port,
            dial: Dial::Name(host.into(), port),
            original: None,
            tunnel_host: Some(host.into()),
        };
        use EgressMode::{Deny, Passthrough};
        let cases: Vec<(PeekVerdict, Destination, EgressMode, Route)> = vec![
            (
                hello(Some("api.bound.test")),
                transparent(443),
                Passthrough,
                Route::Terminate("api.bound.test".into()),
            ),
            (
                hello(Some("API.Bound.Test.")),
                transparent(443),
                Deny,
                Route::Terminate("api.bound.test".into()),
            ),
            (
                hello(Some("api.bound.test")),
                transparent(8443),
                Passthrough,
                Route::Splice { scan: false },
            ),
            (
                hello(Some("other.test")),
                transparent(443),
                Passthrough,
                Route::Splice { scan: false },
            ),
            (
                hello(Some("other.test")),
                transparent(443),
                Deny,
                Route::Refuse("egress_deny"),
            ),
            (
                hello(None),
                transparent(443),
                Passthrough,
                Route::Splice { scan: false },
            ),
            (
                hello(None),
                transparent(443),
                Deny,
                Route::Refuse("egress_deny"),
            ),
            (PeekVerdict::NotTls, transparent(80), Deny, Route::Cleartext),
            (
                PeekVerdict::Silent,
                transparent(25),
                Passthrough,
                Route::Splice { scan: true },
            ),
            (
                PeekVerdict::Silent,
                transparent(25),
                Deny,
                Route::Refuse("egress_deny"),
            ),
            (
                PeekVerdict::Malformed("x"),
                transparent(443),
                Passthrough,
                Route::Splice { scan: true },
            ),
            (
                PeekVerdict::Stalled,
                transparent(443),
                Passthrough,
                Route::Drop,
            ),
            (
                hello(Some("api.bound.test")),
                tunnel("api.bound.test", 443),
                Passthrough,
                Route::Terminate("api.bound.test".into()),
            ),
            (
                hello(Some("other.test")),
                tunnel("api.bound.test", 443),
                Passthrough,
                Route::Refuse("server_name_mismatch"),
            ),
            (
                hello(None),
                tunnel("api.bound.test", 443),
                Passthrough,
                Route::Refuse("server_name_mismatch"),
            ),
            (
                hello(Some("api.bound.test")),
                tunnel("other.test", 443),
                Passthrough,
                Route::Refuse("server_name_mismatch"),
            ),
            (
                hello(Some("other.test")),
                tunnel("other.test", 443),
                Passthrough,
                Route::Splice { scan: false },
            ),
        ];
        for (verdict, destination, egress, want) in cases {
            assert_eq!(
                classify(&snap, &verdict, &destination, egress),
                want,
                "{verdict:?} {destination:?} {egress:?}"
            );
        }
    }

    #[test]
    fn cleartext_http_is_told_from_other_protocols() {
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Sniff::Http1),
            (b"POST /v1/x?y=1 HTTP/1.0\n", Sniff::Http1),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Sniff::H2Prior),
            (b"GET / HTTP/1.1", Sniff::NeedMore),
            (b"GE", Sniff::NeedMore),
            (b"P", Sniff::NeedMore),
            (b"PRI * HTTP/2", Sniff::NeedMore),
            (b"SET k v\r\n", Sniff::Other),
            (b"*1\r\n$4\r\nPING\r\n", Sniff::Other),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Sniff::Other),
            (b"get key\r\n", Sniff::Other),
            (b"GET / HTTP/2.0\r\n", Sniff::Other),
            (b"GET  / HTTP/1.1\r\n", Sniff::Other),
        ] {
            assert_eq!(
                classify_cleartext(bytes),
                want,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        // Every prefix of a request line asks for more.
        let line = b"DELETE /a/b HTTP/1.1\r\n";
        for end in 1..line.len() - 1 {
            assert_eq!(classify_cleartext(&line[..end]), Sniff::NeedMore, "{end}");
        }
        let long = [b"GET /".as_slice(), &[b'a'; MAX_REQUEST_LINE]].concat();
        assert_eq!(classify_cleartext(&long), Sniff::Other);
        for data in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"PRI * HTTP/1.1\r\n",
        ] {
            fuzz_classify_cleartext(data);
        }
    }
}
