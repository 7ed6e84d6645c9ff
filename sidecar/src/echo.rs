//! Catching real values that come back in responses (invariant 4).
//!
//! An [`EchoDetector`] is built from the current secret values (and, during
//! a rotation's grace period, the previous ones) and rebuilt when they
//! change; it is shared read-only by every connection. For each value it
//! derives *needles*, the forms an echo commonly takes:
//!
//! - `raw`: the bytes themselves;
//! - `hex`, `hex-upper`: hexadecimal, either case;
//! - `percent`: URL-encoded the way common encoders do it (RFC 3986,
//!   `application/x-www-form-urlencoded` with `+` for space, JavaScript's
//!   `encodeURIComponent` and `encodeURI`, PHP's `urlencode`, Python's
//!   `quote`), each with upper- and lower-case hex digits;
//! - `json`: JSON-string-escaped (`\"`, `\\`, short control escapes, other
//!   controls as `\u00XX`), with and without `\/`, non-ASCII literal or as
//!   `\uXXXX` (surrogate pairs beyond the BMP) in either hex case, and with
//!   and without Go's HTML-safe `\u003c` `\u003e` `\u0026`;
//! - `base64@k`, `base64url@k`: base64 in the standard and URL-safe
//!   alphabets, for the value starting at byte offset `k` (0, 1 or 2, mod 3)
//!   inside a larger encoded blob. Only the *stable* part of the encoding is
//!   a needle: the characters that depend on the value alone, not on the
//!   bytes around it (offset 0 drops nothing in front, offset 1 the first 2
//!   characters, offset 2 the first 3; and the last character when the
//!   value does not end on a 3-byte group boundary). A stable part is a
//!   substring of every encoding that contains the value at that offset,
//!   padded or not, so padding needs no needles of its own;
//! - `base64@k+percent`, `base64@k+json`: the standard-alphabet stable part
//!   with `+` and `/` URL-encoded, or `/` JSON-escaped as `\/`.
//!
//! Equal needles are kept once. Not caught (the residual risk DESIGN.md
//! accepts): paraphrased or partial echoes, mixed-case hex, line-wrapped
//! (MIME) base64, and other layered encodings.
//!
//! Minimum lengths: a value shorter than [`MIN_SECRET_LEN`] (8) bytes is
//! refused by [`EchoDetector::new`], naming the binding: its needles would
//! be short enough to match by chance. From 8 bytes up, every needle is at
//! least [`MIN_NEEDLE_LEN`] (8) bytes (an 8-byte value's base64 stable parts
//! are 10 characters at each offset), so none is skipped; a needle under 8
//! bytes would be, by construction.
//!
//! Matching is an 8-byte-gram filter with verification, not an
//! Aho-Corasick automaton: the needles are secret material, and this way
//! they live only in buffers this module wipes on drop and never print
//! (an automaton keeps its own copies and has a `Debug` that shows them).
//! Every `stride` bytes (up to 8: the shortest needle's length minus 7) the
//! 8 bytes there are hashed into a bitmap holding the hashes of every
//! needle's grams at offsets `0..stride`; a set bit is verified against the
//! needles it may belong to.
//!
//! Streaming ([`EchoStream`]): only the longest suffix of what was seen
//! that is still the beginning of some needle is held back (at most the
//! longest needle minus one bytes), so SSE and chunked streams flow. A match
//! is found before any of its bytes is released, and the error that reports
//! it ([`EchoFound`]) names the binding and the encoding, never the value.

use std::borrow::Borrow;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::SecretValue;
use crate::{Error, Result};

/// The shortest secret value the detector accepts, in bytes.
pub const MIN_SECRET_LEN: usize = 8;
/// The shortest needle the detector uses, in bytes.
pub const MIN_NEEDLE_LEN: usize = 8;

/// Which base64 text a `Base64` needle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Base64Form {
    /// Standard alphabet (`+`, `/`).
    Standard,
    /// URL-safe alphabet (`-`, `_`).
    UrlSafe,
    /// Standard alphabet, then URL-encoded (`%2B`, `%2F`).
    StandardPercent,
    /// Standard alphabet, then JSON-escaped (`\/`).
    StandardJson,
}

/// The form in which a value came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Raw,
    HexLower,
    HexUpper,
    Percent,
    Json,
    /// `offset`: where the value started inside the encoded blob, mod 3.
    Base64 {
        form: Base64Form,
        offset: u8,
    },
}

impl Encoding {
    /// A stable name for audit records and metrics.
    pub fn as_str(self) -> &'static str {
        const BASE64: [[&str; 3]; 4] = [
            ["base64@0", "base64@1", "base64@2"],
            ["base64url@0", "base64url@1", "base64url@2"],
            ["base64@0+percent", "base64@1+percent", "base64@2+percent"],
            ["base64@0+json", "base64@1+json", "base64@2+json"],
        ];
        match self {
            Self::Raw => "raw",
            Self::HexLower => "hex",
            Self::HexUpper => "hex-upper",
            Self::Percent => "percent",
            Self::Json => "json",
            Self::Base64 { form, offset } => {
                let row = match form {
                    Base64Form::Standard => 0,
                    Base64Form::UrlSafe => 1,
                    Base64Form::StandardPercent => 2,
                    Base64Form::StandardJson => 3,
                };
                BASE64[row][usize::from(offset % 3)]
            }
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secret came back: abort the response. Names the binding (its index)
/// and the encoding, never the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoFound {
    pub binding: usize,
    pub encoding: Encoding,
}

impl fmt::Display for EchoFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the secret of binding #{} came back in the response ({})",
            self.binding, self.encoding
        )
    }
}

impl std::error::Error for EchoFound {}

struct Needle {
    /// Where its bytes are in the arena.
    start: usize,
    len: usize,
    binding: usize,
    encoding: Encoding,
}

struct Gram {
    hash: u32,
    needle: u32,
    /// The gram's offset inside the needle.
    offset: u8,
}

/// The multiplier of the gram hash (Fibonacci hashing). A fixed constant is
/// enough: to aim collisions at the bitmap one would need to know which
/// bits are set, which depends on the secrets.
const MUL: u64 = 0x9E37_79B9_7F4A_7C15;
const MIN_BITS: u32 = 10;
const MAX_BITS: u32 = 22;

/// Finds any of a set of secrets, in any of its derived forms. Build once
/// per set of values, share with `Arc`. Every derived form is wiped on
/// drop; `Debug` shows counts only.
pub struct EchoDetector {
    /// Every needle's bytes, back to back.
    arena: Vec<u8>,
    /// Ordered by bytes, for the prefix test.
    needles: Vec<Needle>,
    ids: Vec<(usize, Box<str>)>,
    /// Bit `hash(gram)` is set for every gram of every needle at offsets
    /// `0..stride`.
    bitmap: Vec<u64>,
    shift: u32,
    /// Ordered by hash.
    grams: Vec<Gram>,
    stride: usize,
    min_len: usize,
    max_len: usize,
    first_bytes: [u64; 4],
}

impl fmt::Debug for EchoDetector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EchoDetector")
            .field(
                "bindings",
                &self
                    .ids
                    .iter()
                    .map(|(i, id)| (*i, &**id))
                    .collect::<Vec<_>>(),
            )
            .field("needles", &self.needles.len())
            .finish_non_exhaustive()
    }
}

impl Drop for EchoDetector {
    fn drop(&mut self) {
        self.arena.zeroize();
        self.bitmap.zeroize();
        for g in &mut self.grams {
            g.hash.zeroize();
            g.needle.zeroize();
            g.offset.zeroize();
        }
        self.first_bytes.zeroize();
    }
}

impl EchoDetector {
    /// A detector that finds nothing (no secrets).
    pub fn empty() -> Self {
        Self {
            arena: Vec::new(),
            needles: Vec::new(),
            ids: Vec::new(),
            bitmap: vec![0; 1 << (MIN_BITS - 6)],
            shift: 64 - MIN_BITS,
            grams: Vec::new(),
            stride: 1,
            min_len: 0,
            max_len: 0,
            first_bytes: [0; 4],
        }
    }

    /// Builds the detector from `(binding index, binding id, value)`; a
    /// binding may appear several times (current and previous values).
    /// Refuses, naming the binding, a value shorter than [`MIN_SECRET_LEN`].
    pub fn new<'a, I>(secrets: I) -> Result<Self>
    where
        I: IntoIterator<Item = (usize, &'a str, &'a SecretValue)>,
    {
        let mut derived: Vec<(Zeroizing<Vec<u8>>, usize, Encoding)> = Vec::new();
        let mut ids: Vec<(usize, Box<str>)> = Vec::new();
        for (binding, id, secret) in secrets {
            if secret.len() < MIN_SECRET_LEN {
                return Err(Error::Secret {
                    binding: id.to_owned(),
                    reason: format!(
                        "its value is shorter than {MIN_SECRET_LEN} bytes, too short to \
                         catch echoes of it without false alarms"
                    ),
                });
            }
            if !ids.iter().any(|(b, _)| *b == binding) {
                ids.push((binding, id.into()));
            }
            derive_needles(secret.expose_secret(), &mut |bytes, encoding| {
                derived.push((bytes, binding, encoding));
            });
        }
        derived.retain(|(bytes, ..)| bytes.len() >= MIN_NEEDLE_LEN);
        // A stable sort keeps, among equal needles, the first derived.
        derived.sort_by(|a, b| a.0.cmp(&b.0));
        derived.dedup_by(|later, earlier| later.0 == earlier.0);
        if derived.is_empty() {
            let mut empty = Self::empty();
            empty.ids = ids;
            return Ok(empty);
        }

        let total: usize = derived.iter().map(|(b, ..)| b.len()).sum();
        let mut arena = Vec::with_capacity(total);
        let mut needles = Vec::with_capacity(derived.len());
        let mut first_bytes = [0u64; 4];
        for (bytes, binding, encoding) in &derived {
            needles.push(Needle {
                start: arena.len(),
                len: bytes.len(),
                binding: *binding,
                encoding: *encoding,
            });
            arena.extend_from_slice(bytes);
            if let Some(&b) = bytes.first() {
                first_bytes[usize::from(b >> 6)] |= 1 << (b & 63);
            }
        }
        drop(derived); // wipes every derived form

        let min_len = needles
            .iter()
            .map(|n| n.len)
            .min()
            .unwrap_or(MIN_NEEDLE_LEN);
        let max_len = needles
            .iter()
            .map(|n| n.len)
            .max()
            .unwrap_or(MIN_NEEDLE_LEN);
        let stride = (min_len + 1).saturating_sub(8).clamp(1, 8);
        let entries = needles.len() * stride;
        let bits = (entries * 32)
            .next_power_of_two()
            .trailing_zeros()
            .clamp(MIN_BITS, MAX_BITS);
        let shift = 64 - bits;
        let mut bitmap = vec![0u64; 1 << (bits - 6)];
        let mut grams = Vec::with_capacity(entries);
        for (j, n) in needles.iter().enumerate() {
            let bytes = &arena[n.start..n.start + n.len];
            for k in 0..stride {
                let Some(gram) = gram_at(bytes, k) else {
                    continue;
                };
                let h = hash(gram, shift);
                bitmap[h >> 6] |= 1 << (h & 63);
                grams.push(Gram {
                    hash: h as u32,
                    needle: j as u32,
                    offset: k as u8,
                });
            }
        }
        grams.sort_unstable_by_key(|g| g.hash);
        Ok(Self {
            arena,
            needles,
            ids,
            bitmap,
            shift,
            grams,
            stride,
            min_len,
            max_len,
            first_bytes,
        })
    }

    /// Whether there is nothing to look for.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// How many distinct needles the values gave.
    pub fn needle_count(&self) -> usize {
        self.needles.len()
    }

    /// The longest needle: a stream holds back at most one byte less.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The id of `binding`, as given to [`Self::new`].
    pub fn binding_id(&self, binding: usize) -> Option<&str> {
        self.ids
            .iter()
            .find(|(b, _)| *b == binding)
            .map(|(_, id)| &**id)
    }

    /// One-shot check of a complete value (a header value, a status line).
    pub fn check(&self, bytes: &[u8]) -> Result<(), EchoFound> {
        match self.scan(bytes) {
            Some(found) => Err(found),
            None => Ok(()),
        }
    }

    fn needle_bytes(&self, n: &Needle) -> &[u8] {
        &self.arena[n.start..n.start + n.len]
    }

    fn bit(&self, h: usize) -> bool {
        self.bitmap
            .get(h >> 6)
            .is_some_and(|w| w & (1 << (h & 63)) != 0)
    }

    /// The first needle found in `data`, if any.
    fn scan(&self, data: &[u8]) -> Option<EchoFound> {
        if self.needles.is_empty() || data.len() < self.min_len {
            return None;
        }
        // Every occurrence of a needle covers a window starting at a
        // multiple of `stride`, at an offset below `stride` in the needle.
        let mut q = 0;
        while let Some(window) = data.get(q..q + 8) {
            if let Ok(w) = <[u8; 8]>::try_from(window) {
                let h = hash(u64::from_le_bytes(w), self.shift);
                if self.bit(h)
                    && let Some(found) = self.verify(data, q, h)
                {
                    return Some(found);
                }
            }
            q += self.stride;
        }
        None
    }

    /// Checks the needles whose grams hash to `h` against `data` around `q`.
    fn verify(&self, data: &[u8], q: usize, h: usize) -> Option<EchoFound> {
        let lo = self.grams.partition_point(|g| (g.hash as usize) < h);
        for g in self.grams[lo..].iter().take_while(|g| g.hash as usize == h) {
            let k = usize::from(g.offset);
            let Some(p) = q.checked_sub(k) else {
                continue;
            };
            let n = &self.needles[g.needle as usize];
            if data.get(p..p + n.len) == Some(self.needle_bytes(n)) {
                return Some(EchoFound {
                    binding: n.binding,
                    encoding: n.encoding,
                });
            }
        }
        None
    }

    /// Whether `s` (non-empty) is the beginning of some needle.
    fn is_prefix(&self, s: &[u8]) -> bool {
        let Some(&first) = s.first() else {
            return false;
        };
        if self.first_bytes[usize::from(first >> 6)] & (1 << (first & 63)) == 0 {
            return false;
        }
        // Every needle's first gram is in the bitmap: a cheap refusal.
        if let Some(g) = gram_at(s, 0)
            && !self.bit(hash(g, self.shift))
        {
            return false;
        }
        let at = self.needles.partition_point(|n| self.needle_bytes(n) < s);
        self.needles
            .get(at)
            .is_some_and(|n| self.needle_bytes(n).starts_with(s))
    }

    /// Where the bytes to hold back start: the longest suffix of `data`
    /// that is a proper prefix of some needle.
    fn hold_from(&self, data: &[u8]) -> usize {
        let lo = data.len().saturating_sub(self.max_len.saturating_sub(1));
        (lo..data.len())
            .find(|&i| self.is_prefix(&data[i..]))
            .unwrap_or(data.len())
    }
}

fn gram_at(bytes: &[u8], at: usize) -> Option<u64> {
    let w = bytes.get(at..at + 8)?;
    <[u8; 8]>::try_from(w).ok().map(u64::from_le_bytes)
}

fn hash(gram: u64, shift: u32) -> usize {
    (gram.wrapping_mul(MUL) >> shift) as usize
}

/// The streaming form of [`EchoDetector`] for one response body.
///
/// Feed chunks; get back what may go to the agent now. On a match it
/// returns [`EchoFound`] (and keeps returning it): abort the response. The
/// held-back bytes are wiped on drop and on a match.
pub struct EchoStream<D> {
    detector: D,
    pending: Vec<u8>,
    found: Option<EchoFound>,
}

impl<D: Borrow<EchoDetector>> EchoStream<D> {
    pub fn new(detector: D) -> Self {
        Self {
            detector,
            pending: Vec::new(),
            found: None,
        }
    }

    /// How many bytes are held back right now.
    pub fn held_back(&self) -> usize {
        self.pending.len()
    }

    /// Gives up the bytes held back without waiting for more, for an
    /// interactive stream that paused (an upgraded connection): what comes
    /// later is checked afresh, so a secret split across this point is not
    /// caught. HTTP bodies never call this.
    pub fn release_held(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.pending))
    }

    /// The detector this stream checks with.
    pub fn detector(&self) -> &EchoDetector {
        self.detector.borrow()
    }

    /// Takes the next chunk; returns what may be released.
    pub fn feed(&mut self, chunk: Bytes) -> Result<Bytes, EchoFound> {
        if let Some(found) = self.found {
            return Err(found);
        }
        let detector = self.detector.borrow();
        if detector.is_empty() || (chunk.is_empty() && self.pending.is_empty()) {
            return Ok(chunk);
        }
        if self.pending.is_empty() {
            // The common case: nothing held back, scan the chunk in place.
            if let Some(found) = detector.scan(&chunk) {
                self.found = Some(found);
                wipe(chunk);
                return Err(found);
            }
            let hold = detector.hold_from(&chunk);
            self.pending.extend_from_slice(&chunk[hold..]);
            return Ok(chunk.slice(..hold));
        }
        let mut data = Vec::with_capacity(self.pending.len() + chunk.len());
        data.extend_from_slice(&self.pending);
        self.pending.zeroize();
        data.extend_from_slice(&chunk);
        if let Some(found) = detector.scan(&data) {
            self.found = Some(found);
            data.zeroize();
            wipe(chunk);
            return Err(found);
        }
        let hold = detector.hold_from(&data);
        self.pending.extend_from_slice(&data[hold..]);
        // The held-back tail may be the start of a secret: wipe it before
        // truncating, so it does not linger in the released buffer's spare
        // capacity.
        data[hold..].zeroize();
        data.truncate(hold);
        Ok(Bytes::from(data))
    }

    /// Ends the body: releases what was held back (the body ended before
    /// it could complete a match).
    pub fn finish(&mut self) -> Result<Bytes, EchoFound> {
        if let Some(found) = self.found {
            return Err(found);
        }
        Ok(Bytes::from(std::mem::take(&mut self.pending)))
    }
}

impl<D> Drop for EchoStream<D> {
    fn drop(&mut self) {
        self.pending.zeroize();
    }
}

/// Wipes a chunk that held an echo, if no one else holds it too.
fn wipe(chunk: Bytes) {
    if let Ok(mut b) = chunk.try_into_mut() {
        b.as_mut().zeroize();
    }
}

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";
const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// URL encoders, as (characters besides ASCII letters and digits left
/// literal, whether space becomes `+`).
const PERCENT_PROFILES: [(&[u8], bool); 7] = [
    (b"-._~", false),                 // RFC 3986; Go PathEscape, PHP rawurlencode
    (b"-._~", true),                  // Go QueryEscape, Python quote_plus
    (b"-._", true),                   // PHP urlencode
    (b"*-._", true),                  // WHATWG form-urlencoded, Java URLEncoder
    (b"-_.!~*'()", false),            // JavaScript encodeURIComponent
    (b"-_.!~*'();,/?:@&=+$#", false), // JavaScript encodeURI
    (b"-._~/", false),                // Python quote (safe="/")
];

/// Calls `push` with every form of `secret` to look for (see the module
/// documentation). Each buffer is sized before it is written, so none
/// reallocates and leaves an unwiped copy behind.
fn derive_needles(secret: &[u8], push: &mut dyn FnMut(Zeroizing<Vec<u8>>, Encoding)) {
    push(Zeroizing::new(secret.to_vec()), Encoding::Raw);
    push(hex(secret, HEX_LOWER), Encoding::HexLower);
    push(hex(secret, HEX_UPPER), Encoding::HexUpper);
    for (literal, space_plus) in PERCENT_PROFILES {
        for digits in [HEX_UPPER, HEX_LOWER] {
            push(
                percent(secret, literal, space_plus, digits),
                Encoding::Percent,
            );
        }
    }
    for slash in [false, true] {
        for non_ascii in [None, Some(HEX_LOWER), Some(HEX_UPPER)] {
            for html in [false, true] {
                push(json(secret, slash, non_ascii, html), Encoding::Json);
            }
        }
    }
    let engines: [(&GeneralPurpose, Base64Form); 2] = [
        (&STANDARD_NO_PAD, Base64Form::Standard),
        (&URL_SAFE_NO_PAD, Base64Form::UrlSafe),
    ];
    for offset in 0..3u8 {
        for (engine, form) in engines {
            let Some(stable) = base64_stable(secret, engine, offset) else {
                continue;
            };
            let encoding = |form| Encoding::Base64 { form, offset };
            if form == Base64Form::Standard {
                for (literal, space_plus) in PERCENT_PROFILES {
                    for digits in [HEX_UPPER, HEX_LOWER] {
                        push(
                            percent(&stable, literal, space_plus, digits),
                            encoding(Base64Form::StandardPercent),
                        );
                    }
                }
                push(
                    json(&stable, true, None, false),
                    encoding(Base64Form::StandardJson),
                );
            }
            push(stable, encoding(form));
        }
    }
}

fn hex(secret: &[u8], digits: &[u8; 16]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 2));
    for &b in secret {
        out.push(digits[usize::from(b >> 4)]);
        out.push(digits[usize::from(b & 15)]);
    }
    out
}

fn percent(
    secret: &[u8],
    literal: &[u8],
    space_plus: bool,
    digits: &[u8; 16],
) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 3));
    for &b in secret {
        if b.is_ascii_alphanumeric() || literal.contains(&b) {
            out.push(b);
        } else if b == b' ' && space_plus {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[
                b'%',
                digits[usize::from(b >> 4)],
                digits[usize::from(b & 15)],
            ]);
        }
    }
    out
}

/// JSON string escaping. `non_ascii`: `None` leaves non-ASCII as it is,
/// `Some(digits)` writes it as `\uXXXX` (bytes of a non-UTF-8 value as
/// Latin-1 code points). `html`: Go's `\u003c`, `\u003e`, `\u0026` and
/// `\u2028`, `\u2029`.
fn json(
    secret: &[u8],
    slash: bool,
    non_ascii: Option<&[u8; 16]>,
    html: bool,
) -> Zeroizing<Vec<u8>> {
    // At most 6 output bytes per input byte (`\u00XX`; a 4-byte character
    // is two `\uXXXX`, 12 bytes).
    let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 6));
    let digits = non_ascii.unwrap_or(HEX_LOWER);
    let unicode = |out: &mut Vec<u8>, unit: u16| {
        out.extend_from_slice(b"\\u");
        for shift in [12, 8, 4, 0] {
            out.push(digits[usize::from((unit >> shift) & 15)]);
        }
    };
    let ascii = |out: &mut Vec<u8>, b: u8| match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'/' if slash => out.extend_from_slice(b"\\/"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        b'<' | b'>' | b'&' if html => unicode(out, u16::from(b)),
        b if b < 0x20 => unicode(out, u16::from(b)),
        b => out.push(b),
    };
    match std::str::from_utf8(secret) {
        Ok(text) => {
            for c in text.chars() {
                if c.is_ascii() {
                    ascii(&mut out, c as u8);
                } else if non_ascii.is_some() || (html && matches!(c, '\u{2028}' | '\u{2029}')) {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        unicode(&mut out, *unit);
                    }
                    units.zeroize();
                } else {
                    let mut utf8 = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                    utf8.zeroize();
                }
            }
        }
        Err(_) => {
            for &b in secret {
                if b.is_ascii() {
                    ascii(&mut out, b);
                } else if non_ascii.is_some() {
                    unicode(&mut out, u16::from(b));
                } else {
                    out.push(b);
                }
            }
        }
    }
    out
}

/// The characters of `secret`'s base64 encoding that stay the same
/// wherever it sits in a larger blob, given its offset mod 3 there.
fn base64_stable(secret: &[u8], engine: &GeneralPurpose, offset: u8) -> Option<Zeroizing<Vec<u8>>> {
    let offset = usize::from(offset % 3);
    let mut input = Zeroizing::new(Vec::with_capacity(secret.len() + 2));
    input.resize(offset, 0);
    input.extend_from_slice(secret);
    let len = base64::encoded_len(input.len(), false)?;
    let mut encoded = Zeroizing::new(vec![0u8; len]);
    engine.encode_slice(&input[..], &mut encoded[..]).ok()?;
    // In front: characters that depend on the bytes before the value.
    let front = [0, 2, 3][offset];
    // Behind: a partial last group's final character depends on the bytes
    // after the value.
    let back = usize::from(input.len() % 3 != 0);
    let stable = encoded.get(front..len.checked_sub(back)?)?;
    Some(Zeroizing::new(stable.to_vec()))
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};

    use super::*;

    /// Fake values covering the character classes that encodings treat
    /// differently. All start with FAKE so a leak in a message is obvious.
    const VALUES: &[&[u8]] = &[
        b"FAKE-sk-live-0123456789abcdef",
        b"FAKE p@ss/w0rd+x=y \"q\\ <&> ~*'()\t\n",
        "FAKE-na\u{ef}ve-\u{1F600}-\u{2028}-value".as_bytes(),
        b"FAKE\xff\x00\x01binary\x80value",
        b"FAKEFAKE",
        b"FAKE??>>~~//++==",
    ];

    fn detector_of(values: &[&[u8]]) -> EchoDetector {
        let secrets: Vec<SecretValue> = values.iter().map(|v| SecretValue::copy_from(v)).collect();
        EchoDetector::new(secrets.iter().enumerate().map(|(i, s)| (i, "fake", s))).unwrap()
    }

    fn all() -> EchoDetector {
        detector_of(VALUES)
    }

    fn embed(needle: &[u8]) -> Vec<u8> {
        [&b"{\"echo\": \"before "[..], needle, b" after\"}"].concat()
    }

    fn needles_of(value: &[u8]) -> Vec<(Vec<u8>, Encoding)> {
        let mut v = Vec::new();
        derive_needles(value, &mut |b, e| v.push((b.to_vec(), e)));
        v
    }

    #[test]
    fn every_derived_form_is_caught_with_its_binding() {
        let d = all();
        for (i, value) in VALUES.iter().enumerate() {
            for (needle, _) in needles_of(value) {
                let found = d.check(&embed(&needle)).unwrap_err();
                assert_eq!(found.binding, i);
            }
        }
    }

    #[test]
    fn independent_encoders_are_caught() {
        let d = all();
        for (i, value) in VALUES.iter().enumerate() {
            let mut forms: Vec<(Vec<u8>, &str)> = vec![
                (value.to_vec(), "raw"),
                (
                    value
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                        .into_bytes(),
                    "hex",
                ),
                (
                    value
                        .iter()
                        .map(|b| format!("{b:02X}"))
                        .collect::<String>()
                        .into_bytes(),
                    "hex-upper",
                ),
                (
                    value
                        .iter()
                        .map(|&b| {
                            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                                char::from(b).to_string()
                            } else {
                                format!("%{b:02X}")
                            }
                        })
                        .collect::<String>()
                        .into_bytes(),
                    "percent",
                ),
                (
                    value
                        .iter()
                        .map(|&b| match b {
                            b' ' => "+".to_owned(),
                            b if b.is_ascii_alphanumeric() || b"*-._".contains(&b) => {
                                char::from(b).to_string()
                            }
                            b => format!("%{b:02x}"),
                        })
                        .collect::<String>()
                        .into_bytes(),
                    "percent",
                ),
            ];
            if let Ok(text) = std::str::from_utf8(value) {
                // serde_json: the encoder most Rust services use.
                let j = serde_json::to_string(text).unwrap();
                forms.push((j.as_bytes()[1..j.len() - 1].to_vec(), "json"));
            }
            for (form, name) in forms {
                let found = d.check(&embed(&form)).unwrap_err();
                assert_eq!(found.binding, i, "value {i} as {name}");
                let _ = Encoding::Raw.as_str();
            }
        }
        // Hand-written: PHP/Python style, '\/' and non-ASCII as \uXXXX with a
        // surrogate pair, and Go's HTML-safe escapes.
        let d = detector_of(&["FAKE/x\u{e9}\u{1F600}<\"".as_bytes()]);
        for form in [
            r#"FAKE\/x\u00e9\ud83d\ude00<\""#,
            r#"FAKE\/x\u00E9\uD83D\uDE00<\""#,
            r#"FAKE/x\u00e9\ud83d\ude00<\""#,
            "FAKE/x\u{e9}\u{1F600}\\u003c\\\"",
            "FAKE/x\u{e9}\u{1F600}<\\\"",
        ] {
            let found = d.check(&embed(form.as_bytes())).unwrap_err();
            assert_eq!(found.encoding, Encoding::Json, "{form}");
        }
    }

    #[test]
    fn base64_is_caught_at_every_alignment_in_both_alphabets_padded_or_not() {
        let d = all();
        let engines: [(&GeneralPurpose, &str); 4] = [
            (&STANDARD, "std"),
            (&STANDARD_NO_PAD, "std-nopad"),
            (&URL_SAFE, "url"),
            (&URL_SAFE_NO_PAD, "url-nopad"),
        ];
        for (i, value) in VALUES.iter().enumerate() {
            for fill in [0x00u8, 0xff, 0x5a] {
                for before in 0..6 {
                    for after in 0..6 {
                        let blob =
                            [vec![fill; before], value.to_vec(), vec![fill ^ 0xa5; after]].concat();
                        for (engine, name) in engines {
                            let text = engine.encode(&blob);
                            let mut forms = vec![text.clone()];
                            if name.starts_with("std") {
                                // Inside a URL and inside JSON (PHP escapes '/').
                                forms.push(
                                    text.replace('+', "%2B")
                                        .replace('/', "%2F")
                                        .replace('=', "%3D"),
                                );
                                forms.push(text.replace('+', "%2b").replace('/', "%2f"));
                                forms.push(text.replace('/', "\\/"));
                            }
                            for form in forms {
                                let found = d.check(&embed(form.as_bytes())).unwrap_err();
                                assert_eq!(found.binding, i, "value {i}, {name}, {before}+{after}");
                                match found.encoding {
                                    Encoding::Base64 { offset, .. } => {
                                        assert_eq!(
                                            usize::from(offset),
                                            before % 3,
                                            "value {i} {name} {before}"
                                        )
                                    }
                                    // A blob with nothing around the value may
                                    // match another alignment's form first;
                                    // any base64 form is right.
                                    other => panic!("value {i} {name} {before}+{after}: {other}"),
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn base64_stable_parts_have_the_expected_shape() {
        // 8 bytes: 10 stable characters at each offset (module docs).
        let s = b"FAKEFAKE";
        for offset in 0..3 {
            let st = base64_stable(s, &STANDARD_NO_PAD, offset).unwrap();
            assert_eq!(st.len(), 10, "offset {offset}");
        }
        // Offset 0, length a multiple of 3: the whole unpadded encoding.
        let st = base64_stable(b"FAKEFAKEF", &STANDARD_NO_PAD, 0).unwrap();
        assert!(st.as_slice() == STANDARD_NO_PAD.encode("FAKEFAKEF").as_bytes());
        // Exhaustive property: for every length 8..40, every offset and
        // fill, the stable part is inside the blob's encoding, and every
        // needle is at least MIN_NEEDLE_LEN long.
        let mut x = 0x9e37u32;
        for len in MIN_SECRET_LEN..40 {
            let value: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (x >> 16) as u8
                })
                .collect();
            assert!(
                needles_of(&value)
                    .iter()
                    .all(|(n, _)| n.len() >= MIN_NEEDLE_LEN)
            );
            for offset in 0..3u8 {
                let st = base64_stable(&value, &STANDARD_NO_PAD, offset).unwrap();
                for fill in [0u8, 0xff] {
                    let blob = [
                        vec![fill; usize::from(offset) + 3],
                        value.clone(),
                        vec![fill; 2],
                    ]
                    .concat();
                    let enc = STANDARD.encode(&blob);
                    assert!(
                        enc.as_bytes().windows(st.len()).any(|w| w == st.as_slice()),
                        "len {len} offset {offset}"
                    );
                }
            }
        }
    }

    #[test]
    fn short_values_are_refused_naming_the_binding() {
        let short = SecretValue::copy_from(b"FAKE123");
        let e = EchoDetector::new([(3, "tiny", &short)])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("binding tiny: its value is shorter than 8 bytes"),
            "{e}"
        );
        assert!(!e.contains("FAKE123"));
        let ok = SecretValue::copy_from(b"FAKE1234");
        assert!(EchoDetector::new([(3, "tiny", &ok)]).is_ok());
    }

    #[test]
    fn old_and_new_values_are_both_caught() {
        let (old, new, other) = (
            SecretValue::copy_from(b"FAKE-old-value-1"),
            SecretValue::copy_from(b"FAKE-new-value-2"),
            SecretValue::copy_from(b"FAKE-other-value"),
        );
        let d = EchoDetector::new([
            (0, "openai", &old),
            (0, "openai", &new),
            (4, "github", &other),
        ])
        .unwrap();
        assert_eq!(d.check(b"x FAKE-old-value-1 y").unwrap_err().binding, 0);
        assert_eq!(d.check(b"x FAKE-new-value-2 y").unwrap_err().binding, 0);
        assert_eq!(d.check(b"x FAKE-other-value y").unwrap_err().binding, 4);
        assert_eq!(d.binding_id(4), Some("github"));
        assert_eq!(d.binding_id(1), None);
        // The same value under two bindings is kept once.
        let twice = EchoDetector::new([(0, "a", &old), (1, "b", &old)]).unwrap();
        assert_eq!(
            twice.needle_count(),
            EchoDetector::new([(0, "a", &old)]).unwrap().needle_count()
        );
    }

    #[test]
    fn reports_and_debug_output_never_carry_the_value() {
        let d = all();
        let found = d.check(&embed(VALUES[0])).unwrap_err();
        assert_eq!(
            found,
            EchoFound {
                binding: 0,
                encoding: Encoding::Raw
            }
        );
        assert_eq!(
            found.to_string(),
            "the secret of binding #0 came back in the response (raw)"
        );
        let dbg = format!("{d:?} {found:?}");
        assert!(!dbg.contains("FAKE") && !dbg.contains("46414b45"), "{dbg}");
        let names: std::collections::HashSet<&str> = VALUES
            .iter()
            .flat_map(|v| needles_of(v))
            .map(|(_, e)| e.as_str())
            .collect();
        assert!(names.len() >= 14, "{names:?}");
    }

    #[test]
    fn no_false_alarms() {
        let d = all();
        // A response that carries the placeholder, not the value.
        let placeholder = crate::secret::Placeholder::generate(Some("sk-")).unwrap();
        assert!(d.check(&embed(placeholder.as_bytes())).is_ok());
        // Pseudo-random bytes, their base64 and hex, and JSON text.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(d.check(&noise).is_ok());
        assert!(d.check(STANDARD.encode(&noise).as_bytes()).is_ok());
        assert!(
            d.check(
                noise
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
                    .as_bytes()
            )
            .is_ok()
        );
        let json = "{\"id\":\"chatcmpl-123\",\"choices\":[{\"message\":{\"content\":\"FAKE is a word; sk-live is a prefix\"}}]}".repeat(50);
        assert!(d.check(json.as_bytes()).is_ok());
        // Partial values are not echoes (the documented residual risk).
        assert!(d.check(&VALUES[0][..VALUES[0].len() - 1]).is_ok());
        // An empty detector finds nothing and holds nothing back.
        let empty = EchoDetector::new([]).unwrap();
        assert!(empty.is_empty() && empty.check(VALUES[0]).is_ok());
        let mut s = EchoStream::new(&empty);
        assert_eq!(&s.feed(Bytes::from_static(b"FAKE")).unwrap()[..], b"FAKE");
        assert_eq!(s.held_back(), 0);
    }

    /// Streams `chunks`; returns what was released and the outcome.
    fn stream(d: &EchoDetector, chunks: &[&[u8]]) -> (Vec<u8>, Result<(), EchoFound>, usize) {
        let mut s = EchoStream::new(d);
        let mut out = Vec::new();
        let mut most = 0;
        for c in chunks {
            match s.feed(Bytes::copy_from_slice(c)) {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Err(e), most),
            }
            most = most.max(s.held_back());
        }
        match s.finish() {
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => return (out, Err(e), most),
        }
        (out, Ok(()), most)
    }

    #[test]
    fn streaming_catches_an_echo_at_every_split_without_releasing_it() {
        let d = all();
        for (i, value) in VALUES.iter().enumerate() {
            // (form, characters in front of its needle that depend on the
            // bytes around the value: 3 for base64 at offset 2)
            let encodings = [
                (value.to_vec(), 0),
                (STANDARD.encode([b"xy", *value].concat()).into_bytes(), 3),
                (
                    needles_of(value)
                        .into_iter()
                        .find(|(_, e)| *e == Encoding::Json)
                        .unwrap()
                        .0,
                    0,
                ),
            ];
            for (encoded, unstable) in encodings {
                let body = embed(&encoded);
                let start = body.len() - encoded.len() - b" after\"}".len() + unstable;
                for cut in 0..=body.len() {
                    let (released, outcome, _) = stream(&d, &[&body[..cut], &body[cut..]]);
                    assert_eq!(outcome.unwrap_err().binding, i, "value {i}, cut {cut}");
                    // Not one byte of the echo reached the agent.
                    assert!(
                        released.len() <= start,
                        "value {i}, cut {cut}: {} > {start}",
                        released.len()
                    );
                }
            }
        }
    }

    #[test]
    fn an_echo_spanning_three_chunks_is_caught() {
        let d = all();
        let body = embed(VALUES[1]);
        let start = body.len() - VALUES[1].len() - b" after\"}".len();
        for i in 0..=body.len() {
            for j in i..=body.len() {
                let (released, outcome, _) = stream(&d, &[&body[..i], &body[i..j], &body[j..]]);
                assert_eq!(outcome.unwrap_err().binding, 1, "cuts {i},{j}");
                assert!(released.len() <= start);
            }
        }
        let singles: Vec<&[u8]> = body.chunks(1).collect();
        assert!(stream(&d, &singles).1.is_err());
    }

    #[test]
    fn a_clean_stream_flows_through_unchanged_holding_back_little() {
        let d = all();
        let body = "data: {\"delta\":\"FAKE-sk-live-0123 is almost a value\"}\n\ndata: [DONE]\n\n"
            .repeat(3);
        let b = body.as_bytes();
        for cut in 0..=b.len() {
            let (released, outcome, most) = stream(&d, &[&b[..cut], &b[cut..]]);
            assert!(outcome.is_ok(), "cut {cut}");
            assert!(released == b);
            assert!(most < d.max_len());
        }
        // Byte by byte (an SSE client reading one token at a time).
        let singles: Vec<&[u8]> = b.chunks(1).collect();
        let (released, outcome, _) = stream(&d, &singles);
        assert!(outcome.is_ok() && released == b);
    }

    #[test]
    fn only_bytes_that_could_begin_a_match_are_held_back() {
        let d = detector_of(&[b"FAKE-sk-live-0123456789abcdef"]);
        let mut s = EchoStream::new(&d);
        // Nothing here begins a needle: released at once, zero-copy.
        let chunk = Bytes::from_static(b"data: hello world\n\n");
        let out = s.feed(chunk.clone()).unwrap();
        assert_eq!((out.as_ptr(), out.len()), (chunk.as_ptr(), chunk.len()));
        // The first bytes of the value: exactly those are held.
        let out = s.feed(Bytes::from_static(b"data: FAKE-s")).unwrap();
        assert_eq!(&out[..], b"data: ");
        assert_eq!(s.held_back(), 6);
        // It turns out not to be the value: released with what follows.
        let out = s.feed(Bytes::from_static(b"ky\n")).unwrap();
        assert_eq!(&out[..], b"FAKE-sky\n");
        assert_eq!(s.held_back(), 0);
        // At most max_len - 1 bytes at any time.
        let longest = needles_of(b"FAKE-sk-live-0123456789abcdef")
            .into_iter()
            .max_by_key(|(n, _)| n.len())
            .unwrap()
            .0;
        let mut s = EchoStream::new(&d);
        s.feed(Bytes::copy_from_slice(&longest[..longest.len() - 1]))
            .unwrap();
        assert_eq!(s.held_back(), d.max_len() - 1);
        // A match sticks.
        let e = s
            .feed(Bytes::copy_from_slice(&longest[longest.len() - 1..]))
            .unwrap_err();
        assert_eq!(s.feed(Bytes::from_static(b"more")).unwrap_err(), e);
        assert_eq!(s.finish().unwrap_err(), e);
        // Header values: one-shot.
        assert!(d.check(b"Bearer FAKE-sk-live-0123456789abcdef").is_err());
        assert!(d.check(b"application/json").is_ok());
        assert!(d.check(b"").is_ok());
    }

    #[test]
    fn wide_secrets_use_a_wide_stride_and_short_ones_stride_one() {
        let d = detector_of(&[b"FAKE-sk-live-0123456789abcdef"]);
        assert_eq!(d.stride, 8);
        let d = detector_of(&[b"FAKEFAKE"]);
        assert_eq!(d.stride, 1);
        // Both still catch their value at every position in a longer text.
        for d in [
            detector_of(&[b"FAKE-sk-live-0123456789abcdef"]),
            detector_of(&[b"FAKEFAKE"]),
        ] {
            let v: &[u8] = if d.stride == 8 {
                b"FAKE-sk-live-0123456789abcdef"
            } else {
                b"FAKEFAKE"
            };
            for pad in 0..20 {
                let text = [vec![b'.'; pad], v.to_vec(), vec![b'.'; 20 - pad]].concat();
                assert!(d.check(&text).is_err(), "pad {pad}");
            }
        }
    }
}
