//! API keys: `--api-keys FILE` (TOML) maps each key to a tenant and an admin flag.
//!
//! ```toml
//! [keys."sk-acme-1"]
//! tenant = "acme"
//! admin = false
//! ```

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: cannot read: {message}")]
    Read { path: String, message: String },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `None` when the server runs without keys.
    pub tenant: Option<String>,
    pub admin: bool,
}

impl Caller {
    pub fn open() -> Self {
        Self {
            tenant: None,
            admin: true,
        }
    }
}

#[derive(Debug, Deserialize)]
struct KeyEntry {
    tenant: String,
    #[serde(default)]
    admin: bool,
}

#[derive(Debug, Deserialize)]
struct KeysFile {
    keys: HashMap<String, KeyEntry>,
}

#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: HashMap<String, Caller>,
}

impl ApiKeys {
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml(&path.display().to_string(), &text)
    }

    pub fn from_toml(path: &str, text: &str) -> Result<Self, AuthError> {
        let file: KeysFile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            AuthError::Parse {
                path: path.to_string(),
                message: match line {
                    Some(l) => format!("line {l}: {}", e.message()),
                    None => e.message().to_string(),
                },
            }
        })?;
        let mut keys = HashMap::new();
        for (key, entry) in file.keys {
            if crate::adapters::AdapterName::parse(&entry.tenant).is_err()
                || entry.tenant.contains('/')
            {
                return Err(AuthError::Parse {
                    path: path.to_string(),
                    message: format!(
                        "`keys.\"…\".tenant` = {:?} is not a valid tenant name",
                        entry.tenant
                    ),
                });
            }
            keys.insert(
                key,
                Caller {
                    tenant: Some(entry.tenant),
                    admin: entry.admin,
                },
            );
        }
        Ok(Self { keys })
    }

    pub fn caller(&self, bearer: &str) -> Option<Caller> {
        self.keys.get(bearer).cloned()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_and_rejects_bad_tenants() {
        let k = ApiKeys::from_toml(
            "keys.toml",
            "[keys.\"sk-a\"]\ntenant = \"acme\"\n[keys.\"sk-root\"]\ntenant = \"ops\"\nadmin = true\n",
        )
        .unwrap();
        assert_eq!(
            k.caller("sk-a"),
            Some(Caller {
                tenant: Some("acme".into()),
                admin: false
            })
        );
        assert!(k.caller("sk-root").unwrap().admin);
        assert!(k.caller("nope").is_none());
        let e = ApiKeys::from_toml("keys.toml", "[keys.\"x\"]\ntenant = \"../x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.toml") && e.contains("tenant"), "{e}");
        let e = ApiKeys::from_toml("keys.toml", "[keys.\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.toml") && e.contains("tenant"), "{e}");
    }
}
