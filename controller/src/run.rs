//! The binary's flags and its life: log in to Vault, win the lease, run
//! the controller and the sweep, and on SIGTERM stop, release the lease
//! and revoke the Vault token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use credbroker_crds::{ClusterCredentialPolicy, CredentialBinding};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, Health};
use crate::leader::{Elector, Fence, LeaseSettings};
use crate::metrics::Metrics;
use crate::reconcile::{Context, LoopSettings, error_policy, reconcile};
use crate::settings::GrantSettings;
use crate::vault::{Token, VaultAuth, VaultClient, VaultSettings};
use crate::{Error, Result};

fn duration(text: &str) -> std::result::Result<Duration, String> {
    credbroker_crds::duration::parse(text).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMethod {
    Kubernetes,
    Approle,
    Token,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// credbroker's controller: CredentialBindings, within ClusterCredentialPolicies,
/// become Vault policies, Kubernetes-auth roles and the sidecar's ConfigMaps.
#[derive(Debug, clap::Parser)]
#[command(name = "credbroker-controller", version, args_override_self = true)]
pub struct Args {
    /// This cluster's id. It is hashed into every Vault name, so clusters
    /// sharing one Vault never touch each other's policies and roles.
    #[arg(long, env = "CREDBROKER_CLUSTER_ID")]
    pub cluster_id: String,

    /// Print the Vault policy the controller itself needs (JSON, for
    /// `vault policy write`), for this cluster id, --kubernetes-auth-mount
    /// and each --kv-mount, and exit.
    #[arg(long)]
    pub print_vault_policy: bool,
    /// A KV v2 mount whose metadata the controller reads (with
    /// --print-vault-policy; repeat for several).
    #[arg(long = "kv-mount", default_value = "secret")]
    pub kv_mounts: Vec<String>,
    /// Remove the controller's finalizer from every CredentialBinding and
    /// exit: what the Helm chart's post-delete hook runs once the
    /// controller is gone. Touches no Vault object (their grants stay
    /// until a controller's sweep or an admin removes them).
    #[arg(long, conflicts_with = "print_vault_policy")]
    pub remove_finalizers: bool,
    /// Exit non-zero, naming them, if any CredentialBinding exists (Ok
    /// when the CRD is not installed): what the Helm chart's pre-delete
    /// hook runs, so an uninstall never leaves the bindings' Vault grants
    /// behind unless `uninstall.allowWithBindings` says so. Touches nothing.
    #[arg(long, conflicts_with_all = ["print_vault_policy", "remove_finalizers"])]
    pub check_no_bindings: bool,

    /// Vault's address, `https://host:port`.
    #[arg(
        long,
        env = "VAULT_ADDR",
        required_unless_present_any = ["print_vault_policy", "remove_finalizers", "check_no_bindings"]
    )]
    pub vault_addr: Option<String>,
    /// How the controller itself logs in to Vault.
    #[arg(long, value_enum, default_value = "kubernetes")]
    pub vault_auth: AuthMethod,
    /// The auth mount the controller logs in through (kubernetes or approle).
    #[arg(long)]
    pub vault_auth_mount: Option<String>,
    /// The Vault role the controller logs in with (Kubernetes auth).
    #[arg(long)]
    pub vault_role: Option<String>,
    /// The controller's own ServiceAccount token (Kubernetes auth), re-read
    /// at every login: a projected token whose audience is the one its
    /// Vault role requires (e.g. `vault`), not the API server's, so Vault
    /// never holds a token the API server would accept.
    #[arg(
        long,
        default_value = "/var/run/secrets/credbroker-controller/vault-token"
    )]
    pub vault_jwt_file: PathBuf,
    /// The AppRole role id.
    #[arg(long)]
    pub vault_role_id: Option<String>,
    /// A file holding the AppRole secret id.
    #[arg(long)]
    pub vault_secret_id_file: Option<PathBuf>,
    /// A file holding a Vault token (token auth, for development).
    #[arg(long)]
    pub vault_token_file: Option<PathBuf>,
    /// The Vault namespace (Enterprise / OpenBao).
    #[arg(long)]
    pub vault_namespace: Option<String>,
    /// PEM CA certificates to trust for Vault, added to the system roots.
    #[arg(long, env = "CREDBROKER_VAULT_CA_FILE")]
    pub vault_ca_file: Option<PathBuf>,
    /// Allow a cleartext `http://` Vault address. Development only.
    #[arg(long)]
    pub vault_allow_http: bool,
    /// The deadline of each Vault request.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub vault_timeout: Duration,

    /// The Kubernetes auth mount the sidecars' roles are written under.
    #[arg(long, default_value = "kubernetes")]
    pub kubernetes_auth_mount: String,
    /// The audience the sidecar's projected token must carry.
    #[arg(long, default_value = credbroker_crds::keys::DEFAULT_BROKER_AUDIENCE)]
    pub broker_audience: String,
    /// The TTL of a sidecar's Vault token.
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub token_ttl: Duration,
    /// The longest a sidecar's Vault token can be renewed to.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub token_max_ttl: Duration,

    /// How often a settled binding is checked again (Vault drift, secret versions).
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub resync_interval: Duration,
    /// How often orphaned credbroker-* policies, roles and ConfigMaps are swept.
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub sweep_interval: Duration,
    /// How long a deleted binding waits for Vault before its finalizer is
    /// removed anyway (the sweep finishes the job later).
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub cleanup_timeout: Duration,
    /// Bindings reconciled at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,

    /// Health and metrics: `/healthz`, `/readyz`, `/metrics`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,

    /// Elect a leader, so that only one replica writes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// The Lease object the replicas compete for.
    #[arg(long, default_value = "credbroker-controller")]
    pub lease_name: String,
    /// The lease's namespace (default: this pod's, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "credbroker-system")]
    pub lease_namespace: String,
    /// This replica's identity in the lease (default: POD_NAME, else host
    /// name, pid and a random suffix).
    #[arg(long, env = "POD_NAME")]
    pub lease_identity: Option<String>,
    /// How long a silent leader keeps the lease: a standby takes over this
    /// long after the leader's last renewal.
    #[arg(long, default_value = "15s", value_parser = duration)]
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops writing and exits.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub lease_renew_deadline: Duration,
    /// How often the leader renews and a standby tries to take over.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub lease_retry_period: Duration,

    /// Log lines as `text` or `json`; `RUST_LOG` filters (default info).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Logs to stderr, as text or JSON lines; `RUST_LOG` filters (default info).
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn vault_settings(args: &Args) -> Result<VaultSettings> {
    let auth = match args.vault_auth {
        AuthMethod::Kubernetes => VaultAuth::Kubernetes {
            mount: args
                .vault_auth_mount
                .clone()
                .unwrap_or_else(|| "kubernetes".into()),
            role: args.vault_role.clone().ok_or_else(|| {
                Error::config("--vault-role", "is required with --vault-auth kubernetes")
            })?,
            jwt_file: args.vault_jwt_file.clone(),
        },
        AuthMethod::Approle => VaultAuth::AppRole {
            mount: args
                .vault_auth_mount
                .clone()
                .unwrap_or_else(|| "approle".into()),
            role_id: args.vault_role_id.clone().ok_or_else(|| {
                Error::config("--vault-role-id", "is required with --vault-auth approle")
            })?,
            secret_id_file: args.vault_secret_id_file.clone().ok_or_else(|| {
                Error::config(
                    "--vault-secret-id-file",
                    "is required with --vault-auth approle",
                )
            })?,
        },
        AuthMethod::Token => {
            let token = match (
                &args.vault_token_file,
                std::env::var("CREDBROKER_VAULT_TOKEN"),
            ) {
                (Some(file), _) => std::fs::read_to_string(file).map_err(|e| {
                    Error::config(
                        format!("--vault-token-file {}", file.display()),
                        e.to_string(),
                    )
                })?,
                (None, Ok(token)) => token,
                (None, Err(_)) => {
                    return Err(Error::config(
                        "--vault-token-file",
                        "is required with --vault-auth token (or set CREDBROKER_VAULT_TOKEN)",
                    ));
                }
            };
            if token.trim().is_empty() {
                return Err(Error::config("the Vault token", "is empty"));
            }
            VaultAuth::Token(Token::new(token.trim().to_owned()))
        }
    };
    Ok(VaultSettings {
        addr: args.vault_addr.clone().unwrap_or_default(),
        auth,
        namespace: args.vault_namespace.clone(),
        ca_file: args.vault_ca_file.clone(),
        timeout: args.vault_timeout,
        allow_http: args.vault_allow_http,
    })
}

fn validate_args(args: &Args) -> Result<()> {
    let id = &args.cluster_id;
    if id.is_empty()
        || id.len() > 63
        || !id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
    {
        return Err(Error::config(
            "--cluster-id",
            format!("{id:?} must be 1-63 letters, digits, '-', '_' or '.'"),
        ));
    }
    if args.token_ttl.is_zero() || args.token_max_ttl < args.token_ttl {
        return Err(Error::config(
            "--token-max-ttl",
            "must be at least --token-ttl, which must not be zero",
        ));
    }
    for (flag, value) in [
        (
            "--kubernetes-auth-mount",
            args.kubernetes_auth_mount.as_str(),
        ),
        (
            "--vault-auth-mount",
            args.vault_auth_mount.as_deref().unwrap_or("kubernetes"),
        ),
    ] {
        if value.is_empty()
            || !value.split('/').all(|s| {
                !s.is_empty()
                    && s.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c))
            })
        {
            return Err(Error::config(
                flag,
                format!("{value:?} is not an auth mount path"),
            ));
        }
    }
    for (flag, value) in [
        ("--resync-interval", args.resync_interval),
        ("--sweep-interval", args.sweep_interval),
        ("--vault-timeout", args.vault_timeout),
    ] {
        if value < Duration::from_secs(1) {
            return Err(Error::config(flag, "must be at least 1s"));
        }
    }
    if args.concurrency == 0 {
        return Err(Error::config("--concurrency", "must be at least 1"));
    }
    if args.broker_audience.is_empty() {
        return Err(Error::config("--broker-audience", "must not be empty"));
    }
    Ok(())
}

/// Runs until SIGTERM or SIGINT (Ok) or until leadership is lost or the
/// controller cannot start (Err).
pub async fn run(args: Args) -> Result<()> {
    validate_args(&args)?;
    if args.print_vault_policy {
        for mount in &args.kv_mounts {
            credbroker_crds::validate::vault_mount("--kv-mount", mount)?;
        }
        #[allow(clippy::print_stdout)]
        {
            println!(
                "{}",
                crate::desired::controller_policy(
                    &args.cluster_id,
                    &args.kubernetes_auth_mount,
                    &args.kv_mounts
                )
            );
        }
        return Ok(());
    }
    if args.remove_finalizers {
        let client = kube::Client::try_default().await.map_err(|e| {
            Error::config(
                "the Kubernetes client (in-cluster config or KUBECONFIG)",
                e.to_string(),
            )
        })?;
        crate::uninstall::remove_finalizers(client).await?;
        return Ok(());
    }
    if args.check_no_bindings {
        let client = kube::Client::try_default().await.map_err(|e| {
            Error::config(
                "the Kubernetes client (in-cluster config or KUBECONFIG)",
                e.to_string(),
            )
        })?;
        return crate::uninstall::check_no_bindings(client).await;
    }
    info!(
        cluster_id = %args.cluster_id,
        prefix = %crate::names::cluster_prefix(&args.cluster_id),
        "Vault policy and role names of this cluster start with the prefix"
    );
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|e| Error::config(format!("--admin-addr {}", args.admin_addr), e.to_string()))?;
    info!(addr = %args.admin_addr, "serving /healthz, /readyz and /metrics");
    tokio::spawn(admin::serve(
        listener,
        health.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let fence = if args.leader_elect {
        Fence::elected()
    } else {
        Fence::unfenced()
    };
    let vault = Arc::new(VaultClient::new(
        vault_settings(&args)?,
        fence.clone(),
        metrics.clone(),
    )?);
    // A bad setup fails now, with the reason; Vault being away does not:
    // the controller starts, and every binding reports VaultUnavailable
    // until it is back (so deletions can still give up in bounded time).
    match vault.login().await {
        Ok(()) => info!(addr = %vault.addr(), "logged in to Vault"),
        Err(e @ crate::VaultError::Credentials { .. }) => return Err(e.into()),
        Err(e) => warn!(
            reason = e.reason(),
            "Vault login failed; retrying as bindings reconcile: {e}"
        ),
    }

    let client = kube::Client::try_default().await.map_err(|e| {
        Error::config(
            "the Kubernetes client (in-cluster config or KUBECONFIG)",
            e.to_string(),
        )
    })?;
    let identity = args.lease_identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        format!("{}-{}-{nanos:08x}", host.trim(), std::process::id())
    });
    health.set_ready(true);

    let mut elector = None;
    if args.leader_elect {
        let mut e = Elector::new(
            client.clone(),
            LeaseSettings {
                namespace: args.lease_namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                lease_duration: args.lease_duration,
                renew_deadline: args.lease_renew_deadline,
                retry_period: args.lease_retry_period,
            },
            fence.clone(),
        )?;
        info!(lease = %args.lease_name, namespace = %args.lease_namespace, %identity, "waiting to become the leader");
        if !e.acquire(&shutdown).await {
            vault.revoke().await;
            return Ok(());
        }
        elector = Some(e);
    }
    metrics.set_leader(true);

    let work = CancellationToken::new();
    let fence_for_shutdown = fence.clone();
    let mut controller = tokio::spawn(run_controller(
        client.clone(),
        vault.clone(),
        &args,
        metrics.clone(),
        identity,
        fence,
        work.clone(),
    )?);
    let lost = tokio::select! {
        lost = async {
            match elector.as_mut() {
                Some(e) => e.hold(&shutdown).await,
                None => { shutdown.cancelled().await; None }
            }
        } => lost,
        _ = &mut controller => Some("the controller loop ended on its own".to_owned()),
    };
    metrics.set_leader(false);
    if let Some(reason) = lost {
        // No drain: in-flight writes of a replica that may no longer lead
        // are cut off now (the fence refuses the rest). The writes are
        // idempotent, so the next leader finishes whatever this left.
        controller.abort();
        error!("lost the leader lease ({reason}); exiting so that no two replicas write");
        vault.revoke().await;
        return Err(Error::LeadershipLost(reason));
    }
    // SIGTERM: let running reconciles finish while the lease surely holds,
    // then release it, so a standby takes over at once.
    work.cancel();
    let drain = args
        .lease_duration
        .saturating_sub(args.lease_renew_deadline)
        .max(Duration::from_secs(1));
    let drained = tokio::time::timeout(drain, &mut controller).await.is_ok();
    if !drained {
        // Requests already sent may still land: close the fence and let the
        // lease run out rather than hand it over while they might.
        fence_for_shutdown.close();
        controller.abort();
        warn!("reconciles still running at shutdown were cut off; the lease is left to expire");
    } else if let Some(e) = elector.as_mut()
        && tokio::time::timeout(args.lease_renew_deadline, e.release())
            .await
            .is_err()
    {
        warn!("releasing the lease timed out; it will expire");
    }
    vault.revoke().await;
    info!("stopped");
    Ok(())
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            error!("cannot listen for SIGTERM; stop with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("shutting down");
        shutdown.cancel();
    });
}

/// The controller and the sweep, until `work` is cancelled.
fn run_controller(
    client: kube::Client,
    vault: Arc<VaultClient>,
    args: &Args,
    metrics: Arc<Metrics>,
    identity: String,
    fence: Arc<Fence>,
    work: CancellationToken,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let grants = GrantSettings {
        cluster_id: args.cluster_id.clone(),
        auth_mount: args.kubernetes_auth_mount.clone(),
        audience: args.broker_audience.clone(),
        token_ttl: args.token_ttl,
        token_max_ttl: args.token_max_ttl,
    };
    let loop_settings = LoopSettings {
        resync: args.resync_interval,
        cleanup_timeout: args.cleanup_timeout,
        min_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(60),
    };
    let sweep_interval = args.sweep_interval;
    let concurrency = args.concurrency;
    Ok(async move {
        let bindings = Api::<CredentialBinding>::all(client.clone());
        let configmaps = Api::<ConfigMap>::all(client.clone());
        let namespaces = Api::<Namespace>::all(client.clone());
        let (policies, policy_writer) = reflector::store::<ClusterCredentialPolicy>();
        let policy_events = reflector::reflector(
            policy_writer,
            watcher(
                Api::<ClusterCredentialPolicy>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .filter_map(|event| async move {
            match event {
                // A relist (InitDone) counts too: a policy deleted while the
                // watch was down shows up only as its absence.
                Ok(
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
                ) => Some(()),
                Ok(_) => None,
                Err(e) => {
                    warn!("watching ClusterCredentialPolicies: {e}");
                    None
                }
            }
        });
        let (requeue, requeued) = futures::channel::mpsc::unbounded();
        let controller = Controller::new(bindings, watcher::Config::default())
            .owns(
                configmaps,
                watcher::Config::default().labels(&format!(
                    "app.kubernetes.io/managed-by={}",
                    credbroker_crds::keys::MANAGED_BY
                )),
            )
            .with_config(kube::runtime::controller::Config::default().concurrency(concurrency));
        let store = controller.store();
        let namespace_store = store.clone();
        // A namespace's labels decide which policies select it: a change
        // re-evaluates that namespace's bindings.
        let controller = controller
            .watches(
                namespaces,
                watcher::Config::default(),
                move |ns: Namespace| {
                    let name = ns.metadata.name.clone().unwrap_or_default();
                    namespace_store
                        .state()
                        .into_iter()
                        .filter(|b| b.metadata.namespace.as_deref() == Some(name.as_str()))
                        .map(|b| ObjectRef::from_obj(b.as_ref()))
                        .collect::<Vec<_>>()
                },
            )
            // Any policy change re-evaluates every binding; compare-before-
            // write keeps that cheap.
            .reconcile_all_on(policy_events)
            .reconcile_on(requeued)
            .graceful_shutdown_on({
                let work = work.clone();
                async move { work.cancelled().await }
            });
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "credbroker-controller".into(),
                instance: Some(identity),
            },
        );
        let ctx = Arc::new(Context::new(
            client,
            vault,
            grants,
            loop_settings,
            metrics,
            recorder,
            store.clone(),
            policies.clone(),
            fence,
            requeue,
        ));
        // A cache that never fills (RBAC, a missing CRD) would leave every
        // reconcile waiting in silence: say so, every 30 s, until it fills.
        let watchdog = {
            let ctx = ctx.clone();
            let work = work.clone();
            async move {
                for waited in 0u64.. {
                    if ctx.caches_ready() {
                        info!("watch caches filled; reconciling");
                        return;
                    }
                    if waited > 0 && waited % 30 == 0 {
                        warn!(
                            waited_seconds = waited,
                            "the CredentialBinding or ClusterCredentialPolicy watch has not listed yet: check the CRDs and the controller's RBAC"
                        );
                    }
                    tokio::select! {
                        _ = work.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        // Not a task of its own: aborting the controller stops it too.
        let sweeper = async {
            loop {
                match crate::sweep::sweep(&ctx).await {
                    Ok(swept) => {
                        ctx.metrics.sweep_done(true);
                        if swept != Default::default() {
                            info!(?swept, "sweep done");
                        }
                    }
                    Err(e) => {
                        ctx.metrics.sweep_done(false);
                        warn!(reason = e.reason(), "sweep failed: {e}");
                    }
                }
                tokio::select! {
                    _ = work.cancelled() => return,
                    _ = tokio::time::sleep(sweep_interval) => {}
                }
            }
        };
        let controller = controller
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|_| async {});
        futures::future::join3(controller, sweeper, watchdog).await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn args(extra: &[&str]) -> Result<Args, String> {
        let base = [
            "credbroker-controller",
            "--cluster-id",
            "prod",
            "--vault-addr",
            "https://vault:8200",
        ];
        Args::try_parse_from(base.iter().chain(extra)).map_err(|e| e.to_string())
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        assert!(validate_args(&args(&[]).unwrap()).is_ok());
        for (extra, flag) in [
            (&["--cluster-id", "has space"][..], "--cluster-id"),
            (
                &["--token-ttl", "2h", "--token-max-ttl", "1h"][..],
                "--token-max-ttl",
            ),
            (
                &["--kubernetes-auth-mount", "a/../b c"][..],
                "--kubernetes-auth-mount",
            ),
            (&["--resync-interval", "0s"][..], "--resync-interval"),
            (&["--concurrency", "0"][..], "--concurrency"),
            (&["--broker-audience", ""][..], "--broker-audience"),
        ] {
            let e = validate_args(&args(extra).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(flag), "{extra:?}: {e}");
        }
        // A later flag wins over an earlier one (tests and wrappers rely on it).
        let a = args(&["--resync-interval", "1s", "--resync-interval", "2s"]).unwrap();
        assert_eq!(a.resync_interval, Duration::from_secs(2));
        // Kubernetes auth needs a role; the error says which flag.
        let e = vault_settings(&args(&[]).unwrap())
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.starts_with("--vault-role")));
        assert!(args(&["--vault-timeout", "soon"]).is_err());
    }
}
