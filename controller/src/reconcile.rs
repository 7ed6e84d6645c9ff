//! The reconcile loop: for one binding, recompute its service account's
//! grant from every binding of that account, make Vault and the ConfigMap
//! match it, and write the binding's status.
//!
//! read (stores, the namespace, CA ConfigMaps) → validate and build the
//! desired state ([`crate::desired`], pure) → apply (compare, then write) →
//! status ([`crate::status`], pure). Writes to one account are serialised,
//! so two bindings of one service account never race on its policy, and
//! the sweep waits for in-flight applies (and they for it).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credbroker_crds::keys::bindings_configmap_name;
use credbroker_crds::{ClusterCredentialPolicy, CredentialBinding};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::desired::{
    Account, AccountKey, BindingKey, Desired, Inputs, Verdict, configmap_is_current,
    desired_configmap, desired_state, key_of,
};
use crate::leader::Fence;
use crate::metrics::Metrics;
use crate::names::vault_name;
use crate::settings::GrantSettings;
use crate::status::{Findings, SecretState, Sync, event_for, same_status, status_for};
use crate::vault::VaultClient;
use crate::{Error, Result, VaultError};

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
    pub fence: Arc<Fence>,
    /// Bindings whose verdict another binding's reconcile changed (a
    /// conflict resolved, a sibling deleted): reconciled next.
    pub requeue: futures::channel::mpsc::UnboundedSender<ObjectRef<CredentialBinding>>,
    /// Held (shared) by every apply, and (exclusively) by the sweep while
    /// it decides and deletes.
    pub(crate) sweep_gate: tokio::sync::RwLock<()>,
    account_locks: Mutex<HashMap<AccountKey, Arc<tokio::sync::Mutex<()>>>>,
    failures: Mutex<HashMap<BindingKey, u32>>,
    /// Per account, a hash of the grant Vault last confirmed and when, so
    /// the siblings of one account do not each re-read the same policy and
    /// role. Drift is still caught within half a resync interval.
    confirmed: Mutex<HashMap<AccountKey, (u64, Instant)>>,
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
        fence: Arc<Fence>,
        requeue: futures::channel::mpsc::UnboundedSender<ObjectRef<CredentialBinding>>,
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
            fence,
            requeue,
            sweep_gate: tokio::sync::RwLock::new(()),
            account_locks: Mutex::default(),
            failures: Mutex::default(),
            confirmed: Mutex::default(),
        }
    }

    /// Whether the binding and policy caches hold a full list. Until they
    /// do, an account's other bindings, or the policy allowing them, may be
    /// missing, and acting then would withdraw live grants.
    pub(crate) fn caches_ready(&self) -> bool {
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

    fn is_confirmed(&self, key: &AccountKey, hash: u64) -> bool {
        let confirmed = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        confirmed
            .get(key)
            .is_some_and(|(h, at)| *h == hash && at.elapsed() < self.loop_settings.resync / 2)
    }

    fn confirm(&self, key: &AccountKey, hash: Option<u64>) {
        let mut confirmed = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        match hash {
            Some(h) => confirmed.insert(key.clone(), (h, Instant::now())),
            None => confirmed.remove(key),
        };
    }

    /// Forgets every confirmation (the sweep deleted something).
    pub(crate) fn forget_confirmations(&self) {
        self.confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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
        let left = ctx
            .loop_settings
            .cleanup_timeout
            .saturating_sub(since(deleted));
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
    vault_error: Option<VaultError>,
    /// Whether Vault was written.
    wrote: bool,
}

fn account_of(binding: &CredentialBinding) -> AccountKey {
    AccountKey {
        namespace: binding.metadata.namespace.clone().unwrap_or_default(),
        service_account: binding.spec.service_account_name.clone(),
    }
}

/// The account the grant was last made for, if it is not the current one
/// (`spec.serviceAccountName` changed): its grant must lose this binding.
fn previous_account(binding: &CredentialBinding) -> Option<AccountKey> {
    let previous = binding.status.as_ref()?.granted_service_account.clone()?;
    (previous != binding.spec.service_account_name).then(|| AccountKey {
        namespace: binding.metadata.namespace.clone().unwrap_or_default(),
        service_account: previous,
    })
}

async fn apply(given: &CredentialBinding, ctx: &Context) -> Result<Action> {
    let key = key_of(given);
    if !ctx.caches_ready() {
        return Ok(Action::requeue(CACHE_WAIT));
    }
    let account_key = account_of(given);
    if let Some(previous) = previous_account(given) {
        // Moved to another service account: the old one's grant drops it.
        reapply_account(&previous, Some(&key), ctx).await?;
    }
    let lock = ctx.account_lock(&account_key);
    let _guard = lock.lock().await;
    // The store's copy is at least as new as the one handed in, which may
    // have waited for the lock.
    let binding = newest(given, ctx);
    let binding = binding.as_ref();

    let desired = read_and_build(&account_key, ctx, None).await?;
    let verdict = desired
        .verdicts
        .get(&key)
        .cloned()
        .unwrap_or(Verdict::Invalid("the binding was not evaluated".into()));
    let account = desired.accounts.get(&account_key);
    let applied = apply_account(&account_key, account, ctx).await?;
    requeue_changed_siblings(&desired, &key, ctx);

    let effective = verdict == Verdict::Effective;
    let secret = match &applied.vault_error {
        // Vault is down: asking it again would only wait out another timeout.
        Some(e @ VaultError::Unavailable { .. }) => SecretState::Unknown {
            reason: e.reason(),
            message: e.to_string(),
        },
        _ if effective => secret_state(binding, ctx).await,
        _ => SecretState::Unknown {
            reason: "NotChecked",
            message: "not checked: the binding is not allowed".into(),
        },
    };
    let vault_down = applied.vault_error.is_some()
        || matches!(&secret, SecretState::Unknown { reason, .. } if *reason == "VaultUnavailable");
    let findings = Findings {
        verdict,
        policy: applied.policy,
        role: applied.role,
        secret,
        vault_policy: account.filter(|_| effective).map(|a| a.vault_name.clone()),
        service_account: account
            .filter(|_| effective)
            .map(|a| a.key.service_account.clone()),
    };
    if applied.wrote && effective {
        let name = findings.vault_policy.clone().unwrap_or_default();
        publish(
            ctx,
            binding,
            EventType::Normal,
            "VaultGrantUpdated",
            "Apply",
            format!("Vault policy and role {name} now grant this service account's bindings"),
        )
        .await;
    }
    write_status(binding, &findings, ctx).await?;
    if let Some(e) = applied.vault_error {
        return Err(e.into());
    }
    if vault_down {
        return Ok(Action::requeue(ctx.backoff(&key)));
    }
    ctx.succeeded(&key);
    Ok(Action::requeue(ctx.loop_settings.resync))
}

/// The store's copy of `given` if it is newer (by resourceVersion, which the
/// API server only ever moves forward for one object).
fn newest(given: &CredentialBinding, ctx: &Context) -> Arc<CredentialBinding> {
    let stored = ctx.bindings.get(&ObjectRef::from_obj(given));
    match stored {
        Some(s)
            if s.metadata.uid == given.metadata.uid
                && (s.metadata.generation, rv(&s)) > (given.metadata.generation, rv(given)) =>
        {
            s
        }
        _ => Arc::new(given.clone()),
    }
}

fn rv(b: &CredentialBinding) -> u64 {
    b.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Rebuilds and applies another account's grant (under its lock),
/// leaving `without` out.
async fn reapply_account(
    account: &AccountKey,
    without: Option<&BindingKey>,
    ctx: &Context,
) -> Result<()> {
    let lock = ctx.account_lock(account);
    let _guard = lock.lock().await;
    let desired = read_and_build(account, ctx, without).await?;
    let applied = apply_account(account, desired.accounts.get(account), ctx).await?;
    if let Some(without) = without {
        requeue_changed_siblings(&desired, without, ctx);
    }
    match applied.vault_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Asks for a reconcile of every other binding of the account whose
/// verdict no longer matches what its status says, so a resolved conflict
/// or a deleted sibling shows at once, not at the next resync.
fn requeue_changed_siblings(desired: &Desired, this: &BindingKey, ctx: &Context) {
    for (key, verdict) in &desired.verdicts {
        if key == this {
            continue;
        }
        let Some(sibling) = ctx
            .bindings
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
        else {
            continue;
        };
        let shown = sibling
            .status
            .as_ref()
            .and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == crate::status::POLICY_ALLOWED)
            })
            .map(|c| c.reason.as_str());
        if shown != Some(crate::status::verdict_reason(verdict)) {
            let _ = ctx
                .requeue
                .unbounded_send(ObjectRef::from_obj(sibling.as_ref()));
        }
    }
}

/// On deletion: the account's grant without this binding, or none. If
/// Vault stays away past the cleanup timeout, the finalizer is removed
/// anyway (a namespace deletion must not hang on Vault) and the sweep
/// deletes what is left once Vault is back.
async fn cleanup(binding: &CredentialBinding, ctx: &Context) -> Result<Action> {
    let key = key_of(binding);
    let waited = binding
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(since)
        .unwrap_or_default();
    let result = async {
        if !ctx.caches_ready() {
            return Err(Error::CachesNotReady);
        }
        reapply_account(&account_of(binding), Some(&key), ctx).await?;
        if let Some(previous) = previous_account(binding) {
            reapply_account(&previous, Some(&key), ctx).await?;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            info!(namespace = %key.namespace, binding = %key.name, "binding deleted; its grant is withdrawn");
        }
        Err(e) if waited < ctx.loop_settings.cleanup_timeout => {
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
        Err(e) => {
            let account = account_of(binding);
            let name = vault_name(
                &ctx.grants.cluster_id,
                &account.namespace,
                &account.service_account,
            );
            let note = format!(
                "gave up updating the grant after {waited:?} ({e}); the sweep will update or delete policy and role {name} later"
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
        }
    }
    ctx.succeeded(&key);
    Ok(Action::await_change())
}

/// Reads what an account's grant depends on and builds it. `without`
/// names a binding to leave out (it is being deleted, or moved away).
async fn read_and_build(
    account: &AccountKey,
    ctx: &Context,
    without: Option<&BindingKey>,
) -> Result<Desired> {
    let members: Vec<Arc<CredentialBinding>> = ctx.bindings.state_filter(|b| {
        b.metadata.namespace.as_deref() == Some(account.namespace.as_str())
            && b.spec.service_account_name == account.service_account
            && Some(&key_of(b)) != without
    });
    let policies: Vec<ClusterCredentialPolicy> =
        ctx.policies.state().iter().map(|p| (**p).clone()).collect();
    let namespace = Api::<Namespace>::all(ctx.client.clone())
        .get_metadata_opt(&account.namespace)
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
    let _gate = ctx.sweep_gate.read().await;
    let mount = &ctx.grants.auth_mount;
    let name = vault_name(&ctx.grants.cluster_id, &key.namespace, &key.service_account);
    let Some(account) = account else {
        // Withdraw: the role first (no new logins), then the policy (tokens
        // already issued lose its paths at once), then the ConfigMap.
        ctx.confirm(key, None);
        let vault = withdraw(&name, mount, ctx).await;
        delete_configmap(
            &key.namespace,
            &bindings_configmap_name(&key.service_account),
            ctx,
        )
        .await?;
        return Ok(match vault {
            Ok(wrote) => Applied {
                policy: Sync::NotGranted,
                role: Sync::NotGranted,
                vault_error: None,
                wrote,
            },
            Err(e) => Applied {
                policy: failed(&e),
                role: failed(&e),
                vault_error: Some(e),
                wrote: false,
            },
        });
    };
    let hash = grant_hash(account);
    let confirmed = ctx.is_confirmed(key, hash);
    let (policy, role, wrote) = if confirmed {
        (Ok(false), Ok(false), false)
    } else {
        // The policy before the role, and no role while the policy is
        // wrong: a role must never hand out a policy that grants more, or
        // other, than the bindings now say.
        let policy = sync_policy(account, ctx).await;
        let role = match &policy {
            Err(e) => Err(e.clone()),
            Ok(_) => sync_role(account, mount, ctx).await,
        };
        let wrote = matches!(policy, Ok(true)) || matches!(role, Ok(true));
        (policy, role, wrote)
    };
    apply_configmap(account, ctx).await?;
    let vault_error = policy.as_ref().err().or(role.as_ref().err()).cloned();
    // Only a real read of Vault confirms: a skip must not extend itself.
    if !confirmed {
        ctx.confirm(key, vault_error.is_none().then_some(hash));
    }
    let synced = |r: std::result::Result<bool, VaultError>| {
        r.map_or_else(|e| failed(&e), |_| Sync::Synced(account.vault_name.clone()))
    };
    Ok(Applied {
        policy: synced(policy),
        role: synced(role),
        vault_error,
        wrote,
    })
}

fn grant_hash(account: &Account) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    account.policy.hash(&mut h);
    serde_json::to_string(&account.role)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

fn failed(e: &VaultError) -> Sync {
    Sync::Failed {
        reason: e.reason(),
        message: e.to_string(),
    }
}

/// Writes the policy if Vault's differs; `true` if it wrote.
async fn sync_policy(account: &Account, ctx: &Context) -> Result<bool, VaultError> {
    let current = ctx.vault.read_policy(&account.vault_name).await?;
    if current.as_deref() == Some(account.policy.as_str()) {
        return Ok(false);
    }
    ctx.vault
        .write_policy(&account.vault_name, &account.policy)
        .await?;
    info!(policy = %account.vault_name, "Vault policy written");
    Ok(true)
}

/// Writes the role if Vault's differs; `true` if it wrote.
async fn sync_role(account: &Account, mount: &str, ctx: &Context) -> Result<bool, VaultError> {
    let current = ctx.vault.read_role(mount, &account.vault_name).await?;
    if current.flatten().as_ref() == Some(&account.role) {
        return Ok(false);
    }
    ctx.vault
        .write_role(mount, &account.vault_name, &account.role)
        .await?;
    info!(role = %account.vault_name, mount, "Kubernetes-auth role written");
    Ok(true)
}

/// Deletes the role and the policy named `name`, if they exist; `true` if
/// it deleted anything.
pub(crate) async fn withdraw(name: &str, mount: &str, ctx: &Context) -> Result<bool, VaultError> {
    let mut wrote = false;
    if ctx.vault.read_role(mount, name).await?.is_some() {
        ctx.vault.delete_role(mount, name).await?;
        info!(role = %name, mount, "Kubernetes-auth role deleted");
        wrote = true;
    }
    if ctx.vault.read_policy(name).await?.is_some() {
        ctx.vault.delete_policy(name).await?;
        info!(policy = %name, "Vault policy deleted");
        wrote = true;
    }
    Ok(wrote)
}

async fn apply_configmap(account: &Account, ctx: &Context) -> Result<()> {
    let ns = &account.key.namespace;
    let name = &account.configmap_name;
    let desired = desired_configmap(account)
        .ok_or_else(|| Error::config("the bindings ConfigMap", "could not be encoded"))?;
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns);
    let current = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("reading ConfigMap {ns}/{name}")))?;
    if current.is_some_and(|c| configmap_is_current(&c, &desired)) {
        return Ok(());
    }
    let doing = format!("applying ConfigMap {ns}/{name}");
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&desired);
    fenced(ctx, &doing, api.patch(name, &params, &patch))
        .await?
        .map_err(Error::kube(doing))?;
    info!(namespace = %ns, configmap = %name, "bindings ConfigMap written");
    Ok(())
}

pub(crate) async fn delete_configmap(ns: &str, name: &str, ctx: &Context) -> Result<()> {
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns);
    // Read first: a withdrawal of what never existed writes nothing.
    let exists = api
        .get_metadata_opt(name)
        .await
        .map_err(Error::kube(format!("reading ConfigMap {ns}/{name}")))?
        .is_some();
    if !exists {
        return Ok(());
    }
    let doing = format!("deleting ConfigMap {ns}/{name}");
    match fenced(ctx, &doing, api.delete(name, &DeleteParams::default())).await? {
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
        Err(e @ VaultError::Refused { status: 403, .. }) => SecretState::Unknown {
            reason: e.reason(),
            message: format!(
                "the controller may not read {}/metadata/{}: add --kv-mount {} to its --print-vault-policy ({e})",
                v.mount, v.path, v.mount
            ),
        },
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

    // A merge patch leaves out what is absent: the fields this status no
    // longer has are cleared with an explicit null (a withdrawn grant must
    // not keep showing its policy name or an old secret version).
    let mut value = serde_json::to_value(&status)
        .map_err(|e| Error::config("the binding status", e.to_string()))?;
    if let Some(fields) = value.as_object_mut() {
        for field in [
            "observedGeneration",
            "secretVersion",
            "vaultPolicy",
            "vaultRole",
            "grantedServiceAccount",
        ] {
            fields.entry(field).or_insert(serde_json::Value::Null);
        }
    }
    let api = Api::<CredentialBinding>::namespaced(ctx.client.clone(), &key.namespace);
    let patch = serde_json::json!({ "status": value });
    let doing = format!(
        "writing the status of CredentialBinding {}/{}",
        key.namespace, key.name
    );
    fenced(
        ctx,
        &doing,
        api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await?
    .map_err(Error::kube(doing))?;
    if let Some((ready, reason, message)) = event_for(previous, &status) {
        let type_ = if ready {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(ctx, binding, type_, &reason, "Reconcile", message).await;
    }
    info!(
        namespace = %key.namespace, binding = %key.name,
        ready = ?crate::status::ready_of(Some(&status)).map(|r| r.0),
        "status updated"
    );
    Ok(())
}

/// Runs a Kubernetes write only while this replica surely leads, and no
/// longer than it surely will (kube's client has no deadline of its own).
async fn fenced<T>(
    ctx: &Context,
    doing: &str,
    write: impl std::future::Future<Output = T>,
) -> Result<T> {
    match ctx.fence.check(doing)? {
        None => Ok(write.await),
        Some(left) => tokio::time::timeout(left, write)
            .await
            .map_err(|_| Error::WriteDeadline {
                doing: doing.to_owned(),
            }),
    }
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
