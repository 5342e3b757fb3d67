//! What bounds a training run's memory changes nothing it computes: a step split into
//! micro-batches by a token budget makes the update one batch makes (and so does gradient
//! accumulation), activation checkpointing gives the plain backward's weights for every method,
//! and the chunked loss through the `lm_head` is the loss of the full logits.

mod common;

use candle_core::{Tensor, Var};
use common::training::*;
use common::*;
use loraplex::adapters::config::BnKind;
use loraplex::model::llama::SeqInput;
use loraplex::model::{BatchInput, LogitsRows};
use loraplex::train::trainer::micro_batches;
use loraplex::train::{train, Example, Method, TrainReport};

fn weights(report: &TrainReport) -> Vec<(String, Vec<f32>)> {
    report
        .adapter
        .vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// Largest difference between two runs' weights, relative to the largest weight.
fn weight_gap(a: &TrainReport, b: &TrainReport) -> f32 {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    let scale = wa
        .iter()
        .flat_map(|(_, v)| v.iter())
        .fold(0f32, |m, x| m.max(x.abs()));
    wa.iter()
        .zip(&wb)
        .map(|((ka, va), (kb, vb))| {
            assert_eq!(ka, kb);
            max_abs_diff(va, vb)
        })
        .fold(0f32, f32::max)
        / scale.max(1e-12)
}

#[test]
fn a_batch_of_16_split_by_the_token_budget_or_accumulated_makes_the_same_update() {
    let m = load_tiny();
    let tmp = tempfile::tempdir().unwrap();
    // 16 examples: one batch of 16 is one epoch, as are four micro-batches of 4.
    let mut data = small_dataset(&m, tmp.path());
    data.examples.truncate(16);
    let run = |name: &str, batch: usize, accum: usize, budget: Option<usize>| {
        let mut cfg = config(tmp.path().join(name), Method::Dora, 3);
        cfg.spec = spec(Method::Dora, 0.0);
        (cfg.batch_size, cfg.grad_accum, cfg.max_batch_tokens) = (batch, accum, budget);
        train(&m.model, &data, None, &cfg).unwrap()
    };
    let whole = run("whole", 16, 1, None);
    // A budget that holds about four of these examples.
    let longest = data.examples.iter().map(|e| e.ids.len()).max().unwrap();
    let budget = 4 * longest;
    let order: Vec<&Example> = data.examples.iter().take(16).collect();
    let parts = micro_batches(&order, Some(budget));
    assert!(
        parts.len() >= 4,
        "the budget splits 16 examples into {} parts",
        parts.len()
    );
    assert!(parts
        .iter()
        .all(|p| p.iter().map(|e| e.ids.len()).sum::<usize>() <= budget));
    let budgeted = run("budget", 16, 1, Some(budget));
    let accumulated = run("accum", 4, 4, None);
    let (gap_budget, gap_accum) = (
        weight_gap(&whole, &budgeted),
        weight_gap(&whole, &accumulated),
    );
    println!("relative weight gap: budget {gap_budget:e}, 4 × 4 accumulation {gap_accum:e}");
    assert!(
        gap_budget < 1e-4,
        "budgeted micro-batches moved the weights by {gap_budget}"
    );
    assert!(
        gap_accum < 1e-4,
        "4 × 4 accumulation moved the weights by {gap_accum}"
    );
    assert!((whole.final_loss - budgeted.final_loss).abs() < 1e-4);
    // The same run with a different split is not a no-op test: the weights did move.
    let trained = weights(&whole);
    assert!(trained
        .iter()
        .any(|(k, v)| k.contains("lora_B") && v.iter().any(|x| *x != 0.0)));
}

#[test]
fn activation_checkpointing_trains_the_same_weights_for_every_method() {
    let m = load_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let data = small_dataset(&m, tmp.path());
    for method in [
        Method::Lora,
        Method::Dora,
        Method::Ia3,
        Method::PromptTuning,
        Method::PrefixTuning,
        Method::Bottleneck(BnKind::Seq),
        Method::Bottleneck(BnKind::Parallel),
    ] {
        let run = |name: &str, checkpointed: bool| {
            let mut cfg = config(tmp.path().join(format!("{method:?}-{name}")), method, 3);
            cfg.checkpoint_activations = checkpointed;
            train(&m.model, &data, None, &cfg).unwrap()
        };
        let (plain, recomputed) = (run("plain", false), run("ckpt", true));
        let gap = weight_gap(&plain, &recomputed);
        println!("{method:?}: relative weight gap {gap:e}");
        assert!(
            gap < 1e-4,
            "{method:?}: checkpointing moved the weights by {gap}"
        );
        assert!((plain.first_loss - recomputed.first_loss).abs() < 1e-5);
    }
}

#[test]
fn the_chunked_head_loss_is_the_loss_of_the_full_logits_and_its_gradient() {
    let m = load_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let data = small_dataset(&m, tmp.path());
    let ex: Vec<&Example> = data.examples.iter().take(12).collect();
    let hidden_rows = |logits: LogitsRows| {
        let mut caches: Vec<_> = ex.iter().map(|_| m.model.new_cache()).collect();
        m.model
            .forward(&mut BatchInput {
                seqs: ex
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(e, c)| SeqInput::new(&e.ids, c))
                    .collect(),
                logits,
            })
            .unwrap()
    };
    let total: u32 = ex.iter().map(|e| e.ids.len() as u32).sum();
    // More rows than one chunk, so the chunking is exercised.
    let rows: Vec<u32> = (0..total).collect();
    assert!(rows.len() > loraplex::train::head_loss::CHUNK_ROWS);
    let targets: Vec<u32> = rows.iter().map(|r| (r * 7 + 3) % 32).collect();
    let h = Var::from_tensor(&hidden_rows(LogitsRows::SelectHidden(rows.clone()))).unwrap();
    let chunked =
        loraplex::train::head_loss::head_cross_entropy(h.as_tensor(), &m.model.lm_head, &targets)
            .unwrap();
    let full_logits = m.model.lm_head.forward(h.as_tensor()).unwrap();
    let t = Tensor::new(targets.as_slice(), &candle_core::Device::Cpu).unwrap();
    let reference = candle_nn::loss::cross_entropy(&full_logits, &t).unwrap();
    let (a, b) = (
        chunked.to_scalar::<f32>().unwrap(),
        reference.to_scalar::<f32>().unwrap(),
    );
    assert!(
        (a - b).abs() < 1e-5 * b.abs().max(1.0),
        "chunked {a} vs full {b}"
    );
    let ga = chunked
        .backward()
        .unwrap()
        .get(h.as_tensor())
        .unwrap()
        .clone();
    let gb = reference
        .backward()
        .unwrap()
        .get(h.as_tensor())
        .unwrap()
        .clone();
    let (ga, gb): (Vec<f32>, Vec<f32>) = (
        ga.flatten_all().unwrap().to_vec1().unwrap(),
        gb.flatten_all().unwrap().to_vec1().unwrap(),
    );
    let scale = gb.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0);
    assert!(max_abs_diff(&ga, &gb) < 1e-4 * scale, "gradients differ");
}
