//! Join tokens: the local credential a proxy proves its workload with
//! before it has a certificate, as Nomad and Consul Connect hand them out.
//! Each token is bound to one namespace and service account and expires.
//!
//! The control plane keeps only a SHA-256 digest of each token, in a YAML
//! file it reads (`tokens.yaml`); the token itself goes once to the
//! workload's credential file and nowhere else, so reading the control
//! plane's disk does not let anyone join.
//!
//! ```yaml
//! tokens:
//!   - id: 5f0c1a2b
//!     sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//!     namespace: models
//!     serviceAccount: llama
//!     expires: 2026-12-05T00:00:00Z
//! ```

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::credential::{Authenticator, Credential, Refusal, Workload};

/// A token's prefix, so that a token pasted in the wrong place is
/// recognisable (GitHub's `ghp_`, Vault's `hvs.`).
const PREFIX: &str = "imjt_";

/// The tokens file: every token the control plane accepts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokens {
    /// The tokens, as digests.
    #[serde(default)]
    pub tokens: Vec<JoinToken>,
}

/// One token as the control plane keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JoinToken {
    /// A short public name for the token, for logs and revocation.
    pub id: String,
    /// Hex SHA-256 digest of the whole token.
    pub sha256: String,
    /// The namespace of the workload it admits.
    pub namespace: String,
    /// The service account of the workload it admits.
    pub service_account: String,
    /// When it stops being accepted (RFC 3339).
    #[serde(with = "rfc3339")]
    pub expires: SystemTime,
}

/// The tokens file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The file is not a tokens file.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, with its line and column.
        message: String,
    },
}

impl JoinTokens {
    /// Reads a tokens file; a missing file holds no tokens.
    pub fn load(path: &Path) -> Result<Self, TokensFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(TokensFileError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_saphyr::from_str(&text).map_err(|e| TokensFileError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Writes the tokens file (mode 0600: it says who may join).
    pub fn save(&self, path: &Path) -> Result<(), TokensFileError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;

        let io = |source| TokensFileError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = serde_saphyr::to_string(self).map_err(|e| TokensFileError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        // Written whole next to the file, then renamed over it: a reader
        // never sees half a file.
        let temporary = path.with_extension("yaml.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&temporary, path).map_err(io)
    }

    /// Makes a token for `workload`, valid for `ttl` from `now`, and adds
    /// its digest; returns the token itself, which is not kept.
    pub fn create(&mut self, workload: &Workload, ttl: Duration, now: SystemTime) -> String {
        let secret: [u8; 32] = rand::random();
        let id: [u8; 4] = rand::random();
        let id = hex(&id);
        let token = format!("{PREFIX}{id}_{}", hex(&secret));
        self.tokens.push(JoinToken {
            id,
            sha256: hex(&Sha256::digest(token.as_bytes())),
            namespace: workload.namespace.clone(),
            service_account: workload.service_account.clone(),
            expires: now + ttl,
        });
        token
    }

    /// The workload `token` admits at `now`, or why none.
    pub fn authenticate(&self, token: &str, now: SystemTime) -> Result<Workload, Refusal> {
        let digest = hex(&Sha256::digest(token.trim().as_bytes()));
        let Some(entry) = self.tokens.iter().find(|t| t.sha256 == digest) else {
            return Err(Refusal::UnknownToken);
        };
        if now >= entry.expires {
            return Err(Refusal::ExpiredToken {
                id: entry.id.clone(),
            });
        }
        Ok(Workload {
            namespace: entry.namespace.clone(),
            service_account: entry.service_account.clone(),
        })
    }
}

/// Join tokens as an [`Authenticator`]; the set can be replaced while
/// serving (when the tokens file changes).
#[derive(Debug, Default)]
pub struct JoinTokenAuthenticator {
    tokens: RwLock<JoinTokens>,
}

impl JoinTokenAuthenticator {
    /// Accepts `tokens`.
    pub fn new(tokens: JoinTokens) -> Self {
        JoinTokenAuthenticator {
            tokens: RwLock::new(tokens),
        }
    }

    /// Accepts `tokens` from now on, instead of the previous set.
    pub fn replace(&self, tokens: JoinTokens) {
        *self
            .tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tokens;
    }
}

impl Authenticator for JoinTokenAuthenticator {
    fn authenticate<'a>(
        &'a self,
        credential: &'a Credential,
        now: SystemTime,
    ) -> Pin<Box<dyn Future<Output = Result<Workload, Refusal>> + Send + 'a>> {
        let Credential::JoinToken(token) = credential else {
            return Box::pin(std::future::ready(Err(Refusal::UnsupportedCredential(
                credential.kind(),
            ))));
        };
        let tokens = self
            .tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let decided = tokens.authenticate(token, now);
        Box::pin(std::future::ready(decided))
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_seconds(*time).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not an RFC 3339 time such as 2026-12-05T00:00:00Z: {e}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> Workload {
        Workload {
            namespace: "models".into(),
            service_account: "llama".into(),
        }
    }

    #[test]
    fn a_token_admits_its_workload_until_it_expires() {
        let now = SystemTime::now();
        let mut tokens = JoinTokens::default();
        let token = tokens.create(&llama(), Duration::from_secs(60), now);
        assert!(token.starts_with(PREFIX));
        assert_eq!(tokens.authenticate(&token, now), Ok(llama()));
        assert_eq!(
            tokens.authenticate(&format!("{token}\n"), now),
            Ok(llama()),
            "a credential file's newline"
        );
        let later = now + Duration::from_secs(60);
        assert_eq!(
            tokens.authenticate(&token, later),
            Err(Refusal::ExpiredToken {
                id: tokens.tokens[0].id.clone()
            })
        );
        assert_eq!(
            tokens.authenticate("imjt_00000000_guess", now),
            Err(Refusal::UnknownToken)
        );
    }

    #[test]
    fn the_file_keeps_digests_only_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut tokens = JoinTokens::load(&path).unwrap();
        let token = tokens.create(&llama(), Duration::from_secs(3600), now);
        tokens.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token[PREFIX.len() + 9..]), "{text}");
        assert!(text.contains("2027-01-15T09:00:00Z"), "{text}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let read = JoinTokens::load(&path).unwrap();
        assert_eq!(read, tokens);
        assert_eq!(read.authenticate(&token, now), Ok(llama()));
    }

    #[test]
    fn a_broken_file_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, "tokens:\n  - id: a\n    sha: b\n").unwrap();
        let error = JoinTokens::load(&path).unwrap_err().to_string();
        assert!(error.contains("tokens.yaml"), "{error}");
        assert!(error.contains("sha"), "{error}");
    }
}
