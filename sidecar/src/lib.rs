//! The broker sidecar (DESIGN.md section 4): it stands between an agent and
//! the network, and swaps per-pod placeholders for real secrets only toward
//! the destinations each secret is bound to.
//!
//! Modules by responsibility, pure cores first:
//! - [`decide`]: may this request carry the secrets it names (pure);
//! - [`secret`]: the secret and placeholder types (secrets never print);
//! - [`substitute`]: finding placeholders in requests and swapping them;
//! - [`echo`]: catching real values that come back in responses;
//! - [`exchange`]: the request pipeline (plan, bodies, smuggling guard, handler);
//! - [`config`]: settings (flags) and config (files, reloaded);
//! - [`source`] and [`store`]: where secrets come from, kept current;
//! - [`engine`]: the snapshot every request is decided against;
//! - [`intercept`], [`route`], [`proxy`], [`local`], [`splice`]: accepting
//!   connections, recovering where they were going, and terminating,
//!   serving or splicing them;
//! - [`upstream`]: resolving, dialling and verified TLS to upstreams;
//! - [`tls`]: the pod CA, leaf certificates and the agent trust bundle;
//! - [`init`]: the pod's packet-filter rules (the init container);
//! - [`admin`], [`metrics`], [`audit`]: health, metrics, audit records;
//! - [`run`]: starting, hardening and draining the process.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod config;
pub mod decide;
pub mod echo;
pub mod engine;
pub mod exchange;
pub mod init;
pub mod intercept;
pub mod listen;
pub mod local;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod run;
pub mod secret;
pub mod source;
pub mod splice;
pub mod store;
pub mod substitute;
pub mod tls;
pub mod upstream;

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
