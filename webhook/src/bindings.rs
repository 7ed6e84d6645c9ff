//! The service accounts' bindings, as admission needs them: a watch of the
//! `CredentialBinding`s (their names and placeholder env vars only).
//! Admission reads the cache, never the API server, so a pod's creation
//! costs no API call and an API-server blip does not fail admissions.
//!
//! Why the bindings themselves and not the controller's ConfigMaps: a
//! binding applied together with its pods (one chart, one GitOps sync)
//! has its placeholder from the first pod on, without waiting for the
//! controller to have written Vault; and reading CredentialBindings
//! needs no right to read every ConfigMap in the cluster. A placeholder
//! is not a secret: a binding no policy admits gets one, and the sidecar,
//! which enforces only what the controller published, never swaps it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use credbroker_crds::CredentialBinding;
use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use crate::mutate::PodBinding;

/// The cache of CredentialBindings.
#[derive(Clone)]
pub struct BindingsCache {
    store: Store<CredentialBinding>,
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
        let (store, writer) = reflector::store::<CredentialBinding>();
        let synced = Arc::new(AtomicBool::new(false));
        let flag = synced.clone();
        let stream = reflector::reflector(
            writer,
            watcher(
                Api::<CredentialBinding>::all(client),
                watcher::Config::default(),
            ),
        )
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
                            tracing::info!("CredentialBindings listed; admitting pods");
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!("watching CredentialBindings: {e}"),
                    None => return,
                }
            }
        });
        Self { store, synced }
    }

    /// Whether the first list has arrived: until then, admission refuses
    /// rather than inject a pod without its placeholders.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// The bindings of `service_account` in `namespace`, oldest first.
    pub fn lookup(&self, namespace: &str, service_account: &str) -> Vec<PodBinding> {
        of_account(&self.store.state(), namespace, service_account)
    }
}

/// The bindings of one account among `all` (pure), oldest first (then by
/// name), the order in which the controller settles a placeholder-env
/// conflict. Bindings being deleted are left out.
pub fn of_account(
    all: &[Arc<CredentialBinding>],
    namespace: &str,
    service_account: &str,
) -> Vec<PodBinding> {
    let mut mine: Vec<&CredentialBinding> = all
        .iter()
        .map(Arc::as_ref)
        .filter(|b| {
            b.metadata.namespace.as_deref() == Some(namespace)
                && b.spec.service_account_name == service_account
                && b.metadata.deletion_timestamp.is_none()
        })
        .collect();
    mine.sort_by_key(|b| {
        (
            b.metadata.creation_timestamp.as_ref().map(|t| t.0),
            b.metadata.name.clone(),
        )
    });
    mine.into_iter()
        .map(|b| PodBinding {
            id: b.metadata.name.clone().unwrap_or_default(),
            placeholder: b.spec.placeholder.clone(),
        })
        .collect()
}
