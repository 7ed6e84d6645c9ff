//! credbroker's controller: it turns `CredentialBinding`s, within what
//! `ClusterCredentialPolicy`s allow, into one Vault ACL policy, one
//! Kubernetes-auth role and one bindings ConfigMap per (namespace,
//! service account). It never reads a secret value: it reads KV metadata to
//! report whether a secret exists, and writes only `credbroker-*` policies
//! and roles.
//!
//! Reconcile is a pipeline (read → validate → desired state → apply →
//! status). The middle steps are the pure modules [`admission`] and
//! [`desired`], where most tests live; [`vault`] and [`reconcile`] are the
//! I/O edges around them.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod desired;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod reconcile;
pub mod run;
pub mod settings;
pub mod status;
pub mod sweep;
pub mod uninstall;
pub mod vault;

/// What went wrong talking to Vault. `Clone`, so one failure can be told
/// to every binding it affects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// Vault did not answer (connection, TLS or timeout).
    #[error("Vault unreachable at {addr} while {doing}: {reason}")]
    Unavailable {
        addr: String,
        doing: String,
        reason: String,
    },
    /// Vault answered with an error status. `errors` is Vault's own error
    /// list, which never holds a secret (the controller never sends or
    /// reads one).
    #[error("Vault refused {doing} (HTTP {status}){errors}")]
    Refused {
        doing: String,
        status: u16,
        errors: String,
    },
    /// The controller's own credentials (JWT or secret-id file) cannot be read.
    #[error("{what}: {reason}")]
    Credentials { what: String, reason: String },
    /// This replica no longer holds the leader lease, so it must not write.
    #[error("not writing {doing}: this replica is not sure it still holds the leader lease")]
    NotLeader { doing: String },
}

/// Everything that can go wrong in the controller, naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or did not answer.
    #[error("{doing}: {source}")]
    Kube {
        doing: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// A setting or a file the controller was given is wrong.
    #[error("{what}: {reason}")]
    Config { what: String, reason: String },
    /// An object failed the same checks the CRD schema makes.
    #[error(transparent)]
    Invalid(#[from] credbroker_crds::Error),
    /// The finalizer could not be added or removed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The watch caches do not hold a full list yet.
    #[error("the watch caches are still filling")]
    CachesNotReady,
    /// A Kubernetes write did not finish before a standby could take over
    /// the lease; it may or may not have landed.
    #[error("{doing} did not finish before the leader lease could pass to another replica")]
    WriteDeadline { doing: String },
    /// The leader lease was lost; the process exits so no two replicas write.
    #[error("lost the leader lease: {0}")]
    LeadershipLost(String),
}

impl Error {
    /// A short, stable reason: a metric label and a condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube {
                source: kube::Error::Api(s),
                ..
            } if s.code == 403 => "KubernetesForbidden",
            Self::Kube {
                source: kube::Error::Api(s),
                ..
            } if s.code == 409 => "KubernetesConflict",
            Self::Kube { .. } => "KubernetesError",
            Self::Vault(e) => e.reason(),
            Self::Config { .. } => "ConfigError",
            Self::Invalid(_) => "Invalid",
            Self::Finalizer(_) => "FinalizerError",
            Self::CachesNotReady => "CachesNotReady",
            Self::LeadershipLost(_) => "LeadershipLost",
            Self::WriteDeadline { .. } => "LeaderDeadlineExceeded",
        }
    }

    pub(crate) fn kube(doing: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let doing = doing.into();
        move |source| Self::Kube { doing, source }
    }

    pub(crate) fn config(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

impl VaultError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "VaultUnavailable",
            Self::Refused { status: 403, .. } => "VaultPermissionDenied",
            Self::Refused { .. } => "VaultError",
            Self::Credentials { .. } => "VaultCredentialsUnreadable",
            Self::NotLeader { .. } => "NotLeader",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
