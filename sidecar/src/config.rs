//! What the sidecar is told, in two kinds:
//!
//! - **settings** ([`EngineArgs`]): flags (or their `CREDBROKER_*`
//!   environment variables), fixed for the life of the process: ports,
//!   directories, the egress mode, limits and timeouts;
//! - **config** ([`Config`]): the bindings and the pod's placeholders, read
//!   from files and reloaded when they change ([`watch_config`]). In a pod
//!   they are two files (the controller's ConfigMap, optional; the webhook's
//!   annotation through the downward API); in local mode one.
//!
//! A file that fails to load keeps the previous config, and says so in a
//! log line and in `credbroker_sidecar_config_last_load_ok`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use credbroker_crds::config::{FORMAT_VERSION, LocalConfig, PodPlaceholders, SidecarBindings};
use tokio::sync::watch;

use crate::audit::AuditSink;
use crate::metrics::Metrics;
use crate::substitute::PlaceholderSet;
use crate::{Error, Result};

/// What to do with traffic that no binding covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EgressMode {
    /// Let it through untouched (a placeholder in it leaves as a useless
    /// placeholder; the sidecar blocks one it can see).
    Passthrough,
    /// Refuse it: only bound destinations are reachable.
    Deny,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where secret values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecretSourceKind {
    /// Files laid out like a KV mount under `--secrets-dir`.
    File,
    /// HashiCorp Vault or OpenBao.
    Vault,
}

fn duration(s: &str) -> std::result::Result<Duration, String> {
    credbroker_crds::duration::parse(s).map_err(|e| e.to_string())
}

pub(crate) fn positive_duration(s: &str) -> std::result::Result<Duration, String> {
    let d = duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// Settings shared by `proxy` and `local`.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Traffic no binding covers: let it through, or refuse it.
    #[arg(long, env = "CREDBROKER_EGRESS", value_enum, default_value_t = EgressMode::Passthrough)]
    pub egress: EgressMode,

    /// PEM files of extra CAs, trusted for upstreams and added to the agent
    /// trust bundle; repeatable or comma-separated.
    #[arg(
        long = "extra-ca-file",
        env = "CREDBROKER_EXTRA_CA_FILES",
        value_delimiter = ','
    )]
    pub extra_ca_files: Vec<PathBuf>,

    /// The pod CA's directory (its key lives here, mode 0600; in a pod an
    /// in-memory volume mounted only in the sidecar). Default: proxy
    /// /var/run/credbroker/ca; local $XDG_STATE_HOME/credbroker/ca (else
    /// ~/.local/state/credbroker/ca).
    #[arg(long, env = "CREDBROKER_CA_DIR")]
    pub ca_dir: Option<PathBuf>,

    /// Where the trust files agents read are written (ca.crt,
    /// ca-bundle.crt, truststore.p12). Default: proxy
    /// /var/run/credbroker/trust; local $XDG_STATE_HOME/credbroker/trust.
    #[arg(long, env = "CREDBROKER_BUNDLE_DIR")]
    pub bundle_dir: Option<PathBuf>,

    /// Health, readiness and metrics (`/healthz`, `/readyz`, `/metrics`).
    /// Default: proxy [::]:15121 (the kubelet probes it on the pod IP);
    /// local: off.
    #[arg(long, env = "CREDBROKER_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// Where secret values come from.
    #[arg(long, env = "CREDBROKER_SECRET_SOURCE", value_enum, default_value_t = SecretSourceKind::Vault)]
    pub secret_source: SecretSourceKind,

    #[command(flatten)]
    pub vault: crate::source::vault::VaultArgs,

    /// With `--secret-source file`: the directory of secret files
    /// (`DIR/<mount>/<path>` holds the secret's data as a JSON object).
    #[arg(long, env = "CREDBROKER_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,

    /// While the secret source does not answer, keep using the last good
    /// value this long past its next expected read (the binding's
    /// refreshInterval); then refuse requests that need it.
    #[arg(long, env = "CREDBROKER_MAX_STALENESS", value_parser = duration, default_value = "5m")]
    pub max_staleness: Duration,

    /// How long a replaced secret value is still looked for in responses.
    #[arg(long, env = "CREDBROKER_ECHO_GRACE", value_parser = duration, default_value = "5m")]
    pub echo_grace: Duration,

    /// How often the config files are checked for changes.
    #[arg(long, env = "CREDBROKER_RELOAD_INTERVAL", value_parser = positive_duration, default_value = "1s")]
    pub reload_interval: Duration,

    /// Also require a bound connection's original destination to be among
    /// the addresses the sidecar resolves for its name.
    #[arg(long, env = "CREDBROKER_STRICT_DESTINATION")]
    pub strict_destination: bool,

    /// Most connections handled at once; more are closed on arrival.
    #[arg(long, env = "CREDBROKER_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Largest request or response header section, in bytes (431 beyond).
    #[arg(long, env = "CREDBROKER_MAX_HEADER_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(8192..=1 << 20))]
    pub max_header_bytes: u32,

    /// A request body that may get a secret swapped in is buffered up to
    /// this size to send the right Content-Length; a larger one is streamed
    /// chunked.
    #[arg(long, env = "CREDBROKER_MAX_BUFFERED_BODY", default_value_t = 1024 * 1024)]
    pub max_buffered_body: usize,

    /// How long a new connection may stay silent before it is treated as a
    /// server-speaks-first protocol.
    #[arg(long, env = "CREDBROKER_FIRST_BYTE_TIMEOUT", value_parser = positive_duration, default_value = "500ms")]
    pub first_byte_timeout: Duration,

    /// How long a client may take to send its whole TLS ClientHello.
    #[arg(long, env = "CREDBROKER_CLIENT_HELLO_TIMEOUT", value_parser = positive_duration, default_value = "10s")]
    pub client_hello_timeout: Duration,

    /// How long a client may take to send a request's headers, and the
    /// TLS handshake.
    #[arg(long, env = "CREDBROKER_HEADER_TIMEOUT", value_parser = positive_duration, default_value = "30s")]
    pub header_timeout: Duration,

    /// How long to wait for an upstream connection (per address).
    #[arg(long, env = "CREDBROKER_CONNECT_TIMEOUT", value_parser = positive_duration, default_value = "10s")]
    pub connect_timeout: Duration,

    /// How long an upstream may take to answer a request's headers.
    #[arg(long, env = "CREDBROKER_RESPONSE_TIMEOUT", value_parser = positive_duration, default_value = "5m")]
    pub response_timeout: Duration,

    /// How long a body (either way) or a spliced connection may be silent.
    #[arg(long, env = "CREDBROKER_IDLE_TIMEOUT", value_parser = positive_duration, default_value = "5m")]
    pub idle_timeout: Duration,

    /// On SIGTERM, how long open connections get to finish.
    #[arg(long, env = "CREDBROKER_DRAIN_TIMEOUT", value_parser = duration, default_value = "20s")]
    pub drain_timeout: Duration,

    /// Where audit records go: a file (appended to), or `-` for stdout.
    #[arg(long, env = "CREDBROKER_AUDIT_LOG", default_value = "-")]
    pub audit_log: AuditSink,

    /// Log lines on stderr (`RUST_LOG` filters them). Default: proxy json,
    /// local text.
    #[arg(long, env = "CREDBROKER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// The pod's name, for audit records (the webhook sets it from the
    /// downward API).
    #[arg(long, env = "CREDBROKER_POD_NAME")]
    pub pod_name: Option<String>,
    /// The pod's namespace, for audit records.
    #[arg(long, env = "CREDBROKER_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

/// The directories and log format a mode uses when the flags do not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub ca_dir: PathBuf,
    pub bundle_dir: PathBuf,
    pub log_format: LogFormat,
}

/// Which files hold the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFiles {
    /// In a pod: the bindings (absent means none) and the placeholders
    /// (absent or empty means none).
    Pod {
        bindings: PathBuf,
        placeholders: PathBuf,
    },
    /// Local mode: one file with both (must exist).
    Local(PathBuf),
}

/// The bindings and the pod's placeholders, validated together.
#[derive(Debug, Clone)]
pub struct Config {
    pub bindings: SidecarBindings,
    pub placeholders: PodPlaceholders,
}

impl Config {
    /// No bindings and no placeholders.
    pub fn empty() -> Self {
        Self {
            bindings: SidecarBindings {
                format_version: FORMAT_VERSION,
                vault_role: None,
                bindings: Vec::new(),
            },
            placeholders: PodPlaceholders::default(),
        }
    }

    /// Checks what neither part can alone: the placeholders of the
    /// bindings are distinct and none contains another.
    fn check(self) -> std::result::Result<Self, String> {
        PlaceholderSet::from_config(&self.bindings.bindings, &self.placeholders)
            .map_err(|e| e.to_string())?;
        Ok(self)
    }
}

/// One part's file content as read: `None` when absent.
type Content = Option<Vec<u8>>;

fn read_file(path: &Path) -> std::result::Result<Content, String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

fn text<'a>(path: &Path, bytes: &'a [u8]) -> std::result::Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8", path.display()))
}

/// Parses the bindings part (pure).
pub fn parse_bindings(
    path: &Path,
    content: &Content,
) -> std::result::Result<SidecarBindings, String> {
    match content {
        None => Ok(Config::empty().bindings),
        Some(bytes) => {
            let json = text(path, bytes)?;
            SidecarBindings::from_json(json).map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

/// Parses the placeholders part (pure). The downward API writes an empty
/// file for a missing annotation.
pub fn parse_placeholders(
    path: &Path,
    content: &Content,
) -> std::result::Result<PodPlaceholders, String> {
    match content {
        None => Ok(PodPlaceholders::default()),
        Some(bytes) => {
            let json = text(path, bytes)?.trim();
            if json.is_empty() {
                return Ok(PodPlaceholders::default());
            }
            PodPlaceholders::from_json(json).map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

/// Parses local mode's file (pure).
pub fn parse_local(path: &Path, content: &Content) -> std::result::Result<Config, String> {
    let Some(bytes) = content else {
        return Err(format!("{}: no such file", path.display()));
    };
    let config = LocalConfig::from_yaml(text(path, bytes)?)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (bindings, placeholders) = config
        .split()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Config {
        bindings,
        placeholders,
    })
}

/// The files' contents as read (or why one could not be read), in the
/// order of [`ConfigFiles`]' parts: what a reload compares to notice a
/// change. Config files are small, so they are kept whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents(Vec<std::result::Result<Content, String>>);

fn paths(files: &ConfigFiles) -> Vec<&Path> {
    match files {
        ConfigFiles::Pod {
            bindings,
            placeholders,
        } => vec![bindings, placeholders],
        ConfigFiles::Local(path) => vec![path],
    }
}

/// Reads every part of the config.
pub fn read_contents(files: &ConfigFiles) -> Contents {
    Contents(paths(files).into_iter().map(read_file).collect())
}

/// Parses what [`read_contents`] read (pure). `Err` names the part
/// (`bindings`, `placeholders`, `local`) and the reason.
pub fn parse(
    files: &ConfigFiles,
    contents: &Contents,
) -> std::result::Result<Config, (&'static str, String)> {
    let part = |i: usize| -> std::result::Result<&Content, String> {
        match contents.0.get(i) {
            Some(Ok(content)) => Ok(content),
            Some(Err(e)) => Err(e.clone()),
            None => Err("not read".into()),
        }
    };
    match files {
        ConfigFiles::Pod {
            bindings,
            placeholders,
        } => {
            let b = part(0)
                .and_then(|c| parse_bindings(bindings, c))
                .map_err(|e| ("bindings", e))?;
            let p = part(1)
                .and_then(|c| parse_placeholders(placeholders, c))
                .map_err(|e| ("placeholders", e))?;
            Config {
                bindings: b,
                placeholders: p,
            }
            .check()
            .map_err(|e| ("placeholders", e))
        }
        ConfigFiles::Local(path) => part(0)
            .and_then(|c| parse_local(path, c))
            .and_then(Config::check)
            .map_err(|e| ("local", e)),
    }
}

/// Reads and parses the config once.
pub fn load(files: &ConfigFiles) -> std::result::Result<Config, (&'static str, String)> {
    parse(files, &read_contents(files))
}

/// Re-reads the config every `interval` and publishes each new valid one.
/// `last`: the contents the current config was parsed from (so a change
/// made since is not missed). A change that fails to load is logged once
/// and counted, and the previous config stays. Runs until `tx` has no
/// receivers.
pub async fn watch_config(
    files: ConfigFiles,
    mut last: Contents,
    interval: Duration,
    tx: watch::Sender<Option<Arc<Config>>>,
    metrics: Arc<Metrics>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if tx.is_closed() {
            return;
        }
        let now = read_contents(&files);
        if now == last {
            continue;
        }
        let parsed = parse(&files, &now);
        last = now;
        match parsed {
            Ok(config) => {
                for part in parts_of(&files) {
                    metrics.config_reload(part, true);
                }
                tracing::info!(
                    bindings = config.bindings.bindings.len(),
                    placeholders = config.placeholders.0.len(),
                    "config reloaded"
                );
                tx.send_replace(Some(Arc::new(config)));
            }
            Err((part, error)) => {
                metrics.config_reload(part, false);
                tracing::error!(part, %error, "config change refused; keeping the previous config");
            }
        }
    }
}

/// The parts a config is made of, as metrics name them.
pub fn parts_of(files: &ConfigFiles) -> &'static [&'static str] {
    match files {
        ConfigFiles::Pod { .. } => &["bindings", "placeholders"],
        ConfigFiles::Local(_) => &["local"],
    }
}

impl EngineArgs {
    /// Checks combinations a flag parser cannot.
    pub fn validate(&self) -> Result<()> {
        if self.max_connections == 0 {
            return Err(Error::Config(
                "--max-connections: must be at least 1".into(),
            ));
        }
        if self.secret_source == SecretSourceKind::File && self.secrets_dir.is_none() {
            return Err(Error::Config(
                "--secret-source file needs --secrets-dir (the directory of secret files)".into(),
            ));
        }
        Ok(())
    }

    /// The directories and log format for a mode: a pod's fixed paths, or a
    /// user's state directory in local mode (the pod paths are not writable
    /// on a laptop).
    pub fn resolve(
        &self,
        local: bool,
        home: Option<&Path>,
        xdg_state: Option<&Path>,
    ) -> Result<Resolved> {
        let base = if local {
            match (xdg_state, home) {
                (Some(state), _) => state.join("credbroker"),
                (None, Some(home)) => home.join(".local/state/credbroker"),
                (None, None) if self.ca_dir.is_none() || self.bundle_dir.is_none() => {
                    return Err(Error::Config(
                        "no HOME or XDG_STATE_HOME: give --ca-dir and --bundle-dir".into(),
                    ));
                }
                (None, None) => PathBuf::new(),
            }
        } else {
            PathBuf::from("/var/run/credbroker")
        };
        let resolved = Resolved {
            ca_dir: self.ca_dir.clone().unwrap_or_else(|| base.join("ca")),
            bundle_dir: self
                .bundle_dir
                .clone()
                .unwrap_or_else(|| base.join("trust")),
            log_format: self.log_format.unwrap_or(if local {
                LogFormat::Text
            } else {
                LogFormat::Json
            }),
        };
        let (ca, bundle) = (&resolved.ca_dir, &resolved.bundle_dir);
        if ca.starts_with(bundle) || bundle.starts_with(ca) {
            return Err(Error::Config(format!(
                "--ca-dir {} and --bundle-dir {} must not contain one another: the CA key must \
                 never sit among the files agents read",
                ca.display(),
                bundle.display()
            )));
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BINDINGS: &str = r#"{"formatVersion":1,"bindings":[{"id":"openai",
        "secret":{"mount":"secret","path":"teams/openai","key":"api_key"},
        "destinations":[{"host":"api.openai.com"}]}]}"#;

    fn pod_files(dir: &Path) -> ConfigFiles {
        ConfigFiles::Pod {
            bindings: dir.join("bindings.v1.json"),
            placeholders: dir.join("placeholders"),
        }
    }

    #[test]
    fn absent_files_mean_no_bindings() {
        let dir = tempfile::tempdir().unwrap();
        let config = load(&pod_files(dir.path())).unwrap();
        assert!(config.bindings.bindings.is_empty());
        assert!(config.placeholders.0.is_empty());
        // The downward API's empty file for a missing annotation.
        std::fs::write(dir.path().join("placeholders"), "").unwrap();
        assert!(load(&pod_files(dir.path())).is_ok());
    }

    #[test]
    fn both_parts_load_and_errors_name_the_part_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = pod_files(dir.path());
        std::fs::write(dir.path().join("bindings.v1.json"), BINDINGS).unwrap();
        std::fs::write(
            dir.path().join("placeholders"),
            r#"{"openai":"sk-0123456789abcdefghijklmnop"}"#,
        )
        .unwrap();
        let config = load(&files).unwrap();
        assert_eq!(config.bindings.bindings[0].id, "openai");
        assert_eq!(config.placeholders.0.len(), 1);

        std::fs::write(dir.path().join("bindings.v1.json"), "{not json").unwrap();
        let (part, e) = load(&files).unwrap_err();
        assert_eq!(part, "bindings");
        assert!(e.contains("bindings.v1.json"), "{e}");

        std::fs::write(dir.path().join("bindings.v1.json"), BINDINGS).unwrap();
        std::fs::write(dir.path().join("placeholders"), r#"{"openai":"short"}"#).unwrap();
        let (part, e) = load(&files).unwrap_err();
        assert_eq!(part, "placeholders");
        assert!(e.contains("openai"), "{e}");
    }

    #[test]
    fn local_mode_needs_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local.yaml");
        let (part, e) = load(&ConfigFiles::Local(path.clone())).unwrap_err();
        assert_eq!(part, "local");
        assert!(e.contains("no such file"), "{e}");
        std::fs::write(&path, "formatVersion: 1\nbindings: []\nplaceholders: {}\n").unwrap();
        assert!(load(&ConfigFiles::Local(path)).is_ok());
    }

    #[tokio::test]
    async fn a_bad_change_keeps_the_previous_config() {
        let dir = tempfile::tempdir().unwrap();
        let files = pod_files(dir.path());
        std::fs::write(dir.path().join("bindings.v1.json"), BINDINGS).unwrap();
        let metrics = Arc::new(Metrics::new());
        let contents = read_contents(&files);
        let (tx, mut rx) = watch::channel(Some(Arc::new(parse(&files, &contents).unwrap())));
        let task = tokio::spawn(watch_config(
            files,
            contents,
            Duration::from_millis(20),
            tx,
            metrics.clone(),
        ));
        std::fs::write(dir.path().join("bindings.v1.json"), "garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!rx.has_changed().unwrap());
        let text = metrics.render();
        assert!(
            text.contains(r#"config_last_load_ok{part="bindings"} 0"#),
            "{text}"
        );
        std::fs::write(
            dir.path().join("bindings.v1.json"),
            BINDINGS.replace("openai", "other"),
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            rx.borrow().as_ref().unwrap().bindings.bindings[0].id,
            "other"
        );
        task.abort();
    }
}
