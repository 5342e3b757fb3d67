//! `serve train` on the tiny model: gradients against finite differences, loss going down,
//! export that the serving code reads back to the same logits, exact resume, bad data.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use common::training::*;
use common::*;
use loraplex::adapters::{bind, BindOptions, PeftAdapter};
use loraplex::chat::ChatTemplate;
use loraplex::model::llama::SeqInput;
use loraplex::model::{BatchInput, LoadedModel, LogitsRows, Proj};
use loraplex::train::trainer::batch_loss;
use loraplex::train::{train, Dataset, Example, Method, TrainError, TrainableAdapter};

fn set_elem(v: &Var, idx: usize, value: f32) {
    let shape = v.as_tensor().shape().clone();
    let mut data: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    data[idx] = value;
    v.set(&Tensor::from_vec(data, shape, v.as_tensor().device()).unwrap())
        .unwrap();
}

#[test]
fn gradients_match_central_finite_differences() {
    let m = load_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let data = small_dataset(&m, tmp.path());
    let batch: Vec<&Example> = data.examples.iter().take(3).collect();
    for name in ["lora-r8-all", "dora-r8-all"] {
        let peft = PeftAdapter::load(&tiny_dir().join("adapters").join(name)).unwrap();
        let adapter = TrainableAdapter::from_peft(&peft, &m.model, 0.0, 1).unwrap();
        // DoRA's norm is detached in backward (as in PEFT), so the reference derivative for A
        // and B holds the norm at its unperturbed value; m's derivative does not involve it.
        let frozen = adapter.weights(&m.model, None).unwrap();
        let loss_with = |a: &TrainableAdapter, freeze_norm: bool| {
            let mut w = a.weights(&m.model, None).unwrap();
            if freeze_norm {
                for (layer, frozen_layer) in w.layers.iter_mut().zip(&frozen.layers) {
                    for (site, f) in layer.iter_mut().zip(frozen_layer) {
                        if let (Some(site), Some(f)) = (site.as_mut(), f) {
                            site.dora_scale = f.dora_scale.as_ref().map(|d| d.detach());
                        }
                    }
                }
            }
            batch_loss(&m.model, &w, &batch, true).unwrap()
        };
        let loss = |a: &TrainableAdapter| loss_with(a, false);
        let grads = loss(&adapter).backward().unwrap();
        let mut checked = 0;
        let mut worst = 0f64;
        for site in adapter
            .sites
            .iter()
            .filter(|s| s.layer == 1 && matches!(s.proj, Proj::Q | Proj::Down))
        {
            let mut vars = vec![("A", &site.a), ("B", &site.b)];
            if let Some(mv) = &site.m {
                vars.push(("m", mv));
            }
            for (what, var) in vars {
                let g: Vec<f32> = grads
                    .get(var.as_tensor())
                    .expect("gradient")
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                // The element with the largest gradient: finite differences are meaningful there.
                let idx = (0..g.len())
                    .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                    .unwrap();
                let orig: f32 = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()[idx];
                let h = 1e-2f32;
                let freeze = what != "m";
                set_elem(var, idx, orig + h);
                let lp = loss_with(&adapter, freeze).to_scalar::<f32>().unwrap() as f64;
                set_elem(var, idx, orig - h);
                let lm = loss_with(&adapter, freeze).to_scalar::<f32>().unwrap() as f64;
                set_elem(var, idx, orig);
                let fd = (lp - lm) / (2.0 * h as f64);
                let rel = (fd - g[idx] as f64).abs() / fd.abs().max(g[idx].abs() as f64).max(1e-6);
                worst = worst.max(rel);
                assert!(
                    rel <= 1e-2,
                    "{name} {:?} {what}[{idx}]: autograd {} vs finite difference {fd} (rel {rel})",
                    site.proj,
                    g[idx]
                );
                checked += 1;
            }
        }
        eprintln!("{name}: {checked} gradients checked, worst relative error {worst:e}");
        assert!(checked >= 4);
    }
}

#[test]
fn training_lowers_the_loss_and_the_export_serves_the_same_logits() {
    let m = load_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let data = small_dataset(&m, tmp.path());
    for method in [Method::Lora, Method::Dora] {
        let out = tmp.path().join(format!("{method:?}"));
        let report = train(
            &m.model,
            &data,
            Some(&data),
            &config(out.clone(), method, 30),
        )
        .unwrap();
        eprintln!(
            "{method:?}: loss {} -> {}, eval {:?}",
            report.first_loss, report.final_loss, report.eval_loss
        );
        assert!(
            report.final_loss < 0.5 * report.first_loss,
            "{method:?}: {} -> {}",
            report.first_loss,
            report.final_loss
        );

        // PEFT's reader takes the files back, and every field PEFT needs is there.
        let cfg: serde_json::Value = read_json(out.join("adapter_config.json"));
        for field in [
            "peft_type",
            "r",
            "lora_alpha",
            "target_modules",
            "use_dora",
            "use_rslora",
            "base_model_name_or_path",
            "task_type",
        ] {
            assert!(
                cfg.get(field).is_some_and(|v| !v.is_null()),
                "adapter_config.json lacks {field}: {cfg}"
            );
        }
        assert_eq!(cfg["use_dora"], method == Method::Dora);
        assert!(out.join("training_args.json").is_file());
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(
            metrics.lines().filter(|l| l.contains("\"loss\"")).count(),
            30
        );
        assert!(metrics.contains("eval_loss"));

        // The served adapter (read from disk, bound by the serving code) gives the trained logits.
        let served = bind(
            &PeftAdapter::load(&out).unwrap(),
            &m.model,
            &BindOptions::default(),
        )
        .unwrap();
        let in_memory = report.adapter.weights(&m.model, None).unwrap();
        let ids: Vec<u32> = data.examples[0].ids.clone();
        let run = |w: &loraplex::model::AdapterWeights| -> Vec<Vec<f32>> {
            let mut c = m.model.new_cache();
            m.model
                .forward(&mut BatchInput {
                    seqs: vec![SeqInput::new(&ids, &mut c).with_adapter(Some(w))],
                    logits: LogitsRows::All,
                })
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        let (a, b) = (run(&served), run(&in_memory));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0.0, f32::max);
        assert!(
            worst < 1e-5,
            "{method:?}: served vs in-memory logits differ by {worst}"
        );
    }
}

/// An interrupted run resumes from its checkpoint to the loss of an uninterrupted one: LoRA's
/// DoRA and the methods with their own trainable parts (IA³, bottleneck, prefix tuning through
/// its projection), whose checkpoints hold those parts under their own keys.
#[test]
fn an_interrupted_run_resumes_to_the_same_loss() {
    use loraplex::adapters::config::BnKind;
    let m = load_tiny();
    for (method, projection) in [
        (Method::Dora, None),
        (Method::Ia3, None),
        (Method::Bottleneck(BnKind::Double), None),
        (Method::PrefixTuning, Some(24)),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let data = small_dataset(&m, tmp.path());
        let cfg = |out: PathBuf| {
            let mut c = config(out, method, 12);
            c.spec.prefix_projection = projection;
            c
        };
        let whole = train(&m.model, &data, None, &cfg(tmp.path().join("whole"))).unwrap();
        let out = tmp.path().join("resumed");
        let mut first = cfg(out.clone());
        first.interrupt_after = Some(7);
        assert!(train(&m.model, &data, None, &first).is_err());
        assert!(out.join("checkpoint").join("state.json").is_file());
        let mut second = cfg(out.clone());
        second.resume = true;
        let resumed = train(&m.model, &data, None, &second).unwrap();
        eprintln!(
            "{method:?}: final loss whole {} resumed {}",
            whole.final_loss, resumed.final_loss
        );
        assert!(
            (whole.final_loss - resumed.final_loss).abs() < 1e-4,
            "{method:?}: {} vs {}",
            whole.final_loss,
            resumed.final_loss
        );
        // Steps 6..12 were redone from the step-5 checkpoint; the log holds them once per run.
        assert!(std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .contains("\"step\":12"));
    }
}

/// A run can be cancelled from outside (a fine-tuning job's cancel): it stops after the step in
/// progress with `Cancelled`, leaves a checkpoint of that step, and `resume` continues from it.
/// Every step's metrics line reaches the hook as it is written (a job's events).
#[test]
fn a_cancelled_run_stops_after_its_step_and_resumes_from_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let m = load_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let data = small_dataset(&m, tmp.path());
    let out = tmp.path().join("cancelled");
    let cancel = Arc::new(AtomicBool::new(false));
    let events: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let mut cfg = config(out.clone(), Method::Lora, 12);
    cfg.save_steps = 5;
    cfg.cancel = Some(cancel.clone());
    let (seen, stop) = (events.clone(), cancel.clone());
    cfg.on_step = Some(loraplex::train::trainer::StepHook(Arc::new(move |line| {
        seen.lock().unwrap().push(line.clone());
        if line["step"] == 3 {
            stop.store(true, Ordering::Relaxed);
        }
    })));
    let e = train(&m.model, &data, None, &cfg).unwrap_err();
    assert!(
        matches!(e, loraplex::train::TrainError::Cancelled { step: 3 }),
        "{e}"
    );
    let steps: Vec<u64> = events
        .lock()
        .unwrap()
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3]);
    assert!(events.lock().unwrap()[0]["loss"].as_f64().unwrap() > 0.0);
    let state: serde_json::Value = read_json(out.join("checkpoint").join("state.json"));
    assert_eq!(state["step"], 3);
    assert!(!out.join("adapter_model.safetensors").exists());
    // Resumed without the flag: steps 4..12, then the export.
    events.lock().unwrap().clear();
    cfg.resume = true;
    cancel.store(false, Ordering::Relaxed);
    let report = train(&m.model, &data, None, &cfg).unwrap();
    assert_eq!(report.steps, 12);
    let first = events.lock().unwrap()[0]["step"].as_u64().unwrap();
    assert_eq!(first, 4);
    assert!(out.join("adapter_model.safetensors").exists());
}

#[test]
fn bad_data_and_outputs_are_named() {
    let m = load_tiny();
    let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
    let special = m.special_tokens();
    let t = tok(&m, &template, &special, 64);
    let tmp = tempfile::tempdir().unwrap();
    let load = |lines: &[&str], skip: bool| {
        let p = write_data(
            tmp.path(),
            &lines.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        Dataset::load(&p, &t, skip)
    };
    let good = r#"{"prompt": "a", "completion": "b"}"#;
    let e = load(&[good, "not json"], false).unwrap_err().to_string();
    assert!(e.contains("data.jsonl:2") && e.contains("not JSON"), "{e}");
    let e = load(&[good, r#"{"prompt": "only"}"#], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains(":2") && e.contains("`completion`"), "{e}");
    let e = load(
        &[r#"{"messages": [{"role": "user", "content": "hi"}]}"#],
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(":1") && e.contains("no assistant turn"), "{e}");
    let e = load(&[], false).unwrap_err().to_string();
    assert!(e.contains("no examples"), "{e}");
    let ds = load(&[good, "garbage", good], true).unwrap();
    assert_eq!((ds.examples.len(), ds.skipped), (2, 1));
    let long = serde_json::json!({"prompt": "word ".repeat(200), "completion": "x"}).to_string();
    let e = load(&[&long], false).unwrap_err().to_string();
    assert!(e.contains("--max-seq-len"), "{e}");
    let e = Dataset::load(&tmp.path().join("missing.jsonl"), &t, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.jsonl"), "{e}");

    // Masking: only completion tokens (and the EOS) carry labels.
    let ds = load(&[good], false).unwrap();
    let ex = &ds.examples[0];
    let b = m.tokenizer.encode("b").unwrap();
    assert_eq!(
        ex.labels.iter().flatten().copied().collect::<Vec<_>>(),
        [b, vec![2]].concat()
    );

    // An existing output folder is refused without --overwrite.
    let data = small_dataset(&m, tmp.path());
    let out = tmp.path().join("exists");
    std::fs::create_dir_all(&out).unwrap();
    let e = train(&m.model, &data, None, &config(out.clone(), Method::Lora, 1)).unwrap_err();
    assert!(
        matches!(e, TrainError::Output { .. }) && e.to_string().contains("--overwrite"),
        "{e}"
    );
    let mut cfg = config(out, Method::Lora, 1);
    cfg.overwrite = true;
    assert!(train(&m.model, &data, None, &cfg).is_ok());

    // A diverging run stops with a clear message.
    let mut bad = config(tmp.path().join("nan"), Method::Lora, 3);
    bad.lr = f64::NAN;
    bad.max_grad_norm = 0.0;
    let e = train(&m.model, &data, None, &bad).unwrap_err().to_string();
    assert!(e.contains("loss became NaN"), "{e}");
}

/// `serve train --method ia3`: the loss falls below half its start on the tiny model; the
/// export is a PEFT IA³ adapter (`ia3_l` in PEFT's shapes), and serving it from disk gives the
/// trained logits.
#[test]
fn ia3_training_lowers_the_loss_and_its_export_serves_the_same_logits() {
    let m = load_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let data = small_dataset(&m, tmp.path());
    let out = tmp.path().join("ia3");
    // All seven projections (down_proj's vector on its input): IA³ has few parameters.
    let mut cfg = config(out.clone(), Method::Ia3, 120);
    cfg.lr = 0.1;
    let report = train(&m.model, &data, None, &cfg).unwrap();
    eprintln!("IA³: loss {} -> {}", report.first_loss, report.final_loss);
    assert!(
        report.final_loss < 0.5 * report.first_loss,
        "{} -> {}",
        report.first_loss,
        report.final_loss
    );
    let config: serde_json::Value = read_json(out.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "IA3");
    assert_eq!(
        config["feedforward_modules"],
        serde_json::json!(["down_proj"])
    );
    let peft = PeftAdapter::load(&out).unwrap();
    let down = &peft.modules["model.layers.0.mlp.down_proj"];
    let k = &peft.modules["model.layers.1.self_attn.k_proj"];
    assert_eq!(
        down.ia3.as_ref().unwrap().dims(),
        &[1, m.model.config.intermediate_size]
    );
    assert_eq!(k.ia3.as_ref().unwrap().dims()[1], 1);
    served_gives_the_trained_logits(&m, &peft, &report, &data.examples[0].ids);
}

/// `serve train --method prompt-tuning` and `prefix-tuning`, the latter also through PEFT's
/// projection MLP (`--prefix-projection`; the export holds the projected rows and says
/// `prefix_projection`) (the key/value rows enter the
/// cache as tensors, so the gradient reaches them): on prompts that all want one answer, the
/// loss falls below half its start on the tiny model; the export is a PEFT adapter of that type
/// with `prompt_embeddings` `[16, hidden]` / `[16, layers · 2 · kv_heads · head_dim]`, and
/// serving it from disk gives the trained logits.
#[test]
fn prompt_and_prefix_tuning_training_lower_the_loss_and_their_exports_serve_the_same_logits() {
    let m = load_tiny();
    let c = &m.model.config;
    let prefix_width = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim;
    for (method, peft_type, width, projection) in [
        (Method::PromptTuning, "PROMPT_TUNING", c.hidden_size, None),
        (Method::PrefixTuning, "PREFIX_TUNING", prefix_width, None),
        (
            Method::PrefixTuning,
            "PREFIX_TUNING",
            prefix_width,
            Some(24),
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let data = steering_dataset(&m, tmp.path());
        let out = tmp.path().join(peft_type);
        let mut cfg = config(out.clone(), method, 200);
        cfg.spec.virtual_tokens = 16;
        cfg.spec.prefix_projection = projection;
        // Through the projection the rows move faster per step (PEFT's reparameterization).
        cfg.lr = if projection.is_some() { 0.01 } else { 0.3 };
        let report = train(&m.model, &data, None, &cfg).unwrap();
        eprintln!(
            "{peft_type} (projection {projection:?}): loss {} -> {}",
            report.first_loss, report.final_loss
        );
        assert!(
            report.final_loss < 0.5 * report.first_loss,
            "{peft_type}: {} -> {}",
            report.first_loss,
            report.final_loss
        );
        let config: serde_json::Value = read_json(out.join("adapter_config.json"));
        assert_eq!(config["peft_type"], peft_type);
        assert_eq!(config["num_virtual_tokens"], 16);
        assert_eq!(
            config["prefix_projection"].as_bool(),
            projection.map(|_| true)
        );
        if let Some(e) = projection {
            assert_eq!(config["encoder_hidden_size"], e);
        }
        let peft = PeftAdapter::load(&out).unwrap();
        assert_eq!(
            peft.prompt_embeddings.as_ref().unwrap().dims(),
            &[16, width]
        );
        served_gives_the_trained_logits(&m, &peft, &report, &data.examples[0].ids);
    }
}

/// `serve train --method bottleneck` for each preset: the loss falls below half its start on the
/// tiny model; the export is in AdapterHub's format (`adapter_config.json` with the preset's
/// options, `adapter.safetensors` with keys named after the folder, as `adapters` 1.3.0 saves
/// them), and serving it from disk gives the trained logits.
#[test]
fn bottleneck_training_lowers_the_loss_and_its_adapterhub_export_serves_the_same_logits() {
    use loraplex::adapters::config::BnKind;
    let m = load_tiny();
    let h = m.model.config.hidden_size;
    for (kind, factor, mh, parallel, act) in [
        (BnKind::Seq, 16, false, false, "relu"),
        (BnKind::Double, 8, true, false, "swish"),
        (BnKind::Parallel, 2, false, true, "relu"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let data = small_dataset(&m, tmp.path());
        let out = tmp.path().join("my-bn");
        let mut cfg = config(out.clone(), Method::Bottleneck(kind), 120);
        cfg.spec.reduction_factor = if factor == 16 { 0 } else { factor };
        cfg.lr = 3e-2;
        let report = train(&m.model, &data, None, &cfg).unwrap();
        eprintln!(
            "{kind:?}: loss {} -> {}",
            report.first_loss, report.final_loss
        );
        assert!(
            report.final_loss < 0.5 * report.first_loss,
            "{kind:?}: {} -> {}",
            report.first_loss,
            report.final_loss
        );
        assert!(!out.join("adapter_model.safetensors").exists());
        let config: serde_json::Value = read_json(out.join("adapter_config.json"));
        let c = &config["config"];
        assert_eq!(config["name"], "my-bn");
        assert_eq!(c["reduction_factor"], factor);
        assert_eq!(c["mh_adapter"], mh);
        assert_eq!(c["is_parallel"], parallel);
        assert_eq!(c["non_linearity"], act);
        let peft = PeftAdapter::load(&out).unwrap();
        let places = if mh { 2 } else { 1 };
        assert_eq!(peft.modules.len(), places * m.model.layers.len());
        let w = &peft.modules["model.layers.1.output_adapters"];
        assert_eq!(w.lora_a.as_ref().unwrap().dims(), &[h / factor, h]);
        assert_eq!(w.lora_b.as_ref().unwrap().dims(), &[h, h / factor]);
        let raw =
            candle_core::safetensors::load(out.join("adapter.safetensors"), &Device::Cpu).unwrap();
        assert!(raw.contains_key("model.layers.0.output_adapters.adapters.my-bn.adapter_up.bias"));
        served_gives_the_trained_logits(&m, &peft, &report, &data.examples[0].ids);
    }
    // A factor that does not divide the hidden size is refused by flag name.
    let tmp = tempfile::tempdir().unwrap();
    let data = small_dataset(&m, tmp.path());
    let mut cfg = config(tmp.path().join("x"), Method::Bottleneck(BnKind::Seq), 2);
    cfg.spec.reduction_factor = 7;
    let e = train(&m.model, &data, None, &cfg).unwrap_err().to_string();
    assert!(e.contains("--reduction-factor") && e.contains("7"), "{e}");
}

/// `serve train --method fusion` over two existing `seq_bn` adapters (frozen): on prompts that
/// all want one answer, the loss falls below half its start on the tiny model (on the number →
/// color data it went 6.40 → 3.41, 0.53×: two random rank-4 adapters give it little to work with); the export is AdapterHub's fusion setup
/// (`adapter_setup.json`, the two adapters, `bn-seq-bn,bn-a/` with the fusion layers), the fused
/// adapters are unchanged, and serving the setup from disk gives the trained logits.
#[test]
fn fusion_training_lowers_the_loss_and_its_setup_serves_the_same_logits() {
    let m = load_tiny();
    let family = tiny_dir()
        .join("..")
        .join("tiny-llama/peft-family/adapters");
    let (a, b) = (family.join("bn-seq-bn"), family.join("fuse-ab/bn-a"));
    let tmp = tempfile::tempdir().unwrap();
    // A fusion layer re-weighs and maps the fused adapters' outputs (here two rank-4 random
    // ones): like a soft prompt it can steer the model, as on prompts that all want one answer.
    let data = steering_dataset(&m, tmp.path());
    let out = tmp.path().join("fused");
    let mut cfg = config(out.clone(), Method::Fusion, 200);
    cfg.spec.fuse = vec![a.clone(), b.clone()];
    cfg.lr = 1e-2;
    let report = train(&m.model, &data, None, &cfg).unwrap();
    eprintln!(
        "fusion: loss {} -> {}",
        report.first_loss, report.final_loss
    );
    assert!(
        report.final_loss < 0.5 * report.first_loss,
        "{} -> {}",
        report.first_loss,
        report.final_loss
    );
    let setup: serde_json::Value = read_json(out.join("adapter_setup.json"));
    assert_eq!(setup["adapter_setup"]["type"], "Fuse");
    let fusion_dir = out.join("bn-seq-bn,bn-a");
    let fcfg: serde_json::Value = read_json(fusion_dir.join("adapter_fusion_config.json"));
    assert_eq!(fcfg["config"]["value"], true);
    let raw = candle_core::safetensors::load(
        fusion_dir.join("model_adapter_fusion.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(raw.len(), 5 * m.model.layers.len());
    // The fused adapters went in as they were.
    for (name, src) in [("bn-seq-bn", &a), ("bn-a", &b)] {
        let before = PeftAdapter::load(src).unwrap();
        let after = PeftAdapter::load(&out.join(name)).unwrap();
        for (module, w) in &before.modules {
            let (x, y) = (
                w.lora_b.as_ref().unwrap(),
                after.modules[module].lora_b.as_ref().unwrap(),
            );
            let d: f32 = (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(d, 0.0, "{name} {module}");
        }
    }
    let peft = PeftAdapter::load(&out).unwrap();
    served_gives_the_trained_logits(&m, &peft, &report, &data.examples[0].ids);
    // Bad input: one adapter, a parallel one, and a LoRA adapter are refused naming --fuse.
    for fuse in [
        vec![a.clone()],
        vec![a.clone(), family.join("bn-par-bn")],
        vec![a.clone(), tiny_dir().join("adapters/lora-r4-qv")],
    ] {
        let mut cfg = config(tmp.path().join("bad"), Method::Fusion, 2);
        cfg.spec.fuse = fuse;
        let e = train(&m.model, &data, None, &cfg).unwrap_err().to_string();
        assert!(e.contains("--fuse"), "{e}");
        // Refused before the output folder is made.
        assert!(!tmp.path().join("bad").exists());
    }
}

/// The export read back and bound by the serving code gives the logits of the adapter as it
/// was in memory at the end of training, at every real position.
fn served_gives_the_trained_logits(
    m: &LoadedModel,
    peft: &PeftAdapter,
    report: &loraplex::train::TrainReport,
    ids: &[u32],
) {
    let served = bind(peft, &m.model, &BindOptions::default()).unwrap();
    let in_memory = report.adapter.weights(&m.model, None).unwrap();
    let run = |w: &loraplex::model::AdapterWeights| -> Vec<Vec<f32>> {
        let mut c = m.model.new_cache();
        m.model
            .forward(&mut BatchInput {
                seqs: vec![SeqInput::new(ids, &mut c).with_adapter(Some(w))],
                logits: LogitsRows::All,
            })
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let (a, b) = (run(&served), run(&in_memory));
    assert_eq!(a.len(), ids.len());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "{worst}");
}

/// Reading a conversation is linear in its length: rendering stops once the segments hold
/// `max_seq_len` tokens (before, every prefix was rendered again: 20,000 messages took hours),
/// and the example is the one the conversation's first messages make.
#[test]
fn a_conversation_of_20000_messages_reads_in_linear_time() {
    let m = load_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let turns = |n: usize| -> String {
        let msgs: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                serde_json::json!({"role": role, "content": format!("m{i}")})
            })
            .collect();
        serde_json::json!({ "messages": msgs }).to_string()
    };
    let long = tmp.path().join("long.jsonl");
    let short = tmp.path().join("short.jsonl");
    std::fs::write(&long, turns(20_000)).unwrap();
    std::fs::write(&short, turns(60)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // On its own thread, so that a quadratic reader fails the test instead of hanging it.
    let path = long.clone();
    std::thread::spawn(move || {
        let m = load_tiny();
        let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
        let special = m.special_tokens();
        let t = tok(&m, &template, &special, 64);
        let _ = tx.send(Dataset::load(&path, &t, false).map(|d| d.examples));
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("20,000 messages were not read within 2 minutes")
        .unwrap();
    let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
    let special = m.special_tokens();
    let t = tok(&m, &template, &special, 64);
    let expected = Dataset::load(&short, &t, false).unwrap().examples;
    assert_eq!(got, expected);
    assert_eq!(got[0].ids.len(), 63);
}
