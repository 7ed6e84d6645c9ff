//! Vault's answers, parsed by us (pure): what a login, a renewal, a token
//! lookup and a KV v2 metadata read say, and the `errors` of a refusal.
//!
//! Why not a Vault client library: its errors can carry the response body
//! (a parse error on a KV read quotes the value it choked on). Here a
//! token goes straight into a [`SecretValue`], a parse error is described
//! by its category and position only ([`super::super::kv::describe`]), and
//! a refusal's text is cleaned before anyone logs it ([`refusal_text`]).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::secret::SecretValue;
use crate::source::kv::describe;

/// A Vault token: never printed, wiped on drop.
pub struct Token(pub SecretValue);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

impl<'de> Deserialize<'de> for Token {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Token;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a token string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Token, E> {
                Ok(Token(SecretValue::copy_from(v.as_bytes())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Token, E> {
                Ok(Token(SecretValue::from_string(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The longest TTL believed (32 days, beyond Vault's default max of 32
/// days): a larger one, from a broken or hostile server, would overflow
/// the arithmetic on instants.
const MAX_TTL_SECS: u64 = 32 * 24 * 3600;

/// What a login or a renewal grants.
#[derive(Debug)]
pub struct Granted {
    pub token: Token,
    /// `lease_duration`: 0 means the token does not expire.
    pub ttl: Duration,
    pub renewable: bool,
}

#[derive(Deserialize)]
struct AuthEnvelope {
    auth: Option<AuthBlock>,
}

#[derive(Deserialize)]
struct AuthBlock {
    client_token: Token,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

/// Parses the `auth` block of a login or `renew-self` answer.
pub fn granted(body: &[u8]) -> Result<Granted, String> {
    let envelope: AuthEnvelope =
        serde_json::from_slice(body).map_err(|e| format!("the answer is {}", describe(&e)))?;
    let auth = envelope
        .auth
        .ok_or_else(|| "the answer has no auth block".to_owned())?;
    if auth.client_token.0.is_empty() {
        return Err("the answer's client_token is empty".into());
    }
    Ok(Granted {
        token: auth.client_token,
        ttl: Duration::from_secs(auth.lease_duration.min(MAX_TTL_SECS)),
        renewable: auth.renewable,
    })
}

/// What `auth/token/lookup-self` says of a token handed to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Looked {
    /// Time left: 0 means the token does not expire.
    pub ttl: Duration,
    pub renewable: bool,
}

#[derive(Deserialize)]
struct LookupEnvelope {
    data: LookupData,
}

#[derive(Deserialize)]
struct LookupData {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    renewable: bool,
}

pub fn looked_up(body: &[u8]) -> Result<Looked, String> {
    let envelope: LookupEnvelope =
        serde_json::from_slice(body).map_err(|e| format!("the answer is {}", describe(&e)))?;
    Ok(Looked {
        ttl: Duration::from_secs(envelope.data.ttl.min(MAX_TTL_SECS)),
        renewable: envelope.data.renewable,
    })
}

/// The state of a KV v2 secret's current version, from
/// `<mount>/metadata/<path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentVersion {
    /// 0 when the secret has no version at all.
    pub version: u64,
    /// RFC 3339, empty when the version is not (to be) deleted.
    pub deletion_time: String,
    pub destroyed: bool,
    /// When the version was written (RFC 3339): a secret deleted with its
    /// metadata and written again starts at version 1 again, and only this
    /// tells the new version 1 from the old.
    pub created_time: String,
}

#[derive(Deserialize)]
struct MetadataEnvelope {
    data: MetadataData,
}

#[derive(Deserialize)]
struct MetadataData {
    current_version: u64,
    #[serde(default)]
    versions: HashMap<String, VersionState>,
}

#[derive(Deserialize)]
struct VersionState {
    #[serde(default)]
    deletion_time: String,
    #[serde(default)]
    destroyed: bool,
    #[serde(default)]
    created_time: String,
}

/// Parses a metadata answer down to the current version's state. Custom
/// metadata and other versions are skipped.
pub fn current_version(body: &[u8]) -> Result<CurrentVersion, String> {
    let envelope: MetadataEnvelope =
        serde_json::from_slice(body).map_err(|e| format!("the metadata is {}", describe(&e)))?;
    let data = envelope.data;
    let state = data.versions.get(&data.current_version.to_string());
    Ok(CurrentVersion {
        version: data.current_version,
        deletion_time: state.map(|s| s.deletion_time.clone()).unwrap_or_default(),
        destroyed: state.is_some_and(|s| s.destroyed),
        created_time: state.map(|s| s.created_time.clone()).unwrap_or_default(),
    })
}

#[derive(Deserialize)]
struct ErrorsEnvelope {
    #[serde(default)]
    errors: Vec<String>,
}

/// The longest refusal text kept.
const MAX_REFUSAL_TEXT: usize = 300;

/// Vault's `errors` of a refused login, fit for a log line: only printable
/// ASCII, at most 300 characters, and with `sent` (the credential we sent:
/// a JWT, a secret_id) cut out should Vault ever quote it. A body that is
/// not Vault's error shape says nothing.
pub fn refusal_text(body: &[u8], sent: &[u8]) -> String {
    let Ok(envelope) = serde_json::from_slice::<ErrorsEnvelope>(body) else {
        return String::new();
    };
    let mut text = envelope.errors.join("; ");
    if sent.len() >= 8
        && let Ok(sent) = std::str::from_utf8(sent)
    {
        text = text.replace(sent, "[redacted]");
    }
    let mut clean: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if clean.len() > MAX_REFUSAL_TEXT {
        clean.truncate(MAX_REFUSAL_TEXT);
        clean.push_str("...");
    }
    clean
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_answer_gives_a_token_that_does_not_print() {
        let body = br#"{"request_id":"r","auth":{"client_token":"s.t0ken-value-1234",
            "accessor":"a","policies":["p"],"lease_duration":600,"renewable":true},"data":null}"#;
        let g = granted(body).unwrap();
        assert_eq!(g.token.0.expose_secret(), b"s.t0ken-value-1234");
        assert_eq!(g.ttl, Duration::from_secs(600));
        assert!(g.renewable);
        assert!(!format!("{g:?}").contains("t0ken"));
    }

    #[test]
    fn a_bad_login_answer_is_described_without_its_content() {
        for body in [
            &br#"{"auth":{"client_token":12345678901234}}"#[..],
            br#"{"auth":{"client_token":"s.t0ken-value-1234""#,
            br#"{"auth":null}"#,
            br#"{"auth":{"client_token":""}}"#,
            b"<html>s.t0ken-value-1234</html>",
        ] {
            let e = granted(body).unwrap_err();
            assert!(!e.contains("t0ken") && !e.contains("12345678"), "{e}");
        }
    }

    #[test]
    fn metadata_gives_the_current_versions_state() {
        let body = br#"{"data":{"current_version":3,"oldest_version":1,
            "custom_metadata":{"owner":"team"},"versions":{
            "2":{"created_time":"x","deletion_time":"","destroyed":true},
            "3":{"created_time":"y","deletion_time":"2026-12-01T10:00:00.5Z","destroyed":false}}}}"#;
        let v = current_version(body).unwrap();
        assert_eq!(v.version, 3);
        assert_eq!(v.deletion_time, "2026-12-01T10:00:00.5Z");
        assert!(!v.destroyed);
        let none = current_version(br#"{"data":{"current_version":0,"versions":{}}}"#).unwrap();
        assert_eq!(none.version, 0);
        assert!(current_version(b"{}").is_err());
    }

    #[test]
    fn refusals_are_cleaned_and_never_quote_what_we_sent() {
        let body =
            br#"{"errors":["invalid role name \"x\"","jwt eyJhbGciOi.secret-part was\nbad"]}"#;
        let text = refusal_text(body, b"eyJhbGciOi.secret-part");
        assert_eq!(text, r#"invalid role name "x"; jwt [redacted] was?bad"#);
        assert_eq!(refusal_text(b"not json", b""), "");
        let long = format!(r#"{{"errors":["{}"]}}"#, "a".repeat(1000));
        assert_eq!(refusal_text(long.as_bytes(), b"").len(), 303);
    }

    #[test]
    fn lookup_gives_ttl_and_renewability() {
        let l = looked_up(br#"{"data":{"ttl":0,"renewable":false,"policies":["root"]}}"#).unwrap();
        assert_eq!(l.ttl, Duration::ZERO);
        assert!(!l.renewable);
    }
}
