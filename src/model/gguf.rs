//! Loading a Llama GGUF file: metadata → config and tokenizer, blocks dequantized to the target
//! dtype, q/k rows un-permuted back to Hugging Face layout so PEFT adapters apply unchanged.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Tensor;

use super::config::LlamaConfig;
use super::error::ModelError;
use super::loaded::{LoadedModel, ModelOptions, Weights};
use crate::tokenizer::{GgufVocab, Tokenizer};
use candle_core::quantized::GgmlDType;

struct Meta<'a> {
    path: &'a Path,
    content: &'a Content,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        let v = self
            .get(key)
            .ok_or_else(|| ModelError::field(self.path, key, "is missing"))?;
        v.to_u64()
            .map(|n| n as usize)
            .or_else(|_| v.to_u32().map(|n| n as usize))
            .map_err(|_| ModelError::field(self.path, key, "is not an unsigned integer"))
    }

    fn opt_usize(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(|v| {
            v.to_u32()
                .map(|n| n as usize)
                .or_else(|_| v.to_u64().map(|n| n as usize))
                .ok()
        })
    }

    fn opt_f64(&self, key: &str) -> Option<f64> {
        self.get(key)
            .and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
    }

    fn string(&self, key: &str) -> Option<String> {
        self.get(key).and_then(|v| v.to_string().ok().cloned())
    }

    fn strings(&self, key: &str) -> Vec<String> {
        self.get(key)
            .and_then(|v| v.to_vec().ok())
            .map(|items| {
                items
                    .iter()
                    .filter_map(|s| s.to_string().ok().cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn ints(&self, key: &str) -> Vec<i32> {
        self.get(key)
            .and_then(|v| v.to_vec().ok())
            .map(|items| items.iter().filter_map(|s| s.to_i32().ok()).collect())
            .unwrap_or_default()
    }
}

fn config_from_meta(
    meta: &Meta<'_>,
    vocab_len: usize,
    tied: bool,
) -> Result<LlamaConfig, ModelError> {
    let arch = meta.string("general.architecture").unwrap_or_default();
    if arch != "llama" {
        return Err(ModelError::field(
            meta.path,
            "general.architecture",
            format!("is `{arch}`; only `llama` is supported"),
        ));
    }
    let hidden = meta.usize("llama.embedding_length")?;
    let heads = meta.usize("llama.attention.head_count")?;
    let kv_heads = meta
        .opt_usize("llama.attention.head_count_kv")
        .unwrap_or(heads);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(ModelError::field(
            meta.path,
            "llama.attention.head_count_kv",
            "must divide the head count",
        ));
    }
    let head_dim = meta
        .opt_usize("llama.attention.key_length")
        .unwrap_or(hidden / heads);
    let eos: Vec<u32> = meta
        .opt_usize("tokenizer.ggml.eos_token_id")
        .map(|id| vec![id as u32])
        .unwrap_or_default();
    Ok(LlamaConfig {
        vocab_size: meta.opt_usize("llama.vocab_size").unwrap_or(vocab_len),
        hidden_size: hidden,
        intermediate_size: meta.usize("llama.feed_forward_length")?,
        num_hidden_layers: meta.usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta
            .opt_f64("llama.attention.layer_norm_rms_epsilon")
            .unwrap_or(1e-5),
        rope_theta: meta.opt_f64("llama.rope.freq_base").unwrap_or(10000.0),
        rope_scaling: None,
        max_position_embeddings: meta.opt_usize("llama.context_length").unwrap_or(2048),
        tie_word_embeddings: tied,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: meta
            .opt_usize("tokenizer.ggml.bos_token_id")
            .map(|id| id as u32),
        eos_token_ids: eos,
        arch: Default::default(),
    })
}

/// GGUF tensor name → Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's q/k permutation for interleaved RoPE: rows were reordered as
/// `reshape(heads, 2, d/2, ·).swap(1, 2)`; reverse it with `reshape(heads, d/2, 2, ·).swap(1, 2)`.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let shape = w.dims().to_vec();
    let rows = shape[0];
    let rest: usize = shape[1..].iter().product();
    w.reshape((heads, rows / heads / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(shape)
}

/// `unpermute_rows` as a row order: output row `i` is input row `order[i]`.
fn unpermuted_order(rows: usize, heads: usize) -> Vec<usize> {
    let half = rows / heads / 2;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for a in 0..half {
            for b in 0..2 {
                order[h * 2 * half + b * half + a] = h * 2 * half + a * 2 + b;
            }
        }
    }
    order
}

pub fn load(id: &str, path: &Path, opts: &ModelOptions) -> Result<LoadedModel, ModelError> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| ModelError::format(path, format!("not a valid GGUF file: {e}")))?;
    let meta = Meta {
        path,
        content: &content,
    };
    let vocab = GgufVocab {
        model: meta.string("tokenizer.ggml.model").unwrap_or_default(),
        pre: meta.string("tokenizer.ggml.pre"),
        tokens: meta.strings("tokenizer.ggml.tokens"),
        token_types: meta.ints("tokenizer.ggml.token_type"),
        merges: meta.strings("tokenizer.ggml.merges"),
    };
    let tied = !content.tensor_infos.contains_key("output.weight");
    let config = config_from_meta(&meta, vocab.tokens.len(), tied)?;
    let tokenizer = Tokenizer::from_gguf(path, &vocab)?;

    let mut tensors = HashMap::new();
    let mut quant = HashMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name(name) else { continue };
        let q = content
            .tensor(&mut reader, name, &opts.device)
            .map_err(|e| ModelError::Tensor {
                path: path.to_path_buf(),
                name: name.clone(),
                problem: format!(
                    "({:?}) cannot be read: {}; the types served are F32, F16, BF16 and {}",
                    content.tensor_infos[name].ggml_dtype,
                    e.to_string().lines().next().unwrap_or_default(),
                    crate::quant::gguf::supported_names()
                ),
            })?;
        let heads = if name.ends_with("attn_q.weight") {
            Some(config.num_attention_heads)
        } else if name.ends_with("attn_k.weight") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        // Served as stored: 2-D quantized tensors (projections, embedding); rows move whole.
        let quantized = !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if opts.native_quant && quantized && q.shape().rank() == 2 {
            let q = match heads {
                Some(h) => {
                    let rows = q.shape().dims()[0];
                    if h == 0 || rows % (2 * h) != 0 {
                        return Err(ModelError::Tensor {
                            path: path.to_path_buf(),
                            name: name.clone(),
                            problem: format!(
                                "has {rows} rows, not a whole number of {h} heads of even size"
                            ),
                        });
                    }
                    crate::quant::gguf::permute_rows(&q, &unpermuted_order(rows, h))?
                }
                None => q,
            };
            quant.insert(hf, std::sync::Arc::new(q));
            continue;
        }
        let mut t = q.dequantize(&opts.device)?;
        if let Some(h) = heads {
            t = unpermute_rows(&t, h)?;
        }
        tensors.insert(hf, t.to_dtype(opts.dtype)?);
    }
    let weights = Weights {
        path: path.to_path_buf(),
        tensors,
        quant,
    };
    let model = weights.into_llama(config.clone())?;
    let token = |key: &str| {
        meta.opt_usize(key)
            .and_then(|i| vocab.tokens.get(i).cloned())
    };
    let eos_token = token("tokenizer.ggml.eos_token_id");
    Ok(LoadedModel {
        id: id.to_string(),
        path: path.to_path_buf(),
        model,
        tokenizer,
        chat_template: meta.string("tokenizer.chat_template"),
        bos_token: token("tokenizer.ggml.bos_token_id"),
        add_bos_token: meta
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
        eos_token,
        eos_token_ids: config.eos_token_ids.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_order_is_unpermute_rows() {
        let (rows, heads) = (24, 3);
        let w = Tensor::arange(0f32, (rows * 2) as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, 2))
            .unwrap();
        let by_tensor: Vec<f32> = unpermute_rows(&w, heads)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let order = unpermuted_order(rows, heads);
        let by_order: Vec<f32> = order
            .iter()
            .flat_map(|&r| [2.0 * r as f32, 2.0 * r as f32 + 1.0])
            .collect();
        assert_eq!(by_tensor, by_order);
    }
    use candle_core::Device;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> candle_core::Result<()> {
        // llama.cpp: reshape(heads, 2, d/2, in).swapaxes(1, 2).reshape(rows, in)
        let (heads, d, inp) = (3, 8, 5);
        let w = Tensor::arange(0f32, (heads * d * inp) as f32, &Device::Cpu)?
            .reshape((heads * d, inp))?;
        let permuted = w
            .reshape((heads, 2, d / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((heads * d, inp))?;
        let back = unpermute_rows(&permuted, heads)?;
        let diff = (back - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
