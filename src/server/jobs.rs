//! Fine-tuning jobs (`/v1/fine_tuning/jobs`): each a folder `STATE/jobs/ID/` holding `job.json`
//! (the record), `events.jsonl` (one line per training step), `adapter/` (the trainer's output,
//! with its resume checkpoint) and `checkpoints/` (the adapter at the last three epochs' ends,
//! with the training and validation loss). The records are read once at start into an index
//! kept in memory, so listing and quota checks touch no disk; every change is written durably
//! (temporary file, fsync, rename) before the index shows it.
//!
//! A job holds one of its tenant's `max_jobs` slots from its creation until its work has
//! stopped (validation or training): a cancel frees the slot only once that work ends. Jobs are
//! validated on one thread at the training priority and trained by `--max-training-jobs`
//! workers; both queues are fair across tenants (`job_queue`). The runner is `job_runner`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::ApiError;
use super::job_queue::WaitQueue;
use super::state::{unix_now as now, AppState};

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
    /// `DELETE /v1/models/{fine_tuned_model}` removed the model and its files.
    #[serde(default)]
    pub model_deleted: bool,
    /// Bytes the job's outputs hold on disk (adapter and served checkpoints), once finished.
    #[serde(default)]
    pub output_bytes: u64,
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

    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

/// What the store knows in memory.
#[derive(Default)]
pub(super) struct Index {
    loaded: bool,
    pub(super) jobs: HashMap<String, JobRecord>,
    /// Jobs whose work has not stopped, and their owners: they hold the owners' slots.
    busy: HashMap<String, Option<String>>,
    /// Each unfinished job's stop flag (set by a cancel or the time limit).
    pub(super) cancels: HashMap<String, Arc<AtomicBool>>,
}

pub struct JobStore {
    dir: PathBuf,
    index: Mutex<Index>,
    /// Jobs waiting for a training worker.
    pub(super) queue: Arc<WaitQueue>,
    /// Jobs waiting for their files to be validated.
    pub(super) validations: Arc<WaitQueue>,
    started: OnceLock<()>,
    validator: OnceLock<()>,
}

fn valid_id(id: &str) -> bool {
    id.strip_prefix("ftjob-")
        .is_some_and(|h| h.len() == 24 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub(super) fn internal(path: &Path, e: impl std::fmt::Display) -> ApiError {
    tracing::error!("job store: {}: {e}", path.display());
    ApiError::Internal("the job store failed; see the server log".into())
}

/// A tenant's count of `owner`'s busy jobs.
fn busy_for(index: &Index, owner: Option<&str>) -> usize {
    index
        .busy
        .values()
        .filter(|o| o.as_deref() == owner)
        .count()
}

impl JobStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("jobs"),
            index: Mutex::new(Index::default()),
            queue: Arc::default(),
            validations: Arc::default(),
            started: OnceLock::new(),
            validator: OnceLock::new(),
        }
    }

    pub(super) fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The index, read from disk on first use (leftover temporary records removed).
    pub(super) fn index(&self) -> MutexGuard<'_, Index> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if !index.loaded {
            index.loaded = true;
            for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !valid_id(&id) {
                    continue;
                }
                let dir = entry.path();
                let _ = std::fs::remove_file(dir.join("job.json.tmp"));
                match std::fs::read_to_string(dir.join("job.json"))
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_str::<JobRecord>(&t).map_err(|e| e.to_string()))
                {
                    Ok(job) => {
                        index.jobs.insert(id, job);
                    }
                    // Created but never recorded (a crash before the record): not a job.
                    Err(e) => {
                        tracing::warn!("job folder {id} has no readable record ({e}); removed");
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
            }
        }
        index
    }

    /// Writes `job`'s record durably, then shows it in `index`.
    pub(super) fn write(&self, index: &mut Index, job: &JobRecord) -> Result<(), ApiError> {
        let path = self.job_dir(&job.id).join("job.json");
        let text = serde_json::to_string(job).expect("a record serializes");
        crate::durable::write(&path, text.as_bytes()).map_err(|e| internal(&path, e))?;
        index.jobs.insert(job.id.clone(), job.clone());
        Ok(())
    }

    /// Changes the record of job `id` with `change` (which says whether it changed anything),
    /// with no other change in between; the record after, if `change` changed it.
    pub(super) fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut JobRecord, &mut Index) -> bool,
    ) -> Result<Option<JobRecord>, ApiError> {
        let mut index = self.index();
        let Some(mut job) = index.jobs.get(id).cloned() else {
            return Ok(None);
        };
        if !change(&mut job, &mut index) {
            return Ok(None);
        }
        self.write(&mut index, &job)?;
        Ok(Some(job))
    }

    /// The job's record as the store has it.
    pub(super) fn load(&self, id: &str) -> Option<JobRecord> {
        self.index().jobs.get(id).cloned()
    }

    /// The job's stop flag.
    pub(super) fn stop_flag(&self, id: &str) -> Arc<AtomicBool> {
        self.index()
            .cancels
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// The job's work has stopped: its slot is free.
    pub(super) fn release(&self, id: &str) {
        let mut index = self.index();
        index.busy.remove(id);
        index.cancels.remove(id);
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
        let mut jobs: Vec<JobRecord> = self
            .index()
            .jobs
            .values()
            .filter(|j| scope.is_none_or(|o| j.owner.as_deref() == o))
            .cloned()
            .collect();
        jobs.sort_by(|a, b| {
            (b.created_at, b.created_subsec, &b.id).cmp(&(a.created_at, a.created_subsec, &a.id))
        });
        jobs
    }

    /// Jobs of `owner` whose work has not stopped (what `max_jobs` counts).
    pub fn busy(&self, owner: Option<&str>) -> usize {
        busy_for(&self.index(), owner)
    }

    /// Bytes `owner`'s job outputs hold, with `reserve` bytes for each job still at work.
    pub fn output_bytes(&self, owner: Option<&str>, reserve: u64) -> u64 {
        let index = self.index();
        let done: u64 = index
            .jobs
            .values()
            .filter(|j| j.owner.as_deref() == owner && !j.model_deleted)
            .map(|j| j.output_bytes)
            .sum();
        done + busy_for(&index, owner) as u64 * reserve
    }

    /// The job's events (one per training step), oldest first (blocking: reads its log).
    pub fn events(&self, job: &JobRecord) -> Vec<Value> {
        std::fs::read_to_string(self.job_dir(&job.id).join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The job's epoch checkpoints, oldest first, as OpenAI's `fine_tuning.job.checkpoint`
    /// objects (a step written twice by a resumed run counts once: its last line). Those with a
    /// `fine_tuned_model_checkpoint` are served under that name (blocking: reads its log).
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
                    (Some(m), true) if !job.model_deleted => {
                        json!(format!("{m}:ckpt-step-{step}"))
                    }
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

    /// Keeps a new job (`validating_files`) and queues its validation, if `owner` has a slot
    /// free: the check and the reservation happen under one lock, so concurrent requests cannot
    /// both take the last slot. `max_jobs`: `None` for admins.
    pub fn submit(
        &self,
        st: &Arc<AppState>,
        job: JobRecord,
        max_jobs: Option<usize>,
    ) -> Result<JobRecord, ApiError> {
        let mut index = self.index();
        if let Some(max) = max_jobs {
            if busy_for(&index, job.owner.as_deref()) >= max {
                return Err(ApiError::forbidden(
                    "training_file",
                    format!(
                        "quota: your key allows {max} fine-tuning jobs queued or running at once (`max_jobs`); a cancelled job's slot is free once its work has stopped"
                    ),
                ));
            }
        }
        self.write(&mut index, &job)?;
        index.busy.insert(job.id.clone(), job.owner.clone());
        index.cancels.insert(job.id.clone(), Arc::default());
        self.validations.push(job.owner.as_deref(), &job.id);
        drop(index);
        self.ensure_validator(Arc::downgrade(st));
        Ok(job)
    }

    /// After validation: `queued` (and on the training queue, in the same critical section,
    /// so a cancel cannot fall between) or `failed` with `error`. A job cancelled meanwhile
    /// stays cancelled. Whether it was queued.
    pub(super) fn validated(&self, id: &str, error: Option<Value>) -> bool {
        let mut queued = false;
        let updated = self.update(id, |j, index| {
            if j.status != "validating_files" {
                return false;
            }
            if index
                .cancels
                .get(id)
                .is_some_and(|f| f.load(Ordering::SeqCst))
            {
                return false;
            }
            match &error {
                None => {
                    j.status = "queued".into();
                    self.queue.push(j.owner.as_deref(), id);
                    queued = true;
                }
                Some(e) => {
                    j.status = "failed".into();
                    j.finished_at = Some(now());
                    j.error = Some(e.clone());
                }
            }
            true
        });
        if let Err(e) = updated {
            tracing::error!("fine-tuning job {id}: {}", e.message());
            self.queue.lock().remove(id);
            queued = false;
        }
        queued
    }

    /// Asks a job to stop: one not yet at work is cancelled at once (and its slot freed); one
    /// validating or training stops at its next line or step, and frees its slot then.
    pub fn cancel(&self, id: &str, scope: Option<Option<&str>>) -> Result<JobRecord, ApiError> {
        self.get(id, scope)?;
        let mut index = self.index();
        let Some(mut job) = index.jobs.get(id).cloned() else {
            return Err(ApiError::NotFound(format!("no fine-tuning job `{id}`")));
        };
        if job.finished() {
            return Err(ApiError::Conflict(format!(
                "fine-tuning job `{id}` has already {}",
                job.status
            )));
        }
        index
            .cancels
            .entry(id.to_string())
            .or_default()
            .store(true, Ordering::SeqCst);
        // Not yet picked up by a validator or a worker: nothing runs for it.
        let waiting = self.validations.lock().remove(id) || self.queue.lock().remove(id);
        if waiting || job.status == "validating_files" {
            job.status = "cancelled".into();
            job.finished_at = Some(now());
            self.write(&mut index, &job)?;
        }
        if waiting {
            index.busy.remove(id);
            index.cancels.remove(id);
        }
        Ok(job)
    }

    /// At start-up: cleans what a crash left half-done, registers the adapters finished jobs
    /// made, queues again the jobs a previous run left unfinished (training ones resume from
    /// their checkpoints) and starts the workers if there are any.
    pub fn recover(&self, st: Weak<AppState>) {
        let jobs = self.list(None);
        if let Some(state) = st.upgrade() {
            for job in &jobs {
                super::job_runner::tidy(&state, job);
            }
        }
        let mut pending: Vec<JobRecord> = jobs.into_iter().filter(|j| !j.finished()).collect();
        if pending.is_empty() {
            return;
        }
        pending.sort_by_key(|j| (j.created_at, j.created_subsec));
        let mut index = self.index();
        for job in pending {
            tracing::info!("fine-tuning job {} ({}) queued again", job.id, job.status);
            index.busy.insert(job.id.clone(), job.owner.clone());
            index.cancels.insert(job.id.clone(), Arc::default());
            if job.status == "validating_files" {
                self.validations.push(job.owner.as_deref(), &job.id);
            } else {
                self.queue.push(job.owner.as_deref(), &job.id);
            }
        }
        drop(index);
        self.ensure_validator(st.clone());
        self.ensure_worker(st);
    }

    /// Starts the validating thread once (nice 10, below serving).
    pub fn ensure_validator(&self, st: Weak<AppState>) {
        if self.validator.set(()).is_err() {
            return;
        }
        let queue = self.validations.clone();
        let spawned = std::thread::Builder::new()
            .name("fine-tuning-validate".into())
            .spawn(move || {
                super::job_runner::lower_priority();
                loop {
                    let id = queue.next();
                    let Some(st) = st.upgrade() else { return };
                    super::job_runner::validate(&st, &id);
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the fine-tuning validator: {e}");
        }
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
                    super::job_runner::lower_priority();
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |i| format!("train-{n}-{i}"))
                        .start_handler(|_| super::job_runner::lower_priority())
                        .build();
                    match pool {
                        Ok(pool) => pool.install(|| super::job_runner::worker(queue, st)),
                        Err(e) => tracing::error!("cannot start the training pool: {e}"),
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start the fine-tuning worker: {e}");
            }
        }
    }

    /// The finished job whose fine-tuned model is `name` (or one of its checkpoints), if
    /// `scope` may see it.
    pub fn by_model(&self, name: &str, scope: Option<Option<&str>>) -> Option<JobRecord> {
        let base = name.split(":ckpt-step-").next().unwrap_or(name);
        self.index()
            .jobs
            .values()
            .find(|j| {
                j.fine_tuned_model.as_deref() == Some(base)
                    && !j.model_deleted
                    && scope.is_none_or(|o| j.owner.as_deref() == o)
            })
            .cloned()
    }

    /// Marks `job`'s model deleted (durably, first: a restart never registers it again).
    pub fn mark_model_deleted(&self, id: &str) -> Result<Option<JobRecord>, ApiError> {
        self.update(id, |j, _| {
            if j.model_deleted {
                return false;
            }
            j.model_deleted = true;
            j.output_bytes = 0;
            true
        })
    }
}

/// The steps of the epoch checkpoints served as models: the last three (as OpenAI keeps).
pub(super) fn served_checkpoints(steps: &[u64]) -> Vec<u64> {
    steps[steps.len().saturating_sub(3)..].to_vec()
}
