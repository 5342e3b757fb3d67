//! Loading a GGUF file of any served family (llama, qwen2, qwen3, gemma2, gemma3, phi3):
//! metadata → config and tokenizer, tensors renamed to Hugging Face's names, quantized blocks
//! served as stored or dequantized to the target dtype, the Llama's q/k rows un-permuted back
//! to Hugging Face layout so PEFT adapters apply unchanged.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Tensor;

use super::config::{Activation, Arch, Family, LlamaConfig};
use super::error::ModelError;
use super::loaded::{LoadedModel, ModelOptions, Quantized, Weights};
use crate::quant::gguf::QuantLinear;
use crate::quant::int8::RowOrder;
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

/// The GGUF architectures served (`general.architecture`) and the family each is. llama.cpp's
/// converter writes Mistral as `llama`.
const ARCHITECTURES: [(&str, Family); 6] = [
    ("llama", Family::Llama),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("gemma2", Family::Gemma2),
    ("gemma3", Family::Gemma3),
    ("phi3", Family::Phi3),
];

/// The config a GGUF file describes, read as llama.cpp reads it (what the file means is what
/// llama.cpp does with it; where that differs from transformers it is said here):
/// - sliding windows only for Gemma (llama.cpp runs Mistral, Qwen2 and Phi-3 GGUFs with full
///   attention: the converter writes no window for the first two and llama.cpp disables Phi-3's);
///   Gemma 2 slides on every other layer from the first, Gemma 3 on five of six, unless the file
///   has `sliding_window_pattern`;
/// - Gemma's attention scale is `1/sqrt(head_dim)` (`1/sqrt(hidden/heads)` for the 27B models,
///   46 and 62 layers): the file has no `query_pre_attn_scalar`, and these are its real values;
/// - Gemma 3's linear RoPE scaling is on its full-attention layers, `rope.freq_base_swa` the
///   base of the sliding ones.
fn config_from_meta(
    meta: &Meta<'_>,
    vocab_len: usize,
    tied: bool,
) -> Result<LlamaConfig, ModelError> {
    let arch = meta.string("general.architecture").unwrap_or_default();
    let Some(family) = ARCHITECTURES
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, f)| *f)
    else {
        return Err(ModelError::field(
            meta.path,
            "general.architecture",
            format!(
                "is `{arch}`; the supported architectures are {}",
                ARCHITECTURES.map(|(a, _)| a).join(", ")
            ),
        ));
    };
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.usize(&key("embedding_length"))?;
    let heads = meta.usize(&key("attention.head_count"))?;
    let kv_heads = meta
        .opt_usize(&key("attention.head_count_kv"))
        .unwrap_or(heads);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(ModelError::field(
            meta.path,
            &key("attention.head_count_kv"),
            "must divide the head count",
        ));
    }
    let head_dim = meta
        .opt_usize(&key("attention.key_length"))
        .unwrap_or(hidden / heads);
    let layers = meta.usize(&key("block_count"))?;
    let eos: Vec<u32> = meta
        .opt_usize("tokenizer.ggml.eos_token_id")
        .map(|id| vec![id as u32])
        .unwrap_or_default();
    let gemma = family.is_gemma();
    let window = meta
        .opt_usize(&key("attention.sliding_window"))
        .filter(|&w| w > 0);
    let windows = match (family, window) {
        (Family::Gemma2, w) => sliding_layers(
            meta,
            &key("attention.sliding_window_pattern"),
            layers,
            2,
            w.unwrap_or(4096),
        ),
        (Family::Gemma3, Some(w)) => {
            sliding_layers(meta, &key("attention.sliding_window_pattern"), layers, 6, w)
        }
        _ => Vec::new(),
    };
    let rope_linear = match meta.string(&key("rope.scaling.type")).as_deref() {
        None | Some("none") => None,
        Some("linear") => meta
            .opt_f64(&key("rope.scaling.factor"))
            .filter(|&f| f != 1.0),
        Some(other) => {
            return Err(ModelError::field(
                meta.path,
                &key("rope.scaling.type"),
                format!("is `{other}`; supported: linear"),
            ))
        }
    };
    if rope_linear.is_some() && family != Family::Gemma3 {
        return Err(ModelError::field(
            meta.path,
            &key("rope.scaling.type"),
            "linear RoPE scaling is served for gemma3 only",
        ));
    }
    let softcap = |k: &str| meta.opt_f64(&key(k)).filter(|&c| c > 0.0).map(|c| c as f32);
    let big = matches!(
        (family, layers),
        (Family::Gemma2, 46) | (Family::Gemma3, 62)
    );
    Ok(LlamaConfig {
        vocab_size: meta.opt_usize(&key("vocab_size")).unwrap_or(vocab_len),
        hidden_size: hidden,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        rope_theta: meta.opt_f64(&key("rope.freq_base")).unwrap_or(10000.0),
        rope_scaling: None,
        max_position_embeddings: meta.opt_usize(&key("context_length")).unwrap_or(2048),
        tie_word_embeddings: tied,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: meta
            .opt_usize("tokenizer.ggml.bos_token_id")
            .map(|id| id as u32),
        eos_token_ids: eos,
        arch: Arch {
            attn_scale: big.then(|| 1.0 / ((hidden / heads) as f32).sqrt()),
            attn_softcap: if family == Family::Gemma2 {
                softcap("attn_logit_softcapping")
            } else {
                None
            },
            final_softcap: if gemma {
                softcap("final_logit_softcapping")
            } else {
                None
            },
            local_rope_theta: (family == Family::Gemma3)
                .then(|| meta.opt_f64(&key("rope.freq_base_swa")).unwrap_or(10000.0)),
            rope_linear,
            ..Arch::of_family(
                family,
                hidden,
                windows,
                if gemma {
                    Activation::GeluTanh
                } else {
                    Activation::Silu
                },
            )
        },
    })
}

/// Which layers slide, as llama.cpp reads `sliding_window_pattern`: an array of one flag per
/// layer, or `n` (layer `i` slides when `i % n < n - 1`), `default_n` if absent.
fn sliding_layers(
    meta: &Meta<'_>,
    key: &str,
    layers: usize,
    default_n: usize,
    window: usize,
) -> Vec<Option<usize>> {
    if let Some(flags) = meta.get(key).and_then(|v| v.to_vec().ok()) {
        return (0..layers)
            .map(|i| {
                let slides = flags.get(i).and_then(|f| f.to_bool().ok()).unwrap_or(false);
                slides.then_some(window)
            })
            .collect();
    }
    let n = meta.opt_usize(key).unwrap_or(default_n);
    (0..layers)
        .map(|i| (n == 0 || i % n < n - 1).then_some(window))
        .collect()
}

/// GGUF tensor name → Hugging Face name, for `family`.
fn hf_name(gguf: &str, family: Family) -> Option<String> {
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
    let gemma = family.is_gemma();
    let hf = match module {
        "attn_norm" => "input_layernorm",
        // Gemma's `post_attention_layernorm` normalises the attention output; its pre-MLP
        // norm is `pre_feedforward_layernorm`.
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_qkv" if family == Family::Phi3 => "self_attn.qkv_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        // Phi-3's `ffn_up` is gate and up, fused.
        "ffn_up" if family == Family::Phi3 => "mlp.gate_up_proj",
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

/// The file's tensors in Hugging Face naming: dense ones in `opts.dtype`, quantized 2-D ones
/// (with `opts.native_quant`) kept as stored or already in their kernel's layout.
#[allow(clippy::type_complexity)]
fn read_weights(
    content: &Content,
    reader: &mut (impl std::io::Read + std::io::Seek),
    path: &Path,
    opts: &ModelOptions,
    config: &LlamaConfig,
) -> Result<(HashMap<String, Tensor>, HashMap<String, Quantized>), ModelError> {
    let mut tensors = HashMap::new();
    let mut quant = HashMap::new();
    let family = config.arch.family;
    if let Some(name) = content
        .tensor_infos
        .keys()
        .find(|n| n.starts_with("rope_factors") || n.ends_with("rope_factors_long.weight"))
    {
        return Err(ModelError::Tensor {
            path: path.to_path_buf(),
            name: name.clone(),
            problem: "is LongRoPE's per-frequency factors; LongRoPE is not supported".into(),
        });
    }
    // Quantized projections are prepared (read, un-permuted, repacked into their kernel's
    // layout) in parallel, each task holding one tensor's stored bytes at a time; the rest is
    // read here.
    let mut jobs = Vec::new();
    for (name, info) in content.tensor_infos.iter() {
        let Some(hf) = hf_name(name, family) else {
            continue;
        };
        // The converter permutes q and k rows for the Llama's interleaved RoPE only.
        let heads = if family != Family::Llama {
            None
        } else if name.ends_with("attn_q.weight") {
            Some(config.num_attention_heads)
        } else if name.ends_with("attn_k.weight") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        // Served as stored: 2-D quantized tensors (projections, embedding); rows move whole.
        let quantized = !matches!(
            info.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        if opts.native_quant && quantized && info.shape.rank() == 2 {
            jobs.push((name, hf, heads));
            continue;
        }
        let q = read_tensor(content, reader, path, name, &opts.device)?;
        let mut t = q.dequantize(&opts.device)?;
        if let Some(h) = heads {
            t = unpermute_rows(&t, h)?;
        }
        tensors.insert(hf, t.to_dtype(opts.dtype)?);
    }
    // The largest first, so the two threads finish together.
    jobs.sort_by_key(|(name, _, _)| {
        std::cmp::Reverse(content.tensor_infos[*name].shape.elem_count())
    });
    // The file mapped once: our kernels' weights are repacked straight from its pages (no
    // copy of the stored bytes on the heap), each tensor's pages mapped in one call before and
    // let go after, so the mapping never holds more than the tensors being repacked.
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the mapping is read-only and dropped before this function returns; like every
    // reader of a GGUF by mmap (llama.cpp, candle) it relies on the file not being truncated
    // or rewritten during the load.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    use rayon::prelude::*;
    let prepared: Vec<(String, Quantized)> = jobs
        .into_par_iter()
        .map(|(name, hf, heads)| {
            let info = &content.tensor_infos[name];
            // Checked first: the header's shape must fit the file before anything is sized
            // from it (the row order below, the tiles).
            let (at, len) = stored_range(content, &map, path, name)?;
            let order = match heads {
                Some(h) => {
                    let rows = info.shape.dims()[0];
                    if h == 0 || rows % (2 * h) != 0 {
                        return Err(ModelError::Tensor {
                            path: path.to_path_buf(),
                            name: name.clone(),
                            problem: format!(
                                "has {rows} rows, not a whole number of {h} heads of even size"
                            ),
                        });
                    }
                    Some(unpermuted_order(rows, h))
                }
                None => None,
            };
            // Fused weights (Phi-3) are split by rows first; a type not served natively is
            // refused by `into_llama`, by name.
            let fused = hf.ends_with("qkv_proj.weight") || hf.ends_with("gate_up_proj.weight");
            let (rows, cols) = (info.shape.dims()[0], info.shape.dims()[1]);
            if !fused && QuantLinear::ours(info.ggml_dtype, cols) {
                let _ = map.advise_range(memmap2::Advice::PopulateRead, at, len);
                let order = match &order {
                    Some(o) => RowOrder::new(o, rows),
                    None => Ok(RowOrder::STORED),
                };
                let ready = order
                    .map_err(candle_core::Error::msg)
                    .and_then(|order| {
                        QuantLinear::from_stored(
                            info.ggml_dtype,
                            &map[at..at + len],
                            rows,
                            cols,
                            order,
                        )
                    })
                    .map_err(|e| ModelError::Tensor {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        problem: format!("cannot be repacked: {e}"),
                    })?;
                // SAFETY: the pages are read-only file pages no reference points into any
                // more (the repacked weight owns its memory): dropping them only unmaps them.
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, len)
                };
                if let Some(ready) = ready {
                    return Ok((hf, Quantized::Ready(ready)));
                }
            }
            let mut reader = &file;
            let q = read_tensor(content, &mut reader, path, name, &opts.device)?;
            let q = match &order {
                Some(o) => crate::quant::gguf::permute_rows(&q, o)?,
                None => q,
            };
            let q = std::sync::Arc::new(q);
            let ready = if fused {
                None
            } else {
                QuantLinear::new(q.clone())?
            };
            Ok((hf, ready.map_or(Quantized::Stored(q), Quantized::Ready)))
        })
        .collect::<Result<_, ModelError>>()?;
    drop(map);
    quant.extend(prepared);
    Ok((tensors, quant))
}

/// Where tensor `name`'s bytes lie in the mapped file: offset and length, checked.
fn stored_range(
    content: &Content,
    map: &[u8],
    path: &Path,
    name: &str,
) -> Result<(usize, usize), ModelError> {
    let info = &content.tensor_infos[name];
    let (elems, block) = (info.shape.elem_count(), info.ggml_dtype.block_size());
    let problem = |problem: String| ModelError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        problem,
    };
    if elems % block != 0 {
        return Err(problem(format!(
            "has {elems} values, not whole blocks of {block}"
        )));
    }
    let len = elems / block * info.ggml_dtype.type_size();
    let at = content.tensor_data_offset.saturating_add(info.offset);
    match usize::try_from(at) {
        Ok(at) if at.checked_add(len).is_some_and(|end| end <= map.len()) => Ok((at, len)),
        _ => Err(problem(format!(
            "needs {len} bytes at offset {at}, past the file's {} bytes",
            map.len()
        ))),
    }
}

/// Reads tensor `name` of the file as stored.
fn read_tensor(
    content: &Content,
    reader: &mut (impl std::io::Read + std::io::Seek),
    path: &Path,
    name: &str,
    device: &candle_core::Device,
) -> Result<candle_core::quantized::QTensor, ModelError> {
    content
        .tensor(reader, name, device)
        .map_err(|e| ModelError::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            problem: format!(
                "({:?}) cannot be read: {}; the types served are F32, F16, BF16 and {}",
                content.tensor_infos[name].ggml_dtype,
                e.to_string().lines().next().unwrap_or_default(),
                crate::quant::gguf::supported_names()
            ),
        })
}

pub fn load(id: &str, path: &Path, opts: &ModelOptions) -> Result<LoadedModel, ModelError> {
    let started = std::time::Instant::now();
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
    // The tokenizer (a vocabulary of 128k tokens takes a few tenths of a second) is built while
    // the weights are read.
    let (tokenizer, read) = std::thread::scope(|s| {
        let tokenizer = s.spawn(|| Tokenizer::from_gguf(path, &vocab));
        let read = read_weights(&content, &mut reader, path, opts, &config);
        (tokenizer.join(), read)
    });
    let tokenizer =
        tokenizer.map_err(|_| ModelError::format(path, "building its tokenizer failed"))??;
    let (tensors, quant) = read?;
    let family = config.arch.family;
    let weights = Weights {
        path: path.to_path_buf(),
        tensors,
        quant,
        // The converter adds Gemma's one to its norms.
        norms_hold_one: family.is_gemma(),
    };
    let model = weights.into_llama(config.clone())?;
    tracing::info!(
        "{}: read in {:.2} s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
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
            hf_name("blk.3.attn_q.weight", Family::Llama).unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight", Family::Llama).unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight", Family::Llama).unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("rope_freqs.weight", Family::Llama).is_none());
        assert_eq!(
            hf_name("blk.1.ffn_norm.weight", Family::Gemma2).unwrap(),
            "model.layers.1.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name("blk.1.ffn_up.weight", Family::Phi3).unwrap(),
            "model.layers.1.mlp.gate_up_proj.weight"
        );
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
