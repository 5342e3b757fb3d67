//! A K-quant GGUF as users bring one: `tests/fixtures/kquant/wide-q4_k_m.gguf`, a random Llama of
//! 256 hidden (whole 256-value super-blocks) converted the way llama.cpp's converter writes Llama
//! and quantized by llama.cpp's own `llama-quantize` to Q4_K_M (Q4_K, and Q6_K for the output,
//! layer 1's attn_v and ffn_down), and the same model as `wide-q5_k_m.gguf` (Q5_K in Q4_K's
//! place) and `wide-q5_0.gguf` (Q5_0); `make_kquant.py` beside them. The reference is transformers' forward on the weights
//! dequantized by gguf-py. Loaded dequantized, ours must match it to f32 rounding; served as
//! stored (Q4_K, Q5_K, Q6_K and Q5_0 by our integer kernels where the CPU has AVX-512 VNNI, candle's
//! elsewhere), within what 8-bit activations cost — and the engine's answers equal
//! the single-sequence loop's.

mod common;

use std::sync::Arc;

use common::*;
use loraplex::model::llama::SeqInput;
use loraplex::model::source::ResolvedModel;
use loraplex::model::{
    load_model, BaseWeight, BatchInput, LoadedModel, LogitsRows, ModelOptions, Proj,
};

fn resolved() -> ResolvedModel {
    resolved_as("q4_k_m")
}

/// `wide-TYPE.gguf` (`make_kquant.py … TYPE`).
fn resolved_as(ty: &str) -> ResolvedModel {
    ResolvedModel::Gguf {
        id: format!("wide-{ty}"),
        path: fixtures().join("kquant").join(format!("wide-{ty}.gguf")),
    }
}

fn logits(m: &LoadedModel, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = m.model.new_cache();
    m.model
        .forward(&mut BatchInput {
            seqs: vec![SeqInput::new(ids, &mut cache)],
            logits: LogitsRows::All,
        })
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn top(r: &[f32]) -> usize {
    (0..r.len()).max_by(|x, y| r[*x].total_cmp(&r[*y])).unwrap()
}

#[test]
fn a_llama_quantize_q4_k_m_file_serves_as_stored_close_to_its_dequantized_weights() {
    serves_as_stored_close_to_its_dequantized_weights("q4_k_m", "expected.json");
}

/// The same model quantized to Q5_K_M (Q5_K, with Q6_K where Q4_K_M has it).
#[test]
fn a_llama_quantize_q5_k_m_file_serves_as_stored_close_to_its_dequantized_weights() {
    serves_as_stored_close_to_its_dequantized_weights("q5_k_m", "expected-q5_k_m.json");
}

/// The same model quantized to Q5_0 (Q6_K for the output): Q5_0 is what llama-quantize writes
/// for K-quant files' rows that are not whole super-blocks (Qwen2.5-0.5B's 896-wide rows).
#[test]
fn a_llama_quantize_q5_0_file_serves_as_stored_close_to_its_dequantized_weights() {
    serves_as_stored_close_to_its_dequantized_weights("q5_0", "expected-q5_0.json");
}

fn serves_as_stored_close_to_its_dequantized_weights(file_type: &str, reference: &str) {
    let expected = read_json(fixtures().join("kquant").join(reference));
    let dense = load_model(&resolved_as(file_type), &ModelOptions::default()).unwrap();
    let native = load_model(
        &resolved_as(file_type),
        &ModelOptions {
            native_quant: true,
            ..Default::default()
        },
    )
    .unwrap();
    // Every projection is served as stored, by the type the file has.
    let types = expected["types"].as_object().unwrap();
    let avx512 = loraplex::quant::int8::Kernel::detect().is_avx512();
    for layer in 0..2 {
        for (proj, name) in [
            (Proj::Q, "attn_q"),
            (Proj::K, "attn_k"),
            (Proj::V, "attn_v"),
            (Proj::O, "attn_output"),
            (Proj::Gate, "ffn_gate"),
            (Proj::Up, "ffn_up"),
            (Proj::Down, "ffn_down"),
        ] {
            let BaseWeight::Quant(q) = native.model.linear(layer, proj).unwrap().base() else {
                panic!("blk.{layer}.{name} is not served as stored");
            };
            let ty = types[&format!("blk.{layer}.{name}.weight")]
                .as_str()
                .unwrap();
            let want = match (ty, avx512) {
                ("Q4_K", true) => "q4_k",
                ("Q5_K", true) => "q5_k",
                ("Q5_0", true) => "q5_0",
                ("Q6_K", true) => "q6_k",
                _ => "ggml",
            };
            assert_eq!(q.kernel_name(), want, "blk.{layer}.{name} ({ty})");
        }
    }
    let (mut dense_worst, mut worst, mut scale, mut same, mut total) = (0f32, 0f32, 0f32, 0, 0);
    for case in expected["cases"].as_array().unwrap() {
        let ids = as_u32_vec(&case["input_ids"]);
        let reference: Vec<Vec<f32>> = case["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(as_f32_vec)
            .collect();
        for ((d, n), r) in logits(&dense, &ids)
            .iter()
            .zip(&logits(&native, &ids))
            .zip(&reference)
        {
            dense_worst = dense_worst.max(max_abs_diff(d, r));
            worst = worst.max(max_abs_diff(n, r));
            scale = scale.max(r.iter().fold(0f32, |m, v| m.max(v.abs())));
            same += usize::from(top(n) == top(r));
            total += 1;
        }
    }
    eprintln!(
        "{file_type}: dequantized vs transformers {dense_worst:.2e}; as stored {worst:.3} (logits up to \
         {scale:.2}); top-1 same at {same} of {total}"
    );
    // The reference's logits are rounded to 6 significant digits.
    assert!(
        dense_worst < 1e-4 * scale.max(1.0),
        "{dense_worst} vs {scale}"
    );
    assert!(worst < 0.05 * scale, "{worst} vs logits up to {scale}");
    assert!(same * 10 >= total * 9, "{same} of {total}");
}

/// Served as stored through the engine (paged KV, batched steps) and through the single-sequence
/// loop: the same greedy answers.
#[test]
fn the_engine_serves_the_k_quant_file_as_the_single_sequence_loop_does() {
    let model = Arc::new(
        load_model(
            &resolved(),
            &ModelOptions {
                native_quant: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|i| {
            (0..9 + 5 * i)
                .map(|j| 3 + ((j * 37 + i * 11) % 500) as u32)
                .collect()
        })
        .collect();
    let metrics = Arc::new(loraplex::metrics::Metrics::new());
    let (engine, mut worker) = paged_engine(model.clone(), 512, 16, metrics);
    let rxs = prompts
        .iter()
        .map(|p| engine.submit(greedy_request(p.clone(), 12)).unwrap())
        .collect();
    let together = drive(&mut worker, rxs);
    for (p, got) in prompts.iter().zip(together) {
        let cfg = loraplex::engine::GenerationConfig {
            max_tokens: 12,
            ignore_eos: true,
            sampling: loraplex::engine::SamplingParams::greedy(),
            ..Default::default()
        };
        let want =
            loraplex::engine::generate(&model.model, &model.tokenizer, p, None, &cfg, |_| {})
                .unwrap()
                .token_ids;
        assert_eq!(got.unwrap(), want);
    }
}
