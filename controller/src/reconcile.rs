//! The reconcile loop: for one binding, recompute its service account's
//! grant from every binding of that account, make Vault and the ConfigMap
//! match it, and write the binding's status.
//!
//! read (stores, the namespace, CA ConfigMaps) → validate and build the
//! desired state ([`crate::desired`], pure) → apply (compare, then write) →
//! status ([`crate::status`], pure). Writes to one account are serialised,
//! so two bindings of one service account never race on its policy.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credbroker_crds::keys::{BINDINGS_CONFIGMAP_KEY, MANAGED_BY, SERVICE_ACCOUNT_LABEL};
use credbroker_crds::{ClusterCredentialPolicy, CredentialBinding};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::desired::{Account, AccountKey, BindingKey, Inputs, Verdict, desired_state, key_of};
use crate::metrics::Metrics;
use crate::settings::GrantSettings;
use crate::status::{Findings, SecretState, Sync, ready_of, same_status, status_for};
use crate::vault::VaultClient;
use crate::{Error, Result};

/// The finalizer on every binding the controller has seen.
pub const FINALIZER: &str = "credbroker.dev/vault-grant";
/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "credbroker-controller";

/// How long a reconcile that arrives before the caches are full waits.
const CACHE_WAIT: Duration = Duration::from_millis(500);

/// How the loop behaves.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// How often a settled binding is checked again.
    pub resync: Duration,
    /// How long a deletion waits for Vault before it gives up and leaves
    /// the grant to the sweep.
    pub cleanup_timeout: Duration,
    /// The first retry after a failure; it doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for LoopSettings {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(300),
            cleanup_timeout: Duration::from_secs(300),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(120),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub vault: Arc<VaultClient>,
    pub grants: GrantSettings,
    pub loop_settings: LoopSettings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub bindings: Store<CredentialBinding>,
    pub policies: Store<ClusterCredentialPolicy>,
    account_locks: Mutex<HashMap<AccountKey, Arc<tokio::sync::Mutex<()>>>>,
    failures: Mutex<HashMap<BindingKey, u32>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        vault: Arc<VaultClient>,
        grants: GrantSettings,
        loop_settings: LoopSettings,
        metrics: Arc<Metrics>,
        recorder: Recorder,
        bindings: Store<CredentialBinding>,
        policies: Store<ClusterCredentialPolicy>,
    ) -> Self {
        Self {
            client,
            vault,
            grants,
            loop_settings,
            metrics,
            recorder,
            bindings,
            policies,
            account_locks: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Whether the binding and policy caches hold a full list. Until they
    /// do, an account's other bindings, or the policy allowing them, may be
    /// missing, and acting then would withdraw live grants.
    fn caches_ready(&self) -> bool {
        use futures::FutureExt as _;
        matches!(
            self.bindings.wait_until_ready().now_or_never(),
            Some(Ok(()))
        ) && matches!(
            self.policies.wait_until_ready().now_or_never(),
            Some(Ok(()))
        )
    }

    fn account_lock(&self, key: &AccountKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.account_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(key.clone()).or_default().clone()
    }

    /// The next retry delay for `key`, doubling with each failure in a row.
    fn backoff(&self, key: &BindingKey) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        let delay = self
            .loop_settings
            .min_backoff
            .saturating_mul(1 << (*n - 1).min(16));
        delay.min(self.loop_settings.max_backoff)
    }

    fn succeeded(&self, key: &BindingKey) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// kube-runtime's entry point for one binding.
pub async fn reconcile(binding: Arc<CredentialBinding>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let key = key_of(&binding);
    let api = Api::<CredentialBinding>::namespaced(ctx.client.clone(), &key.namespace);
    let result = finalizer(&api, FINALIZER, binding, |event| async {
        match event {
            finalizer::Event::Apply(b) => apply(&b, &ctx).await,
            finalizer::Event::Cleanup(b) => cleanup(&b, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    let error = result.as_ref().err().map(Error::reason);
    ctx.metrics
        .reconciled(started.elapsed().as_secs_f64(), error);
    result
}

/// kube-runtime's answer to a failed reconcile: retry with backoff.
pub fn error_policy(binding: Arc<CredentialBinding>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = key_of(&binding);
    let mut delay = ctx.backoff(&key);
    // A deletion is retried no later than when it would give up, so a
    // long backoff earned before the delete cannot hold the namespace.
    if let Some(deleted) = &binding.metadata.deletion_timestamp {
        let waited = since(deleted);
        let left = ctx.loop_settings.cleanup_timeout.saturating_sub(waited);
        delay = delay.min(left + Duration::from_millis(200));
    }
    warn!(
        namespace = %key.namespace, binding = %key.name, reason = error.reason(),
        retry_in = ?delay, "reconcile failed: {error}"
    );
    Action::requeue(delay)
}

/// How long ago `t` was (zero if in the future).
fn since(t: &Time) -> Duration {
    Duration::try_from(k8s_openapi::jiff::Timestamp::now().duration_since(t.0)).unwrap_or_default()
}

/// The outcome of making one account match its desired state.
struct Applied {
    policy: Sync,
    role: Sync,
    /// The first Vault error, if any (the account is retried).
    vault_error: Option<Error>,
}

async fn apply(binding: &CredentialBinding, ctx: &Context) -> Result<Action> {
    let key = key_of(binding);
    if !ctx.caches_ready() {
        return Ok(Action::requeue(CACHE_WAIT));
    }
    let account_key = AccountKey {
        namespace: key.namespace.clone(),
        service_account: binding.spec.service_account_name.clone(),
    };
    let lock = ctx.account_lock(&account_key);
    let _guard = lock.lock().await;

    let desired = read_and_build(binding, &account_key, ctx, None).await?;
    let verdict = desired
        .verdicts
        .get(&key)
        .cloned()
        .unwrap_or(Verdict::Invalid("the binding was not evaluated".into()));
    let account = desired.accounts.get(&account_key);
    let applied = apply_account(&account_key, account, ctx).await?;

    let secret = if verdict == Verdict::Effective {
        secret_state(binding, ctx).await
    } else {
        SecretState::Unknown {
            reason: "NotChecked",
            message: "not checked: the binding is not allowed".into(),
        }
    };
    let vault_down = applied.vault_error.is_some()
        || matches!(
            secret,
            SecretState::Unknown {
                reason: "VaultUnavailable",
                ..
            }
        );
    let findings = Findings {
        verdict,
        policy: applied.policy,
        role: applied.role,
        secret,
        vault_policy: account.map(|a| a.vault_name.clone()),
    };
    write_status(binding, &findings, ctx).await?;
    if let Some(e) = applied.vault_error {
        return Err(e);
    }
    if vault_down {
        return Ok(Action::requeue(ctx.backoff(&key)));
    }
    ctx.succeeded(&key);
    Ok(Action::requeue(ctx.loop_settings.resync))
}

/// On deletion: the account's grant without this binding, or none. If
/// Vault stays away past the cleanup timeout, the finalizer is removed
/// anyway (a namespace deletion must not hang on Vault) and the sweep
/// deletes what is left once Vault is back.
async fn cleanup(binding: &CredentialBinding, ctx: &Context) -> Result<Action> {
    let key = key_of(binding);
    if !ctx.caches_ready() {
        return Err(Error::Finalizer(
            "the watch caches are still filling".into(),
        ));
    }
    let account_key = AccountKey {
        namespace: key.namespace.clone(),
        service_account: binding.spec.service_account_name.clone(),
    };
    let lock = ctx.account_lock(&account_key);
    let _guard = lock.lock().await;
    let desired = read_and_build(binding, &account_key, ctx, Some(&key)).await?;
    let applied = apply_account(&account_key, desired.accounts.get(&account_key), ctx).await?;
    if let Some(e) = applied.vault_error {
        let waited = binding
            .metadata
            .deletion_timestamp
            .as_ref()
            .map(since)
            .unwrap_or_default();
        if waited < ctx.loop_settings.cleanup_timeout {
            publish(
                ctx,
                binding,
                EventType::Warning,
                e.reason(),
                "Cleanup",
                e.to_string(),
            )
            .await;
            return Err(e);
        }
        let name = crate::names::vault_name(
            &ctx.grants.cluster_id,
            &account_key.namespace,
            &account_key.service_account,
        );
        let note = format!(
            "gave up updating Vault after {waited:?} ({e}); the sweep will update or delete policy and role {name} when Vault is back"
        );
        warn!(namespace = %key.namespace, binding = %key.name, "{note}");
        publish(
            ctx,
            binding,
            EventType::Warning,
            "CleanupAbandoned",
            "Cleanup",
            note,
        )
        .await;
    } else {
        info!(namespace = %key.namespace, binding = %key.name, "binding deleted; its grant is withdrawn");
    }
    ctx.succeeded(&key);
    Ok(Action::await_change())
}

/// Reads what the account's grant depends on and builds it. `deleting`
/// names a binding to leave out (its finalizer is running).
async fn read_and_build(
    binding: &CredentialBinding,
    account: &AccountKey,
    ctx: &Context,
    deleting: Option<&BindingKey>,
) -> Result<crate::desired::Desired> {
    let key = key_of(binding);
    // The store has every binding; the one being reconciled is taken as
    // given (it is at least as new as the store's copy).
    let mut members: Vec<Arc<CredentialBinding>> = ctx.bindings.state_filter(|b| {
        b.metadata.namespace.as_deref() == Some(account.namespace.as_str())
            && b.spec.service_account_name == account.service_account
            && key_of(b) != key
    });
    if deleting.is_none() {
        members.push(Arc::new(binding.clone()));
    }
    let policies: Vec<ClusterCredentialPolicy> =
        ctx.policies.state().iter().map(|p| (**p).clone()).collect();
    let namespace = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(&account.namespace)
        .await
        .map_err(Error::kube(format!(
            "reading namespace {}",
            account.namespace
        )))?;
    let mut namespace_labels = BTreeMap::new();
    if let Some(ns) = namespace {
        namespace_labels.insert(account.namespace.clone(), ns.labels().clone());
    }
    let ca_pems = read_ca_pems(&members, &account.namespace, ctx).await?;
    let refs: Vec<&CredentialBinding> = members.iter().map(|b| b.as_ref()).collect();
    Ok(desired_state(&Inputs {
        bindings: &refs,
        policies: &policies,
        namespace_labels: &namespace_labels,
        ca_pems: Some(&ca_pems),
        settings: &ctx.grants,
    }))
}

/// The PEM of every `caConfigMap` the bindings name that exists.
async fn read_ca_pems(
    bindings: &[Arc<CredentialBinding>],
    namespace: &str,
    ctx: &Context,
) -> Result<BTreeMap<(String, String, String), String>> {
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace);
    let mut pems = BTreeMap::new();
    let mut seen: BTreeMap<String, Option<ConfigMap>> = BTreeMap::new();
    for b in bindings {
        for d in &b.spec.destinations {
            let Some(ca) = &d.ca_config_map else { continue };
            if !seen.contains_key(&ca.name) {
                let cm = api.get_opt(&ca.name).await.map_err(Error::kube(format!(
                    "reading ConfigMap {namespace}/{}",
                    ca.name
                )))?;
                seen.insert(ca.name.clone(), cm);
            }
            if let Some(Some(cm)) = seen.get(&ca.name)
                && let Some(pem) = cm.data.as_ref().and_then(|d| d.get(&ca.key))
            {
                pems.insert(
                    (namespace.to_owned(), ca.name.clone(), ca.key.clone()),
                    pem.clone(),
                );
            }
        }
    }
    Ok(pems)
}

/// Makes Vault and the ConfigMap match `account` (or withdraws the grant
/// when it is `None`). Vault failures are reported in the result, so the
/// status can say so; Kubernetes failures are errors.
async fn apply_account(
    key: &AccountKey,
    account: Option<&Account>,
    ctx: &Context,
) -> Result<Applied> {
    let mount = &ctx.grants.auth_mount;
    let name =
        crate::names::vault_name(&ctx.grants.cluster_id, &key.namespace, &key.service_account);
    let configmap_name = credbroker_crds::keys::bindings_configmap_name(&key.service_account);
    let Some(account) = account else {
        // Withdraw: the role first (no new logins), then the policy (tokens
        // already issued lose its paths at once), then the ConfigMap.
        let vault = withdraw(&name, mount, ctx).await;
        delete_configmap(&key.namespace, &configmap_name, ctx).await?;
        return Ok(match vault {
            Ok(()) => Applied {
                policy: Sync::NotGranted,
                role: Sync::NotGranted,
                vault_error: None,
            },
            Err(e) => Applied {
                policy: failed(&e),
                role: failed(&e),
                vault_error: Some(e),
            },
        });
    };
    // The policy before the role: a role must never name a policy that
    // grants more than the bindings now say.
    let policy = sync_policy(account, ctx).await;
    let role = match &policy {
        Err(e @ Error::VaultUnavailable { .. }) => Err(e.clone_for_status()),
        _ => sync_role(account, mount, ctx).await,
    };
    apply_configmap(account, ctx).await?;
    let vault_error = match (&policy, &role) {
        (Err(e), _) | (_, Err(e)) => Some(e.clone_for_status()),
        _ => None,
    };
    Ok(Applied {
        policy: policy.map_or_else(
            |e| failed(&e),
            |()| Sync::Synced(account.vault_name.clone()),
        ),
        role: role.map_or_else(
            |e| failed(&e),
            |()| Sync::Synced(account.vault_name.clone()),
        ),
        vault_error,
    })
}

fn failed(e: &Error) -> Sync {
    Sync::Failed {
        reason: e.reason(),
        message: e.to_string(),
    }
}

impl Error {
    /// A copy for the status and the retry (kube errors are not `Clone`;
    /// these are only ever Vault or config errors).
    fn clone_for_status(&self) -> Error {
        match self {
            Error::VaultUnavailable {
                addr,
                doing,
                reason,
            } => Error::VaultUnavailable {
                addr: addr.clone(),
                doing: doing.clone(),
                reason: reason.clone(),
            },
            Error::VaultRefused {
                doing,
                status,
                errors,
            } => Error::VaultRefused {
                doing: doing.clone(),
                status: *status,
                errors: errors.clone(),
            },
            other => Error::config("Vault", other.to_string()),
        }
    }
}

async fn sync_policy(account: &Account, ctx: &Context) -> Result<()> {
    let current = ctx.vault.read_policy(&account.vault_name).await?;
    if current.as_deref() != Some(account.policy.as_str()) {
        ctx.vault
            .write_policy(&account.vault_name, &account.policy)
            .await?;
        info!(policy = %account.vault_name, "Vault policy written");
    }
    Ok(())
}

async fn sync_role(account: &Account, mount: &str, ctx: &Context) -> Result<()> {
    let current = ctx.vault.read_role(mount, &account.vault_name).await?;
    if current.flatten().as_ref() != Some(&account.role) {
        ctx.vault
            .write_role(mount, &account.vault_name, &account.role)
            .await?;
        info!(role = %account.vault_name, mount, "Kubernetes-auth role written");
    }
    Ok(())
}

/// Deletes the role and the policy named `name`, if they exist.
pub(crate) async fn withdraw(name: &str, mount: &str, ctx: &Context) -> Result<()> {
    if ctx.vault.read_role(mount, name).await?.is_some() {
        ctx.vault.delete_role(mount, name).await?;
        info!(role = %name, mount, "Kubernetes-auth role deleted");
    }
    if ctx.vault.read_policy(name).await?.is_some() {
        ctx.vault.delete_policy(name).await?;
        info!(policy = %name, "Vault policy deleted");
    }
    Ok(())
}

async fn apply_configmap(account: &Account, ctx: &Context) -> Result<()> {
    let ns = &account.key.namespace;
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns);
    let json = serde_json::to_string_pretty(&account.sidecar)
        .map_err(|e| Error::config("the bindings ConfigMap", e.to_string()))?;
    let labels: BTreeMap<String, String> = [
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
        (
            SERVICE_ACCOUNT_LABEL.to_owned(),
            label_value(&account.key.service_account),
        ),
    ]
    .into();
    let owners: Vec<OwnerReference> = account
        .owners
        .iter()
        .map(|(name, uid)| OwnerReference {
            api_version: format!("{}/{}", credbroker_crds::GROUP, credbroker_crds::VERSION),
            kind: "CredentialBinding".into(),
            name: name.clone(),
            uid: uid.clone(),
            controller: Some(false),
            block_owner_deletion: Some(false),
        })
        .collect();
    let current = api
        .get_opt(&account.configmap_name)
        .await
        .map_err(Error::kube(format!(
            "reading ConfigMap {ns}/{}",
            account.configmap_name
        )))?;
    if let Some(cm) = &current {
        let same_data = cm.data.as_ref().and_then(|d| d.get(BINDINGS_CONFIGMAP_KEY)) == Some(&json)
            && cm.data.as_ref().is_some_and(|d| d.len() == 1);
        let same_labels = labels.iter().all(|(k, v)| cm.labels().get(k) == Some(v));
        let same_owners =
            cm.metadata.owner_references.as_deref().unwrap_or_default() == owners.as_slice();
        if same_data && same_labels && same_owners {
            return Ok(());
        }
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(account.configmap_name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(labels),
            owner_references: Some(owners),
            ..Default::default()
        },
        data: Some([(BINDINGS_CONFIGMAP_KEY.to_owned(), json)].into()),
        ..Default::default()
    };
    api.patch(
        &account.configmap_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map_err(Error::kube(format!(
        "applying ConfigMap {ns}/{}",
        account.configmap_name
    )))?;
    info!(namespace = %ns, configmap = %account.configmap_name, "bindings ConfigMap written");
    Ok(())
}

/// A label value: at most 63 characters of the name (the full name is in
/// the ConfigMap's content).
fn label_value(name: &str) -> String {
    let cut: String = name.chars().take(63).collect();
    cut.trim_end_matches(['-', '.', '_']).to_owned()
}

pub(crate) async fn delete_configmap(ns: &str, name: &str, ctx: &Context) -> Result<()> {
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            info!(namespace = %ns, configmap = %name, "bindings ConfigMap deleted");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("deleting ConfigMap {ns}/{name}"))(e)),
    }
}

/// KV v2 metadata says whether the secret exists; KV v1 has none to ask.
async fn secret_state(binding: &CredentialBinding, ctx: &Context) -> SecretState {
    let v = &binding.spec.source.vault;
    let path = format!("{}/{}", v.mount, v.path);
    if v.kv_version == 1 {
        return SecretState::Unknown {
            reason: "KvV1",
            message: format!("{path} is KV v1, which keeps no metadata to check"),
        };
    }
    match ctx.vault.secret_metadata(&v.mount, &v.path).await {
        Ok(Some(m)) if !m.gone => SecretState::Found {
            version: m.current_version,
            path,
        },
        Ok(Some(m)) => SecretState::NotFound(format!(
            "version {} of {path} is deleted or destroyed",
            m.current_version
        )),
        Ok(None) => SecretState::NotFound(format!("path {path} not found")),
        Err(e) => SecretState::Unknown {
            reason: e.reason(),
            message: e.to_string(),
        },
    }
}

async fn write_status(
    binding: &CredentialBinding,
    findings: &Findings,
    ctx: &Context,
) -> Result<()> {
    let key = key_of(binding);
    let previous = binding.status.as_ref();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = status_for(findings, binding.metadata.generation, previous, now);
    if previous.is_some_and(|p| same_status(p, &status)) {
        return Ok(());
    }
    let api = Api::<CredentialBinding>::namespaced(ctx.client.clone(), &key.namespace);
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(Error::kube(format!(
            "writing the status of CredentialBinding {}/{}",
            key.namespace, key.name
        )))?;
    let before = ready_of(previous);
    let after = ready_of(Some(&status));
    if before != after {
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == crate::status::READY);
        if let Some(c) = ready {
            let type_ = if c.status == "True" {
                EventType::Normal
            } else {
                EventType::Warning
            };
            publish(
                ctx,
                binding,
                type_,
                &c.reason,
                "Reconcile",
                c.message.clone(),
            )
            .await;
        }
    } else if let Some(c) = status
        .conditions
        .iter()
        .find(|c| c.type_ == crate::status::READY && c.status != "True")
    {
        // A different error under the same reason is an event too.
        publish(
            ctx,
            binding,
            EventType::Warning,
            &c.reason,
            "Reconcile",
            c.message.clone(),
        )
        .await;
    }
    info!(
        namespace = %key.namespace, binding = %key.name,
        ready = ?after.as_ref().map(|r| r.0.as_str()), reason = ?after.as_ref().map(|r| r.1.as_str()),
        "status updated"
    );
    Ok(())
}

pub(crate) async fn publish(
    ctx: &Context,
    binding: &CredentialBinding,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &binding.object_ref(&())).await {
        warn!("publishing an event failed: {e}");
    }
}
