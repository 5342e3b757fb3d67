//! Adapters from the Hugging Face hub (`org/name`): a finished download (ours, or hf-hub's
//! cache) first, else a bounded download. The safetensors header is fetched alone first (two range requests)
//! and checked — its size against `max_bytes`, its shapes by the caller against the base model —
//! before the body is downloaded, and the body may not exceed what the header declared.
//! Files land in `$LORAPLEX_HOME/hub-adapters/{token,public}/ORG--NAME` through a temporary
//! folder, so a failed download leaves nothing behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::AdapterConfig;
use super::error::AdapterError;
use super::peft::{
    module_shapes, parse_safetensors_header, AdapterHeader, CONFIG_FILE, WEIGHTS_FILE,
};
use crate::model::source::{is_hub_id, SourceConfig};

/// Largest `adapter_config.json` accepted.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest safetensors header accepted.
const MAX_HEADER_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Send the operator's `$HF_TOKEN` (admins only: a tenant must not reach private repos).
    pub use_token: bool,
    /// Upper bound on the weights file.
    pub max_bytes: u64,
}

/// Checks a hub id with the one validator models use too.
pub fn validate_id(id: &str) -> Result<(), AdapterError> {
    if is_hub_id(id) {
        Ok(())
    } else {
        Err(AdapterError::InvalidName {
            name: id.to_string(),
            reason: "a hub id has the form `org/name`, each part of A-Z a-z 0-9 . _ -".into(),
        })
    }
}

/// Downloads made with the operator's token and without it live apart: a tokenless (tenant)
/// fetch must never be answered from a private repo an admin fetched.
fn local_dir(id: &str, cfg: &SourceConfig, opts: &HubOptions) -> PathBuf {
    cfg.home
        .join("hub-adapters")
        .join(if opts.use_token { "token" } else { "public" })
        .join(id.replace('/', "--"))
}

fn complete(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file() && dir.join(WEIGHTS_FILE).is_file()
}

/// The local directory holding the adapter `id`, downloading it if needed. `check` sees the
/// adapter's config and header before the weights are downloaded.
pub async fn fetch(
    id: &str,
    cfg: &SourceConfig,
    opts: &HubOptions,
    check: impl Fn(&AdapterHeader) -> Result<(), AdapterError>,
) -> Result<PathBuf, AdapterError> {
    validate_id(id)?;
    let dir = local_dir(id, cfg, opts);
    if complete(&dir) {
        return Ok(dir);
    }
    // A hub cache the operator filled (hf-hub's layout, possibly with private repos) serves
    // token holders only.
    if opts.use_token {
        let cached = hf_hub::Cache::new(cfg.hub_cache()).model(id.to_string());
        if let (Some(config), Some(_)) = (cached.get(CONFIG_FILE), cached.get(WEIGHTS_FILE)) {
            return Ok(config.parent().map(PathBuf::from).unwrap_or_default());
        }
    }
    let failed = |message: String| AdapterError::LoadFailed {
        name: id.to_string(),
        message,
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let token = opts
        .use_token
        .then(|| std::env::var("HF_TOKEN").ok())
        .flatten();
    let get = Getter {
        client: &client,
        base: format!(
            "{}/{id}/resolve/main",
            cfg.hub_endpoint.trim_end_matches('/')
        ),
        token: token.as_deref(),
        id,
    };

    let config = get.bytes(CONFIG_FILE, None, MAX_CONFIG_BYTES).await?;
    let len = get.bytes(WEIGHTS_FILE, Some((0, 8)), 8).await?;
    let len: [u8; 8] = len
        .try_into()
        .map_err(|_| failed(format!("{WEIGHTS_FILE}: shorter than 8 bytes")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || n + 8 > opts.max_bytes {
        return Err(failed(format!(
            "{WEIGHTS_FILE}: a header of {n} bytes is over the limit of {} bytes",
            MAX_HEADER_BYTES.min(opts.max_bytes)
        )));
    }
    let json = get.bytes(WEIGHTS_FILE, Some((8, 8 + n)), n).await?;

    let parent = dir.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&parent).map_err(|source| AdapterError::Io {
        path: parent.clone(),
        source,
    })?;
    let tmp = Staging(parent.join(format!(".download-{:016x}", rand::random::<u64>())));
    std::fs::create_dir(tmp.path()).map_err(|source| AdapterError::Io {
        path: tmp.path().to_path_buf(),
        source,
    })?;
    let write = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).map_err(|source| AdapterError::Io { path: p, source })
    };
    write(CONFIG_FILE, &config)?;
    // Messages name the files by hub id, not by where this server keeps them.
    let repo = PathBuf::from(id);
    let weights_path = repo.join(WEIGHTS_FILE);
    let room = opts.max_bytes - 8 - n;
    let (mut tensors, data_bytes) =
        parse_safetensors_header(&weights_path, &json, room).map_err(|e| {
            failed(format!(
                "{e} (downloads are limited to {} bytes)",
                opts.max_bytes
            ))
        })?;
    let config_text = String::from_utf8_lossy(&config);
    check(&AdapterHeader {
        dir: repo.clone(),
        config: AdapterConfig::from_json(&repo.join(CONFIG_FILE), &config_text)?,
        prompt_embeddings: tensors.remove(super::peft::PROMPT_EMBEDDINGS),
        modules: module_shapes(&weights_path, tensors)?,
        bytes: data_bytes,
    })?;

    let total = 8 + n + data_bytes;
    let body = get.bytes(WEIGHTS_FILE, None, total).await?;
    if body.len() as u64 != total || body[..8] != len {
        return Err(failed(format!(
            "{WEIGHTS_FILE}: {} bytes arrived; its header declares {total}",
            body.len()
        )));
    }
    write(WEIGHTS_FILE, &body)?;
    if let Err(source) = std::fs::rename(tmp.path(), &dir) {
        // Another download of the same id may have finished first.
        if !complete(&dir) {
            return Err(AdapterError::Io { path: dir, source });
        }
    }
    Ok(dir)
}

/// A download folder, removed unless it was renamed into place.
struct Staging(PathBuf);

impl Staging {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Getter<'a> {
    client: &'a reqwest::Client,
    base: String,
    token: Option<&'a str>,
    id: &'a str,
}

impl Getter<'_> {
    /// GETs `file` (bytes `[from, to)` when ranged), reading at most `limit` bytes: a ranged
    /// answer is cut at the range even if the server ignores `Range`; a whole file longer than
    /// `limit` is an error.
    async fn bytes(
        &self,
        file: &str,
        range: Option<(u64, u64)>,
        limit: u64,
    ) -> Result<Vec<u8>, AdapterError> {
        let failed = |message: String| AdapterError::LoadFailed {
            name: self.id.to_string(),
            message: format!("hub {}/{file}: {message}", self.base),
        };
        let mut req = self.client.get(format!("{}/{file}", self.base));
        if let Some(t) = self.token {
            req = req.bearer_auth(t);
        }
        if let Some((from, to)) = range {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-{}", to - 1));
        }
        let mut resp = req.send().await.map_err(|e| failed(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(failed(format!("answered {status}")));
        }
        // A server that ignores `Range` sends the whole file: skip to the range's start.
        let mut skip = match range {
            Some((from, _)) if status != reqwest::StatusCode::PARTIAL_CONTENT => from,
            _ => 0,
        };
        if range.is_none() && resp.content_length().is_some_and(|l| l > limit) {
            return Err(failed(format!(
                "is {} bytes, over the limit of {limit}",
                resp.content_length().unwrap_or(0)
            )));
        }
        let mut out = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| failed(e.to_string()))? {
            let mut c = &chunk[..];
            if skip > 0 {
                let s = skip.min(c.len() as u64) as usize;
                c = &c[s..];
                skip -= s as u64;
            }
            let room = (limit - out.len() as u64) as usize;
            if c.len() > room {
                if range.is_some() {
                    out.extend_from_slice(&c[..room]);
                    break;
                }
                return Err(failed(format!("is over the limit of {limit} bytes")));
            }
            out.extend_from_slice(c);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_use_the_model_validator() {
        for ok in ["org/name", "Org-1/na.me_2"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "org/na me",
            "org/x?y",
            "org/x#y",
            "org/%2e%2e",
            "org/..",
            "a/b/c",
            "org",
            "/x",
            "org/x\\y",
        ] {
            let e = validate_id(bad).unwrap_err().to_string();
            assert!(e.contains("org/name"), "{bad}: {e}");
        }
    }
}
