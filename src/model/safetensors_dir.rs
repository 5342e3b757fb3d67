//! Loading a Hugging Face model directory: `config.json`, `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde_json::Value;

use super::config::{token_ids, LlamaConfig};
use super::error::ModelError;
use super::loaded::{token_string, LoadedModel, ModelOptions, Weights};
use crate::tokenizer::Tokenizer;

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The safetensors files of a directory: the single file, or every shard of the index.
pub fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(ModelError::format(
            dir,
            "has neither `model.safetensors` nor `model.safetensors.index.json`",
        ));
    }
    let map = read_json(&index)?;
    let shards: BTreeSet<String> = map
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::field(&index, "weight_map", "is missing"))?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

/// A multimodal checkpoint's text-model tensor under the text model's own name (Gemma 3:
/// `language_model.model.…` as saved, `model.language_model.…` as transformers 5 names it
/// inside); `None` for the vision tower and projector, which are not served.
pub fn text_model_name(name: &str) -> Option<String> {
    for (from, to) in [
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ] {
        if let Some(rest) = name.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    let vision = ["vision_tower.", "multi_modal_projector."];
    if vision.iter().any(|p| {
        name.starts_with(p)
            || name
                .strip_prefix("model.")
                .is_some_and(|r| r.starts_with(p))
    }) {
        return None;
    }
    Some(name.to_string())
}

pub fn load(id: &str, dir: &Path, opts: &ModelOptions) -> Result<LoadedModel, ModelError> {
    let config = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
    let mut tensors = HashMap::new();
    for file in weight_files(dir)? {
        let loaded = candle_core::safetensors::load(&file, &opts.device).map_err(|e| {
            ModelError::format(&file, format!("not a readable safetensors file: {e}"))
        })?;
        for (name, t) in loaded {
            let Some(name) = text_model_name(&name) else {
                continue;
            };
            tensors.insert(name, t.to_dtype(opts.dtype)?);
        }
    }
    let weights = Weights {
        path: dir.to_path_buf(),
        tensors,
        quant: HashMap::new(),
        norms_hold_one: false,
    };
    let model = weights.into_llama(config.clone())?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;

    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        Value::Null
    };
    let chat_template = match tc.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        // A list of named templates: the one called "default", else the first.
        Some(Value::Array(items)) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| items.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
    .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());

    let mut eos_token_ids = config.eos_token_ids.clone();
    let gen_path = dir.join("generation_config.json");
    if gen_path.is_file() {
        for id in token_ids(read_json(&gen_path)?.get("eos_token_id")) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let eos_token = token_string(tc.get("eos_token"));
    if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_id(t)) {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    Ok(LoadedModel {
        id: id.to_string(),
        path: dir.to_path_buf(),
        model,
        tokenizer,
        chat_template,
        bos_token: token_string(tc.get("bos_token")),
        add_bos_token: tc
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        eos_token,
        eos_token_ids,
    })
}
