//! The sidecar's configuration format, in two parts (DESIGN.md section 4):
//!
//! - [`SidecarBindings`]: the bindings of one service account, rendered by
//!   the controller into a ConfigMap shared by all that account's pods;
//! - [`PodPlaceholders`]: the placeholders of one pod, written by the webhook
//!   into a pod annotation the sidecar reads through the downward API.
//!
//! Neither part ever holds a secret value. Both are strict: unknown fields
//! are errors, so a typo in a hand-written local config is caught, and a
//! format version guards against a sidecar older than its controller.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::binding::{HttpMethod, PlaceholderSpec, Surface, VaultSecretRef};
use crate::{Error, Result, validate};

/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The bindings of one service account, as the sidecar consumes them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarBindings {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The Vault Kubernetes-auth role the sidecar logs in with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault_role: Option<String>,
    /// The bindings, each with an id unique within this service account.
    pub bindings: Vec<SidecarBinding>,
}

/// One binding, as the sidecar enforces it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarBinding {
    /// The binding's id: the CredentialBinding's name. Placeholders are keyed by it.
    pub id: String,
    /// Where the real value lives.
    pub secret: VaultSecretRef,
    /// The only destinations the real value may go to.
    pub destinations: Vec<SidecarDestination>,
    /// Where in a request the placeholder may be swapped (default: headers).
    #[serde(default = "default_surfaces")]
    pub surfaces: Vec<Surface>,
    /// How often to check Vault for a new version (e.g. `30s`; default 30s).
    #[serde(default = "default_refresh_interval")]
    pub refresh_interval: String,
    /// The binding's placeholder env var and prefix, as the webhook
    /// injects them (the sidecar itself does not use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<PlaceholderSpec>,
}

fn default_surfaces() -> Vec<Surface> {
    vec![Surface::Header]
}

fn default_refresh_interval() -> String {
    "30s".to_owned()
}

fn default_port() -> u16 {
    443
}

/// A destination, with any extra CA already resolved to PEM (CA
/// certificates are public; the controller copies them from the binding's
/// `caConfigMap`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarDestination {
    pub host: String,
    /// Default 443.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Empty means any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
    /// Empty means any path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Extra trust for this upstream, added to the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_cleartext: bool,
}

impl SidecarBindings {
    /// Parses and validates the JSON the controller writes.
    pub fn from_json(json: &str) -> Result<Self> {
        let parsed: Self = serde_json::from_str(json).map_err(|e| Error::Parse {
            what: "sidecar bindings".into(),
            reason: e.to_string(),
        })?;
        parsed.validate()?;
        Ok(parsed)
    }

    /// Checks what the type cannot: the format version, unique ids, and
    /// every name against the same allowlists as the CRD schema.
    pub fn validate(&self) -> Result<()> {
        if self.format_version != FORMAT_VERSION {
            return Err(Error::invalid(
                "formatVersion",
                format!(
                    "{} is not supported (expected {FORMAT_VERSION})",
                    self.format_version
                ),
            ));
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, b) in self.bindings.iter().enumerate() {
            let at = |f: &str| format!("bindings[{i}].{f}");
            if b.id.is_empty() || !ids.insert(b.id.as_str()) {
                return Err(Error::invalid(
                    at("id"),
                    format!("{:?} is empty or repeated", b.id),
                ));
            }
            validate::vault_mount(&at("secret.mount"), &b.secret.mount)?;
            validate::vault_path(&at("secret.path"), &b.secret.path)?;
            if !matches!(b.secret.kv_version, 1 | 2) {
                return Err(Error::invalid(at("secret.kvVersion"), "must be 1 or 2"));
            }
            if b.secret.key.is_empty() {
                return Err(Error::invalid(at("secret.key"), "must not be empty"));
            }
            if b.destinations.is_empty() {
                return Err(Error::invalid(at("destinations"), "must not be empty"));
            }
            if b.surfaces.is_empty() {
                return Err(Error::invalid(at("surfaces"), "must not be empty"));
            }
            for (j, d) in b.destinations.iter().enumerate() {
                validate::host(&at(&format!("destinations[{j}].host")), &d.host)?;
                if d.port == 0 {
                    return Err(Error::invalid(
                        at(&format!("destinations[{j}].port")),
                        "must be 1-65535",
                    ));
                }
                for (k, p) in d.paths.iter().enumerate() {
                    validate::http_path(&at(&format!("destinations[{j}].paths[{k}]")), p)?;
                }
            }
            // The CRD's rules, through the same functions: a hand-written
            // local config has no schema in front of it.
            validate::scoped_surfaces(
                &at("destinations"),
                &b.surfaces,
                b.destinations
                    .iter()
                    .map(|d| !d.methods.is_empty() && !d.paths.is_empty()),
            )?;
            validate::refresh_interval(&at("refreshInterval"), &b.refresh_interval)?;
        }
        Ok(())
    }
}

/// Local mode's one file (`credbroker-sidecar local --config FILE`): the
/// bindings and this machine's placeholders together, YAML or JSON. In a pod
/// the two come from different places (the controller's ConfigMap and the
/// webhook's annotation); on a laptop one hand-written file is simpler.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    #[serde(default)]
    pub bindings: Vec<SidecarBinding>,
    /// Binding id → the placeholder the agent uses for it.
    #[serde(default)]
    pub placeholders: PodPlaceholders,
}

impl LocalConfig {
    /// Parses (YAML, so JSON too) and validates both parts.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let parsed: Self = serde_yaml::from_str(text).map_err(|e| Error::Parse {
            what: "local config".into(),
            reason: e.to_string(),
        })?;
        parsed.split()?;
        Ok(parsed)
    }

    /// The two parts, as a pod's sidecar would read them, each validated.
    pub fn split(&self) -> Result<(SidecarBindings, PodPlaceholders)> {
        let bindings = SidecarBindings {
            format_version: self.format_version,
            vault_role: None,
            bindings: self.bindings.clone(),
        };
        bindings.validate()?;
        let placeholders = PodPlaceholders::from_json(
            &serde_json::to_string(&self.placeholders).map_err(|e| Error::Parse {
                what: "local config placeholders".into(),
                reason: e.to_string(),
            })?,
        )?;
        Ok((bindings, placeholders))
    }
}

/// The longest prefix [`generate_placeholder`] takes (the CRD's limit).
pub const PLACEHOLDER_PREFIX_MAX_LEN: usize = 32;
/// Random characters in a generated placeholder: 26 base-36 characters are
/// 26 * log2(36) = 134.4 bits, over the 128 bits required.
pub const PLACEHOLDER_RANDOM_CHARS: usize = 26;

/// A new placeholder: `prefix` (RFC 3986 unreserved characters, at most
/// [`PLACEHOLDER_PREFIX_MAX_LEN`]) followed by [`PLACEHOLDER_RANDOM_CHARS`]
/// characters drawn uniformly from `[0-9a-z]` with the OS random number
/// generator. Lowercase letters and digits need no escaping in a URL, JSON
/// or a header, and survive anything that lowercases what it forwards. The
/// webhook (per pod) and the sidecar (`credbroker-sidecar placeholder`)
/// both generate them here.
pub fn generate_placeholder(prefix: Option<&str>) -> Result<String> {
    use ring::rand::SecureRandom;
    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let prefix = prefix.unwrap_or("");
    if prefix.len() > PLACEHOLDER_PREFIX_MAX_LEN
        || !prefix
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~".contains(&c))
    {
        return Err(Error::invalid(
            "placeholder.prefix",
            format!(
                "{prefix:?}: must be at most {PLACEHOLDER_PREFIX_MAX_LEN} RFC 3986 unreserved \
                 characters"
            ),
        ));
    }
    let rng = ring::rand::SystemRandom::new();
    let mut out = String::with_capacity(prefix.len() + PLACEHOLDER_RANDOM_CHARS);
    out.push_str(prefix);
    let mut random = [0u8; 64];
    let mut drawn = 0;
    while drawn < PLACEHOLDER_RANDOM_CHARS {
        rng.fill(&mut random).map_err(|_| Error::Parse {
            what: "placeholder".into(),
            reason: "the OS random number generator failed".into(),
        })?;
        // Rejection sampling: 252 = 7 * 36, so bytes below it map
        // uniformly onto the alphabet; the rest are discarded.
        for &b in random.iter().filter(|&&b| b < 252) {
            if drawn == PLACEHOLDER_RANDOM_CHARS {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(b % 36)]));
            drawn += 1;
        }
    }
    Ok(out)
}

/// The longest placeholder accepted: it bounds what the sidecar holds back
/// while scanning a stream.
pub const MAX_PLACEHOLDER_LEN: usize = 128;

/// The placeholders of one pod: binding id → placeholder. Placeholders are
/// random per pod and are not secrets; the real values never leave the
/// sidecar.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct PodPlaceholders(pub BTreeMap<String, String>);

impl PodPlaceholders {
    /// Parses the annotation's JSON value.
    pub fn from_json(json: &str) -> Result<Self> {
        let parsed: Self = serde_json::from_str(json).map_err(|e| Error::Parse {
            what: "pod placeholders annotation".into(),
            reason: e.to_string(),
        })?;
        for (id, placeholder) in &parsed.0 {
            // A placeholder inside another would let one binding's
            // placeholder be read as the other's; two equal ones are
            // ambiguous. Either is refused.
            if let Some(other) = parsed.0.iter().find(|(other_id, other)| {
                *other_id != id
                    && (other.contains(placeholder.as_str())
                        || placeholder.contains(other.as_str()))
            }) {
                return Err(Error::invalid(
                    format!("placeholders[{id:?}]"),
                    format!("overlaps the placeholder of {:?}", other.0),
                ));
            }
            if placeholder.len() > MAX_PLACEHOLDER_LEN {
                return Err(Error::invalid(
                    format!("placeholders[{id:?}]"),
                    format!("must be at most {MAX_PLACEHOLDER_LEN} characters"),
                ));
            }
            // Unreserved characters only: a placeholder must survive URL,
            // JSON and header contexts unchanged, so it can be found there.
            if placeholder.len() < 22
                || !placeholder
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-._~".contains(&c))
            {
                return Err(Error::invalid(
                    format!("placeholders[{id:?}]"),
                    "must be at least 22 RFC 3986 unreserved characters",
                ));
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SidecarBindings {
        SidecarBindings {
            format_version: FORMAT_VERSION,
            vault_role: Some("credbroker-agents-research-0123abcd".into()),
            bindings: vec![SidecarBinding {
                id: "openai".into(),
                secret: VaultSecretRef {
                    mount: "secret".into(),
                    path: "teams/research/openai".into(),
                    key: "api_key".into(),
                    kv_version: 2,
                },
                destinations: vec![SidecarDestination {
                    host: "api.openai.com".into(),
                    port: 443,
                    methods: vec![HttpMethod::Post],
                    paths: vec!["/v1/*".into()],
                    extra_ca_pem: None,
                    allow_cleartext: false,
                }],
                surfaces: vec![Surface::Header],
                refresh_interval: "30s".into(),
                placeholder: None,
            }],
        }
    }

    #[test]
    fn round_trips_through_json() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert_eq!(SidecarBindings::from_json(&json).unwrap(), sample());
    }

    #[test]
    fn unknown_fields_and_bad_names_are_errors_naming_the_field() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["bindings"][0]["destinations"][0]["hots"] = "x".into();
        let e = SidecarBindings::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(e.contains("hots"), "{e}");

        let mut s = sample();
        s.bindings[0].destinations[0].host = "https://evil.com".into();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("bindings[0].destinations[0].host"), "{e}");

        let mut s = sample();
        s.bindings.push(s.bindings[0].clone());
        assert!(s.validate().unwrap_err().to_string().contains("repeated"));

        let mut s = sample();
        s.bindings[0].surfaces.push(Surface::Body);
        s.bindings[0].destinations[0].paths.clear();
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .starts_with("bindings[0].destinations")
        );

        for (interval, ok) in [
            ("0s", false),
            ("999ms", false),
            ("25h", false),
            ("1s", true),
        ] {
            let mut s = sample();
            s.bindings[0].refresh_interval = interval.into();
            assert_eq!(s.validate().is_ok(), ok, "{interval}");
        }

        let mut s = sample();
        s.bindings[0].secret.key.clear();
        assert!(s.validate().unwrap_err().to_string().contains("secret.key"));

        let mut s = sample();
        s.bindings[0].destinations[0].port = 0;
        assert!(s.validate().unwrap_err().to_string().contains("port"));

        let mut s = sample();
        s.format_version = 2;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("formatVersion")
        );
    }

    #[test]
    fn a_local_config_takes_defaults_and_refuses_typos() {
        let yaml = r#"
formatVersion: 1
bindings:
  - id: openai
    secret: { mount: secret, path: teams/research/openai, key: api_key }
    destinations:
      - host: api.openai.com
placeholders:
  openai: sk-cbph-0123456789abcdefghijKLMN
"#;
        let config = LocalConfig::from_yaml(yaml).unwrap();
        let (bindings, placeholders) = config.split().unwrap();
        let b = &bindings.bindings[0];
        assert_eq!(b.surfaces, vec![Surface::Header]);
        assert_eq!(b.refresh_interval, "30s");
        assert_eq!(b.destinations[0].port, 443);
        assert_eq!(b.secret.kv_version, 2);
        assert_eq!(placeholders.0.len(), 1);

        let typo = yaml.replace("destinations:", "destination:");
        let e = LocalConfig::from_yaml(&typo).unwrap_err().to_string();
        assert!(e.contains("destination"), "{e}");
        let short = yaml.replace("sk-cbph-0123456789abcdefghijKLMN", "short");
        let e = LocalConfig::from_yaml(&short).unwrap_err().to_string();
        assert!(e.contains("openai"), "{e}");
    }

    #[test]
    fn placeholders_must_be_long_and_unreserved() {
        let ok = r#"{"openai":"sk-cbph-0123456789abcdefghijKLMN"}"#;
        assert_eq!(PodPlaceholders::from_json(ok).unwrap().0.len(), 1);
        assert!(PodPlaceholders::from_json(r#"{"openai":"short"}"#).is_err());
        let overlapping = r#"{"a":"0123456789abcdefghijKLMN","b":"x0123456789abcdefghijKLMNx"}"#;
        assert!(
            PodPlaceholders::from_json(overlapping)
                .unwrap_err()
                .to_string()
                .contains("overlaps")
        );
        let same = r#"{"a":"0123456789abcdefghijKLMN","b":"0123456789abcdefghijKLMN"}"#;
        assert!(PodPlaceholders::from_json(same).is_err());
        let long = format!(r#"{{"a":"{}"}}"#, "x".repeat(129));
        assert!(PodPlaceholders::from_json(&long).is_err());
        assert!(
            PodPlaceholders::from_json(r#"{"openai":"0123456789abcdefghijklmn\r\n"}"#).is_err()
        );
    }
}
