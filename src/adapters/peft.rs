//! The PEFT on-disk format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]`, `.lora_B.weight` `[out, r]` and, for
//! DoRA, `.lora_magnitude_vector` `[out]`. Read and written; pickle `.bin` files are refused.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::config::AdapterConfig;
use super::error::AdapterError;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// The trained tensors of one module.
#[derive(Debug, Clone, Default)]
pub struct ModuleWeights {
    pub lora_a: Option<Tensor>,
    pub lora_b: Option<Tensor>,
    pub magnitude: Option<Tensor>,
}

/// An adapter as stored on disk, not yet bound to a model.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// Module path (`model.layers.0.self_attn.q_proj`) → tensors.
    pub modules: BTreeMap<String, ModuleWeights>,
}

/// Splits a PEFT key into module path and tensor role.
fn parse_key(key: &str) -> Option<(String, &'static str)> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    for (suffix, role) in [
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_magnitude_vector.weight", "M"),
        (".lora_magnitude_vector", "M"),
        (".lora_A.default.weight", "A"),
        (".lora_B.default.weight", "B"),
        (".lora_magnitude_vector.default.weight", "M"),
        (".lora_magnitude_vector.default", "M"),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((module.to_string(), role));
        }
    }
    None
}

impl PeftAdapter {
    /// Reads an adapter directory.
    pub fn load(dir: &Path) -> Result<Self, AdapterError> {
        let config = AdapterConfig::from_file(&dir.join(CONFIG_FILE))?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            let pickle = dir.join("adapter_model.bin");
            return Err(if pickle.is_file() {
                AdapterError::weights(
                    pickle,
                    "pickle `.bin` weights are refused (they can run code); convert the adapter to `adapter_model.safetensors`",
                )
            } else {
                AdapterError::weights(weights, "is missing")
            });
        }
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| {
            AdapterError::weights(&weights, format!("not a readable safetensors file: {e}"))
        })?;
        let mut modules: BTreeMap<String, ModuleWeights> = BTreeMap::new();
        for (key, t) in tensors {
            let (module, role) = parse_key(&key).ok_or_else(|| {
                AdapterError::weights(&weights, format!("unexpected tensor `{key}` (only LoRA A/B and DoRA magnitudes are supported)"))
            })?;
            let m = modules.entry(module).or_default();
            match role {
                "A" => m.lora_a = Some(t),
                "B" => m.lora_b = Some(t),
                _ => m.magnitude = Some(t),
            }
        }
        if modules.is_empty() {
            return Err(AdapterError::weights(&weights, "holds no LoRA tensors"));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            modules,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
    pub fn save(&self, dir: &Path, proj_names: &[&str]) -> Result<(), AdapterError> {
        std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let cfg_path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&self.config.to_json(proj_names))
            .expect("config serializes");
        std::fs::write(&cfg_path, text).map_err(|source| AdapterError::Io {
            path: cfg_path,
            source,
        })?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (module, w) in &self.modules {
            let key = |s: &str| format!("{KEY_PREFIX}{module}.{s}");
            if let Some(a) = &w.lora_a {
                tensors.insert(key("lora_A.weight"), a.contiguous()?);
            }
            if let Some(b) = &w.lora_b {
                tensors.insert(key("lora_B.weight"), b.contiguous()?);
            }
            if let Some(m) = &w.magnitude {
                tensors.insert(key("lora_magnitude_vector"), m.contiguous()?);
            }
        }
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
        Ok(())
    }

    /// On-disk size of the weights (a first estimate of resident bytes).
    pub fn weight_bytes(&self) -> usize {
        self.modules
            .values()
            .flat_map(|m| [&m.lora_a, &m.lora_b, &m.magnitude])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_with_and_without_adapter_name() {
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj".to_string(), "A"))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"),
            Some(("model.layers.1.mlp.up_proj".to_string(), "M"))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight"),
            Some(("model.layers.1.mlp.up_proj".to_string(), "B"))
        );
        assert_eq!(parse_key("base_model.model.lm_head.weight"), None);
    }
}
