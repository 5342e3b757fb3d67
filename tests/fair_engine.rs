//! Fairness inside the engine on the tiny model, stepped by hand (no clocks): a sequence
//! preempted by recompute answers exactly what it answers uninterrupted (with prefix caching on
//! and off, under an adapter, chunked prefill in play); a light tenant gets room at once from a
//! heavy tenant holding the whole KV budget; a better priority is served first and preempts.

mod common;

use std::sync::Arc;

use common::*;
use loraplex::adapters::{AdapterCache, CacheConfig, Lease};
use loraplex::engine::scheduler::RequestClass;
use loraplex::engine::{
    Engine, Event, GenerationConfig, KvConfig, SamplingParams, SchedulerConfig, ValidRequest,
    Worker,
};
use loraplex::metrics::Metrics;
use loraplex::model::{KvDtype, LoadedModel};
use tokio::sync::mpsc::UnboundedReceiver;

fn engine(
    model: &Arc<LoadedModel>,
    max_running: usize,
    kv: usize,
    prefix_caching: bool,
) -> (Engine, Worker, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (e, w) = Engine::manual(
        model.clone(),
        SchedulerConfig {
            max_running,
            kv_cache_tokens: kv,
            max_queue: 64,
            max_queue_per_tenant: 64,
            max_batched_tokens: 9,
            fair_lag_tokens: 256,
        },
        KvConfig {
            block_size: 4,
            dtype: KvDtype::F32,
            prefix_caching,
        },
        metrics.clone(),
    )
    .unwrap();
    (e, w, metrics)
}

fn request(
    prompt: Vec<u32>,
    max_tokens: usize,
    tenant: &str,
    priority: i32,
    adapter: Option<Lease>,
) -> ValidRequest {
    ValidRequest {
        prompt,
        config: GenerationConfig {
            max_tokens,
            ignore_eos: true,
            sampling: SamplingParams::greedy(),
            ..Default::default()
        },
        logprobs: None,
        adapter,
        adapter_label: None,
        adapter_name: None,
        tenant: Some(tenant.into()),
        class: RequestClass {
            priority,
            weight: 1.0,
        },
    }
}

fn prompt(k: u32, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| 3 + ((i as u32 * 31 + k * 17) % 240))
        .collect()
}

/// Steps until `rx` has its `Done`; returns how many steps that took.
fn steps_until_done(
    worker: &mut Worker,
    rx: &mut UnboundedReceiver<Event>,
    seen: &mut Vec<Event>,
) -> usize {
    for n in 1..10_000 {
        worker.step();
        while let Ok(e) = rx.try_recv() {
            let done = matches!(e, Event::Done { .. });
            seen.push(e);
            if done {
                return n;
            }
        }
    }
    panic!("never finished");
}

fn tokens(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token { token, .. } => Some(*token),
            _ => None,
        })
        .collect()
}

#[test]
fn preempted_sequences_answer_what_they_answer_uninterrupted() {
    let model = Arc::new(load_tiny());
    let adapters = AdapterCache::new(CacheConfig::default());
    let lora = lease(&adapters, &model, "lora-r8-all", "lora-r8-all", 1);
    let low: Vec<(Vec<u32>, Option<Lease>)> = vec![
        (prompt(1, 30), Some(lora.clone())),
        (prompt(2, 22), None),
        (prompt(3, 41), Some(lora.clone())),
    ];
    // Alone, one at a time: the reference answers.
    let (e, mut w, _) = engine(&model, 4, 4096, false);
    let want: Vec<Vec<u32>> = low
        .iter()
        .map(|(p, l)| {
            let rx = e.submit(request(p.clone(), 24, "x", 5, l.clone())).unwrap();
            drive(&mut w, vec![rx]).remove(0).unwrap()
        })
        .collect();
    for prefix_caching in [true, false] {
        let (e, mut w, metrics) = engine(&model, 3, 4096, prefix_caching);
        let rxs: Vec<_> = low
            .iter()
            .map(|(p, l)| e.submit(request(p.clone(), 24, "x", 5, l.clone())).unwrap())
            .collect();
        // Part-way through their answers, better-priority requests arrive (two tenants).
        for _ in 0..14 {
            w.step();
        }
        let mut high = vec![
            e.submit(request(prompt(9, 12), 3, "y", -1, None)).unwrap(),
            e.submit(request(prompt(10, 7), 3, "z", -1, Some(lora.clone())))
                .unwrap(),
        ];
        let mut seen = Vec::new();
        steps_until_done(&mut w, &mut high[0], &mut seen);
        assert!(
            metrics.preemptions.get() >= 2,
            "prefix caching {prefix_caching}: {} preemptions",
            metrics.preemptions.get()
        );
        let _running = high;
        let got: Vec<Vec<u32>> = drive(&mut w, rxs).into_iter().map(Result::unwrap).collect();
        assert_eq!(got, want, "prefix caching {prefix_caching}");
        assert!(e.is_idle());
    }
}

#[test]
fn a_light_tenant_gets_room_at_once_from_a_heavy_one_holding_the_kv_budget() {
    let model = Arc::new(load_tiny());
    // Four heavy requests reserve 4 x (40 + 60) = 400 positions: the whole budget.
    let (e, mut w, metrics) = engine(&model, 8, 400, true);
    let heavy: Vec<_> = (0..4)
        .map(|k| {
            e.submit(request(prompt(k, 40), 60, "heavy", 0, None))
                .unwrap()
        })
        .collect();
    for _ in 0..30 {
        w.step();
    }
    assert_eq!(e.running(), 4);
    let mut light = e
        .submit(request(prompt(7, 10), 4, "light", 0, None))
        .unwrap();
    let mut seen = Vec::new();
    let steps = steps_until_done(&mut w, &mut light, &mut seen);
    // Admitted at the next step (a heavy one preempted), prefilled in two 9-token chunks at
    // most, then 4 tokens: not after a heavy answer of 60 tokens ends.
    assert!(steps <= 8, "the light request took {steps} steps");
    assert_eq!(metrics.preemptions.get(), 1);
    assert_eq!(tokens(&seen).len(), 4);
    let answers = drive(&mut w, heavy);
    assert!(answers.iter().all(|a| a.as_ref().unwrap().len() == 60));
    // The heavy tenant alone may use everything: nothing preempted it without the light one.
    assert_eq!(metrics.preemptions.get(), 1);
}

#[test]
fn a_better_priority_is_admitted_first_from_the_queue() {
    let model = Arc::new(load_tiny());
    let (e, mut w, _) = engine(&model, 1, 4096, true);
    let first = e.submit(request(prompt(1, 8), 2, "a", 0, None)).unwrap();
    let mut late_low = e.submit(request(prompt(2, 8), 2, "a", 3, None)).unwrap();
    let mut late_high = e.submit(request(prompt(3, 8), 2, "b", -2, None)).unwrap();
    let mut seen = Vec::new();
    // `first` runs alone; the high one preempts it at once (a worse priority), then the low.
    let high_steps = steps_until_done(&mut w, &mut late_high, &mut seen);
    let low_steps = steps_until_done(&mut w, &mut late_low, &mut Vec::new());
    assert!(high_steps < 6, "{high_steps}");
    assert!(low_steps > 0);
    assert!(drive(&mut w, vec![first])[0].as_ref().unwrap().len() == 2);
}

#[test]
fn interrupted_steps_are_redone_and_change_no_answer() {
    let model = Arc::new(load_tiny());
    let adapters = AdapterCache::new(CacheConfig::default());
    let lora = lease(&adapters, &model, "lora-r8-all", "lora-r8-all", 1);
    let work: Vec<(Vec<u32>, Option<Lease>)> = vec![
        (prompt(4, 25), Some(lora.clone())),
        (prompt(5, 13), None),
        (prompt(6, 31), Some(lora)),
    ];
    let run = |stop_every: usize| {
        let (e, mut w, metrics) = engine(&model, 4, 4096, true);
        let rxs: Vec<_> = work
            .iter()
            .map(|(p, l)| e.submit(request(p.clone(), 20, "x", 0, l.clone())).unwrap())
            .collect();
        // Chunked prompts and decode rows alike: every `stop_every`-th step stops part-way.
        for n in 0..400 {
            if stop_every > 0 && n % stop_every == 0 {
                e.interrupt_next_step();
            }
            if !w.step() {
                break;
            }
        }
        let answers: Vec<Vec<u32>> = drive(&mut w, rxs).into_iter().map(Result::unwrap).collect();
        (answers, metrics.interrupted_steps.get())
    };
    let (want, none) = run(0);
    assert_eq!(none, 0);
    for every in [2, 3] {
        let (got, stopped) = run(every);
        assert!(stopped >= 10, "every {every}: {stopped} steps stopped");
        assert_eq!(got, want, "stopping every {every}th step changed an answer");
    }
}

#[test]
fn a_newcomer_gets_a_prompt_step_of_its_own_then_waits_its_turn() {
    let model = Arc::new(load_tiny());
    let (e, mut w, _) = engine(&model, 8, 4096, true);
    let mut heavy: Vec<_> = (0..3)
        .map(|k| {
            e.submit(request(prompt(k, 20), 40, "heavy", 0, None))
                .unwrap()
        })
        .collect();
    for _ in 0..12 {
        w.step();
    }
    let mut seen: Vec<Vec<Event>> = heavy.iter_mut().map(received).collect();
    assert!(seen.iter().all(|s| !s.is_empty()), "the heavy streams run");
    // A tenant with nothing in the engine and a prompt within one step's budget: its first
    // token comes from the very next step, which feeds nothing else.
    let mut light = e
        .submit(request(prompt(8, 7), 4, "light", 0, None))
        .unwrap();
    w.step();
    assert_eq!(
        tokens(&received(&mut light)).len(),
        1,
        "first token in one step"
    );
    for (rx, s) in heavy.iter_mut().zip(&mut seen) {
        assert!(
            received(rx).is_empty(),
            "a heavy stream was fed beside the newcomer"
        );
        s.clear();
    }
    // Another newcomer right after waits for a shared step (one such step in four at most).
    let mut other = e
        .submit(request(prompt(9, 7), 4, "other", 0, None))
        .unwrap();
    w.step();
    assert!(tokens(&received(&mut other)).len() <= 1);
    let fed = heavy
        .iter_mut()
        .map(received)
        .filter(|e| !e.is_empty())
        .count();
    assert_eq!(fed, 3, "the heavy streams share the second newcomer's step");
    // A heavy request arriving is not a newcomer: no step of its own.
    let mut more = e
        .submit(request(prompt(10, 7), 4, "heavy", 0, None))
        .unwrap();
    for _ in 0..4 {
        w.step();
    }
    let fed = heavy
        .iter_mut()
        .map(received)
        .filter(|e| e.len() >= 3)
        .count();
    assert_eq!(fed, 3, "the streams kept their pace");
    let _ = (&mut more, &mut light, &mut other);
    run_to_idle(&mut w);
}

#[test]
fn requests_sent_and_dropped_in_a_loop_cannot_stop_every_step() {
    let model = Arc::new(load_tiny());
    let (e, mut w, metrics) = engine(&model, 8, 4096, true);
    let e = Arc::new(e);
    let mut heavy = e
        .submit(request(prompt(1, 30), 40, "heavy", 0, None))
        .unwrap();
    // Another thread sends short requests from ever new tenants (each owed a step of its own)
    // and drops them at once, as fast as it can, while the worker steps here.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = e.submit(request(prompt(2, 5), 2, &format!("t{i}"), 0, None));
                i += 1;
            }
            i
        })
    };
    let mut seen = Vec::new();
    let steps = steps_until_done(&mut w, &mut heavy, &mut seen);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    let stopped = metrics.interrupted_steps.get();
    let run = metrics.batch_size.get_sample_count() - stopped;
    eprintln!("{sent} requests sent and dropped; {stopped} steps stopped, {run} completed");
    assert_eq!(tokens(&seen).len(), 40);
    assert!(
        stopped <= run / loraplex::engine::interrupt::SAME_PRIORITY_EVERY + 1,
        "{stopped} steps stopped against {run} completed ({steps} steps)"
    );
    run_to_idle(&mut w);
}
