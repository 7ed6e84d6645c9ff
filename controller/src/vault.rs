//! The controller's edge toward Vault: its own login, and the few calls it
//! makes. It reads ACL policies, Kubernetes-auth roles and KV v2 metadata;
//! it writes and deletes only `credbroker-*` policies and roles. It never
//! reads KV data, so it never holds a secret value.
//!
//! Its own token and AppRole secret-id are held in [`Token`], which does
//! not print and is wiped on drop. Errors carry Vault's error strings and
//! the address, never a body.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::desired::KubernetesRole;
use crate::metrics::Metrics;
use crate::{Error, Result};

/// The largest answer read from Vault: a LIST of every policy of a big
/// shared Vault fits.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// A Vault token or AppRole secret-id: no `Debug`, no `Display`, wiped on drop.
#[derive(Clone)]
pub struct Token(Arc<Zeroizing<String>>);

impl Token {
    pub fn new(value: String) -> Self {
        Self(Arc::new(Zeroizing::new(value)))
    }

    fn header(&self) -> Result<HeaderValue> {
        let mut value = HeaderValue::from_str(self.0.trim())
            .map_err(|_| Error::config("Vault token", "is not a valid header value"))?;
        value.set_sensitive(true);
        Ok(value)
    }
}

/// How the controller logs in to Vault.
pub enum VaultAuth {
    /// Kubernetes auth with its own ServiceAccount token, re-read at every login.
    Kubernetes {
        mount: String,
        role: String,
        jwt_file: PathBuf,
    },
    /// AppRole: a role id and a secret-id file (development, or Vault outside Kubernetes).
    AppRole {
        mount: String,
        role_id: String,
        secret_id_file: PathBuf,
    },
    /// A token, as given (development).
    Token(Token),
}

impl VaultAuth {
    fn method(&self) -> &'static str {
        match self {
            Self::Kubernetes { .. } => "kubernetes",
            Self::AppRole { .. } => "approle",
            Self::Token(_) => "token",
        }
    }
}

/// Where Vault is and how to reach it.
pub struct VaultSettings {
    /// `https://host:port` (or `http://` with `allow_http`).
    pub addr: String,
    pub auth: VaultAuth,
    /// `X-Vault-Namespace` (Vault Enterprise / OpenBao namespaces).
    pub namespace: Option<String>,
    /// Extra CA certificates (PEM) trusted for Vault, added to the system roots.
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    /// Allow `http://` (development only).
    pub allow_http: bool,
}

/// What KV v2 metadata says of a secret's current version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMetadata {
    pub current_version: u64,
    /// The current version is soft-deleted or destroyed.
    pub gone: bool,
}

struct Session {
    token: Token,
    /// When to log in again: two thirds into the token's TTL. `None` for a
    /// token that does not expire.
    refresh_at: Option<Instant>,
}

/// One client for one Vault, shared by every reconcile.
pub struct VaultClient {
    http: reqwest::Client,
    base: String,
    namespace: Option<HeaderValue>,
    auth: VaultAuth,
    session: tokio::sync::Mutex<Option<Session>>,
    metrics: Arc<Metrics>,
}

impl VaultClient {
    pub fn new(settings: VaultSettings, metrics: Arc<Metrics>) -> Result<Self> {
        let addr = settings.addr.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&addr)
            .map_err(|_| Error::config("--vault-addr", format!("{addr:?} is not a URL")))?;
        match url.scheme() {
            "https" => {}
            "http" if settings.allow_http => {}
            "http" => {
                return Err(Error::config(
                    "--vault-addr",
                    format!(
                        "{addr} is cleartext: use https://, or --vault-allow-http for development"
                    ),
                ));
            }
            _ => {
                return Err(Error::config(
                    "--vault-addr",
                    format!("{addr:?} must start with https://"),
                ));
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Error::config("--vault-addr", "must not carry credentials"));
        }
        if url.path() != "/" || url.query().is_some() {
            return Err(Error::config(
                "--vault-addr",
                format!("{addr} must be only scheme, host and port"),
            ));
        }
        // reqwest asks rustls for the process-wide provider; an error only
        // means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            // Vault is dialled directly, like the sidecar does: a proxy
            // would see the controller's token.
            .no_proxy()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .https_only(!settings.allow_http);
        if let Some(file) = &settings.ca_file {
            let pem = std::fs::read(file).map_err(|e| {
                Error::config(format!("--vault-ca-file {}", file.display()), e.to_string())
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
                Error::config(
                    format!("--vault-ca-file {}", file.display()),
                    "holds no PEM certificate",
                )
            })?;
            if certs.is_empty() {
                return Err(Error::config(
                    format!("--vault-ca-file {}", file.display()),
                    "holds no PEM certificate",
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| Error::config("the Vault HTTP client", e.to_string()))?;
        let namespace = settings
            .namespace
            .as_deref()
            .map(|ns| {
                HeaderValue::from_str(ns).map_err(|_| {
                    Error::config("--vault-namespace", format!("{ns:?} is not a header value"))
                })
            })
            .transpose()?;
        Ok(Self {
            http,
            base: addr,
            namespace,
            auth: settings.auth,
            session: tokio::sync::Mutex::new(None),
            metrics,
        })
    }

    pub fn addr(&self) -> &str {
        &self.base
    }

    /// Logs in now (at startup, to fail early with a clear error).
    pub async fn login(&self) -> Result<()> {
        self.token(true).await.map(|_| ())
    }

    /// Revokes the controller's token (not a given `--vault-token`), on shutdown.
    pub async fn revoke(&self) {
        if matches!(self.auth, VaultAuth::Token(_)) {
            return;
        }
        let session = self.session.lock().await.take();
        if let Some(session) = session {
            let _ = self
                .send(
                    "revoke-self",
                    Method::POST,
                    "auth/token/revoke-self",
                    Some(&session.token),
                    None,
                )
                .await;
        }
    }

    /// The current token, logging in first if there is none, it is due for
    /// renewal, or `fresh` asks for a new one.
    async fn token(&self, fresh: bool) -> Result<Token> {
        let mut session = self.session.lock().await;
        if let Some(s) = session.as_ref()
            && !fresh
            && s.refresh_at.is_none_or(|at| Instant::now() < at)
        {
            return Ok(s.token.clone());
        }
        let old = session.take();
        let result = self.log_in().await;
        self.metrics.vault_login(result.is_ok());
        let new = result?;
        let token = new.token.clone();
        *session = Some(new);
        drop(session);
        // The replaced token is revoked so logins do not pile up leases.
        if let Some(old) = old
            && !matches!(self.auth, VaultAuth::Token(_))
        {
            let _ = self
                .send(
                    "revoke-self",
                    Method::POST,
                    "auth/token/revoke-self",
                    Some(&old.token),
                    None,
                )
                .await;
        }
        Ok(token)
    }

    async fn log_in(&self) -> Result<Session> {
        let (mount, body) = match &self.auth {
            VaultAuth::Token(token) => {
                return Ok(Session {
                    token: token.clone(),
                    refresh_at: None,
                });
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_secret_file(jwt_file, "--vault-jwt-file")?;
                let body = Zeroizing::new(
                    serde_json::json!({ "role": role, "jwt": jwt.0.trim() }).to_string(),
                );
                (mount, body)
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret_id = read_secret_file(secret_id_file, "--vault-secret-id-file")?;
                let body = Zeroizing::new(
                    serde_json::json!({ "role_id": role_id, "secret_id": secret_id.0.trim() })
                        .to_string(),
                );
                (mount, body)
            }
        };
        let path = format!("auth/{mount}/login");
        let started = Instant::now();
        let answer = self
            .send("login", Method::POST, &path, None, Some(body))
            .await?
            .ok_or_else(|| {
                refused(
                    &format!("logging in at {path} ({})", self.auth.method()),
                    404,
                    &Value::Null,
                )
            })?;
        let auth = &answer["auth"];
        let token = auth["client_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::VaultRefused {
                doing: format!("logging in at {path}"),
                status: 200,
                errors: ": the answer has no auth.client_token".into(),
            })?;
        let ttl = auth["lease_duration"].as_u64().unwrap_or(0);
        Ok(Session {
            token: Token::new(token.to_owned()),
            refresh_at: (ttl > 0).then(|| started + Duration::from_secs(ttl * 2 / 3)),
        })
    }

    /// An authenticated call. A 403 is retried once with a new login (the
    /// token may have expired or been revoked); a second 403 is the answer.
    async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<Zeroizing<String>>,
    ) -> Result<Option<Value>> {
        let token = self.token(false).await?;
        match self
            .send(op, method.clone(), path, Some(&token), body.clone())
            .await
        {
            Err(Error::VaultRefused { status: 403, .. })
                if !matches!(self.auth, VaultAuth::Token(_)) =>
            {
                let token = self.token(true).await?;
                self.send(op, method, path, Some(&token), body).await
            }
            other => other,
        }
    }

    /// One request. `Ok(None)` is a 404; other error statuses are
    /// [`Error::VaultRefused`] with Vault's error strings.
    async fn send(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        token: Option<&Token>,
        body: Option<Zeroizing<String>>,
    ) -> Result<Option<Value>> {
        let doing = format!("{op} {path}");
        let mut request = self
            .http
            .request(method, format!("{}/v1/{path}", self.base));
        if let Some(token) = token {
            request = request.header("X-Vault-Token", token.header()?);
        }
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns.clone());
        }
        if let Some(body) = body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.as_bytes().to_vec());
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.vault_request(op, "no_answer");
                return Err(self.unavailable(&doing, &e));
            }
        };
        let status = response.status().as_u16();
        self.metrics.vault_request(op, status_class(status));
        let mut bytes = Zeroizing::new(Vec::new());
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                        return Err(Error::VaultRefused {
                            doing,
                            status,
                            errors: format!(": the answer is over {MAX_ANSWER_BYTES} bytes"),
                        });
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(self.unavailable(&doing, &e)),
            }
        }
        // Never quote the body: only the fields read below leave here.
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        match status {
            200..=299 => Ok(Some(value)),
            404 if value["errors"].as_array().is_none_or(|e| e.is_empty()) => Ok(None),
            _ => Err(refused(&doing, status, &value)),
        }
    }

    fn unavailable(&self, doing: &str, e: &reqwest::Error) -> Error {
        let reason = if e.is_timeout() {
            "no answer in time".to_owned()
        } else if e.is_connect() {
            "could not connect".to_owned()
        } else {
            // reqwest's message names the URL and the cause; it carries no body.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        };
        Error::VaultUnavailable {
            addr: self.base.clone(),
            doing: doing.to_owned(),
            reason,
        }
    }

    // --- The calls the controller makes. ---

    /// The text of ACL policy `name`, if it exists.
    pub async fn read_policy(&self, name: &str) -> Result<Option<String>> {
        let answer = self
            .call(
                "policy_read",
                Method::GET,
                &format!("sys/policies/acl/{name}"),
                None,
            )
            .await?;
        Ok(answer.and_then(|v| v["data"]["policy"].as_str().map(str::to_owned)))
    }

    pub async fn write_policy(&self, name: &str, policy: &str) -> Result<()> {
        let body = serde_json::json!({ "policy": policy }).to_string();
        self.metrics.vault_write("policy_write");
        self.call(
            "policy_write",
            Method::PUT,
            &format!("sys/policies/acl/{name}"),
            Some(Zeroizing::new(body)),
        )
        .await
        .map(|_| ())
    }

    pub async fn delete_policy(&self, name: &str) -> Result<()> {
        self.metrics.vault_write("policy_delete");
        self.call(
            "policy_delete",
            Method::DELETE,
            &format!("sys/policies/acl/{name}"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Every ACL policy name.
    pub async fn list_policies(&self) -> Result<Vec<String>> {
        let answer = self
            .call("policy_list", list(), "sys/policies/acl", None)
            .await?;
        Ok(keys(answer))
    }

    /// The fields of role `name` the controller sets, if the role exists.
    /// A role whose fields do not parse reads as `Some(None)`: it exists but
    /// differs, so it is written again.
    pub async fn read_role(
        &self,
        mount: &str,
        name: &str,
    ) -> Result<Option<Option<KubernetesRole>>> {
        let answer = self
            .call(
                "role_read",
                Method::GET,
                &format!("auth/{mount}/role/{name}"),
                None,
            )
            .await?;
        Ok(answer.map(|v| serde_json::from_value(v["data"].clone()).ok()))
    }

    pub async fn write_role(&self, mount: &str, name: &str, role: &KubernetesRole) -> Result<()> {
        let body =
            serde_json::to_string(role).map_err(|e| Error::config("the role", e.to_string()))?;
        self.metrics.vault_write("role_write");
        self.call(
            "role_write",
            Method::POST,
            &format!("auth/{mount}/role/{name}"),
            Some(Zeroizing::new(body)),
        )
        .await
        .map(|_| ())
    }

    pub async fn delete_role(&self, mount: &str, name: &str) -> Result<()> {
        self.metrics.vault_write("role_delete");
        self.call(
            "role_delete",
            Method::DELETE,
            &format!("auth/{mount}/role/{name}"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Every role name under the Kubernetes auth mount.
    pub async fn list_roles(&self, mount: &str) -> Result<Vec<String>> {
        let answer = self
            .call("role_list", list(), &format!("auth/{mount}/role"), None)
            .await?;
        Ok(keys(answer))
    }

    /// KV v2 metadata of a secret (never its data), if it exists.
    pub async fn secret_metadata(&self, mount: &str, path: &str) -> Result<Option<SecretMetadata>> {
        let answer = self
            .call(
                "metadata_read",
                Method::GET,
                &format!("{mount}/metadata/{path}"),
                None,
            )
            .await?;
        Ok(answer.map(|v| {
            let data = &v["data"];
            let current_version = data["current_version"].as_u64().unwrap_or(0);
            let version = &data["versions"][current_version.to_string()];
            let deleted = version["deletion_time"]
                .as_str()
                .is_some_and(|t| !t.is_empty());
            let destroyed = version["destroyed"].as_bool().unwrap_or(false);
            SecretMetadata {
                current_version,
                gone: current_version == 0 || deleted || destroyed,
            }
        }))
    }
}

fn list() -> Method {
    Method::from_bytes(b"LIST").unwrap_or(Method::GET)
}

fn keys(answer: Option<Value>) -> Vec<String> {
    answer
        .and_then(|v| {
            v["data"]["keys"].as_array().map(|keys| {
                keys.iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A refusal with Vault's own error strings, each cut short.
fn refused(doing: &str, status: u16, value: &Value) -> Error {
    let errors: Vec<String> = value["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| e.as_str())
                .map(|e| e.chars().take(300).collect())
                .collect()
        })
        .unwrap_or_default();
    Error::VaultRefused {
        doing: doing.to_owned(),
        status,
        errors: if errors.is_empty() {
            String::new()
        } else {
            format!(": {}", errors.join("; "))
        },
    }
}

fn read_secret_file(path: &std::path::Path, flag: &str) -> Result<Token> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::config(format!("{flag} {}", path.display()), e.to_string()))?;
    if text.trim().is_empty() {
        return Err(Error::config(
            format!("{flag} {}", path.display()),
            "is empty",
        ));
    }
    Ok(Token::new(text))
}
