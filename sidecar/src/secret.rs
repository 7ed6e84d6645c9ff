//! The two values the data plane trades in, as distinct types:
//!
//! - [`SecretValue`]: a real credential. It cannot be printed, formatted,
//!   serialized or cloned, and its memory is zeroed when it is dropped
//!   (invariant 1). The one way to its bytes is [`SecretValue::expose_secret`],
//!   so every use can be found with `grep expose_secret`.
//! - [`Placeholder`]: the random stand-in an agent holds instead. It is not
//!   a secret, so it prints, and it is made of RFC 3986 unreserved characters
//!   so it survives URL, JSON, header and basic-auth contexts unchanged and
//!   can be found there.
//!
//! What the type system refuses (each of these fails to compile):
//!
//! ```compile_fail,E0277
//! let s = credbroker_sidecar::secret::SecretValue::copy_from(b"not a real secret");
//! let _ = format!("{:?}", s);
//! ```
//! ```compile_fail,E0277
//! let s = credbroker_sidecar::secret::SecretValue::copy_from(b"not a real secret");
//! let _ = format!("{}", s);
//! ```
//! ```compile_fail,E0599
//! let s = credbroker_sidecar::secret::SecretValue::copy_from(b"not a real secret");
//! let _ = s.clone();
//! ```
//! ```compile_fail,E0277
//! let s = credbroker_sidecar::secret::SecretValue::copy_from(b"not a real secret");
//! let _ = serde_json::to_string(&s);
//! ```
//!
//! while the explicit way compiles:
//!
//! ```
//! let s = credbroker_sidecar::secret::SecretValue::copy_from(b"not a real secret");
//! assert_eq!(s.expose_secret().len(), 17);
//! ```

use std::fmt;
use std::str::FromStr;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::{Error, Result};

/// A real secret value (the bytes read from Vault or a local file).
///
/// Deliberately without `Debug`, `Display`, `Serialize` and `Clone`: share
/// one behind an `Arc` instead of copying it.
///
/// Zeroed on drop: `Drop` calls [`Zeroize::zeroize`] on the buffer, which
/// writes zeros over every initialised byte *and* the spare capacity with
/// volatile writes followed by a compiler fence, so the optimiser cannot
/// elide the wipe as a dead store. The buffer is never grown after
/// construction, so no reallocation leaves an unwiped copy behind. What this
/// type cannot wipe: copies made before it got the bytes (a client's
/// response buffers; see [`SecretValue::copy_from`]) and the outgoing
/// request buffers the bytes are written into.
pub struct SecretValue {
    bytes: Vec<u8>,
}

impl SecretValue {
    /// Takes ownership of `bytes` without copying them; the whole
    /// allocation, spare capacity included, is wiped on drop.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self { bytes }
    }

    /// Takes ownership of a string's bytes without copying them.
    pub fn from_string(value: String) -> Self {
        Self::new(value.into_bytes())
    }

    /// Copies `bytes` into an exactly sized buffer. The caller owns the
    /// source and should wipe it (e.g. hold it in `zeroize::Zeroizing`).
    pub fn copy_from(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }

    /// The real value. Every read of a secret goes through here, so
    /// `grep expose_secret` lists every place a secret is used.
    pub fn expose_secret(&self) -> &[u8] {
        &self.bytes
    }

    /// The value's length in bytes (not secret: it shows on the wire).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl ZeroizeOnDrop for SecretValue {}

/// How a value is written into a part of a request. A raw value dropped into
/// a query string, a form or a JSON string would change its structure when
/// it holds `&`, `"` or the like, so each surface gets the value encoded for
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// As is: headers, basic-auth passwords, raw bodies.
    Raw,
    /// Percent-encoded, every byte but RFC 3986 unreserved ones: query
    /// strings and `application/x-www-form-urlencoded` bodies.
    Percent,
    /// The inside of a JSON string: `"`, `\` and control characters escaped.
    Json,
}

/// A secret in every [`Form`], derived once when the value is read so no
/// request encodes anything. Each form is a [`SecretValue`]: not printable,
/// zeroed on drop.
pub struct SecretForms {
    raw: SecretValue,
    percent: SecretValue,
    json: SecretValue,
}

impl SecretForms {
    pub fn new(raw: SecretValue) -> Self {
        let percent = encode(raw.expose_secret(), percent_len, push_percent);
        let json = encode(raw.expose_secret(), json_len, push_json);
        Self { raw, percent, json }
    }

    pub fn get(&self, form: Form) -> &SecretValue {
        match form {
            Form::Raw => &self.raw,
            Form::Percent => &self.percent,
            Form::Json => &self.json,
        }
    }

    pub fn raw(&self) -> &SecretValue {
        &self.raw
    }
}

/// Encodes into an exactly sized buffer, so it never reallocates (a
/// reallocation would leave an unwiped copy behind).
fn encode(raw: &[u8], len: fn(u8) -> usize, push: fn(&mut Vec<u8>, u8)) -> SecretValue {
    let mut out = Vec::with_capacity(raw.iter().map(|&b| len(b)).sum());
    for &b in raw {
        push(&mut out, b);
    }
    SecretValue::new(out)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn percent_len(b: u8) -> usize {
    if is_unreserved(b) { 1 } else { 3 }
}

fn push_percent(out: &mut Vec<u8>, b: u8) {
    if is_unreserved(b) {
        out.push(b);
    } else {
        out.extend_from_slice(&[
            b'%',
            HEX_UPPER[usize::from(b >> 4)],
            HEX_UPPER[usize::from(b & 15)],
        ]);
    }
}

fn json_len(b: u8) -> usize {
    match b {
        b'"' | b'\\' => 2,
        0x00..=0x1f => 6,
        _ => 1,
    }
}

fn push_json(out: &mut Vec<u8>, b: u8) {
    match b {
        b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
        0x00..=0x1f => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX_UPPER[usize::from(b >> 4)],
            HEX_UPPER[usize::from(b & 15)],
        ]),
        _ => out.push(b),
    }
}

/// The shortest placeholder accepted from the pod annotation (the same
/// rule as `credbroker_crds::config::PodPlaceholders::from_json`).
pub const PLACEHOLDER_MIN_LEN: usize = 22;
/// The longest placeholder accepted: a bound on what the body scanner may
/// hold back across chunks.
pub const PLACEHOLDER_MAX_LEN: usize = 256;
/// The longest prefix [`Placeholder::generate`] takes (the CRD's limit).
pub const PREFIX_MAX_LEN: usize = credbroker_crds::config::PLACEHOLDER_PREFIX_MAX_LEN;
/// Random characters in a generated placeholder.
pub const RANDOM_CHARS: usize = credbroker_crds::config::PLACEHOLDER_RANDOM_CHARS;

/// A per-pod stand-in for one binding's secret. Not a secret: it prints.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Placeholder(Box<str>);

impl Placeholder {
    /// A new placeholder: `prefix` (RFC 3986 unreserved characters, at most
    /// [`PREFIX_MAX_LEN`]) followed by [`RANDOM_CHARS`] characters drawn
    /// uniformly from `[0-9a-z]` with the OS random number generator.
    pub fn generate(prefix: Option<&str>) -> Result<Self> {
        credbroker_crds::config::generate_placeholder(prefix)
            .map(|p| Self(p.into_boxed_str()))
            .map_err(|e| Error::Config(e.to_string()))
    }

    /// Validates a placeholder received from the pod annotation: at least
    /// [`PLACEHOLDER_MIN_LEN`] and at most [`PLACEHOLDER_MAX_LEN`] RFC 3986
    /// unreserved characters.
    pub fn parse(value: &str) -> Result<Self> {
        if value.len() < PLACEHOLDER_MIN_LEN
            || value.len() > PLACEHOLDER_MAX_LEN
            || !value.bytes().all(is_unreserved)
        {
            // The value is not a secret, but it may be garbage: say what is
            // wrong with it rather than echo it.
            return Err(Error::Config(format!(
                "placeholder ({} bytes): must be {PLACEHOLDER_MIN_LEN} to {PLACEHOLDER_MAX_LEN} \
                 RFC 3986 unreserved characters",
                value.len()
            )));
        }
        Ok(Self(value.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl FromStr for Placeholder {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl AsRef<str> for Placeholder {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Placeholder({:?})", &*self.0)
    }
}

/// RFC 3986 section 2.3: `ALPHA / DIGIT / "-" / "." / "_" / "~"`.
pub(crate) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use std::marker::PhantomData;

    use super::*;

    // Trait-absence probes (the `impls` crate's trick): an inherent method
    // whose where-clause does not hold is skipped by method resolution, so
    // the call falls back to the trait's default `false`.
    struct Probe<T>(PhantomData<T>);
    trait Fallback {
        fn debug(&self) -> bool {
            false
        }
        fn display(&self) -> bool {
            false
        }
        fn clone_(&self) -> bool {
            false
        }
        fn serialize(&self) -> bool {
            false
        }
        fn copy(&self) -> bool {
            false
        }
    }
    impl<T> Fallback for Probe<T> {}
    impl<T: fmt::Debug> Probe<T> {
        fn debug(&self) -> bool {
            true
        }
    }
    impl<T: fmt::Display> Probe<T> {
        fn display(&self) -> bool {
            true
        }
    }
    impl<T: Clone> Probe<T> {
        fn clone_(&self) -> bool {
            true
        }
    }
    impl<T: serde::Serialize> Probe<T> {
        fn serialize(&self) -> bool {
            true
        }
    }
    impl<T: Copy> Probe<T> {
        fn copy(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_secret_cannot_be_formatted_serialized_or_cloned() {
        let p = Probe::<SecretValue>(PhantomData);
        assert!(!p.debug() && !p.display() && !p.clone_() && !p.serialize() && !p.copy());
        assert!(Probe::<u8>(PhantomData).copy());
        // The probes do detect the traits (positive control).
        let q = Probe::<Placeholder>(PhantomData);
        assert!(q.debug() && q.display() && q.clone_());
        let r = Probe::<String>(PhantomData);
        assert!(r.serialize());
    }

    #[test]
    fn a_secret_is_zeroize_on_drop_and_exposes_its_bytes_only_by_name() {
        fn is_zeroize_on_drop<T: ZeroizeOnDrop>() {}
        is_zeroize_on_drop::<SecretValue>();
        let s = SecretValue::from_string("fake-secret-value".to_owned());
        assert!(s.expose_secret() == b"fake-secret-value");
        assert_eq!(s.len(), 17);
        assert!(!s.is_empty());
        let v = SecretValue::new(Vec::with_capacity(64));
        assert!(v.is_empty());
    }

    /// The generator's alphabet (`credbroker_crds::config::generate_placeholder`).
    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

    #[test]
    fn generated_placeholders_are_random_unreserved_and_prefixed() {
        let mut seen = std::collections::HashSet::new();
        for prefix in [None, Some("sk-"), Some("ghp_"), Some("a.b~c-d_e")] {
            for _ in 0..50 {
                let p = Placeholder::generate(prefix).unwrap();
                let pre = prefix.unwrap_or("");
                assert!(p.as_str().starts_with(pre));
                let random = &p.as_str()[pre.len()..];
                assert_eq!(random.len(), RANDOM_CHARS);
                assert!(random.bytes().all(|b| ALPHABET.contains(&b)), "{p}");
                // Whatever the generator makes, the parser takes.
                assert_eq!(Placeholder::parse(p.as_str()).unwrap(), p);
                assert!(seen.insert(p));
            }
        }
        // 26 base-36 characters carry at least 128 bits.
        assert!((RANDOM_CHARS as f64) * 36f64.log2() >= 128.0);
        // Every alphabet character shows up (the sampling is not stuck).
        let all: String = (0..40)
            .map(|_| Placeholder::generate(None).unwrap().to_string())
            .collect();
        assert!(ALPHABET.iter().all(|c| all.as_bytes().contains(c)));
    }

    #[test]
    fn bad_prefixes_are_refused() {
        for bad in ["sk ", "a/b", "x%20", "é", &"p".repeat(PREFIX_MAX_LEN + 1)] {
            let e = Placeholder::generate(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("prefix"), "{e}");
        }
    }

    #[test]
    fn parse_follows_the_annotation_rules() {
        let cases: &[(&str, bool)] = &[
            ("0123456789abcdefghijkl", true), // exactly 22
            ("0123456789abcdefghijk", false), // 21
            ("sk-ABCdef012_~.-xyzXYZ0123", true),
            ("0123456789abcdefghijkl\r\n", false),
            ("0123456789abcdefghijkl/", false),
            ("0123456789abcdefghijkl%41", false),
            ("0123456789abcdefghijkl ", false),
            ("0123456789abcdefghijkl\"", false),
            ("0123456789abcdéfghijkl", false),
            ("", false),
        ];
        for (input, ok) in cases {
            assert_eq!(Placeholder::parse(input).is_ok(), *ok, "{input:?}");
            assert_eq!(input.parse::<Placeholder>().is_ok(), *ok, "{input:?}");
        }
        assert!(Placeholder::parse(&"a".repeat(PLACEHOLDER_MAX_LEN)).is_ok());
        let e = Placeholder::parse(&"a".repeat(PLACEHOLDER_MAX_LEN + 1)).unwrap_err();
        // The error describes the value without repeating it.
        assert!(!e.to_string().contains("aaaa"), "{e}");
    }

    #[test]
    fn forms_encode_for_their_surface() {
        let forms = SecretForms::new(SecretValue::copy_from(b"a b&c=\"d\\e\n~-._"));
        assert_eq!(forms.get(Form::Raw).expose_secret(), b"a b&c=\"d\\e\n~-._");
        assert_eq!(
            forms.get(Form::Percent).expose_secret(),
            b"a%20b%26c%3D%22d%5Ce%0A~-._"
        );
        assert_eq!(
            forms.get(Form::Json).expose_secret(),
            b"a b&c=\\\"d\\\\e\\u000A~-._"
        );
        // A JSON-escaped value read back by a JSON parser is the value.
        let quoted = format!(
            "\"{}\"",
            String::from_utf8_lossy(forms.get(Form::Json).expose_secret())
        );
        let back: String = serde_json::from_str(&quoted).unwrap();
        assert_eq!(back.as_bytes(), forms.raw().expose_secret());
    }

    #[test]
    fn placeholders_print() {
        let p = Placeholder::parse("sk-0123456789abcdefghijkl").unwrap();
        assert_eq!(p.to_string(), "sk-0123456789abcdefghijkl");
        assert_eq!(
            format!("{p:?}"),
            "Placeholder(\"sk-0123456789abcdefghijkl\")"
        );
        assert_eq!(p.as_bytes(), b"sk-0123456789abcdefghijkl");
        assert_eq!(AsRef::<str>::as_ref(&p), p.as_str());
    }
}
