//! Byte pipes between an agent and an upstream, for traffic the sidecar
//! does not read as HTTP: TLS to unbound hosts, server-speaks-first
//! protocols, WebSocket frames after an upgrade.
//!
//! A pipe ends when both directions have ended, or when neither has moved
//! a byte for the idle timeout. A half-close is passed on (EOF one way
//! shuts down the other side's write half).
//!
//! For cleartext that is not HTTP the agent's bytes are still scanned
//! (invariant 2: a placeholder the sidecar can see, headed where it may
//! not go, is blocked): the first placeholder ends the pipe before any of
//! it leaves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::substitute::{BodyReplacer, NoSecrets, PlaceholderSet};

/// Read buffer per direction.
const BUFFER: usize = 8 * 1024;

/// How a pipe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides closed.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A read or write failed.
    Error(String),
    /// The agent sent the placeholder of this binding.
    Placeholder { binding: usize },
}

/// Pipes `agent` and `upstream` together. `to_upstream_first` is sent to
/// the upstream before anything else (the bytes read while deciding).
/// With `scan`, the agent's bytes are checked for placeholders.
pub async fn splice<A, U>(
    agent: A,
    upstream: U,
    to_upstream_first: &[u8],
    idle: Duration,
    scan: Option<Arc<PlaceholderSet>>,
) -> SpliceEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut agent_read, mut agent_write) = tokio::io::split(agent);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let epoch = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let mut detector = scan.filter(|s| !s.is_empty()).map(BodyReplacer::detecting);

    if !to_upstream_first.is_empty() {
        let first = match detector.as_mut() {
            Some(d) => match d.feed(Bytes::copy_from_slice(to_upstream_first)) {
                Ok(out) => out,
                Err(e) => {
                    return SpliceEnd::Placeholder {
                        binding: e.binding(),
                    };
                }
            },
            None => Bytes::copy_from_slice(to_upstream_first),
        };
        if let Err(e) = upstream_write.write_all(&first).await {
            return SpliceEnd::Error(format!("writing to the upstream: {e}"));
        }
    }

    let up = pump(
        &mut agent_read,
        &mut upstream_write,
        detector,
        idle,
        epoch,
        activity.clone(),
    );
    let down = pump(
        &mut upstream_read,
        &mut agent_write,
        None,
        idle,
        epoch,
        activity.clone(),
    );
    tokio::pin!(up, down);
    // Either direction's failure (or a placeholder) ends the pipe; a clean
    // EOF waits for the other direction.
    let mut up_done = false;
    let mut down_done = false;
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

/// Copies one direction until EOF (then shuts the writer down).
async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut detector: Option<BodyReplacer<Arc<PlaceholderSet>, NoSecrets>>,
    idle: Duration,
    epoch: Instant,
    activity: Arc<AtomicU64>,
) -> SpliceEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = loop {
            match tokio::time::timeout(idle, reader.read(&mut buf)).await {
                Ok(Ok(n)) => break n,
                Ok(Err(e)) => return SpliceEnd::Error(e.to_string()),
                Err(_) => {
                    // Idle here; is the other direction busy?
                    let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                    if epoch.elapsed().saturating_sub(last) >= idle {
                        return SpliceEnd::Idle;
                    }
                }
            }
        };
        activity.store(
            u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if n == 0 {
            if let Some(d) = detector.as_mut() {
                match d.finish() {
                    Ok(rest) if !rest.is_empty() => {
                        if let Err(e) = writer.write_all(&rest).await {
                            return SpliceEnd::Error(e.to_string());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return SpliceEnd::Placeholder {
                            binding: e.binding(),
                        };
                    }
                }
            }
            let _ = writer.shutdown().await;
            return SpliceEnd::Closed;
        }
        let out = match detector.as_mut() {
            Some(d) => match d.feed(Bytes::copy_from_slice(&buf[..n])) {
                Ok(out) => out,
                Err(e) => {
                    return SpliceEnd::Placeholder {
                        binding: e.binding(),
                    };
                }
            },
            None => Bytes::copy_from_slice(&buf[..n]),
        };
        if let Err(e) = writer.write_all(&out).await {
            return SpliceEnd::Error(e.to_string());
        }
        if let Err(e) = writer.flush().await {
            return SpliceEnd::Error(e.to_string());
        }
    }
}

/// Pipes the two sides of a WebSocket upgrade once both have switched
/// protocols. Frames pass through untouched.
pub async fn tunnel_upgrades(
    agent: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Duration,
) {
    let (agent, upstream) = match tokio::try_join!(agent, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "a WebSocket upgrade did not complete");
            return;
        }
    };
    let agent = hyper_util::rt::TokioIo::new(agent);
    let upstream = hyper_util::rt::TokioIo::new(upstream);
    let end = splice(agent, upstream, &[], idle, None).await;
    tracing::debug!(?end, "WebSocket tunnel ended");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Placeholder;

    fn set() -> Arc<PlaceholderSet> {
        let p = Placeholder::parse("cbph-0123456789abcdefghijkl").unwrap();
        Arc::new(PlaceholderSet::new([(0usize, "b", &p)]).unwrap())
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_passed_on() {
        let (agent, mut agent_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            splice(
                agent,
                upstream,
                b"first ",
                Duration::from_secs(5),
                Some(set()),
            )
            .await
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
    async fn a_placeholder_ends_the_pipe_before_it_leaves() {
        let (agent, mut agent_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            splice(agent, upstream, b"", Duration::from_secs(5), Some(set())).await
        });
        agent_peer
            .write_all(b"AUTH cbph-0123456789ab")
            .await
            .unwrap();
        agent_peer.write_all(b"cdefghijkl\r\n").await.unwrap();
        assert_eq!(task.await.unwrap(), SpliceEnd::Placeholder { binding: 0 });
        let mut got = Vec::new();
        let _ = upstream_peer.read_to_end(&mut got).await;
        assert!(
            !String::from_utf8_lossy(&got).contains("cbph-0123456789ab"),
            "{got:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_pipe_ends() {
        let (agent, _agent_peer) = tokio::io::duplex(1024);
        let (upstream, _upstream_peer) = tokio::io::duplex(1024);
        let end = splice(agent, upstream, b"", Duration::from_secs(3), None).await;
        assert_eq!(end, SpliceEnd::Idle);
    }
}
