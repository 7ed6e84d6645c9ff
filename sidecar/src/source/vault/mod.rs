//! Secrets from HashiCorp Vault or OpenBao (DESIGN.md section 5).
//!
//! - [`VaultArgs`]: the `--vault-*` flags, checked by
//!   [`VaultSettings::from_args`] before anything starts, so a bad setting
//!   fails start-up naming the flag;
//! - [`auth`]: the token's life (login, renewal, re-login, revocation);
//! - [`client`]: the HTTP edge; [`response`]: parsing Vault's answers.
//!
//! Reads, per binding:
//! - **KV v2**: `GET <mount>/metadata/<path>` every `refreshInterval`; the
//!   data (`GET <mount>/data/<path>?version=N`) only when the current
//!   version, or its `deletion_time` / `destroyed`, changed. A deleted or
//!   destroyed current version fails the binding closed.
//! - **KV v1**: `GET <mount>/<path>`, compared by a keyed hash.
//!
//! A 403 is checked against the token (`lookup-self`): a token that is
//! gone means a new login and one retry; a live token means the policy
//! refuses (fail closed). No answer body is ever logged: errors name the
//! step, the path and the status.

pub mod auth;
pub mod client;
pub mod response;

use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use credbroker_crds::VaultSecretRef;
use http::Method;

use self::auth::{Auth, AuthError, Credentials, RoleFrom, Session, TokenFrom};
use self::client::{Answer, VaultAddr, VaultHttp, VaultTls};
use super::kv::{KeyError, extract_key_at};
use super::{BoxFuture, Fetched, Revision, SecretSource, SourceError, display_path};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// The projected service-account token's default path in a pod.
pub const DEFAULT_JWT_FILE: &str = "/var/run/secrets/credbroker/token";
/// The environment variable a token may come from (`--vault-auth token`).
/// Not a flag: a flag's value shows in the process list.
pub const TOKEN_ENV: &str = "CREDBROKER_VAULT_TOKEN";

/// Vault auth methods. There is no default: the method is always chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMethod {
    Kubernetes,
    Jwt,
    Approle,
    Token,
}

/// The `--vault-*` flags (each also a `CREDBROKER_VAULT_*` variable).
#[derive(Debug, Clone, clap::Args)]
pub struct VaultArgs {
    /// Vault's address, `https://host:port` (`http://` only in local mode,
    /// with --vault-allow-http).
    #[arg(long, env = "CREDBROKER_VAULT_ADDR")]
    pub vault_addr: Option<String>,

    /// How to log in to Vault: kubernetes, jwt, approle or token. Required
    /// with --secret-source vault; never guessed.
    #[arg(long, env = "CREDBROKER_VAULT_AUTH", value_enum)]
    pub vault_auth: Option<AuthMethod>,

    /// Where the auth method is mounted (default: its name, e.g.
    /// `kubernetes` for auth/kubernetes).
    #[arg(long, env = "CREDBROKER_VAULT_AUTH_MOUNT")]
    pub vault_auth_mount: Option<String>,

    /// The role to log in as (kubernetes, jwt). In proxy mode, without it,
    /// the role is the `vaultRole` the controller wrote into the bindings,
    /// re-read at every login.
    #[arg(long, env = "CREDBROKER_VAULT_ROLE")]
    pub vault_role: Option<String>,

    /// The service-account token to log in with (kubernetes, jwt), re-read
    /// at every login. Default: /var/run/secrets/credbroker/token.
    #[arg(long, env = "CREDBROKER_VAULT_JWT_FILE")]
    pub vault_jwt_file: Option<PathBuf>,

    /// The AppRole role_id (approle).
    #[arg(long, env = "CREDBROKER_VAULT_ROLE_ID")]
    pub vault_role_id: Option<String>,

    /// A file holding the AppRole secret_id (approle), read at every login.
    #[arg(long, env = "CREDBROKER_VAULT_SECRET_ID_FILE")]
    pub vault_secret_id_file: Option<PathBuf>,

    /// A file holding a Vault token (token); else the token is read from
    /// the CREDBROKER_VAULT_TOKEN variable.
    #[arg(long, env = "CREDBROKER_VAULT_TOKEN_FILE")]
    pub vault_token_file: Option<PathBuf>,

    /// The Vault namespace (sent as X-Vault-Namespace).
    #[arg(long, env = "CREDBROKER_VAULT_NAMESPACE")]
    pub vault_namespace: Option<String>,

    /// PEM CA certificates to verify Vault with (instead of the system
    /// roots).
    #[arg(
        long,
        env = "CREDBROKER_VAULT_CA_FILE",
        conflicts_with = "vault_ca_pem"
    )]
    pub vault_ca_file: Option<PathBuf>,

    /// The same CA as PEM text: how the webhook hands a pod Vault's CA
    /// (a public certificate) without a volume in every namespace.
    #[arg(long, env = "CREDBROKER_VAULT_CA_PEM", hide_env_values = true)]
    pub vault_ca_pem: Option<String>,

    /// Local mode only: allow an http:// Vault address (the token and the
    /// secrets then cross the network in cleartext).
    #[arg(long, env = "CREDBROKER_VAULT_ALLOW_HTTP")]
    pub vault_allow_http: bool,

    /// Local mode only: accept any certificate from Vault.
    #[arg(long, env = "CREDBROKER_VAULT_TLS_SKIP_VERIFY")]
    pub vault_tls_skip_verify: bool,

    /// The longest one request to Vault may take.
    #[arg(long, env = "CREDBROKER_VAULT_TIMEOUT", value_parser = crate::config::positive_duration,
          default_value = "10s")]
    pub vault_timeout: Duration,
}

/// The checked Vault settings.
pub struct VaultSettings {
    pub addr: VaultAddr,
    pub tls: VaultTls,
    pub namespace: Option<String>,
    pub credentials: Credentials,
    pub timeout: Duration,
    /// How long a KV v2 value is confirmed by its metadata alone before its
    /// data is read again (so a policy that drops read on `data/` but keeps
    /// `metadata/` takes effect): `--max-staleness`.
    pub data_recheck: Duration,
}

fn config_error(text: String) -> Error {
    Error::Config(text)
}

impl VaultSettings {
    /// Checks the flags (and reads the CA file): every error names the
    /// flag. `local`: local mode, the only one that may weaken transport
    /// security, and then only when asked and with a loud warning.
    /// `token_env`: the CREDBROKER_VAULT_TOKEN variable's value.
    /// `bindings_file`: proxy mode's bindings, where the role is read from
    /// when `--vault-role` is not given.
    pub fn from_args(
        args: &VaultArgs,
        local: bool,
        token_env: Option<crate::secret::SecretValue>,
        bindings_file: Option<&std::path::Path>,
    ) -> Result<Self> {
        let text = args.vault_addr.as_deref().ok_or_else(|| {
            config_error(
                "--secret-source vault needs --vault-addr (Vault's address, https://host:port)"
                    .into(),
            )
        })?;
        let addr =
            VaultAddr::parse(text).map_err(|e| config_error(format!("--vault-addr: {e}")))?;
        let tls = Self::tls(args, local, &addr)?;
        let namespace = match args.vault_namespace.as_deref().map(|n| n.trim_matches('/')) {
            None | Some("") => None,
            Some(ns) => {
                let ok = ns.split('/').all(|seg| {
                    !seg.is_empty()
                        && seg
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                });
                if !ok {
                    return Err(config_error(format!(
                        "--vault-namespace {ns:?}: must be names of [A-Za-z0-9._-] joined by '/'"
                    )));
                }
                Some(ns.to_owned())
            }
        };
        let credentials = Self::credentials(args, token_env, bindings_file)?;
        Ok(Self {
            addr,
            tls,
            namespace,
            credentials,
            timeout: args.vault_timeout,
            data_recheck: Duration::from_secs(300),
        })
    }

    fn tls(args: &VaultArgs, local: bool, addr: &VaultAddr) -> Result<VaultTls> {
        if !addr.https {
            if !local {
                return Err(config_error(format!(
                    "--vault-addr {}: proxy mode talks to Vault over https:// only (http:// \
                     would carry the Vault token and the secrets in cleartext)",
                    addr.url()
                )));
            }
            if !args.vault_allow_http {
                return Err(config_error(format!(
                    "--vault-addr {}: http:// needs --vault-allow-http (local mode only)",
                    addr.url()
                )));
            }
            tracing::warn!(
                vault = %addr.url(),
                "INSECURE: talking to Vault over cleartext HTTP (--vault-allow-http); the Vault \
                 token and every secret cross the network unencrypted"
            );
            return Ok(VaultTls::Cleartext);
        }
        if args.vault_tls_skip_verify {
            if !local {
                return Err(config_error(
                    "--vault-tls-skip-verify: proxy mode always verifies Vault's certificate"
                        .into(),
                ));
            }
            tracing::warn!(
                vault = %addr.url(),
                "INSECURE: not verifying Vault's certificate (--vault-tls-skip-verify); anyone \
                 on the path can impersonate Vault and read the token"
            );
            return client::unverified_config()
                .map(VaultTls::Verified)
                .map_err(|e| config_error(format!("--vault-tls-skip-verify: {e}")));
        }
        let roots = match &args.vault_ca_file {
            None if args.vault_ca_pem.is_some() => {
                let pem = args.vault_ca_pem.as_deref().unwrap_or_default();
                crate::tls::parse_pem_certs(pem, "--vault-ca-pem")?
            }
            Some(file) => {
                let pem = std::fs::read_to_string(file).map_err(|e| {
                    config_error(format!("--vault-ca-file {}: {e}", file.display()))
                })?;
                crate::tls::parse_pem_certs(&pem, &format!("--vault-ca-file {}", file.display()))?
            }
            None => crate::tls::system_roots()
                .map_err(|e| config_error(format!("verifying Vault (no --vault-ca-file): {e}")))?,
        };
        client::verified_config(&roots)
            .map(VaultTls::Verified)
            .map_err(|e| config_error(format!("--vault-ca-file: {e}")))
    }

    fn credentials(
        args: &VaultArgs,
        token_env: Option<crate::secret::SecretValue>,
        bindings_file: Option<&std::path::Path>,
    ) -> Result<Credentials> {
        let method = args.vault_auth.ok_or_else(|| {
            config_error(
                "--secret-source vault needs --vault-auth (kubernetes, jwt, approle or token); \
                 credbroker never guesses how to log in"
                    .into(),
            )
        })?;
        let name = match method {
            AuthMethod::Kubernetes => "kubernetes",
            AuthMethod::Jwt => "jwt",
            AuthMethod::Approle => "approle",
            AuthMethod::Token => "token",
        };
        // A flag of another method is a mistake worth stopping for: the
        // user meant something this configuration does not do.
        let given: [(&str, bool, &[AuthMethod]); 6] = [
            (
                "--vault-role",
                args.vault_role.is_some(),
                &[AuthMethod::Kubernetes, AuthMethod::Jwt],
            ),
            (
                "--vault-jwt-file",
                args.vault_jwt_file.is_some(),
                &[AuthMethod::Kubernetes, AuthMethod::Jwt],
            ),
            (
                "--vault-role-id",
                args.vault_role_id.is_some(),
                &[AuthMethod::Approle],
            ),
            (
                "--vault-secret-id-file",
                args.vault_secret_id_file.is_some(),
                &[AuthMethod::Approle],
            ),
            (
                "--vault-token-file",
                args.vault_token_file.is_some(),
                &[AuthMethod::Token],
            ),
            (
                "--vault-auth-mount",
                args.vault_auth_mount.is_some(),
                &[AuthMethod::Kubernetes, AuthMethod::Jwt, AuthMethod::Approle],
            ),
        ];
        for (flag, set, applies) in given {
            if set && !applies.contains(&method) {
                return Err(config_error(format!(
                    "{flag} does not apply to --vault-auth {name}"
                )));
            }
        }
        let mount = args
            .vault_auth_mount
            .clone()
            .unwrap_or_else(|| name.to_owned());
        let mount = mount.trim_matches('/').to_owned();
        if !mount.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        }) {
            return Err(config_error(format!(
                "--vault-auth-mount {mount:?}: must be names of [A-Za-z0-9._-] joined by '/'"
            )));
        }
        let readable = |flag: &str, path: &PathBuf| -> Result<()> {
            let file = std::fs::File::open(path)
                .map_err(|e| config_error(format!("{flag} {}: {e}", path.display())))?;
            if file.metadata().is_ok_and(|m| m.len() == 0) {
                return Err(config_error(format!(
                    "{flag} {}: the file is empty",
                    path.display()
                )));
            }
            Ok(())
        };
        Ok(match method {
            AuthMethod::Kubernetes | AuthMethod::Jwt => {
                let role = match (
                    args.vault_role.clone().filter(|r| !r.is_empty()),
                    bindings_file,
                ) {
                    (Some(role), _) => RoleFrom::Flag(role),
                    (None, Some(file)) => RoleFrom::Bindings(file.to_path_buf()),
                    (None, None) => {
                        return Err(config_error(format!(
                            "--vault-auth {name} needs --vault-role"
                        )));
                    }
                };
                let jwt_file = args
                    .vault_jwt_file
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_JWT_FILE));
                readable("--vault-jwt-file", &jwt_file)?;
                if method == AuthMethod::Kubernetes {
                    Credentials::Kubernetes {
                        mount,
                        role,
                        jwt_file,
                    }
                } else {
                    Credentials::Jwt {
                        mount,
                        role,
                        jwt_file,
                    }
                }
            }
            AuthMethod::Approle => {
                let role_id = args
                    .vault_role_id
                    .clone()
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| {
                        config_error("--vault-auth approle needs --vault-role-id".into())
                    })?;
                let secret_id_file = args.vault_secret_id_file.clone().ok_or_else(|| {
                    config_error("--vault-auth approle needs --vault-secret-id-file".into())
                })?;
                readable("--vault-secret-id-file", &secret_id_file)?;
                Credentials::AppRole {
                    mount,
                    role_id,
                    secret_id_file,
                }
            }
            AuthMethod::Token => match (&args.vault_token_file, token_env) {
                (Some(_), Some(_)) => {
                    return Err(config_error(format!(
                        "--vault-auth token: give --vault-token-file or {TOKEN_ENV}, not both"
                    )));
                }
                (Some(file), None) => {
                    readable("--vault-token-file", file)?;
                    Credentials::Token(TokenFrom::File(file.clone()))
                }
                (None, Some(value)) if !value.is_empty() => {
                    Credentials::Token(TokenFrom::Env(value))
                }
                (None, _) => {
                    return Err(config_error(format!(
                        "--vault-auth token needs --vault-token-file or {TOKEN_ENV}"
                    )));
                }
            },
        })
    }
}

/// Reads secrets from Vault.
pub struct VaultSource {
    http: Arc<VaultHttp>,
    auth: Arc<Auth>,
    /// Keys the KV v1 change-detection hash and the KV v2 revision marker;
    /// random per process, never printed.
    hasher: std::collections::hash_map::RandomState,
    data_recheck: Duration,
    /// Per KV v2 secret and key: when its data was last read, and a keyed
    /// hash of the value then.
    data_checked: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
}

impl VaultSource {
    pub fn new(settings: VaultSettings, metrics: Arc<Metrics>) -> Result<Self> {
        let http = Arc::new(
            VaultHttp::new(
                settings.addr,
                settings.tls,
                settings.namespace.as_deref(),
                settings.timeout,
                metrics,
            )
            .map_err(config_error)?,
        );
        let auth = Auth::new(http.clone(), settings.credentials);
        Ok(Self {
            http,
            auth,
            hasher: Default::default(),
            data_recheck: settings.data_recheck,
            data_checked: Default::default(),
        })
    }

    /// A GET with the token; a 403 is checked against the token once (see
    /// the module docs). Non-2xx answers other than 404 are errors here.
    async fn get(
        &self,
        op: &'static str,
        api_path: &str,
        path: &str,
    ) -> Result<Answer, SourceError> {
        let session = self.session(path).await?;
        let answer = self.call(op, api_path, path, &session).await?;
        if answer.status != 403 {
            return Ok(answer);
        }
        let retry = self
            .auth
            .after_denial(&session)
            .await
            .map_err(|e| auth_failure(path, e))?;
        match retry {
            Some(fresh) => self.call(op, api_path, path, &fresh).await,
            None => Ok(answer),
        }
    }

    async fn session(&self, path: &str) -> Result<Arc<Session>, SourceError> {
        self.auth.session().await.map_err(|e| auth_failure(path, e))
    }

    async fn call(
        &self,
        op: &'static str,
        api_path: &str,
        path: &str,
        session: &Session,
    ) -> Result<Answer, SourceError> {
        let answer = self
            .http
            .call(op, Method::GET, api_path, Some(&session.token), None)
            .await
            .map_err(|reason| SourceError::Unreachable {
                path: path.to_owned(),
                reason,
            })?;
        match answer.status {
            200 | 403 | 404 => Ok(answer),
            // Anything else (429, 5xx, a standby's redirect, KV v2's 400
            // while a mount upgrades) says nothing about the secret: keep
            // the last good value until it is too stale.
            s => Err(SourceError::Unreachable {
                path: path.to_owned(),
                reason: format!("Vault answered HTTP {s} to GET {api_path}"),
            }),
        }
    }

    async fn read_v2(
        &self,
        secret: &VaultSecretRef,
        known: Option<Revision>,
    ) -> Result<Fetched, SourceError> {
        let path = display_path(secret);
        let meta_path = format!("{}/metadata/{}", secret.mount, secret.path);
        let answer = self.get("kv_metadata", &meta_path, &path).await?;
        match answer.status {
            403 => {
                return Err(SourceError::PermissionDenied {
                    detail: format!(
                        " (GET {meta_path}, with a valid token: a KV v2 binding needs read on \
                         {m}/data/{p} and {m}/metadata/{p}; is {m} a KV v2 mount?)",
                        m = secret.mount,
                        p = secret.path
                    ),
                    path,
                });
            }
            404 => {
                return Err(SourceError::NotFound {
                    detail: format!(
                        " (GET {meta_path}: no such secret, or {} is not a KV v2 mount)",
                        secret.mount
                    ),
                    path,
                });
            }
            _ => {}
        }
        let current =
            response::current_version(&answer.body).map_err(|reason| SourceError::Malformed {
                path: path.clone(),
                reason,
            })?;
        if current.version == 0 {
            return Err(SourceError::NotFound {
                path,
                detail: " (the secret has no version)".into(),
            });
        }
        if current.destroyed {
            return Err(SourceError::Deleted {
                path,
                state: "destroyed",
            });
        }
        if deleted_by_now(&current.deletion_time) {
            return Err(SourceError::Deleted {
                path,
                state: "deleted",
            });
        }
        let revision = Revision::new(
            Some(current.version),
            self.hasher.hash_one((
                current.version,
                &current.deletion_time,
                current.destroyed,
                &current.created_time,
            )),
        );
        let checked_key = format!("{path}#{}", secret.key);
        let unchanged = known == Some(revision);
        if unchanged && self.data_checked_within(&checked_key) {
            return Ok(Fetched::Unchanged);
        }
        let data_path = format!(
            "{}/data/{}?version={}",
            secret.mount, secret.path, current.version
        );
        let answer = self.get("kv_data", &data_path, &path).await?;
        match answer.status {
            403 => {
                return Err(SourceError::PermissionDenied {
                    detail: format!(
                        " (GET {m}/data/{p}, with a valid token: the policy grants the metadata \
                         but not read on {m}/data/{p})",
                        m = secret.mount,
                        p = secret.path
                    ),
                    path,
                });
            }
            // Deleted between the two reads.
            404 => {
                return Err(SourceError::Deleted {
                    path,
                    state: "deleted",
                });
            }
            _ => {}
        }
        let value = key_of(&answer.body, &["data", "data"], secret, &path)?;
        let hash = self.hasher.hash_one(value.expose_secret());
        let before = self
            .data_checked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(checked_key, (std::time::Instant::now(), hash));
        if unchanged && before.is_some_and(|(_, h)| h == hash) {
            // The periodic re-read of the data: still readable, same value.
            return Ok(Fetched::Unchanged);
        }
        Ok(Fetched::Value { value, revision })
    }

    /// Whether this secret's data was read within `data_recheck`.
    fn data_checked_within(&self, key: &str) -> bool {
        self.data_checked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .is_some_and(|(at, _)| at.elapsed() < self.data_recheck)
    }

    async fn read_v1(
        &self,
        secret: &VaultSecretRef,
        known: Option<Revision>,
    ) -> Result<Fetched, SourceError> {
        let path = display_path(secret);
        let api_path = format!("{}/{}", secret.mount, secret.path);
        let answer = self.get("kv_read", &api_path, &path).await?;
        match answer.status {
            403 => {
                return Err(SourceError::PermissionDenied {
                    detail: format!(
                        " (GET {api_path}, with a valid token: a KV v1 binding needs read on \
                         {api_path}; is {} a KV v1 mount?)",
                        secret.mount
                    ),
                    path,
                });
            }
            404 => {
                return Err(SourceError::NotFound {
                    detail: format!(" (GET {api_path})"),
                    path,
                });
            }
            _ => {}
        }
        let value = key_of(&answer.body, &["data"], secret, &path)?;
        let revision = Revision::new(None, self.hasher.hash_one(value.expose_secret()));
        if known == Some(revision) {
            return Ok(Fetched::Unchanged);
        }
        Ok(Fetched::Value { value, revision })
    }
}

/// Whether an RFC 3339 `deletion_time` has passed (an empty one never
/// does; one that cannot be read counts as passed: fail closed).
fn deleted_by_now(deletion_time: &str) -> bool {
    if deletion_time.is_empty() {
        return false;
    }
    match time::OffsetDateTime::parse(
        deletion_time,
        &time::format_description::well_known::Rfc3339,
    ) {
        Ok(at) => at <= time::OffsetDateTime::now_utc(),
        Err(_) => true,
    }
}

fn key_of(
    body: &[u8],
    at: &[&str],
    secret: &VaultSecretRef,
    path: &str,
) -> Result<crate::secret::SecretValue, SourceError> {
    extract_key_at(body, at, &secret.key).map_err(|e| match e {
        KeyError::Missing => SourceError::KeyMissing {
            path: path.to_owned(),
            key: secret.key.clone(),
        },
        KeyError::NotAString(kind) => SourceError::NotAString {
            path: path.to_owned(),
            key: secret.key.clone(),
            kind,
        },
        KeyError::Repeated => SourceError::Malformed {
            path: path.to_owned(),
            reason: format!("key {:?} appears more than once", secret.key),
        },
        KeyError::Malformed(reason) => SourceError::Malformed {
            path: path.to_owned(),
            reason,
        },
    })
}

fn auth_failure(path: &str, e: AuthError) -> SourceError {
    if e.unreachable {
        SourceError::Unreachable {
            path: path.to_owned(),
            reason: e.reason,
        }
    } else {
        SourceError::AuthRefused {
            path: path.to_owned(),
            reason: e.reason,
        }
    }
}

impl SecretSource for VaultSource {
    fn kind(&self) -> &'static str {
        "vault"
    }

    fn read<'a>(
        &'a self,
        secret: &'a VaultSecretRef,
        known: Option<Revision>,
    ) -> BoxFuture<'a, Result<Fetched, SourceError>> {
        Box::pin(async move {
            match secret.kv_version {
                1 => self.read_v1(secret, known).await,
                _ => self.read_v2(secret, known).await,
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.auth.revoke())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        vault: VaultArgs,
    }

    fn settings(args: &[&str], local: bool) -> Result<VaultSettings> {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .map_err(|e| Error::Config(e.to_string()))?;
        VaultSettings::from_args(&cli.vault, local, None, None)
    }

    fn error(args: &[&str], local: bool) -> String {
        match settings(args, local) {
            Ok(_) => panic!("{args:?}: accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_bad_setting_names_its_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let file = file.to_str().unwrap();
        let missing = dir.path().join("missing");
        let missing = missing.to_str().unwrap();
        let https = ["--vault-addr", "https://127.0.0.1:8200"];
        let cases: Vec<(Vec<&str>, bool, &str)> = vec![
            (vec!["--vault-auth", "token"], false, "--vault-addr"),
            (
                vec!["--vault-addr", "http://vault:8200", "--vault-auth", "token"],
                false,
                "proxy mode talks to Vault over https:// only",
            ),
            (
                vec!["--vault-addr", "http://vault:8200", "--vault-auth", "token"],
                true,
                "--vault-allow-http",
            ),
            (
                [
                    &https[..],
                    &["--vault-tls-skip-verify", "--vault-auth", "token"],
                ]
                .concat(),
                false,
                "--vault-tls-skip-verify",
            ),
            (https.to_vec(), false, "--vault-auth"),
            (
                [
                    &https[..],
                    &["--vault-auth", "approle", "--vault-secret-id-file", file],
                ]
                .concat(),
                false,
                "--vault-role-id",
            ),
            (
                [
                    &https[..],
                    &[
                        "--vault-auth",
                        "approle",
                        "--vault-role-id",
                        "r",
                        "--vault-secret-id-file",
                        missing,
                    ],
                ]
                .concat(),
                false,
                "--vault-secret-id-file",
            ),
            (
                [
                    &https[..],
                    &["--vault-auth", "kubernetes", "--vault-jwt-file", file],
                ]
                .concat(),
                false,
                "--vault-role",
            ),
            (
                [
                    &https[..],
                    &[
                        "--vault-auth",
                        "jwt",
                        "--vault-role",
                        "r",
                        "--vault-jwt-file",
                        missing,
                    ],
                ]
                .concat(),
                false,
                "--vault-jwt-file",
            ),
            (
                [&https[..], &["--vault-auth", "token"]].concat(),
                false,
                "--vault-token-file or CREDBROKER_VAULT_TOKEN",
            ),
            (
                [
                    &https[..],
                    &[
                        "--vault-auth",
                        "token",
                        "--vault-token-file",
                        file,
                        "--vault-role",
                        "x",
                    ],
                ]
                .concat(),
                false,
                "--vault-role does not apply to --vault-auth token",
            ),
            (
                [
                    &https[..],
                    &[
                        "--vault-auth",
                        "token",
                        "--vault-token-file",
                        file,
                        "--vault-ca-file",
                        missing,
                    ],
                ]
                .concat(),
                false,
                "--vault-ca-file",
            ),
            (
                [
                    &https[..],
                    &[
                        "--vault-auth",
                        "token",
                        "--vault-token-file",
                        file,
                        "--vault-namespace",
                        "a b",
                    ],
                ]
                .concat(),
                false,
                "--vault-namespace",
            ),
            (
                [&https[..], &["--vault-auth", "ldap"]].concat(),
                false,
                "--vault-auth",
            ),
        ];
        for (args, local, want) in cases {
            let e = error(&args, local);
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn good_settings_pass() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let file = file.to_str().unwrap();
        let s = settings(
            &[
                "--vault-addr",
                "http://127.0.0.1:8200",
                "--vault-allow-http",
                "--vault-auth",
                "approle",
                "--vault-role-id",
                "r",
                "--vault-secret-id-file",
                file,
                "--vault-namespace",
                "/team-a/",
            ],
            true,
        )
        .unwrap();
        assert_eq!(s.namespace.as_deref(), Some("team-a"));
        assert_eq!(s.credentials.method(), "approle");
    }

    #[test]
    fn deletion_times_count_once_passed() {
        assert!(!deleted_by_now(""));
        assert!(deleted_by_now("2020-01-01T00:00:00Z"));
        assert!(!deleted_by_now("2999-01-01T00:00:00.123456Z"));
        assert!(deleted_by_now("garbage"));
    }
}
