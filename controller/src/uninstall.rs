//! `credbroker-controller --remove-finalizers`: what the Helm chart's
//! post-delete hook runs once the controller is gone, so that no
//! CredentialBinding (and no namespace holding one) is left terminating on
//! a finalizer nothing will remove.
//!
//! It only takes the controller's finalizer off: it holds no Vault
//! credentials. Grants of bindings that were not deleted before the
//! uninstall stay in Vault until a reinstalled controller's sweep (or an
//! admin) removes them.

use std::time::Duration;

use credbroker_crds::CredentialBinding;
use kube::api::{Api, ListParams, Patch, PatchParams};
use tracing::info;

use crate::reconcile::FINALIZER;
use crate::{Error, Result};

/// How many passes at most, and the pause between them. A pass that
/// removes nothing ends it; more than one is needed only while a stopping
/// controller replica could still add the finalizer back.
const PASSES: usize = 10;
const PAUSE: Duration = Duration::from_secs(3);

/// Removes [`FINALIZER`] from every CredentialBinding in the cluster,
/// pass after pass until one finds none left. Returns how many it removed.
pub async fn remove_finalizers(client: kube::Client) -> Result<usize> {
    let api = Api::<CredentialBinding>::all(client.clone());
    let mut removed = 0;
    for pass in 1..=PASSES {
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            // The CRD is gone (deleted before the uninstall): so is every
            // binding, and nothing is left to hang.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                info!("the CredentialBinding CRD is not installed: no finalizer to remove");
                return Ok(removed);
            }
            Err(source) => {
                return Err(Error::Kube {
                    doing: "listing CredentialBindings".into(),
                    source,
                });
            }
        };
        let mut this_pass = 0;
        for binding in list.items {
            let finalizers = binding.metadata.finalizers.clone().unwrap_or_default();
            if !finalizers.iter().any(|f| f == FINALIZER) {
                continue;
            }
            let (Some(name), Some(ns)) = (
                binding.metadata.name.clone(),
                binding.metadata.namespace.clone(),
            ) else {
                continue;
            };
            let kept: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
            // The resourceVersion makes it a compare-and-swap: a binding
            // changed meanwhile is retried at the next pass, never has
            // someone else's finalizer dropped.
            let patch = serde_json::json!({
                "metadata": {
                    "resourceVersion": binding.metadata.resource_version,
                    "finalizers": kept,
                }
            });
            let namespaced = Api::<CredentialBinding>::namespaced(client.clone(), &ns);
            match namespaced
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    this_pass += 1;
                    info!(namespace = %ns, binding = %name, "removed the finalizer {FINALIZER}");
                }
                // Gone or changed since the list: the next pass looks again.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => this_pass += 1,
                Err(source) => {
                    return Err(Error::Kube {
                        doing: format!("removing the finalizer from CredentialBinding {ns}/{name}"),
                        source,
                    });
                }
            }
        }
        removed += this_pass;
        if this_pass == 0 {
            info!(
                removed,
                passes = pass,
                "no CredentialBinding carries the finalizer {FINALIZER}"
            );
            return Ok(removed);
        }
        tokio::time::sleep(PAUSE).await;
    }
    Err(Error::Finalizer(format!(
        "{FINALIZER} was still being added back after {PASSES} passes: is a controller still running?"
    )))
}
