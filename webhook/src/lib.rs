//! credbroker's mutating admission webhook. For a pod that opts in, it adds
//! the init container that captures the pod's egress, the broker as a
//! native sidecar, the sidecar's volumes, per-pod placeholders and the CA
//! trust variables, and takes the service-account token out of agent
//! containers. It refuses pods whose agents could bypass the broker.
//!
//! The decision is pure ([`mutate`]: pod, settings and the service
//! account's bindings in, a JSON patch or a refusal out), where the golden
//! tests live. Around it sit the I/O edges: [`bindings`] (a watch of the
//! `CredentialBinding`s), [`serve`] (AdmissionReview over
//! HTTPS) and [`certs`] (the serving certificate: mounted, or self-managed).

#![forbid(unsafe_code)]

pub mod bindings;
pub mod certs;
pub mod metrics;
pub mod mutate;
pub mod review;
pub mod run;
pub mod serve;
pub mod settings;

/// Everything that can stop the webhook or fail a step of it. A refused
/// pod is not an error: it is an answer ([`mutate::Refusal`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is wrong; names the flag.
    #[error("configuration: {0}")]
    Config(String),
    /// The API server refused or did not answer.
    #[error("{doing}: {source}")]
    Kube {
        doing: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// A file or socket.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A certificate could not be made, read or used.
    #[error("certificate: {0}")]
    Certificate(String),
    /// This replica lost the lease while writing.
    #[error("lost leadership: {0}")]
    LeadershipLost(String),
}

impl Error {
    pub fn kube(doing: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let doing = doing.into();
        move |source| Self::Kube {
            doing,
            source: Box::new(source),
        }
    }

    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
