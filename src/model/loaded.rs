//! A model ready to use: the Llama, its tokenizer, chat template and special tokens, built from
//! weights in Hugging Face naming whatever the file format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::embedding::Embedding;
use super::error::ModelError;
use super::linear::{BaseWeight, Linear};
use super::llama::{Attention, Block, Llama, Mlp};
use super::source::ResolvedModel;
use super::{gguf, safetensors_dir};
use crate::chat::{ChatTemplate, SpecialTokens};
use crate::tokenizer::Tokenizer;

/// How to load: element type and device of the weights, and whether the projections are
/// quantized to NF4 (double-quantized; embeddings, norms and `lm_head` stay dense).
#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub dtype: DType,
    pub device: Device,
    pub nf4: bool,
    /// Projections and lm_head in bf16 with f32 activations (`--dtype bf16` on CPU): the model
    /// loads in f32 and each weight is rounded in turn.
    pub bf16_weights: bool,
    /// GGUF quantized tensors stay in their quantization and are served as stored (the CLI's
    /// default, `--dtype auto`); off, they are dequantized to `dtype` (exact reference work).
    pub native_quant: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            nf4: false,
            bf16_weights: false,
            native_quant: false,
        }
    }
}

/// Quantizes the seven projections of every layer to NF4 with double quantization.
pub fn quantize_nf4(model: &mut Llama) -> Result<(), ModelError> {
    use crate::model::Proj;
    for layer in 0..model.layers.len() {
        for proj in Proj::ALL {
            let linear = model.linear_mut(layer, proj).expect("layer exists");
            let w = linear.base().dense()?.to_dtype(DType::F32)?;
            let (rows, cols) = w.dims2()?;
            let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
            let q = crate::quant::Nf4Weight::quantize(&values, rows, cols, true);
            linear.set_base(BaseWeight::Nf4(crate::quant::nf4_matmul::Nf4Linear::new(q)));
        }
    }
    Ok(())
}

/// Bytes and bits per parameter of the seven projections of every layer.
/// Rounds every projection and the lm_head to bf16 weights (f32 activations), one at a time.
pub fn to_bf16_weights(model: &mut Llama) -> Result<(), ModelError> {
    use crate::model::Proj;
    let convert = |linear: &mut Linear| -> Result<(), ModelError> {
        let w = linear.base().dense()?.to_dtype(DType::F32)?;
        let (rows, cols) = w.dims2()?;
        let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
        linear.set_base(BaseWeight::Bf16(std::sync::Arc::new(
            crate::quant::bf16::Bf16Weight::from_f32(&values, rows, cols),
        )));
        Ok(())
    };
    for layer in 0..model.layers.len() {
        for proj in Proj::ALL {
            convert(model.linear_mut(layer, proj).expect("layer exists"))?;
        }
    }
    convert(&mut model.lm_head)
}

pub fn projection_footprint(model: &Llama) -> (usize, f64) {
    use crate::model::Proj;
    let (mut bytes, mut params) = (0usize, 0usize);
    for layer in 0..model.layers.len() {
        for proj in Proj::ALL {
            let base = model.linear(layer, proj).expect("layer exists").base();
            bytes += base.bytes();
            let (o, i) = base.dims().unwrap_or((0, 0));
            params += o * i;
        }
    }
    (bytes, 8.0 * bytes as f64 / params.max(1) as f64)
}

#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The id clients use for the base model (hub id, or the file/directory name).
    pub id: String,
    pub path: PathBuf,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// The model's own chat template, if it ships one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    /// The tokenizer config asks for BOS before a raw prompt (`add_bos_token`).
    pub add_bos_token: bool,
    pub eos_token: Option<String>,
    /// Token ids that end generation (model EOS plus generation-config EOS).
    pub eos_token_ids: Vec<u32>,
}

impl LoadedModel {
    /// Special tokens as chat templates refer to them.
    pub fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token.clone(),
        }
    }

    /// Token ids that end generation under `template`: the model's EOS ids plus the
    /// end-of-turn tokens the template writes (`<|im_end|>`, `<|eot_id|>`, ...).
    /// The BOS id to put before a raw (completions) prompt, when the model asks for one.
    pub fn prompt_bos(&self) -> Option<u32> {
        if !self.add_bos_token {
            return None;
        }
        self.bos_token
            .as_deref()
            .and_then(|t| self.tokenizer.token_id(t))
    }

    pub fn stop_token_ids(&self, template: &ChatTemplate) -> Vec<u32> {
        let mut ids = self.eos_token_ids.clone();
        for t in template.end_tokens() {
            if let Some(id) = self.tokenizer.token_id(t) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }
}

/// A GGUF tensor kept in its quantization.
pub(crate) enum Quantized {
    /// As read (a fused weight, split by rows before its kernels are built; or a type whose
    /// refusal `into_llama` words).
    Stored(std::sync::Arc<candle_core::quantized::QTensor>),
    /// Already in its kernel's layout: built while the file was read, so the stored bytes of
    /// one tensor at a time are held, not the whole file's.
    Ready(crate::quant::gguf::QuantLinear),
}

impl Quantized {
    fn dims(&self) -> Vec<usize> {
        match self {
            Self::Stored(q) => q.shape().dims().to_vec(),
            Self::Ready(l) => {
                let (r, c) = l.dims();
                vec![r, c]
            }
        }
    }
}

/// Tensors in Hugging Face naming (`model.layers.0.self_attn.q_proj.weight`), already in the
/// target dtype and device.
pub(crate) struct Weights {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    /// GGUF tensors kept in their quantization, served as stored.
    pub quant: HashMap<String, Quantized>,
    /// Norm weights already hold the one that `1 + w` families add (llama.cpp's converter adds
    /// it to Gemma's norms): taken as they are.
    pub norms_hold_one: bool,
}

impl Weights {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::Tensor {
                path: self.path.clone(),
                name: name.to_string(),
                problem: "is missing".into(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::Tensor {
                path: self.path.clone(),
                name: name.to_string(),
                problem: format!("has shape {:?}, expected {:?}", t.dims(), shape),
            });
        }
        Ok(t)
    }

    /// A quantized tensor of `shape` if the file's was kept quantized.
    fn take_quant(&mut self, name: &str, shape: &[usize]) -> Result<Option<Quantized>, ModelError> {
        let Some(q) = self.quant.remove(name) else {
            return Ok(None);
        };
        if q.dims() != shape {
            return Err(ModelError::Tensor {
                path: self.path.clone(),
                name: name.to_string(),
                problem: format!("has shape {:?}, expected {:?}", q.dims(), shape),
            });
        }
        Ok(Some(q))
    }

    fn quant_linear(
        &self,
        name: &str,
        q: Quantized,
    ) -> Result<crate::quant::gguf::QuantLinear, ModelError> {
        let q = match q {
            Quantized::Ready(l) => return Ok(l),
            Quantized::Stored(q) => q,
        };
        let dtype = q.dtype();
        crate::quant::gguf::QuantLinear::new(q)?
            .ok_or_else(|| ModelError::Tensor {
                path: self.path.clone(),
                name: name.to_string(),
                problem: format!(
                    "is {dtype:?}, a type not served natively (supported: {}); load with `--dtype f32` to dequantize it",
                    crate::quant::gguf::supported_names()
                ),
            })
    }

    fn linear(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear, ModelError> {
        let name = format!("{prefix}.weight");
        if let Some(q) = self.take_quant(&name, &[out, inp])? {
            let base = BaseWeight::Quant(self.quant_linear(&name, q)?);
            let b = if bias {
                Some(self.take(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            };
            return Ok(Linear::new(base, b));
        }
        let w = self.take(&name, &[out, inp])?;
        let b = if bias {
            Some(self.take(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(BaseWeight::Dense(w), b))
    }

    /// A fused weight (`[sum(parts), inp]`, dense or quantized) split by rows into one linear
    /// per part, in order.
    fn fused(
        &mut self,
        name: &str,
        parts: &[usize],
        inp: usize,
    ) -> Result<Vec<Linear>, ModelError> {
        let total: usize = parts.iter().sum();
        let starts = parts.iter().scan(0, |at, &n| {
            let from = *at;
            *at += n;
            Some((from, n))
        });
        if let Some(q) = self.take_quant(name, &[total, inp])? {
            let q = match q {
                Quantized::Stored(q) => q,
                Quantized::Ready(_) => {
                    return Err(ModelError::Tensor {
                        path: self.path.clone(),
                        name: name.to_string(),
                        problem: "is fused but was prepared as one weight (a loader bug)".into(),
                    })
                }
            };
            return starts
                .map(|(from, n)| {
                    let rows: Vec<usize> = (from..from + n).collect();
                    let part = crate::quant::gguf::select_rows(&q, &rows)?;
                    let part = Quantized::Stored(std::sync::Arc::new(part));
                    let base = BaseWeight::Quant(self.quant_linear(name, part)?);
                    Ok(Linear::new(base, None))
                })
                .collect();
        }
        let t = self.take(name, &[total, inp])?;
        starts
            .map(|(from, n)| {
                Ok(Linear::new(
                    BaseWeight::Dense(t.narrow(0, from, n)?.contiguous()?),
                    None,
                ))
            })
            .collect()
    }

    /// A norm weight `[hidden]` as the decoder applies it (`1 + w` where the family stores `w`).
    fn norm(&mut self, name: &str, c: &LlamaConfig) -> Result<Tensor, ModelError> {
        let w = self.take(name, &[c.hidden_size])?;
        if c.arch.norm_plus_one && !self.norms_hold_one {
            return Ok((w + 1.0)?);
        }
        Ok(w)
    }

    /// Assembles the Llama, checking every tensor's presence and shape against the config.
    pub fn into_llama(mut self, config: LlamaConfig) -> Result<Llama, ModelError> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let embed = match self.take_quant("model.embed_tokens.weight", &[c.vocab_size, h])? {
            Some(q) => Embedding::Quant(self.quant_linear("model.embed_tokens.weight", q)?),
            None => Embedding::Dense(self.take("model.embed_tokens.weight", &[c.vocab_size, h])?),
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = c.attention_bias;
            let qkv = ab || c.arch.qkv_bias;
            let mb = c.mlp_bias;
            let head_norm = |w: &mut Self, which: &str| -> Result<Option<Tensor>, ModelError> {
                if c.arch.qk_norm {
                    let t = w.take(&format!("{p}.self_attn.{which}.weight"), &[hd])?;
                    Ok(Some(if c.arch.norm_plus_one && !w.norms_hold_one {
                        (t + 1.0)?
                    } else {
                        t
                    }))
                } else {
                    Ok(None)
                }
            };
            let (q_norm, k_norm) = (
                head_norm(&mut self, "q_norm")?,
                head_norm(&mut self, "k_norm")?,
            );
            // Gemma 2 names its pre-MLP norm `pre_feedforward_layernorm`; its
            // `post_attention_layernorm` normalises the attention output.
            let sandwich = c.arch.sandwich_norms;
            let (pre_mlp, attn_out, mlp_out) = if sandwich {
                (
                    self.norm(&format!("{p}.pre_feedforward_layernorm.weight"), c)?,
                    Some(self.norm(&format!("{p}.post_attention_layernorm.weight"), c)?),
                    Some(self.norm(&format!("{p}.post_feedforward_layernorm.weight"), c)?),
                )
            } else {
                (
                    self.norm(&format!("{p}.post_attention_layernorm.weight"), c)?,
                    None,
                    None,
                )
            };
            if c.arch.fused {
                // Phi-3: one weight each for q/k/v and gate/up, split by rows here.
                let inter = c.intermediate_size;
                let mut qkv = self
                    .fused(
                        &format!("{p}.self_attn.qkv_proj.weight"),
                        &[q_out, kv_out, kv_out],
                        h,
                    )?
                    .into_iter();
                let mut gate_up = self
                    .fused(&format!("{p}.mlp.gate_up_proj.weight"), &[inter, inter], h)?
                    .into_iter();
                let next = |parts: &mut std::vec::IntoIter<Linear>| {
                    parts.next().expect("one part per row range")
                };
                layers.push(Block {
                    attn_out_norm: None,
                    mlp_out_norm: None,
                    input_layernorm: self.norm(&format!("{p}.input_layernorm.weight"), c)?,
                    self_attn: Attention {
                        q_proj: next(&mut qkv),
                        k_proj: next(&mut qkv),
                        v_proj: next(&mut qkv),
                        o_proj: self.linear(&format!("{p}.self_attn.o_proj"), h, q_out, ab)?,
                        q_norm,
                        k_norm,
                    },
                    post_attention_layernorm: pre_mlp,
                    mlp: Mlp {
                        gate_proj: next(&mut gate_up),
                        up_proj: next(&mut gate_up),
                        down_proj: self.linear(&format!("{p}.mlp.down_proj"), h, inter, mb)?,
                    },
                });
                continue;
            }
            layers.push(Block {
                attn_out_norm: attn_out,
                mlp_out_norm: mlp_out,
                input_layernorm: self.norm(&format!("{p}.input_layernorm.weight"), c)?,
                self_attn: Attention {
                    q_proj: self.linear(&format!("{p}.self_attn.q_proj"), q_out, h, qkv)?,
                    k_proj: self.linear(&format!("{p}.self_attn.k_proj"), kv_out, h, qkv)?,
                    v_proj: self.linear(&format!("{p}.self_attn.v_proj"), kv_out, h, qkv)?,
                    o_proj: self.linear(&format!("{p}.self_attn.o_proj"), h, q_out, ab)?,
                    q_norm,
                    k_norm,
                },
                post_attention_layernorm: pre_mlp,
                mlp: Mlp {
                    gate_proj: self.linear(
                        &format!("{p}.mlp.gate_proj"),
                        c.intermediate_size,
                        h,
                        mb,
                    )?,
                    up_proj: self.linear(
                        &format!("{p}.mlp.up_proj"),
                        c.intermediate_size,
                        h,
                        mb,
                    )?,
                    down_proj: self.linear(
                        &format!("{p}.mlp.down_proj"),
                        h,
                        c.intermediate_size,
                        mb,
                    )?,
                },
            });
        }
        let norm = self.norm("model.norm.weight", c)?;
        let has_head = self.tensors.contains_key("lm_head.weight")
            || self.quant.contains_key("lm_head.weight");
        let lm_head = if c.tie_word_embeddings || !has_head {
            match &embed {
                Embedding::Dense(t) => Linear::new(BaseWeight::Dense(t.clone()), None),
                // The tied head shares the embedding's quantized bytes.
                Embedding::Quant(q) => Linear::new(BaseWeight::Quant(q.clone()), None),
            }
        } else {
            self.linear("lm_head", c.vocab_size, h, false)?
        };
        Ok(Llama::new(config, embed, layers, norm, lm_head)?)
    }
}

/// Loads a resolved model (directory or GGUF file) in the requested dtype.
pub fn load_model(
    resolved: &ResolvedModel,
    opts: &ModelOptions,
) -> Result<LoadedModel, ModelError> {
    let mut loaded = match resolved {
        ResolvedModel::HfDir { id, path } => safetensors_dir::load(id, path, opts),
        ResolvedModel::Gguf { id, path } => gguf::load(id, path, opts),
    }?;
    if opts.nf4 {
        if opts.dtype != DType::F32 || !matches!(opts.device, Device::Cpu) {
            return Err(ModelError::field(
                &loaded.path,
                "--quantize",
                "nf4 runs with --dtype f32 on --device cpu",
            ));
        }
        quantize_nf4(&mut loaded.model)?;
    } else if opts.bf16_weights {
        to_bf16_weights(&mut loaded.model)?;
    }
    Ok(loaded)
}

/// A special token written either as a string or as `{"content": ...}` in tokenizer_config.json.
pub(crate) fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

pub(crate) fn file_name_id(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| path.display().to_string())
}
