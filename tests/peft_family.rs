//! PEFT methods beyond LoRA/DoRA on the tiny model, against PEFT 0.21.2 itself
//! (`tests/fixtures/tiny-llama/peft-family/`, made by `make_ia3.py` there): IA³ served unmerged
//! per row in mixed batches with LoRA, DoRA and base rows, merged into the weights, and bad
//! configs refused by name.

mod common;

use common::*;
use loraplex::adapters::{bind, merge::merge, BindOptions, PeftAdapter};
use loraplex::model::llama::SeqInput;
use loraplex::model::{AdapterWeights, BatchInput, LoadedModel, LogitsRows};

fn family_dir() -> std::path::PathBuf {
    tiny_dir().join("peft-family")
}

fn bound(loaded: &LoadedModel, dir: &std::path::Path) -> AdapterWeights {
    bind_dir(loaded, dir)
}

fn run(loaded: &LoadedModel, seqs: &[(&[u32], Option<&AdapterWeights>)]) -> Vec<Vec<f32>> {
    logits_all(loaded, seqs)
}

#[test]
fn ia3_matches_peft_at_every_position() {
    let loaded = load_tiny();
    let ia3 = bound(&loaded, &family_dir().join("adapters/ia3-kvd"));
    assert_eq!(ia3.site_count(), 6);
    let expected = read_json(family_dir().join("expected_ia3.json"));
    let base = read_json(tiny_dir().join("expected_logits.json"));
    let (mut worst, mut moved) = (0f32, 0f32);
    for (case, base_case) in expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .zip(base["cases"].as_array().unwrap())
    {
        let ids = as_u32_vec(&case["input_ids"]);
        let got = run(&loaded, &[(&ids, Some(&ia3))]);
        let want = case["logits"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (pos, (g, w)) in got.iter().zip(want).enumerate() {
            worst = worst.max(max_abs_diff(g, &as_f32_vec(w)));
            moved = moved.max(max_abs_diff(g, &as_f32_vec(&base_case["base_logits"][pos])));
        }
    }
    eprintln!("IA³ vs PEFT: worst {worst}; the adapter moves logits by up to {moved}");
    assert!(worst < 1e-4, "{worst}");
    assert!(
        moved > 0.1,
        "the adapter changes nothing ({moved}): the test proves nothing"
    );
}

/// A batch with an IA³ row, LoRA and DoRA rows and base rows, interleaved (so IA³ rows are
/// scattered): every row equals its sequence alone.
#[test]
fn a_mixed_batch_with_ia3_rows_equals_each_row_alone() {
    let loaded = load_tiny();
    let ia3 = bound(&loaded, &family_dir().join("adapters/ia3-kvd"));
    let lora = bound(&loaded, &tiny_dir().join("adapters/lora-r8-all"));
    let dora = bound(&loaded, &tiny_dir().join("adapters/dora-r8-all"));
    let seqs: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            (0..5 + i)
                .map(|j| (3 + i * 31 + j * 7) as u32 % 500)
                .collect()
        })
        .collect();
    let adapters = [Some(&ia3), Some(&lora), None, Some(&ia3), Some(&dora), None];
    let batch: Vec<(&[u32], Option<&AdapterWeights>)> = seqs
        .iter()
        .zip(adapters)
        .map(|(s, a)| (s.as_slice(), a))
        .collect();
    let together = run(&loaded, &batch);
    let mut at = 0;
    let mut worst = 0f32;
    for (s, a) in &batch {
        let alone = run(&loaded, &[(s, *a)]);
        for row in &alone {
            worst = worst.max(max_abs_diff(row, &together[at]));
            at += 1;
        }
    }
    assert!(worst < 1e-5, "{worst}");
}

#[test]
fn ia3_merges_into_the_weights_as_peft_merges_it() {
    let loaded = load_tiny();
    let peft = PeftAdapter::load(&family_dir().join("adapters/ia3-kvd")).unwrap();
    let merged = merge(&loaded.model, &peft).unwrap();
    let expected = read_json(family_dir().join("expected_ia3.json"));
    let ids = as_u32_vec(&expected["cases"][0]["input_ids"]);
    let mut cache = merged.new_cache();
    let got = merged
        .forward(&mut BatchInput {
            seqs: vec![SeqInput::new(&ids, &mut cache)],
            logits: LogitsRows::Last,
        })
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
        .remove(0);
    let worst = max_abs_diff(&got, &as_f32_vec(&expected["merged_last_logits"]));
    assert!(worst < 1e-4, "{worst}");
}

#[test]
fn unsupported_methods_and_misfit_vectors_are_refused_by_name() {
    let loaded = load_tiny();
    let dir = tempfile::tempdir().unwrap();
    let src = family_dir().join("adapters/ia3-kvd");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = config.clone();
        edit(&mut c);
        std::fs::write(dir.path().join("adapter_config.json"), c.to_string()).unwrap();
        PeftAdapter::load(dir.path())
            .and_then(|p| bind(&p, &loaded.model, &BindOptions::default()))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = with(&|c| c["peft_type"] = "LOHA".into());
    assert!(
        e.contains("peft_type") && e.contains("LOHA") && e.contains("LORA") && e.contains("IA3"),
        "{e}"
    );
    // down_proj no longer a feed-forward module: its [1, 176] vector does not fit [64, 1].
    let e = with(&|c| c["feedforward_modules"] = serde_json::json!([]));
    assert!(
        e.contains("down_proj") && e.contains("ia3_l") && e.contains("[1, 176]"),
        "{e}"
    );
    // The same vectors under a LoRA config.
    let e = with(&|c| {
        c["peft_type"] = "LORA".into();
        c["r"] = 4.into();
    });
    assert!(e.contains("IA³") && e.contains("LORA"), "{e}");
}

/// Prefix tuning (with and without PEFT's projection: the saved rows are the projected ones)
/// and prompt tuning: every real position within 1e-4 of PEFT's own `forward()`, alone and in a
/// mixed batch.
#[test]
fn prefix_and_prompt_tuning_match_peft_at_every_position() {
    let loaded = load_tiny();
    let expected = read_json(family_dir().join("expected_prompt_learning.json"));
    let cases = read_json(tiny_dir().join("expected_logits.json"));
    let lora = bound(&loaded, &tiny_dir().join("adapters/lora-r8-all"));
    for name in ["prefix-n4", "prefix-proj-n3", "prompt-n5"] {
        let prefix = bound(&loaded, &family_dir().join("adapters").join(name));
        assert!(prefix.virtual_tokens() > 0);
        let mut worst = 0f32;
        for (c, want) in cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .zip(expected["adapters"][name].as_array().unwrap())
        {
            let ids = as_u32_vec(&c["input_ids"]);
            let want: Vec<Vec<f32>> = want.as_array().unwrap().iter().map(as_f32_vec).collect();
            let alone = run(&loaded, &[(&ids, Some(&prefix))]);
            // In a batch between a LoRA row and a base row.
            let (first, last) = ([5u32, 6, 7], [9u32, 10]);
            let mixed = run(
                &loaded,
                &[(&first, Some(&lora)), (&ids, Some(&prefix)), (&last, None)],
            );
            assert_eq!(alone.len(), want.len());
            for (pos, w) in want.iter().enumerate() {
                worst = worst.max(max_abs_diff(&alone[pos], w));
                worst = worst.max(max_abs_diff(&mixed[3 + pos], w));
            }
        }
        eprintln!("{name} vs PEFT: worst {worst}");
        assert!(worst < 1e-4, "{name}: {worst}");
    }
}

/// Prefix tuning through the paged KV pool (as the server runs it): the prefix rows go into
/// the sequence's first blocks, the answer is the unpaged one.
#[test]
fn prefix_tuning_through_the_paged_pool_equals_the_unpaged_path() {
    use loraplex::model::{KvCache, KvDtype, KvPool};
    let loaded = load_tiny();
    let prefix = bound(&loaded, &family_dir().join("adapters/prefix-n4"));
    let ids: Vec<u32> = (0..20).map(|i| 7 + i * 11 % 400).collect();
    let want = run(&loaded, &[(&ids, Some(&prefix))]);
    let mut pool = KvPool::new(loaded.model.pool_shape(64, 8, KvDtype::F32)).unwrap();
    let mut cache = KvCache::paged();
    for b in [5, 1, 6] {
        cache.push_block(b); // 24 positions: 4 virtual + 20 real
    }
    let got: Vec<Vec<f32>> = loaded
        .model
        .forward_paged(
            &mut BatchInput {
                seqs: vec![SeqInput::new(&ids, &mut cache).with_adapter(Some(&prefix))],
                logits: LogitsRows::All,
            },
            &mut pool,
        )
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(cache.len(), 24);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| max_abs_diff(g, w))
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "{worst}");
}

/// Prefix and prompt tuning in the engine: greedy answers equal a plain greedy loop over the
/// model, for a first request and for a second one that takes its virtual rows and prompt from
/// the prefix cache; `prompt_tokens` counts the real tokens only. Merging them is refused by
/// name.
#[test]
fn the_engine_serves_prefix_and_prompt_tuning_and_merge_refuses_them() {
    engine_serves("prefix-n4", "PREFIX_TUNING");
    engine_serves("prompt-n5", "PROMPT_TUNING");
}

fn engine_serves(name: &str, peft_type: &str) {
    use loraplex::adapters::{AdapterCache, AdapterKey, AdapterName, CacheConfig};
    use loraplex::engine::{
        Engine, Event, GenerationConfig, KvConfig, SamplingParams, SchedulerConfig, ValidRequest,
    };
    use std::sync::Arc;
    let loaded = Arc::new(load_tiny());
    let dir = family_dir().join("adapters").join(name);
    let cache = AdapterCache::new(CacheConfig::default());
    let lease = cache
        .acquire(
            &AdapterKey {
                name: AdapterName::parse(name).unwrap(),
                version: 1,
            },
            false,
            || {
                bind(
                    &PeftAdapter::load(&dir)?,
                    &loaded.model,
                    &BindOptions::default(),
                )
            },
        )
        .unwrap();
    let prompt: Vec<u32> = (0..30).map(|i| 3 + i * 13 % 300).collect();
    // The reference: a greedy loop over the model, unpaged.
    let mut want = Vec::new();
    let mut kv = loaded.model.new_cache();
    let mut next = prompt.clone();
    for _ in 0..5 {
        let row = loaded
            .model
            .forward(&mut BatchInput {
                seqs: vec![SeqInput::new(&next, &mut kv).with_adapter(Some(&*lease.weights))],
                logits: LogitsRows::Last,
            })
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .remove(0);
        let t = (0..row.len())
            .max_by(|a, b| row[*a].total_cmp(&row[*b]))
            .unwrap() as u32;
        want.push(t);
        next = vec![t];
    }
    let metrics = Arc::new(loraplex::metrics::Metrics::new());
    let (engine, mut worker) = Engine::manual(
        loaded.clone(),
        SchedulerConfig {
            max_running: 4,
            kv_cache_tokens: 4096,
            max_queue: 16,
            max_queue_per_tenant: 16,
            max_batched_tokens: 0,
            fair_lag_tokens: 256,
        },
        KvConfig::default(),
        metrics.clone(),
    )
    .unwrap();
    for round in 0..2 {
        let mut rx = engine
            .submit(ValidRequest {
                prompt: prompt.clone(),
                config: GenerationConfig {
                    max_tokens: 5,
                    ignore_eos: true,
                    sampling: SamplingParams::greedy(),
                    ..Default::default()
                },
                logprobs: None,
                adapter: Some(lease.clone()),
                adapter_label: None,
                adapter_name: None,
                tenant: None,
                class: Default::default(),
            })
            .unwrap();
        while worker.step() {}
        let (mut got, mut prompt_tokens) = (Vec::new(), 0);
        while let Ok(e) = rx.try_recv() {
            match e {
                Event::Token { token, .. } => got.push(token),
                Event::Done {
                    prompt_tokens: n, ..
                } => prompt_tokens = n,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, want, "round {round}");
        assert_eq!(prompt_tokens, 30);
    }
    // The second round reused 2 blocks of 16: the virtual rows and the prompt's first tokens.
    assert_eq!(metrics.prefix_cache_hits.get(), 32);
    let e = merge(&loaded.model, &PeftAdapter::load(&dir).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(peft_type) && e.contains("cannot be merged"),
        "{e}"
    );
}

/// Bottleneck adapters in AdapterHub's format (`adapters` 1.3.0; `make_bottleneck.py`):
/// `seq_bn`, `double_seq_bn` and `par_bn` within 1e-4 of the library at every position, alone
/// and interleaved in one batch with LoRA, IA³ and base rows; merging one is refused by name.
#[test]
fn bottleneck_adapters_match_adapterhub_at_every_position() {
    let loaded = load_tiny();
    let expected = read_json(family_dir().join("expected_bottleneck.json"));
    let cases = read_json(tiny_dir().join("expected_logits.json"));
    let lora = bound(&loaded, &tiny_dir().join("adapters/lora-r8-all"));
    let ia3 = bound(&loaded, &family_dir().join("adapters/ia3-kvd"));
    for name in ["bn-seq-bn", "bn-double-seq-bn", "bn-par-bn"] {
        let dir = family_dir().join("adapters").join(name);
        let bn = bound(&loaded, &dir);
        let mut worst = 0f32;
        for (c, want) in cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .zip(expected["adapters"][name].as_array().unwrap())
        {
            let ids = as_u32_vec(&c["input_ids"]);
            let want: Vec<Vec<f32>> = want.as_array().unwrap().iter().map(as_f32_vec).collect();
            let alone = run(&loaded, &[(&ids, Some(&bn))]);
            let (first, last) = ([5u32, 6, 7], [9u32, 10]);
            let mixed = run(
                &loaded,
                &[
                    (&first, Some(&lora)),
                    (&ids, Some(&bn)),
                    (&last, Some(&ia3)),
                    (&ids, Some(&bn)),
                    (&last, None),
                ],
            );
            for (pos, w) in want.iter().enumerate() {
                worst = worst.max(max_abs_diff(&alone[pos], w));
                worst = worst.max(max_abs_diff(&mixed[3 + pos], w));
                worst = worst.max(max_abs_diff(&mixed[3 + ids.len() + 2 + pos], w));
            }
        }
        eprintln!("{name} vs AdapterHub: worst {worst}");
        assert!(worst < 1e-4, "{name}: {worst}");
        let e = merge(&loaded.model, &PeftAdapter::load(&dir).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bottleneck") && e.contains("cannot be merged"),
            "{e}"
        );
    }
}

/// AdapterFusion in AdapterHub's format (`make_fusion.py`: `save_adapter_setup` of a `Fuse`
/// over two `seq_bn` adapters, a `dynamic` fusion layer): within 1e-4 of the library at every
/// position, alone and interleaved with LoRA and base rows; a setup naming an adapter that is
/// not there is refused naming it; merging is refused.
#[test]
fn adapter_fusion_matches_adapterhub_at_every_position() {
    let loaded = load_tiny();
    let dir = family_dir().join("adapters/fuse-ab");
    let fuse = bound(&loaded, &dir);
    let lora = bound(&loaded, &tiny_dir().join("adapters/lora-r4-qv"));
    let expected = read_json(family_dir().join("expected_fusion.json"));
    let cases = read_json(tiny_dir().join("expected_logits.json"));
    let mut worst = 0f32;
    for (c, want) in cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .zip(expected["logits"].as_array().unwrap())
    {
        let ids = as_u32_vec(&c["input_ids"]);
        let want: Vec<Vec<f32>> = want.as_array().unwrap().iter().map(as_f32_vec).collect();
        let alone = run(&loaded, &[(&ids, Some(&fuse))]);
        let first = [5u32, 6, 7];
        let mixed = run(
            &loaded,
            &[(&first, Some(&lora)), (&ids, Some(&fuse)), (&first, None)],
        );
        for (pos, w) in want.iter().enumerate() {
            worst = worst.max(max_abs_diff(&alone[pos], w));
            worst = worst.max(max_abs_diff(&mixed[3 + pos], w));
        }
    }
    eprintln!("fusion vs AdapterHub: worst {worst}");
    assert!(worst < 1e-4, "{worst}");
    let e = merge(&loaded.model, &PeftAdapter::load(&dir).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("AdapterFusion") && e.contains("cannot be merged"),
        "{e}"
    );
    // The same setup without one of its adapters.
    let tmp = tempfile::tempdir().unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for f in std::fs::read_dir(from).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    };
    std::fs::copy(
        dir.join("adapter_setup.json"),
        tmp.path().join("adapter_setup.json"),
    )
    .unwrap();
    copy(&dir.join("bn-a"), &tmp.path().join("bn-a"));
    copy(&dir.join("bn-a,bn-b"), &tmp.path().join("bn-a,bn-b"));
    let e = PeftAdapter::inspect(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("`bn-b`") && e.contains("adapter_setup"), "{e}");
    // Hostile setups: names that leave the folder, or that point back at the setup itself
    // (which would recurse without end), are refused, not followed.
    let setup: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_setup.json")).unwrap())
            .unwrap();
    for (bad, why) in [
        ("../bn-a", "not allowed"),
        (".", "not allowed"),
        ("bn-a/x", "not allowed"),
    ] {
        let mut s = setup.clone();
        s["adapter_setup"]["children"][1]["children"][0] = bad.into();
        std::fs::write(tmp.path().join("adapter_setup.json"), s.to_string()).unwrap();
        let e = PeftAdapter::inspect(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("adapter_setup.children") && e.contains(why),
            "{bad}: {e}"
        );
    }
    let nested = tmp.path().join("inner");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::copy(
        dir.join("adapter_setup.json"),
        nested.join("adapter_setup.json"),
    )
    .unwrap();
    copy(&dir.join("bn-a,bn-b"), &tmp.path().join("bn-a,inner"));
    let mut s = setup.clone();
    s["adapter_setup"]["children"][1]["children"][0] = "inner".into();
    std::fs::write(tmp.path().join("adapter_setup.json"), s.to_string()).unwrap();
    let e = PeftAdapter::inspect(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("fusions of fusions"), "{e}");
}

/// One batch holding a row of every served method — LoRA, DoRA, IA³, prefix tuning, prompt
/// tuning, seq_bn, double_seq_bn, par_bn, AdapterFusion — and base rows, interleaved: every
/// row equals its sequence alone within 1e-5.
#[test]
fn one_batch_of_every_method_equals_each_row_alone() {
    let loaded = load_tiny();
    let fam = |n: &str| bound(&loaded, &family_dir().join("adapters").join(n));
    let all = [
        bound(&loaded, &tiny_dir().join("adapters/lora-r8-all")),
        bound(&loaded, &tiny_dir().join("adapters/dora-r8-all")),
        fam("ia3-kvd"),
        fam("prefix-n4"),
        fam("prompt-n5"),
        fam("bn-seq-bn"),
        fam("bn-double-seq-bn"),
        fam("bn-par-bn"),
        fam("fuse-ab"),
    ];
    let mut adapters: Vec<Option<&AdapterWeights>> = all.iter().map(Some).collect();
    adapters.insert(4, None);
    adapters.push(None);
    let seqs: Vec<Vec<u32>> = (0..adapters.len())
        .map(|i| {
            (0..3 + i % 5)
                .map(|j| (11 + i * 29 + j * 13) as u32 % 500)
                .collect()
        })
        .collect();
    let batch: Vec<(&[u32], Option<&AdapterWeights>)> = seqs
        .iter()
        .zip(&adapters)
        .map(|(s, a)| (s.as_slice(), *a))
        .collect();
    let together = run(&loaded, &batch);
    let (mut at, mut worst) = (0, 0f32);
    for (s, a) in &batch {
        for row in run(&loaded, &[(s, *a)]) {
            worst = worst.max(max_abs_diff(&row, &together[at]));
            at += 1;
        }
    }
    assert_eq!(at, together.len());
    assert!(worst < 1e-5, "{worst}");
}

/// What `serve train` exports is read by the reference libraries as we mean it: IA³, prompt and
/// prefix tuning (with and without the projection) adapters trained by `serve train` on the tiny
/// model and loaded in PEFT 0.21.2,
/// and bottleneck adapters of the three presets and an AdapterFusion loaded in `adapters` 1.3.0
/// (`load_adapter` / `load_adapter_setup` of the folder, then `set_active_adapters`), give our logits within 1e-4 at every position
/// (`peft-family/make_trained_check.py` made both the exports and the libraries' logits).
#[test]
fn trained_exports_give_our_logits_in_the_reference_libraries() {
    let loaded = load_tiny();
    let cases = read_json(tiny_dir().join("expected_logits.json"));
    for lib in ["peft", "adapters"] {
        let expected = read_json(family_dir().join(format!("trained/expected_{lib}.json")));
        let names: Vec<String> = expected["adapters"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let want = 4; // peft: ia3, prompt, prefix, prefix-proj; adapters: 3 bottlenecks, fusion
        assert_eq!(names.len(), want, "{lib}: {names:?}");
        for name in names {
            let adapter = bound(&loaded, &family_dir().join("trained").join(&name));
            let mut worst = 0f32;
            for (c, want) in cases["cases"]
                .as_array()
                .unwrap()
                .iter()
                .zip(expected["adapters"][&name].as_array().unwrap())
            {
                let ids = as_u32_vec(&c["input_ids"]);
                let got = run(&loaded, &[(&ids, Some(&adapter))]);
                let want: Vec<Vec<f32>> = want.as_array().unwrap().iter().map(as_f32_vec).collect();
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    worst = worst.max(max_abs_diff(g, w));
                }
                // The adapter matters: the library did not answer with the base model.
                let base = run(&loaded, &[(&ids, None)]);
                let moved = want
                    .iter()
                    .zip(&base)
                    .map(|(w, b)| max_abs_diff(w, b))
                    .fold(0f32, f32::max);
                assert!(
                    moved > 0.05,
                    "{lib} {name}: the adapter moves logits by {moved}"
                );
            }
            eprintln!("{lib} {name}: within {worst}");
            assert!(worst < 1e-4, "{lib} {name}: {worst}");
        }
    }
}

/// AdapterFusion over adapters with AdapterHub's `leave_out` (`make_fusion_leave_out.py`): the
/// library saves a fusion layer for layer 1 too, where neither fused adapter is, and skips it
/// there; so do we (it was refused as "the fused adapter has no adapter here"). Within 1e-4 of
/// the library at every position.
#[test]
fn adapter_fusion_over_adapters_that_leave_a_layer_out_matches_adapterhub() {
    let loaded = load_tiny();
    let fuse = bound(&loaded, &family_dir().join("adapters/fuse-cd-leave-out"));
    let expected = read_json(family_dir().join("expected_fusion_leave_out.json"));
    let cases = read_json(tiny_dir().join("expected_logits.json"));
    let mut worst = 0f32;
    for (c, want) in cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .zip(expected["logits"].as_array().unwrap())
    {
        let ids = as_u32_vec(&c["input_ids"]);
        let want: Vec<Vec<f32>> = want.as_array().unwrap().iter().map(as_f32_vec).collect();
        let got = run(&loaded, &[(&ids, Some(&fuse))]);
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max(max_abs_diff(g, w));
        }
    }
    eprintln!("fusion with leave_out vs AdapterHub: worst {worst}");
    assert!(worst < 1e-4, "{worst}");
}
