//! Adapters from the Hugging Face hub (`org/name`): the local hub cache first, then a download
//! of `adapter_config.json` and `adapter_model.safetensors` into it.

use std::path::PathBuf;

use super::error::AdapterError;
use super::peft::{CONFIG_FILE, WEIGHTS_FILE};
use crate::model::source::SourceConfig;

/// The local directory holding the adapter `id`, downloading it if needed.
pub async fn fetch(id: &str, cfg: &SourceConfig) -> Result<PathBuf, AdapterError> {
    let failed = |message: String| AdapterError::LoadFailed {
        name: id.to_string(),
        message,
    };
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() != 2
        || parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\\'))
    {
        return Err(AdapterError::InvalidName {
            name: id.to_string(),
            reason: "a hub id has the form `org/name`".into(),
        });
    }
    let cached = hf_hub::Cache::new(cfg.hub_cache()).model(id.to_string());
    if let (Some(config), Some(_)) = (cached.get(CONFIG_FILE), cached.get(WEIGHTS_FILE)) {
        return Ok(config.parent().map(PathBuf::from).unwrap_or_default());
    }
    let api = cfg.hub_api(false).map_err(failed)?;
    let repo = api.model(id.to_string());
    let config = repo
        .get(CONFIG_FILE)
        .await
        .map_err(|e| failed(format!("hub {}: {e}", cfg.hub_endpoint)))?;
    repo.get(WEIGHTS_FILE)
        .await
        .map_err(|e| failed(format!("hub {}: {WEIGHTS_FILE}: {e}", cfg.hub_endpoint)))?;
    Ok(config.parent().map(PathBuf::from).unwrap_or_default())
}
