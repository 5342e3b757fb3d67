//! Uploaded files (`POST /v1/files`, `purpose = fine-tune`): each kept as `ID.jsonl` with its
//! record `ID.json` under `STATE/files/`, owned by the tenant that uploaded it. Contents are
//! checked line by line before anything is kept (a bad line is refused by number), written
//! durably, and the record written last; the records are read once into an index in memory,
//! so listing and quotas touch no disk. Ids are
//! random (`file-` + 24 hex digits) and are the only names used on disk, so a client's id can
//! never reach outside the folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// What `GET /v1/files/{id}` returns (OpenAI's file object), plus the owner (never sent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRecord {
    pub id: String,
    pub object: String,
    pub bytes: usize,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    /// Lines holding a record.
    pub lines: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub owner: Option<String>,
}

impl FileRecord {
    /// The object clients see (without the owner).
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
            "filename": self.filename, "purpose": self.purpose, "status": self.status,
        })
    }
}

pub struct FileStore {
    dir: PathBuf,
    index: std::sync::Mutex<Index>,
}

/// The records, read once from disk; bytes being written count against their owner already.
#[derive(Default)]
struct Index {
    loaded: bool,
    files: std::collections::HashMap<String, FileRecord>,
    /// Bytes and count of uploads accepted but not yet on disk, by owner.
    reserved: std::collections::HashMap<Option<String>, (u64, usize)>,
}

/// Whether `id` has the shape of our ids (anything else is simply not found).
fn valid_id(id: &str) -> bool {
    id.strip_prefix("file-")
        .is_some_and(|h| h.len() == 24 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn internal(path: &Path, e: impl std::fmt::Display) -> ApiError {
    tracing::error!("file store: {}: {e}", path.display());
    ApiError::Internal("the file store failed; see the server log".into())
}

/// Checks `content` as JSONL of training records (a bad line refused by number); the records.
pub fn check_contents(content: &[u8], max_messages: Option<usize>) -> Result<usize, ApiError> {
    let text = std::str::from_utf8(content)
        .map_err(|e| ApiError::bad("file", format!("is not UTF-8 text: {e}")))?;
    let mut lines = 0;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| ApiError::bad("file", format!("line {}: not valid JSON: {e}", n + 1)))?;
        crate::train::dataset::check_record(&v, max_messages)
            .map_err(|e| ApiError::bad("file", format!("line {}: {e}", n + 1)))?;
        lines += 1;
    }
    if lines == 0 {
        return Err(ApiError::bad("file", "holds no training records"));
    }
    Ok(lines)
}

impl FileStore {
    /// The store under `state_dir` (made on first upload).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("files"),
            index: std::sync::Mutex::new(Index::default()),
        }
    }

    /// The index, read from disk on first use. A crash can leave contents without a record
    /// (never acknowledged) and temporary files: both are removed.
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if !index.loaded {
            index.loaded = true;
            let mut contents = Vec::new();
            for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                } else if let Some(id) = name.strip_suffix(".jsonl") {
                    contents.push(id.to_string());
                } else if let Some(id) = name.strip_suffix(".json") {
                    let record = std::fs::read_to_string(entry.path())
                        .ok()
                        .and_then(|t| serde_json::from_str::<FileRecord>(&t).ok());
                    match record {
                        Some(r) if valid_id(id) && r.id == id => {
                            index.files.insert(id.to_string(), r);
                        }
                        _ => {
                            tracing::warn!("{}: not a file record; ignored", entry.path().display())
                        }
                    }
                }
            }
            for id in contents {
                if !index.files.contains_key(&id) {
                    tracing::info!(
                        "file {id}: contents without a record (an upload cut short); removed"
                    );
                    let _ = std::fs::remove_file(self.dir.join(format!("{id}.jsonl")));
                }
            }
        }
        index
    }

    /// Bytes and count of `owner`'s files, uploads in progress included.
    fn usage(index: &Index, owner: Option<&str>) -> (u64, usize) {
        let (bytes, count) = index
            .files
            .values()
            .filter(|f| f.owner.as_deref() == owner)
            .fold((0u64, 0usize), |(b, n), f| (b + f.bytes as u64, n + 1));
        let (rb, rn) = index
            .reserved
            .get(&owner.map(str::to_string))
            .copied()
            .unwrap_or_default();
        (bytes + rb, count + rn)
    }

    /// Checks `content` (JSONL of training records) and keeps it for `owner`, within `limit`
    /// (bytes of files, number of files) for that owner (checked and reserved under one lock:
    /// concurrent uploads cannot overshoot). Contents are written and fsynced first, the record last.
    pub fn create(
        &self,
        owner: Option<&str>,
        filename: &str,
        purpose: &str,
        content: &[u8],
        limit: Option<(u64, usize)>,
        max_messages: Option<usize>,
    ) -> Result<FileRecord, ApiError> {
        if purpose != "fine-tune" {
            return Err(ApiError::bad(
                "purpose",
                format!("is `{purpose}`; only `fine-tune` files are kept"),
            ));
        }
        let lines = check_contents(content, max_messages)?;
        let key = owner.map(str::to_string);
        {
            let mut index = self.index();
            if let Some((limit, max_files)) = limit {
                let (bytes, count) = Self::usage(&index, owner);
                if count >= max_files {
                    return Err(ApiError::forbidden(
                        "file",
                        format!("quota: your key keeps at most {max_files} files (`max_files`); delete some first"),
                    ));
                }
                if bytes + content.len() as u64 > limit {
                    return Err(ApiError::forbidden(
                        "file",
                        format!(
                            "quota: {} more bytes of files would exceed `max_file_bytes` ({limit}); delete some first",
                            content.len()
                        ),
                    ));
                }
            }
            let r = index.reserved.entry(key.clone()).or_default();
            *r = (r.0 + content.len() as u64, r.1 + 1);
        }
        let record = FileRecord {
            id: format!("file-{:024x}", rand::random::<u128>() >> 32),
            object: "file".into(),
            bytes: content.len(),
            created_at: super::state::unix_now(),
            filename: filename.chars().take(256).collect(),
            purpose: purpose.into(),
            status: "processed".into(),
            lines,
            owner: key.clone(),
        };
        let written = (|| {
            let data = self.dir.join(format!("{}.jsonl", record.id));
            crate::durable::write(&data, content).map_err(|e| internal(&data, e))?;
            let meta = self.dir.join(format!("{}.json", record.id));
            let json = serde_json::to_string(&record).expect("a record serializes");
            crate::durable::write(&meta, json.as_bytes()).map_err(|e| internal(&meta, e))
        })();
        let mut index = self.index();
        if let Some(r) = index.reserved.get_mut(&key) {
            *r = (
                r.0.saturating_sub(content.len() as u64),
                r.1.saturating_sub(1),
            );
        }
        match written {
            Ok(()) => {
                index.files.insert(record.id.clone(), record.clone());
                Ok(record)
            }
            Err(e) => {
                let _ = std::fs::remove_file(self.dir.join(format!("{}.jsonl", record.id)));
                Err(e)
            }
        }
    }

    /// The record of `id` if `owner` may see it (the caller's own; `None`: any). Another
    /// tenant's file and a missing one are the same 404.
    pub fn get(&self, id: &str, owner: Option<Option<&str>>) -> Result<FileRecord, ApiError> {
        let missing = || ApiError::NotFound(format!("no file `{id}`"));
        if !valid_id(id) {
            return Err(missing());
        }
        let record = self.index().files.get(id).cloned().ok_or_else(missing)?;
        match owner {
            Some(o) if record.owner.as_deref() != o => Err(missing()),
            _ => Ok(record),
        }
    }

    /// The path of `id`'s contents (after `get` allowed it).
    pub fn contents(&self, record: &FileRecord) -> PathBuf {
        self.dir.join(format!("{}.jsonl", record.id))
    }

    /// The files `owner` may see, newest first.
    pub fn list(&self, owner: Option<Option<&str>>) -> Vec<FileRecord> {
        let mut out: Vec<FileRecord> = self
            .index()
            .files
            .values()
            .filter(|f| owner.is_none_or(|o| f.owner.as_deref() == o))
            .cloned()
            .collect();
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        out
    }

    /// Removes a file: its record first (it is gone from then on), then its contents.
    pub fn delete(&self, id: &str, owner: Option<Option<&str>>) -> Result<(), ApiError> {
        let record = self.get(id, owner)?;
        let mut index = self.index();
        let meta = self.dir.join(format!("{}.json", record.id));
        std::fs::remove_file(&meta).map_err(|e| internal(&meta, e))?;
        index.files.remove(&record.id);
        drop(index);
        let _ = crate::durable::sync_dir(&self.dir);
        let data = self.dir.join(format!("{}.jsonl", record.id));
        std::fs::remove_file(&data).map_err(|e| internal(&data, e))
    }
}
