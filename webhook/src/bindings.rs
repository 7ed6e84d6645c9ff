//! The service accounts' bindings, as the controller publishes them: a
//! watch of the bindings ConfigMaps it labels as its own. Admission reads
//! the cache, never the API server, so a pod's creation costs no API call
//! and an API-server blip does not fail admissions.
//!
//! Only ConfigMaps with the controller's `app.kubernetes.io/managed-by`
//! label are requested; the admission policy refuses writes to them by
//! anyone but the controller (`webhook/deploy/admission-policy.yaml`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use credbroker_crds::config::SidecarBindings;
use credbroker_crds::keys;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

/// What admission knows of one service account's bindings.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// No ConfigMap: the account has no effective binding.
    None,
    Found(SidecarBindings),
    /// A ConfigMap the sidecar could not read either: admission says so
    /// rather than injecting placeholders that match nothing.
    Invalid(String),
}

/// The cache of bindings ConfigMaps.
#[derive(Clone)]
pub struct BindingsCache {
    store: Store<ConfigMap>,
    synced: Arc<AtomicBool>,
}

impl std::fmt::Debug for BindingsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindingsCache")
            .field("synced", &self.is_synced())
            .finish()
    }
}

impl BindingsCache {
    /// Starts the watch; it runs until `shutdown`.
    pub fn start(client: kube::Client, shutdown: CancellationToken) -> Self {
        let (store, writer) = reflector::store::<ConfigMap>();
        let synced = Arc::new(AtomicBool::new(false));
        let flag = synced.clone();
        let config = watcher::Config::default().labels(&format!(
            "app.kubernetes.io/managed-by={}",
            keys::MANAGED_BY
        ));
        let stream = reflector::reflector(writer, watcher(Api::<ConfigMap>::all(client), config))
            .default_backoff();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(watcher::Event::InitDone)) => {
                        if !flag.swap(true, Ordering::Relaxed) {
                            tracing::info!("bindings ConfigMaps listed; admitting pods");
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!("watching the bindings ConfigMaps: {e}"),
                    None => return,
                }
            }
        });
        Self { store, synced }
    }

    /// Whether the first list has arrived (readiness).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// The bindings of `service_account` in `namespace`.
    pub fn lookup(&self, namespace: &str, service_account: &str) -> Lookup {
        let name = keys::bindings_configmap_name(service_account);
        let Some(cm) = self.store.get(&ObjectRef::new(&name).within(namespace)) else {
            return Lookup::None;
        };
        parse(&cm)
    }
}

/// A bindings ConfigMap's content (pure).
pub fn parse(cm: &ConfigMap) -> Lookup {
    let name = cm.metadata.name.as_deref().unwrap_or_default();
    match cm
        .data
        .as_ref()
        .and_then(|d| d.get(keys::BINDINGS_CONFIGMAP_KEY))
    {
        None => Lookup::Invalid(format!(
            "ConfigMap {name} has no {} key",
            keys::BINDINGS_CONFIGMAP_KEY
        )),
        Some(json) => match SidecarBindings::from_json(json) {
            Ok(bindings) => Lookup::Found(bindings),
            Err(e) => Lookup::Invalid(format!("ConfigMap {name}: {e}")),
        },
    }
}
