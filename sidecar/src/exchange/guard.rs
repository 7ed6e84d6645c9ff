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
/// hyper refuses a body with more chunk-extension bytes than this, in all.
const MAX_EXTENSION_BYTES: u64 = 16 * 1024;

/// What the guard concluded about one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// The head is one the sidecar refuses; the reason names why.
    Refused(&'static str),
    /// The guard could not follow the connection up to this request.
    Unverified,
}

/// Where the tracker is in the stream. The chunked states are hyper's own
/// (`proto/h1/decode.rs`), byte for byte: whatever hyper reads as the end
/// of a body, the tracker does too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a head (the bytes so far are in `head`).
    Head,
    /// A fixed-length body: this many bytes left.
    Body(u64),
    ChunkStart,
    ChunkSize(u64),
    ChunkSizeLws(u64),
    ChunkExtension(u64),
    ChunkSizeLf(u64),
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    ChunkEndCr,
    ChunkTrailer,
    ChunkTrailerLf,
    ChunkEndLf,
    /// No longer followed (an upgrade took place, or a framing error hyper
    /// refuses too).
    Lost,
}

/// Follows the framing of a stream of HTTP/1.1 requests (pure; feed it the
/// bytes as they are read).
#[derive(Debug)]
pub struct FramingTracker {
    state: State,
    /// The current head, as far as it has arrived.
    head: Vec<u8>,
    max_head: usize,
    /// The request target of every head followed, in order (for the
    /// differential fuzz target, which compares them with hyper's).
    #[cfg(any(test, feature = "fuzzing"))]
    pub targets: Vec<String>,
    /// Chunk-extension bytes of the current body (hyper's limit is per body).
    extension_bytes: u64,
    /// Trailer bytes of the current body.
    trailer_bytes: usize,
    verdicts: VecDeque<Verdict>,
}

impl FramingTracker {
    /// `max_head`: the largest head followed (hyper refuses larger ones with
    /// 431, so the guard need not hold more).
    pub fn new(max_head: usize) -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
            max_head,
            #[cfg(any(test, feature = "fuzzing"))]
            targets: Vec::new(),
            extension_bytes: 0,
            trailer_bytes: 0,
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

    /// The connection switched protocols (a 101 was sent): what follows is
    /// not HTTP/1.1.
    pub fn upgraded(&mut self) {
        self.lose();
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            data = match self.state {
                State::Lost => return,
                State::Head => self.feed_head(data),
                State::Body(left) => {
                    let n = (data.len() as u64).min(left);
                    self.state = if left == n {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                    &data[n as usize..]
                }
                State::ChunkData(left) => {
                    let n = (data.len() as u64).min(left);
                    self.state = if left == n {
                        State::ChunkDataCr
                    } else {
                        State::ChunkData(left - n)
                    };
                    &data[n as usize..]
                }
                _ => {
                    self.chunk_byte(data[0]);
                    &data[1..]
                }
            };
        }
    }

    /// Head bytes: buffered until httparse says the head is complete; what
    /// follows the head is returned.
    fn feed_head<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let before = self.head.len();
        let take = data.len().min((self.max_head + 1).saturating_sub(before));
        self.head.extend_from_slice(&data[..take]);
        // A head ends at an empty line, "\n\n" or "\n\r\n" (httparse takes
        // bare LF): parse only when the new bytes may have ended one, so a
        // head trickled in line by line is not re-parsed at every byte.
        let from = before.saturating_sub(2);
        let tail = &self.head[from..];
        let may_end = find(tail, b"\n\n").is_some() || find(tail, b"\n\r\n").is_some();
        if !may_end {
            if self.head.len() > self.max_head {
                self.lose();
            }
            return &data[take..];
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&self.head) {
            Ok(httparse::Status::Complete(end)) => {
                let verdict = inspect(&request);
                #[cfg(any(test, feature = "fuzzing"))]
                self.targets.push(request.path.unwrap_or("").to_owned());
                // The head ends at `end` of the buffer: the rest of the
                // bytes taken, and those not taken, follow it.
                let Some(consumed) = end.checked_sub(before) else {
                    self.lose();
                    return &[];
                };
                self.head.clear();
                match verdict {
                    Ok(framing) => {
                        self.verdicts.push_back(Verdict::Ok);
                        self.extension_bytes = 0;
                        self.trailer_bytes = 0;
                        self.state = match framing {
                            Framing::None | Framing::Length(0) => State::Head,
                            Framing::Length(n) => State::Body(n),
                            Framing::Chunked => State::ChunkStart,
                            Framing::Opaque => State::Lost,
                        };
                        &data[consumed.min(data.len())..]
                    }
                    Err(reason) => {
                        self.verdicts.push_back(Verdict::Refused(reason));
                        // Refused and closed; what follows is not followed.
                        self.lose();
                        &[]
                    }
                }
            }
            Ok(httparse::Status::Partial) => {
                if self.head.len() > self.max_head {
                    self.lose();
                }
                &data[take..]
            }
            Err(_) => {
                // httparse refuses what hyper refuses (obs-fold among it);
                // hyper answers 400 before the handler runs.
                self.verdicts
                    .push_back(Verdict::Refused("malformed request head"));
                self.lose();
                &[]
            }
        }
    }

    /// One byte of a chunked body outside chunk data, as hyper reads it.
    fn chunk_byte(&mut self, b: u8) {
        let hex = |b: u8| match b {
            b'0'..=b'9' => Some(u64::from(b - b'0')),
            b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
            b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
            _ => None,
        };
        let grow = |size: u64, d: u64| size.checked_mul(16).and_then(|s| s.checked_add(d));
        self.state = match (self.state, b) {
            (State::ChunkStart, b) => match hex(b) {
                Some(d) => State::ChunkSize(d),
                None => State::Lost,
            },
            (State::ChunkSize(size), b) => match (hex(b), b) {
                (Some(d), _) => grow(size, d).map_or(State::Lost, State::ChunkSize),
                (None, b'\t' | b' ') => State::ChunkSizeLws(size),
                (None, b';') => State::ChunkExtension(size),
                (None, b'\r') => State::ChunkSizeLf(size),
                _ => State::Lost,
            },
            (State::ChunkSizeLws(size), b'\t' | b' ') => State::ChunkSizeLws(size),
            (State::ChunkSizeLws(size), b';') => State::ChunkExtension(size),
            (State::ChunkSizeLws(size), b'\r') => State::ChunkSizeLf(size),
            (State::ChunkExtension(size), b'\r') => State::ChunkSizeLf(size),
            (State::ChunkExtension(_), b'\n') => State::Lost,
            (State::ChunkExtension(size), _) => {
                self.extension_bytes += 1;
                if self.extension_bytes >= MAX_EXTENSION_BYTES {
                    State::Lost
                } else {
                    State::ChunkExtension(size)
                }
            }
            (State::ChunkSizeLf(0), b'\n') => State::ChunkEndCr,
            (State::ChunkSizeLf(size), b'\n') => State::ChunkData(size),
            (State::ChunkDataCr, b'\r') => State::ChunkDataLf,
            (State::ChunkDataLf, b'\n') => State::ChunkStart,
            (State::ChunkEndCr, b'\r') => State::ChunkEndLf,
            (State::ChunkEndCr, _) | (State::ChunkTrailer, _)
                if self.trailer_bytes >= self.max_head =>
            {
                State::Lost
            }
            (State::ChunkEndCr, _) => {
                self.trailer_bytes += 1;
                State::ChunkTrailer
            }
            (State::ChunkTrailer, b'\r') => {
                self.trailer_bytes += 1;
                State::ChunkTrailerLf
            }
            (State::ChunkTrailer, _) => {
                self.trailer_bytes += 1;
                State::ChunkTrailer
            }
            (State::ChunkTrailerLf, b'\n') => {
                self.trailer_bytes += 1;
                State::ChunkEndCr
            }
            (State::ChunkEndLf, b'\n') => State::Head,
            _ => State::Lost,
        };
        if self.state == State::Lost {
            self.lose();
        }
    }

    fn lose(&mut self) {
        self.state = State::Lost;
        self.head = Vec::new();
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
    // An Upgrade header alone changes nothing (hyper keeps speaking HTTP/1.1
    // unless a 101 goes out: the handler says so, see `upgraded`); a CONNECT
    // is answered by opening a tunnel.
    if request.method == Some("CONNECT") {
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
    /// The connection switched protocols: stop following it.
    pub fn upgraded(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgraded();
    }

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
/// the point chosen by its first byte, in two; the heads followed and their
/// verdicts must agree, and nothing may panic.
///
/// A malformed head is the exception: it is noticed when the bytes that
/// arrive may end a head, so a split can make the tracker see it later (or
/// only run out of room). That is harmless, since hyper refuses the head
/// itself, so those verdicts and whether the tracker is lost are not
/// compared.
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
    let drain = |t: &mut FramingTracker| {
        std::iter::from_fn(|| t.take_verdict())
            .filter(|v| *v != Verdict::Refused("malformed request head"))
            .collect::<Vec<_>>()
    };
    let (a, b) = (drain(&mut whole), drain(&mut parts));
    assert_eq!(a, b, "verdicts differ when the stream is split at {at}");
    assert_eq!(
        whole.targets, parts.targets,
        "heads differ when the stream is split at {at}"
    );
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
    fn only_a_real_upgrade_stops_the_tracking() {
        // An Upgrade that is declined (h2c from `curl --http2 http://`, a
        // refused WebSocket) leaves the connection HTTP/1.1.
        let mut t = FramingTracker::new(8192);
        t.feed(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n");
        t.feed(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(t.take_verdict(), Some(Verdict::Ok));
        assert_eq!(t.take_verdict(), Some(Verdict::Ok));
        // A 101: what follows is frames, not followed.
        t.feed(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
        assert_eq!(t.take_verdict(), Some(Verdict::Ok));
        t.upgraded();
        t.feed(b"\x81\x05hello GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(t.is_lost());
        assert_eq!(t.take_verdict(), None);
        // CONNECT opens a tunnel at once.
        let mut t = FramingTracker::new(8192);
        t.feed(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01");
        assert_eq!(t.take_verdict(), Some(Verdict::Ok));
        assert!(t.is_lost());
    }

    #[test]
    fn bare_lf_heads_and_trailers_are_followed_as_hyper_follows_them() {
        // Heads end where httparse says, bare LF included: the second
        // request's CL+TE is seen, not hidden in the first head.
        let stream = b"GET /a HTTP/1.1\nHost: h\n\n\
POST /b HTTP/1.1\nHost: h\nContent-Length: 5\nTransfer-Encoding: chunked\n\n0\r\n\r\n\
GET /c HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(
            verdicts(stream),
            vec![
                Verdict::Ok,
                Verdict::Refused("both Content-Length and Transfer-Encoding")
            ]
        );
        // hyper's trailer lines end at CRLF only: a bare-LF "request" after
        // the last chunk is trailer text to hyper, so it is to the guard.
        let stream = b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
0\r\nX: a\n\nGET /f HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(verdicts(stream), vec![Verdict::Ok]);
        // A bare LF where hyper wants CRLF in chunk framing: hyper fails the
        // body, the guard stops following.
        let mut t = FramingTracker::new(8192);
        t.feed(b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello");
        assert!(t.is_lost());
    }

    #[test]
    fn an_oversized_head_is_not_buffered() {
        let mut t = FramingTracker::new(100);
        t.feed(&[b'a'; 1000]);
        assert!(t.is_lost());
        assert!(t.head.capacity() < 1000);
    }

    #[test]
    fn fuzz_target_runs_on_examples() {
        let mut data = vec![17u8];
        data.extend_from_slice(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        fuzz_framing(&data);
        fuzz_framing(&[200, b'\r', b'\n', 0, 1, 2]);
    }
}
