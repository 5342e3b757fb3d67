//! The adapter registry: valid names (optionally one `tenant/` level), where each adapter's
//! files are, whether it is pinned, and its version (bumped by an explicit reload).
//! Names are checked before any file is touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::error::AdapterError;
use super::peft::CONFIG_FILE;

/// A validated adapter name: `name` or `tenant/name`, each part `[A-Za-z0-9._-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterName {
    pub tenant: Option<String>,
    pub name: String,
}

fn valid_part(part: &str) -> Result<(), String> {
    if part.is_empty() || part.len() > 64 {
        return Err("each part must be 1 to 64 characters".into());
    }
    if part == "." || part.contains("..") || part.starts_with('.') {
        return Err("`.`-prefixed parts and `..` are not allowed".into());
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Err(format!(
            "character {c:?} is not allowed (use A-Z a-z 0-9 . _ -)"
        ));
    }
    Ok(())
}

impl AdapterName {
    pub fn parse(s: &str) -> Result<Self, AdapterError> {
        let invalid = |reason: String| AdapterError::InvalidName {
            name: s.to_string(),
            reason,
        };
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [name] => {
                valid_part(name).map_err(invalid)?;
                Ok(Self {
                    tenant: None,
                    name: name.to_string(),
                })
            }
            [tenant, name] => {
                valid_part(tenant).map_err(&invalid)?;
                valid_part(name).map_err(invalid)?;
                Ok(Self {
                    tenant: Some(tenant.to_string()),
                    name: name.to_string(),
                })
            }
            _ => Err(invalid("at most one `tenant/` level is allowed".into())),
        }
    }

    /// The registry key and the path under the adapters directory.
    pub fn key(&self) -> String {
        match &self.tenant {
            Some(t) => format!("{t}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl std::fmt::Display for AdapterName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterEntry {
    pub name: AdapterName,
    pub dir: PathBuf,
    pub pinned: bool,
    pub version: u64,
}

/// Adapters found in the adapters directory plus those added at run time.
#[derive(Debug)]
pub struct Registry {
    root: PathBuf,
    added: RwLock<BTreeMap<String, AdapterEntry>>,
    versions: RwLock<BTreeMap<String, u64>>,
}

fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

impl Registry {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            added: RwLock::new(BTreeMap::new()),
            versions: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn version(&self, key: &str) -> u64 {
        self.versions
            .read()
            .expect("registry lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Registers `dir` under `name` (replacing an earlier registration as a new version).
    pub fn add(
        &self,
        name: &AdapterName,
        dir: &Path,
        pinned: bool,
    ) -> Result<AdapterEntry, AdapterError> {
        if !is_adapter_dir(dir) {
            return Err(AdapterError::config(
                dir.join(CONFIG_FILE),
                "(file)",
                "is missing",
            ));
        }
        let key = name.key();
        let version = self.bump(&key);
        let entry = AdapterEntry {
            name: name.clone(),
            dir: dir.to_path_buf(),
            pinned,
            version,
        };
        self.added
            .write()
            .expect("registry lock")
            .insert(key, entry.clone());
        Ok(entry)
    }

    fn bump(&self, key: &str) -> u64 {
        let mut v = self.versions.write().expect("registry lock");
        let next = v.get(key).map(|n| n + 1).unwrap_or(0);
        v.insert(key.to_string(), next);
        next
    }

    /// Marks the files of `name` as changed: later requests load the new version, running ones
    /// keep the one they started with.
    pub fn reload(&self, name: &AdapterName) -> Result<AdapterEntry, AdapterError> {
        self.get(name)?;
        self.bump(&name.key());
        let entry = self.get(name)?;
        if let Some(e) = self
            .added
            .write()
            .expect("registry lock")
            .get_mut(&name.key())
        {
            e.version = entry.version;
        }
        Ok(entry)
    }

    /// Removes a run-time registration; adapters in the directory cannot be removed this way.
    pub fn remove(&self, name: &AdapterName) -> Result<AdapterEntry, AdapterError> {
        self.added
            .write()
            .expect("registry lock")
            .remove(&name.key())
            .ok_or_else(|| AdapterError::NotFound(name.key()))
    }

    pub fn get(&self, name: &AdapterName) -> Result<AdapterEntry, AdapterError> {
        let key = name.key();
        if let Some(e) = self.added.read().expect("registry lock").get(&key) {
            return Ok(e.clone());
        }
        let dir = self.root.join(&key);
        if is_adapter_dir(&dir) {
            return Ok(AdapterEntry {
                name: name.clone(),
                dir,
                pinned: false,
                version: self.version(&key),
            });
        }
        Err(AdapterError::NotFound(key))
    }

    /// Every known adapter: the directory's (public ones and one level of tenants) and the
    /// added ones.
    pub fn list(&self) -> Vec<AdapterEntry> {
        let mut out: BTreeMap<String, AdapterEntry> = BTreeMap::new();
        let read = |dir: &Path| -> Vec<(String, PathBuf)> {
            std::fs::read_dir(dir)
                .map(|it| {
                    it.flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
                        .collect()
                })
                .unwrap_or_default()
        };
        for (name, path) in read(&self.root) {
            if is_adapter_dir(&path) {
                if let Ok(n) = AdapterName::parse(&name) {
                    out.insert(n.key(), self.get(&n).expect("exists"));
                }
            } else {
                for (inner, p) in read(&path) {
                    if let Ok(n) = AdapterName::parse(&format!("{name}/{inner}")) {
                        if is_adapter_dir(&p) {
                            out.insert(n.key(), self.get(&n).expect("exists"));
                        }
                    }
                }
            }
        }
        for (k, e) in self.added.read().expect("registry lock").iter() {
            out.insert(k.clone(), e.clone());
        }
        out.into_values().collect()
    }
}

/// An adapter given on the command line: a directory holding `adapter_config.json`, else a
/// name in the registry.
pub fn locate(spec: &str, registry: &Registry) -> Result<PathBuf, AdapterError> {
    let path = Path::new(spec);
    if is_adapter_dir(path) {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return Err(AdapterError::config(
            path.join(CONFIG_FILE),
            "(file)",
            "is missing",
        ));
    }
    let name = AdapterName::parse(spec)?;
    registry.get(&name).map(|e| e.dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_before_any_file_is_touched() {
        assert_eq!(
            AdapterName::parse("sql-lora_v1.2").unwrap().key(),
            "sql-lora_v1.2"
        );
        let t = AdapterName::parse("acme/sql").unwrap();
        assert_eq!(
            (t.tenant.as_deref(), t.name.as_str()),
            (Some("acme"), "sql")
        );
        for bad in [
            "..",
            "../etc",
            "a/../b",
            "a/b/c",
            "/abs",
            "",
            ".hidden",
            "sp ace",
            "a\\b",
            &"x".repeat(65),
        ] {
            let err = AdapterName::parse(bad).unwrap_err().to_string();
            assert!(err.contains("invalid adapter name"), "{bad}: {err}");
        }
    }
}
