//! Writes that survive `kill -9` and power loss at any instant: a file is written under a
//! temporary name in its own directory, fsynced, renamed over its final name, and the directory
//! fsynced; a directory is filled under a temporary name and renamed into place the same way. A
//! reader sees the old contents or the new, never a mix. A leaf: depends on std only.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name beside `path` that its new contents are written under.
pub fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Fsyncs directory `dir` (makes renames and creations in it durable).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Fsyncs every file directly in `dir`, then `dir` itself.
pub fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Replaces `path` with `bytes` atomically and durably.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = tmp_name(path);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Appends one line to `path` and fsyncs it (a log whose last line may be cut by a crash:
/// readers skip a line that does not parse).
pub fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // A line cut by an earlier crash would swallow this one: start on a fresh line.
    let len = f.metadata()?.len();
    let mut text = String::with_capacity(line.len() + 2);
    if len > 0 {
        use std::io::{Read, Seek, SeekFrom};
        let mut last = [0u8; 1];
        let mut r = File::open(path)?;
        r.seek(SeekFrom::Start(len - 1))?;
        r.read_exact(&mut last)?;
        if last[0] != b'\n' {
            text.push('\n');
        }
    }
    text.push_str(line);
    text.push('\n');
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// Fills a new directory with `fill` and puts it at `dir` atomically: `fill` writes into a
/// temporary directory beside it, whose files are fsynced before the rename. An old `dir` is
/// moved aside first and removed last, so at every instant one complete version exists (the
/// aside copy, `DIR.old`, is what `recover_dir` brings back after a crash between the renames).
pub fn replace_dir<E: From<std::io::Error>>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = tmp_name(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    fill(&tmp)?;
    sync_tree(&tmp)?;
    let old = old_name(dir);
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    sync_dir(parent)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

fn old_name(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".old");
    dir.with_file_name(name)
}

/// After a crash: completes or undoes an interrupted `replace_dir` of `dir`. A missing `dir`
/// with its `.old` copy present gets the old copy back; leftovers (`.tmp`, `.old`) go.
pub fn recover_dir(dir: &Path) -> std::io::Result<()> {
    let old = old_name(dir);
    if !dir.exists() && old.exists() {
        std::fs::rename(&old, dir)?;
    }
    for leftover in [old, tmp_name(dir)] {
        if leftover.exists() {
            std::fs::remove_dir_all(&leftover)?;
        }
    }
    Ok(())
}
