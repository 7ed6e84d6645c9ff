//! The engine `proxy` and `local` share: the current [`Snapshot`] of
//! bindings, placeholders, secrets, echo detector and upstream clients, and
//! everything a connection needs to act on it.
//!
//! A snapshot is immutable. A builder task makes a new one whenever the
//! config or a secret changes and swaps it in atomically; each request
//! loads the current one once (no lock on the hot path) and uses it
//! throughout, so a reload never changes the rules under a request, and
//! in-flight requests finish with the values they started with.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use credbroker_crds::Surface;
use credbroker_crds::config::SidecarBinding;
use credbroker_crds::validate::host_matches;
use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::config::{Config, EgressMode};
use crate::echo::EchoDetector;
use crate::metrics::{BindingLabel, Metrics};
use crate::secret::SecretValue;
use crate::store::{SecretState, SecretStore, Wanted};
use crate::substitute::{BindingSet, PlaceholderSet, SecretLookup};
use crate::tls::{LeafCertCache, UpstreamTls};
use crate::upstream::{DestinationTrust, UpstreamSettings, Upstreams};

/// Settings the engine acts on, fixed for the process.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub egress: EgressMode,
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
    /// Whether some binding's destination covers `host:port` for this
    /// transport: decides whether the sidecar terminates TLS for an SNI
    /// (and in cleartext whether the Host is bound).
    pub fn covers(&self, host: &str, port: u16, tls: bool) -> bool {
        self.bindings.iter().any(|b| {
            b.destinations.iter().any(|d| {
                d.port == port && (tls || d.allow_cleartext) && host_matches(&d.host, host)
            })
        })
    }

    /// Whether any destination has `host:port` at all (TLS or not).
    pub fn names(&self, host: &str, port: u16) -> bool {
        self.bindings.iter().any(|b| {
            b.destinations
                .iter()
                .any(|d| d.port == port && host_matches(&d.host, host))
        })
    }

    /// The binding's secret if it is ready and fresh enough to use now.
    pub fn usable_secret(&self, binding: usize) -> Result<&crate::store::Secret, &'static str> {
        match self.secrets.get(binding) {
            Some(Slot::State(SecretState::Ready(secret))) => {
                if secret.usable_at(tokio::time::Instant::now()) {
                    Ok(secret)
                } else {
                    Err(
                        "the secret source has not confirmed the value for longer than the allowed staleness",
                    )
                }
            }
            Some(Slot::State(SecretState::Pending)) => Err("the secret has not been read yet"),
            Some(Slot::State(SecretState::Failed(_))) => Err("the secret is unavailable"),
            Some(Slot::NoPlaceholder) | None => Err("this pod has no placeholder for the binding"),
        }
    }

    /// The failure message of a binding's secret, for error responses.
    pub fn secret_failure(&self, binding: usize) -> Option<String> {
        match self.secrets.get(binding) {
            Some(Slot::State(SecretState::Failed(f))) => Some(f.message.clone()),
            _ => None,
        }
    }

    pub fn label(&self, binding: usize) -> BindingLabel {
        self.labels
            .get(binding)
            .cloned()
            .unwrap_or_else(BindingLabel::none)
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

/// The shared state of a running sidecar.
pub struct Engine {
    pub settings: EngineSettings,
    pub metrics: Arc<Metrics>,
    pub audit: AuditLog,
    pub leaves: Arc<LeafCertCache>,
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
                upstream_settings,
            )),
        };
        Arc::new(Self {
            settings,
            metrics,
            audit,
            leaves,
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
        let mut synced: Option<Arc<Config>> = None;
        loop {
            let current = config.borrow_and_update().clone();
            if let Some(current) = current {
                if synced.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &current)) {
                    self.store.sync(&wanted(&current));
                    synced = Some(current.clone());
                }
                secrets.mark_unchanged();
                self.rebuild(&current);
            }
            tokio::select! {
                changed = config.changed() => if changed.is_err() { return },
                changed = secrets.changed() => if changed.is_err() { return },
            }
        }
    }

    fn rebuild(&self, config: &Config) {
        let view = self.store.view();
        let previous = self.snapshot.load();
        let bindings = config.bindings.bindings.clone();
        let placeholders = match PlaceholderSet::from_config(&bindings, &config.placeholders) {
            Ok(set) => set,
            Err(e) => {
                // Validated when the config loaded; should it fail anyway,
                // swap nothing rather than guess.
                tracing::error!(error = %e, "placeholders unusable; nothing will be swapped");
                PlaceholderSet::empty()
            }
        };
        let labels: Vec<BindingLabel> = bindings
            .iter()
            .map(|b| BindingLabel(Arc::from(b.id.as_str())))
            .collect();
        let secrets: Vec<Slot> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if placeholders.binding_id(i).is_none() {
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
        for (i, slot) in secrets.iter().enumerate() {
            if let Slot::State(state) = slot {
                self.metrics.secret_state(&labels[i], state.name());
            }
        }
        let echo = self.echo_detector(&bindings, &secrets, &view.previous);
        let trust = DestinationTrust::of(&bindings);
        let upstreams = if previous.upstreams.serves(&trust) {
            previous.upstreams.clone()
        } else {
            Arc::new(Upstreams::new(
                self.upstream_tls.clone(),
                trust,
                self.upstream_settings,
            ))
        };
        self.snapshot.store(Arc::new(Snapshot {
            bindings,
            labels,
            placeholders: Arc::new(placeholders),
            secrets,
            echo,
            upstreams,
        }));
        if view.all_loaded {
            if !self.ready.swap(true, Ordering::AcqRel) {
                tracing::info!("ready: config loaded and every bound secret read");
            }
        } else if !self.ready.load(Ordering::Acquire) {
            let waiting: Vec<&str> = view
                .states
                .iter()
                .filter(|(_, s)| !matches!(s, SecretState::Ready(_)))
                .map(|(id, _)| id.as_str())
                .collect();
            self.set_not_ready(format!("waiting for the secrets of bindings {waiting:?}"));
        }
    }

    fn echo_detector(
        &self,
        bindings: &[SidecarBinding],
        secrets: &[Slot],
        previous: &[(String, Arc<crate::store::Secret>)],
    ) -> Arc<EchoDetector> {
        let mut values: Vec<(usize, &str, &SecretValue)> = Vec::new();
        for (i, slot) in secrets.iter().enumerate() {
            if let Slot::State(SecretState::Ready(secret)) = slot {
                values.push((i, bindings[i].id.as_str(), secret.forms().raw()));
            }
        }
        for (id, secret) in previous {
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
