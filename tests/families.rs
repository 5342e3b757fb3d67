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
use loraplex::metrics::Metrics;
use loraplex::model::{load_model, LoadedModel, ModelOptions};

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
        let (engine, mut worker) = paged_engine(model.clone(), 512, 9, Arc::new(Metrics::new()));
        let request = |prompt: Vec<u32>| greedy_request(prompt, 16);
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

/// Where every layer slides (Mistral and Phi-3 here), the engine gives back the KV blocks that
/// left the window as a sequence moves on, and a request holds at most its window, one step's
/// positions and a block of the budget (6 + 9 + 4): the three prompts with answers of 40 tokens
/// each (the longest needs more positions than the whole budget of 48) run at once in a pool of
/// 64 positions, and equal the unpaged path's answers (whose logits match transformers at every
/// position). A family with a full-attention layer still needs the whole request's positions,
/// and the longest is refused naming them.
#[test]
fn windowed_families_give_back_the_blocks_behind_the_window() {
    let mut served = 0;
    for family in FAMILIES {
        let model = Arc::new(load(family));
        let e = expected(family);
        let metrics = Arc::new(Metrics::new());
        let (engine, mut worker) = paged_engine(model.clone(), 48, 9, metrics.clone());
        let request = |prompt: Vec<u32>| greedy_request(prompt, 40);
        let prompts: Vec<Vec<u32>> = (0..3).map(|i| ids(&e[&format!("input_ids_{i}")])).collect();
        let Some(window) = model.model.kv_horizon() else {
            let longest = prompts.iter().max_by_key(|p| p.len()).unwrap();
            assert!(longest.len() + 40 > 48);
            let err = engine.submit(request(longest.clone())).unwrap_err();
            assert!(err.to_string().contains("KV positions"), "{family}: {err}");
            continue;
        };
        assert_eq!(window, 6, "{family}: the fixture's window on every layer");
        assert_eq!(engine.kv_held(&request(prompts[0].clone())), 6 + 9 + 4);
        let rxs: Vec<_> = prompts
            .iter()
            .map(|p| engine.submit(request(p.clone())).unwrap())
            .collect();
        let got = drive(&mut worker, rxs);
        for (i, (g, p)) in got.into_iter().zip(&prompts).enumerate() {
            let want = loraplex::engine::generate::generate(
                &model.model,
                &model.tokenizer,
                p,
                None,
                &request(p.clone()).config,
                |_| {},
            )
            .unwrap()
            .token_ids;
            assert_eq!(g.unwrap(), want, "{family} prompt {i}");
        }
        let dropped = metrics.kv_window_dropped.get();
        eprintln!("{family}: {dropped} blocks given back behind the window");
        assert!(dropped >= 3 * 8, "{family}: {dropped}");
        served += 1;
    }
    assert_eq!(served, 2, "Mistral and Phi-3 slide on every layer");
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
fn every_family_trains_lora_dora_and_ia3_and_serves_what_it_trained() {
    use common::training::{config, small_dataset};
    use loraplex::adapters::{bind, BindOptions, PeftAdapter};
    use loraplex::model::Proj;
    use loraplex::train::{train, Method};
    for family in FAMILIES {
        let m = load(family);
        let tmp = tempfile::tempdir().unwrap();
        // Examples up to 64 tokens: the windows (6) are in play in training too.
        let data = small_dataset(&m, tmp.path());
        for method in [Method::Lora, Method::Dora, Method::Ia3] {
            let out = tmp.path().join(format!("{method:?}"));
            let mut cfg = config(out.clone(), method, 30);
            cfg.spec.base_model = family.into();
            if method == Method::Ia3 {
                cfg.lr = 3e-2; // a vector per module: IA³ takes larger steps
            }
            if family == "phi3" {
                // q/k/v and gate/up are fused there and trained as PEFT does, one module each
                // (one A): a part alone is refused, by name.
                let mut part = cfg.clone();
                part.spec.targets = vec![Proj::Q, Proj::O];
                let err = train(&m.model, &data, None, &part).unwrap_err().to_string();
                assert!(
                    err.contains("--target-modules") && err.contains("qkv_proj"),
                    "{err}"
                );
            }
            let report = train(&m.model, &data, None, &cfg).unwrap();
            if family == "phi3" {
                let a = &report.adapter;
                let modules: Vec<String> = a.sites.iter().map(|s| s.module()).collect();
                let modules = [modules, a.ia3.iter().map(|s| s.module()).collect()].concat();
                assert!(
                    modules.contains(&"model.layers.0.self_attn.qkv_proj".to_string()),
                    "{modules:?}"
                );
                assert!(
                    modules.contains(&"model.layers.2.mlp.gate_up_proj".to_string()),
                    "{modules:?}"
                );
                assert_eq!(modules.len(), 3 * 4, "{modules:?}");
                let config: serde_json::Value = read_json(out.join("adapter_config.json"));
                let mut targets: Vec<String> =
                    serde_json::from_value(config["target_modules"].clone()).unwrap();
                targets.sort();
                assert_eq!(targets, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]);
            }
            eprintln!(
                "{family} {method:?}: loss {} -> {}",
                report.first_loss, report.final_loss
            );
            // IA³ trains a vector per module (its 30 steps move the loss less).
            let falls_to = if method == Method::Ia3 { 0.8 } else { 0.6 };
            assert!(
                report.final_loss < falls_to * report.first_loss,
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
            // Read back for resuming (Phi-3: into fused sites again): the same adapter.
            let back = loraplex::train::TrainableAdapter::from_peft(
                &PeftAdapter::load(&out).unwrap(),
                &m.model,
                0.0,
                0,
            )
            .unwrap();
            assert_eq!(back.sites.len(), report.adapter.sites.len(), "{family}");
            assert_eq!(back.ia3.len(), report.adapter.ia3.len(), "{family}");
            let c = logits_all(&m, &[(&ids, Some(&back.weights(&m.model, None).unwrap()))]);
            let d = worst(&c, &b);
            assert!(d < 1e-5, "{family} {method:?}: resumed vs trained {d}");
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
        for name in ["lora", "dora", "ia3"] {
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

/// The family's HF directory as llama.cpp reads its GGUF (`model::gguf`): a copy whose config
/// says what the file carries (Mistral, Qwen2 and Phi-3 without windows; Gemma's attention
/// scale `1/sqrt(head_dim)`; Gemma 3 sliding on five layers of six), its 2-D weights rounded to
/// f16 when `f16` (the converter keeps 1-D ones in f32).
fn as_llama_cpp_reads(family: &str, f16: bool) -> (tempfile::TempDir, LoadedModel) {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir(family)).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    let head_dim = cfg["head_dim"].clone();
    let all = |t: &str| serde_json::Value::from(vec![t; layers]);
    match family {
        "mistral" | "phi3" => cfg["sliding_window"] = serde_json::Value::Null,
        "qwen2" | "qwen3" => {
            cfg["use_sliding_window"] = false.into();
            cfg["layer_types"] = all("full_attention");
        }
        "gemma2" => cfg["query_pre_attn_scalar"] = head_dim,
        "gemma3" => {
            cfg["query_pre_attn_scalar"] = head_dim;
            cfg["layer_types"] = (0..layers)
                .map(|i| {
                    if i % 6 < 5 {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect::<Vec<_>>()
                .into();
        }
        _ => unreachable!(),
    }
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    if f16 {
        let st = tmp.path().join("model.safetensors");
        let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&st, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, t)| {
                let t = if t.rank() == 2 {
                    t.to_dtype(candle_core::DType::F16)
                        .unwrap()
                        .to_dtype(candle_core::DType::F32)
                        .unwrap()
                } else {
                    t
                };
                (n, t)
            })
            .collect();
        candle_core::safetensors::save(&tensors, &st).unwrap();
    }
    let resolved = loraplex::model::source::ResolvedModel::HfDir {
        id: family.into(),
        path: tmp.path().to_path_buf(),
    };
    let loaded = load_model(&resolved, &ModelOptions::default()).unwrap();
    (tmp, loaded)
}

fn load_gguf(family: &str, file: &str, native: bool) -> LoadedModel {
    let resolved = loraplex::model::source::ResolvedModel::Gguf {
        id: family.into(),
        path: dir(family).join("gguf").join(file),
    };
    let opts = ModelOptions {
        native_quant: native,
        ..ModelOptions::default()
    };
    load_model(&resolved, &opts).unwrap_or_else(|e| panic!("{family} {file}: {e}"))
}

#[test]
fn every_family_gguf_from_llama_cpp_matches_its_hf_directory() {
    // F16: exactly the HF directory with its weights rounded to f16. Q8_0 (served as stored,
    // and dequantized): within the quantization's error of the f32 directory.
    for family in FAMILIES {
        let e = expected(family);
        let prompts: Vec<Vec<u32>> = (0..3).map(|i| ids(&e[&format!("input_ids_{i}")])).collect();
        let all = |m: &LoadedModel| -> Vec<Vec<Vec<f32>>> {
            prompts
                .iter()
                .map(|p| logits_all(m, &[(p, None)]))
                .collect()
        };
        let diff = |a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| worst(x, y))
                .fold(0.0, f32::max)
        };
        let (_t, rounded) = as_llama_cpp_reads(family, true);
        let f16 = load_gguf(family, "f16.gguf", true);
        let mut arch = rounded.model.config.arch.clone();
        if family == "mistral" {
            // The converter writes Mistral as `llama`.
            arch.family = loraplex::model::config::Family::Llama;
        }
        if arch.windows.iter().all(Option::is_none) {
            arch.windows.clear();
        }
        assert_eq!(f16.model.config.arch, arch, "{family}");
        assert_eq!(
            f16.tokenizer.encode("Hello world").unwrap(),
            rounded.tokenizer.encode("Hello world").unwrap()
        );
        let mut exact = diff(&all(&f16), &all(&rounded));
        // PEFT adapters bind to the GGUF's modules as to the directory's (Phi-3's fused ones
        // split by rows): the same logits.
        for name in ADAPTERS {
            let adapter = dir(family).join("adapters").join(name);
            let (a, b) = (bind_dir(&f16, &adapter), bind_dir(&rounded, &adapter));
            for p in &prompts {
                exact = exact.max(worst(
                    &logits_all(&f16, &[(p, Some(&a))]),
                    &logits_all(&rounded, &[(p, Some(&b))]),
                ));
            }
        }
        let (_t, reference) = as_llama_cpp_reads(family, false);
        let want = all(&reference);
        // Relative RMS error over every logit: ||got - want|| / ||want||.
        let rel = |got: &[Vec<Vec<f32>>]| {
            let (mut num, mut den) = (0f64, 0f64);
            for (g, w) in got
                .iter()
                .flatten()
                .flatten()
                .zip(want.iter().flatten().flatten())
            {
                num += f64::from(g - w).powi(2);
                den += f64::from(*w).powi(2);
            }
            (num / den).sqrt()
        };
        let q8_native = rel(&all(&load_gguf(family, "q8_0.gguf", true)));
        let q8_dequant = rel(&all(&load_gguf(family, "q8_0.gguf", false)));
        let f16_rel = rel(&all(&f16));
        eprintln!("{family}: f16 gguf vs the f16-rounded dir (base, lora, dora, ia3): max |diff| {exact:e}; relative RMS error vs the f32 dir: f16 {f16_rel:.1e}, q8_0 as stored {q8_native:.1e}, q8_0 dequantized {q8_dequant:.1e}");
        assert!(
            exact <= 1e-6,
            "{family}: f16 gguf off the rounded directory by {exact}"
        );
        // The quantization's tolerance, from the step sizes: f16 rounds each weight to 2^-11
        // of itself, Q8_0 to 1/127 of its block's largest (about 2.5 standard deviations for
        // 32 Gaussian weights): 2.5 · 2048 / 127 ≈ 40 times coarser. Served as stored, the
        // activations are rounded to 8 bits too: √2 more.
        assert!(f16_rel < 5e-3, "{family}: f16 {f16_rel}");
        for (what, d, k) in [
            ("q8_0 as stored", q8_native, 40.0 * 2f64.sqrt()),
            ("q8_0 dequantized", q8_dequant, 40.0),
        ] {
            assert!(
                d < k * f16_rel,
                "{family}: {what} off by {d} (relative RMS), f16 {f16_rel}"
            );
            assert!(
                d > f16_rel,
                "{family}: {what} closer than f16: was it quantized?"
            );
        }
    }
}

#[test]
fn an_unknown_gguf_architecture_is_named_with_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(dir("qwen2").join("gguf").join("f16.gguf")).unwrap();
    // `general.architecture` = "qwen2" → "qwen9" (same length; the keys stay "qwen2.*").
    let at = bytes
        .windows(5)
        .position(|w| w == b"qwen2")
        .expect("the architecture string");
    bytes[at + 4] = b'9';
    let path = tmp.path().join("odd.gguf");
    std::fs::write(&path, bytes).unwrap();
    let resolved = loraplex::model::source::ResolvedModel::Gguf {
        id: "odd".into(),
        path: path.clone(),
    };
    let err = load_model(&resolved, &ModelOptions::default())
        .err()
        .expect("refused")
        .to_string();
    for want in [
        "odd.gguf",
        "general.architecture",
        "qwen9",
        "llama, qwen2, qwen3, gemma2, gemma3, phi3",
    ] {
        assert!(err.contains(want), "{err} lacks {want}");
    }
}

/// Gemma 3 as its multimodal checkpoints ship (`model_type: gemma3`, the text model under
/// `language_model.model.`, a vision tower beside it; `make_families.py gemma3-mm`): its text
/// model is served, equal to transformers' text-only logits, base and under a PEFT LoRA on the
/// language model (keys `model.language_model.…`).
#[test]
fn gemma3_multimodal_checkpoints_serve_their_text_model() {
    let loaded = load("gemma3-mm");
    assert_eq!(
        loaded.model.config.arch.family,
        loraplex::model::config::Family::Gemma3
    );
    let e = expected("gemma3-mm");
    let w = bind_dir(&loaded, &dir("gemma3-mm").join("adapters").join("lora"));
    let (mut base, mut lora) = (0f32, 0f32);
    for i in 0..3 {
        let prompt = ids(&e[&format!("input_ids_{i}")]);
        base = base.max(worst(
            &logits_all(&loaded, &[(&prompt, None)]),
            &rows(&e[&format!("base_{i}")]),
        ));
        let want = rows(&e[&format!("lora_{i}")]);
        assert!(
            worst(&want, &rows(&e[&format!("base_{i}")])) > 1e-3,
            "no effect"
        );
        lora = lora.max(worst(&logits_all(&loaded, &[(&prompt, Some(&w))]), &want));
    }
    eprintln!("gemma3 multimodal: base {base:e}, lora {lora:e}");
    assert!(base < 1e-4 && lora < 1e-4, "base {base}, lora {lora}");
    // PEFT's `all-linear` reaches the vision tower too: those adapters are left out, the rest
    // serves the same.
    let tmp = tempfile::tempdir().unwrap();
    let src = dir("gemma3-mm").join("adapters").join("lora");
    std::fs::copy(
        src.join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let vision =
        "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj";
    tensors.insert(
        format!("{vision}.lora_A.weight"),
        Tensor::ones((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        format!("{vision}.lora_B.weight"),
        Tensor::ones((32, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, tmp.path().join("adapter_model.safetensors")).unwrap();
    let with_vision = bind_dir(&loaded, tmp.path());
    let prompt = ids(&e["input_ids_2"]);
    let d = worst(
        &logits_all(&loaded, &[(&prompt, Some(&with_vision))]),
        &logits_all(&loaded, &[(&prompt, Some(&w))]),
    );
    assert_eq!(d, 0.0, "the vision tower's adapters changed the text model");
}
