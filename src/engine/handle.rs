//! The `Engine` handle the server sees: `submit(ValidRequest)` → a stream of `Event`s. A worker
//! thread owns the model, the scheduler and the KV cache, and runs continuous batching (see
//! `worker.rs`); the handle only sends it requests.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::generate::{FinishReason, GenerationConfig};
use super::interrupt::{Arrival, Interrupt};
use super::scheduler::{QueueGate, RequestClass, SchedulerConfig};
use super::sequence::TokenLogprob;
use super::worker::Worker;
use crate::adapters::Lease;
use crate::metrics::Metrics;
use crate::model::{KvDtype, LoadedModel};

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
    /// The adapter as the request named it (its `model` field, else `adapter`): what the
    /// Inference Extension's picker matches against `loraplex_lora_requests_info`.
    pub adapter_name: Option<String>,
    /// Whose request it is: each tenant has its own share of the queue and of the service.
    pub tenant: Option<String>,
    /// Its priority and its tenant's weight.
    pub class: RequestClass,
}

impl ValidRequest {
    /// Positions of the adapter's virtual tokens (prefix tuning) before the prompt.
    pub fn virtual_tokens(&self) -> usize {
        self.adapter
            .as_ref()
            .map_or(0, |l| l.weights.virtual_tokens())
    }

    /// KV positions the request may occupy: virtual tokens, prompt, `max_tokens`.
    pub fn kv_positions(&self) -> usize {
        self.virtual_tokens() + self.prompt.len() + self.config.max_tokens
    }
}

/// How many KV positions a request holds at most at once: all it will have
/// (`ValidRequest::kv_positions`), unless every layer of the model has a sliding window and the
/// engine pages its cache. The worker then gives back the blocks that left the window
/// (`KvCache::drop_blocks_before`), and a sequence holds at most its virtual tokens, the window,
/// one step's new positions (`--max-batched-tokens`) and the block that the window's start
/// falls in. A long answer from Mistral or Phi-3 then needs no more KV than its window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvHold {
    /// `Llama::kv_horizon` where the engine pages.
    pub horizon: Option<usize>,
    pub block_size: usize,
    /// Positions one step feeds a sequence at most (0: no limit).
    pub step: usize,
}

impl KvHold {
    pub fn of(&self, r: &ValidRequest) -> usize {
        let all = r.kv_positions();
        match self.horizon {
            Some(w) if self.step > 0 => {
                all.min(r.virtual_tokens() + w + self.step + self.block_size)
            }
            _ => all,
        }
    }
}

/// What a request's stream carries.
#[derive(Debug, Clone)]
pub enum Event {
    Token {
        token: u32,
        text: String,
        /// Those of the tokens whose text is released with this event (see `StepOutput`).
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens whose KV came from the prefix cache.
        cached_tokens: usize,
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
    #[error("KV cache: {0}")]
    Pool(String),
}

/// The KV cache's form: a pool of `--kv-cache-tokens` positions in blocks of `block_size`,
/// stored as `dtype`, with prefix caching on or off.
#[derive(Debug, Clone, Copy)]
pub struct KvConfig {
    pub block_size: usize,
    pub dtype: KvDtype,
    pub prefix_caching: bool,
}

impl Default for KvConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            dtype: KvDtype::F32,
            prefix_caching: true,
        }
    }
}

pub(crate) struct Submitted {
    pub id: u64,
    pub request: ValidRequest,
    pub events: UnboundedSender<Event>,
}

/// What the handle and the worker share: the queue bound (the only thing `submit` checks),
/// counters the worker publishes, and flags.
pub(crate) struct Shared {
    pub gate: Mutex<QueueGate>,
    /// Sequences the worker runs (it alone writes this).
    pub running: AtomicUsize,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    /// Set at the end of a drain: the worker fails everything still running or waiting.
    pub cancel: AtomicBool,
    /// The worker is rebuilding its state after a fault.
    pub rebuilding: AtomicBool,
    /// Test hook: the next model step panics.
    pub inject_panic: AtomicBool,
    pub kv_cache_tokens: usize,
    /// What a request holds of the KV budget at most.
    pub kv_hold: KvHold,
    /// Requests sent but not yet received, for the step in progress to stop for.
    pub interrupt: Interrupt,
}

impl Shared {
    pub fn leave_queue(&self, tenant: &str, priority: i32) {
        self.gate.lock().expect("gate lock").leave(tenant, priority);
    }
}

pub struct Engine {
    tx: mpsc::Sender<Submitted>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    model: Arc<LoadedModel>,
}

impl Engine {
    /// Starts the worker thread that owns `model`, with the default KV cache form.
    pub fn start(model: Arc<LoadedModel>, config: SchedulerConfig, metrics: Arc<Metrics>) -> Self {
        Self::start_with(model, config, KvConfig::default(), metrics)
            .expect("the KV pool is allocated")
    }

    /// Starts the worker thread that owns `model`; allocates the KV pool first.
    pub fn start_with(
        model: Arc<LoadedModel>,
        config: SchedulerConfig,
        kv: KvConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        let (engine, worker) = Self::manual(model, config, kv, metrics)?;
        std::thread::Builder::new()
            .name("loraplex-engine".into())
            .spawn(move || worker.run())
            .expect("spawn engine thread");
        Ok(engine)
    }

    /// The handle and its worker, not started: a test drives the worker with `Worker::step`.
    pub fn manual(
        model: Arc<LoadedModel>,
        config: SchedulerConfig,
        kv: KvConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Worker), EngineError> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            gate: Mutex::new(QueueGate::new(&config)),
            running: AtomicUsize::new(0),
            kv_cache_tokens: config.kv_cache_tokens,
            kv_hold: KvHold {
                horizon: model
                    .model
                    .supports_paged()
                    .then(|| model.model.kv_horizon())
                    .flatten(),
                block_size: kv.block_size,
                step: config.max_batched_tokens,
            },
            metrics,
            draining: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            rebuilding: AtomicBool::new(false),
            inject_panic: AtomicBool::new(false),
            interrupt: Interrupt::default(),
        });
        let worker = Worker::new(model.clone(), rx, shared.clone(), config, kv)?;
        Ok((
            Self {
                tx,
                shared,
                next_id: AtomicU64::new(0),
                model,
            },
            worker,
        ))
    }

    /// KV positions one request may occupy at most (`--kv-cache-tokens`).
    pub fn kv_budget(&self) -> usize {
        self.shared.kv_cache_tokens
    }

    /// KV positions `request` holds of the budget at most at once (`kv_positions`, or less where
    /// every layer of the model has a sliding window: see `KvHold`).
    pub fn kv_held(&self, request: &ValidRequest) -> usize {
        self.shared.kv_hold.of(request)
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request at the next step. Checks only the bounds known here (draining, the
    /// KV budget, the queue's share) and sends: the worker owns the scheduling.
    pub fn submit(&self, request: ValidRequest) -> Result<UnboundedReceiver<Event>, EngineError> {
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(EngineError::Draining);
        }
        let needed = self.kv_held(&request);
        if needed > self.shared.kv_cache_tokens {
            return Err(EngineError::TooLarge {
                needed,
                budget: self.shared.kv_cache_tokens,
            });
        }
        let tenant = request.tenant.clone().unwrap_or_default();
        self.shared
            .gate
            .lock()
            .expect("gate lock")
            .enter(&tenant, request.class.priority)
            .map_err(|_| EngineError::QueueFull)?;
        let priority = request.class.priority;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = unbounded_channel();
        self.shared.interrupt.sent(Arrival {
            id,
            tenant: tenant.clone(),
            priority,
            prompt: request.prompt.len(),
        });
        let sent = self.tx.send(Submitted {
            id,
            request,
            events,
        });
        if sent.is_err() {
            self.shared.interrupt.received(id);
            self.shared.leave_queue(&tenant, priority);
            return Err(EngineError::Draining);
        }
        Ok(rx)
    }

    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    pub fn waiting(&self) -> usize {
        self.shared.gate.lock().expect("gate lock").waiting()
    }

    /// Stops accepting requests; running ones go on.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Neither draining nor rebuilding after a fault.
    pub fn is_healthy(&self) -> bool {
        !self.is_draining() && !self.shared.rebuilding.load(Ordering::SeqCst)
    }

    /// Ends every running and waiting request with an error event (shutdown past its timeout).
    pub fn cancel_all(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
    }

    pub fn is_idle(&self) -> bool {
        // `running` goes up before a request leaves the queue, so no request is between.
        self.waiting() == 0 && self.running() == 0
    }

    /// Test hook: the next model step stops between layers and is redone (what a request owed
    /// a step of its own does, `interrupt`).
    #[doc(hidden)]
    pub fn interrupt_next_step(&self) {
        self.shared.interrupt.stop_next_step();
    }

    /// Test hook: the next model step panics (the worker's recovery is what is tested).
    #[doc(hidden)]
    pub fn inject_panic_in_next_step(&self) {
        self.shared.inject_panic.store(true, Ordering::SeqCst);
    }
}
