//! The Vault token's life: log in with the configured method (never
//! guessed), renew the token before it expires, log in again when it is
//! gone or nearly at its maximum TTL, and revoke it on shutdown, so
//! restarts leave no leases behind.
//!
//! One [`Auth`] holds at most one token at a time. Logins are serialized:
//! many bindings needing a token at once cause one login, not a herd.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http::Method;
use serde::Serialize;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::client::VaultHttp;
use super::response::{self, Granted};
use crate::secret::SecretValue;

/// How the sidecar proves who it is to Vault (chosen in config).
pub enum Credentials {
    /// Kubernetes auth: the projected service-account token, re-read at
    /// every login (the kubelet rotates it).
    Kubernetes {
        mount: String,
        role: RoleFrom,
        jwt_file: PathBuf,
    },
    /// JWT auth with the same projected token.
    Jwt {
        mount: String,
        role: RoleFrom,
        jwt_file: PathBuf,
    },
    /// AppRole: a role_id, and the secret_id read from a file at every login.
    AppRole {
        mount: String,
        role_id: String,
        secret_id_file: PathBuf,
    },
    /// A token handed to us (renewed if it can be, never revoked: it is
    /// not ours). From a file (re-read when the token stops working) or
    /// the environment.
    Token(TokenFrom),
}

/// Where the role to log in as comes from.
pub enum RoleFrom {
    /// `--vault-role`.
    Flag(String),
    /// The `vaultRole` of the controller's bindings ConfigMap, re-read at
    /// every login: in a pod the controller names the role (it carries a
    /// hash of the cluster id, namespace and service account), so the
    /// webhook need not know it and a renamed role is picked up.
    Bindings(PathBuf),
}

impl RoleFrom {
    fn role(&self) -> Result<String, AuthError> {
        let path = match self {
            Self::Flag(role) => return Ok(role.clone()),
            Self::Bindings(path) => path,
        };
        let refused = |reason: String| AuthError {
            unreachable: false,
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            refused(format!(
                "the Vault role comes from the bindings ({}): {e}; has the controller granted \
                 this service account any binding?",
                path.display()
            ))
        })?;
        let bindings = credbroker_crds::config::SidecarBindings::from_json(&text)
            .map_err(|e| refused(format!("the Vault role: {}: {e}", path.display())))?;
        bindings
            .vault_role
            .filter(|r| !r.is_empty())
            .ok_or_else(|| refused(format!("{}: no vaultRole", path.display())))
    }
}

pub enum TokenFrom {
    File(PathBuf),
    Env(SecretValue),
}

impl Credentials {
    /// `kubernetes`, `jwt`, `approle`, `token`.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Kubernetes { .. } => "kubernetes",
            Self::Jwt { .. } => "jwt",
            Self::AppRole { .. } => "approle",
            Self::Token(_) => "token",
        }
    }

    /// Where a login goes, for messages (`auth/kubernetes/login`).
    fn login_path(&self) -> Option<String> {
        match self {
            Self::Kubernetes { mount, .. }
            | Self::Jwt { mount, .. }
            | Self::AppRole { mount, .. } => Some(format!("auth/{mount}/login")),
            Self::Token(_) => None,
        }
    }
}

/// Why no token could be had.
#[derive(Debug, Clone)]
pub struct AuthError {
    /// Vault did not answer (keep the last good values a while), rather
    /// than refusing (fail closed).
    pub unreachable: bool,
    pub reason: String,
}

/// A token and what is known of its life.
pub struct Session {
    pub token: SecretValue,
    /// 0: the token does not expire.
    ttl: Duration,
    renewable: bool,
    obtained: Instant,
    /// The TTL the login granted, to notice renewals nearing the max TTL.
    granted_ttl: Duration,
    /// Created by our login (so ours to revoke), not handed to us.
    ours: bool,
    /// Logged in because Vault refused the previous token: if this one is
    /// refused the same way, the policy is gone, not the token.
    after_denial: bool,
}

impl Session {
    fn expires(&self) -> Option<Instant> {
        (!self.ttl.is_zero()).then(|| self.obtained + self.ttl)
    }

    /// Whether the token still has a useful part of its life left.
    fn usable_at(&self, now: Instant) -> bool {
        self.expires().is_none_or(|end| {
            let margin = (self.ttl / 10).min(Duration::from_secs(5));
            now + margin < end
        })
    }
}

/// The least time between two logins caused by a refusal (a 403 may mean
/// the token is gone, or that a policy was revoked: in the second case,
/// logging in again at every poll would only pile up tokens).
const RELOGIN_AFTER_DENIAL_INTERVAL: Duration = Duration::from_secs(30);

/// Holds the token, logs in, renews and revokes.
pub struct Auth {
    http: Arc<VaultHttp>,
    credentials: Credentials,
    /// The token; the async lock serializes logins.
    current: tokio::sync::Mutex<Option<Arc<Session>>>,
    renewer: Mutex<Option<AbortHandle>>,
    last_denial_login: Mutex<Option<Instant>>,
    backoff: Mutex<LoginBackoff>,
    /// Set once the token was revoked at shutdown: no login after it (a
    /// config change while draining must not leave a token behind).
    closed: std::sync::atomic::AtomicBool,
}

impl Drop for Auth {
    fn drop(&mut self) {
        if let Some(task) = self
            .renewer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

impl Auth {
    pub fn new(http: Arc<VaultHttp>, credentials: Credentials) -> Arc<Self> {
        Arc::new(Self {
            http,
            credentials,
            current: tokio::sync::Mutex::new(None),
            renewer: Mutex::new(None),
            last_denial_login: Mutex::new(None),
            backoff: Mutex::new(LoginBackoff::default()),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn method(&self) -> &'static str {
        self.credentials.method()
    }

    /// A usable token: the current one, or a new login.
    pub async fn session(self: &Arc<Self>) -> Result<Arc<Session>, AuthError> {
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref()
            && session.usable_at(Instant::now())
        {
            return Ok(session.clone());
        }
        let session = Arc::new(self.login_guarded().await?);
        *current = Some(session.clone());
        self.schedule_renewal(&session);
        drop(current);
        Ok(session)
    }

    /// The current token, if it is not `used` and still usable.
    async fn newer_than(&self, used: &Arc<Session>) -> Option<Arc<Session>> {
        let current = self.current.lock().await;
        current
            .as_ref()
            .filter(|s| !Arc::ptr_eq(s, used) && s.usable_at(Instant::now()))
            .cloned()
    }

    /// Replaces `old` with `new` if `old` is still the current token.
    async fn replace(&self, old: &Arc<Session>, new: Arc<Session>) -> bool {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, old)) {
            *current = Some(new);
            true
        } else {
            false
        }
    }

    /// Logs in again in place of `old` (which can no longer be renewed) and
    /// revokes `old`; `Ok(None)` if another login replaced it meanwhile.
    async fn relogin_replacing(
        &self,
        old: &Arc<Session>,
    ) -> Result<Option<Arc<Session>>, AuthError> {
        let fresh = {
            let mut current = self.current.lock().await;
            if !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, old)) {
                return Ok(None);
            }
            let fresh = Arc::new(self.login_guarded().await?);
            *current = Some(fresh.clone());
            fresh
        };
        if old.ours {
            self.revoke_token(old).await;
        }
        Ok(Some(fresh))
    }

    /// A login, unless logins are backing off after failures (then the
    /// last failure, at once).
    async fn login_guarded(&self) -> Result<Session, AuthError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(AuthError {
                unreachable: true,
                reason: "shutting down: no new Vault login".into(),
            });
        }
        if let Some(e) = self
            .backoff
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocked(Instant::now())
        {
            return Err(e);
        }
        let result = self.login().await;
        let mut backoff = self.backoff.lock().unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(_) => backoff.succeeded(),
            Err(e) => {
                let mut byte = [0u8; 1];
                let r = getrandom::fill(&mut byte).map_or(128, |()| byte[0]);
                backoff.failed(Instant::now(), e.clone(), 0.8 + f64::from(r) / 255.0 * 0.4);
            }
        }
        result
    }

    /// After Vault refused `used` (403): whether the token itself is gone.
    /// If it is, log in again (at most once per 30 s) and return the new
    /// token to retry with; if the token is fine, the refusal stands.
    pub async fn after_denial(
        self: &Arc<Self>,
        used: &Arc<Session>,
    ) -> Result<Option<Arc<Session>>, AuthError> {
        // Another read may have logged in since `used` was handed out (or
        // the renewer replaced it): retry with that token, whatever the
        // rate limit says.
        if let Some(newer) = self.newer_than(used).await {
            return Ok(Some(newer));
        }
        let lookup = self
            .http
            .call(
                "lookup_self",
                Method::GET,
                "auth/token/lookup-self",
                Some(&used.token),
                None,
            )
            .await
            .map_err(|reason| AuthError {
                unreachable: true,
                reason: format!("checking the token after a refusal: {reason}"),
            })?;
        match lookup.status {
            // The token is fine: the refusal is the policy's.
            200 => return Ok(None),
            // A token logged in for a refusal is refused too: the policy
            // that granted lookup-self is gone, not the token. Logging in
            // again would only pile up live tokens nobody can revoke.
            403 if used.after_denial => return Ok(None),
            // The token is gone (Vault answers 403 for an unknown token).
            403 => {}
            s => {
                return Err(AuthError {
                    unreachable: true,
                    reason: format!("checking the token after a refusal: Vault answered HTTP {s}"),
                });
            }
        }
        {
            let now = Instant::now();
            let mut last = self
                .last_denial_login
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last
                .is_some_and(|t| now.saturating_duration_since(t) < RELOGIN_AFTER_DENIAL_INTERVAL)
            {
                return Err(AuthError {
                    unreachable: false,
                    reason: format!(
                        "Vault refused the token (403 on auth/token/lookup-self), and a new \
                         login was made less than {RELOGIN_AFTER_DENIAL_INTERVAL:?} ago"
                    ),
                });
            }
            *last = Some(now);
        }
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref()
            && !Arc::ptr_eq(session, used)
        {
            // Someone logged in meanwhile.
            return Ok(Some(session.clone()));
        }
        let mut fresh = self.login_guarded().await?;
        fresh.after_denial = true;
        let session = Arc::new(fresh);
        *current = Some(session.clone());
        // While the lock is held: a renewer scheduled after it could be
        // another login's, and aborting it would leave that token unrenewed.
        self.schedule_renewal(&session);
        drop(current);
        tracing::info!(
            method = self.method(),
            "logged in to Vault again: the previous token was refused"
        );
        Ok(Some(session))
    }

    /// Revokes our token (not one handed to us), on shutdown.
    pub async fn revoke(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(task) = self
            .renewer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
        let Some(session) = self.current.lock().await.take() else {
            return;
        };
        if !session.ours {
            return;
        }
        self.revoke_token(&session).await;
    }

    async fn revoke_token(&self, session: &Session) {
        match self
            .http
            .call(
                "revoke_self",
                Method::POST,
                "auth/token/revoke-self",
                Some(&session.token),
                None,
            )
            .await
        {
            Ok(a) if a.status == 204 || a.status == 200 => {
                tracing::info!("Vault token revoked");
            }
            Ok(a) => tracing::warn!(
                status = a.status,
                "Vault refused to revoke our token; it expires at its TTL"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not revoke the Vault token; it expires at its TTL")
            }
        }
    }

    /// One login with the configured method.
    async fn login(&self) -> Result<Session, AuthError> {
        let started = Instant::now();
        let result = match &self.credentials {
            Credentials::Token(from) => self.adopt_token(from).await,
            other => self.login_with(other).await,
        };
        let took = started.elapsed();
        self.http
            .metrics()
            .vault_login(self.method(), result.is_ok(), took);
        if let Ok(session) = &result {
            self.http
                .metrics()
                .vault_token_ttl(session.ttl.as_secs_f64());
        }
        match &result {
            Ok(session) => tracing::info!(
                method = self.method(),
                ttl_s = session.ttl.as_secs(),
                renewable = session.renewable,
                took_ms = took.as_millis() as u64,
                "logged in to Vault"
            ),
            Err(e) => {
                tracing::warn!(method = self.method(), error = %e.reason, "Vault login failed")
            }
        }
        result
    }

    async fn login_with(&self, credentials: &Credentials) -> Result<Session, AuthError> {
        #[derive(Serialize)]
        struct RoleJwt<'a> {
            role: &'a str,
            jwt: &'a str,
        }
        #[derive(Serialize)]
        struct RoleIdSecretId<'a> {
            role_id: &'a str,
            secret_id: &'a str,
        }
        let path = credentials.login_path().unwrap_or_default();
        let (sent, body) = match credentials {
            Credentials::Kubernetes { role, jwt_file, .. }
            | Credentials::Jwt { role, jwt_file, .. } => {
                let role = role.role()?;
                let jwt = read_credential(jwt_file, "--vault-jwt-file")?;
                let body = to_json(
                    &RoleJwt {
                        role: &role,
                        jwt: &jwt,
                    },
                    jwt.len(),
                )?;
                (jwt, body)
            }
            Credentials::AppRole {
                role_id,
                secret_id_file,
                ..
            } => {
                let secret_id = read_credential(secret_id_file, "--vault-secret-id-file")?;
                let body = to_json(
                    &RoleIdSecretId {
                        role_id,
                        secret_id: &secret_id,
                    },
                    secret_id.len(),
                )?;
                (secret_id, body)
            }
            Credentials::Token(_) => {
                return Err(AuthError {
                    unreachable: false,
                    reason: "the token method has no login".into(),
                });
            }
        };
        let answer = self
            .http
            .call("login", Method::POST, &path, None, Some(body))
            .await
            .map_err(|reason| AuthError {
                unreachable: true,
                reason: format!("logging in at {path}: {reason}"),
            })?;
        match answer.status {
            200 => {
                let g = response::granted(&answer.body).map_err(|why| AuthError {
                    unreachable: false,
                    reason: format!("logging in at {path}: {why}"),
                })?;
                Ok(session_of(g, true))
            }
            s if s == 429 || s >= 500 => Err(AuthError {
                unreachable: true,
                reason: format!(
                    "logging in at {path}: Vault answered HTTP {s}{}",
                    vault_says(&answer.body, sent.as_bytes())
                ),
            }),
            s => Err(AuthError {
                unreachable: false,
                reason: format!(
                    "logging in at {path}: refused (HTTP {s}){}",
                    vault_says(&answer.body, sent.as_bytes())
                ),
            }),
        }
    }

    /// The token method: read the token and ask Vault what it is.
    async fn adopt_token(&self, from: &TokenFrom) -> Result<Session, AuthError> {
        let token = match from {
            TokenFrom::File(path) => {
                let text = read_credential(path, "--vault-token-file")?;
                SecretValue::copy_from(text.as_bytes())
            }
            TokenFrom::Env(value) => SecretValue::copy_from(value.expose_secret()),
        };
        let answer = self
            .http
            .call(
                "lookup_self",
                Method::GET,
                "auth/token/lookup-self",
                Some(&token),
                None,
            )
            .await
            .map_err(|reason| AuthError {
                unreachable: true,
                reason: format!("looking up the token: {reason}"),
            })?;
        match answer.status {
            200 => {
                let looked = response::looked_up(&answer.body).map_err(|why| AuthError {
                    unreachable: false,
                    reason: format!("looking up the token: {why}"),
                })?;
                Ok(Session {
                    token,
                    ttl: looked.ttl,
                    renewable: looked.renewable,
                    obtained: Instant::now(),
                    granted_ttl: looked.ttl,
                    ours: false,
                    after_denial: false,
                })
            }
            s if s == 429 || s >= 500 => Err(AuthError {
                unreachable: true,
                reason: format!("looking up the token: Vault answered HTTP {s}"),
            }),
            s => Err(AuthError {
                unreachable: false,
                reason: format!(
                    "the token was refused (HTTP {s} on auth/token/lookup-self); it is invalid or \
                     expired"
                ),
            }),
        }
    }

    /// Starts (or restarts) the renewal of `session`.
    fn schedule_renewal(self: &Arc<Self>, session: &Arc<Session>) {
        let mut renewer = self.renewer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = renewer.take() {
            task.abort();
        }
        // A token that does not expire needs nothing; one handed to us that
        // cannot be renewed is read again once it expires.
        if session.expires().is_none() || (!session.ours && !session.renewable) {
            return;
        }
        let task = tokio::spawn(renew_loop(Arc::downgrade(self), session.clone()));
        *renewer = Some(task.abort_handle());
    }

    /// Renews `session` once: the renewed session, or `None` when a new
    /// login is due (not renewable, refused, or near its max TTL).
    async fn renew(&self, session: &Session) -> Result<Option<Session>, String> {
        if !session.renewable {
            return Ok(None);
        }
        let answer = self
            .http
            .call(
                "renew_self",
                Method::POST,
                "auth/token/renew-self",
                Some(&session.token),
                None,
            )
            .await?;
        if answer.status != 200 {
            if answer.status == 429 || answer.status >= 500 {
                return Err(format!("Vault answered HTTP {}", answer.status));
            }
            return Ok(None);
        }
        let g = response::granted(&answer.body)?;
        // A renewal capped well below what the login granted: the max TTL
        // is near, and a new login beats a token about to die.
        if g.ttl < session.granted_ttl / 2 {
            return Ok(None);
        }
        let mut renewed = session_of(g, session.ours);
        renewed.granted_ttl = session.granted_ttl;
        Ok(Some(renewed))
    }
}

/// Renews at two thirds of the token's life (with jitter, so pods started
/// together do not renew together); logs in again when renewal is no
/// longer possible. Stops once the token has expired: reads then log in on
/// demand, under the shared backoff. Holds only a weak reference: dropping
/// [`Auth`] ends it.
async fn renew_loop(auth: Weak<Auth>, mut session: Arc<Session>) {
    let mut must_login = false;
    let mut wake = renewal_time(&session);
    loop {
        let Some(expires) = session.expires() else {
            return;
        };
        tokio::time::sleep_until(wake).await;
        if Instant::now() >= expires {
            return;
        }
        let Some(strong) = auth.upgrade() else {
            return;
        };
        if !must_login {
            match strong.renew(&session).await {
                Ok(Some(renewed)) => {
                    let renewed = Arc::new(renewed);
                    if !strong.replace(&session, renewed.clone()).await {
                        // Replaced meanwhile; that login renews its own.
                        return;
                    }
                    tracing::debug!(ttl_s = renewed.ttl.as_secs(), "Vault token renewed");
                    strong
                        .http
                        .metrics()
                        .vault_token_ttl(renewed.ttl.as_secs_f64());
                    session = renewed;
                    wake = renewal_time(&session);
                    continue;
                }
                Ok(None) => must_login = true,
                Err(why) => {
                    tracing::warn!(error = %why, "renewing the Vault token failed; retrying");
                    wake = Instant::now() + retry_delay(expires);
                    continue;
                }
            }
        }
        match strong.relogin_replacing(&session).await {
            Ok(Some(fresh)) => {
                session = fresh;
                must_login = false;
                wake = renewal_time(&session);
            }
            Ok(None) => return,
            Err(_) => wake = Instant::now() + retry_delay(expires),
        }
    }
}

/// When to renew: two thirds of the TTL, give or take 5%.
fn renewal_time(session: &Session) -> Instant {
    let mut byte = [0u8; 1];
    let r = getrandom::fill(&mut byte).map_or(128, |()| byte[0]);
    // 0.6167 .. 0.7167 of the TTL.
    let fraction = 0.6167 + f64::from(r) / 255.0 * 0.1;
    session.obtained + session.ttl.mul_f64(fraction)
}

/// A short wait before trying again, never past the token's end.
fn retry_delay(expires: Instant) -> Duration {
    let left = expires.saturating_duration_since(Instant::now());
    (left / 4).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// Failed logins back off, shared by every binding and the renewer, so a
/// refused or unreachable login costs one attempt per backoff step, not
/// one per binding per retry (pure: tested with plain instants).
#[derive(Default)]
struct LoginBackoff {
    failures: u32,
    until: Option<Instant>,
    last: Option<AuthError>,
}

const LOGIN_BACKOFF_MIN: Duration = Duration::from_secs(1);
const LOGIN_BACKOFF_MAX: Duration = Duration::from_secs(30);

impl LoginBackoff {
    /// The last failure, while logins are held back.
    fn blocked(&self, now: Instant) -> Option<AuthError> {
        match (&self.until, &self.last) {
            (Some(until), Some(last)) if now < *until => {
                let mut e = last.clone();
                let wait = until.saturating_duration_since(now);
                e.reason = format!(
                    "{} (next login attempt in {:.1}s)",
                    e.reason,
                    wait.as_secs_f64()
                );
                Some(e)
            }
            _ => None,
        }
    }

    /// Records a failure: the next attempt waits 1 s, doubling up to 30 s,
    /// scaled by `jitter` (0.8 to 1.2).
    fn failed(&mut self, now: Instant, error: AuthError, jitter: f64) {
        self.failures = self.failures.saturating_add(1);
        let step = LOGIN_BACKOFF_MIN
            .saturating_mul(1u32 << self.failures.min(16).saturating_sub(1))
            .min(LOGIN_BACKOFF_MAX);
        self.until = Some(now + step.mul_f64(jitter.clamp(0.8, 1.2)));
        self.last = Some(error);
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }
}

fn session_of(g: Granted, ours: bool) -> Session {
    Session {
        token: g.token.0,
        ttl: g.ttl,
        renewable: g.renewable,
        obtained: Instant::now(),
        granted_ttl: g.ttl,
        ours,
        after_denial: false,
    }
}

/// What Vault said of a refusal, as `: <text>` (or nothing).
fn vault_says(body: &[u8], sent: &[u8]) -> String {
    let text = response::refusal_text(body, sent);
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Reads a credential file (trimmed), naming the flag on failure.
fn read_credential(path: &PathBuf, flag: &str) -> Result<Zeroizing<String>, AuthError> {
    let text = std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| AuthError {
            unreachable: false,
            reason: format!("{flag} {}: {e}", path.display()),
        })?;
    let trimmed = Zeroizing::new(text.trim().to_owned());
    if trimmed.is_empty() {
        return Err(AuthError {
            unreachable: false,
            reason: format!("{flag} {}: the file is empty", path.display()),
        });
    }
    Ok(trimmed)
}

/// Serializes a login body into a buffer sized up front (so no grown copy
/// of the credential is left behind unwiped).
fn to_json(value: &impl Serialize, credential_len: usize) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    let mut out = Zeroizing::new(Vec::with_capacity(credential_len * 2 + 512));
    serde_json::to_writer(&mut *out, value).map_err(|_| AuthError {
        unreachable: false,
        reason: "the login request could not be written".into(),
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_comes_from_the_bindings_the_controller_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bindings.v1.json");
        let from = RoleFrom::Bindings(file.clone());
        // No ConfigMap (yet): a refusal that says where it looked.
        let missing = from.role().unwrap_err();
        assert!(!missing.unreachable);
        assert!(
            missing.reason.contains("bindings.v1.json"),
            "{}",
            missing.reason
        );
        std::fs::write(&file, r#"{"formatVersion":1,"bindings":[]}"#).unwrap();
        assert!(from.role().unwrap_err().reason.contains("no vaultRole"));
        std::fs::write(
            &file,
            r#"{"formatVersion":1,"vaultRole":"credbroker-0a1b2c3d-agents-agent-0123456789abcdef","bindings":[]}"#,
        )
        .unwrap();
        assert_eq!(
            from.role().unwrap(),
            "credbroker-0a1b2c3d-agents-agent-0123456789abcdef"
        );
        // A flag wins, and reads nothing.
        assert_eq!(RoleFrom::Flag("r".into()).role().unwrap(), "r");
    }

    fn refused() -> AuthError {
        AuthError {
            unreachable: false,
            reason: "logging in at auth/approle/login: refused (HTTP 400)".into(),
        }
    }

    #[test]
    fn failed_logins_back_off_doubling_to_a_cap_and_reset_on_success() {
        let t0 = Instant::now();
        let mut b = LoginBackoff::default();
        assert!(b.blocked(t0).is_none());
        b.failed(t0, refused(), 1.0);
        let e = b.blocked(t0 + Duration::from_millis(500)).unwrap();
        assert!(
            e.reason.contains("refused (HTTP 400)") && e.reason.contains("next login attempt in")
        );
        assert!(b.blocked(t0 + Duration::from_secs(1)).is_none());
        for _ in 0..10 {
            b.failed(t0, refused(), 1.0);
        }
        assert!(b.blocked(t0 + Duration::from_secs(29)).is_some());
        assert!(
            b.blocked(t0 + Duration::from_secs(30)).is_none(),
            "not capped at 30 s"
        );
        b.succeeded();
        assert!(b.blocked(t0).is_none());
    }

    #[test]
    fn renewal_falls_around_two_thirds_of_the_ttl() {
        let s = Session {
            token: SecretValue::copy_from(b"t"),
            ttl: Duration::from_secs(600),
            renewable: true,
            obtained: Instant::now(),
            granted_ttl: Duration::from_secs(600),
            ours: true,
            after_denial: false,
        };
        for _ in 0..100 {
            let after = renewal_time(&s) - s.obtained;
            assert!(
                after >= Duration::from_secs(370) && after <= Duration::from_secs(431),
                "{after:?}"
            );
        }
        assert!(retry_delay(Instant::now()) >= Duration::from_millis(500));
    }
}
