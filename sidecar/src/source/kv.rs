//! Reading one key of a KV secret's data (a JSON object) straight into a
//! [`SecretValue`], without a general-purpose JSON value in between.
//!
//! Why not `serde_json::Value`: it would copy every value of the secret,
//! wanted or not, into strings nobody wipes, and a library's error for an
//! unexpected type can quote the value (`invalid type: integer 123456`).
//! Here only the wanted key's string is copied, into the zeroizing type, and
//! anything else is described by its kind alone.
//!
//! What cannot be wiped: the caller's input buffer (the caller owns it, and
//! should hold it in `Zeroizing`), and serde_json's scratch buffer, used for
//! a string with escape sequences.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::secret::SecretValue;

/// Why the key could not be read (never carrying the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The data has no such key.
    Missing,
    /// The key holds a number, a boolean, null, an object or an array.
    NotAString(&'static str),
    /// The key appears more than once: which one the store means is unclear.
    Repeated,
    /// The data is not a JSON object (the reason names no value).
    Malformed(String),
}

/// Reads `key` of the JSON object `data`.
pub fn extract_key(data: &[u8], key: &str) -> Result<SecretValue, KeyError> {
    extract_key_at(data, &[], key)
}

/// Reads `key` of the object found by following `path` from the top of
/// `data`: a Vault response holds a KV v1 secret's data at `["data"]` and a
/// KV v2 one's at `["data", "data"]`. Everything off that path is skipped
/// unread.
pub fn extract_key_at(data: &[u8], path: &[&str], key: &str) -> Result<SecretValue, KeyError> {
    let mut de = serde_json::Deserializer::from_slice(data);
    let found = de
        .deserialize_map(PathVisitor {
            field: "",
            path,
            key,
        })
        .map_err(|e| KeyError::Malformed(describe(&e)))?;
    de.end().map_err(|e| KeyError::Malformed(describe(&e)))?;
    match found {
        Found::Value(v) => Ok(v),
        Found::Missing => Err(KeyError::Missing),
        Found::NotAString(kind) => Err(KeyError::NotAString(kind)),
        Found::Repeated => Err(KeyError::Repeated),
        Found::NoData(field, kind) => Err(KeyError::Malformed(format!(
            "the response's {field:?} is {kind}, not an object"
        ))),
    }
}

/// serde_json's error, by category and position only: its message for a
/// syntax error can quote input.
pub(crate) fn describe(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => "not a JSON object of strings",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

enum Found {
    Value(SecretValue),
    Missing,
    NotAString(&'static str),
    Repeated,
    /// A field on the path is absent or not an object (its name, its kind).
    NoData(String, &'static str),
}

/// Walks `path` down nested objects, then reads `key` there.
struct PathVisitor<'k> {
    /// The field whose value this visitor reads (`""` for the top).
    field: &'k str,
    path: &'k [&'k str],
    key: &'k str,
}

impl<'de> DeserializeSeed<'de> for PathVisitor<'_> {
    type Value = Found;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PathVisitor<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Found, A::Error> {
        let Some((field, rest)) = self.path.split_first() else {
            return KeyVisitor { key: self.key }.visit_map(map);
        };
        let mut map = map;
        let mut found = Found::NoData((*field).to_owned(), "absent");
        let mut seen = false;
        while let Some(name) = map.next_key::<KeyName<'_>>()? {
            if name.0 == *field {
                let inner = map.next_value_seed(PathVisitor {
                    field,
                    path: rest,
                    key: self.key,
                })?;
                found = if seen { Found::Repeated } else { inner };
                seen = true;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    // Anything but an object on the path: named by kind, never quoted.
    fn visit_unit<E: de::Error>(self) -> Result<Found, E> {
        Ok(self.not_an_object("null"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Found, E> {
        Ok(self.not_an_object("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Found, E> {
        Ok(self.not_an_object("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Found, E> {
        Ok(self.not_an_object("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Found, E> {
        Ok(self.not_an_object("a number"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Found, E> {
        Ok(self.not_an_object("a string"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Found, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(self.not_an_object("an array"))
    }
}

impl PathVisitor<'_> {
    fn not_an_object(&self, kind: &'static str) -> Found {
        let field = if self.field.is_empty() {
            "top level"
        } else {
            self.field
        };
        Found::NoData(field.to_owned(), kind)
    }
}

struct KeyVisitor<'k> {
    key: &'k str,
}

impl<'de> Visitor<'de> for KeyVisitor<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let mut found = Found::Missing;
        while let Some(name) = map.next_key::<KeyName<'_>>()? {
            if name.0 == self.key {
                let value = map.next_value_seed(StringSeed)?;
                found = match found {
                    Found::Missing => value,
                    _ => Found::Repeated,
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// A key name: borrowed when it has no escapes, owned otherwise (names are
/// not secret).
struct KeyName<'a>(std::borrow::Cow<'a, str>);

impl<'de> de::Deserialize<'de> for KeyName<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(KeyName(v.into()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(KeyName(v.to_owned().into()))
            }
        }
        d.deserialize_str(V)
    }
}

/// The wanted value: a string becomes a [`SecretValue`]; anything else is
/// named by kind and skipped.
struct StringSeed;

impl<'de> DeserializeSeed<'de> for StringSeed {
    type Value = Found;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
        d.deserialize_any(StringVisitor)
    }
}

struct StringVisitor;

impl<'de> Visitor<'de> for StringVisitor {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Found, E> {
        Ok(Found::Value(SecretValue::copy_from(v.as_bytes())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Found, E> {
        // Takes the allocation over, so it is wiped with the value.
        Ok(Found::Value(SecretValue::from_string(v)))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Found, E> {
        Ok(Found::NotAString("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Found, E> {
        Ok(Found::NotAString("a number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Found, E> {
        Ok(Found::NotAString("a number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Found, E> {
        Ok(Found::NotAString("a number"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Found, E> {
        Ok(Found::NotAString("null"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Found::NotAString("an object"))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Found, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Found::NotAString("an array"))
    }
}

/// A fuzz target: [`extract_key`] on arbitrary data never panics, and a
/// `Malformed` error never carries a run of the input (which stands in for
/// a secret) longer than 5 bytes.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_extract_key(data: &[u8]) {
    let key = data
        .first()
        .map_or("k", |b| if b % 2 == 0 { "k" } else { "api_key" });
    if let Err(KeyError::Malformed(why)) = extract_key(data, key) {
        for window in data.windows(6) {
            if let Ok(text) = std::str::from_utf8(window)
                && text.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                assert!(!why.contains(text), "the error quotes the input: {why}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(data: &str, key: &str) -> Result<Vec<u8>, KeyError> {
        extract_key(data.as_bytes(), key).map(|v| v.expose_secret().to_vec())
    }

    #[test]
    fn reads_the_wanted_string_only() {
        let data = r#"{"user":"bob","api_key":"s3cr3t-value","n":1,"o":{"a":[1,2]}}"#;
        assert_eq!(value(data, "api_key").unwrap(), b"s3cr3t-value");
        assert_eq!(
            value(r#"{"k":"a\"b\\c\u00e9"}"#, "k").unwrap(),
            "a\"b\\cé".as_bytes()
        );
        assert_eq!(value(r#"{"k\u0031":"x"}"#, "k1").unwrap(), b"x");
    }

    #[test]
    fn other_kinds_are_named_never_quoted() {
        for (data, kind) in [
            (r#"{"k":123456789}"#, "a number"),
            (r#"{"k":-1.5e3}"#, "a number"),
            (r#"{"k":true}"#, "a boolean"),
            (r#"{"k":null}"#, "null"),
            (r#"{"k":{"nested":"s3cr3t"}}"#, "an object"),
            (r#"{"k":["s3cr3t"]}"#, "an array"),
        ] {
            assert_eq!(
                value(data, "k").unwrap_err(),
                KeyError::NotAString(kind),
                "{data}"
            );
        }
        assert_eq!(
            value(r#"{"other":"x"}"#, "k").unwrap_err(),
            KeyError::Missing
        );
        assert_eq!(
            value(r#"{"k":"a","k":"b"}"#, "k").unwrap_err(),
            KeyError::Repeated
        );
    }

    #[test]
    fn reads_a_key_down_a_path_as_vault_responses_nest_it() {
        let v2 = r#"{"request_id":"x","lease_id":"","data":{"data":{"api_key":"s3cr3t-v2"},
            "metadata":{"version":3}},"warnings":null}"#;
        let read = |d: &str, p: &[&str]| {
            extract_key_at(d.as_bytes(), p, "api_key").map(|v| v.expose_secret().to_vec())
        };
        assert_eq!(read(v2, &["data", "data"]).unwrap(), b"s3cr3t-v2");
        let v1 = r#"{"data":{"api_key":"s3cr3t-v1"},"lease_duration":2764800}"#;
        assert_eq!(read(v1, &["data"]).unwrap(), b"s3cr3t-v1");
        // A deleted KV v2 version answers data: null.
        let deleted = r#"{"data":{"data":null,"metadata":{"deletion_time":"2026"}}}"#;
        let KeyError::Malformed(why) = read(deleted, &["data", "data"]).unwrap_err() else {
            panic!("not malformed")
        };
        assert!(why.contains("null"), "{why}");
        assert!(matches!(
            read(r#"{"errors":[]}"#, &["data"]).unwrap_err(),
            KeyError::Malformed(_)
        ));
        assert_eq!(
            read(r#"{"data":{"data":{"n":1}}}"#, &["data", "data"]).unwrap_err(),
            KeyError::Missing
        );
        assert_eq!(
            read(
                r#"{"data":{"data":{"api_key":12345678}}}"#,
                &["data", "data"]
            )
            .unwrap_err(),
            KeyError::NotAString("a number")
        );
        assert_eq!(
            read(r#"{"data":{"a":"x"},"data":{"a":"y"}}"#, &["data"]).unwrap_err(),
            KeyError::Repeated
        );
    }

    #[test]
    fn the_fuzz_target_runs_on_examples() {
        for data in [
            &b"{\"k\":\"s3cr3tvalue\"}"[..],
            b"{\"k\":s3cr3tvalue}",
            b"\xff\xfe",
            b"",
        ] {
            fuzz_extract_key(data);
        }
    }

    #[test]
    fn malformed_data_is_described_without_its_content() {
        for data in [
            r#"["s3cr3t"]"#,
            r#"{"k":"s3cr3t""#,
            r#"{"k":"s3cr3t"} trailing"#,
            "s3cr3t",
            "",
        ] {
            let KeyError::Malformed(why) = value(data, "k").unwrap_err() else {
                panic!("{data}: not malformed");
            };
            assert!(!why.contains("s3cr3t"), "{why}");
        }
    }
}
