//! Phi-3's LongRoPE with a partial rotary factor (Phi-3.5-mini, Phi-4-mini) against transformers
//! (`tests/fixtures/families/phi3-longrope`, `make_families.py phi3-longrope`: an original
//! context of 16 positions in 256, short and long factors per frequency, RoPE over 12 of each
//! head's 16 dimensions). Within the original context: the logits at every position; past it:
//! transformers decoding with its KV cache (short factors for the prompt's keys, long ones from
//! position 16 on), which one pass of ours over the same tokens gives, and so does the engine
//! in chunks and blocks.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use loraplex::metrics::Metrics;
use loraplex::model::{load_model, LoadedModel, ModelOptions};

fn load() -> (LoadedModel, HashMap<String, Tensor>) {
    let dir = fixtures().join("families").join("phi3-longrope");
    let resolved = loraplex::model::source::ResolvedModel::HfDir {
        id: "phi3-longrope".into(),
        path: dir.clone(),
    };
    let model = load_model(&resolved, &ModelOptions::default()).expect("loads");
    let e = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    (model, e)
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

fn worst(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| max_abs_diff(g, w))
        .fold(0.0, f32::max)
}

#[test]
fn longrope_with_partial_rotary_matches_transformers() {
    let (m, e) = load();
    let arch = &m.model.config.arch;
    assert_eq!(arch.rotary_dim, Some(12));
    let l = arch.longrope.as_ref().expect("longrope");
    assert_eq!(l.original_max, 16);
    assert!(
        (l.attention_factor - 2f64.sqrt()).abs() < 1e-12,
        "sqrt(1 + ln 16 / ln 16)"
    );
    let (mut within, mut decoded) = (0f32, 0f32);
    for i in 0..3 {
        let prompt = ids(&e[&format!("input_ids_{i}")]);
        let got = logits_all(&m, &[(&prompt, None)]);
        within = within.max(worst(&got, &e[&format!("base_{i}")].to_vec2().unwrap()));
        // One pass over the prompt and transformers' decoded tokens: each position rotated as
        // transformers rotated it when it decoded that token.
        let answer = ids(&e[&format!("decode_ids_{i}")]);
        let all = [prompt.clone(), answer.clone()].concat();
        let got = logits_all(&m, &[(&all, None)]);
        let steps = &got[prompt.len() - 1..prompt.len() - 1 + answer.len()];
        decoded = decoded.max(worst(steps, &e[&format!("decode_{i}")].to_vec2().unwrap()));
    }
    eprintln!("within the original context: {within:e}; decoding past it: {decoded:e}");
    assert!(within < 1e-4, "{within}");
    assert!(decoded < 1e-4, "{decoded}");
    // A prompt past the original context in one pass: transformers rotates all of it by the
    // long factors, we the positions before 16 by the short ones (measured, as README says).
    let full = ids(&e["full_ids"]);
    let got = logits_all(&m, &[(&full, None)]);
    let off = worst(&got, &e["full"].to_vec2().unwrap());
    eprintln!("a 30-token prompt in one pass: {off:e} from transformers' all-long rotation");
}

#[test]
fn the_engine_decodes_past_the_original_context_as_transformers() {
    let (m, e) = load();
    let model = Arc::new(m);
    let (engine, mut worker) = paged_engine(model, 512, 5, Arc::new(Metrics::new()));
    let request = |prompt: Vec<u32>| greedy_request(prompt, 24);
    for round in 0..2 {
        let rxs: Vec<_> = (0..3)
            .map(|i| {
                engine
                    .submit(request(ids(&e[&format!("input_ids_{i}")])))
                    .unwrap()
            })
            .collect();
        for (i, got) in drive(&mut worker, rxs).into_iter().enumerate() {
            let want = ids(&e[&format!("decode_ids_{i}")]);
            assert_eq!(got.unwrap(), want, "prompt {i} round {round}");
        }
    }
}

/// `serve train` through the differentiable path (its RoPE turns 12 of 16 dimensions by the
/// same tables): the loss falls and the export serves what was trained; `serve merge`'s
/// directory states LongRoPE and the partial factor, and loads back to the same logits.
#[test]
fn longrope_models_train_and_export() {
    use common::training::{config, small_dataset};
    use loraplex::adapters::{bind, BindOptions, PeftAdapter};
    use loraplex::train::{train, Method};
    let (m, e) = load();
    let tmp = tempfile::tempdir().unwrap();
    let data = small_dataset(&m, tmp.path());
    let out = tmp.path().join("lora");
    let mut cfg = config(out.clone(), Method::Lora, 30);
    cfg.spec.base_model = "phi3-longrope".into();
    let report = train(&m.model, &data, None, &cfg).unwrap();
    eprintln!("loss {} -> {}", report.first_loss, report.final_loss);
    assert!(report.final_loss < 0.6 * report.first_loss);
    let served = bind(
        &PeftAdapter::load(&out).unwrap(),
        &m.model,
        &BindOptions::default(),
    )
    .unwrap();
    let trained = report.adapter.weights(&m.model, None).unwrap();
    // Examples run past the original context (16): both rotation sets are trained through.
    let long = data.examples.iter().map(|x| x.ids.len()).max().unwrap();
    assert!(long > 16, "{long}");
    let ids = data.examples[0].ids.clone();
    let d = worst(
        &logits_all(&m, &[(&ids, Some(&served))]),
        &logits_all(&m, &[(&ids, Some(&trained))]),
    );
    assert!(d < 1e-5, "served vs trained {d}");

    let dir = tmp.path().join("export");
    loraplex::model::export::save_hf_dir(&m.model, &m, &dir).unwrap();
    let config: serde_json::Value = read_json(dir.join("config.json"));
    assert_eq!(
        config["rope_parameters"]["rope_type"], "longrope",
        "{config}"
    );
    assert_eq!(config["partial_rotary_factor"], 0.75, "{config}");
    let resolved = loraplex::model::source::ResolvedModel::HfDir {
        id: "x".into(),
        path: dir,
    };
    let back = load_model(&resolved, &ModelOptions::default()).unwrap();
    assert_eq!(back.model.config.arch, m.model.config.arch);
    let prompt = [ids_of(&e, "input_ids_1"), ids_of(&e, "decode_ids_1")].concat();
    let d = worst(
        &logits_all(&back, &[(&prompt, None)]),
        &logits_all(&m, &[(&prompt, None)]),
    );
    assert!(d == 0.0, "{d}");
}

fn ids_of(e: &HashMap<String, Tensor>, key: &str) -> Vec<u32> {
    ids(&e[key])
}
