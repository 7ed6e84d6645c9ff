//! The secrets the engine may swap in, kept current: one refresher task per
//! binding reads its secret through the [`SecretSource`] every
//! `refreshInterval` (with jitter, so many bindings do not refresh at
//! once), and publishes each change.
//!
//! What a binding's state means for requests (invariant 7, fail closed):
//! - [`SecretState::Pending`]: never read yet; requests that need it get 503;
//! - [`SecretState::Ready`]: a value, usable until its [`Secret::usable_at`]
//!   check fails: a source that stops answering keeps the last good value
//!   for `max_staleness`, then the value is refused;
//! - [`SecretState::Failed`]: the source said the value is gone or
//!   forbidden (deleted, destroyed, permission denied, key missing), or it
//!   was unusable (too short, too long): fail closed at once, naming why.
//!
//! A replaced or withdrawn value stays known to the echo detector for
//! `echo_grace` (responses to requests that carried it may still arrive).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use credbroker_crds::VaultSecretRef;
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::echo::MIN_SECRET_LEN;
use crate::metrics::Metrics;
use crate::secret::SecretForms;
use crate::source::{Fetched, Revision, SecretSource, SourceError, display_path};

/// The least time between two immediate reads of one binding.
pub const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Reads of the secret source in flight at once, all bindings together, so
/// a start-up with many bindings does not hit the source all at once.
const MAX_CONCURRENT_READS: usize = 16;

/// The longest value brokered. Real credentials are far shorter; the echo
/// detector holds back about six times this per response stream.
pub const MAX_SECRET_LEN: usize = 8 * 1024;

/// How the store treats values over time.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    /// How long the last good value stays usable while the source does not
    /// answer.
    pub max_staleness: Duration,
    /// How long a replaced value stays in the echo detector.
    pub echo_grace: Duration,
    /// First retry delay after a failed read (doubling up to the refresh
    /// interval, with jitter).
    pub retry_min: Duration,
    /// The longest one read may take before it counts as unreachable.
    pub read_timeout: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            max_staleness: Duration::from_secs(300),
            echo_grace: Duration::from_secs(300),
            retry_min: Duration::from_millis(500),
            read_timeout: Duration::from_secs(15),
        }
    }
}

/// A usable value and what is known about it.
pub struct Secret {
    forms: SecretForms,
    revision: Revision,
    /// HMAC-SHA256 of the value, cut to 8 bytes, under a key random per
    /// process: shows a change of value, and nothing about it.
    fingerprint: [u8; 8],
    /// When the source last gave or confirmed the value (Unix ms).
    confirmed_unix_ms: AtomicU64,
    /// Until when the value may be used (ms since the store's epoch): the
    /// next expected read (`refreshInterval`) plus `max_staleness`, pushed
    /// forward by every successful read, so a source outage ends it.
    usable_until_ms: AtomicU64,
    epoch: Instant,
}

impl Secret {
    /// A value usable for `for_` from now, as the store would hold it
    /// (for tests of code that reads snapshots).
    pub fn usable_for(value: &[u8], version: Option<u64>, for_: Duration) -> Arc<Self> {
        let epoch = Instant::now();
        let secret = Self {
            forms: SecretForms::new(crate::secret::SecretValue::copy_from(value)),
            revision: Revision::new(version, 0),
            fingerprint: [0; 8],
            confirmed_unix_ms: AtomicU64::new(0),
            usable_until_ms: AtomicU64::new(0),
            epoch,
        };
        secret.confirm(epoch, for_);
        Arc::new(secret)
    }

    pub fn forms(&self) -> &SecretForms {
        &self.forms
    }

    /// The source's version of the value, where it has one.
    pub fn version(&self) -> Option<u64> {
        self.revision.version
    }

    /// The value's fingerprint, as 16 hex digits: equal for equal values
    /// within one process, and revealing nothing of the value (a keyed
    /// hash whose key is random per process and never leaves it).
    pub fn fingerprint(&self) -> String {
        self.fingerprint
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether `other` holds the same value (by fingerprint: a new
    /// version of the same value is not a new value).
    pub fn same_value(&self, other: &Secret) -> bool {
        self.fingerprint == other.fingerprint
    }

    /// When the source last gave or confirmed the value, as Unix seconds.
    pub fn confirmed_unix(&self) -> f64 {
        self.confirmed_unix_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Whether the value may still be used: it was confirmed by the source
    /// within `max_staleness`.
    pub fn usable_at(&self, now: Instant) -> bool {
        let ms = now.saturating_duration_since(self.epoch).as_millis();
        ms < u128::from(self.usable_until_ms.load(Ordering::Relaxed))
    }

    fn confirm(&self, now: Instant, max_staleness: Duration) {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.confirmed_unix_ms.store(unix_ms, Ordering::Relaxed);
        let until = now.saturating_duration_since(self.epoch) + max_staleness;
        self.usable_until_ms.store(
            u64::try_from(until.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// Why a binding has no usable value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// A stable step name (`not_found`, `permission_denied`, ...).
    pub step: &'static str,
    /// What a human reads: the path and what went wrong, never the value.
    pub message: String,
}

/// One binding's secret, as requests see it.
#[derive(Clone)]
pub enum SecretState {
    Pending,
    Ready(Arc<Secret>),
    Failed(Arc<Failure>),
}

impl SecretState {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready(_) => "ready",
            Self::Failed(_) => "failed",
        }
    }
}

/// What a binding's secret is and how often to look at it.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    pub id: String,
    pub secret: VaultSecretRef,
    pub refresh: Duration,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Values of bindings no longer brokered, kept for echoes a while.
    retired: Vec<(String, Arc<Secret>, Instant)>,
}

struct Entry {
    wanted: Wanted,
    state: SecretState,
    /// Replaced values and when they leave the echo detector.
    previous: Vec<(Arc<Secret>, Instant)>,
    /// Whether this binding has ever been read successfully.
    loaded_once: bool,
    refresh_now: Arc<Notify>,
    /// When an immediate read was last asked for (they are rate-limited).
    last_forced: Option<Instant>,
    /// Reads of this binding started so far (each read's number), the
    /// number of the latest read that finished, and the count of reads
    /// started when the last immediate read was asked for: that read is
    /// pending until a read started after the ask has finished (one already
    /// in flight may have looked at the source before the change).
    reads_started: u64,
    latest_finished: u64,
    forced_after: Option<u64>,
    task: Option<AbortHandle>,
}

/// The state of every binding's secret, kept current by refresher tasks.
pub struct SecretStore {
    source: Arc<dyn SecretSource>,
    /// Keys the values' fingerprints; random per process, never printed.
    fingerprints: ring::hmac::Key,
    settings: StoreSettings,
    metrics: Arc<Metrics>,
    epoch: Instant,
    reads: tokio::sync::Semaphore,
    inner: Mutex<Inner>,
    /// Bumped on every change; the engine rebuilds its snapshot on it.
    changed: watch::Sender<u64>,
    /// Bumped after every finished read, changed or not.
    reads_finished: watch::Sender<u64>,
}

impl SecretStore {
    pub fn new(
        source: Arc<dyn SecretSource>,
        settings: StoreSettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            source,
            fingerprints: fingerprint_key(),
            settings,
            metrics,
            epoch: Instant::now(),
            reads: tokio::sync::Semaphore::new(MAX_CONCURRENT_READS),
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
            reads_finished: watch::channel(0).0,
        })
    }

    pub fn source_kind(&self) -> &'static str {
        self.source.kind()
    }

    /// Stops every refresher and lets the source go (see
    /// [`SecretSource::shutdown`]).
    pub async fn shutdown_source(&self) {
        for entry in self.lock().entries.values_mut() {
            if let Some(task) = entry.task.take() {
                task.abort();
            }
        }
        self.source.shutdown().await;
    }

    /// Notified on every change of any binding's state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Makes the store follow exactly `wanted`: starts refreshers for new
    /// bindings, restarts those whose secret or interval changed, stops the
    /// rest (their values stay in the echo detector for the grace period).
    /// Must be called inside a Tokio runtime.
    pub fn sync(self: &Arc<Self>, wanted: &[Wanted]) {
        let mut inner = self.lock();
        let now = Instant::now();
        let grace_end = now + self.settings.echo_grace;
        let Inner { entries, retired } = &mut *inner;
        entries.retain(|id, entry| {
            // The same secret under the same id keeps its value, whatever
            // else changed (a new refreshInterval must not turn a good value
            // into 503s until the next read, or into a failure if the source
            // is down just then).
            let keep = wanted
                .iter()
                .any(|w| w.id == *id && w.secret == entry.wanted.secret);
            if !keep {
                if let Some(task) = entry.task.take() {
                    task.abort();
                }
                // Gone from requests now, kept for echoes a while.
                if let SecretState::Ready(secret) = &entry.state {
                    retired.push((id.clone(), secret.clone(), grace_end));
                }
                for (secret, until) in entry.previous.drain(..) {
                    retired.push((id.clone(), secret, until));
                }
                tracing::info!(binding = %id, "no longer brokering this binding's secret");
            }
            keep
        });
        retired.retain(|(_, _, until)| *until > now);
        for w in wanted {
            if let Some(entry) = entries.get_mut(&w.id) {
                if entry.wanted != *w {
                    // Only the interval changed: a new refresher, same value.
                    if let Some(task) = entry.task.take() {
                        task.abort();
                    }
                    entry.wanted = w.clone();
                    entry.task = Some(
                        tokio::spawn(refresher(
                            Arc::downgrade(self),
                            w.clone(),
                            entry.refresh_now.clone(),
                        ))
                        .abort_handle(),
                    );
                }
                continue;
            }
            let refresh_now = Arc::new(Notify::new());
            let task = tokio::spawn(refresher(
                Arc::downgrade(self),
                w.clone(),
                refresh_now.clone(),
            ))
            .abort_handle();
            entries.insert(
                w.id.clone(),
                Entry {
                    wanted: w.clone(),
                    state: SecretState::Pending,
                    previous: Vec::new(),
                    loaded_once: false,
                    refresh_now,
                    last_forced: None,
                    reads_started: 0,
                    latest_finished: 0,
                    forced_after: None,
                    task: Some(task),
                },
            );
        }
        for entry in entries.values_mut() {
            entry.previous.retain(|(_, until)| *until > now);
        }
        drop(inner);
        self.bump();
    }

    /// Asks for an immediate read of `id` (an upstream refused the value).
    /// At most one per [`FORCED_REFRESH_INTERVAL`] per binding: the agent
    /// decides which requests get a 401 or 403, and must not be able to
    /// drive reads of the secret source at its own pace.
    pub fn refresh_now(&self, id: &str) {
        if let Some(entry) = self.lock().entries.get_mut(id) {
            Self::force(entry, Instant::now());
        }
    }

    /// Asks for an immediate read unless one was asked for within the
    /// rate limit. Returns the read count that, once passed, means a read
    /// asked for now (or still pending from before) has finished; `None`
    /// when no read is pending.
    fn force(entry: &mut Entry, now: Instant) -> Option<u64> {
        // No refresher (shutting down): nothing will read.
        entry.task.as_ref()?;
        let allowed = entry
            .last_forced
            .is_none_or(|t| now.saturating_duration_since(t) >= FORCED_REFRESH_INTERVAL);
        if allowed {
            entry.last_forced = Some(now);
            entry.forced_after = Some(entry.reads_started);
            entry.refresh_now.notify_one();
            return Some(entry.reads_started);
        }
        entry
            .forced_after
            .filter(|after| entry.latest_finished <= *after)
    }

    /// Numbers a read of `wanted` about to start.
    fn read_starting(&self, wanted: &Wanted) -> u64 {
        let mut inner = self.lock();
        match inner.entries.get_mut(&wanted.id) {
            Some(entry) if entry.wanted == *wanted => {
                entry.reads_started = entry.reads_started.wrapping_add(1);
                entry.reads_started
            }
            _ => 0,
        }
    }

    /// After an upstream refused a request (401/403) that carried the
    /// values `used` (binding id, the value sent): asks for an immediate
    /// read of each (rate-limited as [`Self::refresh_now`]) and waits, at
    /// most `wait`, until a binding holds a value other than the one sent
    /// (`true`: a retry may succeed) or the reads finished without one.
    pub async fn refresh_and_wait(&self, used: &[(String, Arc<Secret>)], wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut finished = self.reads_finished.subscribe();
        let mut pending: Vec<(String, u64)> = Vec::new();
        {
            let now = Instant::now();
            let mut inner = self.lock();
            for (id, _) in used {
                if let Some(entry) = inner.entries.get_mut(id)
                    && let Some(at) = Self::force(entry, now)
                {
                    pending.push((id.clone(), at));
                }
            }
        }
        loop {
            {
                let inner = self.lock();
                let replaced = used.iter().any(|(id, sent)| {
                    inner.entries.get(id).is_some_and(
                        |e| matches!(&e.state, SecretState::Ready(now) if !now.same_value(sent)),
                    )
                });
                if replaced {
                    return true;
                }
                pending.retain(|(id, at)| {
                    inner
                        .entries
                        .get(id.as_str())
                        .is_some_and(|e| e.task.is_some() && e.latest_finished <= *at)
                });
                if pending.is_empty() {
                    return false;
                }
            }
            tokio::select! {
                changed = finished.changed() => if changed.is_err() { return false },
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Every binding's state, and the values still in their grace period.
    pub fn view(&self) -> StoreView {
        let now = Instant::now();
        let mut inner = self.lock();
        // Replaced values past their grace period are dropped (and wiped).
        inner.retired.retain(|(_, _, until)| *until > now);
        for entry in inner.entries.values_mut() {
            entry.previous.retain(|(_, until)| *until > now);
        }
        let mut view = StoreView {
            states: HashMap::with_capacity(inner.entries.len()),
            previous: Vec::new(),
            all_loaded: true,
        };
        for (id, secret, until) in &inner.retired {
            if *until > now {
                view.previous.push((id.clone(), secret.clone()));
            }
        }
        for (id, entry) in inner.entries.iter() {
            view.states.insert(id.clone(), entry.state.clone());
            view.all_loaded &= entry.loaded_once;
            for (secret, until) in &entry.previous {
                if *until > now {
                    view.previous.push((id.clone(), secret.clone()));
                }
            }
        }
        view
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Applies the outcome of one read of `wanted`; returns the revision now
    /// held (for the next read) and whether the read succeeded.
    fn apply(
        &self,
        wanted: &Wanted,
        read: u64,
        known: Option<Revision>,
        outcome: Result<Fetched, SourceError>,
    ) -> (Option<Revision>, bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get_mut(&wanted.id) else {
            return (known, false);
        };
        if entry.wanted != *wanted {
            // Replaced by a sync while this read was in flight.
            return (known, false);
        }
        entry.latest_finished = entry.latest_finished.max(read);
        let id = wanted.id.as_str();
        let (next, ok, changed) = match outcome {
            Ok(Fetched::Unchanged) => {
                if let SecretState::Ready(secret) = &entry.state {
                    secret.confirm(now, wanted.refresh + self.settings.max_staleness);
                    self.metrics
                        .secret_refreshed(id, "unchanged", secret.version());
                    (known, true, false)
                } else {
                    // A source must not answer Unchanged to a revision we do
                    // not hold a value for; read afresh next time.
                    (None, false, false)
                }
            }
            Ok(Fetched::Value { value, revision }) => match check_value(&value) {
                Err(why) => {
                    let failure = Failure {
                        step: "unusable_value",
                        message: format!("{}: {why}", display_path(&wanted.secret)),
                    };
                    self.metrics.secret_refreshed(id, "unusable_value", None);
                    let changed = !matches!(&entry.state, SecretState::Failed(f) if **f == failure);
                    if changed {
                        tracing::error!(binding = id, error = %failure.message, "secret refused");
                    }
                    self.set_state(entry, now, SecretState::Failed(Arc::new(failure)));
                    let _ = revision;
                    (None, false, changed)
                }
                Ok(()) => {
                    let mut fingerprint = [0u8; 8];
                    fingerprint.copy_from_slice(
                        &ring::hmac::sign(&self.fingerprints, value.expose_secret()).as_ref()[..8],
                    );
                    let secret = Arc::new(Secret {
                        forms: SecretForms::new(value),
                        revision,
                        fingerprint,
                        confirmed_unix_ms: AtomicU64::new(0),
                        usable_until_ms: AtomicU64::new(0),
                        epoch: self.epoch,
                    });
                    secret.confirm(now, wanted.refresh + self.settings.max_staleness);
                    let first = !entry.loaded_once;
                    self.set_state(entry, now, SecretState::Ready(secret));
                    entry.loaded_once = true;
                    self.metrics
                        .secret_refreshed(id, "new_value", revision.version);
                    match revision.version {
                        Some(v) => {
                            tracing::info!(binding = id, version = v, first, "secret loaded")
                        }
                        None => tracing::info!(binding = id, first, "secret loaded"),
                    }
                    (Some(revision), true, true)
                }
            },
            Err(error) if error.is_definitive() => {
                self.metrics.secret_refreshed(id, error.step(), None);
                let failure = Failure {
                    step: error.step(),
                    message: error.to_string(),
                };
                let changed = !matches!(&entry.state, SecretState::Failed(f) if **f == failure);
                if changed {
                    tracing::error!(binding = id, step = failure.step, error = %failure.message,
                        "secret unavailable; requests that need it are refused");
                }
                self.set_state(entry, now, SecretState::Failed(Arc::new(failure)));
                (None, false, changed)
            }
            Err(error) => {
                self.metrics.secret_refreshed(id, error.step(), None);
                let still_usable =
                    matches!(&entry.state, SecretState::Ready(s) if s.usable_at(now));
                if still_usable {
                    tracing::warn!(binding = id, error = %error,
                        "secret source not answering; using the last good value until it is too stale");
                    (known, false, false)
                } else {
                    let failure = Failure {
                        step: error.step(),
                        message: error.to_string(),
                    };
                    let changed = !matches!(&entry.state, SecretState::Failed(f) if **f == failure);
                    if changed {
                        tracing::error!(binding = id, step = failure.step, error = %failure.message,
                            "secret unavailable; requests that need it are refused");
                    }
                    self.set_state(entry, now, SecretState::Failed(Arc::new(failure)));
                    (None, false, changed)
                }
            }
        };
        drop(inner);
        if changed {
            self.bump();
        }
        self.reads_finished.send_modify(|n| *n = n.wrapping_add(1));
        (next, ok)
    }

    /// Sets a new state, moving a replaced value to the grace list.
    fn set_state(&self, entry: &mut Entry, now: Instant, new: SecretState) {
        let old = std::mem::replace(&mut entry.state, new);
        if let SecretState::Ready(old) = old {
            entry.previous.push((old, now + self.settings.echo_grace));
        }
        entry.previous.retain(|(_, until)| *until > now);
    }
}

/// What [`SecretStore::view`] returns.
pub struct StoreView {
    pub states: HashMap<String, SecretState>,
    /// `(binding id, value)` for replaced values in their grace period.
    pub previous: Vec<(String, Arc<Secret>)>,
    /// Whether every binding has been read successfully at least once.
    pub all_loaded: bool,
}

/// Why a value cannot be brokered: too short to tell echoes from chance,
/// or longer than the streaming scanners are sized for.
fn check_value(value: &crate::secret::SecretValue) -> Result<(), String> {
    if value.len() < MIN_SECRET_LEN {
        return Err(format!(
            "the value is shorter than {MIN_SECRET_LEN} bytes; credbroker refuses to broker it, \
             because an echo of it could not be told from chance"
        ));
    }
    if value.len() > MAX_SECRET_LEN {
        return Err(format!("the value is longer than {MAX_SECRET_LEN} bytes"));
    }
    Ok(())
}

/// A random HMAC key for fingerprints (ring's own system RNG).
fn fingerprint_key() -> ring::hmac::Key {
    let rng = ring::rand::SystemRandom::new();
    match ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng) {
        Ok(key) => key,
        // The system RNG failing is not survivable for a TLS server anyway;
        // a fixed key would still reveal nothing of a random secret, but
        // would make fingerprints comparable across processes: mix in the
        // time at least.
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &now.to_le_bytes())
        }
    }
}

/// One binding's refresh loop. Holds only a weak reference, so dropping the
/// store ends it.
async fn refresher(store: std::sync::Weak<SecretStore>, wanted: Wanted, refresh_now: Arc<Notify>) {
    let mut known: Option<Revision> = None;
    let mut failures: u32 = 0;
    loop {
        let Some(strong) = store.upgrade() else {
            return;
        };
        let timeout = strong.settings.read_timeout;
        let path = display_path(&wanted.secret);
        let permit = strong.reads.acquire().await;
        let number = strong.read_starting(&wanted);
        let read = strong.source.read(&wanted.secret, known);
        let outcome = match tokio::time::timeout(timeout, read).await {
            Ok(outcome) => outcome,
            Err(_) => Err(SourceError::Unreachable {
                path,
                reason: format!("no answer within {timeout:?}"),
            }),
        };
        drop(permit);
        let (next, ok) = strong.apply(&wanted, number, known, outcome);
        known = next;
        let delay = if ok {
            failures = 0;
            jitter(wanted.refresh, 10)
        } else {
            failures = failures.saturating_add(1);
            let backoff = strong
                .settings
                .retry_min
                .saturating_mul(1u32 << failures.min(16).saturating_sub(1))
                .min(wanted.refresh.max(strong.settings.retry_min));
            jitter(backoff, 20)
        };
        drop(strong);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = refresh_now.notified() => {}
        }
    }
}

/// `base` plus or minus up to `percent`%, so refreshes spread out.
fn jitter(base: Duration, percent: u32) -> Duration {
    let mut byte = [0u8; 2];
    let r = match getrandom::fill(&mut byte) {
        Ok(()) => u32::from(u16::from_le_bytes(byte)),
        Err(_) => 32768,
    };
    // r / 65535 in [0, 1] maps to [-percent, +percent].
    let spread = base.as_secs_f64() * f64::from(percent) / 100.0;
    let offset = spread * (f64::from(r) / 32767.5 - 1.0);
    Duration::from_secs_f64((base.as_secs_f64() + offset).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretValue;
    use crate::source::BoxFuture;
    use std::sync::atomic::AtomicUsize;

    /// A source whose answers a test scripts.
    struct Scripted {
        answer: Mutex<Result<(&'static [u8], u64), SourceError>>,
        reads: AtomicUsize,
    }

    impl SecretSource for Scripted {
        fn kind(&self) -> &'static str {
            "scripted"
        }
        fn read<'a>(
            &'a self,
            _: &'a VaultSecretRef,
            known: Option<Revision>,
        ) -> BoxFuture<'a, Result<Fetched, SourceError>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let answer = self.answer.lock().unwrap().clone();
            Box::pin(async move {
                let (value, version) = answer?;
                let revision = Revision::new(Some(version), version);
                if known == Some(revision) {
                    return Ok(Fetched::Unchanged);
                }
                Ok(Fetched::Value {
                    value: SecretValue::copy_from(value),
                    revision,
                })
            })
        }
    }

    fn wanted() -> Wanted {
        Wanted {
            id: "b".into(),
            secret: VaultSecretRef {
                mount: "secret".into(),
                path: "p".into(),
                key: "k".into(),
                kv_version: 2,
            },
            refresh: Duration::from_secs(1),
        }
    }

    fn store(
        answer: Result<(&'static [u8], u64), SourceError>,
        staleness: Duration,
    ) -> (Arc<SecretStore>, Arc<Scripted>) {
        let source = Arc::new(Scripted {
            answer: Mutex::new(answer),
            reads: AtomicUsize::new(0),
        });
        let settings = StoreSettings {
            max_staleness: staleness,
            echo_grace: Duration::from_secs(60),
            retry_min: Duration::from_millis(100),
            read_timeout: Duration::from_secs(1),
        };
        (
            SecretStore::new(source.clone(), settings, Arc::new(Metrics::new())),
            source,
        )
    }

    fn state(store: &SecretStore) -> SecretState {
        store.view().states.get("b").cloned().unwrap()
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn loads_rotates_and_keeps_the_old_value_for_echoes() {
        let (store, source) = store(Ok((b"value-one-123", 1)), Duration::from_secs(300));
        store.sync(&[wanted()]);
        assert!(matches!(state(&store), SecretState::Pending));
        assert!(!store.view().all_loaded);
        settle().await;
        let SecretState::Ready(s) = state(&store) else {
            panic!("not ready")
        };
        assert_eq!(s.forms().raw().expose_secret(), b"value-one-123");
        assert_eq!(s.version(), Some(1));
        assert!(store.view().all_loaded);

        *source.answer.lock().unwrap() = Ok((b"value-two-456", 2));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        settle().await;
        let SecretState::Ready(s) = state(&store) else {
            panic!("not ready")
        };
        assert_eq!(s.version(), Some(2));
        let view = store.view();
        assert_eq!(view.previous.len(), 1);
        assert_eq!(view.previous[0].1.version(), Some(1));
        // Past the grace period the old value is gone.
        tokio::time::sleep(Duration::from_secs(61)).await;
        settle().await;
        store.sync(&[wanted()]);
        assert!(store.view().previous.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_keeps_the_value_until_too_stale_and_deletion_fails_at_once() {
        let (store, source) = store(Ok((b"value-one-123", 1)), Duration::from_secs(5));
        store.sync(&[wanted()]);
        settle().await;
        assert!(matches!(state(&store), SecretState::Ready(_)));
        *source.answer.lock().unwrap() = Err(SourceError::Unreachable {
            path: "secret/p".into(),
            reason: "paused".into(),
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        settle().await;
        let SecretState::Ready(s) = state(&store) else {
            panic!("dropped too early")
        };
        assert!(s.usable_at(Instant::now()));
        tokio::time::sleep(Duration::from_secs(4)).await;
        settle().await;
        // Past the next expected read plus max_staleness: refused, whether
        // or not a read has come back.
        assert!(!s.usable_at(Instant::now()));
        assert!(matches!(state(&store), SecretState::Failed(_)));
        // Recovery without a restart.
        *source.answer.lock().unwrap() = Ok((b"value-one-123", 1));
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert!(matches!(state(&store), SecretState::Ready(_)));

        *source.answer.lock().unwrap() = Err(SourceError::Deleted {
            path: "secret/p".into(),
            state: "deleted",
        });
        store.refresh_now("b");
        settle().await;
        let SecretState::Failed(f) = state(&store) else {
            panic!("not failed")
        };
        assert_eq!(f.step, "deleted");
        assert_eq!(f.message, "secret/p: the current version was deleted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_interval_longer_than_the_staleness_keeps_a_healthy_value_usable() {
        let (store, _) = store(Ok((b"value-one-123", 1)), Duration::from_secs(5));
        let mut hourly = wanted();
        hourly.refresh = Duration::from_secs(3600);
        store.sync(&[hourly.clone()]);
        settle().await;
        let SecretState::Ready(s) = state(&store) else {
            panic!("not ready")
        };
        tokio::time::sleep(Duration::from_secs(1800)).await;
        assert!(
            s.usable_at(Instant::now()),
            "a value read half an hour ago, due again in half an hour"
        );
        // A changed interval keeps the value.
        hourly.refresh = Duration::from_secs(60);
        store.sync(&[hourly]);
        assert!(
            matches!(state(&store), SecretState::Ready(_)),
            "the value was dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_reads_are_rate_limited() {
        let (store, source) = store(Ok((b"value-one-123", 1)), Duration::from_secs(5));
        let mut slow = wanted();
        slow.refresh = Duration::from_secs(3600);
        store.sync(&[slow]);
        settle().await;
        let after_first = source.reads.load(Ordering::SeqCst);
        for _ in 0..50 {
            store.refresh_now("b");
            settle().await;
        }
        assert_eq!(
            source.reads.load(Ordering::SeqCst),
            after_first + 1,
            "more than one forced read"
        );
        tokio::time::sleep(FORCED_REFRESH_INTERVAL).await;
        store.refresh_now("b");
        settle().await;
        assert_eq!(source.reads.load(Ordering::SeqCst), after_first + 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_value_is_refused_naming_why() {
        let (store, _) = store(Ok((b"short", 1)), Duration::from_secs(5));
        store.sync(&[wanted()]);
        settle().await;
        let SecretState::Failed(f) = state(&store) else {
            panic!("accepted")
        };
        assert_eq!(f.step, "unusable_value");
        assert!(f.message.contains("shorter than 8 bytes"), "{}", f.message);
    }

    #[tokio::test(start_paused = true)]
    async fn sync_stops_removed_bindings() {
        let (store, source) = store(Ok((b"value-one-123", 1)), Duration::from_secs(5));
        store.sync(&[wanted()]);
        settle().await;
        store.sync(&[]);
        let reads = source.reads.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        settle().await;
        assert_eq!(source.reads.load(Ordering::SeqCst), reads);
        assert!(store.view().states.is_empty());
    }

    #[test]
    fn jitter_stays_in_bounds() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(10), 10);
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
    }
}
