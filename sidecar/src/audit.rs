//! One JSON line per intercepted request (DESIGN.md section 4): which pod,
//! which binding, where to, the method and the path (never the query), the
//! decision, the upstream's status and the latency. Never a value, never a
//! placeholder, never a header.
//!
//! Records go to a writer thread through a bounded queue, so a slow log
//! pipe never stalls a request; a record that does not fit is counted
//! (`credbroker_sidecar_audit_records_dropped_total`) and said in a log line.
//! Security records (`exfiltration_blocked`, `echo_blocked`) wait for room
//! instead, off the request's thread, within bounds (see
//! [`AuditLog::record`]).

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use serde::Serialize;

use crate::metrics::Metrics;
use crate::{Error, Result};

/// The longest path kept in a record; the rest is cut (paths are not
/// secret, but unbounded fields make unbounded log lines).
pub const MAX_PATH_LEN: usize = 256;
/// Records the queue holds before new ones are dropped.
const QUEUE_LEN: usize = 8192;
/// Security records waiting for room in a full queue, at most; beyond,
/// they are dropped too (counted and logged): waiting must stay bounded.
const MAX_WAITING: usize = 1024;
/// How long a security record waits for room before it is dropped.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The audit record format's version: a field changes meaning or goes
/// away only with a new version.
pub const SCHEMA: u8 = 1;

/// What the sidecar did with a request or a connection: the vocabulary of
/// audit records, metrics (`decision` labels) and the sidecar's own answers
/// (`error`). Stable: changing a name is a breaking change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Forwarded; it carried no placeholder.
    Forwarded,
    /// Forwarded with secrets swapped in.
    Injected,
    /// A placeholder where its binding does not allow it: not forwarded.
    ExfiltrationBlocked,
    /// A secret came back from the upstream: the response was refused or cut.
    EchoBlocked,
    /// The request names another host than the connection's.
    Misdirected,
    /// The binding's secret is pending, failed or too stale.
    SecretUnavailable,
    BadRequest,
    /// Egress is deny, and the destination is not bound.
    EgressDenied,
    /// A compressed body that could need a swap.
    Unsupported,
    /// A response the echo checks cannot read (compressed, partial).
    NotInspectable,
    UpstreamError,
    /// The agent went away before the answer; the audit says what had
    /// been sent by then.
    Cancelled,
    /// A connection refused before any request (egress deny, a name
    /// mismatch, strict destination).
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Injected => "injected",
            Self::ExfiltrationBlocked => "exfiltration_blocked",
            Self::EchoBlocked => "echo_blocked",
            Self::Misdirected => "misdirected",
            Self::SecretUnavailable => "secret_unavailable",
            Self::BadRequest => "bad_request",
            Self::EgressDenied => "egress_denied",
            Self::Unsupported => "unsupported",
            Self::NotInspectable => "not_inspectable",
            Self::UpstreamError => "upstream_error",
            Self::Cancelled => "cancelled",
            Self::Refused => "refused",
        }
    }

    /// Whether the outcome is a security event: its audit record is never
    /// dropped, even when the writer is behind.
    pub fn is_security_event(self) -> bool {
        matches!(self, Self::ExfiltrationBlocked | Self::EchoBlocked)
    }
}

/// What happened to one request; field names are the audit format.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// Always `"audit"`, so the line stands out from log lines.
    pub kind: &'static str,
    /// [`SCHEMA`].
    pub schema: u8,
    /// Seconds since the Unix epoch.
    pub ts: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Arc<str>>,
    /// The bindings swapped in (or the one blocked).
    pub bindings: Vec<Arc<str>>,
    /// `host:port` the request was for, cut at [`MAX_PATH_LEN`].
    pub destination: String,
    pub method: String,
    /// The path without its query, cut at [`MAX_PATH_LEN`]; withheld when it
    /// held a placeholder.
    pub path: String,
    /// `h1`, `h2`, or `tcp` for a connection that was not HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    pub decision: Outcome,
    /// A stable code saying why, for refusals (`destination_not_bound`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// What a human reads about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The status the agent got (none when the response was aborted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The status the upstream answered (none when it was not asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Sent a second time, with a newly read value, after the upstream
    /// refused the first (401/403).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retried: bool,
    pub latency_ms: f64,
}

impl AuditRecord {
    /// A record with the request's identity filled in and the outcome empty.
    pub fn new(destination: &str, method: &str, path: &str) -> Self {
        Self {
            kind: "audit",
            schema: SCHEMA,
            ts: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            pod: None,
            namespace: None,
            bindings: Vec::new(),
            destination: cut(destination, MAX_PATH_LEN).to_owned(),
            method: cut(method, 32).to_owned(),
            path: cut(path, MAX_PATH_LEN).to_owned(),
            protocol: None,
            decision: Outcome::Forwarded,
            reason: None,
            detail: None,
            status: None,
            upstream_status: None,
            retried: false,
            latency_ms: 0.0,
        }
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Where records are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    /// Appended to.
    File(PathBuf),
}

impl std::str::FromStr for AuditSink {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(if s == "-" {
            Self::Stdout
        } else {
            Self::File(s.into())
        })
    }
}

/// The audit log: cheap to clone, safe from any task.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<String>,
    pod: Option<Arc<str>>,
    namespace: Option<Arc<str>>,
    metrics: Arc<Metrics>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// Security records waiting for room (see [`MAX_WAITING`]).
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens `sink` and starts the writer thread.
    pub fn start(
        sink: &AuditSink,
        pod: Option<String>,
        namespace: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let out: Box<dyn Write + Send> = match sink {
            AuditSink::Stdout => Box::new(std::io::stdout()),
            AuditSink::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| Error::Io {
                        what: format!("opening the audit log {}", path.display()),
                        source: e,
                    })?,
            ),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LEN);
        let writer = std::thread::Builder::new()
            .name("credbroker-audit".into())
            .spawn(move || write_records(rx, out))
            .map_err(|e| Error::Io {
                what: "starting the audit writer thread".into(),
                source: e,
            })?;
        Ok(Self {
            tx,
            pod: pod.filter(|p| !p.is_empty()).map(Arc::from),
            namespace: namespace.filter(|n| !n.is_empty()).map(Arc::from),
            metrics,
            writer: Arc::new(Mutex::new(Some(writer))),
            waiting: Arc::default(),
        })
    }

    /// Queues one record.
    pub fn record(&self, mut record: AuditRecord) {
        record.pod = self.pod.clone();
        record.namespace = self.namespace.clone();
        let line = match serde_json::to_string(&record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "could not encode an audit record");
                return;
            }
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(line)) if record.decision.is_security_event() => {
                self.wait_for_room(line);
            }
            Err(TrySendError::Full(_)) => {
                self.metrics.audit_dropped();
                tracing::error!("audit writer is behind; an audit record was dropped");
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.audit_dropped();
            }
        }
    }

    /// A security record meets a full queue: it waits for room, off the
    /// caller's thread (a tokio worker must never block on a slow log
    /// pipe), for at most [`MAX_WAIT`], with at most [`MAX_WAITING`]
    /// records waiting. Beyond either bound it is dropped, counted and said
    /// in a log line: the writer is stalled, and waiting longer would only
    /// grow memory.
    fn wait_for_room(&self, line: String) {
        use std::sync::atomic::Ordering;
        let dropped = |metrics: &Metrics| {
            metrics.audit_dropped();
            tracing::error!("audit writer is stalled; a security audit record was dropped");
        };
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return dropped(&self.metrics);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Not on a runtime (a plain thread): blocking here is harmless.
            if self.tx.send(line).is_err() {
                dropped(&self.metrics);
            }
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        let (tx, metrics, waiting) = (self.tx.clone(), self.metrics.clone(), self.waiting.clone());
        runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + MAX_WAIT;
            let mut line = line;
            loop {
                match tx.try_send(line) {
                    Ok(()) => break,
                    Err(TrySendError::Full(back)) if tokio::time::Instant::now() < deadline => {
                        line = back;
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    Err(_) => {
                        dropped(&metrics);
                        break;
                    }
                }
            }
            waiting.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Writes out what is queued and stops the writer (at shutdown). Other
    /// clones can still record; their records are dropped and counted.
    pub fn close(self) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        // Other clones still hold senders (the engine's, a request's), so
        // the channel never disconnects by itself: the writer is told to
        // stop by an empty line (a record is never empty), queued after
        // every record sent so far. A stalled writer is not waited for
        // beyond the deadline.
        let mut stop = String::new();
        loop {
            match self.tx.try_send(stop) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => break,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    stop = back;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(TrySendError::Full(_)) => break,
            }
        }
        drop(self.tx);
        if let Some(writer) = writer {
            while !writer.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

fn write_records(rx: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(out);
    'records: while let Ok(line) = rx.recv() {
        if line.is_empty() {
            break;
        }
        let _ = writeln!(out, "{line}");
        // Batch what is already queued, then flush: one write per burst.
        while let Ok(line) = rx.try_recv() {
            if line.is_empty() {
                break 'records;
            }
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_json_lines_without_the_query() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::start(
            &AuditSink::File(path.clone()),
            Some("agent-0".into()),
            Some("agents".into()),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let mut r = AuditRecord::new("api.example.com:443", "POST", "/v1/chat");
        r.bindings.push(Arc::from("openai"));
        r.decision = Outcome::Injected;
        r.status = Some(200);
        r.upstream_status = Some(200);
        log.record(r);
        log.record(AuditRecord::new("x:443", "GET", &"/a".repeat(300)));
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["kind"], "audit");
        assert_eq!(lines[0]["schema"], SCHEMA);
        assert_eq!(lines[0]["pod"], "agent-0");
        assert_eq!(lines[0]["bindings"][0], "openai");
        assert_eq!(lines[0]["decision"], "injected");
        assert_eq!(lines[0]["path"], "/v1/chat");
        assert_eq!(lines[1]["path"].as_str().unwrap().len(), MAX_PATH_LEN);
    }

    /// A log pipe nobody reads: the queue fills, ordinary records are
    /// dropped, and security records neither block the runtime's thread nor
    /// get lost once the pipe drains.
    #[test]
    fn a_stalled_writer_never_blocks_a_worker_and_security_records_wait() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("audit.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo failed");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::File::open(fifo).unwrap())
        };
        let metrics = Arc::new(Metrics::new());
        let log = AuditLog::start(&AuditSink::File(fifo), None, None, metrics.clone()).unwrap();
        let mut reader = reader.join().unwrap();

        const SECURITY: usize = 50;
        let (done, finished) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let recorder = std::thread::spawn(move || {
            runtime.block_on(async {
                for _ in 0..QUEUE_LEN + 2000 {
                    log.record(AuditRecord::new("api.example.com:443", "GET", "/v1/x"));
                }
                for _ in 0..SECURITY {
                    let mut r = AuditRecord::new("evil.example:443", "POST", "/");
                    r.decision = Outcome::ExfiltrationBlocked;
                    log.record(r);
                }
                // Every record() returned: the thread was never blocked.
                done.send(()).unwrap();
                // The waiting records get their room once the pipe drains.
                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            });
            log.close();
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("record() blocked on a full queue");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut reader, &mut text).unwrap();
        recorder.join().unwrap();
        let security = text
            .lines()
            .filter(|l| l.contains("exfiltration_blocked"))
            .count();
        assert_eq!(security, SECURITY);
        let rendered = metrics.render();
        let dropped: u64 = rendered
            .lines()
            .find_map(|l| l.strip_prefix("credbroker_sidecar_audit_records_dropped_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no dropped count in {rendered}"));
        assert!(dropped > 0, "ordinary records past the queue are dropped");
    }
}
