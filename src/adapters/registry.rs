//! The adapter registry: valid names (optionally one `tenant/` level), where each adapter's
//! files are, whether it is pinned, and its version. Versions come from one counter for the
//! whole registry (a directory adapter starts at 0, every registration or reload takes the
//! next number), so a name never gets a version it had before. Names are checked before any
//! file is touched; a directory under the root that resolves outside it (a symlink) is not an
//! adapter.
//!
//! Lists read an index of the directory's adapter names (`DirIndex`, about a hundred bytes a
//! name), rebuilt from directory entries alone (no adapter file is opened) when the root
//! directory changes and at most `INDEX_TTL` after the last build (an adapter added inside a
//! tenant's directory changes only that directory). Requests never wait for it: `get` looks
//! at the adapter's own directory, and a list checks each name on its page the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use super::error::AdapterError;
use super::peft::CONFIG_FILE;
use super::revisions::Snapshot;

/// How long a list may show the directory as it was (unless the root itself changed).
pub const INDEX_TTL: Duration = Duration::from_secs(2);

/// The adapter names in the directory at one time, sorted by key.
#[derive(Debug)]
struct DirIndex {
    root_modified: Option<SystemTime>,
    built: Instant,
    names: Arc<Vec<AdapterName>>,
}

/// A validated adapter name: `name` or `tenant/name`, each part `[A-Za-z0-9._:-]{1,96}` (`:`
/// for OpenAI's fine-tuned names, `ft:BASE:SUFFIX:ID`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterName {
    pub tenant: Option<String>,
    pub name: String,
}

pub(crate) fn valid_part(part: &str) -> Result<(), String> {
    if part.is_empty() || part.len() > 96 {
        return Err("each part must be 1 to 96 characters".into());
    }
    if part == "." || part.contains("..") || part.starts_with('.') {
        return Err("`.`-prefixed parts and `..` are not allowed".into());
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._:-".contains(*c)))
    {
        return Err(format!(
            "character {c:?} is not allowed (use A-Z a-z 0-9 . _ : -)"
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

/// One version of one adapter: what the cache keys resident weights by and a lease holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterKey {
    pub name: AdapterName,
    pub version: u64,
}

impl std::fmt::Display for AdapterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterEntry {
    pub name: AdapterName,
    pub dir: PathBuf,
    pub pinned: bool,
    /// Cache version, from one counter for the registry (internal: see `Registry::revision`).
    pub version: u64,
    /// Weight bytes its safetensors header declares (run-time registrations; 0 otherwise).
    pub bytes: u64,
    /// Registered at run time (counts against its tenant's quota), not found in the root.
    pub added: bool,
    /// What clients see as its version (`Registry::revision`); `name@REVISION` names it.
    pub revision: u64,
    /// The files of a registered revision, taken when it was registered (`dir` is theirs).
    pub snapshot: Option<Snapshot>,
}

impl AdapterEntry {
    pub fn key(&self) -> AdapterKey {
        AdapterKey {
            name: self.name.clone(),
            version: self.version,
        }
    }
}

/// Adapters found in the adapters directory plus those added at run time.
#[derive(Debug)]
pub struct Registry {
    root: PathBuf,
    added: RwLock<BTreeMap<String, AdapterEntry>>,
    versions: RwLock<BTreeMap<String, u64>>,
    revisions: RwLock<BTreeMap<String, u64>>,
    next_version: AtomicU64,
    index: Mutex<Option<DirIndex>>,
    /// Where registrations' snapshots go (`None`: files stay where they are).
    snapshots: Option<PathBuf>,
    /// How many registered revisions of each name are kept for `name@REV` and rollbacks.
    keep: usize,
    kept: RwLock<BTreeMap<String, Vec<AdapterEntry>>>,
}

fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file() || dir.join(super::peft::SETUP_FILE).is_file()
}

impl Registry {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            added: RwLock::new(BTreeMap::new()),
            versions: RwLock::new(BTreeMap::new()),
            revisions: RwLock::new(BTreeMap::new()),
            next_version: AtomicU64::new(1),
            index: Mutex::new(None),
            snapshots: None,
            keep: 1,
            kept: RwLock::new(BTreeMap::new()),
        }
    }

    /// Takes registrations' snapshots under `dir` (`Snapshot::prepare_root`) and keeps `keep`
    /// revisions of each name (`--adapter-revisions`).
    pub fn keeping_revisions(mut self, dir: PathBuf, keep: usize) -> Result<Self, AdapterError> {
        self.snapshots = Some(Snapshot::prepare_root(&dir)?);
        self.keep = keep.max(1);
        Ok(self)
    }

    /// The files of `src` as they are now, for a registration under the returned cache version.
    pub fn snapshot(&self, src: &Path) -> Result<(u64, Snapshot), AdapterError> {
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        Ok((
            version,
            Snapshot::take(self.snapshots.as_deref(), src, version)?,
        ))
    }

    /// A kept revision's files again, for a new registration (a rollback).
    pub fn restore(&self, kept: &AdapterEntry) -> Result<(u64, Snapshot), AdapterError> {
        let what = format!("{}@{}", kept.name, kept.revision);
        let snap = kept
            .snapshot
            .as_ref()
            .ok_or_else(|| AdapterError::NotFound(what.clone()))?;
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        Ok((
            version,
            snap.copy(self.snapshots.as_deref(), version, &what)?,
        ))
    }

    /// Revision `revision` of `name`: the current one, or one kept.
    pub fn get_revision(
        &self,
        name: &AdapterName,
        revision: u64,
    ) -> Result<AdapterEntry, AdapterError> {
        let current = self.get(name);
        if current.as_ref().is_ok_and(|e| e.revision == revision) {
            return current;
        }
        self.kept
            .read()
            .expect("registry lock")
            .get(&name.key())
            .and_then(|k| k.iter().find(|e| e.revision == revision))
            .map(|e| AdapterEntry {
                pinned: false,
                ..e.clone()
            })
            .ok_or_else(|| AdapterError::NotFound(format!("{name}@{revision}")))
    }

    /// The kept revisions of `name`, oldest first.
    pub fn revisions(&self, name: &AdapterName) -> Vec<u64> {
        self.kept
            .read()
            .expect("registry lock")
            .get(&name.key())
            .map(|k| k.iter().map(|e| e.revision).collect())
            .unwrap_or_default()
    }

    /// The newest kept revision before the current one (what a rollback restores).
    pub fn previous(&self, name: &AdapterName) -> Result<AdapterEntry, AdapterError> {
        let current = self.revision(name);
        self.kept
            .read()
            .expect("registry lock")
            .get(&name.key())
            .and_then(|k| k.iter().rev().find(|e| e.revision < current).cloned())
            .ok_or_else(|| AdapterError::NotFound(format!("{name} (no earlier revision kept)")))
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

    /// `root/tenant/name` when it is an adapter directory that resolves inside the root.
    pub fn directory(&self, name: &AdapterName) -> Option<PathBuf> {
        let dir = self.root.join(name.key());
        if !is_adapter_dir(&dir) {
            return None;
        }
        let (Ok(real), Ok(root)) = (dir.canonicalize(), self.root.canonicalize()) else {
            return None;
        };
        real.starts_with(&root).then_some(dir)
    }

    /// Run-time registrations in `tenant`'s namespace: how many, and their declared bytes.
    pub fn added_by(&self, tenant: &str) -> (usize, u64) {
        self.added
            .read()
            .expect("registry lock")
            .values()
            .filter(|e| e.name.tenant.as_deref() == Some(tenant))
            .fold((0, 0), |(n, b), e| (n + 1, b + e.bytes))
    }

    /// Registers the snapshot `snap` (`Registry::snapshot`) under `name` as cache version
    /// `version`, replacing an earlier registration as a new revision.
    pub fn add(
        &self,
        name: &AdapterName,
        snap: Snapshot,
        version: u64,
        pinned: bool,
        bytes: u64,
    ) -> Result<AdapterEntry, AdapterError> {
        if !is_adapter_dir(&snap.dir) {
            snap.discard();
            return Err(AdapterError::config(
                snap.dir.join(CONFIG_FILE),
                "(file)",
                "is missing",
            ));
        }
        let key = name.key();
        let revision = self.bump_to(&key, version);
        let entry = AdapterEntry {
            name: name.clone(),
            dir: snap.dir.clone(),
            pinned,
            version,
            bytes,
            added: true,
            revision,
            snapshot: Some(snap),
        };
        self.added
            .write()
            .expect("registry lock")
            .insert(key.clone(), entry.clone());
        let mut kept = self.kept.write().expect("registry lock");
        let list = kept.entry(key).or_default();
        list.push(entry.clone());
        if list.len() > self.keep {
            for old in list.drain(..list.len() - self.keep) {
                if let Some(s) = &old.snapshot {
                    s.discard();
                }
            }
        }
        Ok(entry)
    }

    fn bump(&self, key: &str) -> u64 {
        let next = self.next_version.fetch_add(1, Ordering::Relaxed);
        self.bump_to(key, next);
        next
    }

    /// Makes `version` the name's cache version; returns its new revision.
    fn bump_to(&self, key: &str, version: u64) -> u64 {
        let mut v = self.versions.write().expect("registry lock");
        v.insert(key.to_string(), version);
        let mut revisions = self.revisions.write().expect("registry lock");
        let r = revisions.entry(key.to_string()).or_insert(0);
        *r += 1;
        *r
    }

    /// How many times `name` was registered, reloaded or removed: what clients see as its
    /// version. The global `version` would tell one tenant how busy the others are.
    pub fn revision(&self, name: &AdapterName) -> u64 {
        self.revisions
            .read()
            .expect("registry lock")
            .get(&name.key())
            .copied()
            .unwrap_or(0)
    }

    /// Marks the files of `name` as changed: later requests load the new version, running ones
    /// keep the one they started with.
    pub fn reload(&self, name: &AdapterName) -> Result<AdapterEntry, AdapterError> {
        self.get(name)?;
        let version = self.bump(&name.key());
        if let Some(e) = self
            .added
            .write()
            .expect("registry lock")
            .get_mut(&name.key())
        {
            e.version = version;
            e.revision = self.revision(name);
        }
        self.get(name)
    }

    /// Removes a run-time registration and its kept revisions; adapters in the directory cannot
    /// be removed this way.
    /// A directory adapter of the same name comes back under a new version.
    pub fn remove(&self, name: &AdapterName) -> Result<AdapterEntry, AdapterError> {
        let removed = self
            .added
            .write()
            .expect("registry lock")
            .remove(&name.key())
            .ok_or_else(|| AdapterError::NotFound(name.key()))?;
        self.bump(&name.key());
        // Its kept revisions go with it (their snapshots too): what is kept stays bounded by
        // the registrations that exist (a tenant's by its quota) times `--adapter-revisions`.
        for old in self
            .kept
            .write()
            .expect("registry lock")
            .remove(&name.key())
            .unwrap_or_default()
        {
            if let Some(s) = &old.snapshot {
                s.discard();
            }
        }
        Ok(removed)
    }

    pub fn get(&self, name: &AdapterName) -> Result<AdapterEntry, AdapterError> {
        let key = name.key();
        if let Some(e) = self.added.read().expect("registry lock").get(&key) {
            return Ok(e.clone());
        }
        if let Some(dir) = self.directory(name) {
            return Ok(AdapterEntry {
                name: name.clone(),
                dir,
                pinned: false,
                version: self.version(&key),
                bytes: 0,
                added: false,
                revision: self.revision(name),
                snapshot: None,
            });
        }
        Err(AdapterError::NotFound(key))
    }

    /// Every known adapter: the directory's (public ones and one level of tenants) and the
    /// added ones, each checked as `get` does.
    pub fn list(&self) -> Vec<AdapterEntry> {
        // A directory that vanished since the index was built is simply not listed.
        self.names()
            .iter()
            .filter_map(|n| self.get(n).ok())
            .collect()
    }

    /// The names of every known adapter, sorted by key, from the directory's index and the
    /// run-time registrations; not checked one by one (`get` does that).
    pub fn names(&self) -> Vec<AdapterName> {
        let dir = self.dir_names();
        let added = self.added.read().expect("registry lock");
        let mut out: Vec<AdapterName> = Vec::with_capacity(dir.len() + added.len());
        let mut from_dir = dir.iter().peekable();
        for e in added.values() {
            while let Some(n) = from_dir.next_if(|n| n.key() < e.name.key()) {
                out.push(n.clone());
            }
            from_dir.next_if(|n| n.key() == e.name.key());
            out.push(e.name.clone());
        }
        out.extend(from_dir.cloned());
        out
    }

    /// The directory's adapter names, from the index while it is fresh.
    fn dir_names(&self) -> Arc<Vec<AdapterName>> {
        let modified = std::fs::metadata(&self.root)
            .and_then(|m| m.modified())
            .ok();
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = index.as_ref() {
            if i.root_modified == modified && i.built.elapsed() < INDEX_TTL {
                return i.names.clone();
            }
        }
        let names = Arc::new(self.scan());
        *index = Some(DirIndex {
            root_modified: modified,
            built: Instant::now(),
            names: names.clone(),
        });
        names
    }

    /// One pass over the root and its tenants' directories: adapter directories by their
    /// config file, sorted by key.
    fn scan(&self) -> Vec<AdapterName> {
        let dirs = |dir: &Path| -> Vec<(String, PathBuf)> {
            std::fs::read_dir(dir)
                .map(|it| {
                    it.flatten()
                        .filter(|e| {
                            e.file_type()
                                .is_ok_and(|t| t.is_dir() || (t.is_symlink() && e.path().is_dir()))
                        })
                        .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut out = Vec::new();
        for (name, path) in dirs(&self.root) {
            if is_adapter_dir(&path) {
                out.extend(AdapterName::parse(&name).ok());
            } else {
                for (inner, inner_path) in dirs(&path) {
                    if is_adapter_dir(&inner_path) {
                        out.extend(AdapterName::parse(&format!("{name}/{inner}")).ok());
                    }
                }
            }
        }
        out.sort_by_key(AdapterName::key);
        out
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

    impl Registry {
        fn add_dir(&self, name: &AdapterName, dir: &Path) -> AdapterEntry {
            let (version, snap) = self.snapshot(dir).unwrap();
            self.add(name, snap, version, false, 0).unwrap()
        }
    }

    fn fixture_adapter(dst: &Path) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-llama/adapters/lora-r4-qv");
        std::fs::create_dir_all(dst).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(src.join(f), dst.join(f)).unwrap();
        }
    }

    #[test]
    fn a_name_never_gets_a_version_it_had_before() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fixture_adapter(&root.join("x"));
        fixture_adapter(&tmp.path().join("other"));
        let r = Registry::new(&root);
        let n = AdapterName::parse("x").unwrap();
        let from_dir = r.get(&n).unwrap().version;
        let added = r.add_dir(&n, &tmp.path().join("other")).version;
        assert_ne!(
            from_dir, added,
            "a registration over a directory adapter must be a new version"
        );
        r.remove(&n).unwrap();
        let back = r.get(&n).unwrap().version;
        assert!(
            back != from_dir && back != added,
            "{from_dir} {added} {back}"
        );
        let again = r.add_dir(&n, &tmp.path().join("other")).version;
        assert!(again > back);
        let reloaded = r.reload(&AdapterName::parse("x").unwrap()).unwrap().version;
        assert!(reloaded > again);
    }

    #[test]
    fn lists_follow_the_directory_without_rereading_it_each_time() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fixture_adapter(&root.join("b"));
        std::fs::create_dir_all(root.join("t")).unwrap();
        let r = Registry::new(&root);
        let keys =
            |r: &Registry| -> Vec<String> { r.list().iter().map(|e| e.name.key()).collect() };
        assert_eq!(keys(&r), vec!["b"]);
        // A new adapter at the root changes the root: the next list has it.
        fixture_adapter(&root.join("a"));
        assert_eq!(keys(&r), vec!["a", "b"]);
        // One inside a tenant's directory changes only that directory: listed within the TTL,
        // and usable by name at once.
        fixture_adapter(&root.join("t/c"));
        assert!(r.get(&AdapterName::parse("t/c").unwrap()).is_ok());
        std::thread::sleep(INDEX_TTL + Duration::from_millis(100));
        assert_eq!(keys(&r), vec!["a", "b", "t/c"]);
        // A removed adapter leaves the list at once (each listed name is checked).
        std::fs::remove_dir_all(root.join("t/c")).unwrap();
        assert_eq!(keys(&r), vec!["a", "b"]);
        // Run-time registrations merge into the order, replacing a directory adapter's name.
        r.add_dir(&AdapterName::parse("b").unwrap(), &root.join("a"));
        r.add_dir(&AdapterName::parse("aa").unwrap(), &root.join("a"));
        let listed = r.list();
        assert_eq!(
            listed.iter().map(|e| e.name.key()).collect::<Vec<_>>(),
            vec!["a", "aa", "b"]
        );
        assert!(
            listed[2].added,
            "the registration replaces the directory's `b`"
        );
    }

    #[test]
    fn registered_revisions_are_kept_addressable_and_restorable() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
        fixture_adapter(&one);
        fixture_adapter(&two);
        std::fs::write(two.join("marker"), "two").unwrap();
        let r = Registry::new(&root)
            .keeping_revisions(tmp.path().join("state/revisions"), 2)
            .unwrap();
        let n = AdapterName::parse("x").unwrap();
        let r1 = r.add_dir(&n, &one);
        let r2 = r.add_dir(&n, &two);
        assert_eq!((r1.revision, r2.revision), (1, 2));
        assert_eq!(r.revisions(&n), vec![1, 2]);
        // `x@1` is revision 1's files even after its source directory is gone.
        std::fs::remove_dir_all(&one).unwrap();
        let old = r.get_revision(&n, 1).unwrap();
        assert_eq!(old.version, r1.version);
        assert!(old.dir.join(CONFIG_FILE).is_file() && !old.dir.join("marker").exists());
        assert!(r.get_revision(&n, 3).is_err());
        // A rollback registers revision 1's files as revision 3.
        let prev = r.previous(&n).unwrap();
        assert_eq!(prev.revision, 1);
        let (v, snap) = r.restore(&prev).unwrap();
        let r3 = r.add(&n, snap, v, false, 0).unwrap();
        assert_eq!(r3.revision, 3);
        assert!(r3.version > r2.version, "a new cache version");
        assert!(!r.get(&n).unwrap().dir.join("marker").exists());
        // Two kept: revision 1 is gone, its snapshot deleted.
        assert_eq!(r.revisions(&n), vec![2, 3]);
        assert!(r.get_revision(&n, 1).is_err() && !old.dir.exists());
        assert_eq!(r.previous(&n).unwrap().revision, 2);
        // Removing the registration removes what was kept of it: registering and removing
        // names over and over keeps nothing.
        let kept_dir = r.get_revision(&n, 2).unwrap().dir;
        r.remove(&n).unwrap();
        assert!(r.revisions(&n).is_empty() && !kept_dir.exists());
        assert!(r.previous(&n).is_err());
        for i in 0..20 {
            let m = AdapterName::parse(&format!("churn{i}")).unwrap();
            r.add_dir(&m, &two);
            r.remove(&m).unwrap();
        }
        assert!(r.kept.read().unwrap().is_empty());
        let left = std::fs::read_dir(r.snapshots.as_ref().unwrap())
            .unwrap()
            .count();
        assert_eq!(left, 0, "no snapshot outlives its registration");
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_out_of_the_root_is_not_an_adapter() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fixture_adapter(&root.join("inside"));
        fixture_adapter(&tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("t")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), root.join("t/escape")).unwrap();
        std::os::unix::fs::symlink(root.join("inside"), root.join("t/alias")).unwrap();
        let r = Registry::new(&root);
        assert!(r.get(&AdapterName::parse("t/escape").unwrap()).is_err());
        assert!(r.get(&AdapterName::parse("t/alias").unwrap()).is_ok());
        let listed: Vec<String> = r.list().iter().map(|e| e.name.key()).collect();
        assert_eq!(listed, vec!["inside", "t/alias"]);
    }

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
            &"x".repeat(97),
            "a;b",
        ] {
            let err = AdapterName::parse(bad).unwrap_err().to_string();
            assert!(err.contains("invalid adapter name"), "{bad}: {err}");
        }
    }
}
