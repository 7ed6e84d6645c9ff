//! Byte pipes between an agent and an upstream, for traffic the sidecar
//! does not read as HTTP: TLS to unbound hosts, server-speaks-first
//! protocols, other cleartext, WebSocket frames after an upgrade.
//!
//! A pipe ends when both directions have ended, when neither has moved a
//! byte for the idle timeout, or when a write cannot finish within it (an
//! agent that stops reading must not pin the pipe). A half-close is passed
//! on: EOF one way shuts down the other side's write half.
//!
//! Two optional checks:
//! - `scan` (cleartext toward an unbound destination): the agent's bytes
//!   are checked for placeholders (invariant 2: one the sidecar can see is
//!   blocked). Nothing is held back, so request/response protocols never
//!   stall on a byte that might begin one: a placeholder split across
//!   reads is caught when it completes, with the bytes before it seen
//!   alongside, and the pipe ends before the rest leaves. At most a strict
//!   prefix of a placeholder (not a secret) can have left by then.
//! - `echo` (the upstream side of a WebSocket tunnel to a bound host): the
//!   upstream's bytes are checked for secrets, holding back only what could
//!   begin one, and releasing that after a short pause so an interactive
//!   protocol is not stalled: frames are best effort (a secret split across
//!   frames, or across a pause, is not caught).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::echo::{EchoDetector, EchoFound, EchoStream};
use crate::substitute::PlaceholderSet;

/// Read buffer per direction.
const BUFFER: usize = 8 * 1024;
/// How long held-back bytes of an echo check wait for more data.
const ECHO_RELEASE_AFTER: Duration = Duration::from_millis(200);

/// How a pipe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides closed.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A read or write failed (the reason is ours, never peer bytes).
    Error(&'static str),
    /// The agent sent the placeholder of this binding.
    Placeholder { binding: usize },
    /// The upstream sent a secret back.
    Echo(EchoFound),
}

/// What a pipe checks.
#[derive(Default)]
pub struct Checks {
    /// Placeholders to refuse in the agent's bytes.
    pub scan: Option<Arc<PlaceholderSet>>,
    /// Secrets to refuse in the upstream's bytes.
    pub echo: Option<Arc<EchoDetector>>,
}

/// Pipes `agent` and `upstream` together. `to_upstream_first` is sent to
/// the upstream before anything else (the bytes read while deciding).
pub async fn splice<A, U>(
    agent: A,
    upstream: U,
    to_upstream_first: &[u8],
    idle: Duration,
    checks: Checks,
) -> SpliceEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut agent_read, mut agent_write) = tokio::io::split(agent);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let clock = Activity::new();
    let mut scanner = checks.scan.filter(|s| !s.is_empty()).map(Scanner::new);

    if !to_upstream_first.is_empty() {
        if let Some(s) = scanner.as_mut()
            && let Some(binding) = s.check(to_upstream_first)
        {
            return SpliceEnd::Placeholder { binding };
        }
        if let Err(end) = write(&mut upstream_write, to_upstream_first, idle).await {
            return end;
        }
    }
    let echo = checks.echo.filter(|d| !d.is_empty()).map(EchoStream::new);

    let up = pump(
        &mut agent_read,
        &mut upstream_write,
        scanner,
        None,
        idle,
        &clock,
    );
    let down = pump(
        &mut upstream_read,
        &mut agent_write,
        None,
        echo,
        idle,
        &clock,
    );
    tokio::pin!(up, down);
    // Either direction's failure (or a finding) ends the pipe; a clean EOF
    // waits for the other direction.
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            end = &mut up, if !up_done => {
                if end != SpliceEnd::Closed { return end; }
                up_done = true;
            }
            end = &mut down, if !down_done => {
                if end != SpliceEnd::Closed { return end; }
                down_done = true;
            }
        }
        if up_done && down_done {
            return SpliceEnd::Closed;
        }
    }
}

/// When either direction last moved a byte.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Finds placeholders across reads without holding bytes back: it keeps
/// the last bytes already sent as context, so a placeholder that completes
/// in a later read is still found.
struct Scanner {
    set: Arc<PlaceholderSet>,
    context: Vec<u8>,
    window: Vec<u8>,
}

impl Scanner {
    fn new(set: Arc<PlaceholderSet>) -> Self {
        Self {
            set,
            context: Vec::new(),
            window: Vec::new(),
        }
    }

    /// The binding whose placeholder `chunk` (with what came before)
    /// completes, if any.
    fn check(&mut self, chunk: &[u8]) -> Option<usize> {
        self.window.clear();
        self.window.extend_from_slice(&self.context);
        self.window.extend_from_slice(chunk);
        let found = self.set.find(&self.window).iter().next();
        // The context was checked already and holds no whole placeholder,
        // so whatever matches completes in this chunk.
        let keep = self.set.max_len().saturating_sub(1);
        let from = self.window.len().saturating_sub(keep);
        self.context.clear();
        self.context.extend_from_slice(&self.window[from..]);
        found
    }
}

async fn write<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    idle: Duration,
) -> Result<(), SpliceEnd> {
    match tokio::time::timeout(idle, async {
        writer.write_all(bytes).await?;
        writer.flush().await
    })
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(SpliceEnd::Error("a write failed")),
        Err(_) => Err(SpliceEnd::Idle),
    }
}

/// Copies one direction until EOF (then shuts the writer down).
async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut scanner: Option<Scanner>,
    mut echo: Option<EchoStream<Arc<EchoDetector>>>,
    idle: Duration,
    clock: &Activity,
) -> SpliceEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let holding = echo.as_ref().is_some_and(|e| e.held_back() > 0);
        let wait = if holding {
            ECHO_RELEASE_AFTER.min(idle)
        } else {
            idle
        };
        let n = match tokio::time::timeout(wait, reader.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return SpliceEnd::Error("a read failed"),
            Err(_) if holding => {
                // A pause with bytes held back: let them go (see the module
                // comment), so the peer is not left waiting.
                if let Some(e) = echo.as_mut() {
                    let held = e.release_held();
                    if let Err(end) = write(writer, &held, idle).await {
                        return end;
                    }
                }
                continue;
            }
            Err(_) => {
                if clock.idle_for() >= idle {
                    return SpliceEnd::Idle;
                }
                continue;
            }
        };
        clock.touch();
        if n == 0 {
            if let Some(e) = echo.as_mut() {
                match e.finish() {
                    Ok(rest) => {
                        if let Err(end) = write(writer, &rest, idle).await {
                            return end;
                        }
                    }
                    Err(found) => return SpliceEnd::Echo(found),
                }
            }
            let _ = writer.shutdown().await;
            return SpliceEnd::Closed;
        }
        let chunk = &buf[..n];
        if let Some(s) = scanner.as_mut()
            && let Some(binding) = s.check(chunk)
        {
            return SpliceEnd::Placeholder { binding };
        }
        let out = match echo.as_mut() {
            Some(e) => match e.feed(Bytes::copy_from_slice(chunk)) {
                Ok(out) => out,
                Err(found) => return SpliceEnd::Echo(found),
            },
            None => Bytes::copy_from_slice(chunk),
        };
        if !out.is_empty()
            && let Err(end) = write(writer, &out, idle).await
        {
            return end;
        }
    }
}

/// Pipes the two sides of a WebSocket upgrade once both have switched
/// protocols: the agent's frames pass untouched, the upstream's are checked
/// for echoes (best effort; see the module comment).
pub async fn tunnel_upgrades(
    agent: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Duration,
    echo: Option<Arc<EchoDetector>>,
) -> SpliceEnd {
    let (agent, upstream) = match tokio::try_join!(agent, upstream) {
        Ok(both) => both,
        Err(_) => return SpliceEnd::Error("the upgrade did not complete"),
    };
    let agent = hyper_util::rt::TokioIo::new(agent);
    let upstream = hyper_util::rt::TokioIo::new(upstream);
    splice(agent, upstream, &[], idle, Checks { scan: None, echo }).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{Placeholder, SecretValue};

    fn set() -> Arc<PlaceholderSet> {
        let p = Placeholder::parse("cbph-0123456789abcdefghijkl").unwrap();
        Arc::new(PlaceholderSet::new([(0usize, "b", &p)]).unwrap())
    }

    fn scan() -> Checks {
        Checks {
            scan: Some(set()),
            echo: None,
        }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_passed_on() {
        let (agent, mut agent_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            splice(agent, upstream, b"first ", Duration::from_secs(5), scan()).await
        });
        agent_peer.write_all(b"hello").await.unwrap();
        agent_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"first hello");
        upstream_peer.write_all(b"reply").await.unwrap();
        drop(upstream_peer);
        let mut back = Vec::new();
        agent_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply");
        assert_eq!(task.await.unwrap(), SpliceEnd::Closed);
    }

    #[tokio::test]
    async fn a_placeholder_split_across_writes_ends_the_pipe_before_it_completes() {
        let (agent, mut agent_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            splice(agent, upstream, b"", Duration::from_secs(5), scan()).await
        });
        agent_peer
            .write_all(b"AUTH cbph-0123456789ab")
            .await
            .unwrap();
        // The first part is not held back: a request/response protocol
        // whose message ends in something placeholder-like never stalls.
        let mut first = [0u8; 22];
        upstream_peer.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"AUTH cbph-0123456789ab");
        agent_peer.write_all(b"cdefghijkl\r\n").await.unwrap();
        assert_eq!(task.await.unwrap(), SpliceEnd::Placeholder { binding: 0 });
        let mut rest = Vec::new();
        let _ = upstream_peer.read_to_end(&mut rest).await;
        assert!(
            rest.is_empty(),
            "the placeholder completed upstream: {rest:?}"
        );
    }

    #[tokio::test]
    async fn an_echo_from_the_upstream_ends_the_pipe_before_it_reaches_the_agent() {
        let secret = SecretValue::copy_from(b"the-real-secret-value");
        let detector = Arc::new(EchoDetector::new([(0usize, "b", &secret)]).unwrap());
        let (agent, mut agent_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            let checks = Checks {
                scan: None,
                echo: Some(detector),
            };
            splice(agent, upstream, b"", Duration::from_secs(5), checks).await
        });
        upstream_peer
            .write_all(b"frame: the-real-secret-value!")
            .await
            .unwrap();
        assert!(matches!(task.await.unwrap(), SpliceEnd::Echo(_)));
        let mut got = Vec::new();
        let _ = agent_peer.read_to_end(&mut got).await;
        assert!(
            !String::from_utf8_lossy(&got).contains("the-real-secret"),
            "{got:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_pipe_ends() {
        let (agent, _agent_peer) = tokio::io::duplex(1024);
        let (upstream, _upstream_peer) = tokio::io::duplex(1024);
        let end = splice(
            agent,
            upstream,
            b"",
            Duration::from_secs(3),
            Checks::default(),
        )
        .await;
        assert_eq!(end, SpliceEnd::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_never_reads_cannot_pin_the_pipe() {
        let (agent, _agent_peer) = tokio::io::duplex(16);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(async move {
            splice(
                agent,
                upstream,
                b"",
                Duration::from_secs(3),
                Checks::default(),
            )
            .await
        });
        upstream_peer.write_all(&[b'x'; 64 * 1024]).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(end, SpliceEnd::Idle);
    }
}
