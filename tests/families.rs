//! Model families against transformers + PEFT (`tests/fixtures/families/`, made by
//! `make_families.py`): tiny random Mistral (sliding window 6 on every layer), Qwen2 (q/k/v
//! biases, window 6 on layers 1 and 2), Qwen3 (q/k head norms), Gemma 2 (see `Arch`: scaled
//! embeddings, 1 + w and sandwich norms, GeGLU, soft-caps, alternating windows) and Gemma 3
//! (q/k norms, a local RoPE base on sliding layers, linear RoPE scaling on full ones), Phi-3
//! (fused `qkv_proj` / `gate_up_proj`, adapters on the fused modules split by rows). Logits at every position of
//! three prompts (two longer than the window), base and under LoRA, DoRA and IA³; a mixed batch
//! equals each row alone; the engine's greedy answers (paged KV in blocks of 4, prompts in
//! chunks of at most 9 tokens, so windows cross blocks and chunks) equal transformers'.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use loraplex::engine::scheduler::RequestClass;
use loraplex::engine::{
    Engine, GenerationConfig, KvConfig, SamplingParams, SchedulerConfig, ValidRequest,
};
use loraplex::metrics::Metrics;
use loraplex::model::{load_model, KvDtype, LoadedModel, ModelOptions};

const FAMILIES: [&str; 6] = ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"];
const ADAPTERS: [&str; 3] = ["lora", "dora", "ia3"];

fn dir(family: &str) -> PathBuf {
    fixtures().join("families").join(family)
}

fn load(family: &str) -> LoadedModel {
    let resolved = loraplex::model::source::ResolvedModel::HfDir {
        id: family.into(),
        path: dir(family),
    };
    load_model(&resolved, &ModelOptions::default())
        .unwrap_or_else(|e| panic!("{family} loads: {e}"))
}

fn expected(family: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(family).join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn worst(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| max_abs_diff(g, w))
        .fold(0.0, f32::max)
}

#[test]
fn every_family_matches_transformers_at_every_position() {
    for family in FAMILIES {
        let loaded = load(family);
        let e = expected(family);
        let mut base = 0f32;
        for i in 0..3 {
            let prompt = ids(&e[&format!("input_ids_{i}")]);
            let got = logits_all(&loaded, &[(&prompt, None)]);
            base = base.max(worst(&got, &rows(&e[&format!("base_{i}")])));
        }
        eprintln!("{family}: max |logit - transformers| = {base:e}");
        assert!(base < 1e-4, "{family}: base logits off by {base}");
    }
}

#[test]
fn a_sliding_window_shows_past_its_length() {
    // The windowed families' longer prompts would be scored differently with full attention:
    // the fixture's window is in play (compared with the model that ignores it).
    for family in ["mistral", "qwen2", "gemma2", "gemma3", "phi3"] {
        let loaded = load(family);
        let mut full = load(family);
        // Windows longer than any prompt: full attention, the same layers still "sliding"
        // (Gemma 3 picks its local RoPE by that).
        for w in full.model.config.arch.windows.iter_mut().flatten() {
            *w = 1 << 20;
        }
        let e = expected(family);
        let prompt = ids(&e["input_ids_2"]);
        let a = logits_all(&loaded, &[(&prompt, None)]);
        let b = logits_all(&full, &[(&prompt, None)]);
        // Within the window the two agree; past it they part.
        assert!(max_abs_diff(&a[3], &b[3]) < 1e-5, "{family}");
        assert!(
            max_abs_diff(&a[29], &b[29]) > 1e-3,
            "{family}: the window changed nothing"
        );
    }
}

#[test]
fn every_family_with_lora_dora_and_ia3_matches_peft() {
    for family in FAMILIES {
        let loaded = load(family);
        let e = expected(family);
        for name in ADAPTERS {
            let w = bind_dir(&loaded, &dir(family).join("adapters").join(name));
            let mut off = 0f32;
            for i in 0..3 {
                let prompt = ids(&e[&format!("input_ids_{i}")]);
                let got = logits_all(&loaded, &[(&prompt, Some(&w))]);
                let want = rows(&e[&format!("{name}_{i}")]);
                off = off.max(worst(&got, &want));
                // The adapter changes the output (else the comparison says nothing).
                let base = rows(&e[&format!("base_{i}")]);
                assert!(worst(&want, &base) > 1e-3, "{family} {name}: no effect");
            }
            eprintln!("{family} {name}: max |logit - PEFT| = {off:e}");
            assert!(off < 1e-4, "{family} {name}: logits off by {off}");
        }
        // A mixed batch (every adapter and the base, rows interleaved) equals each row alone.
        let ws: Vec<_> = ADAPTERS
            .iter()
            .map(|n| bind_dir(&loaded, &dir(family).join("adapters").join(n)))
            .collect();
        let p: Vec<Vec<u32>> = (0..3).map(|i| ids(&e[&format!("input_ids_{i}")])).collect();
        let batch_rows = vec![
            (&p[2][..], Some(&ws[0])),
            (&p[0][..], Some(&ws[1])),
            (&p[1][..], None),
            (&p[1][..], Some(&ws[2])),
            (&p[0][..], Some(&ws[0])),
        ];
        let batch = logits_all(&loaded, &batch_rows);
        let alone: Vec<Vec<f32>> = batch_rows
            .iter()
            .flat_map(|r| logits_all(&loaded, std::slice::from_ref(r)))
            .collect();
        let d = worst(&batch, &alone);
        assert!(
            d < 1e-5,
            "{family}: mixed batch differs from rows alone by {d}"
        );
    }
}

#[test]
fn the_engine_answers_as_transformers_greedy() {
    for family in FAMILIES {
        let model = Arc::new(load(family));
        let e = expected(family);
        let (engine, mut worker) = Engine::manual(
            model.clone(),
            SchedulerConfig {
                max_running: 4,
                kv_cache_tokens: 512,
                max_queue: 16,
                max_queue_per_tenant: 16,
                max_batched_tokens: 9,
                fair_lag_tokens: 256,
            },
            KvConfig {
                block_size: 4,
                dtype: KvDtype::F32,
                prefix_caching: true,
            },
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let request = |prompt: Vec<u32>| ValidRequest {
            prompt,
            config: GenerationConfig {
                max_tokens: 16,
                ignore_eos: true,
                sampling: SamplingParams::greedy(),
                ..Default::default()
            },
            logprobs: None,
            adapter: None,
            adapter_label: None,
            adapter_name: None,
            tenant: None,
            class: RequestClass::default(),
        };
        // All three at once (a batch), then again (prefix-cache hits in the window's blocks).
        for round in 0..2 {
            let rxs: Vec<_> = (0..3)
                .map(|i| {
                    engine
                        .submit(request(ids(&e[&format!("input_ids_{i}")])))
                        .unwrap()
                })
                .collect();
            let got = drive(&mut worker, rxs);
            for (i, g) in got.into_iter().enumerate() {
                let want = ids(&e[&format!("greedy_{i}")]);
                assert_eq!(g.unwrap(), want, "{family} prompt {i} round {round}");
            }
        }
    }
}

#[test]
fn an_unknown_family_is_named_with_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(dir("qwen3").join(f), tmp.path().join(f)).unwrap();
    }
    let config = std::fs::read_to_string(dir("qwen3").join("config.json"))
        .unwrap()
        .replace("\"qwen3\"", "\"falcon\"");
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    let resolved = loraplex::model::source::ResolvedModel::HfDir {
        id: "x".into(),
        path: tmp.path().to_path_buf(),
    };
    let err = load_model(&resolved, &ModelOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("falcon")
            && err.contains("model_type")
            && err.contains("mistral, qwen2, qwen3"),
        "{err}"
    );
}

#[test]
fn every_family_trains_lora_and_dora_and_serves_what_it_trained() {
    use common::training::{config, small_dataset};
    use loraplex::adapters::{bind, BindOptions, PeftAdapter};
    use loraplex::model::Proj;
    use loraplex::train::{train, Method};
    for family in FAMILIES {
        let m = load(family);
        let tmp = tempfile::tempdir().unwrap();
        // Examples up to 64 tokens: the windows (6) are in play in training too.
        let data = small_dataset(&m, tmp.path());
        for method in [Method::Lora, Method::Dora] {
            let out = tmp.path().join(format!("{method:?}"));
            let mut cfg = config(out.clone(), method, 30);
            cfg.spec.base_model = family.into();
            if family == "phi3" {
                // q/k/v and gate/up are fused there: training on them is refused, by name.
                let err = train(&m.model, &data, None, &cfg).unwrap_err().to_string();
                assert!(
                    err.contains("--target-modules") && err.contains("qkv_proj"),
                    "{err}"
                );
                cfg.spec.targets = vec![Proj::O, Proj::Down];
                // Two projections of seven learn more slowly: more steps, same bar.
                cfg.max_steps = Some(90);
            }
            let report = train(&m.model, &data, None, &cfg).unwrap();
            eprintln!(
                "{family} {method:?}: loss {} -> {}",
                report.first_loss, report.final_loss
            );
            assert!(
                report.final_loss < 0.6 * report.first_loss,
                "{family} {method:?}: {} -> {}",
                report.first_loss,
                report.final_loss
            );
            let served = bind(
                &PeftAdapter::load(&out).unwrap(),
                &m.model,
                &BindOptions::default(),
            )
            .unwrap();
            let in_memory = report.adapter.weights(&m.model, None).unwrap();
            let ids = data.examples[0].ids.clone();
            let a = logits_all(&m, &[(&ids, Some(&served))]);
            let b = logits_all(&m, &[(&ids, Some(&in_memory))]);
            let d = worst(&a, &b);
            assert!(d < 1e-5, "{family} {method:?}: served vs trained {d}");
        }
    }
}

#[test]
fn every_family_exports_a_directory_that_loads_back_the_same() {
    for family in FAMILIES {
        let m = load(family);
        let tmp = tempfile::tempdir().unwrap();
        loraplex::model::export::save_hf_dir(&m.model, &m, tmp.path()).unwrap();
        let config: serde_json::Value = read_json(tmp.path().join("config.json"));
        let model_type = if family == "gemma3" {
            "gemma3_text"
        } else {
            family
        };
        assert_eq!(config["model_type"], model_type);
        if family.starts_with("gemma") {
            // transformers' config class takes an integer only.
            assert!(config["query_pre_attn_scalar"].is_u64(), "{config}");
        }
        let resolved = loraplex::model::source::ResolvedModel::HfDir {
            id: "x".into(),
            path: tmp.path().to_path_buf(),
        };
        let back = load_model(&resolved, &ModelOptions::default()).unwrap();
        assert_eq!(back.model.config.arch, m.model.config.arch, "{family}");
        let e = expected(family);
        let prompt = ids(&e["input_ids_2"]);
        let d = worst(
            &logits_all(&back, &[(&prompt, None)]),
            &logits_all(&m, &[(&prompt, None)]),
        );
        assert!(d == 0.0, "{family}: {d}");
    }
}

/// LoRA and DoRA adapters trained by `serve train` on each family (`check_trained.py` made them
/// and PEFT's logits of them): PEFT reads our exports as we mean them.
#[test]
fn trained_exports_give_our_logits_in_peft() {
    for family in FAMILIES {
        let loaded = load(family);
        let e = expected(family);
        let trained = dir(family).join("trained");
        let want: HashMap<String, Tensor> =
            candle_core::safetensors::load(trained.join("expected.safetensors"), &Device::Cpu)
                .unwrap();
        for name in ["lora", "dora"] {
            let w = bind_dir(&loaded, &trained.join(name));
            let mut off = 0f32;
            for i in 0..3 {
                let prompt = ids(&e[&format!("input_ids_{i}")]);
                let got = logits_all(&loaded, &[(&prompt, Some(&w))]);
                off = off.max(worst(&got, &rows(&want[&format!("{name}_{i}")])));
            }
            eprintln!("{family} trained {name}: max |logit - PEFT| = {off:e}");
            assert!(off < 1e-4, "{family} trained {name}: {off}");
        }
    }
}

/// `serve merge` of each PEFT adapter (on Phi-3: the fused modules, merged by rows) gives the
/// logits PEFT gives unmerged.
#[test]
fn merging_each_adapter_gives_peft_logits() {
    for family in FAMILIES {
        let loaded = load(family);
        let e = expected(family);
        for name in ADAPTERS {
            let peft =
                loraplex::adapters::PeftAdapter::load(&dir(family).join("adapters").join(name))
                    .unwrap();
            let merged = loraplex::adapters::merge::merge(&loaded.model, &peft)
                .unwrap_or_else(|e| panic!("{family} {name}: {e}"));
            let mut m = load(family);
            m.model = merged;
            let prompt = ids(&e["input_ids_2"]);
            let d = worst(
                &logits_all(&m, &[(&prompt, None)]),
                &rows(&e[&format!("{name}_2")]),
            );
            assert!(d < 1e-4, "{family} {name} merged: {d}");
        }
    }
}

/// NF4 (`--quantize nf4`) on each family: with and without adapters, the same logits as the
/// model whose NF4 projections are dequantized to dense weights (the QLoRA contract).
#[test]
fn every_family_serves_an_nf4_base_as_its_dequantized_weights() {
    use loraplex::model::{quantize_nf4, BaseWeight, Proj};
    for family in FAMILIES {
        let mut q = load(family);
        quantize_nf4(&mut q.model).unwrap();
        let mut dense = load(family);
        dense.model = q.model.clone();
        for l in 0..dense.model.layers.len() {
            for p in Proj::ALL {
                let lin = dense.model.linear_mut(l, p).unwrap();
                assert!(matches!(lin.base(), BaseWeight::Nf4(_)), "{family}");
                let w = lin.base().dense().unwrap();
                lin.set_base(BaseWeight::Dense(w));
            }
        }
        let e = expected(family);
        let prompt = ids(&e["input_ids_2"]);
        for name in [None, Some("lora"), Some("dora")] {
            let (wq, wd) = match name {
                None => (None, None),
                Some(n) => {
                    let d = dir(family).join("adapters").join(n);
                    (Some(bind_dir(&q, &d)), Some(bind_dir(&dense, &d)))
                }
            };
            let a = logits_all(&q, &[(&prompt, wq.as_ref())]);
            let b = logits_all(&dense, &[(&prompt, wd.as_ref())]);
            let d = worst(&a, &b);
            assert!(d < 1e-4, "{family} {name:?}: NF4 vs dequantized {d}");
            // And NF4 is not the f32 model (the comparison would be vacuous otherwise).
            if name.is_none() {
                assert!(worst(&a, &rows(&e["base_2"])) > 1e-4, "{family}");
            }
        }
    }
}
