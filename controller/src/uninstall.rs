//! What the Helm chart's uninstall hooks run, with the controller image:
//!
//! - `credbroker-controller --check-no-bindings` (pre-delete): refuses the
//!   uninstall while CredentialBindings exist. The ValidatingAdmissionPolicies
//!   go with the release, but the bindings' Vault roles and policies, their
//!   bindings ConfigMaps and the sidecars already injected would stay: only
//!   a running controller withdraws those grants, when the bindings are
//!   deleted. Helm aborts the uninstall when this hook fails.
//! - `credbroker-controller --remove-finalizers` (post-delete): once the
//!   controller is gone, so that no CredentialBinding (and no namespace
//!   holding one) is left terminating on a finalizer nothing will remove.
//!
//! Neither holds Vault credentials. Grants of bindings that were not
//! deleted before the uninstall (`uninstall.allowWithBindings=true`) stay in
//! Vault until a reinstalled controller's sweep (or an admin) removes them.

use std::time::Duration;

use credbroker_crds::CredentialBinding;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::ResourceExt;
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

/// How many bindings the pre-delete hook's refusal names at most.
pub const NAMED_AT_MOST: usize = 10;

/// Why the uninstall is refused, naming up to [`NAMED_AT_MOST`] of the
/// `remaining` bindings (`namespace/name`, in the order given) and saying
/// what to do. Pure: the message the hook's log, so `helm uninstall`'s
/// operator, sees.
pub fn bindings_remain_message(remaining: &[String]) -> String {
    let count = remaining.len();
    let mut named = remaining
        .iter()
        .take(NAMED_AT_MOST)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if count > NAMED_AT_MOST {
        named.push_str(&format!(" and {} more", count - NAMED_AT_MOST));
    }
    let (noun, verb) = if count == 1 {
        ("CredentialBinding", "exists")
    } else {
        ("CredentialBindings", "exist")
    };
    format!(
        "{count} {noun} still {verb} ({named}). Delete the CredentialBindings first \
         (kubectl delete credentialbindings --all -A) while the controller runs, so it \
         removes their Vault grants, then uninstall; or set uninstall.allowWithBindings=true \
         to uninstall anyway (their grants stay in Vault)"
    )
}

/// Lists every CredentialBinding in the cluster: Ok when there is none (or
/// the CRD is not installed), otherwise an error whose message is
/// [`bindings_remain_message`]. A binding already being deleted counts (and
/// is marked so): its grant is withdrawn only once it is gone.
pub async fn check_no_bindings(client: kube::Client) -> Result<()> {
    let api = Api::<CredentialBinding>::all(client);
    let list = match api.list(&ListParams::default()).await {
        Ok(list) => list,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            info!("the CredentialBinding CRD is not installed: no binding to withdraw");
            return Ok(());
        }
        Err(source) => {
            return Err(Error::Kube {
                doing: "listing CredentialBindings".into(),
                source,
            });
        }
    };
    let mut remaining: Vec<String> = list
        .items
        .iter()
        .map(|b| {
            let name = format!("{}/{}", b.namespace().unwrap_or_default(), b.name_any());
            if b.metadata.deletion_timestamp.is_some() {
                format!("{name} (being deleted)")
            } else {
                name
            }
        })
        .collect();
    if remaining.is_empty() {
        info!("no CredentialBinding left: the uninstall can go ahead");
        return Ok(());
    }
    remaining.sort();
    Err(Error::config(
        "refusing the uninstall",
        bindings_remain_message(&remaining),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("team-{i:02}/openai")).collect()
    }

    #[test]
    fn one_binding_is_named_with_what_to_do() {
        let m = bindings_remain_message(&names(1));
        assert!(
            m.starts_with("1 CredentialBinding still exists (team-00/openai). "),
            "{m}"
        );
        assert!(
            m.contains("kubectl delete credentialbindings --all -A"),
            "{m}"
        );
        assert!(m.contains("while the controller runs"), "{m}");
        assert!(m.contains("removes their Vault grants"), "{m}");
        assert!(m.contains("uninstall.allowWithBindings=true"), "{m}");
        assert!(m.contains("grants stay in Vault"), "{m}");
        assert!(!m.contains("more"), "{m}");
    }

    #[test]
    fn ten_bindings_are_all_named() {
        let m = bindings_remain_message(&names(10));
        assert!(
            m.starts_with("10 CredentialBindings still exist (team-00/openai, "),
            "{m}"
        );
        assert!(m.contains("team-09/openai)"), "{m}");
        assert!(!m.contains(" more"), "{m}");
    }

    #[test]
    fn more_than_ten_are_counted_not_named() {
        let m = bindings_remain_message(&names(13));
        assert!(m.starts_with("13 CredentialBindings still exist ("), "{m}");
        assert!(m.contains("team-09/openai and 3 more)"), "{m}");
        assert!(!m.contains("team-10/"), "{m}");
        assert_eq!(m.matches("/openai").count(), NAMED_AT_MOST, "{m}");
    }
}
