//! Local mode: an explicit HTTP proxy on loopback with the same engine, for
//! laptops, CI and the demo (`HTTPS_PROXY=http://127.0.0.1:PORT`).
//!
//! - `CONNECT host:port`: a tunnel. To a bound host, the sidecar answers
//!   `200` and then treats the tunnel exactly like an intercepted connection
//!   to `host:port` (its TLS must name `host`); to another host it splices
//!   to the name it resolved itself, or refuses with `403` in `deny` mode.
//! - absolute-form requests (`GET http://host/path`): cleartext HTTP,
//!   decided as in the pod.
//! - anything else gets a `400` saying how to use the proxy.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::audit::{AuditRecord, Outcome};
use crate::config::EgressMode;
use crate::engine::Engine;
use crate::exchange::guard::GuardedIo;
use crate::exchange::{
    ConnInfo, RespBody, handler, http1_builder, json_response, serve_h1_until_shutdown,
};
use crate::intercept::{PeekTimeouts, peek_client_hello};
use crate::listen::{ConnGuard, Listener, accept_loop};
use crate::route::{Destination, Dial, route};

/// Serves proxy clients on `listener` until shutdown.
pub async fn serve(engine: Arc<Engine>, listener: TcpListener) {
    let l = Listener::for_agents(&engine, listener, "local");
    accept_loop(l, move |stream, guard| {
        serve_client(engine.clone(), stream, guard)
    })
    .await;
}

async fn serve_client(engine: Arc<Engine>, stream: TcpStream, guard: Arc<ConnGuard>) {
    let (io, verdicts) = GuardedIo::new(
        stream,
        crate::exchange::guard::head_limit(engine.settings.max_header_bytes),
    );
    let info = Arc::new(ConnInfo {
        proxy_form: true,
        guard: Some(guard.clone()),
        ..ConnInfo::default()
    });
    let service = {
        let engine = engine.clone();
        service_fn(move |request: Request<Incoming>| {
            let (engine, info, verdicts) = (engine.clone(), info.clone(), verdicts.clone());
            let guard = guard.clone();
            async move {
                let response = if request.method() == Method::CONNECT {
                    // The guard follows heads only up to a CONNECT; take
                    // its verdict so the next request gets its own.
                    let _ = verdicts.next();
                    connect(engine, request, guard)
                } else {
                    handler::handle(engine, info, Some(verdicts), request).await
                };
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let shutdown = engine.shutdown.clone();
    let conn = http1_builder(&engine.settings)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = serve_h1_until_shutdown(conn, &shutdown).await {
        tracing::debug!(error = %e, "proxy client connection ended");
    }
}

/// Answers a CONNECT, and runs its tunnel (on the engine's tracker, holding
/// the client connection's place under the cap) once the client switches.
fn connect(
    engine: Arc<Engine>,
    mut request: Request<Incoming>,
    guard: Arc<ConnGuard>,
) -> Response<RespBody> {
    let refuse = |status, decision: Outcome, code, detail: &str| {
        close(json_response(status, decision.as_str(), code, detail, None))
    };
    let Some(authority) = request.uri().authority().cloned() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            Outcome::BadRequest,
            "connect_target",
            "CONNECT needs host:port",
        );
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let Some(port) = authority.port_u16() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            Outcome::BadRequest,
            "connect_target",
            "CONNECT needs host:port",
        );
    };
    if host.parse::<std::net::IpAddr>().is_err() && !credbroker_crds::validate::is_dns_name(&host) {
        return refuse(
            StatusCode::BAD_REQUEST,
            Outcome::BadRequest,
            "invalid_host",
            "CONNECT names something that is not a host name or an IP address",
        );
    }
    let snapshot = engine.snapshot();
    if !snapshot.covers(&host, port, true) && engine.settings.egress == EgressMode::Deny {
        engine.metrics.connection("refused_egress");
        let mut record = AuditRecord::new(&format!("{host}:{port}"), "CONNECT", "");
        record.protocol = Some(if request.version() == http::Version::HTTP_2 {
            "h2"
        } else {
            "h1"
        });
        record.decision = Outcome::EgressDenied;
        record.reason = Some("egress_deny");
        record.status = Some(403);
        engine.audit.record(record);
        return refuse(
            StatusCode::FORBIDDEN,
            Outcome::EgressDenied,
            "egress_deny",
            &format!("{host}:{port} is not a bound destination, and egress is deny"),
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    let tasks = engine.tasks.clone();
    tasks.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT tunnel was not opened");
                return;
            }
        };
        let mut io = TokioIo::new(upgraded);
        let timeouts = PeekTimeouts {
            first_byte: engine.settings.first_byte_timeout,
            complete: engine.settings.client_hello_timeout,
        };
        let peeked = match peek_client_hello(&mut io, timeouts).await {
            Ok(peeked) => peeked,
            Err(e) => {
                tracing::debug!(error = %e, "reading a tunnel's first bytes failed");
                return;
            }
        };
        let destination = Destination {
            port,
            dial: Dial::Name(host.clone(), port),
            original: None,
            tunnel_host: Some(host),
        };
        route(engine, io, peeked, destination, guard).await;
    });
    Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync())
}

/// Asks the client to close the connection after this answer (the framing
/// guard stops following a connection at a CONNECT).
fn close(mut response: Response<RespBody>) -> Response<RespBody> {
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}
