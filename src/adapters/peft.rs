//! The PEFT on-disk format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]`, `.lora_B.weight` `[out, r]` and, for
//! DoRA, `.lora_magnitude_vector` `[out]`; for IA³, `.ia3_l` (`[out, 1]`, or `[1, in]` on a
//! feed-forward module). Read and written; pickle `.bin` files are refused.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::config::{AdapterConfig, Method};
use super::error::AdapterError;

pub const CONFIG_FILE: &str = "adapter_config.json";
/// AdapterHub's saved setup (`save_adapter_setup`): a composition of adapters in subfolders.
pub const SETUP_FILE: &str = "adapter_setup.json";
const FUSION_CONFIG_FILE: &str = "adapter_fusion_config.json";
const FUSION_WEIGHTS_FILE: &str = "model_adapter_fusion.safetensors";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";
/// Prompt learning's one tensor (prefix tuning: `[virtual tokens, layers · 2 · kv_heads ·
/// head_dim]`, per layer the keys then the values, each `[kv_heads, tokens, head_dim]`).
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// Longest safetensors header read (the JSON before the data).
const MAX_HEADER_BYTES: u64 = 16 << 20;

/// The trained tensors of one module.
#[derive(Debug, Clone, Default)]
pub struct ModuleWeights {
    pub lora_a: Option<Tensor>,
    pub lora_b: Option<Tensor>,
    pub magnitude: Option<Tensor>,
    pub ia3: Option<Tensor>,
    /// A bottleneck adapter's biases (its weights are `lora_a`: down `[r, hidden]` and
    /// `lora_b`: up `[hidden, r]`).
    pub down_bias: Option<Tensor>,
    pub up_bias: Option<Tensor>,
}

impl ModuleWeights {
    pub fn shapes(&self) -> ModuleShapes {
        let dims = |t: &Option<Tensor>| t.as_ref().map(|t| t.dims().to_vec());
        ModuleShapes {
            lora_a: dims(&self.lora_a),
            lora_b: dims(&self.lora_b),
            magnitude: dims(&self.magnitude),
            ia3: dims(&self.ia3),
            down_bias: dims(&self.down_bias),
            up_bias: dims(&self.up_bias),
        }
    }
}

/// The shapes of one module's tensors, as the header declares them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleShapes {
    pub lora_a: Option<Vec<usize>>,
    pub lora_b: Option<Vec<usize>>,
    pub magnitude: Option<Vec<usize>>,
    pub ia3: Option<Vec<usize>>,
    pub down_bias: Option<Vec<usize>>,
    pub up_bias: Option<Vec<usize>>,
}

/// An adapter known from its config and its safetensors header only: nothing of the tensor
/// data has been read. Enough to check it against the base model and a byte quota.
#[derive(Debug, Clone)]
pub struct AdapterHeader {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub modules: BTreeMap<String, ModuleShapes>,
    /// The shape of `prompt_embeddings`, if the file has it.
    pub prompt_embeddings: Option<Vec<usize>>,
    /// Bytes of tensor data the header declares.
    pub bytes: u64,
}

#[derive(serde::Deserialize)]
struct HeaderTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parses a safetensors header (the JSON) and checks every tensor: a supported dtype, a shape
/// whose size fits its data offsets, offsets within `data_len` bytes of data. Returns the
/// shapes by tensor name and the bytes of data declared. Nothing is allocated per element.
pub fn parse_safetensors_header(
    path: &Path,
    json: &[u8],
    data_len: u64,
) -> Result<(BTreeMap<String, Vec<usize>>, u64), AdapterError> {
    let bad =
        |problem: String| AdapterError::weights(path, format!("safetensors header: {problem}"));
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let mut out = BTreeMap::new();
    let mut total = 0u64;
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let t: HeaderTensor =
            serde_json::from_value(v).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let size = match t.dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            "F64" => 8,
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {other}; LoRA tensors are F32, F16, BF16 or F64"
                )))
            }
        };
        let elems = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(size));
        let [start, end] = t.data_offsets;
        if elems != Some(end.wrapping_sub(start)) || start > end || end > data_len {
            return Err(bad(format!(
                "tensor `{name}` {:?} ({}) does not fit its data offsets [{start}, {end}] in {data_len} bytes of data",
                t.shape, t.dtype
            )));
        }
        total += end - start;
        out.insert(name, t.shape.iter().map(|&d| d as usize).collect());
    }
    Ok((out, total))
}

/// Reads only the header of a safetensors file.
fn read_safetensors_header(
    path: &Path,
) -> Result<(BTreeMap<String, Vec<usize>>, u64), AdapterError> {
    use std::io::Read;
    let io = |source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| {
        AdapterError::weights(path, "not a safetensors file (shorter than 8 bytes)")
    })?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || n + 8 > file_len {
        return Err(AdapterError::weights(
            path,
            format!(
                "safetensors header: declares {n} bytes of header in a file of {file_len} bytes"
            ),
        ));
    }
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json).map_err(io)?;
    parse_safetensors_header(path, &json, file_len - 8 - n)
}

/// Groups tensors (or their shapes) by module: `[lora_A, lora_B, magnitude, ia3_l, down bias,
/// up bias]` each.
fn by_module<T>(
    path: &Path,
    items: impl IntoIterator<Item = (String, T)>,
) -> Result<BTreeMap<String, [Option<T>; 6]>, AdapterError> {
    let mut modules: BTreeMap<String, [Option<T>; 6]> = BTreeMap::new();
    for (key, item) in items {
        let (module, role) = parse_key(&key).ok_or_else(|| {
            AdapterError::weights(
                path,
                format!(
                    "unexpected tensor `{key}` (only LoRA A/B, DoRA magnitudes and IA³ vectors are supported)"
                ),
            )
        })?;
        if crate::model::text_model_name(&module).is_none() {
            // A multimodal model's vision tower (PEFT's `all-linear` reaches it): images are not
            // served, so neither are its adapters.
            continue;
        }
        let slot = match role {
            "A" => 0,
            "B" => 1,
            "M" => 2,
            "I" => 3,
            "DB" => 4,
            _ => 5,
        };
        modules
            .entry(module)
            .or_insert_with(|| [None, None, None, None, None, None])[slot] = Some(item);
    }
    Ok(modules)
}

/// Groups header tensors by module.
pub fn module_shapes(
    path: &Path,
    tensors: BTreeMap<String, Vec<usize>>,
) -> Result<BTreeMap<String, ModuleShapes>, AdapterError> {
    Ok(by_module(path, tensors)?
        .into_iter()
        .map(
            |(m, [lora_a, lora_b, magnitude, ia3, down_bias, up_bias])| {
                (
                    m,
                    ModuleShapes {
                        lora_a,
                        lora_b,
                        magnitude,
                        ia3,
                        down_bias,
                        up_bias,
                    },
                )
            },
        )
        .collect())
}

/// An adapter as stored on disk, not yet bound to a model.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// Module path (`model.layers.0.self_attn.q_proj`) → tensors.
    pub modules: BTreeMap<String, ModuleWeights>,
    /// Prompt learning's trained rows (prefix tuning).
    pub prompt_embeddings: Option<Tensor>,
    /// AdapterFusion: the fused adapters and the fusion layers.
    pub fusion: Option<Box<FusionParts>>,
}

/// One AdapterFusion layer (`[hidden, hidden]` each; `value` absent in a static fusion).
#[derive(Debug, Clone)]
pub struct FusionTensors {
    pub query_w: Tensor,
    pub query_b: Tensor,
    pub key_w: Tensor,
    pub key_b: Tensor,
    pub value_w: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct FusionParts {
    /// The fused bottleneck adapters, in the setup's order.
    pub adapters: Vec<PeftAdapter>,
    /// Place (`model.layers.L.output_adapters`) → its fusion layer.
    pub layers: BTreeMap<String, FusionTensors>,
}

/// Splits a PEFT key (or an AdapterHub bottleneck key,
/// `model.layers.L.output_adapters.adapters.NAME.adapter_down.0.weight`) into module path and
/// tensor role.
fn parse_key(key: &str) -> Option<(String, &'static str)> {
    if let Some((module, rest)) = key.split_once(".adapters.") {
        let role = match rest.split_once('.').map(|(_, r)| r) {
            Some("adapter_down.0.weight") => "A",
            Some("adapter_up.weight") => "B",
            Some("adapter_down.0.bias") => "DB",
            Some("adapter_up.bias") => "UB",
            _ => return None,
        };
        return Some((module.to_string(), role));
    }
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    // A multimodal model's language model (Gemma 3): its modules under the text model's names.
    let rest = crate::model::text_model_name(rest).unwrap_or_else(|| rest.to_string());
    let rest = rest.as_str();
    for (suffix, role) in [
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_magnitude_vector.weight", "M"),
        (".lora_magnitude_vector", "M"),
        (".lora_A.default.weight", "A"),
        (".lora_B.default.weight", "B"),
        (".lora_magnitude_vector.default.weight", "M"),
        (".lora_magnitude_vector.default", "M"),
        (".ia3_l", "I"),
        (".ia3_l.default", "I"),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((module.to_string(), role));
        }
    }
    None
}

/// AdapterHub's weights file (a bottleneck adapter saved by `adapters`).
pub const ADAPTERHUB_WEIGHTS_FILE: &str = "adapter.safetensors";

/// The weights file of `dir` (PEFT's, else AdapterHub's), refusing pickle files.
fn weights_file(dir: &Path) -> Result<PathBuf, AdapterError> {
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() && dir.join(ADAPTERHUB_WEIGHTS_FILE).is_file() {
        return Ok(dir.join(ADAPTERHUB_WEIGHTS_FILE));
    }
    let hub_pickle = dir.join("pytorch_adapter.bin");
    if !weights.is_file() && hub_pickle.is_file() {
        return Err(AdapterError::weights(
            hub_pickle,
            "pickle `.bin` weights are refused (they can run code); save the adapter with `model.save_adapter(dir, name, use_safetensors=True)`, or convert it: `safetensors.torch.save_file(torch.load(\"pytorch_adapter.bin\"), \"adapter.safetensors\")`",
        ));
    }
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
    Ok(weights)
}

impl PeftAdapter {
    /// Reads the config and the safetensors header of an adapter directory, not its tensors.
    pub fn inspect(dir: &Path) -> Result<AdapterHeader, AdapterError> {
        if dir.join(SETUP_FILE).is_file() && !dir.join(CONFIG_FILE).is_file() {
            return Self::inspect_fusion(dir);
        }
        let weights = weights_file(dir)?;
        let config = Self::read_config(dir)?;
        let (mut tensors, bytes) = read_safetensors_header(&weights)?;
        let prompt_embeddings = tensors.remove(PROMPT_EMBEDDINGS);
        let modules = module_shapes(&weights, tensors)?;
        if modules.is_empty() && prompt_embeddings.is_none() {
            return Err(AdapterError::weights(&weights, "holds no adapter tensors"));
        }
        Ok(AdapterHeader {
            dir: dir.to_path_buf(),
            config,
            modules,
            prompt_embeddings,
            bytes,
        })
    }

    /// An AdapterHub fusion setup: its config, and every fused adapter's header checked to be
    /// there (the first one missing is named).
    fn inspect_fusion(dir: &Path) -> Result<AdapterHeader, AdapterError> {
        let config = Self::read_config(dir)?;
        let Method::Fusion { adapters, .. } = &config.method else {
            unreachable!("a setup directory reads as a fusion")
        };
        let mut bytes =
            std::fs::metadata(Self::fusion_dir(dir, adapters).join(FUSION_WEIGHTS_FILE))
                .map(|m| m.len())
                .unwrap_or(0);
        for name in adapters {
            let sub = dir.join(name);
            if sub.join(SETUP_FILE).is_file() {
                return Err(AdapterError::config(
                    dir.join(SETUP_FILE),
                    "adapter_setup.children",
                    format!("names `{name}`, itself a setup: fusions of fusions are not served"),
                ));
            }
            if !sub.is_dir() {
                return Err(AdapterError::config(
                    dir.join(SETUP_FILE),
                    "adapter_setup.children",
                    format!(
                        "names the adapter `{name}`, which is not in {}",
                        dir.display()
                    ),
                ));
            }
            bytes += Self::inspect(&sub)?.bytes;
        }
        Ok(AdapterHeader {
            dir: dir.to_path_buf(),
            config,
            modules: BTreeMap::new(),
            prompt_embeddings: None,
            bytes,
        })
    }

    fn fusion_dir(dir: &Path, adapters: &[String]) -> PathBuf {
        dir.join(adapters.join(","))
    }

    /// A fusion setup's fusion-layer weights file (`NAME,NAME/model_adapter_fusion.safetensors`).
    pub fn fusion_weights_file(&self) -> Option<PathBuf> {
        let parts = self.fusion.as_ref()?;
        let names: Vec<String> = parts
            .adapters
            .iter()
            .filter_map(|a| a.dir.file_name()?.to_str().map(str::to_string))
            .collect();
        Some(Self::fusion_dir(&self.dir, &names).join(FUSION_WEIGHTS_FILE))
    }

    /// An adapter directory's config: PEFT's, or AdapterHub's where its weights file is there.
    pub fn read_config(dir: &Path) -> Result<AdapterConfig, AdapterError> {
        if dir.join(SETUP_FILE).is_file() && !dir.join(CONFIG_FILE).is_file() {
            let setup_path = dir.join(SETUP_FILE);
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| AdapterError::Io {
                    path: p.to_path_buf(),
                    source,
                })
            };
            let setup = read(&setup_path)?;
            // The fusion layer's folder is named after the fused adapters.
            let names = AdapterConfig::adapterhub_setup_names(&setup_path, &setup)?;
            let fusion_path = Self::fusion_dir(dir, &names).join(FUSION_CONFIG_FILE);
            let fusion = read(&fusion_path)?;
            return AdapterConfig::from_adapterhub_fusion(names, &fusion_path, &fusion);
        }
        let path = dir.join(CONFIG_FILE);
        if dir.join(WEIGHTS_FILE).is_file() || !dir.join(ADAPTERHUB_WEIGHTS_FILE).is_file() {
            return AdapterConfig::from_file(&path);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| AdapterError::Io {
            path: path.clone(),
            source,
        })?;
        AdapterConfig::from_adapterhub(&path, &text)
    }

    /// Reads an adapter directory (its header is checked before any tensor is read).
    pub fn load(dir: &Path) -> Result<Self, AdapterError> {
        Self::load_tensors(Self::inspect(dir)?)
    }

    /// Reads the tensors of an adapter whose header was already read and checked.
    pub fn load_tensors(header: AdapterHeader) -> Result<Self, AdapterError> {
        if let Method::Fusion { adapters, .. } = &header.config.method {
            return Self::load_fusion(&header.dir, adapters.clone(), header.config.clone());
        }
        let AdapterHeader { dir, config, .. } = header;
        let weights = weights_file(&dir)?;
        let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| {
            AdapterError::weights(&weights, format!("not a readable safetensors file: {e}"))
        })?;
        let prompt_embeddings = tensors.remove(PROMPT_EMBEDDINGS);
        let modules = by_module(&weights, tensors)?
            .into_iter()
            .map(
                |(m, [lora_a, lora_b, magnitude, ia3, down_bias, up_bias])| {
                    (
                        m,
                        ModuleWeights {
                            lora_a,
                            lora_b,
                            magnitude,
                            ia3,
                            down_bias,
                            up_bias,
                        },
                    )
                },
            )
            .collect();
        Ok(Self {
            dir,
            config,
            modules,
            prompt_embeddings,
            fusion: None,
        })
    }

    /// The fused adapters and the fusion layers of a setup directory.
    fn load_fusion(
        dir: &Path,
        names: Vec<String>,
        config: AdapterConfig,
    ) -> Result<Self, AdapterError> {
        let adapters = names
            .iter()
            .map(|n| Self::load(&dir.join(n)))
            .collect::<Result<Vec<_>, _>>()?;
        let weights = Self::fusion_dir(dir, &names).join(FUSION_WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| {
            AdapterError::weights(&weights, format!("not a readable safetensors file: {e}"))
        })?;
        let mut parts: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        for (key, t) in tensors {
            let (place, rest) = key.split_once(".adapter_fusion_layer.").ok_or_else(|| {
                AdapterError::weights(&weights, format!("unexpected tensor `{key}`"))
            })?;
            let role = rest.split_once('.').map(|(_, r)| r).unwrap_or_default();
            parts
                .entry(place.to_string())
                .or_default()
                .insert(role.to_string(), t);
        }
        let mut layers = BTreeMap::new();
        for (place, mut p) in parts {
            let mut take = |role: &str| {
                p.remove(role).ok_or_else(|| {
                    AdapterError::weights(&weights, format!("`{place}` lacks its fusion `{role}`"))
                })
            };
            let t = FusionTensors {
                query_w: take("query.weight")?,
                query_b: take("query.bias")?,
                key_w: take("key.weight")?,
                key_b: take("key.bias")?,
                value_w: take("value.weight").ok(),
            };
            layers.insert(place, t);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            modules: BTreeMap::new(),
            prompt_embeddings: None,
            fusion: Some(Box::new(FusionParts { adapters, layers })),
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (a bottleneck
    /// adapter: AdapterHub's `adapter_config.json` and `adapter.safetensors`, as `adapters`
    /// saves them, named after `dir`).
    pub fn save(&self, dir: &Path, proj_names: &[&str]) -> Result<(), AdapterError> {
        std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if let super::config::Method::Bottleneck(bn) = &self.config.method {
            return self.save_adapterhub(dir, bn);
        }
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
            if let Some(l) = &w.ia3 {
                tensors.insert(key("ia3_l"), l.contiguous()?);
            }
        }
        if let Some(p) = &self.prompt_embeddings {
            tensors.insert(PROMPT_EMBEDDINGS.to_string(), p.contiguous()?);
        }
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
        Ok(())
    }

    /// Writes a fusion setup as AdapterHub's `save_adapter_setup` does: `adapter_setup.json`, a
    /// folder per fused adapter (AdapterHub format, named as in the setup), and
    /// `NAME,NAME/` with `adapter_fusion_config.json` (`dynamic`) and the fusion layers.
    pub fn save_fusion_setup(
        dir: &Path,
        adapters: &[(String, PeftAdapter)],
        layers: &BTreeMap<String, FusionTensors>,
        hidden: usize,
        model_name: Option<&str>,
    ) -> Result<(), AdapterError> {
        let io = |path: PathBuf| move |source| AdapterError::Io { path, source };
        let names: Vec<String> = adapters.iter().map(|(n, _)| n.clone()).collect();
        for (name, a) in adapters {
            a.save(&dir.join(name), &[])?;
        }
        let setup = serde_json::json!({
            "adapter_setup": {
                "type": "Fuse",
                "children": names.iter().map(|n| serde_json::json!({"type": "single", "children": [n]})).collect::<Vec<_>>(),
            },
            "head_setup": null,
            "version": "adapters.1.3.0",
        });
        let setup_path = dir.join(SETUP_FILE);
        std::fs::write(
            &setup_path,
            serde_json::to_string_pretty(&setup).expect("json"),
        )
        .map_err(io(setup_path.clone()))?;
        let fusion_name = names.join(",");
        let fdir = Self::fusion_dir(dir, &names);
        std::fs::create_dir_all(&fdir).map_err(io(fdir.clone()))?;
        let value = layers.values().any(|t| t.value_w.is_some());
        let config = serde_json::json!({
            "adapter_names": names,
            "config": {
                "dropout_prob": null,
                "key": true,
                "query": true,
                "query_before_ln": false,
                "regularization": value,
                "residual_before": false,
                "temperature": false,
                "value": value,
                "value_before_softmax": true,
                "value_initialized": value,
            },
            "hidden_size": hidden,
            "model_class": "LlamaForCausalLM",
            "model_name": model_name,
            "model_type": "llama",
            "name": fusion_name,
            "version": "adapters.1.3.0",
        });
        let cfg_path = fdir.join("adapter_fusion_config.json");
        std::fs::write(
            &cfg_path,
            serde_json::to_string_pretty(&config).expect("json"),
        )
        .map_err(io(cfg_path.clone()))?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (place, t) in layers {
            let key = |s: &str| format!("{place}.adapter_fusion_layer.{fusion_name}.{s}");
            tensors.insert(key("query.weight"), t.query_w.contiguous()?);
            tensors.insert(key("query.bias"), t.query_b.contiguous()?);
            tensors.insert(key("key.weight"), t.key_w.contiguous()?);
            tensors.insert(key("key.bias"), t.key_b.contiguous()?);
            if let Some(v) = &t.value_w {
                tensors.insert(key("value.weight"), v.contiguous()?);
            }
        }
        candle_core::safetensors::save(&tensors, fdir.join(FUSION_WEIGHTS_FILE))?;
        Ok(())
    }

    fn save_adapterhub(
        &self,
        dir: &Path,
        bn: &super::config::BnConfig,
    ) -> Result<(), AdapterError> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .unwrap_or("adapter");
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let (mut hidden, mut r, mut places) = (0, 0, Vec::new());
        for (module, w) in &self.modules {
            let key = |s: &str| format!("{module}.adapters.{name}.{s}");
            let (Some(d), Some(u), Some(db), Some(ub)) =
                (&w.lora_a, &w.lora_b, &w.down_bias, &w.up_bias)
            else {
                return Err(AdapterError::Module {
                    path: dir.join(ADAPTERHUB_WEIGHTS_FILE),
                    module: module.clone(),
                    problem: "a bottleneck module needs down and up weights and biases".into(),
                });
            };
            (r, hidden) = d.dims2()?;
            let place = usize::from(module.ends_with(".output_adapters"));
            if !places.contains(&place) {
                places.push(place);
            }
            tensors.insert(key("adapter_down.0.weight"), d.contiguous()?);
            tensors.insert(key("adapter_down.0.bias"), db.contiguous()?);
            tensors.insert(key("adapter_up.weight"), u.contiguous()?);
            tensors.insert(key("adapter_up.bias"), ub.contiguous()?);
        }
        let cfg_path = dir.join(CONFIG_FILE);
        let json = bn.to_adapterhub_json(
            name,
            hidden,
            r,
            &places,
            self.config.base_model_name_or_path.as_deref(),
        );
        let text = serde_json::to_string_pretty(&json).expect("config serializes");
        std::fs::write(&cfg_path, text).map_err(|source| AdapterError::Io {
            path: cfg_path,
            source,
        })?;
        candle_core::safetensors::save(&tensors, dir.join(ADAPTERHUB_WEIGHTS_FILE))?;
        Ok(())
    }

    /// On-disk size of the weights (a first estimate of resident bytes).
    pub fn weight_bytes(&self) -> usize {
        self.modules
            .values()
            .flat_map(|m| [&m.lora_a, &m.lora_b, &m.magnitude, &m.ia3])
            .chain([&self.prompt_embeddings])
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
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.down_proj.ia3_l"),
            Some(("model.layers.0.mlp.down_proj".to_string(), "I"))
        );
        assert_eq!(parse_key("base_model.model.lm_head.weight"), None);
    }
}
