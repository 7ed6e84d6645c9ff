//! Finding a pod's placeholders in requests and swapping them for secrets.
//!
//! [`PlaceholderSet`] holds ONE leftmost-longest Aho-Corasick automaton over
//! every placeholder of the pod, each tagged with its binding's index (the
//! position in the bindings slice that [`crate::decide`] works on). It is
//! built when the config (re)loads and shared read-only by every connection
//! (`Arc`), so the hot path builds nothing, takes no lock, and allocates
//! nothing for a request that carries no placeholder.
//!
//! On it:
//! - [`PlaceholderSet::find`]: which bindings' placeholders occur in bytes
//!   (what [`crate::decide`] needs before anything is swapped);
//! - [`PlaceholderSet::replace`]: swap them, borrowing the input unchanged
//!   when nothing matched;
//! - [`PlaceholderSet::replace_in_header`]: the same, refusing a value that
//!   would put CR, LF, NUL or another control character into a header;
//! - [`PlaceholderSet::find_in_basic_auth`] /
//!   [`PlaceholderSet::replace_in_basic_auth`]: inside `Basic <base64>`,
//!   swapping in the password only;
//! - [`BodyReplacer`]: the streaming form for bodies, swapping (or, in
//!   detecting mode, refusing) placeholders, holding back only bytes that
//!   could still begin one.
//!
//! The secret for a binding comes from a [`SecretLookup`]: it answers only
//! for the bindings the caller decided may be swapped here, so a placeholder
//! of any other binding fails with [`SubstituteError::NotSwappable`] naming
//! the binding, and the caller blocks the request (invariant 2).
//!
//! Placeholders must not contain one another ([`PlaceholderSet::new`]
//! refuses such sets; random placeholders never do). That makes every match
//! the automaton reports over a prefix of a stream final, which is what lets
//! the streaming form hold back so little.

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use bytes::Bytes;
use credbroker_crds::config::{PodPlaceholders, SidecarBinding};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::{Placeholder, SecretValue};
use crate::{Error, Result};

/// A set of binding indexes (small, growable; allocates only on insert).
#[derive(Debug, Clone, Default)]
pub struct BindingSet {
    words: Vec<u64>,
}

impl PartialEq for BindingSet {
    fn eq(&self, other: &Self) -> bool {
        let (short, long) = if self.words.len() <= other.words.len() {
            (&self.words, &other.words)
        } else {
            (&other.words, &self.words)
        };
        short.iter().zip(long.iter()).all(|(a, b)| a == b)
            && long[short.len()..].iter().all(|w| *w == 0)
    }
}

impl Eq for BindingSet {}

impl BindingSet {
    pub const fn new() -> Self {
        Self { words: Vec::new() }
    }

    pub fn insert(&mut self, binding: usize) {
        let (w, b) = (binding / 64, binding % 64);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << b;
    }

    pub fn contains(&self, binding: usize) -> bool {
        self.words
            .get(binding / 64)
            .is_some_and(|w| w & (1 << (binding % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Adds every member of `other`.
    pub fn union_with(&mut self, other: &BindingSet) {
        if self.words.len() < other.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// The members, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
    }
}

impl FromIterator<usize> for BindingSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut s = Self::new();
        iter.into_iter().for_each(|b| s.insert(b));
        s
    }
}

/// Where the value for a binding's placeholder comes from. Answers `None`
/// for a binding whose placeholder may not be swapped in this request.
pub trait SecretLookup {
    fn secret_for(&self, binding: usize) -> Option<&SecretValue>;
}

/// Indexed by binding: `Some` for the bindings that may be swapped here.
impl<T: Borrow<SecretValue>> SecretLookup for [Option<T>] {
    fn secret_for(&self, binding: usize) -> Option<&SecretValue> {
        self.get(binding)?.as_ref().map(Borrow::borrow)
    }
}

impl<T: Borrow<SecretValue>> SecretLookup for Vec<Option<T>> {
    fn secret_for(&self, binding: usize) -> Option<&SecretValue> {
        self.as_slice().secret_for(binding)
    }
}

impl<T: Borrow<SecretValue>> SecretLookup for BTreeMap<usize, T> {
    fn secret_for(&self, binding: usize) -> Option<&SecretValue> {
        self.get(&binding).map(Borrow::borrow)
    }
}

impl<L: SecretLookup + ?Sized> SecretLookup for &L {
    fn secret_for(&self, binding: usize) -> Option<&SecretValue> {
        (**self).secret_for(binding)
    }
}

impl<L: SecretLookup + ?Sized> SecretLookup for Arc<L> {
    fn secret_for(&self, binding: usize) -> Option<&SecretValue> {
        (**self).secret_for(binding)
    }
}

/// No binding may be swapped: what [`BodyReplacer::detecting`] uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSecrets;

impl SecretLookup for NoSecrets {
    fn secret_for(&self, _: usize) -> Option<&SecretValue> {
        None
    }
}

/// Why a placeholder was not swapped. Names the binding, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubstituteError {
    /// The placeholder's binding may not be swapped here (wrong destination,
    /// method, path or surface, or no value): block the request.
    #[error("binding {id}: its placeholder may not be sent here")]
    NotSwappable { binding: usize, id: Arc<str> },
    /// The value holds a byte a header cannot carry (CR, LF, NUL or another
    /// control character but HTAB): swapping it in would split the header.
    #[error(
        "binding {id}: its value holds CR, LF, NUL or another control character, which a header cannot carry"
    )]
    UnsafeForHeader { binding: usize, id: Arc<str> },
    /// The placeholder is in the user-id of basic-auth credentials; only the
    /// password is swapped.
    #[error(
        "binding {id}: its placeholder is in the basic-auth user-id; only the password is swapped"
    )]
    InBasicAuthUser { binding: usize, id: Arc<str> },
}

impl SubstituteError {
    /// The index of the binding concerned.
    pub fn binding(&self) -> usize {
        match self {
            Self::NotSwappable { binding, .. }
            | Self::UnsafeForHeader { binding, .. }
            | Self::InBasicAuthUser { binding, .. } => *binding,
        }
    }

    /// The binding's id.
    pub fn binding_id(&self) -> &str {
        match self {
            Self::NotSwappable { id, .. }
            | Self::UnsafeForHeader { id, .. }
            | Self::InBasicAuthUser { id, .. } => id,
        }
    }

    /// A stable reason for audit records and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotSwappable { .. } => "placeholder_not_swappable",
            Self::UnsafeForHeader { .. } => "value_unsafe_for_header",
            Self::InBasicAuthUser { .. } => "placeholder_in_basic_auth_user",
        }
    }
}

impl From<SubstituteError> for Error {
    fn from(e: SubstituteError) -> Self {
        let reason = match &e {
            SubstituteError::NotSwappable { .. } => "its placeholder may not be sent here",
            SubstituteError::UnsafeForHeader { .. } => {
                "its value holds CR, LF, NUL or another control character, which a header cannot carry"
            }
            SubstituteError::InBasicAuthUser { .. } => {
                "its placeholder is in the basic-auth user-id; only the password is swapped"
            }
        };
        Error::Secret {
            binding: e.binding_id().to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// The outcome of one substitution: the bytes to send and which bindings
/// were swapped in. It may hold secrets, so it does not print and an owned
/// buffer is wiped on drop; read it with [`Substituted::expose_secret`].
pub struct Substituted<'h> {
    bytes: Cow<'h, [u8]>,
    swapped: BindingSet,
}

impl<'h> Substituted<'h> {
    fn unchanged(bytes: &'h [u8]) -> Self {
        Self {
            bytes: Cow::Borrowed(bytes),
            swapped: BindingSet::new(),
        }
    }

    /// The bytes to send: the input itself when nothing was swapped.
    pub fn expose_secret(&self) -> &[u8] {
        &self.bytes
    }

    /// The bindings whose placeholders were swapped (empty: unchanged).
    pub fn swapped(&self) -> &BindingSet {
        &self.swapped
    }

    /// Whether the output is the input, borrowed (nothing allocated).
    pub fn is_unchanged(&self) -> bool {
        matches!(self.bytes, Cow::Borrowed(_))
    }
}

impl Drop for Substituted<'_> {
    fn drop(&mut self) {
        if let Cow::Owned(v) = &mut self.bytes {
            v.zeroize();
        }
    }
}

struct Pattern {
    binding: usize,
    id: Arc<str>,
    placeholder: Placeholder,
}

/// Every placeholder of one pod, in one automaton. Build once per config
/// load; share with `Arc`.
pub struct PlaceholderSet {
    /// `None` when the pod has no placeholders.
    automaton: Option<AhoCorasick>,
    /// By automaton pattern id.
    patterns: Vec<Pattern>,
    /// Pattern ids ordered by placeholder bytes, for the prefix test.
    sorted: Vec<usize>,
    /// Bytes some placeholder starts with.
    first_bytes: [u64; 4],
    max_len: usize,
}

impl fmt::Debug for PlaceholderSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlaceholderSet")
            .field(
                "placeholders",
                &self
                    .patterns
                    .iter()
                    .map(|p| (p.binding, &*p.id, &p.placeholder))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl PlaceholderSet {
    /// The set with no placeholders (nothing is ever found or swapped).
    pub fn empty() -> Self {
        Self {
            automaton: None,
            patterns: Vec::new(),
            sorted: Vec::new(),
            first_bytes: [0; 4],
            max_len: 0,
        }
    }

    /// Builds the set from `(binding index, binding id, placeholder)`. A
    /// binding may have several placeholders; two bindings may not share
    /// one, and no placeholder may contain another.
    pub fn new<'a, I>(entries: I) -> Result<Self>
    where
        I: IntoIterator<Item = (usize, &'a str, &'a Placeholder)>,
    {
        let mut patterns: Vec<Pattern> = Vec::new();
        for (binding, id, placeholder) in entries {
            if let Some(other) = patterns.iter().find(|p| {
                let (a, b) = (p.placeholder.as_str(), placeholder.as_str());
                a.contains(b) || b.contains(a)
            }) {
                if other.binding == binding && other.placeholder == *placeholder {
                    continue;
                }
                return Err(Error::Config(format!(
                    "placeholders of bindings {:?} and {id:?}: one contains the other, so \
                     neither could be told apart",
                    &*other.id
                )));
            }
            patterns.push(Pattern {
                binding,
                id: id.into(),
                placeholder: placeholder.clone(),
            });
        }
        let automaton = if patterns.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(patterns.iter().map(|p| p.placeholder.as_bytes()))
                    .map_err(|e| Error::Config(format!("placeholder automaton: {e}")))?,
            )
        };
        let mut sorted: Vec<usize> = (0..patterns.len()).collect();
        sorted.sort_by(|&a, &b| {
            patterns[a]
                .placeholder
                .as_bytes()
                .cmp(patterns[b].placeholder.as_bytes())
        });
        let mut first_bytes = [0u64; 4];
        for p in &patterns {
            if let Some(&b) = p.placeholder.as_bytes().first() {
                first_bytes[usize::from(b >> 6)] |= 1 << (b & 63);
            }
        }
        let max_len = patterns
            .iter()
            .map(|p| p.placeholder.as_bytes().len())
            .max()
            .unwrap_or(0);
        Ok(Self {
            automaton,
            patterns,
            sorted,
            first_bytes,
            max_len,
        })
    }

    /// Builds the set for a pod: binding `i` of `bindings` gets the
    /// placeholder the annotation holds under its id. Bindings without a
    /// placeholder are left out (nothing of theirs is ever swapped), and so
    /// are placeholders of ids that no binding has.
    pub fn from_config(
        bindings: &[SidecarBinding],
        placeholders: &PodPlaceholders,
    ) -> Result<Self> {
        let mut parsed = Vec::new();
        for (i, b) in bindings.iter().enumerate() {
            if let Some(raw) = placeholders.0.get(&b.id) {
                let p = Placeholder::parse(raw).map_err(|e| match e {
                    Error::Config(why) => Error::Config(format!("binding {:?}: {why}", b.id)),
                    other => other,
                })?;
                parsed.push((i, b.id.as_str(), p));
            }
        }
        Self::new(parsed.iter().map(|(i, id, p)| (*i, *id, p)))
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The longest placeholder's length: a streaming scanner holds back at
    /// most one byte less.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The length of `binding`'s shortest placeholder, if it has one here.
    pub fn shortest_len(&self, binding: usize) -> Option<usize> {
        self.patterns
            .iter()
            .filter(|p| p.binding == binding)
            .map(|p| p.placeholder.as_bytes().len())
            .min()
    }

    /// The id of `binding`, if it has a placeholder here.
    pub fn binding_id(&self, binding: usize) -> Option<&str> {
        self.patterns
            .iter()
            .find(|p| p.binding == binding)
            .map(|p| &*p.id)
    }

    /// Whether any placeholder occurs in `haystack`.
    pub fn contains_any(&self, haystack: &[u8]) -> bool {
        self.automaton
            .as_ref()
            .is_some_and(|a| a.is_match(haystack))
    }

    /// The bindings whose placeholders occur in `haystack`.
    pub fn find(&self, haystack: &[u8]) -> BindingSet {
        let mut found = BindingSet::new();
        self.find_into(haystack, &mut found);
        found
    }

    /// Adds to `found` the bindings whose placeholders occur in `haystack`
    /// (to gather several header values without allocating).
    pub fn find_into(&self, haystack: &[u8], found: &mut BindingSet) {
        if let Some(a) = &self.automaton {
            for m in a.find_iter(haystack) {
                found.insert(self.patterns[m.pattern().as_usize()].binding);
            }
        }
    }

    /// Swaps every placeholder in `haystack` for its binding's value.
    /// Borrows `haystack` when nothing matched. Fails, naming the binding,
    /// on a placeholder `secrets` has no value for.
    pub fn replace<'h, L>(
        &self,
        haystack: &'h [u8],
        secrets: &L,
    ) -> Result<Substituted<'h>, SubstituteError>
    where
        L: SecretLookup + ?Sized,
    {
        self.replace_checked(haystack, secrets, |_| true)
            .map_err(|(e, _)| e)
    }

    /// [`Self::replace`] for a header value: also refuses a value holding
    /// a control character other than HTAB (CR, LF and NUL among them),
    /// which would split or truncate the header.
    pub fn replace_in_header<'h, L>(
        &self,
        value: &'h [u8],
        secrets: &L,
    ) -> Result<Substituted<'h>, SubstituteError>
    where
        L: SecretLookup + ?Sized,
    {
        self.replace_checked(value, secrets, |s| fits_in_header(s.expose_secret()))
            .map_err(|(e, p)| match (e, p) {
                (SubstituteError::NotSwappable { binding, id }, false) => {
                    SubstituteError::UnsafeForHeader { binding, id }
                }
                (e, _) => e,
            })
    }

    /// The core of [`Self::replace`]: `fits` vets each value used; a value
    /// it refuses fails with `(NotSwappable, false)` for the caller to
    /// rename, a missing one with `(NotSwappable, true)`.
    fn replace_checked<'h, L, F>(
        &self,
        haystack: &'h [u8],
        secrets: &L,
        fits: F,
    ) -> Result<Substituted<'h>, (SubstituteError, bool)>
    where
        L: SecretLookup + ?Sized,
        F: Fn(&SecretValue) -> bool,
    {
        let Some(automaton) = &self.automaton else {
            return Ok(Substituted::unchanged(haystack));
        };
        // First pass: vet every match and size the output exactly, so the
        // buffer that will hold secrets is never reallocated (a reallocation
        // would leave an unwiped copy behind).
        let mut out_len = haystack.len();
        let mut swapped = BindingSet::new();
        for m in automaton.find_iter(haystack) {
            let p = &self.patterns[m.pattern().as_usize()];
            let secret = secrets
                .secret_for(p.binding)
                .ok_or_else(|| (self.not_swappable(p), true))?;
            if !fits(secret) {
                return Err((self.not_swappable(p), false));
            }
            out_len = out_len - m.len() + secret.len();
            swapped.insert(p.binding);
        }
        if swapped.is_empty() {
            return Ok(Substituted::unchanged(haystack));
        }
        let mut out = Vec::with_capacity(out_len);
        let mut last = 0;
        for m in automaton.find_iter(haystack) {
            let p = &self.patterns[m.pattern().as_usize()];
            let Some(secret) = secrets.secret_for(p.binding) else {
                out.zeroize();
                return Err((self.not_swappable(p), true));
            };
            out.extend_from_slice(&haystack[last..m.start()]);
            out.extend_from_slice(secret.expose_secret());
            last = m.end();
        }
        out.extend_from_slice(&haystack[last..]);
        Ok(Substituted {
            bytes: Cow::Owned(out),
            swapped,
        })
    }

    fn not_swappable(&self, p: &Pattern) -> SubstituteError {
        SubstituteError::NotSwappable {
            binding: p.binding,
            id: p.id.clone(),
        }
    }

    /// The bindings whose placeholders occur inside the credentials of an
    /// `Authorization: Basic <base64>` value (user-id or password). Empty
    /// when the value is not basic auth or does not decode.
    pub fn find_in_basic_auth(&self, value: &[u8]) -> BindingSet {
        match split_basic_auth(value) {
            Some((_, creds)) if !self.is_empty() => self.find(&creds),
            _ => BindingSet::new(),
        }
    }

    /// Swaps a placeholder in the password of an `Authorization: Basic`
    /// value and re-encodes it. `Ok(None)`: not basic auth, not decodable,
    /// or no placeholder in the password. A placeholder in the user-id is an
    /// error: only the password is swapped.
    pub fn replace_in_basic_auth<L>(
        &self,
        value: &[u8],
        secrets: &L,
    ) -> Result<Option<Substituted<'static>>, SubstituteError>
    where
        L: SecretLookup + ?Sized,
    {
        if self.is_empty() {
            return Ok(None);
        }
        let Some((token, creds)) = split_basic_auth(value) else {
            return Ok(None);
        };
        // RFC 7617: the user-id cannot contain ':', so the first one splits.
        let colon = creds.iter().position(|&b| b == b':');
        let (user, password) = match colon {
            Some(c) => (&creds[..c], &creds[c + 1..]),
            None => (&creds[..], &[][..]),
        };
        if let Some(a) = &self.automaton
            && let Some(m) = a.find(user)
        {
            let p = &self.patterns[m.pattern().as_usize()];
            return Err(SubstituteError::InBasicAuthUser {
                binding: p.binding,
                id: p.id.clone(),
            });
        }
        let new_password = self.replace(password, secrets)?;
        if new_password.is_unchanged() {
            return Ok(None);
        }
        let new_password_bytes = new_password.expose_secret();
        let mut new_creds = Zeroizing::new(Vec::with_capacity(
            user.len() + 1 + new_password_bytes.len(),
        ));
        new_creds.extend_from_slice(user);
        new_creds.push(b':');
        new_creds.extend_from_slice(new_password_bytes);
        let Some(encoded_len) = base64::encoded_len(new_creds.len(), true) else {
            // Only on lengths near usize::MAX; refuse rather than panic.
            return Err(self.not_swappable_binding(new_password.swapped()));
        };
        let mut out = Vec::with_capacity(value.len() - token.len() + encoded_len);
        out.extend_from_slice(&value[..token.start]);
        let at = out.len();
        out.resize(at + encoded_len, 0);
        if STANDARD
            .encode_slice(&new_creds[..], &mut out[at..])
            .is_err()
        {
            out.zeroize();
            return Err(self.not_swappable_binding(new_password.swapped()));
        }
        out.extend_from_slice(&value[token.end..]);
        Ok(Some(Substituted {
            bytes: Cow::Owned(out),
            swapped: new_password.swapped().clone(),
        }))
    }

    fn not_swappable_binding(&self, bindings: &BindingSet) -> SubstituteError {
        let binding = bindings.iter().next().unwrap_or(0);
        SubstituteError::NotSwappable {
            binding,
            id: self.binding_id(binding).unwrap_or("?").into(),
        }
    }

    /// Whether `s` (non-empty) is the beginning of some placeholder.
    fn is_prefix(&self, s: &[u8]) -> bool {
        let Some(&first) = s.first() else {
            return false;
        };
        if self.first_bytes[usize::from(first >> 6)] & (1 << (first & 63)) == 0 {
            return false;
        }
        // Placeholders that start with `s` sort together right after it.
        let at = self
            .sorted
            .partition_point(|&i| self.patterns[i].placeholder.as_bytes() < s);
        self.sorted
            .get(at)
            .is_some_and(|&i| self.patterns[i].placeholder.as_bytes().starts_with(s))
    }

    /// Where the bytes to hold back start: the longest suffix of `data`,
    /// not before `from`, that is a proper prefix of some placeholder.
    fn hold_from(&self, data: &[u8], from: usize) -> usize {
        let lo = from.max(data.len().saturating_sub(self.max_len.saturating_sub(1)));
        (lo..data.len())
            .find(|&i| self.is_prefix(&data[i..]))
            .unwrap_or(data.len())
    }
}

/// The decoding engine for basic-auth credentials: standard alphabet,
/// padding optional (clients differ).
const BASIC_AUTH_DECODER: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Splits `Basic <token68>`: the token's range in `value` and the decoded
/// credentials. `None` for another scheme or a token that does not decode.
fn split_basic_auth(value: &[u8]) -> Option<(std::ops::Range<usize>, Zeroizing<Vec<u8>>)> {
    let scheme = value.get(..5)?;
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let rest = &value[5..];
    let spaces = rest.iter().take_while(|&&b| b == b' ').count();
    if spaces == 0 {
        return None;
    }
    let start = 5 + spaces;
    let trailing = value[start..]
        .iter()
        .rev()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let end = value.len() - trailing;
    let token = &value[start..end];
    if token.is_empty() {
        return None;
    }
    let mut creds = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(token.len())]);
    let n = BASIC_AUTH_DECODER
        .decode_slice(token, &mut creds[..])
        .ok()?;
    creds.truncate(n);
    Some((start..end, creds))
}

/// Whether a header value may carry `bytes`: no control character but HTAB
/// (so no CR, LF or NUL), no DEL.
fn fits_in_header(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

/// A streaming placeholder scanner for bodies: feed chunks, get chunks.
///
/// It holds back only the longest suffix of what it has seen that is still
/// the beginning of some placeholder (at most [`PlaceholderSet::max_len`]
/// minus one bytes, and none when the data cannot begin one), so streams
/// stay streaming.
///
/// - Replacing mode ([`Self::replacing`]) swaps placeholders for values
///   from its [`SecretLookup`] and records the bindings swapped
///   ([`Self::seen`]).
/// - Detecting mode ([`Self::detecting`]) swaps nothing: bytes pass through
///   unchanged until a placeholder appears.
///
/// In both modes a placeholder with no value here (in detecting mode: any
/// placeholder) fails the stream with [`SubstituteError::NotSwappable`]
/// naming its binding, and nothing of the data that held it is released:
/// since a placeholder's beginning is always held back, no byte of it has
/// left, and the caller blocks the request (placeholder of binding X toward
/// a destination outside X's list). An `Ok` output never carries a
/// placeholder that may not go where the stream goes. There is deliberately
/// no mode that passes placeholders through and reports them afterwards:
/// in a stream, afterwards is too late.
///
/// Output chunks are `Bytes` for the HTTP stack; once handed over, the
/// swapped-in values live in its buffers, which are not wiped.
pub struct BodyReplacer<P, L = NoSecrets> {
    set: P,
    secrets: L,
    pending: Vec<u8>,
    seen: BindingSet,
    failed: Option<SubstituteError>,
}

impl<P: Borrow<PlaceholderSet>, L: SecretLookup> BodyReplacer<P, L> {
    /// Swaps placeholders for values from `secrets`; a placeholder it has no
    /// value for fails the stream with [`SubstituteError::NotSwappable`].
    pub fn replacing(set: P, secrets: L) -> Self {
        Self {
            set,
            secrets,
            pending: Vec::new(),
            seen: BindingSet::new(),
            failed: None,
        }
    }

    /// The bindings swapped so far.
    pub fn seen(&self) -> &BindingSet {
        &self.seen
    }

    /// How many bytes are held back right now.
    pub fn held_back(&self) -> usize {
        self.pending.len()
    }

    /// Takes the next chunk; returns what may be sent now. After an error
    /// every call returns it again: the body must be abandoned.
    pub fn feed(&mut self, chunk: Bytes) -> Result<Bytes, SubstituteError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.set.borrow().is_empty() || (chunk.is_empty() && self.pending.is_empty()) {
            return Ok(chunk);
        }
        if self.pending.is_empty() {
            // The common case: nothing held back, scan the chunk in place.
            match self.step(&chunk)? {
                Step::Unchanged(hold) => {
                    self.pending.extend_from_slice(&chunk[hold..]);
                    Ok(chunk.slice(..hold))
                }
                Step::Replaced(out, hold) => {
                    self.pending.extend_from_slice(&chunk[hold..]);
                    Ok(Bytes::from(out))
                }
            }
        } else {
            let mut data = std::mem::take(&mut self.pending);
            data.extend_from_slice(&chunk);
            match self.step(&data)? {
                Step::Unchanged(hold) => {
                    self.pending = data.split_off(hold);
                    Ok(Bytes::from(data))
                }
                Step::Replaced(out, hold) => {
                    self.pending = data.split_off(hold);
                    Ok(Bytes::from(out))
                }
            }
        }
    }

    /// Ends the body: returns the bytes still held back (they cannot be a
    /// placeholder: the body ended before one completed).
    pub fn finish(&mut self) -> Result<Bytes, SubstituteError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        Ok(Bytes::from(std::mem::take(&mut self.pending)))
    }

    /// Scans `data` (held-back bytes followed by the new chunk): swaps every
    /// match, and says where the bytes to hold back start.
    fn step(&mut self, data: &[u8]) -> Result<Step, SubstituteError> {
        let set = self.set.borrow();
        let Some(automaton) = &set.automaton else {
            return Ok(Step::Unchanged(data.len()));
        };
        let mut last_end = 0;
        let mut out_len = 0usize;
        let mut matched = false;
        for m in automaton.find_iter(data) {
            let p = &set.patterns[m.pattern().as_usize()];
            let Some(secret) = self.secrets.secret_for(p.binding) else {
                let e = set.not_swappable(p);
                self.failed = Some(e.clone());
                return Err(e);
            };
            out_len += m.start() - last_end + secret.len();
            self.seen.insert(p.binding);
            last_end = m.end();
            matched = true;
        }
        // Every match is final (no placeholder contains another), so only a
        // suffix after the last match can still grow into one.
        let hold = set.hold_from(data, last_end);
        if !matched {
            return Ok(Step::Unchanged(hold));
        }
        let mut out = Vec::with_capacity(out_len + hold - last_end);
        let mut last = 0;
        for m in automaton.find_iter(&data[..last_end]) {
            let p = &set.patterns[m.pattern().as_usize()];
            let Some(secret) = self.secrets.secret_for(p.binding) else {
                out.zeroize();
                let e = set.not_swappable(p);
                self.failed = Some(e.clone());
                return Err(e);
            };
            out.extend_from_slice(&data[last..m.start()]);
            out.extend_from_slice(secret.expose_secret());
            last = m.end();
        }
        out.extend_from_slice(&data[last..hold]);
        Ok(Step::Replaced(out, hold))
    }
}

impl<P: Borrow<PlaceholderSet>> BodyReplacer<P, NoSecrets> {
    /// Passes bytes through unchanged and fails on the first placeholder,
    /// naming its binding, before any byte of it is released: for a body
    /// going where no placeholder may go.
    pub fn detecting(set: P) -> Self {
        Self {
            set,
            secrets: NoSecrets,
            pending: Vec::new(),
            seen: BindingSet::new(),
            failed: None,
        }
    }
}

enum Step {
    /// Release `data[..hold]` unchanged.
    Unchanged(usize),
    /// Release this buffer (`data[..hold]` with placeholders swapped).
    Replaced(Vec<u8>, usize),
}

/// A fuzzing entry point over the whole data plane: builds placeholders and
/// fake secrets from `data`, then checks that the one-shot and streaming
/// scanners, the replacer and the echo detector agree, whatever the input
/// and wherever it is split. Panics when an invariant breaks.
///
/// Invariants checked:
/// - `find` reports exactly the bindings that `replace` swaps;
/// - streaming replacement, at fuzz-chosen split points, produces the same
///   bytes and the same bindings (or the same error) as one-shot;
/// - no placeholder survives replacement;
/// - detecting mode passes the input through unchanged up to the first
///   placeholder, and fails naming its binding before releasing any of it;
/// - a swapped secret is always caught by the echo detector, one-shot and
///   streaming, and streaming agrees with one-shot; when nothing is caught
///   the stream's output is its input.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_data_plane(data: &[u8]) {
    use crate::echo::{EchoDetector, EchoStream};

    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    // Three fixed placeholders sharing a prefix (the hard case for the
    // holdback), distinct fake secrets made only of bytes no placeholder
    // has, so a placeholder cannot be formed across a swapped value.
    let placeholders = [
        "sk-aaaaaaaaaaaaaaaaaaaaaaaaaa",
        "sk-aaaaaaaaaaaaaaaaaaaaaaaaab",
        "sk-abcdefghijklmnopqrstuvwxyz",
    ]
    .map(|s| Placeholder::parse(s).unwrap_or_else(|e| panic!("fixed placeholder: {e}")));
    let secrets: Vec<Option<SecretValue>> = vec![
        Some(SecretValue::copy_from(b"#FAKE!#SECRET!#ZERO#")),
        Some(SecretValue::copy_from(b"@fake@secret@one@@")),
        None, // binding 2 may not be swapped
    ];
    let set = PlaceholderSet::new(placeholders.iter().enumerate().map(|(i, p)| (i, "fuzz", p)))
        .unwrap_or_else(|e| panic!("placeholder set: {e}"));
    // Splice a placeholder in where the control byte says, so matches are
    // common rather than left to chance.
    let mut input = rest.to_vec();
    if control & 0x80 != 0 && !input.is_empty() {
        let at = usize::from(control) % (input.len() + 1);
        let p = placeholders[usize::from(control) % 2].as_bytes();
        input.splice(at.min(input.len())..at.min(input.len()), p.iter().copied());
    }
    let splits: Vec<usize> = {
        let step = usize::from(control & 0x1f) + 1;
        (step..input.len()).step_by(step).collect()
    };
    let chunks = || {
        let mut last = 0;
        let mut v = Vec::new();
        for &s in splits.iter().chain(std::iter::once(&input.len())) {
            v.push(Bytes::copy_from_slice(&input[last..s]));
            last = s;
        }
        v
    };

    let found = set.find(&input);
    let one_shot = set.replace(&input, &secrets);

    // Detecting stream: unchanged output until the first placeholder, which
    // fails the stream before any byte of it is released.
    let first = set
        .automaton
        .as_ref()
        .and_then(|a| a.find(&input[..]))
        .map(|m| (m.start(), set.patterns[m.pattern().as_usize()].binding));
    let mut det = BodyReplacer::detecting(&set);
    let mut passed = Vec::new();
    let mut det_err = None;
    for c in chunks() {
        match det.feed(c) {
            Ok(b) => passed.extend_from_slice(&b),
            Err(e) => {
                det_err = Some(e);
                break;
            }
        }
        assert!(det.held_back() < set.max_len());
    }
    if det_err.is_none() {
        match det.finish() {
            Ok(b) => passed.extend_from_slice(&b),
            Err(e) => det_err = Some(e),
        }
    }
    match (first, det_err) {
        (None, None) => assert!(passed == input, "detecting mode changed the stream"),
        (Some((start, binding)), Some(e)) => {
            assert_eq!(e.binding(), binding);
            assert!(
                passed.len() <= start,
                "detecting mode released a placeholder byte"
            );
            assert!(passed == input[..passed.len()]);
        }
        (a, b) => panic!("first placeholder {a:?}, detecting stream {b:?}"),
    }
    assert!(det.seen().is_empty());

    // Replacing stream: same result as one-shot.
    let mut rep = BodyReplacer::replacing(&set, &secrets);
    let mut streamed = Vec::new();
    let mut stream_err = None;
    for c in chunks() {
        match rep.feed(c) {
            Ok(b) => streamed.extend_from_slice(&b),
            Err(e) => {
                stream_err = Some(e);
                break;
            }
        }
    }
    if stream_err.is_none() {
        match rep.finish() {
            Ok(b) => streamed.extend_from_slice(&b),
            Err(e) => stream_err = Some(e),
        }
    }
    match (&one_shot, stream_err) {
        (Ok(out), None) => {
            assert!(
                out.expose_secret() == streamed.as_slice(),
                "streaming differs from one-shot"
            );
            assert_eq!(out.swapped(), &found);
            assert_eq!(rep.seen(), &found);
            assert!(
                set.find(out.expose_secret()).is_empty(),
                "a placeholder survived"
            );
            assert_eq!(out.is_unchanged(), found.is_empty());
        }
        (Err(a), Some(b)) => {
            assert_eq!(a, &b);
            assert!(found.contains(2));
        }
        (a, b) => panic!(
            "one-shot {:?} but streaming {:?}",
            a.as_ref().err(),
            b.map(|e| e.to_string())
        ),
    }

    // Echo detection over what would go upstream, as if it came back.
    let Ok(out) = one_shot else { return };
    let detector = EchoDetector::new(
        secrets
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, "fuzz", s))),
    )
    .unwrap_or_else(|e| panic!("detector: {e}"));
    let echoed = out.expose_secret();
    let caught = detector.check(echoed);
    if !out.swapped().is_empty() {
        assert!(caught.is_err(), "a swapped secret was not caught");
    }
    let mut stream = EchoStream::new(&detector);
    let mut released = Vec::new();
    let mut stream_caught = None;
    let mut last = 0;
    for &s in splits.iter().chain(std::iter::once(&input.len())) {
        // Split the echoed bytes at the same proportional points.
        let s = (s * echoed.len()) / input.len().max(1);
        let s = s.clamp(last, echoed.len());
        match stream.feed(Bytes::copy_from_slice(&echoed[last..s])) {
            Ok(b) => released.extend_from_slice(&b),
            Err(e) => {
                stream_caught = Some(e);
                break;
            }
        }
        last = s;
    }
    if stream_caught.is_none() {
        if last < echoed.len() {
            match stream.feed(Bytes::copy_from_slice(&echoed[last..])) {
                Ok(b) => released.extend_from_slice(&b),
                Err(e) => stream_caught = Some(e),
            }
        }
        if stream_caught.is_none() {
            match stream.finish() {
                Ok(b) => released.extend_from_slice(&b),
                Err(e) => stream_caught = Some(e),
            }
        }
    }
    assert_eq!(
        caught.is_err(),
        stream_caught.is_some(),
        "streaming echo check differs"
    );
    if stream_caught.is_none() {
        assert!(released == echoed, "the echo stream changed the bytes");
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use credbroker_crds::VaultSecretRef;

    use super::*;

    const P_OPENAI: &str = "sk-0123456789abcdefghijklmnop";
    const P_GH: &str = "ghp_zyxwvutsrqponmlkjihgfedcba";
    /// Shares a 20-byte prefix with P_OPENAI: the hard case for holdback.
    const P_TWIN: &str = "sk-0123456789abcdefghZZZZZZZZ";
    const V_OPENAI: &[u8] = b"FAKE-openai-value";
    const V_GH: &[u8] = b"FAKE-github-value-2";

    fn ph(s: &str) -> Placeholder {
        Placeholder::parse(s).unwrap()
    }

    fn set() -> PlaceholderSet {
        let (a, b, c) = (ph(P_OPENAI), ph(P_GH), ph(P_TWIN));
        PlaceholderSet::new([(0, "openai", &a), (1, "github", &b), (2, "twin", &c)]).unwrap()
    }

    fn secrets() -> Vec<Option<SecretValue>> {
        vec![
            Some(SecretValue::copy_from(V_OPENAI)),
            Some(SecretValue::copy_from(V_GH)),
            None,
        ]
    }

    /// What the one-shot replacement should give, computed the slow way.
    fn naive(input: &str) -> String {
        input
            .replace(P_OPENAI, "FAKE-openai-value")
            .replace(P_GH, "FAKE-github-value-2")
    }

    #[test]
    fn the_shared_parts_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<PlaceholderSet>();
        send_sync::<SecretValue>();
        send_sync::<crate::echo::EchoDetector>();
        // What a hyper body adapter would hold.
        send::<BodyReplacer<Arc<PlaceholderSet>, Arc<Vec<Option<Arc<SecretValue>>>>>>();
        send::<crate::echo::EchoStream<Arc<crate::echo::EchoDetector>>>();
    }

    #[test]
    fn binding_sets() {
        let mut s = BindingSet::new();
        assert!(s.is_empty());
        for b in [0, 3, 64, 130] {
            s.insert(b);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 3, 64, 130]);
        assert_eq!(s.len(), 4);
        assert!(s.contains(130) && !s.contains(131) && !s.contains(10_000));
        let mut t: BindingSet = [1, 200].into_iter().collect();
        t.union_with(&s);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![0, 1, 3, 64, 130, 200]);
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t, BindingSet::new().clone());
    }

    #[test]
    fn the_set_refuses_ambiguous_placeholders() {
        let a = ph(P_OPENAI);
        let longer = ph(&format!("{P_OPENAI}x"));
        // Shared by two bindings.
        let e = PlaceholderSet::new([(0, "a", &a), (1, "b", &a)]).unwrap_err();
        assert!(e.to_string().contains("\"a\" and \"b\""), "{e}");
        // One contains another.
        assert!(PlaceholderSet::new([(0, "a", &a), (1, "b", &longer)]).is_err());
        assert!(PlaceholderSet::new([(0, "a", &longer), (1, "b", &a)]).is_err());
        // The same placeholder twice for one binding is kept once; a binding
        // may have two (rotation of placeholders).
        let s = PlaceholderSet::new([(0, "a", &a), (0, "a", &a), (0, "a", &ph(P_GH))]).unwrap();
        assert_eq!(s.patterns.len(), 2);
        assert_eq!(s.binding_id(0), Some("a"));
        assert_eq!(s.binding_id(1), None);
        // Empty: finds nothing, changes nothing.
        let empty = PlaceholderSet::new([]).unwrap();
        assert!(empty.is_empty() && !empty.contains_any(P_OPENAI.as_bytes()));
        assert!(
            empty
                .replace(P_OPENAI.as_bytes(), &NoSecrets)
                .unwrap()
                .is_unchanged()
        );
        assert!(format!("{:?}", set()).contains(P_GH));
    }

    #[test]
    fn find_reports_the_bindings_present() {
        let s = set();
        let cases: &[(&str, &[usize])] = &[
            ("", &[]),
            ("no placeholder here", &[]),
            (P_OPENAI, &[0]),
            (&format!("Bearer {P_OPENAI}"), &[0]),
            (&format!("{P_GH}&{P_OPENAI}"), &[0, 1]),
            (P_TWIN, &[2]),
            // Truncated: not a placeholder.
            (&P_OPENAI[..P_OPENAI.len() - 1], &[]),
            // In a URL, JSON and a form body.
            (&format!("/v1/x?key={P_GH}&a=b"), &[1]),
            (&format!("{{\"key\":\"{P_OPENAI}\"}}"), &[0]),
            // Glued to other characters: still found.
            (&format!("xx{P_OPENAI}yy"), &[0]),
        ];
        for (input, want) in cases {
            let got: Vec<usize> = s.find(input.as_bytes()).iter().collect();
            assert_eq!(&got, want, "{input:?}");
            assert_eq!(s.contains_any(input.as_bytes()), !want.is_empty());
        }
        let mut acc = BindingSet::new();
        s.find_into(P_OPENAI.as_bytes(), &mut acc);
        s.find_into(P_GH.as_bytes(), &mut acc);
        assert_eq!(acc.iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn replace_swaps_every_placeholder_and_borrows_when_none() {
        let s = set();
        let v = secrets();
        let inputs = [
            String::new(),
            "nothing".into(),
            P_OPENAI.into(),
            format!("Bearer {P_OPENAI}"),
            format!("{P_OPENAI}{P_OPENAI}"),
            format!("a{P_GH}b{P_OPENAI}c{P_GH}"),
            format!("{}{P_OPENAI}", &P_OPENAI[..10]),
        ];
        for input in &inputs {
            let out = s.replace(input.as_bytes(), &v).unwrap();
            assert!(
                out.expose_secret() == naive(input).as_bytes(),
                "input {input:?}"
            );
            assert_eq!(
                out.is_unchanged(),
                !input.contains("sk-") && !input.contains("ghp_")
            );
            assert_eq!(out.swapped(), &s.find(input.as_bytes()));
            if out.is_unchanged() {
                assert_eq!(out.expose_secret().as_ptr(), input.as_ptr(), "borrowed");
            }
        }
    }

    #[test]
    fn a_placeholder_without_a_value_here_is_refused_naming_its_binding() {
        let s = set();
        // Binding 2 has no value (not allowed toward this destination).
        let input = format!("{P_OPENAI} {P_TWIN}");
        let e = s.replace(input.as_bytes(), &secrets()).err().unwrap();
        assert_eq!(
            e,
            SubstituteError::NotSwappable {
                binding: 2,
                id: "twin".into()
            }
        );
        assert_eq!(
            (e.binding(), e.binding_id(), e.reason()),
            (2, "twin", "placeholder_not_swappable")
        );
        let crate_error = Error::from(e);
        assert_eq!(
            crate_error.to_string(),
            "binding twin: its placeholder may not be sent here"
        );
        // Lookups of every shape.
        let only_gh: BTreeMap<usize, SecretValue> = [(1, SecretValue::copy_from(V_GH))].into();
        assert!(s.replace(P_GH.as_bytes(), &only_gh).is_ok());
        assert!(s.replace(P_OPENAI.as_bytes(), &only_gh).is_err());
        let shared: Arc<[Option<Arc<SecretValue>>]> =
            Arc::from(vec![Some(Arc::new(SecretValue::copy_from(V_OPENAI)))]);
        assert!(
            s.replace(P_OPENAI.as_bytes(), &shared)
                .unwrap()
                .expose_secret()
                == V_OPENAI
        );
        assert!(s.replace(P_OPENAI.as_bytes(), &NoSecrets).is_err());
    }

    #[test]
    fn header_values_never_get_control_characters() {
        let s = set();
        for bad in [
            &b"FAKE\r\nX-Injected: 1"[..],
            b"FAKE\nvalue",
            b"FAKE\0value",
            b"FAKE\x7fvalue",
            b"FAKE\x1bvalue",
        ] {
            let v = vec![Some(SecretValue::copy_from(bad))];
            let e = s
                .replace_in_header(format!("Bearer {P_OPENAI}").as_bytes(), &v)
                .err()
                .unwrap();
            assert_eq!(
                e,
                SubstituteError::UnsafeForHeader {
                    binding: 0,
                    id: "openai".into()
                }
            );
            // The message names the binding, never the value.
            let msg = Error::from(e).to_string();
            assert!(msg.contains("openai") && !msg.contains("FAKE"), "{msg}");
            // Elsewhere (a body) the same value is fine.
            assert!(s.replace(P_OPENAI.as_bytes(), &v).is_ok());
        }
        let tab = vec![Some(SecretValue::copy_from(b"FAKE\tvalue with spaces"))];
        let value = format!("Bearer {P_OPENAI}");
        let out = s.replace_in_header(value.as_bytes(), &tab).unwrap();
        assert!(out.expose_secret() == b"Bearer FAKE\tvalue with spaces");
        // A missing value stays NotSwappable.
        let e = s
            .replace_in_header(P_TWIN.as_bytes(), &secrets())
            .err()
            .unwrap();
        assert!(matches!(
            e,
            SubstituteError::NotSwappable { binding: 2, .. }
        ));
        // No placeholder: borrowed.
        assert!(
            s.replace_in_header(b"application/json", &secrets())
                .unwrap()
                .is_unchanged()
        );
    }

    fn basic(scheme: &str, creds: &str, padded: bool) -> Vec<u8> {
        let b64 = if padded {
            STANDARD.encode(creds)
        } else {
            STANDARD_NO_PAD.encode(creds)
        };
        format!("{scheme} {b64}").into_bytes()
    }

    fn decoded(value: &[u8]) -> Vec<u8> {
        let text = std::str::from_utf8(value).unwrap();
        let (_, b64) = text.split_once(' ').unwrap();
        STANDARD.decode(b64.trim()).unwrap()
    }

    #[test]
    fn basic_auth_swaps_the_password_only() {
        let s = set();
        let v = secrets();
        let cases: &[(&str, &str, bool, &[u8])] = &[
            ("Basic", "user", true, b"user:FAKE-openai-value"),
            ("basic", "user", false, b"user:FAKE-openai-value"),
            ("BASIC", "", true, b":FAKE-openai-value"),
        ];
        for (scheme, user, padded, want) in cases {
            let value = basic(scheme, &format!("{user}:{P_OPENAI}"), *padded);
            assert_eq!(
                s.find_in_basic_auth(&value).iter().collect::<Vec<_>>(),
                vec![0]
            );
            let out = s.replace_in_basic_auth(&value, &v).unwrap().unwrap();
            assert!(
                out.expose_secret()
                    .starts_with(format!("{scheme} ").as_bytes())
            );
            assert!(decoded(out.expose_secret()) == *want);
            assert_eq!(out.swapped().iter().collect::<Vec<_>>(), vec![0]);
        }
        // A password that holds a placeholder among other text, and a ':'.
        let value = basic("Basic", &format!("api:x:{P_GH}:y"), true);
        let out = s.replace_in_basic_auth(&value, &v).unwrap().unwrap();
        assert!(decoded(out.expose_secret()) == b"api:x:FAKE-github-value-2:y");
        // Trailing whitespace and several spaces survive.
        let value = [
            b"Basic   ".as_slice(),
            STANDARD.encode(format!("u:{P_OPENAI}")).as_bytes(),
            b" ",
        ]
        .concat();
        let out = s.replace_in_basic_auth(&value, &v).unwrap().unwrap();
        assert!(
            out.expose_secret().starts_with(b"Basic   ") && out.expose_secret().ends_with(b"= ")
        );
    }

    #[test]
    fn basic_auth_edge_cases() {
        let s = set();
        let v = secrets();
        // In the user-id: refused, naming the binding.
        let value = basic("Basic", &format!("{P_GH}:password"), true);
        assert_eq!(
            s.find_in_basic_auth(&value).iter().collect::<Vec<_>>(),
            vec![1]
        );
        let e = s.replace_in_basic_auth(&value, &v).err().unwrap();
        assert_eq!(
            e,
            SubstituteError::InBasicAuthUser {
                binding: 1,
                id: "github".into()
            }
        );
        // No colon: all user-id.
        let value = basic("Basic", P_GH, true);
        assert!(matches!(
            s.replace_in_basic_auth(&value, &v),
            Err(SubstituteError::InBasicAuthUser { .. })
        ));
        // Not for this binding here.
        let value = basic("Basic", &format!("u:{P_TWIN}"), true);
        assert!(matches!(
            s.replace_in_basic_auth(&value, &v),
            Err(SubstituteError::NotSwappable { binding: 2, .. })
        ));
        // Nothing to do.
        for value in [
            basic("Basic", "user:plain-password", true),
            basic("Bearer", &format!("u:{P_OPENAI}"), true),
            format!("Bearer {P_OPENAI}").into_bytes(),
            b"Basic".to_vec(),
            b"Basic ".to_vec(),
            b"Basic !!!notbase64!!!".to_vec(),
            format!("Basicx {}", STANDARD.encode(format!("u:{P_OPENAI}"))).into_bytes(),
            Vec::new(),
        ] {
            assert!(
                s.replace_in_basic_auth(&value, &v).unwrap().is_none(),
                "{value:?}"
            );
        }
        assert!(s.find_in_basic_auth(b"Basic !!!").is_empty());
        let empty = PlaceholderSet::new([]).unwrap();
        let value = basic("Basic", &format!("u:{P_OPENAI}"), true);
        assert!(empty.find_in_basic_auth(&value).is_empty());
        assert!(empty.replace_in_basic_auth(&value, &v).unwrap().is_none());
    }

    /// Streams `chunks` through a fresh replacer (or detector); returns the
    /// output, the bindings seen and the most held back at once.
    fn stream(
        set: &PlaceholderSet,
        chunks: &[&[u8]],
        replacing: bool,
    ) -> Result<(Vec<u8>, BindingSet, usize), SubstituteError> {
        let v = secrets();
        let mut out = Vec::new();
        let mut most = 0;
        if replacing {
            let mut r = BodyReplacer::replacing(set, &v);
            for c in chunks {
                out.extend_from_slice(&r.feed(Bytes::copy_from_slice(c))?);
                most = most.max(r.held_back());
            }
            out.extend_from_slice(&r.finish()?);
            Ok((out, r.seen().clone(), most))
        } else {
            let mut r = BodyReplacer::detecting(set);
            for c in chunks {
                out.extend_from_slice(&r.feed(Bytes::copy_from_slice(c))?);
                most = most.max(r.held_back());
            }
            out.extend_from_slice(&r.finish()?);
            Ok((out, r.seen().clone(), most))
        }
    }

    fn bodies() -> Vec<String> {
        vec![
            format!("{{\"model\":\"x\",\"key\":\"{P_OPENAI}\",\"n\":1}}"),
            format!("{P_OPENAI}"),
            format!("{P_OPENAI}{P_GH}{P_OPENAI}"),
            format!("sk-0123 {P_OPENAI} sk-0123456789abcdefghZZZZ {P_GH}"),
            format!("{}{P_OPENAI}sk-", &P_OPENAI[..25]),
            "plain text without any placeholder, ending in sk-01".into(),
            "s".into(),
            String::new(),
        ]
    }

    #[test]
    fn streaming_matches_one_shot_at_every_split_point() {
        let s = set();
        for body in bodies() {
            let b = body.as_bytes();
            let want = naive(&body);
            for i in 0..=b.len() {
                let (out, seen, most) = stream(&s, &[&b[..i], &b[i..]], true).unwrap();
                assert!(out == want.as_bytes(), "split {i} of {body:?}");
                assert_eq!(seen, s.find(b));
                assert!(most < s.max_len());
                match (
                    stream(&s, &[&b[..i], &b[i..]], false),
                    s.automaton.as_ref().and_then(|a| a.find(b)),
                ) {
                    (Ok((out, seen, _)), None) => {
                        assert!(out == b, "detecting changed {body:?} split at {i}");
                        assert!(seen.is_empty());
                    }
                    (Err(e), Some(m)) => {
                        assert_eq!(e.binding(), s.patterns[m.pattern().as_usize()].binding);
                    }
                    (a, b) => panic!("{body:?} split {i}: {:?} vs {b:?}", a.err()),
                }
            }
        }
    }

    #[test]
    fn a_placeholder_spanning_three_chunks_is_swapped() {
        let s = set();
        let body = format!("ab{P_OPENAI}cd{P_GH}");
        let b = body.as_bytes();
        let want = naive(&body);
        for i in 0..=b.len() {
            for j in i..=b.len() {
                let (out, seen, _) = stream(&s, &[&b[..i], &b[i..j], &b[j..]], true).unwrap();
                assert!(out == want.as_bytes(), "splits {i},{j}");
                assert_eq!(seen.iter().collect::<Vec<_>>(), vec![0, 1]);
            }
        }
        // One byte at a time.
        let singles: Vec<&[u8]> = b.chunks(1).collect();
        assert!(stream(&s, &singles, true).unwrap().0 == want.as_bytes());
    }

    #[test]
    fn the_stream_holds_back_only_what_can_still_become_a_placeholder() {
        let s = set();
        let v = secrets();
        let mut r = BodyReplacer::replacing(&s, &v);
        // Cannot begin a placeholder: all released, the same buffer.
        let chunk = Bytes::from_static(b"{\"messages\":[\"hello\"]}");
        let out = r.feed(chunk.clone()).unwrap();
        assert_eq!((out.as_ptr(), out.len()), (chunk.as_ptr(), chunk.len()));
        assert_eq!(r.held_back(), 0);
        // Ends with the start of a placeholder: exactly that is held.
        let out = r.feed(Bytes::from_static(b"text sk-0123")).unwrap();
        assert_eq!(&out[..], b"text ");
        assert_eq!(r.held_back(), 7);
        // "sk-0123x" is no placeholder's beginning: all released.
        let out = r.feed(Bytes::from_static(b"x")).unwrap();
        assert_eq!(&out[..], b"sk-0123x");
        assert_eq!(r.held_back(), 0);
        // An 's' alone could begin one; an 'S' could not.
        assert_eq!(r.feed(Bytes::from_static(b"abc S")).unwrap().len(), 5);
        assert_eq!(r.feed(Bytes::from_static(b"abc s")).unwrap().len(), 4);
        assert_eq!(r.finish().unwrap(), Bytes::from_static(b"s"));
        // At most max_len - 1 bytes, even on the longest partial match.
        let mut r = BodyReplacer::detecting(&s);
        r.feed(Bytes::copy_from_slice(&P_GH.as_bytes()[..P_GH.len() - 1]))
            .unwrap();
        assert_eq!(r.held_back(), s.max_len() - 1);
        // An empty chunk changes nothing.
        assert!(r.feed(Bytes::new()).unwrap().is_empty());
        assert_eq!(r.held_back(), s.max_len() - 1);
    }

    #[test]
    fn detecting_never_releases_a_byte_of_a_placeholder() {
        let s = set();
        let body = format!("prefix text {P_GH} suffix");
        let b = body.as_bytes();
        let start = body.find(P_GH).unwrap();
        for i in 0..=b.len() {
            let mut r = BodyReplacer::detecting(&s);
            match r.feed(Bytes::copy_from_slice(&b[..i])) {
                Ok(first) => {
                    assert!(
                        first.len() <= start,
                        "split {i}: released into the placeholder"
                    );
                    let e = r.feed(Bytes::copy_from_slice(&b[i..])).unwrap_err();
                    assert_eq!((e.binding(), e.binding_id()), (1, "github"), "split {i}");
                }
                // The whole placeholder was in the first chunk: nothing of
                // that chunk was released.
                Err(e) => assert!(i >= start + P_GH.len() && e.binding() == 1, "split {i}"),
            }
        }
        // Without a placeholder, the same buffer goes through.
        let mut r = BodyReplacer::detecting(&s);
        let chunk = Bytes::from_static(b"{\"a\": 1}");
        assert_eq!(r.feed(chunk.clone()).unwrap().as_ptr(), chunk.as_ptr());
        // In replacing mode a binding with no value fails the stream, and
        // the failure sticks.
        let v = secrets();
        let mut r = BodyReplacer::replacing(&s, &v);
        let twin = format!("{P_OPENAI} then {P_TWIN}");
        let e = r
            .feed(Bytes::copy_from_slice(twin.as_bytes()))
            .err()
            .unwrap();
        assert_eq!(e.binding(), 2);
        assert_eq!(r.feed(Bytes::from_static(b"more")).unwrap_err(), e);
        assert_eq!(r.finish().unwrap_err(), e);
    }

    #[test]
    fn streams_over_an_empty_set_pass_through() {
        let empty = PlaceholderSet::new([]).unwrap();
        let mut r = BodyReplacer::replacing(&empty, NoSecrets);
        let chunk = Bytes::from_static(b"sk-0123456789");
        let out = r.feed(chunk.clone()).unwrap();
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert!(r.finish().unwrap().is_empty());
    }

    #[test]
    fn the_set_builds_from_the_config() {
        let binding = |id: &str| SidecarBinding {
            id: id.into(),
            secret: VaultSecretRef {
                mount: "secret".into(),
                path: format!("teams/{id}"),
                key: "k".into(),
                kv_version: 2,
            },
            destinations: vec![],
            surfaces: vec![credbroker_crds::Surface::Header],
            refresh_interval: "30s".into(),
            placeholder: None,
        };
        let bindings = vec![
            binding("openai"),
            binding("nobody-placeholder"),
            binding("github"),
        ];
        let placeholders = PodPlaceholders(
            [("openai", P_OPENAI), ("github", P_GH), ("removed", P_TWIN)]
                .into_iter()
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .collect(),
        );
        let s = PlaceholderSet::from_config(&bindings, &placeholders).unwrap();
        assert_eq!(
            s.find(format!("{P_OPENAI}{P_GH}{P_TWIN}").as_bytes())
                .iter()
                .collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(s.binding_id(2), Some("github"));
        let bad = PodPlaceholders([("openai".to_owned(), "short".to_owned())].into());
        let e = PlaceholderSet::from_config(&bindings, &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config: binding \"openai\": placeholder"),
            "{e}"
        );
    }

    /// A deterministic generator for property-style loops.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_bodies_agree_with_the_naive_replacement() {
        // Bodies built from fragments that collide with placeholders.
        let fragments = [
            P_OPENAI,
            P_GH,
            "sk-",
            "sk-0123456789abcdefgh",
            "ghp_",
            "s",
            "k",
            "-",
            "x",
            " ",
            "\"",
            "0123",
        ];
        let s = set();
        let mut rng = XorShift(0x5eed);
        for _ in 0..400 {
            let n = (rng.next() % 12) as usize;
            let body: String = (0..n)
                .map(|_| fragments[(rng.next() % fragments.len() as u64) as usize])
                .collect();
            let b = body.as_bytes();
            let want = naive(&body);
            let mut cuts: Vec<usize> = (0..(rng.next() % 5))
                .map(|_| (rng.next() as usize) % (b.len() + 1))
                .collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for c in cuts.into_iter().chain([b.len()]) {
                chunks.push(&b[last..c]);
                last = c;
            }
            let (out, seen, _) = stream(&s, &chunks, true).unwrap();
            assert!(out == want.as_bytes(), "{body:?} in {chunks:?}");
            assert_eq!(seen, s.find(b));
            assert!(s.replace(b, &secrets()).unwrap().expose_secret() == want.as_bytes());
        }
    }

    #[test]
    fn the_fuzz_entry_point_holds_on_generated_inputs() {
        let mut rng = XorShift(0xf022);
        let alphabet = b"sk-abcdefghijklmnopqrstuvwxyz0123456789#@!FAKE ";
        for len in 0..300 {
            let mut data = vec![(rng.next() & 0xff) as u8];
            for _ in 0..len {
                data.push(alphabet[(rng.next() % alphabet.len() as u64) as usize]);
            }
            fuzz_data_plane(&data);
        }
        // Some fixed shapes: placeholders, and a fake secret in the input.
        for control in [0u8, 0x80, 0x81, 0x9f, 0xff] {
            for body in [
                format!("a{}b", "sk-aaaaaaaaaaaaaaaaaaaaaaaaaa"),
                format!(
                    "{}{}",
                    "sk-aaaaaaaaaaaaaaaaaaaaaaaaab", "sk-abcdefghijklmnopqrstuvwxyz"
                ),
                "x#FAKE!#SECRET!#ZERO#y".into(),
                String::new(),
            ] {
                fuzz_data_plane(&[&[control][..], body.as_bytes()].concat());
            }
        }
        fuzz_data_plane(&[]);
    }
}
