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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::desired::KubernetesRole;
use crate::leader::Fence;
use crate::metrics::Metrics;
use crate::{Error, Result, VaultError};

type VaultResult<T> = std::result::Result<T, VaultError>;

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

    fn header(&self) -> VaultResult<HeaderValue> {
        let mut value =
            HeaderValue::from_str(self.0.trim()).map_err(|_| VaultError::Credentials {
                what: "the Vault token".into(),
                reason: "is not a valid header value".into(),
            })?;
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
    /// Counts logins, so a caller whose token was refused replaces it only
    /// if no one else has already.
    generation: u64,
    token: Token,
    /// When to log in again: two thirds into the token's TTL. `None` for a
    /// token that does not expire.
    refresh_at: Option<Instant>,
    /// When the token expires (`None`: never).
    expires_at: Option<Instant>,
}

/// One client for one Vault, shared by every reconcile.
pub struct VaultClient {
    http: reqwest::Client,
    base: String,
    namespace: Option<HeaderValue>,
    auth: VaultAuth,
    session: tokio::sync::Mutex<Option<Session>>,
    generations: std::sync::atomic::AtomicU64,
    /// Set by [`VaultClient::revoke`]: no login after it.
    closed: AtomicBool,
    /// Writes wait for the leader lease.
    fence: Arc<Fence>,
    timeout: Duration,
    /// Tokens replaced at renewal, revoked once no request can carry them.
    retired: std::sync::Mutex<Vec<(Instant, Token)>>,
    metrics: Arc<Metrics>,
}

impl VaultClient {
    pub fn new(settings: VaultSettings, fence: Arc<Fence>, metrics: Arc<Metrics>) -> Result<Self> {
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
            // A redirect would carry X-Vault-Token (and a login body) to
            // whatever host it names: Vault is asked directly, or not at all.
            .redirect(reqwest::redirect::Policy::none())
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
            generations: std::sync::atomic::AtomicU64::new(0),
            closed: AtomicBool::new(false),
            fence,
            timeout: settings.timeout,
            retired: std::sync::Mutex::new(Vec::new()),
            metrics,
        })
    }

    pub fn addr(&self) -> &str {
        &self.base
    }

    /// Logs in now (at startup, to report a bad setup at once).
    pub async fn login(&self) -> VaultResult<()> {
        self.token(None).await.map(|_| ())
    }

    /// Revokes the controller's token (not a given `--vault-token`), on
    /// shutdown. No call logs in again after this.
    pub async fn revoke(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if matches!(self.auth, VaultAuth::Token(_)) {
            return;
        }
        // The session lock first: a login finishing now has put its
        // predecessor on the retired list by the time this runs.
        let session = self.session.lock().await.take();
        let retired: Vec<Token> = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .map(|(_, t)| t)
            .collect();
        for token in retired.iter().chain(session.as_ref().map(|s| &s.token)) {
            let _ = self.revoke_token(token).await;
        }
    }

    /// Revokes the renewed-away tokens whose grace has passed.
    async fn revoke_retired(&self) {
        let due: Vec<Token> = {
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let (due, keep): (Vec<_>, Vec<_>) = retired.drain(..).partition(|(at, _)| *at <= now);
            *retired = keep;
            due.into_iter().map(|(_, t)| t).collect()
        };
        for token in due {
            let _ = self.revoke_token(&token).await;
        }
    }

    async fn revoke_token(&self, token: &Token) -> VaultResult<Option<Value>> {
        self.send(
            "revoke-self",
            Method::POST,
            "auth/token/revoke-self",
            Some(token),
            None,
            false,
        )
        .await
    }

    /// The current token and its generation. A new login happens when there
    /// is none, it is due for renewal, or `refused` names the generation a
    /// caller saw refused and no one has replaced it yet.
    async fn token(&self, refused: Option<u64>) -> VaultResult<(u64, Token)> {
        let mut session = self.session.lock().await;
        if let Some(s) = session.as_ref() {
            let due = s.refresh_at.is_some_and(|at| Instant::now() >= at);
            let stale = refused == Some(s.generation);
            if !due && !stale {
                return Ok((s.generation, s.token.clone()));
            }
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(VaultError::Credentials {
                what: "the Vault session".into(),
                reason: "closed: the controller is stopping".into(),
            });
        }
        // The old session stays until a new one exists: if a refresh that
        // was merely due fails, the still-valid token keeps serving, and the
        // next try waits a little.
        let result = self.log_in().await;
        self.metrics.vault_login(result.is_ok());
        let mut new = match result {
            Ok(new) => new,
            Err(e) => {
                // ...as long as it outlives a request deadline.
                let outlives = |s: &Session| {
                    s.expires_at
                        .is_none_or(|at| Instant::now() + self.timeout < at)
                };
                if refused.is_none()
                    && let Some(s) = session.as_mut().filter(|s| outlives(s))
                {
                    s.refresh_at = Some(Instant::now() + Duration::from_secs(5));
                    return Ok((s.generation, s.token.clone()));
                }
                return Err(e);
            }
        };
        new.generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        let answer = (new.generation, new.token.clone());
        let old = session.replace(new);
        // A token replaced because it was due is revoked once every request
        // that may still carry it has had its deadline; a refused one is
        // dead already. Retired under the session lock, so a concurrent
        // revoke() sees it.
        if let Some(old) = old
            && refused.is_none()
            && !matches!(self.auth, VaultAuth::Token(_))
        {
            let due = Instant::now() + self.timeout + Duration::from_secs(1);
            self.retired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((due, old.token));
        }
        drop(session);
        Ok(answer)
    }

    async fn log_in(&self) -> VaultResult<Session> {
        #[derive(serde::Serialize)]
        struct KubernetesLogin<'a> {
            role: &'a str,
            jwt: &'a str,
        }
        #[derive(serde::Serialize)]
        struct AppRoleLogin<'a> {
            role_id: &'a str,
            secret_id: &'a str,
        }
        let serialize = |r: serde_json::Result<String>| {
            r.map(Zeroizing::new).map_err(|e| VaultError::Credentials {
                what: "the login request".into(),
                reason: e.to_string(),
            })
        };
        let (mount, body) = match &self.auth {
            VaultAuth::Token(token) => {
                return Ok(Session {
                    generation: 0,
                    token: token.clone(),
                    refresh_at: None,
                    expires_at: None,
                });
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_secret_file(jwt_file, "--vault-jwt-file")?;
                let body = serialize(serde_json::to_string(&KubernetesLogin {
                    role,
                    jwt: jwt.0.trim(),
                }))?;
                (mount, body)
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret_id = read_secret_file(secret_id_file, "--vault-secret-id-file")?;
                let body = serialize(serde_json::to_string(&AppRoleLogin {
                    role_id,
                    secret_id: secret_id.0.trim(),
                }))?;
                (mount, body)
            }
        };
        let path = format!("auth/{mount}/login");
        let started = Instant::now();
        let doing = format!("logging in at {path} ({})", self.auth.method());
        let answer = self
            .send("login", Method::POST, &path, None, Some(body), false)
            .await?
            .ok_or_else(|| refused(&doing, 404, &Value::Null))?;
        let auth = &answer["auth"];
        let token = auth["client_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| VaultError::Refused {
                doing: doing.clone(),
                status: 200,
                errors: ": the answer has no auth.client_token".into(),
            })?;
        let ttl = auth["lease_duration"].as_u64().unwrap_or(0);
        Ok(Session {
            generation: 0,
            token: Token::new(token.to_owned()),
            refresh_at: (ttl > 0).then(|| started + Duration::from_secs(ttl * 2 / 3)),
            expires_at: (ttl > 0).then(|| started + Duration::from_secs(ttl)),
        })
    }

    /// An authenticated call. On a 403 the token is checked with
    /// `lookup-self`: if it still works, the 403 is the answer (the policy
    /// does not allow the call); if not, the token is replaced (once, by
    /// whichever caller gets there first) and the call tried again.
    async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<Zeroizing<String>>,
        fenced: bool,
    ) -> VaultResult<Option<Value>> {
        self.revoke_retired().await;
        let (generation, token) = self.token(None).await?;
        let first = self
            .send(op, method.clone(), path, Some(&token), body.clone(), fenced)
            .await;
        match first {
            Err(VaultError::Refused { status: 403, .. })
                if !matches!(self.auth, VaultAuth::Token(_)) =>
            {
                let alive = self
                    .send(
                        "lookup-self",
                        Method::GET,
                        "auth/token/lookup-self",
                        Some(&token),
                        None,
                        false,
                    )
                    .await;
                // Only Vault saying no makes the token dead; a lookup that
                // timed out proves nothing.
                if !matches!(alive, Err(VaultError::Refused { status: 403, .. })) {
                    return first;
                }
                let (_, token) = self.token(Some(generation)).await?;
                self.send(op, method, path, Some(&token), body, fenced)
                    .await
            }
            other => other,
        }
    }

    /// One request. `Ok(None)` is a read (GET or LIST) of something absent:
    /// a 404 with Vault's empty error list. Other error statuses are
    /// [`VaultError::Refused`] with Vault's error strings.
    async fn send(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        token: Option<&Token>,
        body: Option<Zeroizing<String>>,
        fenced: bool,
    ) -> VaultResult<Option<Value>> {
        let doing = format!("{} {path}", verb(&method));
        let is_read = method == Method::GET || method.as_str() == "LIST";
        let mut request = self
            .http
            .request(method, format!("{}/v1/{path}", self.base));
        if fenced {
            // Checked right before each send, retries included, and the
            // write must be done before a standby could take over.
            if let Some(left) = self.fence.check(&doing)? {
                request = request.timeout(left.min(self.timeout));
            }
        }
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
                        return Err(VaultError::Refused {
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
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        match status {
            200..=299 => Ok(Some(value)),
            // Vault's own "nothing here": JSON with no error strings. A 404
            // from something else in front of Vault is an error, so a
            // withdrawal never mistakes it for "already gone".
            404 if is_read && value["errors"].as_array().is_some_and(|e| e.is_empty()) => Ok(None),
            _ => Err(refused(&doing, status, &value)),
        }
    }

    fn unavailable(&self, doing: &str, e: &reqwest::Error) -> VaultError {
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
        VaultError::Unavailable {
            addr: self.base.clone(),
            doing: doing.to_owned(),
            reason,
        }
    }

    // --- The calls the controller makes. ---

    /// The text of ACL policy `name`, if it exists.
    pub async fn read_policy(&self, name: &str) -> VaultResult<Option<String>> {
        let path = format!("sys/policies/acl/{name}");
        let answer = self
            .call("policy_read", Method::GET, &path, None, false)
            .await?;
        Ok(answer.and_then(|v| v["data"]["policy"].as_str().map(str::to_owned)))
    }

    pub async fn write_policy(&self, name: &str, policy: &str) -> VaultResult<()> {
        let path = format!("sys/policies/acl/{name}");
        self.write(
            "policy_write",
            Method::PUT,
            &path,
            serde_json::json!({ "policy": policy }),
        )
        .await
    }

    pub async fn delete_policy(&self, name: &str) -> VaultResult<()> {
        let path = format!("sys/policies/acl/{name}");
        self.write("policy_delete", Method::DELETE, &path, Value::Null)
            .await
    }

    /// Every ACL policy name.
    pub async fn list_policies(&self) -> VaultResult<Vec<String>> {
        let answer = self
            .call("policy_list", list(), "sys/policies/acl", None, false)
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
    ) -> VaultResult<Option<Option<KubernetesRole>>> {
        let path = format!("auth/{mount}/role/{name}");
        let answer = self
            .call("role_read", Method::GET, &path, None, false)
            .await?;
        Ok(answer.map(|v| serde_json::from_value(v["data"].clone()).ok()))
    }

    pub async fn write_role(
        &self,
        mount: &str,
        name: &str,
        role: &KubernetesRole,
    ) -> VaultResult<()> {
        let path = format!("auth/{mount}/role/{name}");
        let body = serde_json::to_value(role).map_err(|e| VaultError::Refused {
            doing: format!("encoding role {name}"),
            status: 0,
            errors: format!(": {e}"),
        })?;
        self.write("role_write", Method::POST, &path, body).await
    }

    pub async fn delete_role(&self, mount: &str, name: &str) -> VaultResult<()> {
        let path = format!("auth/{mount}/role/{name}");
        self.write("role_delete", Method::DELETE, &path, Value::Null)
            .await
    }

    /// Every role name under the Kubernetes auth mount.
    pub async fn list_roles(&self, mount: &str) -> VaultResult<Vec<String>> {
        let answer = self
            .call(
                "role_list",
                list(),
                &format!("auth/{mount}/role"),
                None,
                false,
            )
            .await?;
        Ok(keys(answer))
    }

    /// KV v2 metadata of a secret (never its data), if it exists.
    pub async fn secret_metadata(
        &self,
        mount: &str,
        path: &str,
    ) -> VaultResult<Option<SecretMetadata>> {
        let answer = self
            .call(
                "metadata_read",
                Method::GET,
                &format!("{mount}/metadata/{path}"),
                None,
                false,
            )
            .await?;
        Ok(answer.map(|v| metadata_of(&v, k8s_openapi::jiff::Timestamp::now())))
    }

    /// A write or delete: only while this replica leads, and counted.
    async fn write(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Value,
    ) -> VaultResult<()> {
        self.fence.check(&format!("{} {path}", verb(&method)))?;
        self.metrics.vault_write(op);
        let body = (!body.is_null()).then(|| Zeroizing::new(body.to_string()));
        self.call(op, method, path, body, true).await.map(|_| ())
    }
}

/// What KV v2 metadata says of the current version at `now`. A version
/// whose `deletion_time` is still ahead (`delete_version_after`) is live,
/// as the sidecar reads it too.
fn metadata_of(v: &Value, now: k8s_openapi::jiff::Timestamp) -> SecretMetadata {
    let data = &v["data"];
    let current_version = data["current_version"].as_u64().unwrap_or(0);
    let version = &data["versions"][current_version.to_string()];
    let deleted = version["deletion_time"]
        .as_str()
        .filter(|t| !t.is_empty())
        .is_some_and(|t| {
            // An unreadable time counts as deleted: the safe side.
            t.parse::<k8s_openapi::jiff::Timestamp>()
                .ok()
                .is_none_or(|at| at <= now)
        });
    let destroyed = version["destroyed"].as_bool().unwrap_or(false);
    SecretMetadata {
        current_version,
        gone: current_version == 0 || deleted || destroyed,
    }
}

fn verb(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "reading",
        "LIST" => "listing",
        "DELETE" => "deleting",
        _ => "writing",
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
fn refused(doing: &str, status: u16, value: &Value) -> VaultError {
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
    VaultError::Refused {
        doing: doing.to_owned(),
        status,
        errors: if errors.is_empty() {
            String::new()
        } else {
            format!(": {}", errors.join("; "))
        },
    }
}

fn read_secret_file(path: &std::path::Path, flag: &str) -> VaultResult<Token> {
    let what = format!("{flag} {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| VaultError::Credentials {
        what: what.clone(),
        reason: e.to_string(),
    })?;
    if text.trim().is_empty() {
        return Err(VaultError::Credentials {
            what,
            reason: "is empty".into(),
        });
    }
    Ok(Token::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deletion_time_ahead_is_not_a_deletion() {
        let now: k8s_openapi::jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let meta = |time: &str, destroyed: bool| {
            metadata_of(
                &serde_json::json!({ "data": { "current_version": 3, "versions": {
                    "3": { "deletion_time": time, "destroyed": destroyed } } } }),
                now,
            )
        };
        assert!(!meta("", false).gone);
        assert!(!meta("2026-06-01T00:00:00Z", false).gone);
        assert!(meta("2025-06-01T00:00:00Z", false).gone);
        assert!(meta("garbage", false).gone);
        assert!(meta("", true).gone);
        assert_eq!(meta("", false).current_version, 3);
        assert!(metadata_of(&serde_json::json!({}), now).gone);
    }
}
