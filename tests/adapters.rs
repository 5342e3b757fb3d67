//! Adapters on the tiny model against Hugging Face PEFT 0.21.2
//! (`tests/fixtures/tiny-llama/expected_logits.json`, `adapters[name]` per position).

mod common;

use std::sync::Arc;

use common::*;
use loraplex::adapters::{bind, AdapterCache, BindOptions, CacheConfig, PeftAdapter};
use loraplex::model::{AdapterWeights, LoadedModel};

const ADAPTERS: [&str; 4] = [
    "lora-r8-all",
    "lora-r4-qv",
    "rslora-r16-pattern",
    "dora-r8-all",
];

fn adapter_dir(name: &str) -> std::path::PathBuf {
    tiny_dir().join("adapters").join(name)
}

fn bound(loaded: &LoadedModel, name: &str) -> AdapterWeights {
    bind_dir(loaded, &adapter_dir(name))
}

fn run(loaded: &LoadedModel, seqs: &[(&[u32], Option<&AdapterWeights>)]) -> Vec<Vec<f32>> {
    logits_all(loaded, seqs)
}

#[test]
fn every_adapter_matches_peft_at_every_position() {
    let loaded = load_tiny();
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    for name in ADAPTERS {
        let w = bound(&loaded, name);
        let mut worst = 0f32;
        for case in expected["cases"].as_array().unwrap() {
            let ids = as_u32_vec(&case["input_ids"]);
            let got = run(&loaded, &[(&ids, Some(&w))]);
            let want = case["adapters"][name].as_array().unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                worst = worst.max(max_abs_diff(g, &as_f32_vec(w)));
            }
        }
        eprintln!("{name}: max |logit - PEFT| = {worst:e}");
        assert!(worst < 1e-4, "{name}: logits differ from PEFT by {worst}");
    }
}

#[test]
fn mixed_batch_equals_each_row_alone() {
    let loaded = load_tiny();
    let lora = bound(&loaded, "lora-r8-all");
    let dora = bound(&loaded, "dora-r8-all");
    let rs = bound(&loaded, "rslora-r16-pattern");
    let s: Vec<Vec<u32>> = vec![
        (3..15).collect(),
        vec![9, 8, 7],
        (100..120).collect(),
        vec![42],
        (50..57).collect(),
    ];
    // lora appears twice, not adjacent: its rows are gathered by index.
    let rows: Vec<(&[u32], Option<&AdapterWeights>)> = vec![
        (&s[0], Some(&lora)),
        (&s[1], Some(&dora)),
        (&s[2], None),
        (&s[3], Some(&rs)),
        (&s[4], Some(&lora)),
    ];
    let batch = run(&loaded, &rows);
    let mut at = 0;
    let mut worst = 0f32;
    for row in &rows {
        for r in run(&loaded, std::slice::from_ref(row)) {
            worst = worst.max(max_abs_diff(&batch[at], &r));
            at += 1;
        }
    }
    assert_eq!(at, batch.len());
    eprintln!("mixed batch vs alone: {worst:e}");
    assert!(
        worst < 1e-5,
        "mixed batch differs from rows alone by {worst}"
    );
    // And the adapters do change the output (the test would be vacuous otherwise).
    let base = run(&loaded, &[(&s[0], None)]);
    assert!(max_abs_diff(&base[0], &batch[0]) > 1e-3);
}

fn key(name: &str) -> loraplex::adapters::AdapterKey {
    loraplex::adapters::AdapterKey {
        name: loraplex::adapters::AdapterName::parse(name).unwrap(),
        version: 0,
    }
}

#[test]
fn a_small_cache_with_more_adapters_in_use_stays_correct() {
    let loaded = load_tiny();
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    let case = &expected["cases"][0];
    let ids = as_u32_vec(&case["input_ids"]);
    let cache = Arc::new(AdapterCache::new(CacheConfig {
        max_resident: 2,
        max_bytes: 1 << 30,
    }));
    let reads = std::sync::atomic::AtomicUsize::new(0);
    for round in 0..3 {
        for name in ADAPTERS {
            let lease = cache
                .acquire(&key(name), false, || {
                    reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let peft = PeftAdapter::load(&adapter_dir(name))?;
                    bind(&peft, &loaded.model, &BindOptions::default())
                })
                .unwrap();
            let got = run(&loaded, &[(&ids, Some(&lease.weights))]);
            let want = as_f32_vec(case["adapters"][name].as_array().unwrap().last().unwrap());
            let d = max_abs_diff(got.last().unwrap(), &want);
            assert!(d < 1e-4, "round {round} {name}: {d}");
            assert!(cache.resident().len() <= 2);
        }
    }
    // Cycling 4 adapters through 2 slots misses every time.
    assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 12);
}

#[test]
fn candle_path_used_in_training_agrees_with_the_serving_kernel() {
    // With gradients tracked (a Var feeding the model) the forward takes the differentiable
    // candle path for adapter deltas (gathered rows, two matmuls, scatter-add); without, the
    // CPU serving kernel. Both must give the same numbers on a mixed batch.
    let loaded = load_tiny();
    let lora = bound(&loaded, "lora-r8-all");
    let dora = bound(&loaded, "dora-r8-all");
    let s: Vec<Vec<u32>> = vec![
        (3..15).collect(),
        vec![9, 8, 7],
        (100..120).collect(),
        vec![42],
    ];
    let rows: Vec<(&[u32], Option<&AdapterWeights>)> = vec![
        (&s[0], Some(&lora)),
        (&s[1], Some(&dora)),
        (&s[2], None),
        (&s[3], Some(&lora)),
    ];
    let serving = run(&loaded, &rows);
    let mut tracked = loaded.clone();
    tracked.model.embed_tokens = loraplex::model::Embedding::Dense(
        candle_core::Var::from_tensor(&loaded.model.embed_tokens.dense().unwrap())
            .unwrap()
            .as_tensor()
            .clone(),
    );
    let training = run(&tracked, &rows);
    let worst = serving
        .iter()
        .zip(&training)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f32::max);
    assert!(
        worst < 1e-5,
        "candle path differs from the CPU kernel by {worst}"
    );
}

#[test]
fn four_adapters_leased_at_once_with_room_for_two() {
    // All four in one batch while the cache holds at most two: leased adapters are never
    // evicted (the cache runs over its count while they are in use) and the numbers stay right;
    // once the leases end the cache shrinks back to its bound.
    let loaded = load_tiny();
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    let case = &expected["cases"][0];
    let ids = as_u32_vec(&case["input_ids"]);
    let cache = AdapterCache::new(CacheConfig {
        max_resident: 2,
        max_bytes: 1 << 30,
    });
    let leases: Vec<_> = ADAPTERS
        .iter()
        .map(|name| {
            cache
                .acquire(&key(name), false, || {
                    bind(
                        &PeftAdapter::load(&adapter_dir(name))?,
                        &loaded.model,
                        &BindOptions::default(),
                    )
                })
                .unwrap()
        })
        .collect();
    assert_eq!(cache.resident().len(), 4);
    let rows: Vec<(&[u32], Option<&AdapterWeights>)> = leases
        .iter()
        .map(|l| (ids.as_slice(), Some(&*l.weights)))
        .collect();
    let out = run(&loaded, &rows);
    let n = ids.len();
    for (i, name) in ADAPTERS.iter().enumerate() {
        let want = as_f32_vec(case["adapters"][*name].as_array().unwrap().last().unwrap());
        let d = max_abs_diff(&out[(i + 1) * n - 1], &want);
        assert!(d < 1e-4, "{name}: {d}");
    }
    drop(rows);
    drop(leases);
    cache.trim();
    assert_eq!(cache.resident().len(), 2);
}

/// Adapters kept in 16 bits (`--adapter-dtype bf16|f16`) are read by the serving kernel as
/// stored: the result equals the same adapter rounded to 16 bits and held in f32, and stays
/// within the rounding of 16-bit weights of PEFT's f32 logits.
#[test]
fn sixteen_bit_adapters_serve_their_rounded_values() {
    use loraplex::adapters::AdapterDType;
    let loaded = load_tiny();
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    let case = &expected["cases"][0];
    let ids = as_u32_vec(&case["input_ids"]);
    for (dtype, candle_dtype, tolerance) in [
        (AdapterDType::Bf16, candle_core::DType::BF16, 2e-2f32),
        (AdapterDType::F16, candle_core::DType::F16, 2e-3),
    ] {
        for name in ["lora-r8-all", "rslora-r16-pattern"] {
            let peft = PeftAdapter::load(&adapter_dir(name)).unwrap();
            let opts = BindOptions {
                adapter_dtype: dtype,
                ..Default::default()
            };
            let w16 = bind(&peft, &loaded.model, &opts).unwrap();
            let site = w16.layers[0].iter().flatten().next().unwrap();
            assert_eq!(site.a_t.dtype(), candle_dtype);
            assert!(w16.bytes() * 2 <= bound(&loaded, name).bytes() + 64);
            // The same rounded values held in f32 (the f32 kernel).
            let mut rounded = w16.clone();
            for s in rounded.layers.iter_mut().flatten().flatten() {
                s.a_t = s.a_t.to_dtype(candle_core::DType::F32).unwrap();
                s.b_t = s.b_t.to_dtype(candle_core::DType::F32).unwrap();
            }
            let got = run(&loaded, &[(&ids, Some(&w16))]);
            let reference = run(&loaded, &[(&ids, Some(&rounded))]);
            let kernel_err = got
                .iter()
                .zip(&reference)
                .map(|(a, b)| max_abs_diff(a, b))
                .fold(0f32, f32::max);
            assert!(
                kernel_err < 1e-4,
                "{name} {dtype:?}: kernel vs rounded {kernel_err}"
            );
            let want = case["adapters"][name].as_array().unwrap();
            let peft_err = got
                .iter()
                .zip(want)
                .map(|(g, w)| max_abs_diff(g, &as_f32_vec(w)))
                .fold(0f32, f32::max);
            eprintln!("{name} {dtype:?}: vs PEFT f32 {peft_err}");
            assert!(peft_err < tolerance, "{name} {dtype:?}: vs PEFT {peft_err}");
        }
    }
}
