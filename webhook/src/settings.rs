//! What the webhook injects, from its flags. [`InjectSettings`] is plain
//! data: [`crate::mutate::mutate`] reads nothing else, so the golden tests
//! build one by hand.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::{Error, Result};

/// The shortest projected-token lifetime Kubernetes accepts.
pub const MIN_TOKEN_EXPIRATION_SECONDS: i64 = 600;
/// The longest this webhook asks for: a stolen token stays useful no longer.
pub const MAX_TOKEN_EXPIRATION_SECONDS: i64 = 24 * 3600;

/// How the sidecar reaches Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarVault {
    /// `https://host:port`.
    pub addr: String,
    /// The Kubernetes auth mount (default `kubernetes`).
    pub auth_mount: String,
    /// A Vault Enterprise / OpenBao namespace.
    pub namespace: Option<String>,
    /// Vault's CA (PEM, public), when the system roots do not cover it.
    pub ca_pem: Option<String>,
}

/// Everything [`crate::mutate::mutate`] needs besides the pod and its bindings.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectSettings {
    pub sidecar_image: String,
    pub init_image: String,
    /// `Always`, `IfNotPresent` or `Never`; absent leaves the cluster default.
    pub image_pull_policy: Option<String>,
    /// The sidecar's UID and GID: the only ones `init` exempts from capture.
    pub proxy_uid: i64,
    pub proxy_gid: i64,
    /// Where redirected TCP arrives in the sidecar.
    pub proxy_port: u16,
    /// The sidecar's health and metrics port (the startupProbe's).
    pub admin_port: u16,
    /// Outbound ports left uncaptured.
    pub exclude_ports: Vec<u16>,
    /// Outbound CIDRs left uncaptured.
    pub exclude_cidrs: Vec<String>,
    /// The audience of the sidecar's projected token, which Vault's role requires.
    pub audience: String,
    /// The projected token's lifetime.
    pub token_expiration_seconds: i64,
    pub vault: SidecarVault,
    pub sidecar_resources: ResourceRequirements,
    /// The broker's own namespace: never injected.
    pub broker_namespace: String,
}

impl InjectSettings {
    /// Checks what the types cannot. Every error names the flag.
    pub fn validate(&self) -> Result<()> {
        for (flag, image) in [
            ("--sidecar-image", &self.sidecar_image),
            ("--init-image", &self.init_image),
        ] {
            if image.is_empty() || image.contains(char::is_whitespace) {
                return Err(Error::Config(format!(
                    "{flag} {image:?}: not an image reference"
                )));
            }
        }
        if let Some(policy) = &self.image_pull_policy
            && !["Always", "IfNotPresent", "Never"].contains(&policy.as_str())
        {
            return Err(Error::Config(format!(
                "--image-pull-policy {policy:?}: must be Always, IfNotPresent or Never"
            )));
        }
        // UID 0 would exempt root, so every root process escapes capture.
        let id_range = 1..=i64::from(u32::MAX);
        if !id_range.contains(&self.proxy_uid) || !id_range.contains(&self.proxy_gid) {
            return Err(Error::Config(
                "--proxy-uid and --proxy-gid must be 1-4294967295 (0 would exempt root from \
                 capture)"
                    .into(),
            ));
        }
        if self.exclude_ports.contains(&0) {
            return Err(Error::Config("--exclude-port 0 is not a port".into()));
        }
        // Checked here, not first in every pod's init container.
        for cidr in &self.exclude_cidrs {
            valid_cidr(cidr)
                .map_err(|why| Error::Config(format!("--exclude-cidr {cidr:?}: {why}")))?;
        }
        if self.proxy_port == 0 || self.admin_port == 0 || self.proxy_port == self.admin_port {
            return Err(Error::Config(
                "--proxy-port and --admin-port must be distinct ports 1-65535".into(),
            ));
        }
        if self.audience.is_empty() {
            return Err(Error::Config("--audience must not be empty".into()));
        }
        if !(MIN_TOKEN_EXPIRATION_SECONDS..=MAX_TOKEN_EXPIRATION_SECONDS)
            .contains(&self.token_expiration_seconds)
        {
            return Err(Error::Config(format!(
                "--token-expiration-seconds {}: must be {MIN_TOKEN_EXPIRATION_SECONDS}-\
                 {MAX_TOKEN_EXPIRATION_SECONDS}",
                self.token_expiration_seconds
            )));
        }
        if !self.vault.addr.starts_with("https://") {
            return Err(Error::Config(format!(
                "--vault-addr {:?}: the sidecar talks to Vault over https:// only",
                self.vault.addr
            )));
        }
        if self.broker_namespace.is_empty() {
            return Err(Error::Config("--broker-namespace must not be empty".into()));
        }
        Ok(())
    }
}

/// `address/prefix`, IPv4 or IPv6, with the prefix in range.
fn valid_cidr(text: &str) -> std::result::Result<(), String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or("expected address/prefix, e.g. 10.0.0.0/8")?;
    let addr: std::net::IpAddr = addr.parse().map_err(|_| "not an IP address")?;
    let prefix: u8 = prefix.parse().map_err(|_| "the prefix is not a number")?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(format!("the prefix must be 0-{max}"));
    }
    Ok(())
}

/// Requests and limits from `cpu=100m,memory=64Mi`-style lists.
pub fn resource_list(flag: &str, text: &str) -> Result<Option<BTreeMap<String, Quantity>>> {
    let mut out = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((name, value)) = item.split_once('=') else {
            return Err(Error::Config(format!(
                "{flag} {item:?}: expected name=quantity (e.g. cpu=100m)"
            )));
        };
        let (name, value) = (name.trim(), value.trim());
        if !["cpu", "memory", "ephemeral-storage"].contains(&name) {
            return Err(Error::Config(format!(
                "{flag} {name:?}: expected cpu, memory or ephemeral-storage"
            )));
        }
        let quantity_like = !value.is_empty()
            && value.chars().next().is_some_and(|c| c.is_ascii_digit())
            && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
        if !quantity_like {
            return Err(Error::Config(format!(
                "{flag} {name}={value:?}: not a quantity"
            )));
        }
        out.insert(name.to_owned(), Quantity(value.to_owned()));
    }
    Ok((!out.is_empty()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_resource_lists_are_checked() {
        for good in ["10.0.0.0/8", "fd00::/8", "192.168.1.1/32", "::/0"] {
            assert!(valid_cidr(good).is_ok(), "{good}");
        }
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "host/8",
            "10.0.0.0/x",
        ] {
            assert!(valid_cidr(bad).is_err(), "{bad}");
        }
        let list = resource_list("--sidecar-requests", "cpu=50m, memory=32Mi").unwrap();
        assert_eq!(list.map(|l| l.len()), Some(2));
        for bad in ["cpu", "gpu=1", "cpu=-1", "memory=1 Gi"] {
            assert!(resource_list("--sidecar-requests", bad).is_err(), "{bad}");
        }
    }
}
