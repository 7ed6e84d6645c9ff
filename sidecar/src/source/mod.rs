//! Where secret values come from: the [`SecretSource`] interface the engine
//! reads through, and the sources that implement it.
//!
//! - [`file::FileSource`]: a directory laid out like a KV mount, for tests
//!   and local use (this module);
//! - [`vault::VaultSource`]: HashiCorp Vault or OpenBao.
//!
//! A source only reads. Deciding when to read (refresh intervals, jitter,
//! staleness, failing closed) is [`crate::store`]'s job, so every source gets
//! the same lifecycle. A source never formats a value: errors name the
//! binding's path, the key and the step that failed ([`SourceError`]).

pub mod file;
pub mod kv;
pub mod vault;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use credbroker_crds::VaultSecretRef;

use crate::secret::SecretValue;

/// A boxed future, so [`SecretSource`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a source says about the version of a value it returned. Opaque but
/// comparable: two equal revisions mean the same value. For a versioned
/// store (KV v2) `version` is the store's version; for an unversioned one
/// (KV v1, files) a keyed hash stands in, which reveals nothing about the
/// value because its key is random per process and never printed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Revision {
    /// The store's version number, where it has one.
    pub version: Option<u64>,
    /// Distinguishes values without a version (keyed hash), or states of
    /// one version (deleted, destroyed).
    marker: u64,
}

impl Revision {
    pub fn new(version: Option<u64>, marker: u64) -> Self {
        Self { version, marker }
    }
}

impl fmt::Debug for Revision {
    /// The version only: the marker may be a keyed hash of the value, and
    /// although it reveals nothing, nothing derived from a value is printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some(v) => write!(f, "Revision(v{v})"),
            None => f.write_str("Revision(unversioned)"),
        }
    }
}

/// The outcome of one read.
pub enum Fetched {
    /// The value is the one of the revision the caller already has.
    Unchanged,
    /// A value, new to the caller.
    Value {
        value: SecretValue,
        revision: Revision,
    },
}

/// Why a secret could not be read: the step that failed, naming the path
/// and key, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The source could not be reached (network, timeout, a server error).
    #[error("{path}: source unreachable: {reason}")]
    Unreachable { path: String, reason: String },
    /// The source refused our credentials.
    #[error("{path}: authentication refused: {reason}")]
    AuthRefused { path: String, reason: String },
    /// `detail`: what was refused and what may be missing (or empty).
    #[error("{path}: permission denied{detail}")]
    PermissionDenied { path: String, detail: String },
    #[error("{path}: not found{detail}")]
    NotFound { path: String, detail: String },
    /// The secret exists but its current version was deleted or destroyed.
    #[error("{path}: the current version was {state}")]
    Deleted { path: String, state: &'static str },
    #[error("{path}: key {key:?} is missing")]
    KeyMissing { path: String, key: String },
    /// The key holds something other than a string (its kind, never its value).
    #[error("{path}: key {key:?} holds {kind}, not a string")]
    NotAString {
        path: String,
        key: String,
        kind: &'static str,
    },
    /// The data could not be read as a KV secret.
    #[error("{path}: {reason}")]
    Malformed { path: String, reason: String },
}

impl SourceError {
    /// Whether the source answered definitively that the value is gone or
    /// forbidden (fail closed at once), rather than not answering (keep the
    /// last good value until it is too stale).
    pub fn is_definitive(&self) -> bool {
        !matches!(self, Self::Unreachable { .. })
    }

    /// A stable name of the failed step, for metrics and audit records.
    pub fn step(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::AuthRefused { .. } => "auth_refused",
            Self::PermissionDenied { .. } => "permission_denied",
            Self::NotFound { .. } => "not_found",
            Self::Deleted { .. } => "deleted",
            Self::KeyMissing { .. } => "key_missing",
            Self::NotAString { .. } => "not_a_string",
            Self::Malformed { .. } => "malformed",
        }
    }
}

/// A place secret values are read from.
pub trait SecretSource: Send + Sync + 'static {
    /// A short name for logs and metrics (`file`, `vault`).
    fn kind(&self) -> &'static str;

    /// Reads the value `secret` names. `known` is the revision the caller
    /// holds: a source that can tell cheaply that nothing changed answers
    /// [`Fetched::Unchanged`] without transferring the value.
    fn read<'a>(
        &'a self,
        secret: &'a VaultSecretRef,
        known: Option<Revision>,
    ) -> BoxFuture<'a, Result<Fetched, SourceError>>;

    /// Lets go of what the source holds at the source's side (Vault: our
    /// token is revoked, so restarts leave no leases behind). Called once,
    /// on graceful shutdown.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// `mount/path`, how errors and logs name a secret.
pub fn display_path(secret: &VaultSecretRef) -> String {
    format!("{}/{}", secret.mount, secret.path)
}
