//! The sweep: deletes this cluster's `credbroker-*` policies and roles,
//! and the controller's ConfigMaps, that no effective binding backs. It
//! catches what a failed or abandoned cleanup left, and grants whose
//! bindings were deleted while the controller was down.
//!
//! Only names with this cluster id's prefix are touched: another cluster
//! sharing the Vault keeps its own. Vault is listed before the bindings are
//! read, so a grant written by a reconcile running meanwhile is either not
//! in the list or backed by a binding the sweep sees. The bindings and
//! policies are listed from the API server, not taken from the watch
//! caches: a cache still filling would make live grants look orphaned.

use std::collections::{BTreeMap, BTreeSet};

use credbroker_crds::keys::{MANAGED_BY, SERVICE_ACCOUNT_LABEL};
use credbroker_crds::{ClusterCredentialPolicy, CredentialBinding};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tracing::info;

use crate::desired::{Inputs, desired_state};
use crate::names::cluster_prefix;
use crate::reconcile::{Context, delete_configmap};
use crate::{Error, Result};

/// The longest the sweep waits for one list while applies wait for it.
const LIST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// What one sweep deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub policies: Vec<String>,
    pub roles: Vec<String>,
    pub configmaps: Vec<String>,
}

pub async fn sweep(ctx: &Context) -> Result<Swept> {
    let prefix = cluster_prefix(&ctx.grants.cluster_id);
    let mount = &ctx.grants.auth_mount;
    let ours = |names: Vec<String>| -> Vec<String> {
        names
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    };
    let policies = ours(ctx.vault.list_policies().await?);
    let roles = ours(ctx.vault.list_roles(mount).await?);
    let configmaps = Api::<ConfigMap>::all(ctx.client.clone())
        .list_metadata(
            &ListParams::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")),
        )
        .await
        .map_err(Error::kube("listing the controller's ConfigMaps"))?;

    // From here on no apply runs: what should exist is read after every
    // grant written so far, and nothing is written until the deletes end.
    let _gate = ctx.sweep_gate.write().await;
    // Applies wait while the gate is held: the lists get a deadline of
    // their own (kube's client has none).
    let deadline = |what: &'static str| {
        move |_| Error::Config {
            what: format!("the sweep, {what}"),
            reason: format!("no answer from the API server within {LIST_DEADLINE:?}"),
        }
    };
    let namespaces = tokio::time::timeout(
        LIST_DEADLINE,
        Api::<Namespace>::all(ctx.client.clone()).list_metadata(&ListParams::default()),
    )
    .await
    .map_err(deadline("listing namespaces"))?
    .map_err(Error::kube("listing namespaces"))?;
    let labels: BTreeMap<String, BTreeMap<String, String>> = namespaces
        .items
        .iter()
        .map(|ns| (ns.name_any(), ns.labels().clone()))
        .collect();
    let bindings = tokio::time::timeout(
        LIST_DEADLINE,
        Api::<CredentialBinding>::all(ctx.client.clone()).list(&ListParams::default()),
    )
    .await
    .map_err(deadline("listing CredentialBindings"))?
    .map_err(Error::kube("listing CredentialBindings"))?
    .items;
    let refs: Vec<&CredentialBinding> = bindings.iter().collect();
    let cluster_policies = tokio::time::timeout(
        LIST_DEADLINE,
        Api::<ClusterCredentialPolicy>::all(ctx.client.clone()).list(&ListParams::default()),
    )
    .await
    .map_err(deadline("listing ClusterCredentialPolicies"))?
    .map_err(Error::kube("listing ClusterCredentialPolicies"))?
    .items;
    let desired = desired_state(&Inputs {
        bindings: &refs,
        policies: &cluster_policies,
        namespace_labels: &labels,
        ca_pems: None,
        settings: &ctx.grants,
    });
    let wanted: BTreeSet<&str> = desired
        .accounts
        .values()
        .map(|a| a.vault_name.as_str())
        .collect();
    let wanted_configmaps: BTreeSet<(&str, &str)> = desired
        .accounts
        .values()
        .map(|a| (a.key.namespace.as_str(), a.configmap_name.as_str()))
        .collect();

    // One failed delete does not stop the others; the first error is
    // returned after all were tried.
    let mut swept = Swept::default();
    let mut first_error: Option<Error> = None;
    for role in roles.iter().filter(|r| !wanted.contains(r.as_str())) {
        match ctx.vault.delete_role(mount, role).await {
            Ok(()) => {
                ctx.metrics.swept("role");
                info!(role = %role, mount, "swept an orphaned Kubernetes-auth role");
                swept.roles.push(role.clone());
            }
            Err(e) => {
                first_error.get_or_insert(e.into());
            }
        }
    }
    for policy in policies.iter().filter(|p| !wanted.contains(p.as_str())) {
        match ctx.vault.delete_policy(policy).await {
            Ok(()) => {
                ctx.metrics.swept("policy");
                info!(policy = %policy, "swept an orphaned Vault policy");
                swept.policies.push(policy.clone());
            }
            Err(e) => {
                first_error.get_or_insert(e.into());
            }
        }
    }
    for cm in &configmaps.items {
        let ns = cm.namespace().unwrap_or_default();
        let name = cm.name_any();
        // Only names the controller gives: a ConfigMap someone else
        // labelled is not the controller's to delete.
        let ours = cm
            .labels()
            .get(SERVICE_ACCOUNT_LABEL)
            .is_some_and(|_| name.starts_with(credbroker_crds::keys::NAME_PREFIX));
        if ours && !wanted_configmaps.contains(&(ns.as_str(), name.as_str())) {
            match delete_configmap(&ns, &name, ctx).await {
                Ok(()) => {
                    ctx.metrics.swept("configmap");
                    swept.configmaps.push(format!("{ns}/{name}"));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    // Any delete tried (one that timed out may still have landed) makes
    // every confirmation suspect.
    if swept != Swept::default() || first_error.is_some() {
        ctx.forget_confirmations();
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(swept),
    }
}
