//! Starting and stopping `proxy` and `local`: harden the process, check
//! the settings, load the trust and the pod CA, write the agent's trust
//! bundle, start the engine, listen, and on SIGTERM drain open connections
//! before exiting.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::config::{self, ConfigFiles, EngineArgs, LogFormat, Resolved, SecretSourceKind};
use crate::engine::{Engine, EngineSettings};
use crate::metrics::Metrics;
use crate::source::SecretSource;
use crate::source::vault::{VaultSettings, VaultSource};
use crate::store::{SecretStore, StoreSettings};
use crate::tls::{LeafCertCache, PodCa, UpstreamTls};
use crate::{Error, Result};

/// The default port of the admin endpoints in a pod (outside the
/// 15000-15090 range Istio takes).
pub const DEFAULT_ADMIN_PORT: u16 = 15121;
/// The default port of the local proxy.
pub const DEFAULT_LOCAL_PORT: u16 = 15080;

/// `credbroker-sidecar proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The port the pod's redirected TCP arrives on (127.0.0.1 and [::1]);
    /// the same as `init --proxy-port`.
    #[arg(long, env = "CREDBROKER_PROXY_PORT", default_value_t = crate::init::DEFAULT_PROXY_PORT)]
    pub proxy_port: u16,
    /// The UID `init` exempted from capture (`init --proxy-uid`): the
    /// sidecar refuses to start as any other, or its own upstream
    /// connections would be captured and loop back into it.
    #[arg(long, env = "CREDBROKER_PROXY_UID", default_value_t = crate::init::DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// The GID `init` exempted with the UID (`init --proxy-gid`): the
    /// exemption matches both, so the sidecar checks both.
    #[arg(long, env = "CREDBROKER_PROXY_GID", default_value_t = crate::init::DEFAULT_PROXY_GID)]
    pub proxy_gid: u32,
    /// The bindings (the controller's ConfigMap key); absent means none.
    #[arg(
        long,
        env = "CREDBROKER_BINDINGS_FILE",
        default_value = "/etc/credbroker/bindings/bindings.v1.json"
    )]
    pub bindings_file: PathBuf,
    /// The pod's placeholders (the downward-API file of the pod annotation).
    #[arg(
        long,
        env = "CREDBROKER_PLACEHOLDERS_FILE",
        default_value = "/etc/credbroker/pod/placeholders"
    )]
    pub placeholders_file: PathBuf,
}

/// `credbroker-sidecar local`.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The one config file: bindings and placeholders (YAML or JSON).
    #[arg(long, env = "CREDBROKER_CONFIG")]
    pub config: PathBuf,
    /// Where the proxy listens (loopback only).
    #[arg(long, env = "CREDBROKER_LISTEN",
          default_value_t = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_LOCAL_PORT))]
    pub listen: SocketAddr,
}

/// Makes the process hard to read from outside: no core dumps, not
/// ptrace-attachable by same-UID processes (`PR_SET_DUMPABLE=0`), and
/// enough descriptors for the connection limit.
pub fn harden(max_connections: usize) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    nix::sys::prctl::set_dumpable(false).map_err(|e| Error::Io {
        what: "setting PR_SET_DUMPABLE=0".into(),
        source: e.into(),
    })?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| Error::Io {
        what: "turning core dumps off (RLIMIT_CORE)".into(),
        source: e.into(),
    })?;
    // Per connection permit: the agent's socket; per upstream request
    // permit (as many): its upstream socket, and as many again idle in the
    // pools after a burst; and some slack for listeners and files.
    let want = (max_connections as u64)
        .saturating_mul(3)
        .saturating_add(256);
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < want
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
    }
    Ok(())
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

fn settings(args: &EngineArgs, local: bool) -> EngineSettings {
    EngineSettings {
        egress: args.egress,
        localhost_is_loopback: local,
        strict_destination: args.strict_destination,
        max_header_bytes: args.max_header_bytes,
        max_buffered_body: args.max_buffered_body,
        first_byte_timeout: args.first_byte_timeout,
        client_hello_timeout: args.client_hello_timeout,
        header_timeout: args.header_timeout,
        connect_timeout: args.connect_timeout,
        response_timeout: args.response_timeout,
        idle_timeout: args.idle_timeout,
        drain_timeout: args.drain_timeout,
    }
}

/// The secret source the flags ask for, checked before anything is
/// written (so a wrong setting fails fast, naming its flag) and built once
/// the metrics exist.
enum SourceChoice {
    File(PathBuf),
    Vault(Box<VaultSettings>),
}

fn secret_source(args: &EngineArgs, files: &ConfigFiles) -> Result<SourceChoice> {
    let (local, bindings_file) = match files {
        ConfigFiles::Pod { bindings, .. } => (false, Some(bindings.as_path())),
        ConfigFiles::Local(_) => (true, None),
    };
    match args.secret_source {
        SecretSourceKind::File => {
            let dir = args
                .secrets_dir
                .clone()
                .ok_or_else(|| Error::Config("--secret-source file needs --secrets-dir".into()))?;
            if !dir.is_dir() {
                return Err(Error::Config(format!(
                    "--secrets-dir {}: not a directory",
                    dir.display()
                )));
            }
            Ok(SourceChoice::File(dir))
        }
        SecretSourceKind::Vault => {
            let token_env = std::env::var_os(crate::source::vault::TOKEN_ENV).map(|v| {
                // A Secret's value often ends in a newline.
                let bytes = zeroize::Zeroizing::new(v.into_encoded_bytes());
                let trimmed = bytes.trim_ascii();
                crate::secret::SecretValue::copy_from(trimmed)
            });
            VaultSettings::from_args(&args.vault, local, token_env, bindings_file).map(|mut s| {
                s.data_recheck = args.max_staleness;
                SourceChoice::Vault(Box::new(s))
            })
        }
    }
}

impl SourceChoice {
    fn build(self, metrics: Arc<Metrics>) -> Result<Arc<dyn SecretSource>> {
        Ok(match self {
            Self::File(dir) => Arc::new(crate::source::file::FileSource::new(dir)),
            Self::Vault(settings) => {
                tracing::info!(
                    vault = %settings.addr.url(),
                    method = settings.credentials.method(),
                    namespace = settings.namespace.as_deref().unwrap_or(""),
                    "secrets come from Vault"
                );
                Arc::new(VaultSource::new(*settings, metrics)?)
            }
        })
    }
}

/// Everything the engine needs, built from the settings: the order matters
/// only in that nothing is written before every setting checked out.
async fn start(
    args: &EngineArgs,
    dirs: &Resolved,
    files: ConfigFiles,
    local: bool,
) -> Result<Arc<Engine>> {
    args.validate()?;
    let source = secret_source(args, &files)?;
    let extra_cas = load_extra_cas(&args.extra_ca_files)?;
    let system_roots = match crate::tls::system_roots() {
        Ok(roots) => roots,
        // Local mode on a machine without a system bundle can still reach
        // upstreams its extra CAs cover.
        Err(e) if local && !extra_cas.is_empty() => {
            tracing::warn!(error = %e, "no system roots; trusting only the extra CAs");
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let upstream_tls = Arc::new(UpstreamTls::new(&system_roots, &extra_cas)?);
    let ca = Arc::new(
        PodCa::load_or_generate(&dirs.ca_dir)
            .map_err(|e| Error::Config(format!("--ca-dir {}: {e}", dirs.ca_dir.display())))?,
    );
    let summary = crate::tls::write_bundle(&dirs.bundle_dir, &ca, &system_roots, &extra_cas)
        .map_err(|e| Error::Config(format!("--bundle-dir {}: {e}", dirs.bundle_dir.display())))?;
    tracing::info!(
        ca = ?ca.origin(),
        bundle = %dirs.bundle_dir.display(),
        certificates = summary.bundle_certs,
        "trust bundle written for agents"
    );
    let leaves = Arc::new(LeafCertCache::new(ca));
    let mut metrics = Metrics::new();
    metrics.register_leaf_cache(leaves.clone());
    let metrics = Arc::new(metrics);
    let audit = AuditLog::start(
        &args.audit_log,
        args.pod_name.clone(),
        args.pod_namespace.clone(),
        metrics.clone(),
    )?;
    // One read may take several calls (metadata, data, a token check, a
    // login): its deadline follows the per-call one.
    let read_timeout = match &source {
        SourceChoice::Vault(s) => s.timeout.saturating_mul(3),
        SourceChoice::File(_) => StoreSettings::default().read_timeout,
    };
    let store = SecretStore::new(
        source.build(metrics.clone())?,
        StoreSettings {
            max_staleness: args.max_staleness,
            echo_grace: args.echo_grace,
            read_timeout,
            ..StoreSettings::default()
        },
        metrics.clone(),
    );
    let engine = Engine::new(
        settings(args, local),
        args.max_connections,
        metrics.clone(),
        audit,
        leaves,
        upstream_tls,
        store,
    );

    let contents = config::read_contents(&files);
    let initial = match config::parse(&files, &contents) {
        Ok(config) => {
            for part in config::parts_of(&files) {
                metrics.config_reload(part, true);
            }
            tracing::info!(
                bindings = config.bindings.bindings.len(),
                placeholders = config.placeholders.0.len(),
                "config loaded"
            );
            Some(Arc::new(config))
        }
        Err((part, error)) if !local => {
            metrics.config_reload(part, false);
            tracing::error!(part, %error, "the config could not be loaded; not ready until it can");
            engine.config_failed(error);
            None
        }
        Err((_, error)) => return Err(Error::Config(error)),
    };
    let (config_tx, config_rx) = watch::channel(initial);
    tokio::spawn(engine.clone().run_builder(config_rx));
    tokio::spawn(config::watch_config(
        files,
        contents,
        args.reload_interval,
        config_tx,
        metrics.clone(),
    ));
    Ok(engine)
}

fn load_extra_cas(files: &[PathBuf]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let mut certs = Vec::new();
    for file in files {
        let pem = std::fs::read_to_string(file).map_err(|e| Error::Io {
            what: format!("reading --extra-ca-file {}", file.display()),
            source: e,
        })?;
        certs.extend(crate::tls::parse_pem_certs(
            &pem,
            &file.display().to_string(),
        )?);
    }
    Ok(certs)
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Io {
        what: format!("listening on {addr} ({what})"),
        source: e,
    })
}

/// Waits for SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGTERM, just
        // without draining.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Stops accepting, lets open connections finish for the drain timeout,
/// then writes out the audit log.
async fn drain(engine: &Engine) {
    tracing::info!(drain = ?engine.settings.drain_timeout, "shutting down: draining open connections");
    engine.shutdown.cancel();
    engine.tasks.close();
    // The Vault token is revoked first: in a pod the sidecar gets SIGTERM
    // late in the grace period, and a drain could use it all. Requests
    // still open use the values already read.
    if tokio::time::timeout(SOURCE_SHUTDOWN_TIMEOUT, engine.store().shutdown_source())
        .await
        .is_err()
    {
        tracing::warn!("the secret source did not let go within {SOURCE_SHUTDOWN_TIMEOUT:?}");
    }
    if tokio::time::timeout(engine.settings.drain_timeout, engine.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
    let audit = engine.audit.clone();
    let _ = tokio::task::spawn_blocking(move || audit.close()).await;
}

/// How long the secret source gets to let go on shutdown (a Vault token's
/// revocation).
const SOURCE_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Runs `credbroker-sidecar proxy` until SIGTERM.
pub async fn run_proxy(args: ProxyArgs) -> Result<()> {
    harden(args.engine.max_connections)?;
    let dirs = args.engine.resolve(false, None, None)?;
    init_logging(dirs.log_format);
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if (uid, gid) != (args.proxy_uid, args.proxy_gid) {
        return Err(Error::Config(format!(
            "running as UID {uid} GID {gid}, but init exempts UID {} GID {} from capture \
             (--proxy-uid, --proxy-gid): the sidecar's own connections would be captured and \
             loop back into it",
            args.proxy_uid, args.proxy_gid
        )));
    }
    let files = ConfigFiles::Pod {
        bindings: args.bindings_file.clone(),
        placeholders: args.placeholders_file.clone(),
    };
    let engine = start(&args.engine, &dirs, files, false).await?;

    let mut listeners = vec![
        bind(
            (Ipv4Addr::LOCALHOST, args.proxy_port).into(),
            "redirected IPv4",
        )
        .await?,
    ];
    // The same test init makes: with IPv6 on, redirected IPv6 must land
    // somewhere, so failing to listen is fatal (IPv6 egress would fail
    // without a word).
    if crate::init::ipv6_enabled(Path::new("/proc/sys/net/ipv6/conf"))? {
        listeners.push(
            bind(
                (Ipv6Addr::LOCALHOST, args.proxy_port).into(),
                "redirected IPv6",
            )
            .await?,
        );
    }
    for listener in listeners {
        tokio::spawn(crate::proxy::serve(engine.clone(), listener));
    }
    let admin_addr = args.engine.admin_addr.unwrap_or(SocketAddr::new(
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        DEFAULT_ADMIN_PORT,
    ));
    let admin = match bind(admin_addr, "admin").await {
        Ok(l) => l,
        // A pod without IPv6: the unspecified IPv4 address instead.
        Err(_) if admin_addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            bind(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), admin_addr.port()),
                "admin",
            )
            .await?
        }
        Err(e) => return Err(e),
    };
    tokio::spawn(crate::admin::serve(engine.clone(), admin));
    tracing::info!(port = args.proxy_port, admin = %admin_addr, egress = ?args.engine.egress, "proxy listening");
    terminated().await;
    drain(&engine).await;
    Ok(())
}

/// Runs `credbroker-sidecar local` until SIGTERM or Ctrl-C.
pub async fn run_local(args: LocalArgs) -> Result<()> {
    harden(args.engine.max_connections)?;
    let dirs = args.engine.resolve(
        true,
        env_path("HOME").as_deref(),
        env_path("XDG_STATE_HOME").as_deref(),
    )?;
    init_logging(dirs.log_format);
    if !args.listen.ip().is_loopback() {
        return Err(Error::Config(format!(
            "--listen {}: local mode listens on loopback only (127.0.0.1 or [::1])",
            args.listen
        )));
    }
    let files = ConfigFiles::Local(args.config.clone());
    let engine = start(&args.engine, &dirs, files, true).await?;
    let listener = bind(args.listen, "local proxy").await?;
    let listening = listener.local_addr().unwrap_or(args.listen);
    tokio::spawn(crate::local::serve(engine.clone(), listener));
    if let Some(admin_addr) = args.engine.admin_addr {
        let admin = bind(admin_addr, "admin").await?;
        tokio::spawn(crate::admin::serve(engine.clone(), admin));
    }
    tracing::info!(
        listen = %listening,
        bundle = %dirs.bundle_dir.join(crate::tls::bundle::BUNDLE_FILE).display(),
        "local proxy listening: use HTTPS_PROXY=http://{listening} and trust the bundle"
    );
    terminated().await;
    drain(&engine).await;
    Ok(())
}
