//! Uploaded files (`POST /v1/files`, `purpose = fine-tune`): each kept as `ID.jsonl` with its
//! record `ID.json` under `STATE/files/`, owned by the tenant that uploaded it. Contents are
//! checked line by line before anything is kept (a bad line is refused by number). Ids are
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
    lock: std::sync::Mutex<()>,
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

impl FileStore {
    /// The store under `state_dir` (made on first upload).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("files"),
            lock: std::sync::Mutex::new(()),
        }
    }

    /// Checks `content` (JSONL of training records) and keeps it for `owner`.
    pub fn create(
        &self,
        owner: Option<&str>,
        filename: &str,
        purpose: &str,
        content: &[u8],
    ) -> Result<FileRecord, ApiError> {
        if purpose != "fine-tune" {
            return Err(ApiError::bad(
                "purpose",
                format!("is `{purpose}`; only `fine-tune` files are kept"),
            ));
        }
        let text = std::str::from_utf8(content)
            .map_err(|e| ApiError::bad("file", format!("is not UTF-8 text: {e}")))?;
        let mut lines = 0;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                ApiError::bad("file", format!("line {}: not valid JSON: {e}", n + 1))
            })?;
            crate::train::dataset::check_record(&v)
                .map_err(|e| ApiError::bad("file", format!("line {}: {e}", n + 1)))?;
            lines += 1;
        }
        if lines == 0 {
            return Err(ApiError::bad("file", "holds no training records"));
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
            owner: owner.map(str::to_string),
        };
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::create_dir_all(&self.dir).map_err(|e| internal(&self.dir, e))?;
        let data = self.dir.join(format!("{}.jsonl", record.id));
        std::fs::write(&data, content).map_err(|e| internal(&data, e))?;
        let meta = self.dir.join(format!("{}.json", record.id));
        let json = serde_json::to_string(&record).expect("a record serializes");
        std::fs::write(&meta, json).map_err(|e| internal(&meta, e))?;
        Ok(record)
    }

    /// The record of `id` if `owner` may see it (the caller's own; `None`: any). Another
    /// tenant's file and a missing one are the same 404.
    pub fn get(&self, id: &str, owner: Option<Option<&str>>) -> Result<FileRecord, ApiError> {
        let missing = || ApiError::NotFound(format!("no file `{id}`"));
        if !valid_id(id) {
            return Err(missing());
        }
        let meta = self.dir.join(format!("{id}.json"));
        let Ok(text) = std::fs::read_to_string(&meta) else {
            return Err(missing());
        };
        let record: FileRecord = serde_json::from_str(&text).map_err(|e| internal(&meta, e))?;
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
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<FileRecord> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let id = name.strip_suffix(".json")?;
                self.get(id, owner).ok()
            })
            .collect();
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        out
    }

    pub fn delete(&self, id: &str, owner: Option<Option<&str>>) -> Result<(), ApiError> {
        let record = self.get(id, owner)?;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        for ext in ["json", "jsonl"] {
            let path = self.dir.join(format!("{}.{ext}", record.id));
            std::fs::remove_file(&path).map_err(|e| internal(&path, e))?;
        }
        Ok(())
    }
}
