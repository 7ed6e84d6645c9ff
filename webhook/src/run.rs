//! Starting and stopping the webhook: check the flags, connect to the API
//! server, load the serving certificate (mounted, or self-managed through
//! a Secret), watch the CredentialBindings, then serve admission on HTTPS
//! and probes and metrics on plain HTTP until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use credbroker_controller::admin::{self, Health};
use credbroker_controller::leader::LeaseSettings;
pub use credbroker_controller::run::{LogFormat, init_logging};
use k8s_openapi::api::core::v1::ResourceRequirements;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bindings::BindingsCache;
use crate::certs::{self, ProvidedFiles, SelfManaged, ServingCert};
use crate::metrics::Metrics;
use crate::serve::{self, Admitter};
use crate::settings::{InjectSettings, SidecarVault, resource_list};
use crate::{Error, Result};

fn duration(text: &str) -> std::result::Result<Duration, String> {
    credbroker_crds::duration::parse(text).map_err(|e| e.to_string())
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertMode {
    /// A mounted tls.crt / tls.key (cert-manager), reloaded when it changes.
    Provided,
    /// A CA and serving certificate the webhook makes, keeps in a Secret,
    /// publishes in the MutatingWebhookConfiguration and rotates.
    SelfManaged,
}

/// credbroker's mutating admission webhook: injects the broker into
/// opted-in pods and refuses pods that could bypass it.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "credbroker-webhook", version, args_override_self = true)]
pub struct Args {
    /// Where AdmissionReviews arrive (HTTPS).
    #[arg(long, env = "CREDBROKER_LISTEN", default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,
    /// /healthz, /readyz and /metrics (plain HTTP; nothing secret).
    #[arg(long, env = "CREDBROKER_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    #[arg(long, env = "CREDBROKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// The broker's own namespace (never injected; the Secret and Lease live there).
    #[arg(long, env = "CREDBROKER_NAMESPACE")]
    pub namespace: String,
    /// The sidecar image (no shell).
    #[arg(long, env = "CREDBROKER_SIDECAR_IMAGE")]
    pub sidecar_image: String,
    /// The init image (the only one with iptables).
    #[arg(long, env = "CREDBROKER_INIT_IMAGE")]
    pub init_image: String,
    #[arg(long, env = "CREDBROKER_IMAGE_PULL_POLICY")]
    pub image_pull_policy: Option<String>,
    /// The sidecar's UID: the only one whose traffic is not captured.
    #[arg(long, env = "CREDBROKER_PROXY_UID", default_value_t = 15017)]
    pub proxy_uid: i64,
    #[arg(long, env = "CREDBROKER_PROXY_GID", default_value_t = 15017)]
    pub proxy_gid: i64,
    #[arg(long, env = "CREDBROKER_PROXY_PORT", default_value_t = 15101)]
    pub proxy_port: u16,
    /// The sidecar's health port (its startupProbe).
    #[arg(long, env = "CREDBROKER_SIDECAR_ADMIN_PORT", default_value_t = 15121)]
    pub sidecar_admin_port: u16,
    /// Outbound ports never captured (comma-separated or repeated).
    #[arg(
        long = "exclude-port",
        env = "CREDBROKER_EXCLUDE_PORTS",
        value_delimiter = ','
    )]
    pub exclude_ports: Vec<u16>,
    /// Outbound CIDRs never captured.
    #[arg(
        long = "exclude-cidr",
        env = "CREDBROKER_EXCLUDE_CIDRS",
        value_delimiter = ','
    )]
    pub exclude_cidrs: Vec<String>,
    /// The audience of the sidecar's token; the Vault role requires it.
    #[arg(long, env = "CREDBROKER_AUDIENCE", default_value = credbroker_crds::keys::DEFAULT_BROKER_AUDIENCE)]
    pub audience: String,
    #[arg(
        long,
        env = "CREDBROKER_TOKEN_EXPIRATION_SECONDS",
        default_value_t = 3600
    )]
    pub token_expiration_seconds: i64,
    /// Vault's address, as the sidecar reaches it (https://).
    #[arg(long, env = "CREDBROKER_VAULT_ADDR")]
    pub vault_addr: String,
    #[arg(
        long,
        env = "CREDBROKER_VAULT_AUTH_MOUNT",
        default_value = "kubernetes"
    )]
    pub vault_auth_mount: String,
    #[arg(long, env = "CREDBROKER_VAULT_NAMESPACE")]
    pub vault_namespace: Option<String>,
    /// Vault's CA (PEM), handed to every sidecar.
    #[arg(long, env = "CREDBROKER_VAULT_CA_FILE")]
    pub vault_ca_file: Option<PathBuf>,
    /// The sidecar's requests, e.g. `cpu=50m,memory=32Mi`.
    #[arg(
        long,
        env = "CREDBROKER_SIDECAR_REQUESTS",
        default_value = "cpu=50m,memory=32Mi"
    )]
    pub sidecar_requests: String,
    /// The sidecar's limits, e.g. `memory=128Mi`.
    #[arg(
        long,
        env = "CREDBROKER_SIDECAR_LIMITS",
        default_value = "memory=128Mi"
    )]
    pub sidecar_limits: String,

    #[arg(long, env = "CREDBROKER_CERT_MODE", value_enum)]
    pub cert_mode: CertMode,
    /// provided: the certificate chain (PEM).
    #[arg(
        long,
        env = "CREDBROKER_TLS_CERT_FILE",
        default_value = "/etc/credbroker/tls/tls.crt"
    )]
    pub tls_cert_file: PathBuf,
    /// provided: its key (PEM).
    #[arg(
        long,
        env = "CREDBROKER_TLS_KEY_FILE",
        default_value = "/etc/credbroker/tls/tls.key"
    )]
    pub tls_key_file: PathBuf,
    #[arg(long, env = "CREDBROKER_CERT_RELOAD_INTERVAL", value_parser = duration, default_value = "10s")]
    pub cert_reload_interval: Duration,
    /// self-managed: the Secret holding the CA and serving certificate.
    #[arg(
        long,
        env = "CREDBROKER_TLS_SECRET",
        default_value = "credbroker-webhook-tls"
    )]
    pub tls_secret: String,
    /// self-managed: the MutatingWebhookConfiguration whose caBundle is kept current.
    #[arg(
        long,
        env = "CREDBROKER_WEBHOOK_CONFIGURATION",
        default_value = "credbroker-webhook"
    )]
    pub webhook_configuration: String,
    /// self-managed: the Service the API server calls (its DNS names go in the certificate).
    #[arg(
        long,
        env = "CREDBROKER_SERVICE_NAME",
        default_value = "credbroker-webhook"
    )]
    pub service_name: String,
    /// self-managed: more names (DNS or IP) for the certificate.
    #[arg(
        long = "extra-san",
        env = "CREDBROKER_EXTRA_SANS",
        value_delimiter = ','
    )]
    pub extra_sans: Vec<String>,
    #[arg(long, env = "CREDBROKER_CA_VALIDITY", value_parser = duration, default_value = "8760h")]
    pub ca_validity: Duration,
    #[arg(long, env = "CREDBROKER_CERT_VALIDITY", value_parser = duration, default_value = "2160h")]
    pub cert_validity: Duration,
    /// self-managed: how long a new CA is in the caBundle before a
    /// certificate it signed is served.
    #[arg(long, env = "CREDBROKER_PROPAGATION_DELAY", value_parser = duration, default_value = "30s")]
    pub propagation_delay: Duration,
    #[arg(long, env = "CREDBROKER_CERT_CHECK_INTERVAL", value_parser = duration, default_value = "60s")]
    pub cert_check_interval: Duration,
    /// self-managed: the Lease that picks the one replica that writes.
    #[arg(
        long,
        env = "CREDBROKER_LEASE_NAME",
        default_value = "credbroker-webhook"
    )]
    pub lease_name: String,
    /// This replica's name in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, value_parser = duration, default_value = "15s")]
    pub lease_duration: Duration,
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub lease_renew_deadline: Duration,
    #[arg(long, value_parser = duration, default_value = "2s")]
    pub lease_retry_period: Duration,
    /// After SIGTERM, how long to keep serving while not ready, so the
    /// Service's endpoints drop this replica before it stops listening.
    #[arg(long, env = "CREDBROKER_SHUTDOWN_DELAY", value_parser = duration, default_value = "5s")]
    pub shutdown_delay: Duration,
}

impl Args {
    /// The injection settings, checked.
    pub fn inject_settings(&self) -> Result<InjectSettings> {
        let ca_pem = match &self.vault_ca_file {
            None => None,
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .map_err(Error::io(format!("--vault-ca-file {}", file.display())))?,
            ),
        };
        let settings = InjectSettings {
            sidecar_image: self.sidecar_image.clone(),
            init_image: self.init_image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            proxy_port: self.proxy_port,
            admin_port: self.sidecar_admin_port,
            exclude_ports: self.exclude_ports.clone(),
            exclude_cidrs: self.exclude_cidrs.clone(),
            audience: self.audience.clone(),
            token_expiration_seconds: self.token_expiration_seconds,
            vault: SidecarVault {
                addr: self.vault_addr.clone(),
                auth_mount: self.vault_auth_mount.clone(),
                namespace: self.vault_namespace.clone(),
                ca_pem,
            },
            sidecar_resources: ResourceRequirements {
                requests: resource_list("--sidecar-requests", &self.sidecar_requests)?,
                limits: resource_list("--sidecar-limits", &self.sidecar_limits)?,
                ..ResourceRequirements::default()
            },
            broker_namespace: self.namespace.clone(),
        };
        settings.validate()?;
        Ok(settings)
    }

    fn self_managed(&self) -> Result<SelfManaged> {
        let identity = self
            .identity
            .clone()
            .filter(|i| !i.is_empty())
            .ok_or_else(|| {
                Error::Config(
                    "--cert-mode self-managed needs --identity (or POD_NAME): the Lease names the \
                 replica that writes"
                        .into(),
                )
            })?;
        let svc = &self.service_name;
        let ns = &self.namespace;
        let mut dns_names = vec![
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
        ];
        dns_names.extend(self.extra_sans.iter().cloned());
        let settings = SelfManaged {
            namespace: ns.clone(),
            secret_name: self.tls_secret.clone(),
            webhook_configuration: self.webhook_configuration.clone(),
            dns_names,
            ca_validity: self.ca_validity,
            cert_validity: self.cert_validity,
            propagation_delay: self.propagation_delay,
            check_interval: self.cert_check_interval,
            lease: LeaseSettings {
                namespace: ns.clone(),
                name: self.lease_name.clone(),
                identity,
                lease_duration: self.lease_duration,
                renew_deadline: self.lease_renew_deadline,
                retry_period: self.lease_retry_period,
            },
        };
        // Here, not only when the certificate task starts: a wrong flag
        // stops the webhook before it listens.
        settings.validate()?;
        Ok(settings)
    }
}

/// Runs the webhook until SIGTERM, then stops in order: not ready; still
/// serving for `--shutdown-delay` while the endpoints drop this replica;
/// no new connections, and the open ones closed once their requests are
/// answered; the certificate task stopped (the lease handed over).
pub async fn run(args: Args) -> Result<()> {
    let settings = args.inject_settings()?;
    let self_managed = match args.cert_mode {
        CertMode::SelfManaged => Some(args.self_managed()?),
        CertMode::Provided => None,
    };
    let client = kube::Client::try_default()
        .await
        .map_err(Error::kube("connecting to the API server"))?;
    // Each stops at its own step of the shutdown; `shutdown` (the admin
    // port, the bindings watch) last.
    let shutdown = CancellationToken::new();
    let stop_serving = shutdown.child_token();
    let stop_certs = shutdown.child_token();
    let serving = ServingCert::new();
    let metrics = Arc::new(Metrics::new(serving.clone()));
    let health = Arc::new(Health::default());

    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .map_err(Error::io(format!("--admin-addr {}", args.admin_addr)))?;
    tokio::spawn(admin::serve(
        admin_listener,
        health.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let mut cert_task = match self_managed {
        None => {
            let files = ProvidedFiles {
                cert_file: args.tls_cert_file.clone(),
                key_file: args.tls_key_file.clone(),
                reload_interval: args.cert_reload_interval,
            };
            // A webhook without a certificate cannot answer: stop here,
            // naming the file. The pair read here is the one the poller
            // starts from.
            let loaded = certs::load_provided(&files, &serving)?;
            tokio::spawn(certs::poll_provided(
                files,
                serving.clone(),
                loaded,
                stop_certs.clone(),
            ))
        }
        Some(self_managed) => tokio::spawn(certs::run_self_managed(
            client.clone(),
            self_managed,
            serving.clone(),
            stop_certs.clone(),
        )),
    };

    let bindings = BindingsCache::start(client, shutdown.clone());
    let admitter = Arc::new(Admitter {
        settings,
        bindings: bindings.clone(),
        metrics: metrics.clone(),
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(Error::io(format!("--listen {}", args.listen)))?;
    let tls = serve::tls_config(serving.clone())?;
    let mut server = tokio::spawn(serve::serve(listener, tls, admitter, stop_serving.clone()));
    tracing::info!(listen = %args.listen, admin = %args.admin_addr, mode = ?args.cert_mode, "serving admission reviews");

    // Ready once the certificate is loaded and the bindings listed.
    let readiness = {
        let (health, serving) = (health.clone(), serving.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                health.set_ready(serving.is_loaded() && bindings.is_synced());
            }
        })
    };

    let (result, cert_task_ended) = tokio::select! {
        _ = terminated() => (Ok(()), false),
        ended = &mut cert_task => (match ended {
            Ok(Ok(())) => Err(Error::Certificate("the certificate task stopped".into())),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::Certificate(format!("the certificate task failed: {e}"))),
        }, true),
        // It returns only once told to: anything else is a panic.
        ended = &mut server => (Err(Error::io(format!("--listen {}", args.listen))(
            std::io::Error::other(format!(
                "the HTTPS server stopped unexpectedly{}",
                ended.err().map(|e| format!(": {e}")).unwrap_or_default()
            )),
        )), false),
    };
    match &result {
        Ok(()) => {
            tracing::info!(delay = ?args.shutdown_delay, "shutting down: not ready; still serving while the endpoints update")
        }
        Err(e) => tracing::error!(delay = ?args.shutdown_delay, "shutting down: {e}"),
    }
    // The ticker stopped for good first (awaited: an abort takes effect at
    // its next await), so nothing sets ready again.
    readiness.abort();
    let _ = readiness.await;
    health.set_ready(false);
    // Endpoints drop a replica only after its readiness fails and the
    // change reaches every node; reviews sent here meanwhile are answered.
    tokio::time::sleep(args.shutdown_delay).await;
    // Then the listener closes and each connection is shut down
    // gracefully; serve returns once they are closed, or after its drain.
    stop_serving.cancel();
    if !server.is_finished()
        && tokio::time::timeout(serve::DRAIN_TIMEOUT + Duration::from_secs(1), &mut server)
            .await
            .is_err()
    {
        tracing::warn!("the HTTPS server did not stop within its drain; exiting anyway");
    }
    // The certificate task last, while nothing is served: the
    // self-managed one hands its lease over, which takes up to the renew
    // deadline (past it, the lease is left to expire).
    stop_certs.cancel();
    if !cert_task_ended
        && tokio::time::timeout(args.lease_renew_deadline, cert_task)
            .await
            .is_err()
    {
        tracing::warn!(
            "the certificate task did not stop within --lease-renew-deadline; exiting anyway"
        );
    }
    shutdown.cancel();
    result
}

/// Waits for SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
