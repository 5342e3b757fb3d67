//! The engine's worker thread: each step admits waiting sequences and runs ONE batched forward
//! over every running sequence (new ones with their whole prompt, the others with their last
//! token), each with its own adapter; rows are ordered by adapter so each adapter's rows are
//! contiguous. A sequence whose client went away is dropped at the next step.

use std::collections::HashMap;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::handle::{Event, Shared, Submitted, ValidRequest};
use super::sequence::SequenceState;
use crate::model::llama::SeqInput;
use crate::model::{BatchInput, LoadedModel, LogitsRows};

struct Active {
    id: u64,
    request: ValidRequest,
    seq: SequenceState,
    events: UnboundedSender<Event>,
    started: Instant,
    last_token: Option<Instant>,
}

fn adapter_key(a: &Active) -> usize {
    a.request
        .adapter
        .as_ref()
        .map(|l| Arc::as_ptr(&l.weights) as usize)
        .unwrap_or(0)
}

pub(crate) fn run(model: Arc<LoadedModel>, rx: Receiver<Submitted>, shared: Arc<Shared>) {
    let metrics = shared.metrics.clone();
    let mut pending: HashMap<u64, Submitted> = HashMap::new();
    let mut active: Vec<Active> = Vec::new();
    let context = model.model.config.max_position_embeddings;
    loop {
        if active.is_empty() && pending.is_empty() {
            match rx.recv() {
                Ok(s) => {
                    pending.insert(s.id, s);
                }
                Err(_) => return,
            }
        }
        while let Ok(s) = rx.try_recv() {
            pending.insert(s.id, s);
        }
        if shared.cancel.load(std::sync::atomic::Ordering::SeqCst) {
            let mut sched = shared.scheduler.lock().expect("scheduler lock");
            let cancelled = "the server is shutting down; the request was cancelled";
            for a in active.drain(..) {
                let _ = a.events.send(Event::Aborted(cancelled.into()));
                sched.remove(a.id);
            }
            for (id, s) in pending.drain() {
                let _ = s.events.send(Event::Aborted(cancelled.into()));
                sched.remove(id);
            }
            continue;
        }
        let admitted = {
            let mut sched = shared.scheduler.lock().expect("scheduler lock");
            pending.retain(|id, s| {
                let keep = !s.events.is_closed();
                if !keep {
                    sched.remove(*id);
                }
                keep
            });
            active.retain(|a| {
                let keep = !a.events.is_closed();
                if !keep {
                    sched.remove(a.id);
                }
                keep
            });
            sched.admit()
        };
        for id in admitted {
            // Admitted after the last drain of the channel: it is in the channel now (`submit`
            // sends under the scheduler lock), so drain again rather than drop it.
            if !pending.contains_key(&id) {
                while let Ok(s) = rx.try_recv() {
                    pending.insert(s.id, s);
                }
            }
            let Some(s) = pending.remove(&id) else {
                shared.scheduler.lock().expect("scheduler lock").remove(id);
                continue;
            };
            let cache = model.model.new_cache();
            match SequenceState::new(
                s.request.prompt.clone(),
                s.request.config.clone(),
                context,
                cache,
                s.request.logprobs,
            ) {
                Ok(seq) => {
                    metrics.prompt_tokens.observe(seq.prompt_len as f64);
                    if let Some(label) = &s.request.adapter_label {
                        metrics.adapter_requests.with_label_values(&[label]).inc();
                    }
                    active.push(Active {
                        id,
                        request: s.request,
                        seq,
                        events: s.events,
                        started: Instant::now(),
                        last_token: None,
                    });
                }
                Err(e) => {
                    let _ = s.events.send(Event::Error(e.to_string()));
                    shared.scheduler.lock().expect("scheduler lock").remove(id);
                }
            }
        }
        publish_gauges(&shared, &active, &pending);
        if active.is_empty() {
            continue;
        }
        active.sort_by_key(adapter_key);
        let inputs = step_inputs(&active, shared.max_batched_tokens);
        metrics
            .batch_size
            .observe(inputs.iter().filter(|t| !t.is_empty()).count() as f64);
        let result = {
            let seqs = active
                .iter_mut()
                .zip(&inputs)
                .filter(|(_, tokens)| !tokens.is_empty())
                .map(|(a, tokens)| {
                    let Active { seq, request, .. } = a;
                    SeqInput::new(tokens, &mut seq.cache)
                        .with_adapter(request.adapter.as_ref().map(|l| &*l.weights))
                })
                .collect();
            let mut batch = BatchInput {
                seqs,
                logits: LogitsRows::Last,
            };
            // A panic in the step (a kernel's invariant, a bad adapter) fails the requests of this
            // step, not the worker: their sequences are dropped and serving goes on.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                model
                    .model
                    .forward(&mut batch)
                    .and_then(|l| l.to_vec2::<f32>())
            }))
            .unwrap_or_else(|p| {
                metrics.engine_restarts.inc();
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(candle_core::Error::Msg(format!(
                    "the model step panicked: {what}"
                )))
            })
        };
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!("forward step failed: {e}");
                let mut sched = shared.scheduler.lock().expect("scheduler lock");
                for a in active.drain(..) {
                    let _ = a
                        .events
                        .send(Event::Error("internal error in the model step".into()));
                    sched.remove(a.id);
                }
                continue;
            }
        };
        let mut finished = Vec::new();
        let mut rows = rows.into_iter();
        for (i, (a, tokens)) in active.iter_mut().zip(&inputs).enumerate() {
            if tokens.is_empty() {
                continue; // no room in this step's token budget
            }
            let row = rows.next().expect("one logits row per fed sequence");
            if tokens.len() < a.seq.next_input().len() {
                a.seq.fed(tokens.len()); // a chunk of the prompt: nothing to sample yet
                continue;
            }
            let now = Instant::now();
            match a.seq.step(row, &model.tokenizer) {
                Ok(out) => {
                    match a.last_token {
                        None => metrics.ttft.observe((now - a.started).as_secs_f64()),
                        Some(t) => metrics.itl.observe((now - t).as_secs_f64()),
                    }
                    a.last_token = Some(now);
                    let _ = a.events.send(Event::Token {
                        token: out.token,
                        text: out.text,
                        logprob: out.logprob,
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
                        });
                        finished.push(i);
                    }
                }
                Err(e) => {
                    let _ = a.events.send(Event::Error(e.to_string()));
                    finished.push(i);
                }
            }
        }
        let mut sched = shared.scheduler.lock().expect("scheduler lock");
        for i in finished.into_iter().rev() {
            sched.remove(active.swap_remove(i).id);
        }
    }
}

/// What each running sequence feeds this step, within `budget` tokens (0: no limit): decode rows
/// one token each, always; prompts, in order, as much of their rest as the budget leaves (at
/// least one token for the first waiting prompt, so a prompt never starves). Empty: skip.
fn step_inputs(active: &[Active], budget: usize) -> Vec<Vec<u32>> {
    let decode = active.iter().filter(|a| !a.seq.prefilling()).count();
    let mut left = if budget == 0 {
        usize::MAX
    } else {
        budget.saturating_sub(decode)
    };
    let mut first_prompt = true;
    active
        .iter()
        .map(|a| {
            let input = a.seq.next_input();
            if !a.seq.prefilling() {
                return input.to_vec();
            }
            let mut n = input.len().min(left);
            if n == 0 && first_prompt {
                n = 1;
            }
            first_prompt = false;
            left = left.saturating_sub(n);
            input[..n].to_vec()
        })
        .collect()
}

fn publish_gauges(shared: &Shared, active: &[Active], pending: &HashMap<u64, Submitted>) {
    let m = &shared.metrics;
    let sched = shared.scheduler.lock().expect("scheduler lock");
    m.waiting.set(sched.waiting_len() as i64);
    m.running.set(sched.running_len() as i64);
    m.kv_usage.set(sched.kv_usage());
    drop(sched);
    let names = |it: &mut dyn Iterator<Item = &ValidRequest>| {
        let mut v: Vec<String> = it
            .filter_map(|r| r.adapter.as_ref().map(|l| l.key.name.key()))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let running = names(&mut active.iter().map(|a| &a.request));
    let waiting = names(&mut pending.values().map(|s| &s.request));
    m.set_lora_info(shared.max_running, &running, &waiting);
}
