//! A request-smuggling guard for HTTP/1.1 connections from the agent.
//!
//! hyper accepts a request carrying both `Content-Length` and
//! `Transfer-Encoding` (it drops the length, as RFC 9112 allows), so by the
//! time a request reaches the handler the conflict cannot be seen. The
//! sidecar refuses such requests outright (DESIGN.md section 4), so it
//! watches the bytes on their way to hyper: [`FramingTracker`] follows the
//! same message framing hyper does (heads, fixed-length and chunked bodies),
//! parses each head with `httparse` (hyper's own parser), and records one
//! [`Verdict`] per request, in order. The handler takes the verdict of each
//! request as it arrives ([`Verdicts::next`]) and refuses a violation.
//!
//! If the tracker cannot follow the stream (a framing error hyper will
//! also refuse, or an upgrade), it stops and every later request on the
//! connection gets [`Verdict::Unverified`], which the handler also refuses:
//! a guard that lost track fails closed, never open.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most header fields a request head may have (hyper's default is 100).
const MAX_HEADERS: usize = 128;
/// The longest chunk-size line (with extensions) followed.
const MAX_CHUNK_LINE: usize = 4096;

/// What the guard concluded about one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// The head is one the sidecar refuses; the reason names why.
    Refused(&'static str),
    /// The guard could not follow the connection up to this request.
    Unverified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a head (the bytes so far are in `head`).
    Head,
    /// A fixed-length body: this many bytes left.
    Body(u64),
    /// A chunked body: reading a chunk-size line.
    ChunkSize,
    /// Chunk data: this many bytes left, then CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data: this many bytes of it left.
    ChunkEnd(u8),
    /// Trailer lines, until an empty one.
    Trailers,
    /// No longer followed (an upgrade, or a framing error).
    Lost,
}

/// Follows the framing of a stream of HTTP/1.1 requests (pure; feed it the
/// bytes as they are read).
#[derive(Debug)]
pub struct FramingTracker {
    state: State,
    /// The current head, or the current chunk-size or trailer line.
    line: Vec<u8>,
    max_head: usize,
    verdicts: VecDeque<Verdict>,
}

impl FramingTracker {
    /// `max_head`: the largest head followed (hyper refuses larger ones with
    /// 431, so the guard need not hold more).
    pub fn new(max_head: usize) -> Self {
        Self {
            state: State::Head,
            line: Vec::new(),
            max_head,
            verdicts: VecDeque::new(),
        }
    }

    /// The verdicts of the heads completed so far, oldest first.
    pub fn take_verdict(&mut self) -> Option<Verdict> {
        self.verdicts.pop_front()
    }

    /// Whether the tracker stopped following the stream.
    pub fn is_lost(&self) -> bool {
        self.state == State::Lost
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Lost => return,
                State::Head => {
                    if self.line.is_empty() {
                        // RFC 9112 2.2: empty lines before a request line
                        // are ignored (httparse skips them too).
                        let skip = data
                            .iter()
                            .take_while(|&&b| b == b'\r' || b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let searched_from = self.line.len().saturating_sub(3);
                    let take = data
                        .len()
                        .min(self.max_head + 1 - self.line.len().min(self.max_head));
                    self.line.extend_from_slice(&data[..take]);
                    let Some(end) = find(&self.line[searched_from..], b"\r\n\r\n")
                        .map(|at| searched_from + at + 4)
                    else {
                        if self.line.len() > self.max_head {
                            self.lose();
                        }
                        data = &data[take..];
                        continue;
                    };
                    // Bytes past the head's end go back to the stream.
                    let extra = self.line.len() - end;
                    let consumed = take - extra;
                    data = &data[consumed..];
                    let head = std::mem::take(&mut self.line);
                    self.head(&head[..end]);
                }
                State::Body(left) => {
                    let n = (data.len() as u64).min(left);
                    data = &data[n as usize..];
                    self.state = if left == n {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                }
                State::ChunkSize | State::Trailers => {
                    let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if self.line.len() > MAX_CHUNK_LINE {
                            self.lose();
                        }
                        return;
                    };
                    self.line.extend_from_slice(&data[..=nl]);
                    data = &data[nl + 1..];
                    let line = std::mem::take(&mut self.line);
                    if self.state == State::ChunkSize {
                        self.chunk_size(&line);
                    } else if line == b"\r\n" || line == b"\n" {
                        self.state = State::Head;
                    }
                }
                State::ChunkData(left) => {
                    let n = (data.len() as u64).min(left);
                    data = &data[n as usize..];
                    self.state = if left == n {
                        State::ChunkEnd(2)
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::ChunkEnd(left) => {
                    let expected: &[u8] = if left == 2 { b"\r\n" } else { b"\n" };
                    let n = data.len().min(usize::from(left));
                    if data[..n] != expected[..n] {
                        self.lose();
                        return;
                    }
                    data = &data[n..];
                    let rest = left - n as u8;
                    self.state = if rest == 0 {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(rest)
                    };
                }
            }
        }
    }

    fn lose(&mut self) {
        self.state = State::Lost;
        self.line = Vec::new();
    }

    fn chunk_size(&mut self, line: &[u8]) {
        match httparse::parse_chunk_size(line) {
            Ok(httparse::Status::Complete((_, 0))) => self.state = State::Trailers,
            Ok(httparse::Status::Complete((_, size))) => self.state = State::ChunkData(size),
            _ => self.lose(),
        }
    }

    fn head(&mut self, head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let parsed = request.parse(head);
        let verdict = match parsed {
            Ok(httparse::Status::Complete(_)) => inspect(&request),
            // httparse refuses what hyper refuses (obs-fold among it);
            // hyper answers 400 before the handler runs.
            _ => Err("malformed request head"),
        };
        match verdict {
            Ok(framing) => {
                self.verdicts.push_back(Verdict::Ok);
                self.state = match framing {
                    Framing::None => State::Head,
                    Framing::Length(0) => State::Head,
                    Framing::Length(n) => State::Body(n),
                    Framing::Chunked => State::ChunkSize,
                    Framing::Opaque => State::Lost,
                };
            }
            Err(reason) => {
                self.verdicts.push_back(Verdict::Refused(reason));
                // The handler refuses it and closes the connection; what
                // follows is not followed.
                self.lose();
            }
        }
    }
}

enum Framing {
    None,
    Length(u64),
    Chunked,
    /// An upgrade or CONNECT: past this head the stream may not be HTTP.
    Opaque,
}

/// The checks on one parsed head, and the framing of its body.
fn inspect(request: &httparse::Request<'_, '_>) -> Result<Framing, &'static str> {
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut upgrade = false;
    for h in request.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or("invalid Content-Length")?;
            if length.is_some_and(|l| l != value) {
                return Err("conflicting Content-Length values");
            }
            length = Some(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked.is_some() {
                return Err("repeated Transfer-Encoding");
            }
            // Only plain `chunked`: other codings have no use here and are
            // where parsers disagree.
            let value = std::str::from_utf8(h.value).map(str::trim).unwrap_or("");
            if !value.eq_ignore_ascii_case("chunked") {
                return Err("Transfer-Encoding other than chunked");
            }
            chunked = Some(true);
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if hosts > 1 {
        return Err("duplicate Host header");
    }
    if chunked.is_some() && length.is_some() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if request.version != Some(1) && chunked.is_some() {
        return Err("Transfer-Encoding in HTTP/1.0");
    }
    if upgrade || request.method == Some("CONNECT") {
        return Ok(Framing::Opaque);
    }
    Ok(match (chunked, length) {
        (Some(_), _) => Framing::Chunked,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::None,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The largest head the guard follows, for hyper's `max_header_size` of
/// `max_header_bytes`: a little more, so the guard never loses track of a
/// head hyper accepts (hyper answers 431 to larger ones itself).
pub fn head_limit(max_header_bytes: u32) -> usize {
    max_header_bytes as usize + 4096
}

/// The verdicts of one connection, shared by its [`GuardedIo`] and its
/// request handler.
#[derive(Debug, Clone)]
pub struct Verdicts(Arc<Mutex<FramingTracker>>);

impl Verdicts {
    /// The verdict of the next request. Called once per request, in order
    /// (HTTP/1.1 handles requests of a connection one after another).
    pub fn next(&self) -> Verdict {
        let mut tracker = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match tracker.take_verdict() {
            Some(v) => v,
            None => Verdict::Unverified,
        }
    }
}

/// Wraps a connection's read side in a [`FramingTracker`].
#[derive(Debug)]
pub struct GuardedIo<S> {
    inner: S,
    tracker: Arc<Mutex<FramingTracker>>,
}

impl<S> GuardedIo<S> {
    pub fn new(inner: S, max_head: usize) -> (Self, Verdicts) {
        let tracker = Arc::new(Mutex::new(FramingTracker::new(max_head)));
        (
            Self {
                inner,
                tracker: tracker.clone(),
            },
            Verdicts(tracker),
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                this.tracker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .feed(new);
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A fuzz target: feeds `data` to a tracker in one piece and, split at
/// every point chosen by its first byte, in two; the verdicts must agree,
/// and nothing may panic.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_framing(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let mut whole = FramingTracker::new(8192);
    whole.feed(data);
    let mut parts = FramingTracker::new(8192);
    let at = usize::from(split).min(data.len());
    parts.feed(&data[..at]);
    parts.feed(&data[at..]);
    let drain =
        |t: &mut FramingTracker| std::iter::from_fn(|| t.take_verdict()).collect::<Vec<_>>();
    let (a, b) = (drain(&mut whole), drain(&mut parts));
    assert_eq!(a, b, "verdicts differ when the stream is split at {at}");
    assert_eq!(whole.is_lost(), parts.is_lost());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(stream: &[u8]) -> Vec<Verdict> {
        // Byte by byte and in one piece must agree.
        let mut one = FramingTracker::new(8192);
        one.feed(stream);
        let mut bytewise = FramingTracker::new(8192);
        for b in stream {
            bytewise.feed(std::slice::from_ref(b));
        }
        let drain =
            |t: &mut FramingTracker| std::iter::from_fn(|| t.take_verdict()).collect::<Vec<_>>();
        let (a, b) = (drain(&mut one), drain(&mut bytewise));
        assert_eq!(a, b);
        a
    }

    #[test]
    fn follows_keep_alive_requests_with_bodies() {
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n\
\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(verdicts(stream), vec![Verdict::Ok; 4]);
    }

    #[test]
    fn refuses_smuggling_shapes() {
        for (head, why) in [
            (&b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
             "both Content-Length and Transfer-Encoding"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
             "both Content-Length and Transfer-Encoding"),
            (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "duplicate Host header"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
             "conflicting Content-Length values"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
             "Transfer-Encoding other than chunked"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n", "invalid Content-Length"),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", "malformed request head"),
        ] {
            assert_eq!(verdicts(head), vec![Verdict::Refused(why)], "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn an_upgrade_stops_the_tracking() {
        let mut t = FramingTracker::new(8192);
        t.feed(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello");
        assert_eq!(t.take_verdict(), Some(Verdict::Ok));
        assert!(t.is_lost());
        t.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(t.take_verdict(), None);
    }

    #[test]
    fn an_oversized_head_is_not_buffered() {
        let mut t = FramingTracker::new(100);
        t.feed(&[b'a'; 1000]);
        assert!(t.is_lost());
        assert!(t.line.capacity() < 1000);
    }

    #[test]
    fn fuzz_target_runs_on_examples() {
        let mut data = vec![17u8];
        data.extend_from_slice(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        fuzz_framing(&data);
        fuzz_framing(&[200, b'\r', b'\n', 0, 1, 2]);
    }
}
