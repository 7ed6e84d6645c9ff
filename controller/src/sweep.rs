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

use credbroker_crds::keys::MANAGED_BY;
use credbroker_crds::{ClusterCredentialPolicy, CredentialBinding};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tracing::info;

use crate::desired::{Inputs, desired_state};
use crate::names::cluster_prefix;
use crate::reconcile::{Context, delete_configmap};
use crate::{Error, Result};

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

    // Only now what should exist.
    let namespaces = Api::<Namespace>::all(ctx.client.clone())
        .list_metadata(&ListParams::default())
        .await
        .map_err(Error::kube("listing namespaces"))?;
    let labels: BTreeMap<String, BTreeMap<String, String>> = namespaces
        .items
        .iter()
        .map(|ns| (ns.name_any(), ns.labels().clone()))
        .collect();
    let bindings = Api::<CredentialBinding>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing CredentialBindings"))?
        .items;
    let refs: Vec<&CredentialBinding> = bindings.iter().collect();
    let cluster_policies = Api::<ClusterCredentialPolicy>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
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

    let mut swept = Swept::default();
    for role in roles.iter().filter(|r| !wanted.contains(r.as_str())) {
        ctx.vault.delete_role(mount, role).await?;
        ctx.metrics.swept("role");
        info!(role = %role, mount, "swept an orphaned Kubernetes-auth role");
        swept.roles.push(role.clone());
    }
    for policy in policies.iter().filter(|p| !wanted.contains(p.as_str())) {
        ctx.vault.delete_policy(policy).await?;
        ctx.metrics.swept("policy");
        info!(policy = %policy, "swept an orphaned Vault policy");
        swept.policies.push(policy.clone());
    }
    for cm in &configmaps.items {
        let ns = cm.namespace().unwrap_or_default();
        let name = cm.name_any();
        if !wanted_configmaps.contains(&(ns.as_str(), name.as_str())) {
            delete_configmap(&ns, &name, ctx).await?;
            ctx.metrics.swept("configmap");
            swept.configmaps.push(format!("{ns}/{name}"));
        }
    }
    Ok(swept)
}
