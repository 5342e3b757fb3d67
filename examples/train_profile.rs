//! Where a LoRA training step's time goes on the default model (f32, dense): forward by part
//! (the serving profiler's parts, on the differentiable path), backward, gradient collection,
//! clipping and AdamW. LoRA r8 on all seven projections, synthetic sequences (the second half
//! of each is target), a warm-up step, then the mean of `STEPS` steps.
//!
//! ```sh
//! cargo run --release --example train_profile -- 4 64      # batch 4 × 64 tokens
//! cargo run --release --example train_profile -- 1 512     # batch 1 × 512 tokens
//! cargo run --release --example train_profile -- 4 85 0.05 # with LoRA dropout 0.05
//! ```
//! For the backward by op kind, run it under `perf record -g` and read `perf report`.

use std::time::Instant;

use candle_core::{Tensor, Var};
use loraplex::model::source::SourceConfig;
use loraplex::model::{load_model, ModelOptions, ModelSource, Proj};
use loraplex::ops::profile::{self, Part};
use loraplex::train::dataset::Example;
use loraplex::train::optim::{clip_global_norm, AdamW};
use loraplex::train::trainable::{Method, TrainSpec, TrainableAdapter};
use loraplex::train::trainer::batch_loss;

const STEPS: usize = 6;

fn main() {
    loraplex::init_threads();
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<usize> = raw.iter().take(2).filter_map(|a| a.parse().ok()).collect();
    let dropout: f32 = raw.get(2).and_then(|a| a.parse().ok()).unwrap_or(0.0);
    let (batch, len) = (
        args.first().copied().unwrap_or(4),
        args.get(1).copied().unwrap_or(64),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resolved = rt
        .block_on(
            ModelSource::parse(None)
                .unwrap()
                .resolve(&SourceConfig::from_env()),
        )
        .unwrap();
    let loaded = load_model(&resolved, &ModelOptions::default()).unwrap();
    let model = &loaded.model;
    let spec = TrainSpec {
        method: Method::Lora,
        rank: 8,
        alpha: 16.0,
        dropout,
        targets: Proj::ALL.to_vec(),
        rslora: false,
        seed: 1,
        base_model: loaded.id.clone(),
        virtual_tokens: 0,
        reduction_factor: 0,
        prefix_projection: None,
        fuse: Vec::new(),
    };
    let adapter = TrainableAdapter::init(model, &spec).unwrap();
    let vars: Vec<&Var> = adapter.vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(&vars, 0.9, 0.999, 0.0).unwrap();
    let examples: Vec<Example> = (0..batch)
        .map(|b| {
            let ids: Vec<u32> = (0..len)
                .map(|i| 100 + ((i * 37 + b * 101) % 20000) as u32)
                .collect();
            let labels = (0..len)
                .map(|i| (i >= len / 2 && i + 1 < len).then(|| ids[i + 1]))
                .collect();
            Example { ids, labels }
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let (mut fwd, mut bwd, mut collect, mut clip, mut adam) = (0f64, 0f64, 0f64, 0f64, 0f64);
    let mut fastest = f64::INFINITY;
    for step in 0..=STEPS {
        profile::enable(step > 0);
        let t = Instant::now();
        let weights = adapter.weights(model, Some(step)).unwrap();
        let loss = batch_loss(model, &weights, &refs, true).unwrap();
        let t_fwd = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let grads = loss.backward().unwrap();
        let t_bwd = t.elapsed().as_secs_f64();
        profile::enable(false);
        let t = Instant::now();
        let mut g: Vec<Tensor> = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
            })
            .collect();
        let t_collect = t.elapsed().as_secs_f64();
        let t = Instant::now();
        clip_global_norm(&mut g, 1.0).unwrap();
        let t_clip = t.elapsed().as_secs_f64();
        let t = Instant::now();
        opt.step(&vars, &g, 1e-4).unwrap();
        let t_adam = t.elapsed().as_secs_f64();
        if step > 0 {
            fastest = fastest.min(t_fwd + t_bwd + t_collect + t_clip + t_adam);
            fwd += t_fwd;
            bwd += t_bwd;
            collect += t_collect;
            clip += t_clip;
            adam += t_adam;
        }
    }
    let n = STEPS as f64;
    let total = (fwd + bwd + collect + clip + adam) / n;
    println!("LoRA r8 all 7 projections (dropout {dropout}), batch {batch} × {len} tokens, f32, mean of {STEPS} steps: {:.0} ms a step (fastest {:.0} ms), {:.0} tokens/s", total * 1e3, fastest * 1e3, (batch * len) as f64 / total);
    println!("| part | ms | share |");
    println!("|---|---|---|");
    let parts = profile::totals();
    let backward_part = |p: Part| matches!(p, Part::BwdLora | Part::BwdHead | Part::BwdElementwise);
    let mut measured = [0f64; 2];
    for (part, ns) in &parts {
        measured[backward_part(*part) as usize] += *ns as f64 * 1e-9;
    }
    for pass in [false, true] {
        for (part, ns) in parts.iter().filter(|(p, _)| backward_part(*p) == pass) {
            let s = *ns as f64 * 1e-9 / n;
            if s > 0.0 {
                println!(
                    "| {}: {} | {:.1} | {:.1} % |",
                    if pass { "backward" } else { "forward" },
                    part.name(),
                    s * 1e3,
                    100.0 * s / total
                );
            }
        }
        let (name, all) = if pass {
            (
                "backward: candle's own ops (attention matmuls, adds of gradients, copies)",
                bwd,
            )
        } else {
            ("forward: the rest (loss, weights, glue)", fwd)
        };
        let other = (all - measured[pass as usize]) / n;
        println!(
            "| {name} | {:.1} | {:.1} % |",
            other * 1e3,
            100.0 * other / total
        );
    }
    for (name, s) in [
        ("gradient collection", collect),
        ("global-norm clipping", clip),
        ("AdamW", adam),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} % |",
            s / n * 1e3,
            100.0 * s / n / total
        );
    }
}
