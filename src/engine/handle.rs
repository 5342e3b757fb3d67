//! The `Engine` handle the server sees: `submit(ValidRequest)` → a stream of `Event`s. A worker
//! thread owns the model and runs continuous batching (see `worker.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::generate::{FinishReason, GenerationConfig};
use super::scheduler::{Refusal, Scheduler, SchedulerConfig};
use super::sequence::TokenLogprob;
use crate::adapters::Lease;
use crate::metrics::Metrics;
use crate::model::LoadedModel;

/// A request that passed validation: token ids, generation settings, its adapter lease.
#[derive(Debug)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub config: GenerationConfig,
    /// `Some(k)`: report log-probabilities with `k` alternatives per token.
    pub logprobs: Option<usize>,
    pub adapter: Option<Lease>,
    /// Metrics label of the adapter (bounded cardinality).
    pub adapter_label: Option<String>,
    /// Whose request it is: each tenant has its own share of the queue and its turn.
    pub tenant: Option<String>,
}

/// What a request's stream carries.
#[derive(Debug, Clone)]
pub enum Event {
    Token {
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
    /// Ended by the server, not by a fault (shutdown past its timeout); the message says why.
    Aborted(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("the request queue is full; retry later")]
    QueueFull,
    #[error("`max_tokens` plus the prompt needs {needed} KV positions; the server holds {budget}")]
    TooLarge { needed: usize, budget: usize },
    #[error("the server is shutting down")]
    Draining,
}

pub(crate) struct Submitted {
    pub id: u64,
    pub request: ValidRequest,
    pub events: UnboundedSender<Event>,
}

pub(crate) struct Shared {
    pub scheduler: Mutex<Scheduler>,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    /// Set at the end of a drain: the worker fails everything still running or waiting.
    pub cancel: AtomicBool,
    pub max_running: usize,
    pub max_batched_tokens: usize,
}

pub struct Engine {
    tx: mpsc::Sender<Submitted>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    model: Arc<LoadedModel>,
}

impl Engine {
    /// Starts the worker thread that owns `model`.
    pub fn start(model: Arc<LoadedModel>, config: SchedulerConfig, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            max_running: config.max_running,
            max_batched_tokens: config.max_batched_tokens,
            scheduler: Mutex::new(Scheduler::new(config)),
            metrics,
            draining: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
        });
        let worker_shared = shared.clone();
        let worker_model = model.clone();
        std::thread::Builder::new()
            .name("loraplex-engine".into())
            .spawn(move || super::worker::run(worker_model, rx, worker_shared))
            .expect("spawn engine thread");
        Self {
            tx,
            shared,
            next_id: AtomicU64::new(0),
            model,
        }
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request at the next step.
    pub fn submit(&self, request: ValidRequest) -> Result<UnboundedReceiver<Event>, EngineError> {
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(EngineError::Draining);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let needed = request.prompt.len() + request.config.max_tokens;
        // The request is queued and sent under one lock: the worker admits only under that lock,
        // so whenever it admits an id, the request is already in the channel.
        let mut sched = self.shared.scheduler.lock().expect("scheduler lock");
        sched
            .enqueue(id, request.tenant.as_deref().unwrap_or(""), needed)
            .map_err(|r| match r {
                Refusal::QueueFull => EngineError::QueueFull,
                Refusal::TooLarge { needed, budget } => EngineError::TooLarge { needed, budget },
            })?;
        let (events, rx) = unbounded_channel();
        if self
            .tx
            .send(Submitted {
                id,
                request,
                events,
            })
            .is_err()
        {
            sched.remove(id);
            return Err(EngineError::Draining);
        }
        drop(sched);
        Ok(rx)
    }

    pub fn running(&self) -> usize {
        self.shared
            .scheduler
            .lock()
            .expect("scheduler lock")
            .running_len()
    }

    pub fn waiting(&self) -> usize {
        self.shared
            .scheduler
            .lock()
            .expect("scheduler lock")
            .waiting_len()
    }

    /// Stops accepting requests; running ones go on.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Ends every running and waiting request with an error event (shutdown past its timeout).
    pub fn cancel_all(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
    }

    pub fn is_idle(&self) -> bool {
        let s = self.shared.scheduler.lock().expect("scheduler lock");
        s.running_len() == 0 && s.waiting_len() == 0
    }
}
