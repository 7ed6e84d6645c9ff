//! `credbroker-demo-upstream`: the HTTPS API that `make demo` (demo/run.sh)
//! sends its agent's requests to, through the broker.
//!
//! It stands where a real API would, and prints on stdout one line per
//! request with the credential that request carried: the point of the demo
//! is that the agent sent a placeholder and this line shows the real key.
//! It answers `200` with a small JSON body that never repeats the credential
//! (the broker cuts a response that echoes a secret). Its certificate is for
//! `localhost` (or the `--name`s given), from a fresh CA written to
//! `--ca-file`, which the broker is told to trust for upstreams.

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use credbroker_test_support::upstream::{
    Behaviour, HeaderValue, Method, RecordedRequest, Reply, Upstream, header,
};

/// What every request gets back: model-list shaped, and free of anything
/// the request carried.
const BODY: &str = concat!(
    r#"{"object":"list","data":[{"id":"demo-model","object":"model","#,
    r#""owned_by":"credbroker-demo"}]}"#,
    "\n"
);

/// A recording HTTPS upstream for `make demo`: prints the credential each
/// request carried, and answers 200 with JSON that does not contain it.
#[derive(Debug, Parser)]
#[command(name = "credbroker-demo-upstream", version)]
struct Args {
    /// Where to listen: a loopback address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// A DNS name or IP address for the server certificate; repeatable.
    #[arg(long = "name", value_name = "NAME", default_value = "localhost")]
    names: Vec<String>,
    /// Where to write the PEM of the CA that issued the server certificate.
    /// It appears once the upstream accepts connections.
    #[arg(long, value_name = "FILE")]
    ca_file: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credbroker-demo-upstream: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    // It prints credentials: only this machine may reach it.
    if !args.listen.ip().is_loopback() {
        return Err(format!(
            "--listen {}: the demo upstream listens on loopback only (127.0.0.1 or [::1])",
            args.listen
        ));
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?
        .block_on(serve(args))
}

async fn serve(args: &Args) -> Result<(), String> {
    let listener =
        TcpListener::bind(args.listen).map_err(|e| format!("listening on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("reading the address of {}: {e}", args.listen))?;
    let upstream = Upstream::https(args.names.iter().cloned())
        .behaviour(Behaviour::custom(answer))
        .start(listener)
        .map_err(|e| format!("starting the HTTPS server on {addr}: {e}"))?;
    let ca_pem = upstream
        .ca_pem()
        .ok_or("the HTTPS server has no CA certificate")?;
    write_atomically(&args.ca_file, ca_pem)?;
    say(&format!(
        "upstream: listening on {addr}, certificate for {}, CA in {}",
        args.names.join(", "),
        args.ca_file.display()
    ));
    stopped().await?;
    upstream.shutdown().await;
    Ok(())
}

/// Prints what the request carried, and answers it.
fn answer(request: &RecordedRequest) -> Reply {
    say(&describe(
        &request.method,
        &request.path,
        request.headers.get(header::AUTHORIZATION),
    ));
    Reply::ok()
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )
        .body(BODY)
}

/// `upstream: received GET /v1/models with Authorization: Bearer <value>`,
/// with bytes that are not printable ASCII escaped.
fn describe(method: &Method, path: &str, authorization: Option<&HeaderValue>) -> String {
    let credential = match authorization {
        Some(value) => format!("with Authorization: {}", value.as_bytes().escape_ascii()),
        None => "with no Authorization header".to_string(),
    };
    format!(
        "upstream: received {method} {} {credential}",
        path.escape_debug()
    )
}

/// One line on stdout, flushed at once: run.sh reads the lines as they come.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A reader that went away (the demo stopping) is no reason to stop
    // answering.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Writes `contents` to `path` through a temporary file beside it, so whoever
/// waits for the file never reads half of it.
fn write_atomically(path: &Path, contents: &str) -> Result<(), String> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, contents)
        .map_err(|e| format!("writing --ca-file {}: {e}", partial.display()))?;
    std::fs::rename(&partial, path)
        .map_err(|e| format!("writing --ca-file {}: {e}", path.display()))
}

/// Waits for SIGTERM or SIGINT, so the server's own files are removed on the
/// way out.
async fn stopped() -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("listening for SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("listening for SIGINT: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_described_with_its_credential() {
        let bearer = HeaderValue::from_static("Bearer demo-key-v1-0123");
        assert_eq!(
            describe(&Method::GET, "/v1/models", Some(&bearer)),
            "upstream: received GET /v1/models with Authorization: Bearer demo-key-v1-0123"
        );
        assert_eq!(
            describe(&Method::POST, "/v1/chat", None),
            "upstream: received POST /v1/chat with no Authorization header"
        );
    }

    #[test]
    fn unprintable_bytes_are_escaped_not_printed() {
        let odd = HeaderValue::from_bytes(b"Bearer \xff\xfe-key").unwrap();
        assert_eq!(
            describe(&Method::GET, "/", Some(&odd)),
            r"upstream: received GET / with Authorization: Bearer \xff\xfe-key"
        );
    }

    #[test]
    fn a_listen_address_off_loopback_is_refused() {
        let args = Args::try_parse_from([
            "credbroker-demo-upstream",
            "--listen",
            "0.0.0.0:0",
            "--ca-file",
            "/nonexistent/ca.pem",
        ])
        .unwrap();
        assert!(run(&args).unwrap_err().contains("loopback only"));
    }

    #[test]
    fn the_answer_carries_nothing_from_the_request() {
        assert!(!BODY.contains("demo-key"));
        assert!(BODY.starts_with('{') && BODY.ends_with("}\n"));
    }
}
