//! Fine-tuning jobs (`/v1/fine_tuning/jobs`): each a folder `STATE/jobs/ID/` holding `job.json`
//! (the record), `events.jsonl` (one line per training step), `adapter/` (the trainer's output,
//! with its resume checkpoint) and `checkpoints/` (the adapter at each epoch's end, with the
//! training and validation loss). Worker threads run the queued jobs on the model the server
//! serves (the same weights in memory, f32, NF4 or GGUF-quantized) and register each trained
//! adapter in its tenant's namespace as `ft:BASE:SUFFIX:XXXXXXXX` (and the last three epochs'
//! checkpoints as `…:ckpt-step-N`). A job that was queued or running when the server stopped is
//! queued again at start-up and resumes from its last checkpoint.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::ApiError;
use super::state::AppState;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hyperparameters {
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
}

/// The adapter a job trains (extension `adapter` of the request).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterSpec {
    pub method: String,
    pub rank: usize,
    pub alpha: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub model: String,
    pub created_at: u64,
    /// Nanoseconds of the creation time within its second (orders jobs created in one second).
    #[serde(default)]
    pub created_subsec: u32,
    pub finished_at: Option<u64>,
    /// `validating_files`, `queued`, `running`, `succeeded`, `failed`, `cancelled`.
    pub status: String,
    pub training_file: String,
    #[serde(default)]
    pub validation_file: Option<String>,
    pub fine_tuned_model: Option<String>,
    pub hyperparameters: Hyperparameters,
    pub adapter: AdapterSpec,
    pub suffix: Option<String>,
    pub seed: u64,
    pub error: Option<Value>,
    pub trained_tokens: Option<usize>,
    #[serde(default)]
    pub owner: Option<String>,
}

impl JobRecord {
    pub fn public(&self) -> Value {
        json!({
            "id": self.id, "object": "fine_tuning.job", "model": self.model,
            "created_at": self.created_at, "finished_at": self.finished_at,
            "status": self.status, "training_file": self.training_file, "validation_file": self.validation_file,
            "fine_tuned_model": self.fine_tuned_model,
            "hyperparameters": self.hyperparameters, "seed": self.seed, "error": self.error,
            "trained_tokens": self.trained_tokens, "result_files": [],
            "method": {"type": "supervised", "supervised": {"hyperparameters": self.hyperparameters}},
            "adapter": self.adapter, "suffix": self.suffix,
        })
    }

    fn finished(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

pub struct JobStore {
    dir: PathBuf,
    lock: Mutex<()>,
    queue: Arc<Queue>,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    started: std::sync::OnceLock<()>,
}

/// The job ids waiting, shared with the worker (which holds no strong reference to the state
/// while it waits).
#[derive(Default)]
struct Queue {
    ids: Mutex<VecDeque<String>>,
    wake: Condvar,
}

impl Queue {
    fn next(&self) -> String {
        let mut q = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(id) = q.pop_front() {
                return id;
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn valid_id(id: &str) -> bool {
    id.strip_prefix("ftjob-")
        .is_some_and(|h| h.len() == 24 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

use super::state::unix_now as now;

fn internal(path: &Path, e: impl std::fmt::Display) -> ApiError {
    tracing::error!("job store: {}: {e}", path.display());
    ApiError::Internal("the job store failed; see the server log".into())
}

impl JobStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("jobs"),
            lock: Mutex::new(()),
            queue: Arc::default(),
            cancels: Mutex::new(HashMap::new()),
            started: std::sync::OnceLock::new(),
        }
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn save(&self, job: &JobRecord) -> Result<(), ApiError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.write(job)
    }

    /// Changes the record of job `id` with `change` (which says whether it changed anything),
    /// with no other change in between; the record after, if `change` changed it.
    fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut JobRecord) -> bool,
    ) -> Result<Option<JobRecord>, ApiError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut job) = self.load(id) else {
            return Ok(None);
        };
        if !change(&mut job) {
            return Ok(None);
        }
        self.write(&job)?;
        Ok(Some(job))
    }

    fn write(&self, job: &JobRecord) -> Result<(), ApiError> {
        let dir = self.job_dir(&job.id);
        std::fs::create_dir_all(&dir).map_err(|e| internal(&dir, e))?;
        let path = dir.join("job.json");
        let tmp = dir.join("job.json.tmp");
        std::fs::write(&tmp, serde_json::to_string(job).expect("json"))
            .map_err(|e| internal(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| internal(&path, e))
    }

    fn load(&self, id: &str) -> Option<JobRecord> {
        let text = std::fs::read_to_string(self.job_dir(id).join("job.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The job if `scope` may see it (as for files: another tenant's is the 404 of a missing one).
    pub fn get(&self, id: &str, scope: Option<Option<&str>>) -> Result<JobRecord, ApiError> {
        let missing = || ApiError::NotFound(format!("no fine-tuning job `{id}`"));
        if !valid_id(id) {
            return Err(missing());
        }
        let job = self.load(id).ok_or_else(missing)?;
        match scope {
            Some(o) if job.owner.as_deref() != o => Err(missing()),
            _ => Ok(job),
        }
    }

    /// The jobs `scope` may see, newest first.
    pub fn list(&self, scope: Option<Option<&str>>) -> Vec<JobRecord> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut jobs: Vec<JobRecord> = entries
            .flatten()
            .filter_map(|e| self.get(e.file_name().to_str()?, scope).ok())
            .collect();
        jobs.sort_by(|a, b| {
            (b.created_at, b.created_subsec, &b.id).cmp(&(a.created_at, a.created_subsec, &a.id))
        });
        jobs
    }

    /// The job's events (one per training step), oldest first.
    pub fn events(&self, job: &JobRecord) -> Vec<Value> {
        std::fs::read_to_string(self.job_dir(&job.id).join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The job's epoch checkpoints, oldest first, as OpenAI's `fine_tuning.job.checkpoint`
    /// objects (a step written twice by a resumed run counts once: its last line). Those with a
    /// `fine_tuned_model_checkpoint` are served under that name.
    pub fn checkpoints(&self, job: &JobRecord) -> Vec<Value> {
        let text = std::fs::read_to_string(
            self.job_dir(&job.id)
                .join("checkpoints")
                .join("checkpoints.jsonl"),
        )
        .unwrap_or_default();
        let mut by_step = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                if let Some(step) = v["step"].as_u64() {
                    by_step.insert(step, v);
                }
            }
        }
        let served = served_checkpoints(&by_step.keys().copied().collect::<Vec<_>>());
        by_step
            .into_iter()
            .map(|(step, c)| {
                let model = match (&job.fine_tuned_model, served.contains(&step)) {
                    (Some(m), true) => json!(format!("{m}:ckpt-step-{step}")),
                    _ => Value::Null,
                };
                json!({
                    "object": "fine_tuning.job.checkpoint",
                    "id": format!("ftckpt-{}-{step}", &job.id[6..]),
                    "created_at": c["created_at"], "fine_tuning_job_id": job.id,
                    "step_number": step, "fine_tuned_model_checkpoint": model,
                    "metrics": {"step": step, "epoch": c["epoch"], "train_loss": c["train_loss"],
                        "valid_loss": c["valid_loss"], "full_valid_loss": c["valid_loss"]},
                })
            })
            .collect()
    }

    /// Keeps a new job (`validating_files`); `validate` queues it once its files read as
    /// training data.
    pub fn submit(&self, job: JobRecord) -> Result<JobRecord, ApiError> {
        self.save(&job)?;
        Ok(job)
    }

    /// Reads a new job's files as training data with the served model's tokenizer and template
    /// (blocking): then `queued` (and the workers started), or `failed` with the error naming
    /// the file. A job cancelled meanwhile stays cancelled.
    pub fn validate(&self, st: &Arc<AppState>, id: &str) {
        let Some(job) = self.load(id) else { return };
        let checked = load_data(st, &job.training_file)
            .map_err(|e| ("training_file", job.training_file.clone(), e))
            .and_then(|_| match &job.validation_file {
                Some(v) => load_data(st, v)
                    .map(|_| ())
                    .map_err(|e| ("validation_file", v.clone(), e)),
                None => Ok(()),
            });
        let updated = self.update(id, |j| {
            if j.status != "validating_files" {
                return false;
            }
            match &checked {
                Ok(()) => j.status = "queued".into(),
                Err((param, file, message)) => {
                    j.status = "failed".into();
                    j.finished_at = Some(now());
                    j.error = Some(json!({"code": format!("invalid_{param}"),
                        "message": format!("file `{file}`: {message}"), "param": param}));
                }
            }
            true
        });
        if let Ok(Some(j)) = updated {
            if j.status == "queued" {
                self.enqueue(id);
                self.ensure_worker(Arc::downgrade(st));
            }
        }
    }

    fn enqueue(&self, id: &str) {
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), Arc::new(AtomicBool::new(false)));
        self.queue
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(id.to_string());
        self.queue.wake.notify_one();
    }

    /// Asks a job to stop: a queued one is cancelled at once, a running one after its step.
    pub fn cancel(&self, id: &str, scope: Option<Option<&str>>) -> Result<JobRecord, ApiError> {
        self.get(id, scope)?;
        // Still validating: cancelled at once (`validate` leaves it so).
        let stopped = self.update(id, |j| {
            if j.status != "validating_files" {
                return false;
            }
            j.status = "cancelled".into();
            j.finished_at = Some(now());
            true
        })?;
        if let Some(job) = stopped {
            return Ok(job);
        }
        let mut job = self.get(id, scope)?;
        if job.finished() {
            return Err(ApiError::Conflict(format!(
                "fine-tuning job `{id}` has already {}",
                job.status
            )));
        }
        if let Some(flag) = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            flag.store(true, Ordering::Relaxed);
        }
        let queued = {
            let mut q = self.queue.ids.lock().unwrap_or_else(|p| p.into_inner());
            let before = q.len();
            q.retain(|j| j != id);
            q.len() < before
        };
        if queued {
            job.status = "cancelled".into();
            job.finished_at = Some(now());
            self.save(&job)?;
        }
        Ok(job)
    }

    /// At start-up: registers the adapters finished jobs made, queues the jobs a previous run
    /// left unfinished (they resume from their checkpoints) and starts the workers if there are
    /// any.
    pub fn recover(&self, st: Weak<AppState>) {
        // Adapters that finished jobs registered are served again.
        if let Some(state) = st.upgrade() {
            for job in self
                .list(None)
                .into_iter()
                .filter(|j| j.status == "succeeded")
            {
                let Some(name) = job.fine_tuned_model.as_deref() else {
                    continue;
                };
                if let Err(e) = register(&state, &job, name) {
                    tracing::warn!("fine-tuned adapter {name} of job {}: {e}", job.id);
                }
            }
        }
        let mut pending: Vec<JobRecord> = self
            .list(None)
            .into_iter()
            .filter(|j| !j.finished())
            .collect();
        if pending.is_empty() {
            return;
        }
        pending.sort_by_key(|j| (j.created_at, j.created_subsec));
        for job in pending {
            tracing::info!("fine-tuning job {} ({}) queued again", job.id, job.status);
            self.enqueue(&job.id);
        }
        self.ensure_worker(st);
    }

    /// Starts the workers once: `--max-training-jobs` threads, each training in its own compute
    /// pool of `--train-threads` threads at nice 10, below serving.
    pub fn ensure_worker(&self, st: Weak<AppState>) {
        if self.started.set(()).is_err() {
            return;
        }
        let Some(state) = st.upgrade() else { return };
        let (workers, threads) = (
            state.config.max_training_jobs.max(1),
            state.config.train_threads,
        );
        drop(state);
        for n in 0..workers {
            let (queue, st) = (self.queue.clone(), st.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("fine-tuning-{n}"))
                .spawn(move || {
                    lower_priority();
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |i| format!("train-{n}-{i}"))
                        .start_handler(|_| lower_priority())
                        .build();
                    match pool {
                        Ok(pool) => pool.install(|| worker(queue, st)),
                        Err(e) => tracing::error!("cannot start the training pool: {e}"),
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start the fine-tuning worker: {e}");
            }
        }
    }
}

/// Nice 10 for the calling thread (Linux: per thread), so serving's threads come first.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: `setpriority` on this thread's id; it only changes its scheduling priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, 10) != 0 {
            tracing::debug!("could not lower the training thread's priority");
        }
    }
}

fn worker(queue: Arc<Queue>, st: Weak<AppState>) {
    loop {
        let id = queue.next();
        let Some(st) = st.upgrade() else { return };
        let Some(mut job) = st.jobs.load(&id) else {
            continue;
        };
        if job.finished() {
            continue;
        }
        job.status = "running".into();
        let _ = st.jobs.save(&job);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&st, &job)));
        let result = result.unwrap_or_else(|_| Err("the training run panicked".into()));
        let cancelled = st
            .jobs
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .is_some_and(|f| f.load(Ordering::Relaxed));
        job.finished_at = Some(now());
        match result {
            Ok((name, tokens)) => {
                job.status = "succeeded".into();
                job.fine_tuned_model = Some(name);
                job.trained_tokens = Some(tokens);
            }
            Err(_) if cancelled => job.status = "cancelled".into(),
            Err(message) => {
                tracing::warn!("fine-tuning job {id} failed: {message}");
                job.status = "failed".into();
                job.error =
                    Some(json!({"code": "training_failed", "message": message, "param": null}));
            }
        }
        let _ = st.jobs.save(&job);
    }
}

/// Trains `job` on the served model and registers the adapter; its registered name and the
/// tokens trained on.
fn run(st: &Arc<AppState>, job: &JobRecord) -> Result<(String, usize), String> {
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
    let data = load_data(st, &job.training_file)?;
    let eval = match &job.validation_file {
        Some(id) => Some(load_data(st, id).map_err(|e| format!("validation_file: {e}"))?),
        None => None,
    };
    let dir = st.jobs.job_dir(&job.id);
    let output = dir.join("adapter");
    let resume = output.join("checkpoint").join("state.json").is_file();
    let cancel = st
        .jobs
        .cancels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&job.id)
        .cloned();
    let events = dir.join("events.jsonl");
    if !resume {
        let _ = std::fs::remove_file(&events);
    }
    let hook = StepHook(Arc::new(move |line: &Value| {
        use std::io::Write;
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
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&events)
        {
            let _ = writeln!(f, "{event}");
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
        cancel,
        on_step: Some(hook),
        epoch_checkpoints: Some(dir.join("checkpoints")),
    };
    let report = train(model, &data, eval.as_ref(), &cfg).map_err(|e| e.to_string())?;
    let name = ft_name(&loaded.id, job.suffix.as_deref(), &job.id);
    register(st, job, &name)?;
    Ok((name, report.tokens))
}

/// File `id` as training data for the served model (its tokenizer and chat template).
fn load_data(st: &AppState, id: &str) -> Result<crate::train::dataset::Dataset, String> {
    use crate::train::dataset::{Dataset, Format, Tokenization};
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
        max_seq_len: 512,
        format: Format::Auto,
    };
    Dataset::load(&st.files.contents(&file), &tok, false).map_err(|e| e.to_string())
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

/// The steps of the epoch checkpoints served as models: the last three (as OpenAI keeps).
fn served_checkpoints(steps: &[u64]) -> Vec<u64> {
    steps[steps.len().saturating_sub(3)..].to_vec()
}

/// Registers a finished job's adapter as `name` in its owner's namespace, and its served
/// checkpoints as `name:ckpt-step-N`. (`name` may hold the owner already: records of older
/// versions kept `TENANT/NAME`.)
fn register(st: &AppState, job: &JobRecord, name: &str) -> Result<(), String> {
    use crate::adapters::{AdapterName, PeftAdapter};
    let key = |n: &str| match (&job.owner, n.contains('/')) {
        (Some(t), false) => format!("{t}/{n}"),
        _ => n.to_string(),
    };
    let add = |n: &str, dir: &Path| -> Result<(), String> {
        let parsed = AdapterName::parse(&key(n)).map_err(|e| e.to_string())?;
        let bytes = PeftAdapter::inspect(dir).map_err(|e| e.to_string())?.bytes;
        st.registry
            .add(&parsed, dir, false, bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let dir = st.jobs.job_dir(&job.id);
    add(name, &dir.join("adapter"))?;
    let steps: Vec<u64> = st
        .jobs
        .checkpoints(job)
        .iter()
        .filter_map(|c| c["step_number"].as_u64())
        .collect();
    for step in served_checkpoints(&steps) {
        let at = dir.join("checkpoints").join(format!("step-{step}"));
        add(&format!("{name}:ckpt-step-{step}"), &at)?;
    }
    Ok(())
}

/// A new job from a request's fields, checked (400 naming the field).
pub fn new_job(
    body: &Value,
    owner: Option<String>,
    base_id: &str,
) -> Result<(JobRecord, String), ApiError> {
    let model = body["model"]
        .as_str()
        .ok_or_else(|| ApiError::bad("model", "is missing"))?;
    if model != base_id {
        return Err(ApiError::bad(
            "model",
            format!("is `{model}`; this server fine-tunes its base model `{base_id}` only"),
        ));
    }
    let file = body["training_file"]
        .as_str()
        .ok_or_else(|| ApiError::bad("training_file", "is missing"))?
        .to_string();
    let validation_file = match &body["validation_file"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        _ => {
            return Err(ApiError::bad(
                "validation_file",
                "must be a file id (a string) or null",
            ))
        }
    };
    let hp = &body["method"]["supervised"]["hyperparameters"];
    let hp = if hp.is_object() {
        hp
    } else {
        &body["hyperparameters"]
    };
    let field = |k: &str| format!("method.supervised.hyperparameters.{k}");
    let int = |k: &str, default: usize, max: usize| -> Result<usize, ApiError> {
        match &hp[k] {
            Value::Null => Ok(default),
            Value::String(s) if s == "auto" => Ok(default),
            v => v
                .as_u64()
                .map(|n| n as usize)
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::bad(
                        &field(k),
                        format!("must be an integer in 1..={max} or \"auto\""),
                    )
                }),
        }
    };
    let lr = match &hp["learning_rate_multiplier"] {
        Value::Null => 1.0,
        Value::String(s) if s == "auto" => 1.0,
        v => v
            .as_f64()
            .filter(|x| *x > 0.0 && *x <= 100.0)
            .ok_or_else(|| {
                ApiError::bad(
                    &field("learning_rate_multiplier"),
                    "must be a number in (0, 100] or \"auto\"",
                )
            })?,
    };
    let hyperparameters = Hyperparameters {
        n_epochs: int("n_epochs", 3, 50)?,
        batch_size: int("batch_size", 4, 64)?,
        learning_rate_multiplier: lr,
    };
    let a = &body["adapter"];
    let method = a["method"].as_str().unwrap_or("lora").to_string();
    if !matches!(method.as_str(), "lora" | "dora") {
        return Err(ApiError::bad(
            "adapter.method",
            format!("is `{method}`; jobs train lora or dora"),
        ));
    }
    let rank = match &a["rank"] {
        Value::Null => 8,
        v => v
            .as_u64()
            .filter(|r| (1..=256).contains(r))
            .ok_or_else(|| ApiError::bad("adapter.rank", "must be an integer in 1..=256"))?
            as usize,
    };
    let alpha = match &a["alpha"] {
        Value::Null => 2.0 * rank as f64,
        v => v
            .as_f64()
            .filter(|x| *x > 0.0)
            .ok_or_else(|| ApiError::bad("adapter.alpha", "must be a positive number"))?,
    };
    let suffix = match &body["suffix"] {
        Value::Null => None,
        Value::String(s) => {
            if s.is_empty()
                || s.len() > 18
                || !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ApiError::bad(
                    "suffix",
                    "must be 1 to 18 characters of A-Z a-z 0-9 - _",
                ));
            }
            Some(s.clone())
        }
        _ => return Err(ApiError::bad("suffix", "must be a string")),
    };
    let seed = match &body["seed"] {
        Value::Null => rand::random::<u32>() as u64,
        v => v
            .as_u64()
            .ok_or_else(|| ApiError::bad("seed", "must be a non-negative integer"))?,
    };
    let job = JobRecord {
        id: format!("ftjob-{:024x}", rand::random::<u128>() >> 32),
        model: model.to_string(),
        created_at: now(),
        created_subsec: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
        finished_at: None,
        status: "validating_files".into(),
        training_file: file.clone(),
        validation_file,
        fine_tuned_model: None,
        hyperparameters,
        adapter: AdapterSpec {
            method,
            rank,
            alpha,
        },
        suffix,
        seed,
        error: None,
        trained_tokens: None,
        owner,
    };
    Ok((job, file))
}
