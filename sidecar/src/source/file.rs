//! Secrets from a directory laid out like a KV mount: the secret
//! `{mount, path, key}` is key `key` of the JSON object in the file
//! `DIR/<mount>/<path>`, as `vault kv get -format=json` shows a secret's data:
//!
//! ```text
//! DIR/secret/teams/research/openai   {"api_key": "sk-..."}
//! ```
//!
//! For tests and local use; `kvVersion` is ignored. Changes are noticed by a
//! keyed hash of the value, as for KV v1.

use std::hash::BuildHasher;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use credbroker_crds::VaultSecretRef;
use zeroize::Zeroizing;

use super::kv::{KeyError, extract_key};
use super::{BoxFuture, Fetched, Revision, SecretSource, SourceError, display_path};

/// The largest secret file read (a KV secret's data is small; this bounds a
/// mistaken path at a large file).
const MAX_FILE_LEN: u64 = 1024 * 1024;

/// Reads secrets from files under a directory.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    /// Keys the change-detection hash; random per process, never printed.
    hasher: std::collections::hash_map::RandomState,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            hasher: Default::default(),
        }
    }

    /// The file that holds `secret`; `None` if the reference would leave the
    /// directory (the API crate's validation already refuses `..`; this is
    /// the belt to those braces).
    fn file_of(&self, secret: &VaultSecretRef) -> Option<PathBuf> {
        let relative = Path::new(&secret.mount).join(&secret.path);
        relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
            .then(|| self.dir.join(relative))
    }

    fn read_now(
        &self,
        secret: &VaultSecretRef,
        known: Option<Revision>,
    ) -> Result<Fetched, SourceError> {
        let path = display_path(secret);
        let Some(file) = self.file_of(secret) else {
            return Err(SourceError::Malformed {
                path,
                reason: "the path leaves the secrets directory".into(),
            });
        };
        let mut data = Zeroizing::new(Vec::new());
        let opened = std::fs::File::open(&file).and_then(|f| {
            f.take(MAX_FILE_LEN + 1).read_to_end(&mut data)?;
            Ok(())
        });
        if let Err(e) = opened {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound => SourceError::NotFound {
                    path,
                    detail: String::new(),
                },
                std::io::ErrorKind::PermissionDenied => SourceError::PermissionDenied {
                    path,
                    detail: format!(" (reading {})", file.display()),
                },
                _ => SourceError::Unreachable {
                    path,
                    reason: format!("reading {}: {e}", file.display()),
                },
            });
        }
        if data.len() as u64 > MAX_FILE_LEN {
            return Err(SourceError::Malformed {
                path,
                reason: format!("{} is larger than {MAX_FILE_LEN} bytes", file.display()),
            });
        }
        let value = extract_key(&data, &secret.key).map_err(|e| match e {
            KeyError::Missing => SourceError::KeyMissing {
                path: path.clone(),
                key: secret.key.clone(),
            },
            KeyError::NotAString(kind) => SourceError::NotAString {
                path: path.clone(),
                key: secret.key.clone(),
                kind,
            },
            KeyError::Repeated => SourceError::Malformed {
                path: path.clone(),
                reason: format!("key {:?} appears more than once", secret.key),
            },
            KeyError::Malformed(why) => SourceError::Malformed {
                path: path.clone(),
                reason: why,
            },
        })?;
        let revision = Revision::new(None, self.hasher.hash_one(value.expose_secret()));
        if known == Some(revision) {
            return Ok(Fetched::Unchanged);
        }
        Ok(Fetched::Value { value, revision })
    }
}

impl SecretSource for FileSource {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn read<'a>(
        &'a self,
        secret: &'a VaultSecretRef,
        known: Option<Revision>,
    ) -> BoxFuture<'a, Result<Fetched, SourceError>> {
        // Small local files: reading inline is cheaper than a blocking-pool
        // hop, and refreshes are seconds apart.
        Box::pin(async move { self.read_now(secret, known) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(path: &str, key: &str) -> VaultSecretRef {
        VaultSecretRef {
            mount: "secret".into(),
            path: path.into(),
            key: key.into(),
            kv_version: 2,
        }
    }

    fn read(
        source: &FileSource,
        s: &VaultSecretRef,
        known: Option<Revision>,
    ) -> Result<Fetched, SourceError> {
        source.read_now(s, known)
    }

    fn error(source: &FileSource, s: &VaultSecretRef) -> SourceError {
        match read(source, s, None) {
            Ok(_) => panic!("read {}/{} without an error", s.mount, s.path),
            Err(e) => e,
        }
    }

    #[test]
    fn reads_a_key_and_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("secret/teams")).unwrap();
        let file = dir.path().join("secret/teams/openai");
        std::fs::write(&file, r#"{"api_key":"first-value-123"}"#).unwrap();
        let source = FileSource::new(dir.path());
        let s = secret("teams/openai", "api_key");
        let Fetched::Value { value, revision } = read(&source, &s, None).unwrap() else {
            panic!("no value");
        };
        assert_eq!(value.expose_secret(), b"first-value-123");
        assert!(matches!(
            read(&source, &s, Some(revision)).unwrap(),
            Fetched::Unchanged
        ));
        std::fs::write(&file, r#"{"api_key":"second-value-456"}"#).unwrap();
        let Fetched::Value {
            value,
            revision: r2,
        } = read(&source, &s, Some(revision)).unwrap()
        else {
            panic!("change not seen");
        };
        assert_eq!(value.expose_secret(), b"second-value-456");
        assert_ne!(r2, revision);
        assert_eq!(format!("{r2:?}"), "Revision(unversioned)");
    }

    #[test]
    fn errors_name_the_path_and_step() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("secret")).unwrap();
        std::fs::write(dir.path().join("secret/num"), r#"{"k":1234567890}"#).unwrap();
        let source = FileSource::new(dir.path());
        let e = error(&source, &secret("missing", "k"));
        assert_eq!(e.to_string(), "secret/missing: not found");
        assert!(e.is_definitive());
        let e = error(&source, &secret("num", "k"));
        assert_eq!(
            e.to_string(),
            "secret/num: key \"k\" holds a number, not a string"
        );
        let e = error(&source, &secret("num", "other"));
        assert_eq!(e.step(), "key_missing");
        assert!(read(&source, &secret("../escape", "k"), None).is_err());
    }
}
