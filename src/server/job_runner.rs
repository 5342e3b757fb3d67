//! What runs a fine-tuning job: validation of its files (on the validating thread), training on
//! the model the server serves (the same weights in memory, f32, NF4 or GGUF-quantized) within
//! the server's limits (`TrainLimits`: tokens per micro-batch, tokens and seconds per job),
//! registration of the adapter in its tenant's namespace as `ft:BASE:SUFFIX:XXXXXXXX` (and the
//! last three epochs' checkpoints as `…:ckpt-step-N`) within the tenant's adapter quotas, and
//! the tidying of what a job leaves on disk. Nothing a tenant reads names a server path.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::job_queue::WaitQueue;
use super::jobs::{served_checkpoints, JobRecord};
use super::state::{unix_now as now, AppState};

/// The server's bounds on what one fine-tuning job may take.
#[derive(Debug, Clone)]
pub struct TrainLimits {
    /// `--train-max-batch-tokens`: tokens one forward/backward holds.
    pub max_batch_tokens: usize,
    /// `--train-checkpoint-activations`: recompute each layer in the backward.
    pub checkpoint_activations: bool,
    /// `--train-max-messages`: messages one line of a training file may hold.
    pub max_messages: usize,
    /// `--train-max-job-tokens`: `n_epochs ×` the training file's tokens.
    pub max_job_tokens: usize,
    /// `--train-max-job-seconds`: wall time one job may train.
    pub max_job_seconds: u64,
    /// `--train-max-job-examples`: `n_epochs ×` the training file's lines.
    pub max_job_examples: usize,
}

impl Default for TrainLimits {
    fn default() -> Self {
        Self {
            max_batch_tokens: 2048,
            checkpoint_activations: false,
            max_messages: 256,
            max_job_tokens: 20_000_000,
            max_job_seconds: 86_400,
            max_job_examples: 200_000,
        }
    }
}

/// Tokens of a job's examples (the format's longest sequence).
pub const MAX_SEQ_LEN: usize = 512;

/// Nice 10 for the calling thread (Linux: per thread), so serving's threads come first.
pub(super) fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: `setpriority` on this thread's id; it only changes its scheduling priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, 10) != 0 {
            tracing::debug!("could not lower the training thread's priority");
        }
    }
}

/// `message` with the server's state directory cut out (tenants never see server paths).
fn redact(st: &AppState, job: &JobRecord, message: &str) -> String {
    let job_dir = st.jobs.job_dir(&job.id).display().to_string();
    let state = st.config.state_dir.display().to_string();
    let mut out = message
        .replace(&format!("{job_dir}/"), "")
        .replace(&job_dir, "job");
    for form in [
        Some(state.clone()),
        std::fs::canonicalize(&st.config.state_dir)
            .ok()
            .map(|p| p.display().to_string()),
    ]
    .into_iter()
    .flatten()
    .filter(|s| !s.is_empty())
    {
        out = out.replace(&format!("{form}/"), "").replace(&form, "");
    }
    out
}

/// Validates a new job's files as training data (on the validating thread): then `queued`, or
/// `failed` naming the file (by id) and the line; a cancel stops it at the next line.
pub(super) fn validate(st: &Arc<AppState>, id: &str) {
    let stop = st.jobs.stop_flag(id);
    let Some(job) = st.jobs.load(id) else {
        st.jobs.release(id);
        return;
    };
    if job.status != "validating_files" || stop.load(Ordering::SeqCst) {
        st.jobs.release(id);
        return;
    }
    let invalid = |param: &str, file: &str, message: String| json!({"code": format!("invalid_{param}"), "message": format!("file `{file}`: {message}"), "param": param});
    let checked = load_data(st, &job.training_file, &stop)
        .map_err(|e| invalid("training_file", &job.training_file, e))
        .and_then(|data| {
            let limits = &st.config.train;
            let tokens = data.examples.iter().map(|e| e.ids.len()).sum::<usize>()
                * job.hyperparameters.n_epochs;
            if tokens > limits.max_job_tokens {
                return Err(json!({"code": "invalid_training_file", "param": "training_file",
                    "message": format!("file `{}`: {tokens} tokens to train on (its tokens × `n_epochs`) exceed this server's limit of {} per job (`--train-max-job-tokens`)", job.training_file, limits.max_job_tokens)}));
            }
            match &job.validation_file {
                Some(v) => load_data(st, v, &stop)
                    .map(|_| ())
                    .map_err(|e| invalid("validation_file", v, e)),
                None => Ok(()),
            }
        });
    if st.jobs.validated(id, checked.err()) {
        st.jobs.ensure_worker(Arc::downgrade(st));
    } else {
        st.jobs.release(id);
    }
}

/// File `id` as training data for the served model (its tokenizer and chat template), within
/// the server's limits; stops when `stop` is set. Errors name lines, never paths.
fn load_data(
    st: &AppState,
    id: &str,
    stop: &AtomicBool,
) -> Result<crate::train::dataset::Dataset, String> {
    use crate::train::dataset::{Dataset, Format, LoadLimits, Tokenization};
    use crate::train::TrainError;
    let loaded = st.engine.model();
    let file = st.files.get(id, None).map_err(|e| e.message())?;
    let special = loaded.special_tokens();
    let eos = *loaded
        .stop_token_ids(&st.template)
        .first()
        .ok_or("the model has no EOS token")?;
    let tok = Tokenization {
        tokenizer: &loaded.tokenizer,
        template: &st.template,
        special: &special,
        eos,
        max_seq_len: MAX_SEQ_LEN,
        format: Format::Auto,
    };
    let limits = LoadLimits {
        stop: Some(stop),
        max_messages: Some(st.config.train.max_messages),
    };
    Dataset::load_with(&st.files.contents(&file), &tok, false, &limits).map_err(|e| match e {
        TrainError::Line { line, message, .. } => format!("line {line}: {message}"),
        TrainError::Data { message, .. } => message,
        other => other.to_string(),
    })
}

/// A training worker: takes queued jobs in turn (fair across tenants) and runs them.
pub(super) fn worker(queue: Arc<WaitQueue>, st: Weak<AppState>) {
    loop {
        let id = queue.next();
        let Some(st) = st.upgrade() else { return };
        let stop = st.jobs.stop_flag(&id);
        let started = st.jobs.update(&id, |j, _| {
            if !matches!(j.status.as_str(), "queued" | "running") {
                return false;
            }
            if stop.load(Ordering::SeqCst) {
                j.status = "cancelled".into();
                j.finished_at = Some(now());
            } else {
                j.status = "running".into();
            }
            true
        });
        let job = match started {
            Ok(Some(job)) if job.status == "running" => job,
            _ => {
                remove_resume_state(&st, &id);
                st.jobs.release(&id);
                continue;
            }
        };
        let timed_out = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        watchdog(
            Duration::from_secs(st.config.train.max_job_seconds),
            stop.clone(),
            timed_out.clone(),
            done.clone(),
        );
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&st, &job, &stop)));
        done.store(true, Ordering::SeqCst);
        let result = result.unwrap_or_else(|_| Err("the training run panicked".into()));
        let (cancelled, timed_out) = (
            stop.load(Ordering::SeqCst),
            timed_out.load(Ordering::SeqCst),
        );
        let finished = st.jobs.update(&id, |j, _| {
            j.finished_at = Some(now());
            match &result {
                Ok((name, tokens, bytes)) => {
                    j.status = "succeeded".into();
                    j.fine_tuned_model = Some(name.clone());
                    j.trained_tokens = Some(*tokens);
                    j.output_bytes = *bytes;
                }
                Err(_) if timed_out => {
                    j.status = "failed".into();
                    j.error = Some(json!({"code": "training_time_limit", "param": null,
                        "message": format!("the job trained longer than this server allows ({} s, `--train-max-job-seconds`)", st.config.train.max_job_seconds)}));
                }
                Err(_) if cancelled => j.status = "cancelled".into(),
                Err(message) => {
                    tracing::warn!("fine-tuning job {id} failed: {message}");
                    j.status = "failed".into();
                    j.error = Some(json!({"code": "training_failed", "message": redact(&st, j, message), "param": null}));
                }
            }
            true
        });
        if let Err(e) = finished {
            tracing::error!(
                "fine-tuning job {id}: its end could not be recorded: {}",
                e.message()
            );
        }
        // The resume state matters no more once the record says how the job ended.
        remove_resume_state(&st, &id);
        st.jobs.release(&id);
    }
}

/// Sets `stop` (and `timed_out`) once `limit` has passed, unless `done` first.
fn watchdog(
    limit: Duration,
    stop: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
) {
    let start = Instant::now();
    let spawned = std::thread::Builder::new()
        .name("fine-tuning-watchdog".into())
        .spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let left = limit.saturating_sub(start.elapsed());
                if left.is_zero() {
                    timed_out.store(true, Ordering::SeqCst);
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(left.min(Duration::from_millis(200)));
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a fine-tuning watchdog: {e}");
    }
}

/// Removes a job's resume checkpoint (optimizer state): its job ended.
fn remove_resume_state(st: &AppState, id: &str) {
    let dir = st.jobs.job_dir(id).join("adapter");
    for sub in [
        "checkpoint",
        "checkpoint.tmp",
        "checkpoint.old",
        "export.tmp",
    ] {
        let _ = std::fs::remove_dir_all(dir.join(sub));
    }
}

/// Bytes of the files under `dir`, recursively.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Bytes of weights an adapter of `spec` on every projection of the served model takes.
pub fn adapter_bytes(st: &AppState, rank: usize, dora: bool) -> u64 {
    use crate::model::Proj;
    let model = &st.engine.model().model;
    (0..model.layers.len())
        .flat_map(|l| Proj::ALL.iter().map(move |&p| (l, p)))
        .filter_map(|(l, p)| model.linear(l, p)?.base().dims().ok())
        .map(|(out, inp)| (rank * (inp + out) + if dora { out } else { 0 }) as u64 * 4)
        .sum()
}

/// Trains `job` on the served model and registers the adapter; its registered name, the tokens
/// trained on and the bytes its outputs hold.
fn run(
    st: &Arc<AppState>,
    job: &JobRecord,
    stop: &Arc<AtomicBool>,
) -> Result<(String, usize, u64), String> {
    use crate::model::{BaseWeight, Proj};
    use crate::train::optim::Schedule;
    use crate::train::trainable::{Method, TrainSpec};
    use crate::train::trainer::{train, StepHook, TrainConfig};
    let loaded = st.engine.model().clone();
    let model = &loaded.model;
    // f32, NF4 and GGUF-quantized projections have a backward in their input; bf16 ones not.
    let differentiable = (0..model.layers.len()).all(|l| {
        Proj::ALL.iter().all(|&p| {
            model
                .linear(l, p)
                .is_some_and(|lin| !matches!(lin.base(), BaseWeight::Bf16(_)))
        })
    });
    if !differentiable || model.dtype() != candle_core::DType::F32 {
        return Err("the served model runs bf16 weights or activations, which have no backward; fine-tuning jobs need an f32, NF4 or GGUF-quantized base (not `--dtype bf16`)".into());
    }
    let data = load_data(st, &job.training_file, stop)?;
    let eval = match &job.validation_file {
        Some(id) => Some(load_data(st, id, stop).map_err(|e| format!("validation_file: {e}"))?),
        None => None,
    };
    let dir = st.jobs.job_dir(&job.id);
    let output = dir.join("adapter");
    crate::durable::recover_dir(&output.join("checkpoint")).map_err(|e| e.to_string())?;
    let resume = output.join("checkpoint").join("state.json").is_file();
    let events = dir.join("events.jsonl");
    if resume {
        // Steps after the checkpoint run again: their events from the run that stopped go.
        let step = std::fs::read_to_string(output.join("checkpoint").join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0);
        let kept: String = std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["data"]["step"].as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::durable::write(&events, kept.as_bytes())
            .map_err(|e| redact(st, job, &e.to_string()))?;
    } else {
        let _ = std::fs::remove_file(&events);
        let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
    }
    let hook = StepHook(Arc::new(move |line: &Value| {
        let event = if let Some(v) = line["valid_loss"].as_f64() {
            json!({
                "object": "fine_tuning.job.event", "created_at": now(), "level": "info",
                "type": "metrics", "message": format!("Step {}: full validation loss={v:.4}", line["step"]),
                "data": {"step": line["step"], "full_valid_loss": v},
            })
        } else {
            json!({
            "object": "fine_tuning.job.event", "created_at": now(), "level": "info",
            "type": "metrics", "message": format!("Step {}: training loss={:.4}", line["step"], line["loss"].as_f64().unwrap_or(f64::NAN)),
            "data": {"step": line["step"], "train_loss": line["loss"], "learning_rate": line["lr"], "tokens_per_second": line["tokens_per_second"]},
            })
        };
        if let Err(e) = crate::durable::append_line(&events, &event.to_string()) {
            tracing::warn!("{}: {e}", events.display());
        }
    }));
    let h = &job.hyperparameters;
    let cfg = TrainConfig {
        output: output.clone(),
        overwrite: !resume,
        resume,
        spec: TrainSpec {
            method: if job.adapter.method == "dora" {
                Method::Dora
            } else {
                Method::Lora
            },
            rank: job.adapter.rank,
            alpha: job.adapter.alpha,
            dropout: 0.05,
            targets: Proj::ALL.to_vec(),
            rslora: false,
            seed: job.seed,
            base_model: loaded.id.clone(),
            virtual_tokens: 8,
            reduction_factor: 0,
            prefix_projection: None,
            fuse: Vec::new(),
        },
        lr: 2e-4 * h.learning_rate_multiplier,
        weight_decay: 0.0,
        betas: (0.9, 0.999),
        schedule: Schedule::Cosine,
        warmup_ratio: 0.03,
        batch_size: h.batch_size,
        grad_accum: 1,
        max_grad_norm: 1.0,
        epochs: h.n_epochs,
        max_steps: None,
        save_steps: 10,
        progress: false,
        args: json!({"job": job.id}),
        interrupt_after: None,
        cancel: Some(stop.clone()),
        on_step: Some(hook),
        epoch_checkpoints: Some(dir.join("checkpoints")),
        max_batch_tokens: Some(st.config.train.max_batch_tokens),
        checkpoint_activations: st.config.train.checkpoint_activations,
        keep_checkpoint: true,
        keep_epoch_checkpoints: Some(3),
        progress_every: std::time::Duration::from_secs(10),
    };
    let report = train(model, &data, eval.as_ref(), &cfg).map_err(|e| e.to_string())?;
    let name = ft_name(&loaded.id, job.suffix.as_deref(), &job.id);
    register(st, job, &name, true)?;
    let bytes = dir_bytes(&output) - dir_bytes(&output.join("checkpoint"))
        + dir_bytes(&dir.join("checkpoints"));
    Ok((name, report.tokens, bytes))
}

/// OpenAI's form of a fine-tuned model's name: `ft:BASE:SUFFIX:XXXXXXXX` (the base id's last
/// path part, the job id's last 8 digits).
fn ft_name(base_id: &str, suffix: Option<&str>, job_id: &str) -> String {
    let base: String = base_id
        .rsplit('/')
        .next()
        .unwrap_or(base_id)
        .replace("..", "-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    format!(
        "ft:{base}:{}:{}",
        suffix.unwrap_or(""),
        &job_id[job_id.len() - 8..]
    )
}

/// The names (as the registry keys them) and folders a finished job's model is served under:
/// the adapter, then its served checkpoints.
fn served_names(st: &AppState, job: &JobRecord, name: &str) -> Vec<(String, std::path::PathBuf)> {
    let key = |n: &str| match (&job.owner, n.contains('/')) {
        (Some(t), false) => format!("{t}/{n}"),
        _ => n.to_string(),
    };
    let dir = st.jobs.job_dir(&job.id);
    let steps: Vec<u64> = st
        .jobs
        .checkpoints(job)
        .iter()
        .filter_map(|c| c["step_number"].as_u64())
        .collect();
    std::iter::once((key(name), dir.join("adapter")))
        .chain(served_checkpoints(&steps).into_iter().map(|step| {
            (
                key(&format!("{name}:ckpt-step-{step}")),
                dir.join("checkpoints").join(format!("step-{step}")),
            )
        }))
        .collect()
}

/// Registers a finished job's adapter as `name` in its owner's namespace, and its served
/// checkpoints as `name:ckpt-step-N`; with `quota`, within the owner's `max_adapters` and
/// `max_adapter_bytes` (a job registered before a restart is not counted again).
fn register(st: &AppState, job: &JobRecord, name: &str, quota: bool) -> Result<(), String> {
    use crate::adapters::{AdapterName, PeftAdapter};
    let names = served_names(st, job, name);
    let mut parsed = Vec::with_capacity(names.len());
    for (n, dir) in &names {
        let adapter = AdapterName::parse(n).map_err(|e| e.to_string())?;
        let bytes = PeftAdapter::inspect(dir)
            .map_err(|e| redact(st, job, &e.to_string()))?
            .bytes;
        parsed.push((adapter, dir, bytes));
    }
    if let (true, Some(tenant), Some(keys)) = (quota, &job.owner, &st.keys) {
        if let Some(limits) = keys.limits_of(tenant) {
            let (count, total) = st.registry.added_by(tenant);
            let adding: u64 = parsed.iter().map(|(_, _, b)| b).sum();
            if count + parsed.len() > limits.max_adapters {
                return Err(format!("quota: registering the model and its {} checkpoints would exceed your key's {} run-time adapters (`max_adapters`)", parsed.len() - 1, limits.max_adapters));
            }
            if total + adding > limits.max_adapter_bytes {
                return Err(format!("quota: the model and its checkpoints ({adding} bytes) would exceed your key's `max_adapter_bytes` ({})", limits.max_adapter_bytes));
            }
        }
    }
    for (adapter, dir, bytes) in parsed {
        st.registry
            .snapshot(dir)
            .and_then(|(version, snap)| st.registry.add(&adapter, snap, version, false, bytes))
            .map_err(|e| redact(st, job, &e.to_string()))?;
    }
    Ok(())
}

/// At start-up, per job: finishes an interrupted model deletion, serves a succeeded job's model
/// again, and removes what an ended job no longer needs (its resume state, half-written
/// exports).
pub(super) fn tidy(st: &AppState, job: &JobRecord) {
    let dir = st.jobs.job_dir(&job.id);
    for entry in std::fs::read_dir(dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().ends_with(".tmp") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    if job.model_deleted {
        let _ = std::fs::remove_dir_all(dir.join("adapter"));
        let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
        return;
    }
    if job.finished() {
        remove_resume_state(st, &job.id);
    }
    if job.status == "succeeded" {
        if let Some(name) = job.fine_tuned_model.as_deref() {
            if let Err(e) = register(st, job, name, false) {
                tracing::warn!("fine-tuned adapter {name} of job {}: {e}", job.id);
            }
        }
    }
}

/// `DELETE /v1/models/{name}` of a fine-tuned model: the deletion recorded first, then the
/// names unregistered and the files removed (a crash in between finishes at the next start).
pub(super) fn delete_model(st: &AppState, job: &JobRecord) -> Result<(), super::error::ApiError> {
    let Some(name) = job.fine_tuned_model.as_deref() else {
        return Ok(());
    };
    let names = served_names(st, job, name);
    st.jobs.mark_model_deleted(&job.id)?;
    for (n, _) in names {
        if let Ok(parsed) = crate::adapters::AdapterName::parse(&n) {
            let _ = st.registry.remove(&parsed);
            st.cache.remove(&parsed);
        }
    }
    let dir = st.jobs.job_dir(&job.id);
    let _ = std::fs::remove_dir_all(dir.join("adapter"));
    let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_follow_openai() {
        assert_eq!(
            super::ft_name(
                "HuggingFaceTB/SmolLM2-135M-Instruct",
                Some("x"),
                "ftjob-0123456789abcdef01234567"
            ),
            "ft:SmolLM2-135M-Instruct:x:01234567"
        );
    }
}
