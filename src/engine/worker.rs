//! The engine's worker: the one owner of scheduling. Each `step()` takes in what was submitted,
//! drops what clients abandoned, admits waiting sequences and runs ONE batched forward over the
//! running ones (decode rows one token each, prompts in chunks within `--max-batched-tokens`),
//! each with its own adapter; rows are ordered by adapter so each adapter's rows are contiguous.
//!
//! On CPU the KV cache is the block pool (`model::KvPool`): a sequence's blocks are allocated
//! here before the step that fills them, full blocks enter the prefix cache
//! (`kv_blocks::KvBlocks`) keyed by adapter and tokens, and a new sequence starts from the
//! longest cached prefix of its prompt under the same adapter (and for the same tenant).
//!
//! `run` calls `step` under `catch_unwind`: a panic fails the requests in flight (an error
//! event each), rebuilds the scheduler and the block bookkeeping, is counted
//! (`loraplex_engine_restarts_total`), and serving goes on with the requests still waiting.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::handle::{EngineError, Event, KvConfig, Shared, Submitted, ValidRequest};
use super::interrupt::{owed, StepView, SAME_PRIORITY_EVERY};
use super::kv_blocks::{chain_seed, next_hash, BlockHash, KvBlocks};
use super::scheduler::{Scheduler, SchedulerConfig};
use super::sequence::SequenceState;
use crate::model::kv_cache::DROPPED;
use crate::model::llama::SeqInput;
use crate::model::{BatchInput, KvCache, KvPool, LoadedModel, LogitsRows};

mod step_inputs;
use step_inputs::{drafted, step_inputs};

struct Active {
    id: u64,
    request: ValidRequest,
    seq: SequenceState,
    events: UnboundedSender<Event>,
    started: Instant,
    last_token: Option<Instant>,
    /// Hashes of the sequence's full blocks so far (paged caches).
    chain: Vec<BlockHash>,
    seed: BlockHash,
    /// Prompt tokens from the prefix cache when it was admitted.
    cached: usize,
    /// Prompt tokens charged to its tenant's share so far (a recompute is not charged again).
    charged_prompt: usize,
    /// Owed a prompt step of its own (`interrupt::owed`), not given yet.
    owed_step: bool,
}

impl Active {
    fn adapter_ptr(&self) -> usize {
        self.request
            .adapter
            .as_ref()
            .map(|l| Arc::as_ptr(&l.weights) as usize)
            .unwrap_or(0)
    }

    /// The token at position `p` of the sequence: the adapter's virtual tokens (prefix
    /// tuning; marked by ids no vocabulary has), the prompt, then what was generated.
    fn token_at(&self, p: usize) -> u32 {
        let (v, prompt) = (self.request.virtual_tokens(), &self.request.prompt);
        if p < v {
            u32::MAX - p as u32
        } else if p - v < prompt.len() {
            prompt[p - v]
        } else {
            self.seq.generated[p - v - prompt.len()]
        }
    }
}

/// The KV pool and who holds which of its blocks.
struct Paged {
    pool: KvPool,
    blocks: KvBlocks,
    /// `KvHold::horizon`: where every layer has a sliding window, the blocks behind it go back.
    horizon: Option<usize>,
}

impl Paged {
    /// Gives back the blocks of `cache` that no query from its next position on will read (all
    /// their positions are behind the window of the next query; later queries' windows start
    /// later still). Returns how many.
    fn drop_behind(&mut self, cache: &mut KvCache) -> u64 {
        let Some(w) = self.horizon else { return 0 };
        let first = (cache.len() + 1).saturating_sub(w) / self.blocks.block_size();
        let gone = cache.drop_blocks_before(first);
        self.blocks.release(&gone);
        gone.len() as u64
    }
}

pub struct Worker {
    model: Arc<LoadedModel>,
    rx: Receiver<Submitted>,
    shared: Arc<Shared>,
    config: SchedulerConfig,
    scheduler: Scheduler,
    /// Received, not yet admitted.
    pending: HashMap<u64, Submitted>,
    active: Vec<Active>,
    /// Preempted (their KV given back), waiting to be admitted again.
    parked: HashMap<u64, Active>,
    /// `None` where the model cannot run paged (not the CPU f32 path): per-sequence caches.
    paged: Option<Paged>,
    /// Steps since the last prompt step given to a newcomer of the same priority.
    since_newcomer: u64,
    /// Steps completed since the last one stopped part-way (`interrupt`).
    since_interrupt: u64,
    /// Recent answers of requests that speculate, per tenant and adapter (prompt lookup).
    history: super::speculative::History,
}

impl Worker {
    pub(crate) fn new(
        model: Arc<LoadedModel>,
        rx: Receiver<Submitted>,
        shared: Arc<Shared>,
        config: SchedulerConfig,
        kv: KvConfig,
    ) -> Result<Self, EngineError> {
        let paged = if model.model.supports_paged() {
            if kv.block_size == 0 {
                return Err(EngineError::Pool(
                    "the block size must be at least 1".into(),
                ));
            }
            // Each running sequence may leave its last block part-full: room for that on top of
            // the budget, so reservations in tokens always find blocks.
            let tokens = config.kv_cache_tokens + config.max_running * kv.block_size;
            let shape = model.model.pool_shape(tokens, kv.block_size, kv.dtype);
            let pool = KvPool::new(shape).map_err(EngineError::Pool)?;
            let bytes = shape.bytes().unwrap_or(0);
            tracing::info!(
                "KV cache: {} blocks of {} positions ({} in all), {}, {:.1} MiB, prefix caching {}",
                shape.blocks,
                shape.block_size,
                shape.blocks * shape.block_size,
                kv.dtype.as_str(),
                bytes as f64 / (1u64 << 20) as f64,
                if kv.prefix_caching { "on" } else { "off" }
            );
            shared.metrics.kv_pool_bytes.set(bytes as i64);
            shared
                .metrics
                .cache_config
                .with_label_values(&[&kv.block_size.to_string(), &shape.blocks.to_string()])
                .set(1.0);
            Some(Paged {
                blocks: KvBlocks::new(shape.blocks, kv.block_size, kv.prefix_caching),
                pool,
                horizon: shared.kv_hold.horizon,
            })
        } else {
            None
        };
        Ok(Self {
            model,
            rx,
            shared,
            scheduler: Scheduler::new(config.clone()),
            config,
            pending: HashMap::new(),
            active: Vec::new(),
            parked: HashMap::new(),
            paged,
            since_newcomer: SAME_PRIORITY_EVERY,
            since_interrupt: SAME_PRIORITY_EVERY,
            history: super::speculative::History::new(HISTORY_TOKENS, HISTORY_KEYS),
        })
    }

    fn idle(&self) -> bool {
        self.active.is_empty() && self.pending.is_empty() && self.parked.is_empty()
    }

    /// Runs until every handle is gone; a panicking step is recovered from, not fatal.
    pub fn run(mut self) {
        loop {
            if self.idle() {
                match self.rx.recv() {
                    Ok(s) => self.receive(s),
                    Err(_) => return,
                }
            }
            self.step();
        }
    }

    /// One step of the engine, under `catch_unwind` (a panic is recovered from: see
    /// `recover`); returns whether requests remain (running or waiting).
    pub fn step(&mut self) -> bool {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step_inner()));
        r.unwrap_or_else(|p| {
            self.recover(p);
            !self.idle()
        })
    }

    fn step_inner(&mut self) -> bool {
        while let Ok(s) = self.rx.try_recv() {
            self.receive(s);
        }
        if self.shared.cancel.load(Ordering::SeqCst) {
            self.cancel_everything();
            return false;
        }
        self.drop_abandoned();
        self.shed();
        self.admit();
        // Before the step (what it runs, for a scrape during a long step) and after it (what
        // finished no longer shows as running).
        self.publish_gauges();
        if !self.active.is_empty() {
            self.forward_and_sample();
            self.publish_gauges();
        }
        !self.idle()
    }

    fn receive(&mut self, s: Submitted) {
        self.shared.interrupt.received(s.id);
        let tenant = s.request.tenant.clone().unwrap_or_default();
        let needed = self.shared.kv_hold.of(&s.request);
        match self
            .scheduler
            .enqueue(s.id, &tenant, needed, s.request.class)
        {
            Ok(()) => {
                self.pending.insert(s.id, s);
            }
            Err(_) => {
                let _ = s.events.send(Event::Error(
                    "the request needs more KV positions than the server holds".into(),
                ));
                self.shared.leave_queue(&tenant, s.request.class.priority);
            }
        }
    }

    fn tenant(r: &ValidRequest) -> &str {
        r.tenant.as_deref().unwrap_or("")
    }

    fn cancel_everything(&mut self) {
        let cancelled = "the server is shutting down; the request was cancelled";
        for i in (0..self.active.len()).rev() {
            let _ = self.active[i].events.send(Event::Aborted(cancelled.into()));
            self.finish(i);
        }
        for (id, s) in std::mem::take(&mut self.pending) {
            let _ = s.events.send(Event::Aborted(cancelled.into()));
            self.scheduler.remove(id);
            self.leave_queue(&s.request);
        }
        for (id, a) in std::mem::take(&mut self.parked) {
            let _ = a.events.send(Event::Aborted(cancelled.into()));
            self.scheduler.remove(id);
        }
    }

    fn leave_queue(&self, r: &ValidRequest) {
        self.shared.leave_queue(Self::tenant(r), r.class.priority);
    }

    /// Better-priority requests found the queue full: the worst waiting ones (not preempted
    /// ones, which hold their answers so far) make room.
    fn shed(&mut self) {
        let n = self.shared.gate.lock().expect("gate lock").pending_sheds();
        for _ in 0..n {
            let parked = &self.parked;
            let victim = self.scheduler.shed_worst(|id| !parked.contains_key(&id));
            let mut gate = self.shared.gate.lock().expect("gate lock");
            match victim.and_then(|id| self.pending.remove(&id)) {
                Some(s) => {
                    gate.shed(Self::tenant(&s.request));
                    self.shared.metrics.shed_requests.inc();
                    let _ = s.events.send(Event::Aborted(
                        "the server is overloaded and shed this request for one of a better priority; retry later".into(),
                    ));
                }
                None => gate.cancel_shed(),
            }
        }
    }

    /// Ends running sequence `i`: its blocks go back, the scheduler forgets it.
    fn finish(&mut self, i: usize) {
        let mut a = self.active.swap_remove(i);
        if a.seq.speculative().is_some() && a.seq.finished.is_some() {
            let adapter = a.adapter_ptr();
            self.history
                .record(Self::tenant(&a.request), adapter, &a.seq.generated);
        }
        self.scheduler.remove(a.id);
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
        if let Some(p) = &mut self.paged {
            p.blocks.release(&a.seq.cache.take_table());
        }
    }

    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let s = self.pending.remove(&id).expect("pending");
            self.scheduler.remove(id);
            self.leave_queue(&s.request);
        }
        self.parked.retain(|id, a| {
            let open = !a.events.is_closed();
            if !open {
                self.scheduler.remove(*id);
            }
            open
        });
        for i in (0..self.active.len()).rev() {
            if self.active[i].events.is_closed() {
                self.finish(i);
            }
        }
    }

    /// What the engine serves now: the step's best priority, the tenants in it (running,
    /// preempted, and with `waiting`, those admitted or waiting too).
    fn view(&self, waiting: bool) -> StepView {
        let mut tenants: std::collections::HashSet<String> = self
            .active
            .iter()
            .map(|a| &a.request)
            .chain(self.parked.values().map(|a| &a.request))
            .map(|r| Self::tenant(r).to_string())
            .collect();
        if waiting {
            tenants.extend(
                self.pending
                    .values()
                    .map(|s| Self::tenant(&s.request).to_string()),
            );
        }
        StepView {
            best_priority: self.active.iter().map(|a| a.request.class.priority).min(),
            tenants,
            same_priority_open: self.since_newcomer >= SAME_PRIORITY_EVERY,
            budget: self.config.max_batched_tokens,
            interrupt_open: self.since_interrupt >= SAME_PRIORITY_EVERY,
        }
    }

    fn admit(&mut self) {
        let context = self.model.model.config.max_position_embeddings;
        let before = self.view(false);
        let admission = self.scheduler.admit();
        for id in admission.preempted {
            self.park(id);
        }
        for id in admission.admitted {
            if let Some(a) = self.parked.remove(&id) {
                self.resume(a);
                continue;
            }
            let Some(s) = self.pending.remove(&id) else {
                self.scheduler.remove(id);
                continue;
            };
            // Counted running before it leaves the queue: `Engine::is_idle` never sees a gap.
            self.shared.running.fetch_add(1, Ordering::SeqCst);
            self.leave_queue(&s.request);
            let seed = chain_seed(
                Self::tenant(&s.request),
                s.request
                    .adapter
                    .as_ref()
                    .map(|l| format!("{:?}", l.key))
                    .as_deref(),
            );
            let (mut cache, mut chain, mut reused) = (self.model.model.new_cache(), vec![], 0);
            if let Some(p) = &mut self.paged {
                cache = KvCache::paged();
                let v = s.request.virtual_tokens();
                let known: Vec<u32> = (0..v as u32)
                    .map(|i| u32::MAX - i)
                    .chain(s.request.prompt.iter().copied())
                    .collect();
                let (mut blocks, mut hashes) = p.blocks.lookup(&seed, &known);
                if blocks.len() * p.blocks.block_size() < v {
                    // Part of the virtual rows only: start afresh (the model writes them all).
                    p.blocks.release(&blocks);
                    (blocks, hashes) = (Vec::new(), Vec::new());
                }
                reused = blocks.len() * p.blocks.block_size();
                let m = &self.shared.metrics;
                if p.blocks.prefix_caching() {
                    m.prefix_cache_queries.inc_by(s.request.prompt.len() as u64);
                    m.prefix_cache_hits.inc_by(reused as u64);
                }
                cache.start_from(blocks, reused);
                chain = hashes;
                let dropped = p.drop_behind(&mut cache);
                self.shared.metrics.kv_window_dropped.inc_by(dropped);
            }
            // Positions the sequence holds before its prompt's first uncached token, and the
            // context left for the prompt and the answer.
            let virtual_tokens = s.request.virtual_tokens();
            let fed = reused.saturating_sub(virtual_tokens);
            let created = SequenceState::new(
                s.request.prompt.clone(),
                s.request.config.clone(),
                context.saturating_sub(virtual_tokens),
                cache,
                s.request.logprobs,
            );
            let metrics = &self.shared.metrics;
            match created {
                Ok(mut seq) => {
                    seq.fed(fed);
                    let owed_step = owed(
                        &before,
                        Self::tenant(&s.request),
                        s.request.class.priority,
                        seq.prompt_len.saturating_sub(fed),
                    );
                    metrics.prompt_tokens.observe(seq.prompt_len as f64);
                    if let Some(label) = &s.request.adapter_label {
                        metrics.adapter_requests.with_label_values(&[label]).inc();
                    }
                    self.active.push(Active {
                        id,
                        request: s.request,
                        seq,
                        events: s.events,
                        started: Instant::now(),
                        last_token: None,
                        chain,
                        seed,
                        cached: fed,
                        charged_prompt: 0,
                        owed_step,
                    });
                }
                Err(e) => {
                    let _ = s.events.send(Event::Error(e.to_string()));
                    self.scheduler.remove(id);
                    self.shared.running.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Preempts running `id`: its blocks go back (full ones stay in the prefix cache, so the
    /// recompute is mostly a cache hit), it keeps its answer so far and waits to resume.
    fn park(&mut self, id: u64) {
        let Some(i) = self.active.iter().position(|a| a.id == id) else {
            return;
        };
        let mut a = self.active.swap_remove(i);
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
        if let Some(p) = &mut self.paged {
            p.blocks.release(&a.seq.cache.take_table());
        }
        a.chain.clear();
        self.shared.metrics.preemptions.inc();
        self.parked.insert(id, a);
    }

    /// Admits a preempted sequence again: from the longest cached prefix of its prompt and
    /// answer so far; the rest is fed again (not charged again) before its next token.
    fn resume(&mut self, mut a: Active) {
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        let v = a.request.virtual_tokens();
        let (mut cache, mut reused) = (self.model.model.new_cache(), 0);
        a.chain.clear();
        if let Some(p) = &mut self.paged {
            cache = KvCache::paged();
            let known: Vec<u32> = (0..v as u32)
                .map(|i| u32::MAX - i)
                .chain(a.request.prompt.iter().copied())
                .chain(a.seq.generated.iter().copied())
                .collect();
            let (mut blocks, mut hashes) = p.blocks.lookup(&a.seed, &known);
            if blocks.len() * p.blocks.block_size() < v {
                p.blocks.release(&blocks);
                (blocks, hashes) = (Vec::new(), Vec::new());
            }
            reused = blocks.len() * p.blocks.block_size();
            cache.start_from(blocks, reused);
            a.chain = hashes;
            let dropped = p.drop_behind(&mut cache);
            self.shared.metrics.kv_window_dropped.inc_by(dropped);
        }
        let Active { seq, request, .. } = &mut a;
        seq.restart(&request.prompt, cache, reused.saturating_sub(v));
        self.active.push(a);
    }

    fn forward_and_sample(&mut self) {
        let metrics = self.shared.metrics.clone();
        self.active.sort_by_key(Active::adapter_ptr);
        let ranks: Vec<_> = self
            .active
            .iter()
            .map(|a| self.scheduler.rank(a.id).unwrap_or((0, 0.0, a.id)))
            .collect();
        let mut inputs = step_inputs(
            &self.active,
            &ranks,
            self.config.max_batched_tokens,
            &self.history,
        );
        self.hold_back(&mut inputs);
        let mut finished = Vec::new();
        if let Some(p) = &mut self.paged {
            // Blocks that left the window go back first, so this step's new blocks may use them.
            let dropped: u64 = self
                .active
                .iter_mut()
                .map(|a| p.drop_behind(&mut a.seq.cache))
                .sum();
            metrics.kv_window_dropped.inc_by(dropped);
            let bs = p.blocks.block_size();
            for (i, (a, tokens)) in self.active.iter_mut().zip(&mut inputs).enumerate() {
                let prefix = if a.seq.cache.is_empty() {
                    a.request.virtual_tokens()
                } else {
                    0
                };
                let need = (prefix + a.seq.cache.len() + tokens.len()).div_ceil(bs);
                while !tokens.is_empty() && a.seq.cache.table().map_or(0, <[u32]>::len) < need {
                    match p.blocks.allocate() {
                        Some(b) => a.seq.cache.push_block(b),
                        None => {
                            // Reservations make this unreachable; fail the one request if not.
                            tracing::error!("KV pool has no free block");
                            let _ = a.events.send(Event::Error(
                                "the KV cache has no room for this request".into(),
                            ));
                            tokens.clear();
                            finished.push(i);
                        }
                    }
                }
            }
        }
        metrics
            .batch_size
            .observe(inputs.iter().filter(|t| !t.is_empty()).count() as f64);
        if inputs.iter().all(Vec::is_empty) {
            return self.end(finished);
        }
        // Speculating rows (the last token and a proposal) want the logits of every position
        // they feed; every other row its last.
        let tails: Vec<usize> = self
            .active
            .iter()
            .zip(&inputs)
            .filter(|(_, t)| !t.is_empty())
            .map(|(a, t)| drafted(a, t).len() + 1)
            .collect();
        let logits = if tails.iter().all(|&n| n == 1) {
            LogitsRows::Last
        } else {
            LogitsRows::Tail(tails)
        };
        let view = self.view(true);
        let interrupt = &self.shared.interrupt;
        let stop = || interrupt.should_stop(&view);
        let result = {
            let seqs = self
                .active
                .iter_mut()
                .zip(&inputs)
                .filter(|(_, tokens)| !tokens.is_empty())
                .map(|(a, tokens)| {
                    let Active { seq, request, .. } = a;
                    SeqInput::new(tokens, &mut seq.cache)
                        .with_adapter(request.adapter.as_ref().map(|l| &*l.weights))
                })
                .collect();
            let mut batch = BatchInput { seqs, logits };
            if self.shared.inject_panic.swap(false, Ordering::SeqCst) {
                panic!("a fault injected by a test");
            }
            match &mut self.paged {
                Some(p) => self
                    .model
                    .model
                    .forward_paged_until(&mut batch, &mut p.pool, &stop),
                None => self.model.model.forward(&mut batch).map(Some),
            }
            .and_then(|l| l.map(|l| l.to_vec2::<f32>()).transpose())
        };
        let rows = match result {
            Ok(Some(rows)) => rows,
            Ok(None) => {
                // A request owed a step arrived: this one is redone after it.
                metrics.interrupted_steps.inc();
                self.since_interrupt = 0;
                return self.end(finished);
            }
            Err(e) => {
                tracing::error!("forward step failed: {e}");
                for a in &self.active {
                    let _ = a
                        .events
                        .send(Event::Error("internal error in the model step".into()));
                }
                return self.end((0..self.active.len()).collect());
            }
        };
        self.since_newcomer += 1;
        self.since_interrupt += 1;
        for (a, tokens) in self.active.iter_mut().zip(&inputs) {
            if a.owed_step && !tokens.is_empty() {
                a.owed_step = false;
                self.since_newcomer = 0;
            }
        }
        let mut rows = rows.into_iter();
        let tokenizer = &self.model.tokenizer;
        for (i, (a, tokens)) in self.active.iter_mut().zip(&inputs).enumerate() {
            if tokens.is_empty() {
                continue; // no room in this step's token budget
            }
            let drafts = drafted(a, tokens);
            let mut own: Vec<Vec<f32>> = (0..=drafts.len())
                .map(|_| rows.next().expect("logits rows for every fed sequence"))
                .collect();
            let tenant = a.request.tenant.as_deref().unwrap_or("");
            if tokens.len() < a.seq.next_input().len() {
                a.seq.fed(tokens.len()); // a chunk of the prompt: nothing to sample yet
                let done = a.seq.position().min(a.seq.prompt_len);
                let new = done.saturating_sub(a.charged_prompt);
                a.charged_prompt += new;
                self.scheduler.charge(tenant, new, 0);
                served(&metrics, tenant, new, 0);
                continue;
            }
            // Each fed position in order: its token is sampled as a plain step would sample it;
            // the next position counts only if the token is the one proposed for it.
            let speculating = a.seq.speculative().is_some() && !a.seq.prefilling();
            let mut kept = 0;
            for (j, row) in own.drain(..).enumerate() {
                let draft = drafts.get(j).copied();
                let new = a.seq.prompt_len.saturating_sub(a.charged_prompt);
                a.charged_prompt += new;
                self.scheduler.charge(tenant, new, 1);
                served(&metrics, tenant, new, 1);
                let now = Instant::now();
                match a.seq.step(row, tokenizer) {
                    Ok(out) => {
                        match a.last_token {
                            None => metrics.ttft.observe((now - a.started).as_secs_f64()),
                            Some(t) => metrics.itl.observe((now - t).as_secs_f64()),
                        }
                        a.last_token = Some(now);
                        let token = out.token;
                        let _ = a.events.send(Event::Token {
                            token,
                            text: out.text,
                            logprobs: out.logprobs,
                        });
                        if let Some(reason) = out.finished {
                            let completion = a.seq.generated.len();
                            metrics.generation_tokens.observe(completion as f64);
                            metrics
                                .e2e_latency
                                .observe(a.started.elapsed().as_secs_f64());
                            if let Some(label) = &a.request.adapter_label {
                                metrics
                                    .adapter_tokens
                                    .with_label_values(&[label])
                                    .inc_by(completion as u64);
                            }
                            let _ = a.events.send(Event::Done {
                                finish_reason: reason,
                                prompt_tokens: a.seq.prompt_len,
                                completion_tokens: completion,
                                cached_tokens: a.cached,
                            });
                            finished.push(i);
                            break;
                        }
                        if draft != Some(token) {
                            break;
                        }
                        kept += 1;
                    }
                    Err(e) => {
                        let _ = a.events.send(Event::Error(e.to_string()));
                        finished.push(i);
                        break;
                    }
                }
            }
            if speculating {
                metrics.spec_steps.inc();
                metrics.spec_tokens.inc_by(kept as u64 + 1);
                if !drafts.is_empty() {
                    metrics.spec_drafts.inc();
                    metrics.spec_draft_tokens.inc_by(drafts.len() as u64);
                    metrics.spec_accepted_tokens.inc_by(kept as u64);
                }
            }
            // The positions of proposed tokens not kept leave the cache. They were computed
            // all the same: the tenant's fair share pays for them as for prompt tokens, so
            // long proposals that miss cost their sender, not the others in the step.
            let rejected = drafts.len() - kept;
            if rejected > 0 {
                self.scheduler.charge(tenant, rejected, 0);
                let len = a.seq.cache.len() - rejected;
                if let Err(e) = a.seq.cache.truncate(len) {
                    tracing::error!("taking back proposed positions failed: {e}");
                    let _ = a
                        .events
                        .send(Event::Error("internal error in the model step".into()));
                    finished.push(i);
                }
            }
        }
        self.register_full_blocks(&inputs);
        self.end(finished);
    }

    /// Clears the rows of tenants too far ahead of one that shares the step and wants more
    /// (`Scheduler::held_back`); never beside a prompt owed a step of its own.
    fn hold_back(&self, inputs: &mut [Vec<u32>]) {
        if self.active.iter().any(|a| a.owed_step) {
            return;
        }
        let rows: Vec<_> = self
            .active
            .iter()
            .zip(inputs.iter())
            .map(|(a, t)| {
                let more = a.seq.prefilling() && t.len() < a.seq.next_input().len();
                (a.id, !t.is_empty(), more)
            })
            .collect();
        let held = self
            .scheduler
            .held_back(&rows, self.config.fair_lag_tokens as f64);
        let mut n = 0;
        for (input, held) in inputs.iter_mut().zip(held) {
            if held {
                input.clear();
                n += 1;
            }
        }
        self.shared.metrics.held_rows.inc_by(n);
    }

    fn end(&mut self, mut finished: Vec<usize>) {
        finished.sort_unstable();
        finished.dedup();
        for i in finished.into_iter().rev() {
            self.finish(i);
        }
    }

    /// Full blocks that this step completed enter the prefix cache.
    fn register_full_blocks(&mut self, inputs: &[Vec<u32>]) {
        let Some(p) = &mut self.paged else { return };
        if !p.blocks.prefix_caching() {
            return;
        }
        let bs = p.blocks.block_size();
        for (a, tokens) in self.active.iter_mut().zip(inputs) {
            if tokens.is_empty() {
                continue;
            }
            let full = a.seq.cache.len() / bs;
            while a.chain.len() < full {
                let i = a.chain.len();
                let block: Vec<u32> = (i * bs..(i + 1) * bs).map(|p| a.token_at(p)).collect();
                let h = next_hash(a.chain.last().unwrap_or(&a.seed), &block);
                let b = a.seq.cache.table().expect("paged")[i];
                if b != DROPPED {
                    p.blocks.register(b, h);
                }
                a.chain.push(h);
            }
        }
    }

    /// After a panicking step: the requests in flight fail, the scheduler and the block
    /// bookkeeping start over, the requests still waiting stay queued.
    fn recover(&mut self, panic: Box<dyn std::any::Any + Send>) {
        self.shared.rebuilding.store(true, Ordering::SeqCst);
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(
            "the engine step panicked ({what}); failing the running requests and rebuilding"
        );
        self.shared.metrics.engine_restarts.inc();
        for a in self.active.drain(..) {
            let _ = a.events.send(Event::Error(
                "internal error in the model step; the engine restarted".into(),
            ));
            self.shared.running.fetch_sub(1, Ordering::SeqCst);
        }
        for (_, a) in self.parked.drain() {
            let _ = a.events.send(Event::Error(
                "internal error in the model step; the engine restarted".into(),
            ));
        }
        self.scheduler = Scheduler::new(self.config.clone());
        if let Some(p) = &mut self.paged {
            p.blocks.reset();
        }
        let mut waiting: Vec<_> = self
            .pending
            .values()
            .map(|s| {
                let r = &s.request;
                let needed = self.shared.kv_hold.of(r);
                (s.id, Self::tenant(r).to_string(), needed, r.class)
            })
            .collect();
        waiting.sort_unstable_by_key(|w| w.0);
        for (id, tenant, needed, class) in waiting {
            if self.scheduler.enqueue(id, &tenant, needed, class).is_err() {
                let s = self.pending.remove(&id).expect("pending");
                let _ = s.events.send(Event::Error("internal error".into()));
                self.shared.leave_queue(&tenant, class.priority);
            }
        }
        self.shared.rebuilding.store(false, Ordering::SeqCst);
    }

    fn publish_gauges(&self) {
        let m = &self.shared.metrics;
        m.waiting
            .set((self.pending.len() + self.parked.len()) as i64);
        m.running.set(self.active.len() as i64);
        m.kv_usage.set(match &self.paged {
            Some(p) => p.blocks.used() as f64 / p.blocks.total().max(1) as f64,
            None => self.scheduler.kv_usage(),
        });
        let names = |it: &mut dyn Iterator<Item = &ValidRequest>| {
            let mut v: Vec<String> = it
                .filter(|r| r.adapter.is_some())
                .filter_map(|r| r.adapter_name.clone())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let running = names(&mut self.active.iter().map(|a| &a.request));
        let waiting = names(
            &mut self
                .pending
                .values()
                .map(|s| &s.request)
                .chain(self.parked.values().map(|a| &a.request)),
        );
        m.set_lora_info(self.config.max_running, running, waiting);
    }
}

/// Prompt lookup's memory of recent answers (`speculative::History`): tokens per tenant and
/// adapter, and how many such pairs (about 2 MiB at most).
const HISTORY_TOKENS: usize = 2048;
const HISTORY_KEYS: usize = 256;

/// Counts tokens served to `tenant` (the admin-only `loraplex_tenant_served_tokens_total`).
fn served(metrics: &crate::metrics::Metrics, tenant: &str, prompt: usize, generated: usize) {
    for (kind, n) in [("prompt", prompt), ("generated", generated)] {
        if n > 0 {
            metrics
                .served_tokens
                .with_label_values(&[tenant, kind])
                .inc_by(n as u64);
        }
    }
}
