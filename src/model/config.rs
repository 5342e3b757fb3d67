//! Decoder hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata. One
//! decoder serves every supported family; what sets a family apart is data here (`Arch`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::error::ModelError;
use crate::ops::rope::{Llama3Scaling, LongRope};

/// The families the decoder serves (`model_type` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    #[default]
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    /// Gemma 3's text model (`gemma3_text`; Gemma-3-1B, and the text part of the larger ones).
    Gemma3,
    /// Phi-3: q, k, v stored as one `qkv_proj`, gate and up as one `gate_up_proj`.
    Phi3,
}

impl Family {
    pub const SUPPORTED: &'static str =
        "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3 (its text model), phi3";

    pub fn from_model_type(t: &str) -> Option<Self> {
        Some(match t {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma2" => Self::Gemma2,
            "gemma3_text" => Self::Gemma3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3_text",
            Self::Phi3 => "phi3",
        }
    }

    /// Gemma's conventions (`1 + w` norms, scaled embeddings, sandwich norms, GeGLU).
    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }
}

/// What a family changes in the one decoder (all off: the Llama).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Arch {
    pub family: Family,
    /// Biases on q, k and v only (Qwen2); `attention_bias` puts them on all four.
    pub qkv_bias: bool,
    /// RMSNorm over each head of q and of k before RoPE (`q_norm`, `k_norm`: Qwen3).
    pub qk_norm: bool,
    /// Per layer, the sliding window in positions (a query sees itself and the `w - 1`
    /// positions before it); empty or `None`: the whole context.
    pub windows: Vec<Option<usize>>,
    /// Norm weights stored as `w` and applied as `1 + w` (Gemma); the loader adds the one.
    pub norm_plus_one: bool,
    /// Token embeddings multiplied by this (Gemma: `sqrt(hidden_size)`).
    pub embed_scale: Option<f32>,
    /// RMSNorms on the attention output and on the MLP output before each residual add
    /// (Gemma 2: `post_attention_layernorm` and `post_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// The MLP's gate activation.
    pub activation: Activation,
    /// The softmax scale `1 / sqrt(query_pre_attn_scalar)` where it is not `1 / sqrt(head_dim)`.
    pub attn_scale: Option<f32>,
    /// Attention scores soft-capped: `cap · tanh(s / cap)` (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Final logits soft-capped likewise (Gemma 2).
    pub final_softcap: Option<f32>,
    /// RoPE base of the sliding-window layers where it differs (Gemma 3's local base).
    pub local_rope_theta: Option<f64>,
    /// Linear RoPE scaling (positions divided by this) of the full-attention layers (Gemma 3).
    pub rope_linear: Option<f64>,
    /// q, k, v stored as one `self_attn.qkv_proj` and gate, up as one `mlp.gate_up_proj`
    /// (Phi-3): split into the seven projections at load, adapters on the fused modules split
    /// by rows (`adapters::bind`), written fused again on export.
    pub fused: bool,
    /// Phi-3's LongRoPE (`rope_type: longrope`, also `su` and `yarn` as transformers reads Phi-3).
    pub longrope: Option<LongRope>,
    /// Dimensions of each head that RoPE turns where not all (`partial_rotary_factor`, Phi-3
    /// configs such as Phi-4-mini's 0.75): the first ones, the rest pass.
    pub rotary_dim: Option<usize>,
}

/// The MLP's gate activation (`hidden_act` / `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`): GeGLU.
    GeluTanh,
}

impl Arch {
    /// What the family fixes, whatever file it is read from (`config.json` or GGUF): biases,
    /// norms, embedding scale, fused projections; the rest off, for the reader to set.
    pub fn of_family(
        family: Family,
        hidden_size: usize,
        windows: Vec<Option<usize>>,
        activation: Activation,
    ) -> Self {
        let gemma = family.is_gemma();
        Self {
            family,
            qkv_bias: family == Family::Qwen2,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            windows,
            norm_plus_one: gemma,
            embed_scale: gemma.then(|| (hidden_size as f32).sqrt()),
            sandwich_norms: gemma,
            activation,
            fused: family == Family::Phi3,
            ..Self::default()
        }
    }

    /// Layer `layer`'s sliding window, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.windows.get(layer).copied().flatten()
    }
}

/// Validated architecture of a decoder model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub arch: Arch,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    rope_local_base_freq: Option<f64>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

/// Token ids given as a number or a list of numbers (`eos_token_id` takes both forms).
pub fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// An optional positive number (`None` stays `None`).
fn positive(path: &Path, field: &str, value: Option<f64>) -> Result<Option<f32>, ModelError> {
    match value {
        Some(v) if v > 0.0 && v.is_finite() => Ok(Some(v as f32)),
        Some(_) => Err(ModelError::field(path, field, "must be positive")),
        None => Ok(None),
    }
}

fn required(path: &Path, field: &str, value: Option<usize>) -> Result<usize, ModelError> {
    match value {
        Some(v) if v > 0 => Ok(v),
        Some(_) => Err(ModelError::field(path, field, "must be positive")),
        None => Err(ModelError::field(path, field, "is missing")),
    }
}

/// The factor of a `linear` RoPE scaling block (`None` for any other type).
fn linear_factor(path: &Path, field: &str, v: &Value) -> Result<Option<f64>, ModelError> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str);
    if kind != Some("linear") {
        return Ok(None);
    }
    match v.get("factor").and_then(Value::as_f64) {
        Some(f) if f > 0.0 => Ok(Some(f)),
        _ => Err(ModelError::field(
            path,
            &format!("{field}.factor"),
            "must be a positive number for rope_type linear",
        )),
    }
}

fn parse_llama3_scaling(
    path: &Path,
    field: &str,
    v: &Value,
) -> Result<Option<Llama3Scaling>, ModelError> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let num = |key: &str| {
                v.get(key).and_then(Value::as_f64).ok_or_else(|| {
                    ModelError::field(
                        path,
                        &format!("{field}.{key}"),
                        "is missing for rope_type llama3",
                    )
                })
            };
            Ok(Some(Llama3Scaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }))
        }
        other => Err(ModelError::field(
            path,
            &format!("{field}.rope_type"),
            format!("`{other}` is not supported (default and llama3 are)"),
        )),
    }
}

impl LlamaConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_json(path, &text)
    }

    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self, ModelError> {
        if let Some(text) = multimodal_text_config(path, text)? {
            return Self::from_hf_json(path, &text);
        }
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let family = match raw.model_type.as_deref() {
            Some(t) => Family::from_model_type(t),
            None if raw
                .architectures
                .iter()
                .flatten()
                .any(|a| a == "LlamaForCausalLM") =>
            {
                Some(Family::Llama)
            }
            None => None,
        };
        let Some(family) = family else {
            return Err(ModelError::field(
                path,
                "model_type",
                format!(
                    "is {:?}; the supported families are {}",
                    raw.model_type.as_deref().unwrap_or("missing"),
                    Family::SUPPORTED
                ),
            ));
        };
        let (act_field, act) = match (&raw.hidden_activation, &raw.hidden_act) {
            (Some(a), _) => ("hidden_activation", a.as_str()),
            (None, Some(a)) => ("hidden_act", a.as_str()),
            (None, None) if family.is_gemma() => ("hidden_activation", "gelu_pytorch_tanh"),
            (None, None) => ("hidden_act", "silu"),
        };
        let activation = match act {
            "silu" => Activation::Silu,
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => {
                return Err(ModelError::field(
                    path,
                    act_field,
                    format!("is `{other}`; supported: silu, gelu_pytorch_tanh"),
                ))
            }
        };
        let hidden_size = required(path, "hidden_size", raw.hidden_size)?;
        let heads = required(path, "num_attention_heads", raw.num_attention_heads)?;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(ModelError::field(
                path,
                "num_key_value_heads",
                format!("({kv_heads}) must divide num_attention_heads ({heads})"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if hidden_size % heads == 0 => hidden_size / heads,
            None => {
                return Err(ModelError::field(
                    path,
                    "hidden_size",
                    "is not divisible by num_attention_heads",
                ))
            }
        };
        // Gemma 3: one RoPE for the full-attention layers, another for the sliding ones.
        let per_layer_type = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("full_attention"))
            .is_some();
        let mut rope_linear = None;
        let mut local_rope_theta = raw.rope_local_base_freq;
        let rotary_dim = rotary_dim(path, family, &raw, head_dim)?;
        let longrope = match family {
            Family::Phi3 => parse_longrope(path, &raw, rotary_dim.unwrap_or(head_dim))?,
            _ => None,
        };
        let (rope_theta, rope_scaling) = match (&raw.rope_parameters, &raw.rope_scaling) {
            (p, _) if longrope.is_some() => (
                p.as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
                    .or(raw.rope_theta)
                    .unwrap_or(10000.0),
                None,
            ),
            (Some(p), _) if per_layer_type => {
                let full = &p["full_attention"];
                if let Some(local) = p.get("sliding_attention") {
                    local_rope_theta = local.get("rope_theta").and_then(Value::as_f64);
                    if linear_factor(path, "rope_parameters.sliding_attention", local)?.is_some() {
                        return Err(ModelError::field(
                            path,
                            "rope_parameters.sliding_attention.rope_type",
                            "only `default` is supported for the sliding layers",
                        ));
                    }
                }
                rope_linear = linear_factor(path, "rope_parameters.full_attention", full)?;
                (
                    full.get("rope_theta")
                        .and_then(Value::as_f64)
                        .or(raw.rope_theta)
                        .unwrap_or(10000.0),
                    match rope_linear {
                        Some(_) => None,
                        None => parse_llama3_scaling(path, "rope_parameters.full_attention", full)?,
                    },
                )
            }
            (None, Some(s))
                if !s.is_null() && linear_factor(path, "rope_scaling", s)?.is_some() =>
            {
                rope_linear = linear_factor(path, "rope_scaling", s)?;
                (raw.rope_theta.unwrap_or(10000.0), None)
            }
            (Some(p), _) => (
                p.get("rope_theta")
                    .and_then(Value::as_f64)
                    .or(raw.rope_theta)
                    .unwrap_or(10000.0),
                parse_llama3_scaling(path, "rope_parameters", p)?,
            ),
            (None, Some(s)) if !s.is_null() => (
                raw.rope_theta.unwrap_or(10000.0),
                parse_llama3_scaling(path, "rope_scaling", s)?,
            ),
            _ => (raw.rope_theta.unwrap_or(10000.0), None),
        };
        let layers = required(path, "num_hidden_layers", raw.num_hidden_layers)?;
        let gemma = family.is_gemma();
        let windows = layer_windows(path, family, &raw, layers)?;
        let config = Self {
            vocab_size: required(path, "vocab_size", raw.vocab_size)?,
            hidden_size,
            intermediate_size: required(path, "intermediate_size", raw.intermediate_size)?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(family.is_gemma()),
            attention_bias: raw.attention_bias.unwrap_or(false),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            arch: Arch {
                attn_scale: match (gemma, raw.query_pre_attn_scalar) {
                    // The default scale, said explicitly (Gemma 2 2B/9B: 256 = head_dim).
                    (true, Some(s)) if s == head_dim as f64 => None,
                    (true, Some(s)) if s > 0.0 => Some((1.0 / s.sqrt()) as f32),
                    (true, Some(_)) => {
                        return Err(ModelError::field(
                            path,
                            "query_pre_attn_scalar",
                            "must be positive",
                        ))
                    }
                    _ => None,
                },
                attn_softcap: if gemma {
                    positive(path, "attn_logit_softcapping", raw.attn_logit_softcapping)?
                } else {
                    None
                },
                final_softcap: if gemma {
                    positive(path, "final_logit_softcapping", raw.final_logit_softcapping)?
                } else {
                    None
                },
                local_rope_theta: local_rope_theta.filter(|_| family == Family::Gemma3),
                rope_linear,
                longrope,
                rotary_dim,
                ..Arch::of_family(family, hidden_size, windows, activation)
            },
        };
        Ok(config)
    }
}

/// The dimensions RoPE turns where `partial_rotary_factor` says fewer than the head's (Phi-3
/// only: the other families' transformers classes turn the whole head whatever it says).
fn rotary_dim(
    path: &Path,
    family: Family,
    raw: &RawConfig,
    head_dim: usize,
) -> Result<Option<usize>, ModelError> {
    let partial = raw
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(Value::as_f64)
        .or(raw.partial_rotary_factor)
        .unwrap_or(1.0);
    if partial == 1.0 {
        return Ok(None);
    }
    // transformers: `int(head_dim * partial_rotary_factor)`.
    let dim = (head_dim as f64 * partial) as usize;
    if family != Family::Phi3 {
        return Err(ModelError::field(
            path,
            "partial_rotary_factor",
            format!(
                "is {partial}; only 1.0 (RoPE over the whole head) is supported for {}",
                family.model_type()
            ),
        ));
    }
    if !(0.0..1.0).contains(&partial) || dim == 0 || dim % 2 != 0 {
        return Err(ModelError::field(
            path,
            "partial_rotary_factor",
            format!(
                "is {partial}: {dim} of a head's {head_dim} dimensions, not an even number above 0"
            ),
        ));
    }
    Ok(Some(dim))
}

/// Phi-3's LongRoPE, where its RoPE block (`rope_parameters`, or the older `rope_scaling`) says
/// `longrope` (or `su` / `yarn`, which transformers reads as it for Phi-3): one short and one
/// long factor per frequency, the pretraining context (`original_max_position_embeddings`), and
/// the cos/sin factor (`attention_factor`, else `sqrt(1 + ln f / ln original)` for `f` the
/// context over the original one, as transformers computes it).
fn parse_longrope(
    path: &Path,
    raw: &RawConfig,
    rotary_dim: usize,
) -> Result<Option<LongRope>, ModelError> {
    let (field, block) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p), _) => ("rope_parameters", p),
        (None, Some(s)) if !s.is_null() => ("rope_scaling", s),
        _ => return Ok(None),
    };
    let kind = block
        .get("rope_type")
        .or_else(|| block.get("type"))
        .and_then(Value::as_str);
    if !matches!(kind, Some("longrope" | "su" | "yarn")) {
        return Ok(None);
    }
    let factors = |key: &str| -> Result<Vec<f64>, ModelError> {
        let list: Option<Vec<f64>> = block
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .unwrap_or(None);
        match list {
            Some(l) if l.len() == rotary_dim / 2 && l.iter().all(|f| *f > 0.0) => Ok(l),
            _ => Err(ModelError::field(
                path,
                &format!("{field}.{key}"),
                format!(
                    "must list {} positive numbers, one per rotary frequency",
                    rotary_dim / 2
                ),
            )),
        }
    };
    let max = raw.max_position_embeddings.unwrap_or(2048);
    let original = block
        .get("original_max_position_embeddings")
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .or(raw.original_max_position_embeddings)
        .unwrap_or(max);
    if original == 0 {
        return Err(ModelError::field(
            path,
            "original_max_position_embeddings",
            "must be positive",
        ));
    }
    let factor = block
        .get("factor")
        .and_then(Value::as_f64)
        .unwrap_or(max as f64 / original as f64);
    let attention_factor = match block.get("attention_factor").and_then(Value::as_f64) {
        Some(a) if a > 0.0 && a.is_finite() => a,
        Some(_) => {
            return Err(ModelError::field(
                path,
                &format!("{field}.attention_factor"),
                "must be a positive number",
            ))
        }
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(Some(LongRope {
        short: factors("short_factor")?,
        long: factors("long_factor")?,
        original_max: original,
        attention_factor,
    }))
}

/// Gemma 3's multimodal checkpoints (`model_type: gemma3`, `Gemma3ForConditionalGeneration`):
/// the text model's config (`text_config`, as `gemma3_text`, with the top level's token ids and
/// tying where it leaves them out), which is what is served; `None` for any other config.
fn multimodal_text_config(path: &Path, text: &str) -> Result<Option<String>, ModelError> {
    let v: Value = serde_json::from_str(text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    if v.get("model_type").and_then(Value::as_str) != Some("gemma3") {
        return Ok(None);
    }
    let Some(Value::Object(inner)) = v.get("text_config") else {
        return Err(ModelError::field(
            path,
            "text_config",
            "is missing: a `gemma3` (multimodal) config holds its text model there",
        ));
    };
    let mut inner = inner.clone();
    inner.insert("model_type".into(), "gemma3_text".into());
    for key in ["tie_word_embeddings", "bos_token_id", "eos_token_id"] {
        if let (false, Some(top)) = (inner.contains_key(key), v.get(key)) {
            inner.insert(key.into(), top.clone());
        }
    }
    Ok(Some(Value::Object(inner).to_string()))
}

/// Each layer's sliding window as transformers reads the config: Mistral's `sliding_window` on
/// every layer; Qwen's `layer_types` (`sliding_attention`), or without them the layers from
/// `max_window_layers` on when `use_sliding_window`.
fn layer_windows(
    path: &Path,
    family: Family,
    raw: &RawConfig,
    layers: usize,
) -> Result<Vec<Option<usize>>, ModelError> {
    let w = match (family, raw.sliding_window) {
        (_, Some(0)) => {
            return Err(ModelError::field(
                path,
                "sliding_window",
                "must be positive",
            ))
        }
        (Family::Llama, _) | (_, None) => return Ok(Vec::new()),
        (_, Some(w)) => w,
    };
    if matches!(family, Family::Mistral | Family::Phi3) {
        return Ok(vec![Some(w); layers]);
    }
    if family == Family::Gemma2 && raw.layer_types.is_none() {
        // Gemma 2's default: every other layer, from the first, slides.
        return Ok((0..layers).map(|i| (i % 2 == 0).then_some(w)).collect());
    }
    if family == Family::Gemma3 && raw.layer_types.is_none() {
        // Gemma 3's default: five sliding layers, then a full one.
        return Ok((0..layers)
            .map(|i| ((i + 1) % 6 != 0).then_some(w))
            .collect());
    }
    if let Some(types) = &raw.layer_types {
        if types.len() != layers {
            return Err(ModelError::field(
                path,
                "layer_types",
                format!("has {} entries for {layers} layers", types.len()),
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(Some(w)),
                "full_attention" => Ok(None),
                other => Err(ModelError::field(
                    path,
                    "layer_types",
                    format!(
                        "`{other}` is not a layer type here (full_attention, sliding_attention)"
                    ),
                )),
            })
            .collect();
    }
    if !raw.use_sliding_window.unwrap_or(false) {
        return Ok(Vec::new());
    }
    let from = raw.max_window_layers.unwrap_or(0);
    Ok((0..layers).map(|i| (i >= from).then_some(w)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"model_type":"llama","vocab_size":512,"hidden_size":64,
        "intermediate_size":176,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"head_dim":16,"rms_norm_eps":1e-5,
        "rope_parameters":{"rope_theta":10000.0,"rope_type":"default"},"eos_token_id":2}"#;

    #[test]
    fn reads_transformers5_rope_parameters() {
        let c = LlamaConfig::from_hf_json(Path::new("config.json"), TINY).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn reads_llama3_scaling() {
        let text = TINY.replace(
            r#""rope_parameters":{"rope_theta":10000.0,"rope_type":"default"}"#,
            r#""rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
               "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        let c = LlamaConfig::from_hf_json(Path::new("config.json"), &text).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling.unwrap().factor, 8.0);
    }

    #[test]
    fn rejects_other_architectures_naming_the_field() {
        let text = TINY.replace(r#""model_type":"llama""#, r#""model_type":"gpt2""#);
        let err = LlamaConfig::from_hf_json(Path::new("/m/config.json"), &text).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/m/config.json")
                && msg.contains("`model_type`")
                && msg.contains("gpt2")
                && msg.contains("llama, mistral, qwen2, qwen3"),
            "{msg}"
        );
    }

    /// What a family's config may say that the decoder does not do: refused naming the field.
    #[test]
    fn unsupported_family_settings_are_named() {
        // `t`'s config with `extra` fields first.
        let with = |t: &str, extra: &str| {
            TINY.replace(r#""model_type":"llama""#, &format!(r#""model_type":"{t}""#))
                .replacen('{', &format!("{{{extra}"), 1)
        };
        let cases = [
            (
                with("llama", r#""partial_rotary_factor":0.5,"#),
                "partial_rotary_factor",
            ),
            (
                with("phi3", r#""partial_rotary_factor":0.1,"#),
                "partial_rotary_factor",
            ),
            (
                with("phi3", "").replace(r#""rope_type":"default""#, r#""rope_type":"longrope""#),
                "rope_parameters.short_factor",
            ),
            (
                with("llama", "").replace(r#""rope_type":"default""#, r#""rope_type":"longrope""#),
                "rope_parameters.rope_type",
            ),
            (
                with("phi3", "").replace(
                    r#""rope_type":"default""#,
                    r#""rope_type":"longrope","short_factor":[1,1,1,1,1,1,1,1],"long_factor":[2,2,2,2,2,2,2,2],"attention_factor":-1"#,
                ),
                "rope_parameters.attention_factor",
            ),
            (
                with(
                    "qwen2",
                    r#""sliding_window":4,"layer_types":["full_attention"],"#,
                ),
                "layer_types",
            ),
            (
                with(
                    "qwen2",
                    r#""sliding_window":4,"layer_types":["full_attention","chunked_attention"],"#,
                ),
                "layer_types",
            ),
            (with("mistral", r#""sliding_window":0,"#), "sliding_window"),
            (
                with("gemma2", r#""hidden_activation":"relu","#),
                "hidden_activation",
            ),
            (
                with("gemma2", r#""query_pre_attn_scalar":-1,"#),
                "query_pre_attn_scalar",
            ),
            (
                with("llama", "")
                    .replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#),
                "num_key_value_heads",
            ),
        ];
        for (text, field) in cases {
            let msg = LlamaConfig::from_hf_json(Path::new("/m/config.json"), &text)
                .err()
                .unwrap_or_else(|| panic!("accepted: {text}"))
                .to_string();
            assert!(
                msg.contains("/m/config.json") && msg.contains(&format!("`{field}`")),
                "{field}: {msg}"
            );
        }
    }

    #[test]
    fn missing_field_is_named() {
        let text = TINY.replace(r#""hidden_size":64,"#, "");
        let msg = LlamaConfig::from_hf_json(Path::new("config.json"), &text)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`hidden_size` is missing"), "{msg}");
    }
}
