//! PEFT `adapter_config.json`: which modules an adapter targets, with which rank, alpha and
//! scaling. Unknown keys are ignored; options that would change the numbers and are not
//! supported are refused by name.

use std::path::Path;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::AdapterError;

/// `target_modules`: a list of module names (suffix match), a regex (full match), or
/// `"all-linear"`.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
    AllLinear,
}

/// Which PEFT method an adapter is.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// LoRA (with optional DoRA, rsLoRA, patterns).
    Lora,
    /// IA³: learned vectors scaling the targeted modules' outputs, or the inputs of the
    /// `feedforward_modules` among them.
    Ia3 { feedforward_modules: TargetModules },
    /// Prefix tuning: `num_virtual_tokens` trained key/value rows at every layer, attended to
    /// before the prompt (the stored `prompt_embeddings` are those rows, after any projection).
    PrefixTuning { num_virtual_tokens: usize },
    /// Prompt tuning: `num_virtual_tokens` trained input embeddings before the prompt.
    PromptTuning { num_virtual_tokens: usize },
    /// A bottleneck adapter in AdapterHub's format (`adapters` 1.3.0: `seq_bn`,
    /// `double_seq_bn`, `par_bn` and the options they set).
    Bottleneck(BnConfig),
    /// AdapterHub's AdapterFusion (`Fuse`) over the named bottleneck adapters; `value`: the
    /// fusion layer has a value matrix (`dynamic`) or not (`static`).
    Fusion { adapters: Vec<String>, value: bool },
}

/// What a bottleneck adapter's configuration decides, as AdapterHub's `adapters` runs it on
/// Llama (whose adapter layers get no layer norm).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BnConfig {
    pub input: crate::model::BnInput,
    pub act: crate::model::BnActivation,
    pub scaling: f64,
}

impl BnConfig {
    /// Reads AdapterHub's `adapter_config.json` (`{"config": {...}}`); options whose numbers we
    /// do not reproduce are refused by name.
    pub fn from_adapterhub(path: &Path, v: &Value) -> Result<Self, AdapterError> {
        use crate::model::{BnActivation, BnInput};
        let c = v.get("config").filter(|c| c.is_object()).ok_or_else(|| {
            AdapterError::config(path, "config", "is missing (AdapterHub format)")
        })?;
        let bad = |field: &str, problem: &str| {
            AdapterError::config(path, &format!("config.{field}"), problem)
        };
        let flag = |k: &str| c.get(k).and_then(Value::as_bool).unwrap_or(false);
        for k in [
            "ln_before",
            "ln_after",
            "use_gating",
            "phm_layer",
            "adapter_residual_before_ln",
        ] {
            if flag(k) {
                return Err(bad(
                    k,
                    "is true; not supported (supported: seq_bn, double_seq_bn, par_bn)",
                ));
            }
        }
        if c.get("architecture")
            .and_then(Value::as_str)
            .is_some_and(|a| a != "bottleneck")
        {
            return Err(bad(
                "architecture",
                "is not `bottleneck`; only bottleneck adapters are read in AdapterHub format",
            ));
        }
        if !flag("original_ln_after") {
            return Err(bad("original_ln_after", "is false; not supported"));
        }
        let input = if flag("is_parallel") {
            BnInput::BeforeSublayer
        } else if c.get("residual_before_ln") != Some(&Value::Bool(true)) {
            return Err(bad(
                "residual_before_ln",
                "must be true for a sequential adapter",
            ));
        } else if flag("original_ln_before") {
            BnInput::AfterResidual
        } else {
            BnInput::SublayerOutput
        };
        let act = match c
            .get("non_linearity")
            .and_then(Value::as_str)
            .map(str::to_lowercase)
            .as_deref()
        {
            Some("relu") => BnActivation::Relu,
            Some("swish" | "silu") => BnActivation::Silu,
            other => {
                return Err(bad(
                    "non_linearity",
                    &format!("is {other:?}; supported: relu, swish/silu"),
                ))
            }
        };
        let scaling = c.get("scaling").and_then(Value::as_f64).ok_or_else(|| {
            bad(
                "scaling",
                "must be a number (learned scalings are not supported)",
            )
        })?;
        Ok(Self {
            input,
            act,
            scaling,
        })
    }
}

/// The three AdapterHub presets `serve train --bn-config` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnKind {
    /// `seq_bn` (Pfeiffer): after the MLP, reading the residual stream; ReLU; reduction 16.
    Seq,
    /// `double_seq_bn` (Houlsby): after attention and after the MLP, reading the sublayer's
    /// output; swish; reduction 16.
    Double,
    /// `par_bn`: beside the MLP, reading its input; ReLU; scaling 4; reduction 2.
    Parallel,
}

impl BnKind {
    pub fn config(self) -> BnConfig {
        use crate::model::{BnActivation, BnInput};
        match self {
            Self::Seq => BnConfig {
                input: BnInput::AfterResidual,
                act: BnActivation::Relu,
                scaling: 1.0,
            },
            Self::Double => BnConfig {
                input: BnInput::SublayerOutput,
                act: BnActivation::Silu,
                scaling: 1.0,
            },
            Self::Parallel => BnConfig {
                input: BnInput::BeforeSublayer,
                act: BnActivation::Relu,
                scaling: 4.0,
            },
        }
    }

    /// Places it takes in each layer (0: after attention, 1: after the MLP).
    pub fn places(self) -> &'static [usize] {
        match self {
            Self::Double => &[0, 1],
            Self::Seq | Self::Parallel => &[1],
        }
    }

    pub fn default_reduction_factor(self) -> usize {
        match self {
            Self::Parallel => 2,
            Self::Seq | Self::Double => 16,
        }
    }
}

impl BnConfig {
    /// AdapterHub's `adapter_config.json` for this adapter as `adapters` 1.3.0 writes it: `r` its
    /// bottleneck width, `places` those it takes (0: after attention, 1: after the MLP).
    pub fn to_adapterhub_json(
        &self,
        name: &str,
        hidden: usize,
        r: usize,
        places: &[usize],
        model_name: Option<&str>,
    ) -> Value {
        use crate::model::{BnActivation, BnInput};
        let parallel = self.input == BnInput::BeforeSublayer;
        let reduction = if r > 0 && hidden % r == 0 {
            serde_json::json!(hidden / r)
        } else {
            serde_json::json!(hidden as f64 / r.max(1) as f64)
        };
        serde_json::json!({
            "config": {
                "adapter_residual_before_ln": false,
                "cross_adapter": false,
                "dropout": 0.0,
                "factorized_phm_W": true,
                "factorized_phm_rule": false,
                "hypercomplex_nonlinearity": "glorot-uniform",
                "init_weights": if parallel { "mam_adapter" } else { "bert" },
                "init_weights_seed": null,
                "inv_adapter": null,
                "inv_adapter_reduction_factor": null,
                "is_parallel": parallel,
                "learn_phm": true,
                "leave_out": [],
                "ln_after": false,
                "ln_before": false,
                "mh_adapter": places.contains(&0),
                "non_linearity": match self.act {
                    BnActivation::Relu => "relu",
                    BnActivation::Silu => "swish",
                },
                "original_ln_after": true,
                "original_ln_before": self.input == BnInput::AfterResidual,
                "output_adapter": places.contains(&1),
                "phm_bias": true,
                "phm_c_init": "normal",
                "phm_dim": 4,
                "phm_init_range": 0.0001,
                "phm_layer": false,
                "phm_rank": 1,
                "reduction_factor": reduction,
                "residual_before_ln": true,
                "scaling": self.scaling,
                "shared_W_phm": false,
                "shared_phm_rule": true,
                "stochastic_depth": 0.0,
                "use_gating": false
            },
            "hidden_size": hidden,
            "model_class": "LlamaForCausalLM",
            "model_name": model_name,
            "model_type": "llama",
            "name": name,
            "version": "adapters.1.3.0"
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub method: Method,
    /// LoRA's rank (0 for IA³).
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub lora_dropout: f64,
    pub layers_to_transform: Option<Vec<usize>>,
    pub base_model_name_or_path: Option<String>,
    /// Prefix tuning trained through PEFT's projection MLP (`prefix_projection`): the encoder's
    /// hidden size. The weights file holds the projected rows either way, as PEFT saves them.
    pub prefix_encoder_hidden: Option<usize>,
}

#[derive(Deserialize, Serialize, Default)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<Value>,
    lora_alpha: Option<Value>,
    target_modules: Option<Value>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Map<String, Value>>,
    lora_dropout: Option<f64>,
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    feedforward_modules: Option<Value>,
    num_virtual_tokens: Option<Value>,
    modules_to_save: Option<Value>,
    layers_to_transform: Option<Value>,
    base_model_name_or_path: Option<String>,
}

/// Keys of a pattern map in file order (`serde_json` built with `preserve_order`): PEFT takes
/// the first matching key.
fn ordered(map: Option<serde_json::Map<String, Value>>) -> Vec<(String, Value)> {
    map.unwrap_or_default().into_iter().collect()
}

impl AdapterConfig {
    pub fn from_file(path: &Path) -> Result<Self, AdapterError> {
        let text = std::fs::read_to_string(path).map_err(|source| AdapterError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(path, &text)
    }

    /// The adapters an AdapterHub setup (`adapter_setup.json`) fuses: a `Fuse` of two or more
    /// single adapters with plain names (they are its subfolders: no `..`, `/`, `.`).
    pub fn adapterhub_setup_names(
        setup_path: &Path,
        setup: &str,
    ) -> Result<Vec<String>, AdapterError> {
        let v: Value = serde_json::from_str(setup).map_err(|e| {
            AdapterError::config(setup_path, "(file)", format!("is not valid JSON: {e}"))
        })?;
        let s = &v["adapter_setup"];
        if s["type"] != "Fuse" {
            return Err(AdapterError::config(
                setup_path,
                "adapter_setup.type",
                format!("is {}; only a Fuse of single adapters is served", s["type"]),
            ));
        }
        let adapters = s["children"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|child| match (&child["type"], &child["children"]) {
                        (t, Value::Array(names)) if t == "single" && names.len() == 1 => {
                            names[0].as_str().map(str::to_string)
                        }
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .flatten()
            .filter(|a| a.len() >= 2)
            .ok_or_else(|| {
                AdapterError::config(
                    setup_path,
                    "adapter_setup.children",
                    "must name two or more single adapters",
                )
            })?;
        // The names become subfolders of the setup: plain names only (no `..`, `/`, `.`).
        for name in &adapters {
            super::registry::valid_part(name).map_err(|reason| {
                AdapterError::config(
                    setup_path,
                    "adapter_setup.children",
                    format!("names `{name}`: {reason}"),
                )
            })?;
        }
        Ok(adapters)
    }

    /// An AdapterHub fusion of `adapters` (from `adapterhub_setup_names`) and its layer's config
    /// (`adapter_fusion_config.json`): a value matrix or not. Fusion options whose numbers we do
    /// not reproduce are refused by name.
    pub fn from_adapterhub_fusion(
        adapters: Vec<String>,
        fusion_path: &Path,
        fusion: &str,
    ) -> Result<Self, AdapterError> {
        let f: Value = serde_json::from_str(fusion).map_err(|e| {
            AdapterError::config(fusion_path, "(file)", format!("is not valid JSON: {e}"))
        })?;
        let c = &f["config"];
        let bad = |k: &str, p: &str| AdapterError::config(fusion_path, &format!("config.{k}"), p);
        for (k, want) in [
            ("key", true),
            ("query", true),
            ("query_before_ln", false),
            ("residual_before", false),
            ("temperature", false),
            ("value_before_softmax", true),
        ] {
            if c.get(k).and_then(Value::as_bool) != Some(want) {
                return Err(bad(
                    k,
                    &format!("must be {want} (the dynamic and static fusions)"),
                ));
            }
        }
        let value = c.get("value").and_then(Value::as_bool).unwrap_or(false);
        Ok(Self::of(
            Method::Fusion { adapters, value },
            TargetModules::List(Vec::new()),
            f.get("model_name")
                .and_then(Value::as_str)
                .map(str::to_string),
        ))
    }

    /// A config of `method` (not LoRA: its rank and alpha fields are zero) on `target_modules`.
    pub fn of(
        method: Method,
        target_modules: TargetModules,
        base_model_name_or_path: Option<String>,
    ) -> Self {
        Self {
            method,
            r: 0,
            lora_alpha: 0.0,
            target_modules,
            use_rslora: false,
            use_dora: false,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            lora_dropout: 0.0,
            layers_to_transform: None,
            base_model_name_or_path,
            prefix_encoder_hidden: None,
        }
    }

    /// An AdapterHub bottleneck adapter's config as an `AdapterConfig`.
    pub fn from_adapterhub(path: &Path, text: &str) -> Result<Self, AdapterError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| AdapterError::config(path, "(file)", format!("is not valid JSON: {e}")))?;
        Ok(Self::of(
            Method::Bottleneck(BnConfig::from_adapterhub(path, &v)?),
            TargetModules::List(Vec::new()),
            v.get("model_name")
                .and_then(Value::as_str)
                .map(str::to_string),
        ))
    }

    pub fn from_json(path: &Path, text: &str) -> Result<Self, AdapterError> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| AdapterError::config(path, "(file)", format!("is not valid JSON: {e}")))?;
        let bad = |field: &str, problem: &str| AdapterError::config(path, field, problem);
        let modules = |field: &str, v: &Option<Value>| -> Result<TargetModules, AdapterError> {
            Ok(match v {
                Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
                Some(Value::String(s)) => {
                    Regex::new(&format!("^(?:{s})$"))
                        .map_err(|e| bad(field, &format!("is not a valid regex: {e}")))?;
                    TargetModules::Regex(s.clone())
                }
                Some(Value::Array(items)) => TargetModules::List(
                    items
                        .iter()
                        .map(|v| v.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| bad(field, "must be a list of strings"))?,
                ),
                _ => {
                    return Err(bad(
                        field,
                        "is missing (a list, a regex string or \"all-linear\")",
                    ))
                }
            })
        };
        let method = match raw.peft_type.as_deref() {
            None | Some("LORA") => Method::Lora,
            Some("IA3") => Method::Ia3 {
                feedforward_modules: match &raw.feedforward_modules {
                    None | Some(Value::Null) => TargetModules::List(Vec::new()),
                    v => modules("feedforward_modules", v)?,
                },
            },
            Some(t @ ("PREFIX_TUNING" | "PROMPT_TUNING")) => {
                let num_virtual_tokens = raw
                    .num_virtual_tokens
                    .as_ref()
                    .and_then(Value::as_u64)
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("num_virtual_tokens", "must be a positive integer"))?
                    as usize;
                if t == "PREFIX_TUNING" {
                    Method::PrefixTuning { num_virtual_tokens }
                } else {
                    Method::PromptTuning { num_virtual_tokens }
                }
            }
            Some(t) => {
                return Err(bad(
                    "peft_type",
                    &format!(
                        "is `{t}`; supported: `LORA` (with optional DoRA), `IA3`, `PREFIX_TUNING`, `PROMPT_TUNING`"
                    ),
                ))
            }
        };
        let (r, lora_alpha) = if method == Method::Lora {
            let r = raw
                .r
                .as_ref()
                .and_then(Value::as_u64)
                .filter(|&r| r > 0)
                .ok_or_else(|| bad("r", "must be a positive integer"))?
                as usize;
            let lora_alpha = match &raw.lora_alpha {
                None => 8.0,
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| bad("lora_alpha", "must be a number"))?,
            };
            (r, lora_alpha)
        } else {
            (0, 0.0)
        };
        let target_modules = match method {
            // Prompt learning targets no module: its rows enter every layer's attention.
            Method::PrefixTuning { .. } | Method::PromptTuning { .. } => {
                TargetModules::List(Vec::new())
            }
            _ => modules("target_modules", &raw.target_modules)?,
        };
        if let Some(b) = raw.bias.as_deref() {
            if b != "none" {
                return Err(bad(
                    "bias",
                    &format!("is `{b}`; only \"none\" is supported (trained biases are not)"),
                ));
            }
        }
        if raw.fan_in_fan_out {
            return Err(bad(
                "fan_in_fan_out",
                "is true; only Llama-style (out, in) weights are supported",
            ));
        }
        match &raw.modules_to_save {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(bad(
                    "modules_to_save",
                    "is set; fully trained extra modules are not supported (only LoRA/DoRA sites)",
                ))
            }
        }
        let layers_to_transform = match &raw.layers_to_transform {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| bad("layers_to_transform", "must be non-negative"))?
                as usize]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| v.as_u64().map(|n| n as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("layers_to_transform", "must be a list of layer indices"))?,
            ),
            Some(_) => {
                return Err(bad(
                    "layers_to_transform",
                    "must be an integer or a list of integers",
                ))
            }
        };
        let mut rank_pattern = Vec::new();
        for (k, v) in ordered(raw.rank_pattern) {
            let r = v
                .as_u64()
                .filter(|&r| r > 0)
                .ok_or_else(|| bad(&format!("rank_pattern.{k}"), "must be a positive integer"))?;
            rank_pattern.push((k, r as usize));
        }
        let mut alpha_pattern = Vec::new();
        for (k, v) in ordered(raw.alpha_pattern) {
            let a = v
                .as_f64()
                .ok_or_else(|| bad(&format!("alpha_pattern.{k}"), "must be a number"))?;
            alpha_pattern.push((k, a));
        }
        Ok(Self {
            method,
            r,
            lora_alpha,
            target_modules,
            use_rslora: raw.use_rslora,
            use_dora: raw.use_dora,
            rank_pattern,
            alpha_pattern,
            lora_dropout: raw.lora_dropout.unwrap_or(0.0),
            layers_to_transform,
            base_model_name_or_path: raw.base_model_name_or_path,
            prefix_encoder_hidden: None,
        })
    }

    /// Whether `module` (e.g. `model.layers.3.self_attn.q_proj`) of layer `layer` is targeted.
    pub fn targets(&self, module: &str, layer: usize) -> bool {
        if let Some(layers) = &self.layers_to_transform {
            if !layers.contains(&layer) {
                return false;
            }
        }
        Self::matches(&self.target_modules, module)
    }

    /// The method as `/v1/adapters` names it.
    pub fn method_name(&self) -> &'static str {
        match self.method {
            Method::Lora if self.use_dora => "dora",
            Method::Lora => "lora",
            Method::Ia3 { .. } => "ia3",
            Method::PrefixTuning { .. } => "prefix_tuning",
            Method::PromptTuning { .. } => "prompt_tuning",
            Method::Bottleneck(_) => "bottleneck",
            Method::Fusion { .. } => "adapter_fusion",
        }
    }

    /// Whether `module` is one of an IA³ adapter's feed-forward modules (its vector scales the
    /// module's input).
    pub fn is_feedforward(&self, module: &str) -> bool {
        match &self.method {
            Method::Ia3 {
                feedforward_modules,
            } => Self::matches(feedforward_modules, module),
            Method::Lora
            | Method::PrefixTuning { .. }
            | Method::PromptTuning { .. }
            | Method::Bottleneck(_)
            | Method::Fusion { .. } => false,
        }
    }

    fn matches(targets: &TargetModules, module: &str) -> bool {
        match targets {
            TargetModules::AllLinear => true,
            TargetModules::List(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            TargetModules::Regex(re) => Regex::new(&format!("^(?:{re})$"))
                .map(|r| r.is_match(module))
                .unwrap_or(false),
        }
    }

    /// PEFT's `get_pattern_key`: the first pattern key matching `(.*\.)?(key)$`.
    fn pattern<'a, T>(patterns: &'a [(String, T)], module: &str) -> Option<&'a T> {
        patterns.iter().find_map(|(k, v)| {
            Regex::new(&format!(r"^(.*\.)?({k})$"))
                .ok()
                .filter(|r| r.is_match(module))
                .map(|_| v)
        })
    }

    pub fn rank_for(&self, module: &str) -> usize {
        Self::pattern(&self.rank_pattern, module)
            .copied()
            .unwrap_or(self.r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        Self::pattern(&self.alpha_pattern, module)
            .copied()
            .unwrap_or(self.lora_alpha)
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA, from the module's own rank and alpha.
    pub fn scale_for(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// The JSON PEFT writes (and reads back), for adapters this project saves.
    pub fn to_json(&self, proj_names: &[&str]) -> Value {
        let targets = match &self.target_modules {
            TargetModules::List(l) => serde_json::json!(l),
            TargetModules::Regex(r) => serde_json::json!(r),
            TargetModules::AllLinear => serde_json::json!(proj_names),
        };
        let prompt_learning = match self.method {
            Method::PrefixTuning { num_virtual_tokens } => {
                Some(("PREFIX_TUNING", num_virtual_tokens))
            }
            Method::PromptTuning { num_virtual_tokens } => {
                Some(("PROMPT_TUNING", num_virtual_tokens))
            }
            _ => None,
        };
        if let Some((kind, n)) = prompt_learning {
            let mut v = serde_json::json!({
                "peft_type": kind,
                "task_type": "CAUSAL_LM",
                "num_virtual_tokens": n,
                "base_model_name_or_path": self.base_model_name_or_path,
            });
            if let Some(e) = self.prefix_encoder_hidden {
                v["prefix_projection"] = serde_json::json!(true);
                v["encoder_hidden_size"] = serde_json::json!(e);
                v["inference_mode"] = serde_json::json!(true);
            }
            return v;
        }
        if let Method::Ia3 {
            feedforward_modules,
        } = &self.method
        {
            let ff = match feedforward_modules {
                TargetModules::List(l) => serde_json::json!(l),
                TargetModules::Regex(r) => serde_json::json!(r),
                TargetModules::AllLinear => serde_json::json!(proj_names),
            };
            return serde_json::json!({
                "peft_type": "IA3",
                "task_type": "CAUSAL_LM",
                "target_modules": targets,
                "feedforward_modules": ff,
                "fan_in_fan_out": false,
                "base_model_name_or_path": self.base_model_name_or_path,
            });
        }
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "rank_pattern": self.rank_pattern.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "alpha_pattern": self.alpha_pattern.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "lora_dropout": self.lora_dropout,
            "bias": "none",
            "fan_in_fan_out": false,
            "modules_to_save": null,
            "layers_to_transform": self.layers_to_transform,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": true,
            "init_lora_weights": true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<AdapterConfig, AdapterError> {
        AdapterConfig::from_json(
            Path::new("adapter_config.json"),
            &format!(
                r#"{{"peft_type":"LORA","r":16,"lora_alpha":8,"target_modules":["q_proj","o_proj","down_proj"]{extra}}}"#
            ),
        )
    }

    #[test]
    fn patterns_set_rank_alpha_and_rslora_scale() {
        let c = cfg(
            r#","use_rslora":true,"rank_pattern":{"o_proj":4},"alpha_pattern":{"down_proj":32}"#,
        )
        .unwrap();
        assert_eq!(c.rank_for("model.layers.0.self_attn.o_proj"), 4);
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 16);
        assert!((c.scale_for("model.layers.1.self_attn.o_proj") - 8.0 / 2.0).abs() < 1e-12);
        assert!((c.scale_for("model.layers.1.mlp.down_proj") - 32.0 / 4.0).abs() < 1e-12);
        assert!((c.scale_for("model.layers.1.self_attn.q_proj") - 2.0).abs() < 1e-12);
        assert!(c.targets("model.layers.0.self_attn.q_proj", 0));
        assert!(!c.targets("model.layers.0.self_attn.k_proj", 0));
    }

    #[test]
    fn regex_all_linear_and_layers() {
        let c = AdapterConfig::from_json(
            Path::new("a.json"),
            r#"{"r":4,"target_modules":".*\\.(q|v)_proj","layers_to_transform":[1]}"#,
        )
        .unwrap();
        assert!(c.targets("model.layers.1.self_attn.q_proj", 1));
        assert!(!c.targets("model.layers.0.self_attn.q_proj", 0));
        assert!(!c.targets("model.layers.1.mlp.up_proj", 1));
        let all = AdapterConfig::from_json(
            Path::new("a.json"),
            r#"{"r":4,"target_modules":"all-linear"}"#,
        )
        .unwrap();
        assert!(all.targets("model.layers.5.mlp.up_proj", 5));
    }

    #[test]
    fn unsupported_options_are_named() {
        for (extra, field) in [
            (r#","bias":"all""#, "`bias`"),
            (r#","fan_in_fan_out":true"#, "`fan_in_fan_out`"),
            (r#","modules_to_save":["lm_head"]"#, "`modules_to_save`"),
        ] {
            let err = cfg(extra).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("adapter_config.json"),
                "{err}"
            );
        }
        let err = AdapterConfig::from_json(Path::new("x/adapter_config.json"), "{not json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x/adapter_config.json") && err.contains("JSON"),
            "{err}"
        );
        let err = AdapterConfig::from_json(Path::new("a.json"), r#"{"target_modules":["q_proj"]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`r`"), "{err}");
    }
}
