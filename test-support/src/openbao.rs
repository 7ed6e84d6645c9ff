//! OpenBao for tests (DESIGN.md section 6): a real `bao server` on a free
//! 127.0.0.1 port, either the in-memory dev server (the default, ready in a
//! fraction of a second) or a server on integrated (raft) storage whose data
//! survives [`OpenBao::restart`].
//!
//! The fixture owns the server process and one temporary folder (the server's
//! and the CLI's home, its config and its data). Dropping the fixture kills the
//! server and removes the folder, also when the test panics.
//!
//! Clients handed out here never read `VAULT_*`/`BAO_*` or proxy variables
//! from the environment, and the `bao` CLI runs with those variables removed,
//! so a test talks only to its own server on loopback.
//!
//! OpenBao 2.x has no `file` storage backend and no mlock (its config parser
//! warns that `disable_mlock` is unknown), so the persistent server runs a
//! single-node raft cluster instead; nothing is locked in memory either way.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use vaultrs::api::EndpointMiddleware;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use crate::process::ChildGuard;
use crate::{Error, Result, SETUP_HINT, find_binary, free_port, run};

/// The dev server's root token: a fixed, obviously-test value.
pub const DEV_ROOT_TOKEN_PREFIX: &str = "credbroker-test-root-";

/// Where KV v2 is mounted on either server (`secret/`, the dev server's default).
pub const KV2_MOUNT: &str = "secret";

/// The request timeout of clients that did not ask for another one: long
/// enough for a loaded CI machine, short enough that a hung server fails the
/// test instead of hanging it.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

const DEV_START_TIMEOUT: Duration = Duration::from_secs(60);
// Raft elects itself leader before `init` answers; a few seconds on an idle
// machine, more when the machine is busy compiling.
const PERSISTENT_START_TIMEOUT: Duration = Duration::from_secs(120);
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const STOP_GRACE: Duration = Duration::from_secs(10);
// A free port can be taken between `free_port()` and the server's bind.
const PORT_ATTEMPTS: usize = 3;

// `/v1/sys/health` status codes.
const HEALTH_ACTIVE: u16 = 200;
const HEALTH_NOT_INITIALIZED: u16 = 501;
const HEALTH_SEALED: u16 = 503;

/// Chooses how the fixture starts OpenBao. Obtain it from [`OpenBao::builder`].
#[derive(Debug, Default)]
pub struct OpenBaoBuilder {
    persistent: bool,
    binary: Option<PathBuf>,
    port: Option<u16>,
    extra_config: Option<PathBuf>,
}

impl OpenBaoBuilder {
    /// Runs on raft storage in the fixture's folder instead of in memory:
    /// start-up takes seconds instead of a fraction of one, and
    /// [`OpenBao::restart`] keeps the data.
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// Uses this `bao` binary instead of `$CREDBROKER_BAO` or `bao` on `PATH`.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Listens on this 127.0.0.1 port instead of a free one (no retry if it
    /// is taken: the server's own error is returned).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Also loads this config file (dev server only), e.g. a second, TLS
    /// listener with a certificate for the name a pod dials; the fixture's
    /// own client keeps the plain loopback listener.
    pub fn extra_config(mut self, path: impl Into<PathBuf>) -> Self {
        self.extra_config = Some(path.into());
        self
    }

    /// Starts the server and waits until it is unsealed and active.
    pub async fn start(self) -> Result<OpenBao> {
        let began = Instant::now();
        let bin = resolve_binary(self.binary)?;
        let dir = tempfile::Builder::new()
            .prefix("credbroker-openbao-")
            .tempdir()
            .map_err(|e| Error::Io("creating the OpenBao fixture folder".into(), e))?;
        let mut attempt = 1;
        loop {
            let port = match self.port {
                Some(port) => port,
                None => free_port()?,
            };
            if self.persistent && self.extra_config.is_some() {
                return Err(Error::Other(
                    "OpenBao fixture: extra_config is for the dev server only, not persistent()"
                        .into(),
                ));
            }
            let started = if self.persistent {
                start_persistent(&bin, dir.path(), port).await
            } else {
                start_dev(&bin, dir.path(), port, self.extra_config.as_deref()).await
            };
            match started {
                Ok(started) => {
                    let addr = base_url(port);
                    write_token_helper_file(dir.path(), &started.root_token)?;
                    let client = vault_client(&addr, &started.root_token, DEFAULT_REQUEST_TIMEOUT)?;
                    return Ok(OpenBao {
                        server: started.server,
                        client,
                        bin,
                        addr,
                        port,
                        root_token: started.root_token,
                        persistent: started.persistent,
                        startup: began.elapsed(),
                        dir,
                    });
                }
                Err(e) if self.port.is_none() && attempt < PORT_ATTEMPTS && lost_port_race(&e) => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A running OpenBao server owned by a test.
pub struct OpenBao {
    // Declared first so it is dropped (killed) before its folder is removed.
    server: ChildGuard,
    client: VaultClient,
    bin: PathBuf,
    addr: String,
    port: u16,
    root_token: String,
    persistent: Option<Persistent>,
    startup: Duration,
    dir: tempfile::TempDir,
}

/// What a server on raft storage needs to come back after a restart.
struct Persistent {
    config: PathBuf,
    unseal_key: String,
}

/// A server that answered health, with what the fixture keeps of its start.
struct Started {
    server: ChildGuard,
    root_token: String,
    persistent: Option<Persistent>,
}

impl OpenBao {
    /// Starts `bao server -dev` (in memory, KV v2 at `secret/`, root token
    /// a random token starting with [`DEV_ROOT_TOKEN_PREFIX`]) on a free loopback port.
    pub async fn start() -> Result<Self> {
        Self::builder().start().await
    }

    /// Starts a server on raft storage (KV v2 at `secret/`, a generated root
    /// token) whose data survives [`OpenBao::restart`].
    pub async fn start_persistent() -> Result<Self> {
        Self::builder().persistent().start().await
    }

    pub fn builder() -> OpenBaoBuilder {
        OpenBaoBuilder::default()
    }

    /// The server's base URL, e.g. `http://127.0.0.1:40123` (what `VAULT_ADDR` would hold).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The root token: a random token starting with [`DEV_ROOT_TOKEN_PREFIX`] for the dev server, generated by
    /// `operator init` for the persistent one.
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// A client holding the root token, with [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn client(&self) -> &VaultClient {
        &self.client
    }

    /// A client holding `token`, with [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn client_with_token(&self, token: &str) -> Result<VaultClient> {
        vault_client(&self.addr, token, DEFAULT_REQUEST_TIMEOUT)
    }

    /// A client holding the root token whose every request gives up after `timeout`.
    pub fn client_with_timeout(&self, timeout: Duration) -> Result<VaultClient> {
        vault_client(&self.addr, &self.root_token, timeout)
    }

    /// How long [`OpenBaoBuilder::start`] took, to an active server (port retries included).
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Everything the current server process printed (its log).
    pub fn server_output(&self) -> String {
        self.server.output()
    }

    /// Mounts a KV version 1 engine at `path`, beside the KV v2 at `secret/`.
    pub async fn mount_kv1(&self, path: &str) -> Result<()> {
        mount_kv(&self.client, path, "1").await
    }

    /// Mounts a KV version 2 engine at `path`.
    pub async fn mount_kv2(&self, path: &str) -> Result<()> {
        mount_kv(&self.client, path, "2").await
    }

    /// Enables the auth method `method` (e.g. `kubernetes`, `jwt`, `approle`) at `auth/<path>`.
    pub async fn enable_auth(&self, path: &str, method: &str) -> Result<()> {
        vaultrs::sys::auth::enable(&self.client, path, method, None)
            .await
            .map_err(|e| vault_error(&format!("enabling auth method {method} at auth/{path}/"), e))
    }

    /// Enables Kubernetes auth at `auth/<mount>/` and points it at `server`,
    /// with `reviewer_jwt` (a token of a ServiceAccount bound to
    /// `system:auth-delegator`, see `Cluster::create_token_reviewer`) for
    /// TokenReview: OpenBao then checks every login with the real apiserver.
    pub fn configure_kubernetes_auth(
        &self,
        mount: &str,
        server: &crate::apiserver::TestApiServer,
        reviewer_jwt: &str,
    ) -> Result<()> {
        let ca = self.dir.path().join(format!("{mount}-k8s-ca.crt"));
        std::fs::write(&ca, server.ca_pem())
            .map_err(|e| Error::Io("writing the apiserver CA".into(), e))?;
        let reviewer = self.dir.path().join(format!("{mount}-reviewer.jwt"));
        std::fs::write(&reviewer, reviewer_jwt)
            .map_err(|e| Error::Io("writing the reviewer token".into(), e))?;
        self.bao(&["auth", "enable", &format!("-path={mount}"), "kubernetes"])?;
        self.bao(&[
            "write",
            &format!("auth/{mount}/config"),
            &format!("kubernetes_host={}", server.url()),
            &format!("kubernetes_ca_cert=@{}", ca.display()),
            &format!("token_reviewer_jwt=@{}", reviewer.display()),
            "disable_local_ca_jwt=true",
        ])?;
        Ok(())
    }

    /// Writes the ACL policy `name`; `policy` is its HCL or JSON text.
    pub async fn write_policy(&self, name: &str, policy: &str) -> Result<()> {
        vaultrs::sys::policy::set(&self.client, name, policy)
            .await
            .map_err(|e| vault_error(&format!("writing policy {name}"), e))
    }

    /// Creates a token with exactly `policies` (no `default` policy) and returns it.
    pub async fn create_token(&self, policies: &[&str]) -> Result<String> {
        let mut opts = vaultrs::api::token::requests::CreateTokenRequest::builder();
        opts.policies(policies.iter().map(|p| p.to_string()).collect::<Vec<_>>())
            .no_default_policy(true)
            .ttl("1h");
        vaultrs::token::new(&self.client, Some(&mut opts))
            .await
            .map(|auth| auth.client_token)
            .map_err(|e| vault_error(&format!("creating a token with policies {policies:?}"), e))
    }

    /// A `bao` CLI command aimed at this server as root, for callers that need
    /// stdin or their own environment. It runs in the fixture's folder as its
    /// home, with every inherited `VAULT_*`/`BAO_*` variable removed; the root
    /// token comes from the token helper file there (`~/.vault-token`), so it
    /// is not in the command line or environment that error messages print.
    /// Set `BAO_TOKEN` on the command to act as another token.
    pub fn bao_command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        isolate(&mut cmd, self.dir.path());
        cmd.env("BAO_ADDR", &self.addr);
        cmd
    }

    /// Runs the real `bao` CLI against this server as root (e.g.
    /// `["kv", "put", "-mount=secret", "app", "key=value"]`) and returns its
    /// stdout. Blocks until the CLI exits; a failure carries its stderr.
    pub fn bao(&self, args: &[&str]) -> Result<String> {
        run(self.bao_command().args(args))
    }

    /// Freezes the server (SIGSTOP): connections are still accepted by the
    /// kernel but nothing answers, as with a hung or partitioned Vault.
    pub fn pause(&self) -> Result<()> {
        self.server.pause()
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.server.signal(Signal::SIGCONT)
    }

    /// Stops the server and starts it again on the same port and data, then
    /// unseals it with the key from `operator init`. Only for a persistent
    /// server: restarting an in-memory one would lose everything.
    pub async fn restart(&mut self) -> Result<()> {
        let Some(persistent) = &self.persistent else {
            return Err(Error::Other(
                "restart() needs OpenBao on persistent storage (OpenBao::start_persistent()); \
                 the in-memory dev server would come back empty"
                    .into(),
            ));
        };
        self.server.stop(STOP_GRACE);
        let mut server =
            spawn_server(&self.bin, self.dir.path(), &config_args(&persistent.config))?;
        wait_for_health(
            &mut server,
            &self.addr,
            &[HEALTH_SEALED],
            "restarted OpenBao (listening, sealed)",
            PERSISTENT_START_TIMEOUT,
        )
        .await?;
        unseal(&mut server, &self.addr, &persistent.unseal_key).await?;
        self.server = server;
        Ok(())
    }
}

/// The `bao` binary: the one the caller named, else `$CREDBROKER_BAO`, else `PATH`.
fn resolve_binary(explicit: Option<PathBuf>) -> Result<PathBuf> {
    match explicit {
        None => find_binary("CREDBROKER_BAO", "bao"),
        Some(path) if path.is_file() => Ok(path),
        Some(path) => Err(Error::MissingPart {
            what: "bao".into(),
            hint: format!("{} is not a file; {SETUP_HINT}", path.display()),
        }),
    }
}

fn base_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

async fn start_dev(bin: &Path, dir: &Path, port: u16, extra: Option<&Path>) -> Result<Started> {
    // A root token of its own: if another process's server took our port
    // between choosing and binding it, the token check below fails rather
    // than handing this test someone else's server.
    let root_token = format!(
        "{DEV_ROOT_TOKEN_PREFIX}{:08x}{:08x}",
        crate::random_u32()?,
        crate::random_u32()?
    );
    let mut args = vec![
        "server".to_string(),
        "-dev".into(),
        format!("-dev-listen-address=127.0.0.1:{port}"),
        format!("-dev-root-token-id={root_token}"),
        // The fixture writes the token helper file itself, for both modes.
        "-dev-no-store-token".into(),
    ];
    if let Some(extra) = extra {
        args.push(format!("-config={}", extra.display()));
    }
    // The dev server also binds a cluster listener on port + 1; if that port
    // is taken it only logs an error and serves the API anyway.
    let mut server = spawn_server(bin, dir, &args)?;
    wait_for_health(
        &mut server,
        &base_url(port),
        &[HEALTH_ACTIVE],
        "the OpenBao dev server",
        DEV_START_TIMEOUT,
    )
    .await?;
    verify_own_server(&server, &base_url(port), &root_token).await?;
    Ok(Started {
        server,
        root_token,
        persistent: None,
    })
}

async fn start_persistent(bin: &Path, dir: &Path, port: u16) -> Result<Started> {
    // Raft replicates over the cluster listener even with one node, so it
    // gets its own free port rather than the default port + 1.
    let cluster_port = loop {
        let p = free_port()?;
        if p != port {
            break p;
        }
    };
    // A fresh data folder per attempt: a server that lost a port race may
    // have created one already.
    let data = dir.join("raft");
    if data.exists() {
        std::fs::remove_dir_all(&data)
            .map_err(|e| Error::Io(format!("removing {}", data.display()), e))?;
    }
    std::fs::create_dir(&data).map_err(|e| Error::Io(format!("creating {}", data.display()), e))?;
    let config = dir.join("config.json");
    write_config(&config, &data, port, cluster_port)?;

    let addr = base_url(port);
    let mut server = spawn_server(bin, dir, &config_args(&config))?;
    wait_for_health(
        &mut server,
        &addr,
        &[HEALTH_NOT_INITIALIZED],
        "OpenBao on raft storage (listening, uninitialised)",
        PERSISTENT_START_TIMEOUT,
    )
    .await?;

    // `operator init` with a single key share: one key unseals, which is all a
    // test server needs; the key stays in this process's memory only.
    let anonymous = vault_client(&addr, "", PERSISTENT_START_TIMEOUT)?;
    let init = vaultrs::sys::start_initialization(&anonymous, 1, 1, None)
        .await
        .map_err(|e| vault_error("initializing (operator init, 1 key share)", e))?;
    let unseal_key = init
        .keys_base64
        .into_iter()
        .next()
        .ok_or_else(|| Error::Other("OpenBao: operator init returned no unseal key".into()))?;
    unseal(&mut server, &addr, &unseal_key).await?;

    // Match the dev server, so tests read the same paths on either.
    let root = vault_client(&addr, &init.root_token, PERSISTENT_START_TIMEOUT)?;
    mount_kv(&root, KV2_MOUNT, "2").await?;

    Ok(Started {
        server,
        root_token: init.root_token,
        persistent: Some(Persistent { config, unseal_key }),
    })
}

/// The server config, as JSON (which OpenBao reads like HCL) so that no value
/// is spliced into config syntax by hand.
fn write_config(config: &Path, data: &Path, port: u16, cluster_port: u16) -> Result<()> {
    let json = serde_json::json!({
        "storage": { "raft": {
            "path": data,
            "node_id": "credbroker-test",
            // Raft timings scale with this (default 5): 1 makes the single
            // node elect itself in about a second instead of ten.
            "performance_multiplier": 1,
        }},
        "listener": [{ "tcp": {
            "address": format!("127.0.0.1:{port}"),
            "cluster_address": format!("127.0.0.1:{cluster_port}"),
            "tls_disable": true,
        }}],
        "api_addr": base_url(port),
        "cluster_addr": format!("https://127.0.0.1:{cluster_port}"),
        "ui": false,
    });
    let text = serde_json::to_vec_pretty(&json)
        .map_err(|e| Error::Other(format!("serialising the OpenBao config: {e}")))?;
    std::fs::write(config, text).map_err(|e| Error::Io(format!("writing {}", config.display()), e))
}

fn config_args(config: &Path) -> [String; 2] {
    [
        "server".to_string(),
        format!("-config={}", config.display()),
    ]
}

fn spawn_server(bin: &Path, dir: &Path, args: &[String]) -> Result<ChildGuard> {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    isolate(&mut cmd, dir);
    ChildGuard::spawn("bao-server", cmd)
}

/// Keeps a `bao` process to the fixture: its folder as working directory and
/// home (so no token helper file of the user's is read or written), and no
/// inherited variable that could point it at another server or token.
fn isolate(cmd: &mut Command, dir: &Path) {
    for (name, _) in std::env::vars_os() {
        let inherited = name
            .to_str()
            .is_some_and(|n| n.starts_with("VAULT_") || n.starts_with("BAO_"));
        if inherited {
            cmd.env_remove(&name);
        }
    }
    cmd.env("HOME", dir).current_dir(dir);
}

/// `~/.vault-token` in the fixture's home, the default token helper's file,
/// so the CLI is root without the token on a command line.
fn write_token_helper_file(home: &Path, token: &str) -> Result<()> {
    let path = home.join(".vault-token");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::Io(format!("creating {}", path.display()), e))?;
    file.write_all(token.as_bytes())
        .map_err(|e| Error::Io(format!("writing {}", path.display()), e))
}

async fn unseal(server: &mut ChildGuard, addr: &str, key: &str) -> Result<()> {
    let anonymous = vault_client(addr, "", PERSISTENT_START_TIMEOUT)?;
    vaultrs::sys::unseal(&anonymous, Some(key.to_string()), None, None)
        .await
        .map_err(|e| vault_error("unsealing", e))?;
    wait_for_health(
        server,
        addr,
        &[HEALTH_ACTIVE],
        "OpenBao after unseal (active)",
        PERSISTENT_START_TIMEOUT,
    )
    .await
    .map(drop)
}

async fn mount_kv(client: &VaultClient, path: &str, version: &str) -> Result<()> {
    let mut opts = vaultrs::api::sys::requests::EnableEngineRequest::builder();
    opts.options(HashMap::from([(
        "version".to_string(),
        version.to_string(),
    )]));
    vaultrs::sys::mount::enable(client, path, "kv", Some(&mut opts))
        .await
        .map_err(|e| vault_error(&format!("mounting KV v{version} at {path}/"), e))?;
    if version == "2" {
        // A new KV v2 mount upgrades its storage in the background and
        // answers 400 "Upgrading from non-versioned to versioned data" until
        // done; hand it over only once it serves reads.
        crate::wait_until(
            &format!("KV v2 at {path}/ to finish upgrading"),
            Duration::from_secs(30),
            || async {
                match vaultrs::kv2::read_metadata(client, path, "credbroker-fixture-probe").await {
                    Ok(_) | Err(ClientError::APIError { code: 404, .. }) => Ok(()),
                    Err(e) => Err(error_chain(&e)),
                }
            },
        )
        .await?;
    }
    Ok(())
}

/// Polls `/v1/sys/health` until it answers one of `want`. Unlike
/// [`crate::wait_until`] it stops at once, with the server's output, if the
/// process exits: a server that cannot bind its port dies in milliseconds and
/// must not cost a minute of polling.
async fn wait_for_health(
    server: &mut ChildGuard,
    addr: &str,
    want: &[u16],
    what: &str,
    timeout: Duration,
) -> Result<u16> {
    let http = http_client(HEALTH_PROBE_TIMEOUT)?;
    let url = format!("{addr}/v1/sys/health");
    let deadline = Instant::now() + timeout;
    loop {
        server.check_running()?;
        let last = match http.get(&url).send().await {
            Ok(resp) if want.contains(&resp.status().as_u16()) => {
                return Ok(resp.status().as_u16());
            }
            Ok(resp) => format!("{url} answered HTTP {}", resp.status()),
            Err(e) => error_chain(&e),
        };
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                after: timeout,
                last: format!(
                    "{last}; its output ends with:\n{}",
                    server.output_tail(4000)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `e` is a server that died because its port was taken meanwhile.
fn lost_port_race(e: &Error) -> bool {
    match e {
        Error::ProcessExited { output, .. } => output.contains("address already in use"),
        Error::Other(message) => message.contains("address already in use"),
        _ => false,
    }
}

/// Checks the server answering on our port is ours: still running, and it
/// knows our root token.
async fn verify_own_server(server: &ChildGuard, addr: &str, token: &str) -> Result<()> {
    let resp = http_client(HEALTH_PROBE_TIMEOUT)?
        .get(format!("{addr}/v1/auth/token/lookup-self"))
        .header("X-Vault-Token", token)
        .send()
        .await
        .map_err(|e| Error::Other(format!("checking the token on {addr}: {}", error_chain(&e))))?;
    server.check_running()?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(Error::Other(format!(
            "another server answers on {addr} (address already in use): it refused our root token"
        )))
    }
}

/// A `reqwest` client for loopback: no proxy, a timeout on every request.
fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    // reqwest asks rustls for the process-wide crypto provider. Install ring,
    // the workspace's provider; an error only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        // reqwest would send even 127.0.0.1 through HTTP_PROXY: the root token
        // must not leave the machine, and a proxy would break pause() tests.
        .no_proxy()
        .timeout(timeout)
        // Plain HTTP only; empty roots also spare loading the platform verifier.
        .tls_certs_only(Vec::new())
        .build()
        .map_err(|e| {
            Error::Other(format!(
                "building an HTTP client for OpenBao: {}",
                error_chain(&e)
            ))
        })
}

/// A vaultrs client for `addr`, built field by field rather than with
/// `VaultClient::new`, which reads `VAULT_*` variables and honours proxies.
fn vault_client(addr: &str, token: &str, timeout: Duration) -> Result<VaultClient> {
    let settings = VaultClientSettingsBuilder::default()
        .address(addr)
        .token(token)
        .timeout(Some(timeout))
        .verify(true)
        .ca_certs(Vec::new())
        .identity(None)
        .build()
        .map_err(|e| Error::Other(format!("OpenBao client settings for {addr}: {e}")))?;
    let middle = EndpointMiddleware {
        token: token.to_string(),
        version: format!("v{}", settings.version),
        wrap: None,
        namespace: None,
    };
    let http = rustify::clients::reqwest::Client::new(addr, http_client(timeout)?);
    Ok(VaultClient {
        http,
        middle,
        settings,
    })
}

/// An error from OpenBao or the client, naming what the fixture was doing.
/// Only `Display` texts are used: some vaultrs errors carry the response body.
fn vault_error(what: &str, e: ClientError) -> Error {
    let detail = match &e {
        ClientError::APIError { code, errors } => format!("HTTP {code}: {}", errors.join("; ")),
        other => error_chain(other),
    };
    Error::Other(format!("OpenBao: {what}: {detail}"))
}

/// `e` and its sources, joined by `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
