//! The GGUF path on the tiny model: the fixture written as a llama.cpp-style GGUF (q/k rows
//! permuted for interleaved RoPE, tokenizer in `tokenizer.ggml.*`) must load to the same
//! tokenizer and the same logits as the Hugging Face directory.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use loraplex::model::llama::SeqInput;
use loraplex::model::source::ResolvedModel;
use loraplex::model::{load_model, BatchInput, LogitsRows, ModelOptions};

/// llama.cpp's `permute` of q/k rows (convert_hf_to_gguf.py).
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let module = rest.trim_end_matches(".weight");
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unexpected {other}"),
    };
    format!("blk.{layer}.{g}.weight")
}

pub fn write_tiny_gguf(path: &Path, architecture: &str) {
    write_tiny_gguf_with(path, architecture, |_| GgmlDType::F32)
}

/// The tiny model as GGUF with each tensor stored as `ty(gguf name)` says.
pub fn write_tiny_gguf_with(path: &Path, architecture: &str, ty: impl Fn(&str) -> GgmlDType) {
    let dir = tiny_dir();
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut q = Vec::new();
    for (name, t) in &tensors {
        let t = if name.ends_with("q_proj.weight") {
            permute(t, 4)
        } else if name.ends_with("k_proj.weight") {
            permute(t, 2)
        } else {
            t.clone()
        };
        let gname = gguf_name(name);
        let qt = QTensor::quantize(&t, ty(&gname)).unwrap();
        q.push((gname, qt));
    }
    let tok = read_json(dir.join("tokenizer.json"));
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            Value::String(format!(
                "{} {}",
                m[0].as_str().unwrap(),
                m[1].as_str().unwrap()
            ))
        })
        .collect();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    let tokens: Vec<Value> = tokens.into_iter().map(Value::String).collect();
    let chat = read_json(dir.join("tokenizer_config.json"))["chat_template"]
        .as_str()
        .unwrap()
        .to_string();
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(architecture.into())),
        ("llama.block_count", Value::U32(2)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(64)),
        ("llama.feed_forward_length", Value::U32(176)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", Value::U32(512)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.chat_template", Value::String(chat)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

#[test]
fn tiny_gguf_loads_like_the_hugging_face_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&path, "llama");
    let from_gguf = load_model(
        &ResolvedModel::Gguf {
            id: "tiny".into(),
            path: path.clone(),
        },
        &ModelOptions::default(),
    )
    .unwrap();
    let from_dir = load_tiny();
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    let mut worst = 0f32;
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = from_gguf.tokenizer.encode(text).unwrap();
        assert_eq!(
            ids,
            as_u32_vec(&case["input_ids"]),
            "GGUF tokenizer on {text:?}"
        );
        assert_eq!(
            from_gguf.tokenizer.decode(&ids, false).unwrap(),
            from_dir.tokenizer.decode(&ids, false).unwrap()
        );
        let mut cache = from_gguf.model.new_cache();
        let got: Vec<Vec<f32>> = from_gguf
            .model
            .forward(&mut BatchInput {
                seqs: vec![SeqInput::new(&ids, &mut cache)],
                logits: LogitsRows::All,
            })
            .unwrap()
            .to_vec2()
            .unwrap();
        for (g, w) in got.iter().zip(case["base_logits"].as_array().unwrap()) {
            worst = worst.max(max_abs_diff(g, &as_f32_vec(w)));
        }
    }
    assert!(
        worst < 1e-4,
        "GGUF logits differ from transformers by {worst}"
    );
    assert_eq!(from_gguf.eos_token_ids, vec![2]);
    assert_eq!(from_gguf.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(from_gguf.chat_template.unwrap().contains("<|im_start|>"));
    assert_eq!(
        from_gguf.tokenizer.encode("<|im_start|>user").unwrap()[0],
        1
    );
}

#[test]
fn gguf_of_another_architecture_is_refused_by_field() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gpt2.gguf");
    write_tiny_gguf(&path, "gpt2");
    let err = load_model(
        &ResolvedModel::Gguf {
            id: "x".into(),
            path: path.clone(),
        },
        &ModelOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("gpt2.gguf") && err.contains("`general.architecture`") && err.contains("gpt2"),
        "{err}"
    );
}

/// The tiny model's GGUF with Q4_1 projections (those whose rows are whole 32-value blocks; the
/// 176-wide down projection stays f32) and a Q8_0 embedding, served natively: the same weights
/// dequantized to f32 are the reference, the difference is the 8-bit activations only.
#[test]
fn a_quantized_gguf_serves_natively_close_to_its_dequantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny-q.gguf");
    write_tiny_gguf_with(&path, "llama", |name| {
        if name == "token_embd.weight" {
            GgmlDType::Q8_0
        } else if name.ends_with("ffn_down.weight")
            || !name.starts_with("blk.")
            || name.contains("norm")
        {
            GgmlDType::F32
        } else {
            GgmlDType::Q4_1
        }
    });
    let resolved = ResolvedModel::Gguf {
        id: "tiny-q".into(),
        path: path.clone(),
    };
    let dense = load_model(&resolved, &ModelOptions::default()).unwrap();
    let native = load_model(
        &resolved,
        &ModelOptions {
            native_quant: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        native
            .model
            .linear(0, loraplex::model::Proj::Q)
            .unwrap()
            .base(),
        loraplex::model::BaseWeight::Quant(_)
    ));
    assert!(matches!(
        native.model.embed_tokens,
        loraplex::model::Embedding::Quant(_)
    ));
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    let (mut worst, mut scale, mut same, mut total) = (0f32, 0f32, 0, 0);
    for case in expected["cases"].as_array().unwrap() {
        let ids = as_u32_vec(&case["input_ids"]);
        let run = |m: &loraplex::model::LoadedModel| -> Vec<Vec<f32>> {
            let mut cache = m.model.new_cache();
            m.model
                .forward(&mut BatchInput {
                    seqs: vec![SeqInput::new(&ids, &mut cache)],
                    logits: LogitsRows::All,
                })
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        for (a, b) in run(&native).iter().zip(&run(&dense)) {
            worst = worst.max(max_abs_diff(a, b));
            scale = scale.max(b.iter().fold(0f32, |m, v| m.max(v.abs())));
            let top = |r: &[f32]| (0..r.len()).max_by(|x, y| r[*x].total_cmp(&r[*y])).unwrap();
            same += usize::from(top(a) == top(b));
            total += 1;
        }
    }
    eprintln!("tiny Q4_1 native vs dequantized: max |logit diff| {worst} (logits up to {scale}); top-1 same at {same} of {total}");
    assert!(worst < 0.05 * scale, "{worst} vs logits up to {scale}");
    assert!(same * 10 >= total * 9, "{same} of {total}");
}

#[test]
fn a_tensor_type_not_served_natively_is_named_with_the_supported_list() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny-q8_1.gguf");
    write_tiny_gguf_with(&path, "llama", |name| {
        if name == "blk.0.attn_q.weight" {
            GgmlDType::Q8_1
        } else {
            GgmlDType::F32
        }
    });
    let err = load_model(
        &ResolvedModel::Gguf {
            id: "x".into(),
            path: path.clone(),
        },
        &ModelOptions {
            native_quant: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("blk.0.attn_q.weight")
            && err.contains("Q8_1")
            && err.contains("Q4_1")
            && err.contains("Q6K"),
        "{err}"
    );
}

/// A quantized q projection whose rows are not whole (even-sized) heads cannot be un-permuted:
/// named, not silently mis-ordered.
#[test]
fn a_quantized_q_projection_that_is_not_whole_heads_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny-bad-heads.gguf");
    write_tiny_gguf_with(&path, "llama", |name| {
        if name.starts_with("blk.")
            && name.ends_with("weight")
            && !name.contains("norm")
            && !name.contains("ffn_down")
        {
            GgmlDType::Q4_1
        } else {
            GgmlDType::F32
        }
    });
    // Claim 6 heads: 64 rows of q are not 6 heads of even size.
    let mut bytes = std::fs::read(&path).unwrap();
    let key = b"llama.attention.head_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // value type (u32 = 4) then the value
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 4);
    bytes[at + 4..at + 8].copy_from_slice(&6u32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let err = load_model(
        &ResolvedModel::Gguf {
            id: "x".into(),
            path: path.clone(),
        },
        &ModelOptions {
            native_quant: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("attn_q.weight") && err.contains("heads"),
        "{err}"
    );
}

/// A GGUF cut short inside its tensor data is refused by file and tensor, as stored (its last
/// tensor, Q4_K, repacked from the mapped file where our kernel serves it) or dequantized:
/// never read past its end, never a panic.
#[test]
fn a_truncated_gguf_names_the_file_and_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cut.gguf");
    std::fs::copy(fixtures().join("kquant").join("wide-q4_k_m.gguf"), &path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // The last tensor by offset is `blk.1.ffn_up.weight` (Q4_K, 73,728 bytes).
    file.set_len(len - 1000).unwrap();
    for native_quant in [true, false] {
        let err = load_model(
            &ResolvedModel::Gguf {
                id: "cut".into(),
                path: path.clone(),
            },
            &ModelOptions {
                native_quant,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cut.gguf")
                && err.contains("blk.1.ffn_up.weight")
                && err.contains("bytes"),
            "native_quant {native_quant}: {err}"
        );
    }
}
