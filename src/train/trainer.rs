//! The training loop: micro-batches of whole sequences (no padding: the batch is flattened as in
//! serving), loss on target tokens only, gradient accumulation, clipping, AdamW with a schedule,
//! checkpoints every `save_steps` (adapter, optimizer state, step) and exact resume, metrics
//! per step, PEFT export at the end.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use serde_json::json;

use super::dataset::{Dataset, Example};
use super::error::TrainError;
use super::optim::{clip_global_norm, lr_at, AdamW, Schedule};
use super::trainable::{TrainSpec, TrainableAdapter};
use crate::model::llama::SeqInput;
use crate::model::{AdapterWeights, BatchInput, Llama, LogitsRows, Proj};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub output: PathBuf,
    pub overwrite: bool,
    pub resume: bool,
    pub spec: TrainSpec,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub save_steps: usize,
    pub progress: bool,
    /// Written to `training_args.json`.
    pub args: serde_json::Value,
    /// Stop after this many steps as if interrupted (tests of `--resume`).
    pub interrupt_after: Option<usize>,
    /// Set to ask the run to stop (a cancelled job): checked after every step; the run saves a
    /// checkpoint of that step and ends with `TrainError::Cancelled`, so `resume` can continue.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Called with each step's metrics line (`step`, `loss`, `lr`, `grad_norm`,
    /// `tokens_per_second`) as it is written: a job's events.
    pub on_step: Option<StepHook>,
    /// At the end of every epoch, export the adapter to `DIR/step-N/` (PEFT format) and append
    /// `{step, epoch, train_loss, valid_loss, created_at}` to `DIR/checkpoints.jsonl` (the eval
    /// set's loss where there is one): a fine-tuning job's checkpoints.
    pub epoch_checkpoints: Option<PathBuf>,
    /// Tokens one forward/backward may hold (`--train-max-batch-tokens`): a step's examples are
    /// split into micro-batches within it and their gradients summed, each weighted by its
    /// share of the step's target tokens, so the update is the one a single batch would make.
    /// `None`: a micro-batch is `batch_size` examples, whatever their length.
    pub max_batch_tokens: Option<usize>,
    /// Keep only each layer's input during the forward and recompute the layer in the backward
    /// (activation checkpointing): memory per token falls from every layer's activations to
    /// one layer's, for about one more forward of compute.
    pub checkpoint_activations: bool,
    /// Keep the resume checkpoint after the export (a job removes it once its record says it
    /// succeeded, so a crash in between resumes instead of starting over).
    pub keep_checkpoint: bool,
    /// Epoch checkpoints kept on disk (`Some(3)`: the ones a job serves); older ones go.
    pub keep_epoch_checkpoints: Option<usize>,
    /// With `progress` where stderr is not a terminal (a container's log, CI, a pipe), where
    /// no bar is drawn: a line (step, loss, tokens/s, ETA) at least this far apart.
    pub progress_every: std::time::Duration,
}

/// A callback per training step (see `TrainConfig::on_step`).
#[derive(Clone)]
pub struct StepHook(pub std::sync::Arc<dyn Fn(&serde_json::Value) + Send + Sync>);

impl std::fmt::Debug for StepHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepHook")
    }
}

#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: usize,
    pub first_loss: f32,
    pub final_loss: f32,
    pub eval_loss: Option<f32>,
    pub seconds: f64,
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub adapter: TrainableAdapter,
}

/// The rows of the flattened batch that have a target, and those targets.
pub(crate) fn target_rows(weights: &AdapterWeights, examples: &[&Example]) -> (Vec<u32>, Vec<u32>) {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut offset = 0u32;
    // Prompt tuning's soft prompt rows come first in each sequence's rows.
    let soft = weights.soft_prompt.as_ref().map_or(0, |t| t.dims()[0]) as u32;
    for ex in examples {
        for (t, label) in ex.labels.iter().enumerate() {
            if let Some(l) = label {
                rows.push(offset + soft + t as u32);
                targets.push(*l);
            }
        }
        offset += soft + ex.ids.len() as u32;
    }
    (rows, targets)
}

/// Mean cross-entropy over the target tokens of `examples`, with `weights` applied;
/// differentiable where `for_grad` (evaluation passes `false`: the head loss then skips
/// preparing its gradient).
pub fn batch_loss(
    model: &Llama,
    weights: &AdapterWeights,
    examples: &[&Example],
    for_grad: bool,
) -> Result<Tensor, TrainError> {
    let mut caches: Vec<_> = examples.iter().map(|_| model.new_cache()).collect();
    let (rows, targets) = target_rows(weights, examples);
    let chunked = model.dtype() == candle_core::DType::F32
        && matches!(model.device(), candle_core::Device::Cpu);
    let logits = model.forward(&mut BatchInput {
        seqs: examples
            .iter()
            .zip(caches.iter_mut())
            .map(|(ex, c)| SeqInput::new(&ex.ids, c).with_adapter(Some(weights)))
            .collect(),
        logits: if chunked {
            LogitsRows::SelectHidden(rows)
        } else {
            LogitsRows::Select(rows)
        },
    })?;
    if chunked {
        // The logits in chunks of rows inside the loss: never `rows × vocab` at once.
        let hidden = if for_grad { logits } else { logits.detach() };
        return Ok(super::head_loss::head_cross_entropy(
            &hidden,
            &model.lm_head,
            &targets,
        )?);
    }
    let targets = Tensor::new(targets.as_slice(), model.device())?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}

/// `seconds` as `1h02m03s` / `2m03s` / `3s`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

/// Removes all but the newest `keep` `step-N` directories under `dir`.
fn prune_epoch_checkpoints(dir: &Path, keep: Option<usize>) -> Result<(), TrainError> {
    let Some(keep) = keep else { return Ok(()) };
    let mut steps: Vec<usize> = std::fs::read_dir(dir)
        .map_err(|e| TrainError::output(dir, e.to_string()))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    for step in &steps[..steps.len().saturating_sub(keep)] {
        // Out of sight first (one rename), then removed: a kill midway leaves a `.tmp`, which
        // the next start clears, never a half-removed checkpoint under its name.
        let old = dir.join(format!("step-{step}"));
        let gone = crate::durable::tmp_name(&old);
        let _ = std::fs::remove_dir_all(&gone);
        std::fs::rename(&old, &gone).map_err(|e| TrainError::output(&old, e.to_string()))?;
        std::fs::remove_dir_all(&gone).map_err(|e| TrainError::output(&old, e.to_string()))?;
    }
    Ok(())
}

/// Adds each of `vars`' gradient in `grads` to its slot of `acc`.
pub(crate) fn accumulate(
    grads: &candle_core::backprop::GradStore,
    vars: &[&Var],
    acc: &mut [Option<Tensor>],
) -> candle_core::Result<()> {
    for (slot, var) in acc.iter_mut().zip(vars) {
        if let Some(g) = grads.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}

/// `examples` in order, split into runs of at most `budget` tokens (an example longer than the
/// budget alone; the data's `max_seq_len` keeps examples within it where the budget is checked).
pub fn micro_batches<'a>(examples: &[&'a Example], budget: Option<usize>) -> Vec<Vec<&'a Example>> {
    let Some(budget) = budget else {
        return vec![examples.to_vec()];
    };
    let mut out = Vec::new();
    let (mut current, mut used) = (Vec::new(), 0usize);
    for &ex in examples {
        if !current.is_empty() && used + ex.ids.len() > budget {
            out.push(std::mem::take(&mut current));
            used = 0;
        }
        used += ex.ids.len();
        current.push(ex);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Mean loss over a dataset without dropout (evaluation).
pub fn evaluate(
    model: &Llama,
    adapter: &TrainableAdapter,
    data: &Dataset,
    batch: usize,
    max_batch_tokens: Option<usize>,
) -> Result<f32, TrainError> {
    let weights = adapter.weights(model, None)?;
    let (mut sum, mut n) = (0f64, 0usize);
    let all: Vec<&Example> = data.examples.iter().collect();
    for refs in all
        .chunks(batch.max(1))
        .flat_map(|c| micro_batches(c, max_batch_tokens))
    {
        let tokens: usize = refs.iter().map(|e| e.target_tokens()).sum();
        let loss = batch_loss(model, &weights, &refs, false)?
            .detach()
            .to_scalar::<f32>()?;
        sum += loss as f64 * tokens as f64;
        n += tokens;
    }
    Ok((sum / n.max(1) as f64) as f32)
}

fn checkpoint_dir(output: &Path) -> PathBuf {
    output.join("checkpoint")
}

fn save_checkpoint(
    output: &Path,
    adapter: &TrainableAdapter,
    opt: &AdamW,
    step: usize,
) -> Result<(), TrainError> {
    let dir = checkpoint_dir(output);
    // Complete or absent: filled beside, fsynced, swapped in (the old one kept until then).
    crate::durable::replace_dir(&dir, |tmp| -> Result<(), TrainError> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (k, v) in adapter.vars() {
            tensors.insert(k, v.as_tensor().clone());
        }
        candle_core::safetensors::save(&tensors, tmp.join("adapter.safetensors"))?;
        let mut state: HashMap<String, Tensor> = HashMap::new();
        for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
            state.insert(format!("m.{i}"), m.clone());
            state.insert(format!("v.{i}"), v.clone());
        }
        candle_core::safetensors::save(&state, tmp.join("optimizer.safetensors"))?;
        let meta = json!({"step": step, "adam_t": opt.t});
        std::fs::write(tmp.join("state.json"), meta.to_string())
            .map_err(|e| TrainError::output(tmp, e.to_string()))
    })
    .map_err(|e| match e {
        TrainError::Io(io) => TrainError::output(&dir, io.to_string()),
        other => other,
    })
}

/// Exports the adapter into `dir` so that it is complete or absent: a new directory is
/// filled and swapped in; into an existing one (a job's output, which also holds its resume
/// checkpoint) each file is written beside and renamed, the config last.
pub fn export_durably(
    adapter: &TrainableAdapter,
    dir: &Path,
    model: &Llama,
) -> Result<(), TrainError> {
    let names: Vec<&str> = Proj::ALL.iter().map(|p| p.short()).collect();
    let io = |e: std::io::Error| TrainError::output(dir, e.to_string());
    let name = dir.file_name().unwrap_or_default();
    let fresh = !dir.exists();
    // The export is written under its own name (AdapterHub configs record the folder's name).
    let staging_root = if fresh {
        crate::durable::tmp_name(dir)
    } else {
        dir.join("export.tmp")
    };
    let _ = std::fs::remove_dir_all(&staging_root);
    let staging = staging_root.join(name);
    adapter.export(&staging, model, &names)?;
    crate::durable::sync_tree(&staging).map_err(io)?;
    if fresh {
        std::fs::rename(&staging, dir).map_err(io)?;
    } else {
        let mut files: Vec<_> = std::fs::read_dir(&staging)
            .map_err(io)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        // The config makes the directory an adapter: it goes last.
        files.sort_by_key(|f| f == crate::adapters::peft::CONFIG_FILE);
        for f in files {
            std::fs::rename(staging.join(&f), dir.join(&f)).map_err(io)?;
        }
    }
    crate::durable::sync_dir(dir.parent().unwrap_or(dir)).map_err(io)?;
    crate::durable::sync_dir(dir).map_err(io)?;
    std::fs::remove_dir_all(&staging_root).map_err(io)
}

fn load_checkpoint(
    output: &Path,
    adapter: &TrainableAdapter,
    opt: &mut AdamW,
) -> Result<usize, TrainError> {
    let dir = checkpoint_dir(output);
    let err = |m: String| TrainError::output(&dir, m);
    let tensors =
        candle_core::safetensors::load(dir.join("adapter.safetensors"), &candle_core::Device::Cpu)
            .map_err(|e| err(format!("unreadable checkpoint: {e}")))?;
    for (k, v) in adapter.vars() {
        let t = tensors.get(&k).ok_or_else(|| {
            err(format!(
                "checkpoint lacks `{k}` (different --rank or targets?)"
            ))
        })?;
        v.set(&t.to_device(v.as_tensor().device())?)
            .map_err(|e| err(format!("`{k}`: {e}")))?;
    }
    let state = candle_core::safetensors::load(
        dir.join("optimizer.safetensors"),
        &candle_core::Device::Cpu,
    )
    .map_err(|e| err(format!("unreadable optimizer state: {e}")))?;
    for i in 0..opt.m.len() {
        opt.m[i] = state
            .get(&format!("m.{i}"))
            .ok_or_else(|| err(format!("optimizer state lacks m.{i}")))?
            .clone();
        opt.v[i] = state
            .get(&format!("v.{i}"))
            .ok_or_else(|| err(format!("optimizer state lacks v.{i}")))?
            .clone();
    }
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("state.json")).map_err(|e| err(e.to_string()))?,
    )
    .map_err(|e| err(e.to_string()))?;
    opt.t = meta["adam_t"].as_u64().unwrap_or(0) as usize;
    Ok(meta["step"].as_u64().unwrap_or(0) as usize)
}

fn append_metrics(output: &Path, line: serde_json::Value) -> Result<(), TrainError> {
    append_line(&output.join("metrics.jsonl"), &line)
}

fn append_line(path: &Path, line: &serde_json::Value) -> Result<(), TrainError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| TrainError::output(parent, e.to_string()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TrainError::output(path, e.to_string()))?;
    writeln!(f, "{line}").map_err(|e| TrainError::output(path, e.to_string()))
}

/// Trains a new adapter on `data` and writes it (PEFT format) into `cfg.output`.
pub fn train(
    model: &Llama,
    data: &Dataset,
    eval: Option<&Dataset>,
    cfg: &TrainConfig,
) -> Result<TrainReport, TrainError> {
    if cfg.batch_size == 0 || cfg.grad_accum == 0 {
        return Err(TrainError::config(
            "--batch-size",
            "and `--grad-accum` must be at least 1",
        ));
    }
    // The adapter first: a spec it refuses leaves `--output` as it was.
    let adapter = TrainableAdapter::init(model, &cfg.spec)?;
    if cfg.resume {
        crate::durable::recover_dir(&checkpoint_dir(&cfg.output))
            .map_err(|e| TrainError::output(&cfg.output, e.to_string()))?;
    }
    let resuming = cfg.resume && checkpoint_dir(&cfg.output).join("state.json").is_file();
    if cfg.output.exists() && !cfg.overwrite && !cfg.resume {
        return Err(TrainError::output(
            &cfg.output,
            "exists; pass --overwrite to replace it or --resume to continue",
        ));
    }
    if cfg.overwrite && !cfg.resume && cfg.output.exists() {
        std::fs::remove_dir_all(&cfg.output)
            .map_err(|e| TrainError::output(&cfg.output, e.to_string()))?;
    }
    std::fs::create_dir_all(&cfg.output)
        .map_err(|e| TrainError::output(&cfg.output, e.to_string()))?;
    let micro_per_epoch = data.examples.len().div_ceil(cfg.batch_size);
    let total = cfg
        .max_steps
        .unwrap_or_else(|| (micro_per_epoch * cfg.epochs.max(1)).div_ceil(cfg.grad_accum))
        .max(1);
    let warmup = (total as f64 * cfg.warmup_ratio).ceil() as usize;

    let vars: Vec<&Var> = adapter.vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(&vars, cfg.betas.0, cfg.betas.1, cfg.weight_decay)?;
    let start_step = if resuming {
        load_checkpoint(&cfg.output, &adapter, &mut opt)?
    } else {
        0
    };
    if !resuming {
        let _ = std::fs::remove_file(cfg.output.join("metrics.jsonl"));
    }
    std::fs::write(
        cfg.output.join("training_args.json"),
        serde_json::to_string_pretty(&cfg.args).expect("json"),
    )
    .map_err(|e| TrainError::output(&cfg.output, e.to_string()))?;

    let bar = if cfg.progress {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps, {msg} (ETA {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start_step as u64);
    // No bar where stderr is no terminal (indicatif hides it): plain lines instead.
    let mut plain_progress =
        (cfg.progress && !std::io::IsTerminal::is_terminal(&std::io::stderr())).then(Instant::now);
    let started = Instant::now();
    let mut orders: HashMap<usize, Vec<usize>> = HashMap::new();
    let (mut first_loss, mut last_loss, mut tokens_done) = (f32::NAN, f32::NAN, 0usize);
    let mut final_eval: Option<f32> = None;
    let mut last_good = if resuming {
        format!(
            "{} (step {start_step})",
            checkpoint_dir(&cfg.output).display()
        )
    } else {
        "none".to_string()
    };
    for step in start_step..total {
        let step_start = Instant::now();
        let weights = adapter.weights(model, Some(step))?;
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut slices: Vec<Vec<&Example>> = Vec::with_capacity(cfg.grad_accum);
        for k in 0..cfg.grad_accum {
            let mb = step * cfg.grad_accum + k;
            let (epoch, i) = (mb / micro_per_epoch, mb % micro_per_epoch);
            let order = orders
                .entry(epoch)
                .or_insert_with(|| data.order(epoch, cfg.spec.seed));
            slices.push(
                order[i * cfg.batch_size..((i + 1) * cfg.batch_size).min(order.len())]
                    .iter()
                    .map(|&j| &data.examples[j])
                    .collect(),
            );
        }
        let step_tokens: usize = slices.iter().flatten().map(|e| e.ids.len()).sum();
        let step_targets: usize = slices.iter().flatten().map(|e| e.target_tokens()).sum();
        let mut loss_sum = 0f64;
        for batch in slices
            .iter()
            .flat_map(|s| micro_batches(s, cfg.max_batch_tokens))
        {
            // Each micro-batch's mean loss weighted by its share of the step's targets: the
            // sum is the step's mean over all its target tokens, however it was split.
            let share = batch.iter().map(|e| e.target_tokens()).sum::<usize>() as f64
                / step_targets.max(1) as f64;
            if share == 0.0 {
                continue;
            }
            // A cancel takes effect within a micro-batch, not only at the end of a large step:
            // the weights are still those after `step` steps, which the checkpoint keeps.
            if cfg
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            {
                save_checkpoint(&cfg.output, &adapter, &opt, step)?;
                bar.abandon();
                return Err(TrainError::Cancelled { step });
            }
            let loss = if cfg.checkpoint_activations {
                match super::checkpointed::loss_and_grads(
                    model,
                    &weights,
                    &batch,
                    share,
                    &vars,
                    &mut acc,
                    cfg.cancel.as_deref(),
                ) {
                    Err(TrainError::Cancelled { .. }) => {
                        save_checkpoint(&cfg.output, &adapter, &opt, step)?;
                        bar.abandon();
                        return Err(TrainError::Cancelled { step });
                    }
                    other => other?,
                }
            } else {
                let loss = batch_loss(model, &weights, &batch, true)?;
                let grads = (&loss * share)?.backward()?;
                accumulate(&grads, &vars, &mut acc)?;
                loss.to_scalar::<f32>()?
            };
            loss_sum += loss as f64 * share;
        }
        let loss = loss_sum as f32;
        if !loss.is_finite() {
            bar.abandon();
            return Err(TrainError::NonFinite {
                step: step + 1,
                value: loss,
                checkpoint: last_good,
            });
        }
        let mut grads: Vec<Tensor> = acc
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map(Ok).unwrap_or_else(|| v.as_tensor().zeros_like()))
            .collect::<candle_core::Result<_>>()?;
        let grad_norm = clip_global_norm(&mut grads, cfg.max_grad_norm)?;
        let lr = lr_at(cfg.schedule, cfg.lr, step, total, warmup);
        opt.step(&vars, &grads, lr)?;
        if first_loss.is_nan() {
            first_loss = loss;
        }
        last_loss = loss;
        tokens_done += step_tokens;
        let tps = step_tokens as f64 / step_start.elapsed().as_secs_f64();
        let line = json!({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_second": tps});
        append_metrics(&cfg.output, line.clone())?;
        if let Some(hook) = &cfg.on_step {
            (hook.0)(&line);
        }
        bar.set_message(format!("loss {loss:.4}, lr {lr:.2e}, {tps:.0} tok/s"));
        bar.inc(1);
        if let Some(last) = plain_progress.as_mut() {
            if last.elapsed() >= cfg.progress_every || step + 1 == total {
                *last = Instant::now();
                let done_here = step + 1 - start_step;
                let per_step = started.elapsed().as_secs_f64() / done_here as f64;
                let eta = per_step * (total - step - 1) as f64;
                eprintln!(
                    "step {}/{total}: loss {loss:.4}, lr {lr:.2e}, {:.0} tokens/s, ETA {}",
                    step + 1,
                    tokens_done as f64 / started.elapsed().as_secs_f64().max(1e-9),
                    clock(eta)
                );
            }
        }
        let done = step + 1;
        let epochs_done = |s: usize| (s * cfg.grad_accum / micro_per_epoch).min(cfg.epochs.max(1));
        if let Some(dir) = &cfg.epoch_checkpoints {
            if epochs_done(done) > epochs_done(step) || done == total {
                let valid = match eval {
                    Some(e) if !e.examples.is_empty() => Some(evaluate(
                        model,
                        &adapter,
                        e,
                        cfg.batch_size,
                        cfg.max_batch_tokens,
                    )?),
                    _ => None,
                };
                if done == total {
                    final_eval = valid;
                }
                let at = dir.join(format!("step-{done}"));
                export_durably(&adapter, &at, model)?;
                prune_epoch_checkpoints(dir, cfg.keep_epoch_checkpoints)?;
                let created_at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let line = json!({"step": done, "epoch": epochs_done(done).max(1), "train_loss": loss, "valid_loss": valid, "created_at": created_at});
                append_line(&dir.join("checkpoints.jsonl"), &line)?;
                if let (Some(hook), Some(v)) = (&cfg.on_step, valid) {
                    (hook.0)(&json!({"step": done, "valid_loss": v}));
                }
            }
        }
        // Every `save_steps` steps, and at each epoch's checkpoint: a restart never goes back
        // behind an epoch checkpoint it already wrote.
        let epoch_end = cfg.epoch_checkpoints.is_some() && epochs_done(done) > epochs_done(step);
        if (cfg.save_steps > 0 && done % cfg.save_steps == 0 || epoch_end) && done < total {
            save_checkpoint(&cfg.output, &adapter, &opt, done)?;
            last_good = format!("{} (step {done})", checkpoint_dir(&cfg.output).display());
        }
        let cancelled = cfg
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed));
        if cancelled && done < total {
            if !(cfg.save_steps > 0 && done % cfg.save_steps == 0) {
                save_checkpoint(&cfg.output, &adapter, &opt, done)?;
            }
            bar.abandon();
            return Err(TrainError::Cancelled { step: done });
        }
        if cfg.interrupt_after == Some(done) {
            bar.abandon();
            return Err(TrainError::config(
                "interrupt_after",
                format!("stopped after step {done} as asked"),
            ));
        }
    }
    bar.finish_and_clear();
    let eval_loss = match eval {
        _ if final_eval.is_some() => {
            append_metrics(&cfg.output, json!({"step": total, "eval_loss": final_eval}))?;
            final_eval
        }
        Some(e) if !e.examples.is_empty() => {
            let l = evaluate(model, &adapter, e, cfg.batch_size, cfg.max_batch_tokens)?;
            append_metrics(&cfg.output, json!({"step": total, "eval_loss": l}))?;
            Some(l)
        }
        _ => None,
    };
    export_durably(&adapter, &cfg.output, model)?;
    if !cfg.keep_checkpoint {
        let _ = std::fs::remove_dir_all(checkpoint_dir(&cfg.output));
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainReport {
        steps: total,
        first_loss,
        final_loss: last_loss,
        eval_loss,
        seconds,
        tokens: tokens_done,
        tokens_per_second: tokens_done as f64 / seconds.max(1e-9),
        adapter,
    })
}
