//! The one Llama on the tiny fixture model against transformers' logits
//! (`tests/fixtures/tiny-llama/expected_logits.json`, transformers 5.24 float32 CPU).

mod common;

use candle_core::Tensor;
use common::*;
use loraplex::model::llama::SeqInput;
use loraplex::model::{BatchInput, LogitsRows};

fn forward_all(loaded: &loraplex::model::LoadedModel, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = loaded.model.new_cache();
    let logits = loaded
        .model
        .forward(&mut BatchInput {
            seqs: vec![SeqInput::new(ids, &mut cache)],
            logits: LogitsRows::All,
        })
        .unwrap();
    logits.to_vec2().unwrap()
}

#[test]
fn logits_match_transformers_at_every_position() {
    let loaded = load_tiny();
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    let mut worst = 0f32;
    for case in expected["cases"].as_array().unwrap() {
        let ids = as_u32_vec(&case["input_ids"]);
        let got = forward_all(&loaded, &ids);
        let want = case["base_logits"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            worst = worst.max(max_abs_diff(g, &as_f32_vec(w)));
        }
    }
    eprintln!("tiny model: max |logit - transformers| = {worst:e}");
    assert!(worst < 1e-4, "max logit error {worst}");
}

#[test]
fn tokenizer_reproduces_fixture_ids() {
    let loaded = load_tiny();
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    for case in expected["cases"].as_array().unwrap() {
        let ids = loaded
            .tokenizer
            .encode(case["text"].as_str().unwrap())
            .unwrap();
        assert_eq!(ids, as_u32_vec(&case["input_ids"]), "{}", case["text"]);
    }
}

#[test]
fn batched_forward_equals_each_sequence_alone() {
    let loaded = load_tiny();
    let seqs: [Vec<u32>; 3] = [(3..20).collect(), vec![7, 8, 9], (40..49).rev().collect()];
    let alone: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| forward_all(&loaded, s)).collect();
    let mut caches: Vec<_> = seqs.iter().map(|_| loaded.model.new_cache()).collect();
    let batch = loaded
        .model
        .forward(&mut BatchInput {
            seqs: seqs
                .iter()
                .zip(caches.iter_mut())
                .map(|(s, c)| SeqInput::new(s, c))
                .collect(),
            logits: LogitsRows::All,
        })
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut row = 0;
    let mut worst = 0f32;
    for a in &alone {
        for r in a {
            worst = worst.max(max_abs_diff(&batch[row], r));
            row += 1;
        }
    }
    assert_eq!(row, batch.len());
    assert!(worst < 1e-5, "batched vs alone differ by {worst}");

    // A decode step for all three at once (with their caches) equals the full forward of
    // each sequence extended by one token.
    let next = [5u32, 6, 7];
    let step = loaded
        .model
        .forward(&mut BatchInput {
            seqs: next
                .iter()
                .zip(caches.iter_mut())
                .map(|(t, c)| SeqInput::new(std::slice::from_ref(t), c))
                .collect(),
            logits: LogitsRows::Last,
        })
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let mut ext = s.clone();
        ext.push(next[i]);
        let full = forward_all(&loaded, &ext);
        let d = max_abs_diff(&step[i], full.last().unwrap());
        assert!(d < 1e-5, "cached decode of sequence {i} differs by {d}");
    }
}

#[test]
fn forward_rejects_out_of_vocabulary_and_over_context() {
    let loaded = load_tiny();
    let mut cache = loaded.model.new_cache();
    let err = loaded
        .model
        .forward(&mut BatchInput {
            seqs: vec![SeqInput::new(&[1, 100_000], &mut cache)],
            logits: LogitsRows::Last,
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("100000") && err.contains("vocabulary"),
        "{err}"
    );
    let long: Vec<u32> = vec![3; loaded.model.config.max_position_embeddings + 1];
    let err = loaded
        .model
        .forward(&mut BatchInput {
            seqs: vec![SeqInput::new(&long, &mut cache)],
            logits: LogitsRows::Last,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("context"), "{err}");
}

#[test]
fn gradients_flow_through_the_model_to_a_trainable_input() {
    // The trainer backpropagates through this same forward: check a gradient reaches a Var
    // that feeds the first layer (every fused op without backward would cut it).
    let loaded = load_tiny();
    let m = &loaded.model;
    let embed = candle_core::Var::from_tensor(&m.embed_tokens.dense().unwrap()).unwrap();
    let mut model = m.clone();
    model.embed_tokens = loraplex::model::Embedding::Dense(embed.as_tensor().clone());
    let mut cache = model.new_cache();
    let logits = model
        .forward(&mut BatchInput {
            seqs: vec![SeqInput::new(&[3, 4, 5, 6], &mut cache)],
            logits: LogitsRows::All,
        })
        .unwrap();
    let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g: Tensor = grads
        .get(embed.as_tensor())
        .expect("gradient reaches the embedding")
        .clone();
    // Rows of tokens not in the input get gradient only through the tied/untied lm_head path.
    let norm = g
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm > 0.0);
}

/// `--dtype bf16` on CPU: projections and lm_head in bf16 (f32 activations, bf16 dot products),
/// against the f32 reference logits: within bf16's rounding, same top-1 token everywhere.
#[test]
fn bf16_weights_stay_close_to_f32() {
    let resolved = loraplex::model::source::ResolvedModel::HfDir {
        id: "tiny-llama".into(),
        path: tiny_dir(),
    };
    let m = loraplex::model::load_model(
        &resolved,
        &loraplex::model::ModelOptions {
            bf16_weights: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        m.model.linear(0, loraplex::model::Proj::Up).unwrap().base(),
        loraplex::model::BaseWeight::Bf16(_)
    ));
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    let (mut worst, mut same, mut total) = (0f32, 0, 0);
    for case in expected["cases"].as_array().unwrap() {
        let ids = as_u32_vec(&case["input_ids"]);
        let mut cache = m.model.new_cache();
        let got: Vec<Vec<f32>> = m
            .model
            .forward(&mut loraplex::model::BatchInput {
                seqs: vec![loraplex::model::llama::SeqInput::new(&ids, &mut cache)],
                logits: loraplex::model::LogitsRows::All,
            })
            .unwrap()
            .to_vec2()
            .unwrap();
        for (g, w) in got.iter().zip(case["base_logits"].as_array().unwrap()) {
            let w = as_f32_vec(w);
            worst = worst.max(max_abs_diff(g, &w));
            let top = |r: &[f32]| (0..r.len()).max_by(|a, b| r[*a].total_cmp(&r[*b])).unwrap();
            same += usize::from(top(g) == top(&w));
            total += 1;
        }
    }
    eprintln!("tiny bf16 weights vs transformers f32: max |logit diff| {worst}, top-1 same at {same} of {total}");
    assert!(worst < 0.05, "{worst}");
    assert_eq!(same, total);
}
