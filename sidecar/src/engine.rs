//! The engine `proxy` and `local` share: the current [`Snapshot`] of
//! bindings, placeholders, secrets, echo detector and upstream clients, and
//! everything a connection needs to act on it (limits, the task tracker the
//! drain waits on, the shutdown signal).
//!
//! A snapshot is immutable. A builder task makes a new one whenever the
//! config or a secret changes and swaps it in atomically; each request
//! loads the current one once (no lock on the hot path) and uses it
//! throughout, so a reload never changes the rules under a request, and
//! in-flight requests finish with the values they started with.
//!
//! Rebuilds run on the blocking pool (an echo detector for many secrets,
//! or the placeholder automaton, is milliseconds of CPU), changes arriving
//! together are coalesced, and what a change did not touch is reused: a
//! secret rotation does not rebuild the placeholder automaton or the
//! upstream connection pools.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use credbroker_crds::Surface;
use credbroker_crds::config::SidecarBinding;
use credbroker_crds::validate::host_matches;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::config::{Config, EgressMode};
use crate::echo::EchoDetector;
use crate::metrics::{BindingLabel, Metrics};
use crate::secret::SecretValue;
use crate::store::{SecretState, SecretStore, StoreView, Wanted};
use crate::substitute::{BindingSet, PlaceholderSet, SecretLookup};
use crate::tls::{LeafCertCache, UpstreamTls};
use crate::upstream::{DestinationTrust, UpstreamSettings, Upstreams};

/// How much request-body data may be buffered at once, all requests
/// together (to send a swapped body with its true length); past it, bodies
/// are streamed chunked instead.
pub const BODY_BUFFER_BUDGET: usize = 32 * 1024 * 1024;
/// How long changes are gathered before a rebuild.
const REBUILD_COALESCE: Duration = Duration::from_millis(20);
/// How often secret-state gauges are refreshed (staleness needs no event).
const STATE_TICK: Duration = Duration::from_secs(1);

/// Settings the engine acts on, fixed for the process.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub egress: EgressMode,
    /// Local mode only: `localhost` names dial loopback (RFC 6761). In a
    /// pod the agent shares the sidecar's loopback, so a secret must never
    /// be sent there: `localhost` is then looked up like any name, and the
    /// absolute `localhost.` finds nothing.
    pub localhost_is_loopback: bool,
    pub strict_destination: bool,
    pub max_header_bytes: u32,
    pub max_buffered_body: usize,
    pub first_byte_timeout: Duration,
    pub client_hello_timeout: Duration,
    pub header_timeout: Duration,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
}

/// One binding's secret, as a snapshot holds it.
#[derive(Clone)]
pub enum Slot {
    /// This pod has no placeholder for the binding: nothing to swap.
    NoPlaceholder,
    State(SecretState),
}

/// Everything a request is decided and rewritten against.
pub struct Snapshot {
    pub bindings: Vec<SidecarBinding>,
    /// Binding ids as metric labels, parallel to `bindings`.
    pub labels: Vec<BindingLabel>,
    pub placeholders: Arc<PlaceholderSet>,
    /// Parallel to `bindings`.
    pub secrets: Vec<Slot>,
    pub echo: Arc<EchoDetector>,
    pub upstreams: Arc<Upstreams>,
}

impl Snapshot {
    /// Whether a binding this pod can use (it has its placeholder) has a
    /// destination covering `host:port` for this transport. It decides
    /// whether the sidecar terminates TLS for an SNI, and in cleartext
    /// whether a Host is bound. A binding without a placeholder here has
    /// nothing to swap, so its hosts are not intercepted.
    pub fn covers(&self, host: &str, port: u16, tls: bool) -> bool {
        self.bindings.iter().zip(&self.secrets).any(|(b, slot)| {
            !matches!(slot, Slot::NoPlaceholder)
                && b.destinations.iter().any(|d| {
                    d.port == port && (tls || d.allow_cleartext) && host_matches(&d.host, host)
                })
        })
    }

    /// Whether any destination has `host:port`, TLS or not (a cleartext
    /// placeholder toward it is then judged by its binding's rules).
    pub fn names(&self, host: &str, port: u16) -> bool {
        self.bindings.iter().any(|b| {
            b.destinations
                .iter()
                .any(|d| d.port == port && host_matches(&d.host, host))
        })
    }

    /// The binding's secret if it is ready and fresh enough to use now.
    pub fn usable_secret(&self, binding: usize) -> Result<&crate::store::Secret, Unusable> {
        match self.secrets.get(binding) {
            Some(Slot::State(SecretState::Ready(secret))) => {
                if secret.usable_at(tokio::time::Instant::now()) {
                    Ok(secret)
                } else {
                    Err(Unusable::Stale)
                }
            }
            Some(Slot::State(SecretState::Pending)) => Err(Unusable::Pending),
            Some(Slot::State(SecretState::Failed(f))) => Err(Unusable::Failed(f.step)),
            Some(Slot::NoPlaceholder) | None => Err(Unusable::NoPlaceholder),
        }
    }

    pub fn label(&self, binding: usize) -> BindingLabel {
        self.labels
            .get(binding)
            .cloned()
            .unwrap_or_else(BindingLabel::none)
    }

    /// The id of a binding: of the config, or (for an echo of a value
    /// whose binding has since gone) as the echo detector knows it.
    pub fn binding_id(&self, binding: usize) -> Option<&str> {
        self.bindings
            .get(binding)
            .map(|b| b.id.as_str())
            .or_else(|| self.echo.binding_id(binding))
    }

    /// The indexes of bindings that may be swapped on `surface` of a request
    /// with these facts and whose secret is usable.
    pub fn swappable_on(
        &self,
        surface: Surface,
        facts: &crate::decide::RequestFacts<'_>,
    ) -> BindingSet {
        self.bindings
            .iter()
            .enumerate()
            .filter(|(i, b)| {
                self.usable_secret(*i).is_ok() && crate::decide::may_swap(b, surface, facts).is_ok()
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// The most bytes a body of `len` bytes can become when placeholders of
    /// `allowed` in it are swapped for their values in `form`: a body made
    /// only of the placeholder whose value grows the most.
    pub fn swapped_size_bound(
        &self,
        len: u64,
        allowed: &BindingSet,
        form: crate::secret::Form,
    ) -> u64 {
        allowed
            .iter()
            .filter_map(|b| {
                let value = self.usable_secret(b).ok()?.forms().get(form).len() as u64;
                let placeholder = self.placeholders.shortest_len(b)? as u64;
                Some(len.saturating_mul(value).div_ceil(placeholder.max(1)))
            })
            .fold(len, u64::max)
    }
}

/// Why a binding's secret cannot be used for a request. Only the step: what
/// the source said in full (paths, library text) goes to the logs, never to
/// the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// Not read yet.
    Pending,
    /// Not confirmed by the source for longer than `--max-staleness`.
    Stale,
    /// The source refused or failed at this step (`not_found`, ...).
    Failed(&'static str),
    /// This pod has no placeholder for the binding.
    NoPlaceholder,
}

impl Unusable {
    /// A stable code.
    pub fn code(self) -> &'static str {
        match self {
            Self::Pending => "secret_pending",
            Self::Stale => "secret_stale",
            Self::Failed(step) => step,
            Self::NoPlaceholder => "no_placeholder",
        }
    }

    pub fn detail(self) -> String {
        match self {
            Self::Pending => "the secret has not been read yet".into(),
            Self::Stale => {
                "the secret source has not confirmed the value for longer than the allowed staleness"
                    .into()
            }
            Self::Failed(step) => format!(
                "the secret is unavailable ({}); the sidecar's log says why",
                step.replace('_', " ")
            ),
            Self::NoPlaceholder => "this pod has no placeholder for the binding".into(),
        }
    }
}

/// Values for the bindings a request may carry, in one [`crate::secret::Form`].
/// `S` is `&Snapshot` for a head, `Arc<Snapshot>` for a streamed body.
pub struct Lookup<S> {
    pub snapshot: S,
    pub allowed: BindingSet,
    pub form: crate::secret::Form,
}

impl<S: std::ops::Deref<Target = Snapshot>> SecretLookup for Lookup<S> {
    fn secret_for(&self, binding: usize) -> Option<&SecretValue> {
        if !self.allowed.contains(binding) {
            return None;
        }
        self.snapshot
            .usable_secret(binding)
            .ok()
            .map(|s| s.forms().get(self.form))
    }
}

/// The parts of a snapshot that depend on the config alone, kept across
/// secret-only rebuilds.
struct Rules {
    config: Arc<Config>,
    placeholders: Arc<PlaceholderSet>,
    labels: Vec<BindingLabel>,
    upstreams: Arc<Upstreams>,
}

/// The shared state of a running sidecar.
pub struct Engine {
    pub settings: EngineSettings,
    pub metrics: Arc<Metrics>,
    pub audit: AuditLog,
    pub leaves: Arc<LeafCertCache>,
    /// Every connection and tunnel task: the drain waits for them.
    pub tasks: TaskTracker,
    /// Cancelled at SIGTERM: stop accepting, finish in-flight work.
    pub shutdown: CancellationToken,
    /// One permit per open connection (tunnels keep theirs).
    pub connections: Arc<Semaphore>,
    /// One permit per request in flight upstream, to its response's end: an
    /// HTTP/2 connection holds one connection permit but may carry 100
    /// streams, each of which may need an upstream connection of its own.
    pub upstream_requests: Arc<Semaphore>,
    /// KiB of request bodies being buffered, all requests together.
    pub body_budget: Arc<Semaphore>,
    upstream_tls: Arc<UpstreamTls>,
    upstream_settings: UpstreamSettings,
    store: Arc<SecretStore>,
    snapshot: ArcSwap<Snapshot>,
    ready: AtomicBool,
    /// Why the sidecar is not ready, for `/readyz`.
    not_ready: std::sync::Mutex<String>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    pub fn new(
        settings: EngineSettings,
        max_connections: usize,
        metrics: Arc<Metrics>,
        audit: AuditLog,
        leaves: Arc<LeafCertCache>,
        upstream_tls: Arc<UpstreamTls>,
        store: Arc<SecretStore>,
    ) -> Arc<Self> {
        let upstream_settings = UpstreamSettings {
            connect_timeout: settings.connect_timeout,
            handshake_timeout: settings.header_timeout,
            max_header_bytes: settings.max_header_bytes,
            // Those in flight (at most one per upstream request permit) and
            // as many idle in the pools.
            connection_slots: Arc::new(Semaphore::new(max_connections.saturating_mul(2))),
            localhost_is_loopback: settings.localhost_is_loopback,
        };
        let empty = Snapshot {
            bindings: Vec::new(),
            labels: Vec::new(),
            placeholders: Arc::new(PlaceholderSet::empty()),
            secrets: Vec::new(),
            echo: Arc::new(EchoDetector::empty()),
            upstreams: Arc::new(Upstreams::new(
                upstream_tls.clone(),
                DestinationTrust::default(),
                upstream_settings.clone(),
            )),
        };
        Arc::new(Self {
            settings,
            metrics,
            audit,
            leaves,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            connections: Arc::new(Semaphore::new(max_connections)),
            upstream_requests: Arc::new(Semaphore::new(max_connections)),
            body_budget: Arc::new(Semaphore::new(BODY_BUFFER_BUDGET / 1024)),
            upstream_tls,
            upstream_settings,
            store,
            snapshot: ArcSwap::from_pointee(empty),
            ready: AtomicBool::new(false),
            not_ready: std::sync::Mutex::new("the config has not been loaded yet".into()),
        })
    }

    /// The current snapshot (load once per request).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn store(&self) -> &Arc<SecretStore> {
        &self.store
    }

    /// Ready: the config loaded, and every binding this pod has a
    /// placeholder for had its secret read at least once. Stays ready once
    /// it was (a later failure of one binding fails that binding's
    /// requests, not the pod).
    pub fn is_ready(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self
                .not_ready
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone())
        }
    }

    fn set_not_ready(&self, why: String) {
        *self
            .not_ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    }

    /// Keeps the snapshot current: rebuilds it whenever `config` or a
    /// secret changes. `config` is `None` until the first config loads
    /// (a pod whose config files are broken at start stays not ready).
    pub async fn run_builder(self: Arc<Self>, mut config: watch::Receiver<Option<Arc<Config>>>) {
        let mut secrets = self.store.subscribe();
        let mut rules: Option<Arc<Rules>> = None;
        let mut tick = tokio::time::interval(STATE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let current = config.borrow_and_update().clone();
            if let Some(current) = current {
                let rules_now = match &rules {
                    Some(r) if Arc::ptr_eq(&r.config, &current) => r.clone(),
                    _ => {
                        self.store.sync(&wanted(&current));
                        let previous = rules.take();
                        let engine = self.clone();
                        let built = tokio::task::spawn_blocking(move || {
                            engine.build_rules(current, previous.as_deref())
                        })
                        .await;
                        match built {
                            Ok(r) => Arc::new(r),
                            Err(e) => {
                                tracing::error!(error = %e, "building the bindings failed; keeping the previous ones");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                        }
                    }
                };
                rules = Some(rules_now.clone());
                secrets.mark_unchanged();
                let engine = self.clone();
                let _ = tokio::task::spawn_blocking(move || engine.rebuild(&rules_now)).await;
            }
            tokio::select! {
                changed = config.changed() => if changed.is_err() { return },
                changed = secrets.changed() => if changed.is_err() { return },
                _ = tick.tick() => {
                    self.update_state_gauges();
                    continue;
                }
            }
            // Gather what arrives together (1,000 first reads at start-up).
            tokio::time::sleep(REBUILD_COALESCE).await;
        }
    }

    fn build_rules(&self, config: Arc<Config>, previous: Option<&Rules>) -> Rules {
        let bindings = &config.bindings.bindings;
        let placeholders = match PlaceholderSet::from_config(bindings, &config.placeholders) {
            Ok(set) => set,
            Err(e) => {
                // Validated when the config loaded; should it fail anyway,
                // swap nothing rather than guess.
                tracing::error!(error = %e, "placeholders unusable; nothing will be swapped");
                PlaceholderSet::empty()
            }
        };
        let labels = bindings
            .iter()
            .map(|b| BindingLabel(Arc::from(b.id.as_str())))
            .collect::<Vec<_>>();
        if let Some(previous) = previous {
            for gone in previous.labels.iter().filter(|l| !labels.contains(l)) {
                self.metrics.forget_binding(gone);
            }
        }
        let trust = DestinationTrust::of(bindings);
        let upstreams = match previous {
            Some(p) if p.upstreams.serves(&trust) => p.upstreams.clone(),
            _ => Arc::new(Upstreams::new(
                self.upstream_tls.clone(),
                trust,
                self.upstream_settings.clone(),
            )),
        };
        Rules {
            config,
            placeholders: Arc::new(placeholders),
            labels,
            upstreams,
        }
    }

    fn rebuild(&self, rules: &Rules) {
        let view = self.store.view();
        let bindings = rules.config.bindings.bindings.clone();
        let secrets: Vec<Slot> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if rules.placeholders.binding_id(i).is_none() {
                    Slot::NoPlaceholder
                } else {
                    Slot::State(
                        view.states
                            .get(&b.id)
                            .cloned()
                            .unwrap_or(SecretState::Pending),
                    )
                }
            })
            .collect();
        let echo = self.echo_detector(&bindings, &secrets, &view);
        self.snapshot.store(Arc::new(Snapshot {
            bindings,
            labels: rules.labels.clone(),
            placeholders: rules.placeholders.clone(),
            secrets,
            echo,
            upstreams: rules.upstreams.clone(),
        }));
        self.update_state_gauges();
        if view.all_loaded {
            if !self.ready.swap(true, Ordering::AcqRel) {
                tracing::info!("ready: config loaded and every bound secret read");
            }
        } else if !self.ready.load(Ordering::Acquire) {
            let mut waiting: Vec<String> = view
                .states
                .iter()
                .filter(|(_, s)| !matches!(s, SecretState::Ready(_)))
                .map(|(id, s)| match s {
                    SecretState::Failed(f) => format!("{id} ({})", f.step),
                    _ => format!("{id} (not read yet)"),
                })
                .collect();
            waiting.sort();
            self.set_not_ready(format!(
                "waiting for the secrets of bindings {}",
                waiting.join(", ")
            ));
        }
    }

    /// Sets the state gauge of every binding, staleness included.
    fn update_state_gauges(&self) {
        let snapshot = self.snapshot.load();
        let now = tokio::time::Instant::now();
        for (i, slot) in snapshot.secrets.iter().enumerate() {
            let state = match slot {
                Slot::NoPlaceholder => "no_placeholder",
                Slot::State(SecretState::Ready(s)) if !s.usable_at(now) => "stale",
                Slot::State(state) => state.name(),
            };
            self.metrics.secret_state(&snapshot.label(i), state);
        }
    }

    fn echo_detector(
        &self,
        bindings: &[SidecarBinding],
        secrets: &[Slot],
        view: &StoreView,
    ) -> Arc<EchoDetector> {
        let mut values: Vec<(usize, &str, &SecretValue)> = Vec::new();
        for (i, slot) in secrets.iter().enumerate() {
            if let Slot::State(SecretState::Ready(secret)) = slot {
                values.push((i, bindings[i].id.as_str(), secret.forms().raw()));
            }
        }
        for (id, secret) in &view.previous {
            // A binding gone from the config keeps its echoes under an index
            // past the current ones, so reports still name it.
            let index = bindings
                .iter()
                .position(|b| b.id == *id)
                .unwrap_or(bindings.len());
            values.push((index, id.as_str(), secret.forms().raw()));
        }
        match EchoDetector::new(values) {
            Ok(detector) => Arc::new(detector),
            Err(e) => {
                // The store refuses values too short to detect, so this
                // cannot happen; fail loudly rather than detect nothing.
                tracing::error!(error = %e, "echo detector could not be built; keeping the previous one");
                self.snapshot.load().echo.clone()
            }
        }
    }

    /// Marks the start-up config as unloadable (pod mode keeps retrying).
    pub fn config_failed(&self, why: String) {
        if !self.ready.load(Ordering::Acquire) {
            self.set_not_ready(format!("the config could not be loaded: {why}"));
        }
    }
}

/// The secrets this pod needs: only bindings it has a placeholder for.
fn wanted(config: &Config) -> Vec<Wanted> {
    config
        .bindings
        .bindings
        .iter()
        .filter(|b| config.placeholders.0.contains_key(&b.id))
        .map(|b| Wanted {
            id: b.id.clone(),
            secret: b.secret.clone(),
            // Validated when the config loaded.
            refresh: credbroker_crds::duration::parse(&b.refresh_interval)
                .unwrap_or(Duration::from_secs(30)),
        })
        .collect()
}
