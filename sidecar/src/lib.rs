//! The broker sidecar (DESIGN.md section 4): it stands between an agent and
//! the network, and swaps per-pod placeholders for real secrets only toward
//! the destinations each secret is bound to.
//!
//! Modules by responsibility:
//! - [`decide`]: may this request carry the secrets it names (pure);
//! - [`secret`]: the secret and placeholder types (secrets never print);
//! - [`substitute`]: finding placeholders in requests and swapping them;
//! - [`echo`]: catching real values that come back in responses;
//! - [`init`]: the pod's packet-filter rules (the init container);
//! - [`intercept`]: recovering where a redirected connection was going and
//!   what it says first (the TLS ClientHello);
//! - [`tls`]: the pod CA, leaf certificates and the agent trust bundle.

#![forbid(unsafe_code)]

pub mod decide;
pub mod echo;
pub mod init;
pub mod intercept;
pub mod secret;
pub mod substitute;
pub mod tls;

/// What went wrong in the sidecar, naming the binding, file, host or field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("init: {0}")]
    Init(String),
    #[error("intercept: {0}")]
    Intercept(#[from] intercept::InterceptError),
    #[error("tls: {0}")]
    Tls(String),
    /// A binding's secret cannot be used as asked (never carries the value).
    #[error("binding {binding}: {reason}")]
    Secret { binding: String, reason: String },
    #[error("not implemented yet: {0}")]
    NotImplemented(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
