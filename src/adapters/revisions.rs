//! Kept revisions of registered adapters. A registration first takes a snapshot of the
//! adapter's files: hard links (a copy where links cannot be made) in a directory of its own
//! under `--state-dir`, named by the registration's cache version. The weights are then read
//! from the snapshot, so a revision keeps its weights when the source files are replaced
//! (by rename, as writers of large files do) and `name@REV` or a rollback finds them again.
//! A file rewritten in place changes a hard link's contents too: each snapshot records every
//! file's length and modification time, and a load of a revision whose files no longer match
//! is refused by name instead of serving other weights under its number.
//! Registrations last as long as the process: each process takes its snapshots into a
//! directory of its own, and deletes those of processes that ended.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::error::AdapterError;

/// One file of a snapshot as it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    name: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

/// The files of one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Where the revision's files are.
    pub dir: PathBuf,
    stamps: Arc<Vec<FileStamp>>,
    /// Whether `dir` is the snapshot's own (deleted with it) rather than the source.
    owned: bool,
}

fn stamp(dir: &Path, name: PathBuf) -> Result<FileStamp, AdapterError> {
    let path = dir.join(&name);
    let meta = std::fs::metadata(&path).map_err(|e| io(&path, e))?;
    Ok(FileStamp {
        name,
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

fn io(path: &Path, e: std::io::Error) -> AdapterError {
    AdapterError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// How many directory levels below an adapter's a snapshot takes (AdapterFusion keeps its
/// fused adapters one level down).
const DEPTH: usize = 2;

/// The regular files in `dir` and in its directories down to `DEPTH` levels (symlinks
/// followed), as paths relative to `dir`, sorted.
fn files(dir: &Path) -> Result<Vec<PathBuf>, AdapterError> {
    fn walk(
        root: &Path,
        rel: &Path,
        depth: usize,
        out: &mut Vec<PathBuf>,
    ) -> Result<(), AdapterError> {
        let here = root.join(rel);
        for e in std::fs::read_dir(&here).map_err(|e| io(&here, e))? {
            let e = e.map_err(|e| io(&here, e))?;
            let path = rel.join(e.file_name());
            match std::fs::metadata(e.path()) {
                Ok(m) if m.is_file() => out.push(path),
                Ok(m) if m.is_dir() && depth < DEPTH => walk(root, &path, depth + 1, out)?,
                _ => {}
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), 0, &mut out)?;
    out.sort();
    Ok(out)
}

impl Snapshot {
    /// A directory of this process's own under `parent` to take snapshots into; the
    /// directories of processes no longer running (on Linux, by `/proc`) are deleted.
    pub fn prepare_root(parent: &Path) -> Result<PathBuf, AdapterError> {
        // This process: its id and a token of its own (a container's server is often pid 1
        // in every incarnation).
        static TOKEN: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
        let token = *TOKEN.get_or_init(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        });
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        let me = std::process::id();
        for e in std::fs::read_dir(parent)
            .map_err(|e| io(parent, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            let mut parts = name.split('-').map(|p| p.parse::<u128>().ok());
            let (Some(Some(pid)), Some(Some(their_token))) = (parts.next(), parts.next()) else {
                continue;
            };
            // Servers built in one process (tests) each have a directory: only an earlier
            // process's go, when it is no longer running (known on Linux) or had this pid.
            let gone = if pid == u128::from(me) {
                their_token != token
            } else {
                cfg!(target_os = "linux") && !Path::new("/proc").join(pid.to_string()).exists()
            };
            if gone {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let root = parent.join(format!("{me}-{token}-{nanos}"));
        std::fs::create_dir_all(&root).map_err(|e| io(&root, e))?;
        Ok(root)
    }

    /// `src`'s files as they are now: linked into `root/<version>`, or, without a `root`,
    /// stamped where they are (a later change is then detected, but the old weights are gone).
    pub fn take(root: Option<&Path>, src: &Path, version: u64) -> Result<Self, AdapterError> {
        let names = files(src)?;
        let Some(root) = root else {
            return Ok(Self {
                dir: src.to_path_buf(),
                stamps: Arc::new(
                    names
                        .into_iter()
                        .map(|n| stamp(src, n))
                        .collect::<Result<_, _>>()?,
                ),
                owned: false,
            });
        };
        let dir = root.join(version.to_string());
        let tmp = root.join(format!("{version}.tmp"));
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let result = (|| {
            for n in &names {
                let from = src
                    .join(n)
                    .canonicalize()
                    .map_err(|e| io(&src.join(n), e))?;
                let to = tmp.join(n);
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
                }
                if std::fs::hard_link(&from, &to).is_err() {
                    std::fs::copy(&from, &to).map_err(|e| io(&from, e))?;
                }
            }
            std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let stamps = names
            .into_iter()
            .map(|n| stamp(&dir, n))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            dir,
            stamps: Arc::new(stamps),
            owned: true,
        })
    }

    /// A snapshot of this one's files for a new revision (a rollback), checked first.
    pub fn copy(
        &self,
        root: Option<&Path>,
        version: u64,
        what: &str,
    ) -> Result<Self, AdapterError> {
        self.verify(what)?;
        let new = Self::take(root, &self.dir, version)?;
        if new.stamps != self.stamps {
            new.discard();
            return Err(changed(what));
        }
        Ok(new)
    }

    /// Refuses a revision whose files changed since the snapshot was taken.
    pub fn verify(&self, what: &str) -> Result<(), AdapterError> {
        let now: Result<Vec<FileStamp>, _> = files(&self.dir)
            .and_then(|names| names.into_iter().map(|n| stamp(&self.dir, n)).collect());
        match now {
            Ok(now) if now == *self.stamps => Ok(()),
            _ => Err(changed(what)),
        }
    }

    /// Deletes the snapshot's own directory (nothing when it is the source's).
    pub fn discard(&self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn changed(what: &str) -> AdapterError {
    AdapterError::LoadFailed {
        name: what.to_string(),
        message: "its files changed on disk after it was registered (rewritten in place): \
                  register the adapter again to serve the new files"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, body: &str) {
        std::fs::create_dir_all(dir).unwrap();
        let tmp = dir.join("w.tmp");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(tmp, dir.join("w")).unwrap();
    }

    #[test]
    fn a_snapshot_keeps_files_replaced_by_rename_and_refuses_in_place_rewrites() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let dead = tmp.path().join("snaps").join(format!("{}-1-1", u32::MAX));
        let earlier_me = tmp
            .path()
            .join("snaps")
            .join(format!("{}-1-1", std::process::id()));
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::create_dir_all(&earlier_me).unwrap();
        let other = Snapshot::prepare_root(&tmp.path().join("snaps")).unwrap();
        let root = Snapshot::prepare_root(&tmp.path().join("snaps")).unwrap();
        assert!(other.exists() && root.exists() && other != root);
        if cfg!(target_os = "linux") {
            assert!(!dead.exists(), "an ended process's snapshots are deleted");
        }
        assert!(
            !earlier_me.exists(),
            "so are those of an earlier process with this pid"
        );
        write(&src, "one");
        // A fused adapter's files one level down are taken too.
        write(&src.join("inner"), "nested");
        let s1 = Snapshot::take(Some(&root), &src, 7).unwrap();
        assert_eq!(
            std::fs::read_to_string(s1.dir.join("inner/w")).unwrap(),
            "nested"
        );
        write(&src, "two!");
        let s2 = Snapshot::take(Some(&root), &src, 8).unwrap();
        assert_eq!(std::fs::read_to_string(s1.dir.join("w")).unwrap(), "one");
        assert_eq!(std::fs::read_to_string(s2.dir.join("w")).unwrap(), "two!");
        s1.verify("x@1").unwrap();
        // A rollback copies revision 1 as a new one.
        let s3 = s1.copy(Some(&root), 9, "x@1").unwrap();
        assert_eq!(std::fs::read_to_string(s3.dir.join("w")).unwrap(), "one");
        // Rewriting the source in place reaches the hard link: detected, not served.
        std::fs::write(src.join("w"), "TWO!!").unwrap();
        let err = s2.verify("x@2").unwrap_err().to_string();
        assert!(
            err.contains("x@2") && err.contains("changed on disk"),
            "{err}"
        );
        s3.discard();
        assert!(!s3.dir.exists());
        // Without a snapshot directory the source is stamped where it is.
        let here = Snapshot::take(None, &src, 10).unwrap();
        assert_eq!(here.dir, src);
        here.discard();
        assert!(src.exists(), "the source is never deleted");
    }
}
