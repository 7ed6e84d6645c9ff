//! What a redirected client says first: a pure, incremental parser that tells
//! a TLS ClientHello (and its SNI and ALPN offer) from anything else, and the
//! async helper that reads a connection's first bytes until the parser
//! decides.
//!
//! The parser is stateless: call [`parse_client_hello`] on everything read so
//! far, after every read, until it stops answering [`Peek::NeedMore`]. A
//! ClientHello may span several TLS records and several TCP segments (post-
//! quantum key shares alone push it past one segment), so the parser
//! reassembles handshake fragments across records. It never panics, never
//! reads past the ClientHello's own records, and gives up with
//! [`Peek::Malformed`] past [`MAX_CLIENT_HELLO_LEN`] or [`MAX_RECORDS`], so
//! what a client can make the sidecar buffer is bounded by [`MAX_PEEK_BYTES`].
//!
//! Its verdict only steers the connection (terminate, splice, refuse): a
//! connection the sidecar terminates is handshaked by rustls, which parses the
//! same bytes again, so the name a leaf is minted for is rustls's.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// The largest ClientHello body accepted (its handshake header excluded).
/// Real ones, post-quantum key shares included, stay far below.
pub const MAX_CLIENT_HELLO_LEN: usize = 16 * 1024;
/// The most TLS records a ClientHello may be split across.
pub const MAX_RECORDS: usize = 16;
/// The most bytes [`parse_client_hello`] ever needs to decide, so the most the
/// peek buffers per connection.
pub const MAX_PEEK_BYTES: usize =
    RECORD_HEADER_LEN * MAX_RECORDS + HANDSHAKE_HEADER_LEN + MAX_CLIENT_HELLO_LEN;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 section 5.1: a record's fragment is at most 2^14 bytes.
const MAX_RECORD_FRAGMENT: usize = 1 << 14;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const SERVER_NAME_TYPE_HOST: u8 = 0;
/// A DNS name is at most 253 characters, 254 with a trailing dot.
const MAX_HOST_NAME_LEN: usize = 254;

/// The parser's verdict on the bytes a client sent first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Every byte so far may begin a ClientHello; read more.
    NeedMore,
    /// A complete, well-formed ClientHello.
    ClientHello(ClientHello),
    /// The client is not speaking TLS (e.g. plain HTTP).
    NotTls,
    /// TLS that is not a ClientHello we accept; the reason says what was wrong.
    Malformed(&'static str),
}

/// What the sidecar needs from a ClientHello to route its connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The `host_name` of the server_name extension, ASCII lower-cased
    /// (host names compare case-insensitively). `None` without the extension.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order; empty without the
    /// extension.
    pub alpn: Vec<Vec<u8>>,
}

/// Parses the first bytes of a connection (everything read so far).
///
/// Every strict prefix of a well-formed ClientHello yields [`Peek::NeedMore`];
/// once a prefix yields anything else, every longer input yields the same
/// (bytes after the ClientHello's records are not looked at).
pub fn parse_client_hello(buf: &[u8]) -> Peek {
    match parse(buf) {
        Ok(hello) => Peek::ClientHello(hello),
        Err(Stop::NeedMore) => Peek::NeedMore,
        Err(Stop::NotTls) => Peek::NotTls,
        Err(Stop::Malformed(reason)) => Peek::Malformed(reason),
    }
}

/// A fuzz target: runs the parser on every prefix of `data` (at most a few
/// hundred of them, spread evenly, for long inputs) and panics if a verdict is
/// not final, i.e. a longer input changes a decision already made.
/// `cargo fuzz` targets and the unit tests call this.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_client_hello(data: &[u8]) {
    let full = parse_client_hello(data);
    let step = (data.len() / 256).max(1);
    let mut decided: Option<(usize, Peek)> = None;
    for end in (0..=data.len()).step_by(step).chain([data.len()]) {
        let verdict = parse_client_hello(&data[..end]);
        match &decided {
            Some((at, first)) => assert_eq!(
                &verdict, first,
                "the verdict at {at} bytes changed at {end} bytes"
            ),
            None if verdict != Peek::NeedMore => decided = Some((end, verdict)),
            None => {}
        }
    }
    if let Some((_, first)) = decided {
        assert_eq!(full, first, "the verdict on the whole input differs");
    }
}

/// Why parsing stopped short of a ClientHello.
enum Stop {
    NeedMore,
    NotTls,
    Malformed(&'static str),
}

fn parse(buf: &[u8]) -> Result<ClientHello, Stop> {
    // Record layer: walk the records, reassembling the handshake message.
    // Decisions use only what is present and the lengths headers declare, so
    // a verdict never depends on how the bytes were segmented.
    let mut message: Vec<u8> = Vec::new();
    let mut declared = 0usize; // fragment bytes announced by the record headers so far
    let mut message_len: Option<usize> = None; // handshake header + body
    let mut pos = 0usize;
    for record in 0..MAX_RECORDS {
        let header = &buf[pos.min(buf.len())..buf.len().min(pos + RECORD_HEADER_LEN)];
        check_record_header_prefix(header, record == 0)?;
        let [_, _, _, hi, lo] = *header else {
            return Err(Stop::NeedMore);
        };
        let fragment_len = usize::from(u16::from_be_bytes([hi, lo]));
        if fragment_len == 0 {
            return Err(Stop::Malformed("empty handshake record"));
        }
        if fragment_len > MAX_RECORD_FRAGMENT {
            return Err(Stop::Malformed("record longer than 2^14 bytes"));
        }
        declared += fragment_len;
        let start = pos + RECORD_HEADER_LEN;
        let end = start + fragment_len;
        let available = &buf[start.min(buf.len())..end.min(buf.len())];
        message.extend_from_slice(available);

        if message_len.is_none() {
            if let Some(&kind) = message.first()
                && kind != HANDSHAKE_CLIENT_HELLO
            {
                return Err(Stop::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            if let [_, a, b, c, ..] = message[..] {
                let body_len = (usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c);
                if body_len > MAX_CLIENT_HELLO_LEN {
                    return Err(Stop::Malformed("ClientHello larger than the limit"));
                }
                message_len = Some(HANDSHAKE_HEADER_LEN + body_len);
            }
        }
        if let Some(len) = message_len {
            if declared > len {
                return Err(Stop::Malformed("record continues past the ClientHello"));
            }
            if declared == len && end <= buf.len() {
                return parse_body(&message[HANDSHAKE_HEADER_LEN..len]);
            }
        }
        if end > buf.len() {
            return Err(Stop::NeedMore);
        }
        pos = end;
    }
    // MAX_RECORDS complete records and the message is still unfinished.
    Err(Stop::Malformed("ClientHello split across too many records"))
}

/// Checks as much of a record header as has arrived.
fn check_record_header_prefix(header: &[u8], first: bool) -> Result<(), Stop> {
    // The first record decides whether this is TLS at all; a later one that
    // is not handshake is a broken ClientHello.
    let wrong = if first {
        Stop::NotTls
    } else {
        Stop::Malformed("ClientHello interrupted by a non-handshake record")
    };
    match header {
        [] => Err(Stop::NeedMore),
        [kind, ..] if *kind != CONTENT_TYPE_HANDSHAKE => Err(wrong),
        [_, major, ..] if *major != 3 => Err(wrong),
        // Record versions are 3.0 (SSL 3) to 3.4; TLS 1.3 still writes 3.1/3.3.
        [_, _, minor, ..] if *minor > 4 => Err(wrong),
        _ => Ok(()),
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, Stop> {
    let mut r = Reader::new(body);
    let _legacy_version = r.take(2)?;
    let _random = r.take(32)?;
    let session_id = r.vec_u8()?;
    if session_id.len() > 32 {
        return Err(Stop::Malformed("session id longer than 32 bytes"));
    }
    let cipher_suites = r.vec_u16()?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(Stop::Malformed("bad cipher suite list"));
    }
    if r.vec_u8()?.is_empty() {
        return Err(Stop::Malformed("no compression methods"));
    }
    let mut hello = ClientHello::default();
    if r.is_empty() {
        // TLS 1.2 and older may send no extensions at all.
        return Ok(hello);
    }
    let mut extensions = Reader::new(r.vec_u16()?);
    if !r.is_empty() {
        return Err(Stop::Malformed("bytes after the extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec_u16()?;
        seen.push(kind);
        match kind {
            EXTENSION_SERVER_NAME => hello.sni = parse_server_name(data)?,
            EXTENSION_ALPN => hello.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    seen.sort_unstable();
    if seen.windows(2).any(|w| w[0] == w[1]) {
        // RFC 8446 section 4.2; also the classic way to make two parsers
        // disagree on the SNI.
        return Err(Stop::Malformed("duplicate extension"));
    }
    Ok(hello)
}

fn parse_server_name(data: &[u8]) -> Result<Option<String>, Stop> {
    let mut ext = Reader::new(data);
    let mut list = Reader::new(ext.vec_u16()?);
    if !ext.is_empty() || list.is_empty() {
        return Err(Stop::Malformed("bad server_name extension"));
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8()?;
        let name = list.vec_u16()?;
        if kind != SERVER_NAME_TYPE_HOST {
            continue; // RFC 6066 leaves room for other name types
        }
        if host.is_some() {
            return Err(Stop::Malformed("more than one host_name in server_name"));
        }
        host = Some(host_name(name)?);
    }
    Ok(host)
}

/// A `host_name` as DNS allows it: LDH labels (plus `_`, seen in the wild),
/// no empty label except a final trailing dot. Lower-cased.
fn host_name(name: &[u8]) -> Result<String, Stop> {
    let bad = Stop::Malformed("server name is not a valid host name");
    if name.is_empty() || name.len() > MAX_HOST_NAME_LEN {
        return Err(bad);
    }
    let trimmed = name.strip_suffix(b".").unwrap_or(name);
    let valid_label = |label: &[u8]| {
        (1..=63).contains(&label.len())
            && label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    };
    if !trimmed.split(|b| *b == b'.').all(valid_label) {
        return Err(bad);
    }
    // Only ASCII passed the check above, so this is one byte per char.
    Ok(name
        .iter()
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect())
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, Stop> {
    let mut ext = Reader::new(data);
    let mut list = Reader::new(ext.vec_u16()?);
    if !ext.is_empty() || list.is_empty() {
        return Err(Stop::Malformed("bad ALPN extension"));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let protocol = list.vec_u8()?;
        if protocol.is_empty() {
            return Err(Stop::Malformed("empty ALPN protocol name"));
        }
        protocols.push(protocol.to_vec());
    }
    Ok(protocols)
}

/// A cursor over a complete structure: running out of bytes is malformed,
/// never "need more" (the message length was already known).
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Stop> {
        if n > self.rest.len() {
            return Err(Stop::Malformed(
                "a length runs past the end of its structure",
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        match self.take(1)? {
            [b] => Ok(*b),
            _ => Err(Stop::Malformed("truncated")),
        }
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        match self.take(2)? {
            [a, b] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(Stop::Malformed("truncated")),
        }
    }

    fn vec_u8(&mut self) -> Result<&'a [u8], Stop> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec_u16(&mut self) -> Result<&'a [u8], Stop> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// How long [`peek_client_hello`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeekTimeouts {
    /// For the first byte. Clients of server-speaks-first protocols (SMTP,
    /// SSH, MySQL...) send nothing until the server greets them, so this is
    /// short: it is how long such a connection waits before being spliced.
    pub first_byte: Duration,
    /// For the whole ClientHello, from the start: bounds a client that
    /// trickles bytes (slowloris) or stops mid-hello.
    pub complete: Duration,
}

impl Default for PeekTimeouts {
    fn default() -> Self {
        Self {
            first_byte: Duration::from_millis(500),
            complete: Duration::from_secs(10),
        }
    }
}

/// What [`peek_client_hello`] read and concluded. The bytes have been taken
/// off the socket: whoever handles the connection next must see them first
/// (see [`super::Replay`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peeked {
    /// Everything read, in order (at most [`MAX_PEEK_BYTES`]), possibly
    /// including bytes the client sent after its ClientHello.
    pub bytes: Vec<u8>,
    pub verdict: PeekVerdict,
}

/// How the first bytes of a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeekVerdict {
    /// A complete ClientHello.
    ClientHello(ClientHello),
    /// The client speaks something other than TLS.
    NotTls,
    /// The client sent TLS the parser refuses.
    Malformed(&'static str),
    /// Nothing arrived within [`PeekTimeouts::first_byte`]: a
    /// server-speaks-first protocol, most likely. `bytes` is empty.
    Silent,
    /// Part of a ClientHello arrived, but not all of it within
    /// [`PeekTimeouts::complete`].
    Stalled,
    /// The client closed its side before the parser could decide (`bytes`
    /// holds whatever it sent, possibly nothing).
    Closed,
}

/// Reads from `stream` until [`parse_client_hello`] decides or a timeout
/// passes. Read errors are returned as such; timeouts and an early close are
/// verdicts.
pub async fn peek_client_hello<R>(stream: &mut R, timeouts: PeekTimeouts) -> std::io::Result<Peeked>
where
    R: AsyncRead + Unpin,
{
    let start = Instant::now();
    let complete_by = start + timeouts.complete;
    let first_byte_by = (start + timeouts.first_byte).min(complete_by);
    // Most ClientHellos arrive in one or two reads; the cap bounds the rest.
    let mut bytes = Vec::with_capacity(2048);
    loop {
        let deadline = if bytes.is_empty() {
            first_byte_by
        } else {
            complete_by
        };
        let want = MAX_PEEK_BYTES.saturating_sub(bytes.len()).max(1);
        let mut limited = (&mut *stream).take(u64::try_from(want).unwrap_or(u64::MAX));
        let read = tokio::time::timeout_at(deadline, limited.read_buf(&mut bytes)).await;
        let verdict = match read {
            Err(_elapsed) if bytes.is_empty() => PeekVerdict::Silent,
            Err(_elapsed) => PeekVerdict::Stalled,
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => PeekVerdict::Closed,
            Ok(Ok(_)) => match parse_client_hello(&bytes) {
                Peek::NeedMore if bytes.len() >= MAX_PEEK_BYTES => {
                    // Unreachable by the parser's own limits; kept so the
                    // buffer is bounded even if those change.
                    PeekVerdict::Malformed("ClientHello larger than the limit")
                }
                Peek::NeedMore => continue,
                Peek::ClientHello(hello) => PeekVerdict::ClientHello(hello),
                Peek::NotTls => PeekVerdict::NotTls,
                Peek::Malformed(reason) => PeekVerdict::Malformed(reason),
            },
        };
        return Ok(Peeked { bytes, verdict });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::crypto::{ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup};
    use rustls::{ClientConfig, ClientConnection, NamedGroup, RootCertStore};
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Stands in for a hybrid post-quantum group with a key share of the
    /// real size (SecP384r1MLKEM1024, group 0x11ed: 97 + 1568 bytes), so the
    /// ClientHello has a post-quantum client's size (1.8 KB: more than one
    /// TCP segment) without a post-quantum implementation. Never completes.
    #[derive(Debug)]
    struct FakeHybridGroup;

    const FAKE_HYBRID: NamedGroup = NamedGroup::Unknown(0x11ed);

    struct FakeHybridShare(Vec<u8>);

    impl SupportedKxGroup for FakeHybridGroup {
        fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
            Ok(Box::new(FakeHybridShare(vec![0x42; 97 + 1568])))
        }

        fn name(&self) -> NamedGroup {
            FAKE_HYBRID
        }
    }

    impl ActiveKeyExchange for FakeHybridShare {
        fn complete(self: Box<Self>, _peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
            Err(rustls::Error::General("test-only key share".into()))
        }

        fn pub_key(&self) -> &[u8] {
            &self.0
        }

        fn group(&self) -> NamedGroup {
            FAKE_HYBRID
        }
    }

    #[derive(Default)]
    struct HelloSpec {
        sni: Option<&'static str>,
        alpn: Vec<Vec<u8>>,
        post_quantum: bool,
        max_fragment: Option<usize>,
    }

    /// A ClientHello exactly as rustls's client writes it.
    fn rustls_client_hello(spec: HelloSpec) -> Vec<u8> {
        let mut provider = rustls::crypto::ring::default_provider();
        if spec.post_quantum {
            provider.kx_groups.insert(0, &FakeHybridGroup);
        }
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider as CryptoProvider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = spec.alpn;
        config.max_fragment_size = spec.max_fragment;
        let name = match spec.sni {
            Some(host) => rustls::pki_types::ServerName::try_from(host.to_string()).unwrap(),
            None => rustls::pki_types::ServerName::IpAddress(
                std::net::Ipv4Addr::new(192, 0, 2, 1).into(),
            ),
        };
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    fn h2_and_http11() -> Vec<Vec<u8>> {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    }

    fn expect_hello(bytes: &[u8]) -> ClientHello {
        match parse_client_hello(bytes) {
            Peek::ClientHello(hello) => hello,
            other => panic!("expected a ClientHello, got {other:?}"),
        }
    }

    fn record_count(bytes: &[u8]) -> usize {
        let mut pos = 0;
        let mut n = 0;
        while pos + 5 <= bytes.len() {
            pos += 5 + usize::from(u16::from_be_bytes([bytes[pos + 3], bytes[pos + 4]]));
            n += 1;
        }
        n
    }

    /// Wraps a handshake message into records of at most `size` bytes.
    fn into_records(message: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// The handshake message inside single-record `hello` bytes.
    fn message_of(hello: &[u8]) -> &[u8] {
        assert_eq!(record_count(hello), 1);
        &hello[5..]
    }

    /// A ClientHello handshake message built by hand from its extensions.
    fn handcrafted(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        for (kind, data) in extensions {
            exts.extend_from_slice(&kind.to_be_bytes());
            exts.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            exts.extend_from_slice(data);
        }
        body.extend_from_slice(&u16::try_from(exts.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&exts);
        let mut message = vec![1];
        message.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        message
    }

    fn sni_extension(names: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        (0, data)
    }

    #[test]
    fn reads_sni_and_alpn_from_a_rustls_client_hello() {
        let bytes = rustls_client_hello(HelloSpec {
            sni: Some("API.Example.com"),
            alpn: h2_and_http11(),
            ..HelloSpec::default()
        });
        let hello = expect_hello(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        assert_eq!(hello.alpn, h2_and_http11());
    }

    #[test]
    fn no_sni_and_no_alpn_are_reported_as_absent() {
        // rustls sends no SNI for an IP address.
        let bytes = rustls_client_hello(HelloSpec::default());
        assert_eq!(expect_hello(&bytes), ClientHello::default());
    }

    #[test]
    fn a_post_quantum_sized_client_hello_spans_tcp_segments_and_parses() {
        let bytes = rustls_client_hello(HelloSpec {
            sni: Some("api.example.com"),
            alpn: h2_and_http11(),
            post_quantum: true,
            ..HelloSpec::default()
        });
        assert!(
            bytes.len() > 1700,
            "only {} bytes: no larger than one segment",
            bytes.len()
        );
        let hello = expect_hello(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        assert_eq!(hello.alpn, h2_and_http11());
    }

    #[test]
    fn a_client_hello_split_across_many_records_is_reassembled() {
        let bytes = rustls_client_hello(HelloSpec {
            sni: Some("api.example.com"),
            alpn: h2_and_http11(),
            post_quantum: true,
            max_fragment: Some(256),
        });
        assert!(record_count(&bytes) > 5, "{} records", record_count(&bytes));
        let hello = expect_hello(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        assert_eq!(hello.alpn, h2_and_http11());
    }

    #[test]
    fn a_large_extension_is_read_past() {
        // A long ALPN list stands in for any large extension before the SNI.
        let mut alpn = h2_and_http11();
        alpn.extend((0..16).map(|i| vec![b'a' + i; 200]));
        let bytes = rustls_client_hello(HelloSpec {
            sni: Some("api.example.com"),
            alpn: alpn.clone(),
            post_quantum: true,
            ..HelloSpec::default()
        });
        assert!(bytes.len() > 5000, "{} bytes", bytes.len());
        let hello = expect_hello(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        assert_eq!(hello.alpn, alpn);
    }

    #[test]
    fn every_prefix_of_a_real_client_hello_needs_more() {
        for spec in [
            HelloSpec {
                sni: Some("api.example.com"),
                alpn: h2_and_http11(),
                post_quantum: true,
                ..HelloSpec::default()
            },
            HelloSpec {
                sni: Some("api.example.com"),
                post_quantum: true,
                max_fragment: Some(128),
                ..HelloSpec::default()
            },
        ] {
            let bytes = rustls_client_hello(spec);
            for end in 0..bytes.len() {
                assert_eq!(
                    parse_client_hello(&bytes[..end]),
                    Peek::NeedMore,
                    "prefix of {end} of {} bytes",
                    bytes.len()
                );
            }
            assert!(matches!(parse_client_hello(&bytes), Peek::ClientHello(_)));
            fuzz_client_hello(&bytes);
        }
    }

    #[test]
    fn bytes_after_the_client_hello_do_not_change_the_verdict() {
        let bytes = rustls_client_hello(HelloSpec {
            sni: Some("api.example.com"),
            ..HelloSpec::default()
        });
        let expected = expect_hello(&bytes);
        let mut more = bytes.clone();
        // e.g. a TLS 1.3 middlebox-compat ChangeCipherSpec, or junk.
        more.extend_from_slice(&[20, 3, 3, 0, 1, 1, 0xff, 0xff]);
        assert_eq!(expect_hello(&more), expected);
    }

    #[test]
    fn plain_text_protocols_are_not_tls() {
        for first in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PRI * HTTP/2.0\r\n",
            b"SSH-2.0-OpenSSH",
            b"\x80\x2e\x01\x03\x01", // an SSLv2-format hello
            b"\x16\x02",
            b"\x16\x03\x05",
            b"\x17\x03\x03\x00\x10",
        ] {
            assert_eq!(parse_client_hello(first), Peek::NotTls, "{first:?}");
        }
        assert_eq!(parse_client_hello(b""), Peek::NeedMore);
        assert_eq!(parse_client_hello(b"\x16"), Peek::NeedMore);
        assert_eq!(parse_client_hello(b"\x16\x03\x01\x00"), Peek::NeedMore);
    }

    #[test]
    fn malformed_client_hellos_are_refused_with_a_reason() {
        let good = handcrafted(&[sni_extension(&[(0, b"api.example.com")])]);
        assert_eq!(
            expect_hello(&into_records(&good, 1000)).sni.as_deref(),
            Some("api.example.com")
        );

        let mut wrong_type = good.clone();
        wrong_type[0] = 2; // ServerHello
        let mut too_big = good.clone();
        too_big[1..4].copy_from_slice(&[0, 0x40, 0x01]); // 16385
        let mut interrupted = into_records(&good[..10], 10);
        interrupted.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]); // an alert
        let mut overlong_record = into_records(&good, good.len());
        let len = u16::try_from(good.len() + 1).unwrap().to_be_bytes();
        overlong_record[3..5].copy_from_slice(&len);
        let two_hosts = handcrafted(&[sni_extension(&[(0, b"a.example"), (0, b"b.example")])]);
        let two_sni = handcrafted(&[
            sni_extension(&[(0, b"a.example")]),
            sni_extension(&[(0, b"b.example")]),
        ]);
        let mut trailing = good.clone();
        trailing.push(0);
        let len = u32::try_from(trailing.len() - 4).unwrap().to_be_bytes();
        trailing[1..4].copy_from_slice(&len[1..]);

        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "not a ClientHello",
                into_records(&wrong_type, 1000),
                "not a ClientHello",
            ),
            (
                "over the size limit",
                into_records(&too_big, 1000),
                "larger than the limit",
            ),
            ("alert mid-hello", interrupted, "non-handshake record"),
            (
                "record past the hello",
                overlong_record,
                "past the ClientHello",
            ),
            (
                "empty record",
                vec![22, 3, 1, 0, 0],
                "empty handshake record",
            ),
            ("record over 2^14", vec![22, 3, 1, 0x40, 0x01], "2^14"),
            (
                "one-byte records",
                into_records(&good, 1),
                "too many records",
            ),
            (
                "two host names",
                into_records(&two_hosts, 1000),
                "more than one host_name",
            ),
            (
                "two SNI extensions",
                into_records(&two_sni, 1000),
                "duplicate extension",
            ),
            (
                "trailing bytes",
                into_records(&trailing, 1000),
                "after the extensions",
            ),
            (
                "NUL in the name",
                into_records(
                    &handcrafted(&[sni_extension(&[(0, b"a.example\0.evil")])]),
                    1000,
                ),
                "not a valid host name",
            ),
            (
                "empty label",
                into_records(&handcrafted(&[sni_extension(&[(0, b"a..example")])]), 1000),
                "not a valid host name",
            ),
            (
                "empty name",
                into_records(&handcrafted(&[sni_extension(&[(0, b"")])]), 1000),
                "not a valid host name",
            ),
            (
                "empty ALPN name",
                into_records(&handcrafted(&[(16, vec![0, 1, 0])]), 1000),
                "ALPN",
            ),
        ];
        for (what, bytes, reason) in cases {
            match parse_client_hello(&bytes) {
                Peek::Malformed(got) => assert!(got.contains(reason), "{what}: {got}"),
                other => panic!("{what}: expected Malformed({reason}), got {other:?}"),
            }
            fuzz_client_hello(&bytes);
        }
    }

    #[test]
    fn names_of_other_types_and_a_trailing_dot_are_accepted() {
        let hello = handcrafted(&[sni_extension(&[(1, b"\xff\xfe"), (0, b"Api.Example.com.")])]);
        assert_eq!(
            expect_hello(&into_records(&hello, 100)).sni.as_deref(),
            Some("api.example.com.")
        );
        let none = handcrafted(&[sni_extension(&[(1, b"whatever")])]);
        assert_eq!(expect_hello(&into_records(&none, 100)).sni, None);
    }

    #[test]
    fn the_record_limit_allows_the_largest_client_hello() {
        // A hello of the largest size in the most records still fits the
        // peek buffer, so the async helper's cap never cuts a valid one.
        // 47 bytes of fixed fields and extension header, then the padding.
        let big = handcrafted(&[(0xfe00, vec![0; MAX_CLIENT_HELLO_LEN - 47])]);
        assert_eq!(big.len() - 4, MAX_CLIENT_HELLO_LEN);
        let records = into_records(&big, big.len().div_ceil(MAX_RECORDS));
        assert_eq!(record_count(&records), MAX_RECORDS);
        assert_eq!(records.len(), MAX_PEEK_BYTES);
        assert_eq!(expect_hello(&records).sni, None);
    }

    /// A tiny deterministic generator, so the mutation test needs no crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).unwrap()
        }
    }

    #[test]
    fn mutated_and_random_inputs_never_panic_and_verdicts_are_final() {
        let seeds = [
            rustls_client_hello(HelloSpec {
                sni: Some("api.example.com"),
                alpn: h2_and_http11(),
                post_quantum: true,
                max_fragment: Some(300),
            }),
            into_records(
                message_of(&rustls_client_hello(HelloSpec {
                    sni: Some("x.example"),
                    ..HelloSpec::default()
                })),
                7,
            ),
        ];
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for i in 0..4000 {
            let mut input = seeds[i % seeds.len()].clone();
            for _ in 0..=rng.below(4) {
                match rng.below(4) {
                    0 => {
                        let at = rng.below(input.len());
                        input[at] = u8::try_from(rng.below(256)).unwrap();
                    }
                    1 => input.truncate(rng.below(input.len() + 1)),
                    2 => {
                        let at = rng.below(input.len() + 1);
                        input.insert(at, u8::try_from(rng.below(256)).unwrap());
                    }
                    _ => {
                        // Put small lengths where length fields tend to be.
                        let at = rng.below(input.len());
                        input[at] = u8::try_from(rng.below(4)).unwrap();
                    }
                }
                if input.is_empty() {
                    break;
                }
            }
            fuzz_client_hello(&input);
        }
        for len in 0..200 {
            let junk: Vec<u8> = (0..len)
                .map(|_| u8::try_from(rng.below(256)).unwrap())
                .collect();
            fuzz_client_hello(&junk);
            let mut tls_like = vec![22, 3, 1];
            tls_like.extend_from_slice(&junk);
            fuzz_client_hello(&tls_like);
        }
    }

    #[tokio::test]
    async fn peek_reassembles_a_hello_sent_in_pieces_and_keeps_every_byte() {
        let bytes = rustls_client_hello(HelloSpec {
            sni: Some("api.example.com"),
            alpn: h2_and_http11(),
            post_quantum: true,
            max_fragment: Some(700),
        });
        let mut then = bytes.clone();
        then.extend_from_slice(b"early bytes after the hello");
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let sent = then.clone();
        let writer = tokio::spawn(async move {
            // Segments that cut records and headers in odd places.
            for chunk in sent.chunks(577) {
                client.write_all(chunk).await.unwrap();
                client.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let peeked = peek_client_hello(&mut server, PeekTimeouts::default())
            .await
            .unwrap();
        let PeekVerdict::ClientHello(hello) = &peeked.verdict else {
            panic!("{:?}", peeked.verdict);
        };
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        assert!(then.starts_with(&peeked.bytes) && peeked.bytes.len() >= bytes.len());
        let _client = writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_its_own_verdict() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let timeouts = PeekTimeouts::default();
        let started = Instant::now();
        let peeked = peek_client_hello(&mut server, timeouts).await.unwrap();
        assert_eq!(peeked.verdict, PeekVerdict::Silent);
        assert!(peeked.bytes.is_empty());
        assert!(started.elapsed() >= timeouts.first_byte);
        assert!(started.elapsed() < timeouts.complete);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_mid_hello_stalls_and_one_that_closes_is_closed() {
        let bytes = rustls_client_hello(HelloSpec {
            sni: Some("api.example.com"),
            ..HelloSpec::default()
        });
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&bytes[..100]).await.unwrap();
        let timeouts = PeekTimeouts::default();
        let started = Instant::now();
        let peeked = peek_client_hello(&mut server, timeouts).await.unwrap();
        assert_eq!(peeked.verdict, PeekVerdict::Stalled);
        assert_eq!(peeked.bytes, bytes[..100]);
        assert!(started.elapsed() >= timeouts.complete);

        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&bytes[..100]).await.unwrap();
        drop(client);
        let peeked = peek_client_hello(&mut server, timeouts).await.unwrap();
        assert_eq!(peeked.verdict, PeekVerdict::Closed);
        assert_eq!(peeked.bytes, bytes[..100]);
    }

    #[tokio::test]
    async fn plain_http_is_decided_on_the_first_byte() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let peeked = peek_client_hello(&mut server, PeekTimeouts::default())
            .await
            .unwrap();
        assert_eq!(peeked.verdict, PeekVerdict::NotTls);
        assert!(peeked.bytes.starts_with(b"G"));
    }
}
