//! The paged KV cache and the prefix cache on the tiny model: the pool read through scattered
//! block tables gives the logits of the unpaged path; the engine answers the same with prefix
//! caching on and off (with chunked prefill in play); KV is reused only under the same adapter;
//! a panicking step fails what was in flight and the requests waiting behind it still succeed;
//! streamed log-probabilities match the text actually sent when a stop string cuts it.

mod common;

use std::sync::Arc;

use common::*;
use loraplex::adapters::{AdapterCache, CacheConfig, Lease};
use loraplex::engine::{
    Engine, Event, GenerationConfig, KvConfig, SamplingParams, SchedulerConfig, ValidRequest,
    Worker,
};
use loraplex::metrics::Metrics;
use loraplex::model::llama::SeqInput;
use loraplex::model::{BatchInput, KvCache, KvDtype, KvPool, LoadedModel, LogitsRows};

/// Feeds `chunks` of `tokens` one forward each and returns the last logits row of each chunk.
fn last_rows(
    model: &LoadedModel,
    tokens: &[u32],
    chunks: &[usize],
    cache: &mut KvCache,
    pool: Option<&mut KvPool>,
    blocks: &mut dyn FnMut(usize) -> Vec<u32>,
) -> Vec<Vec<f32>> {
    let mut pool = pool;
    let mut at = 0;
    let mut rows = Vec::new();
    for &n in chunks {
        if cache.table().is_some() {
            for b in blocks(at + n) {
                cache.push_block(b);
            }
        }
        let mut batch = BatchInput {
            seqs: vec![SeqInput::new(&tokens[at..at + n], cache)],
            logits: LogitsRows::Last,
        };
        let l = match pool.as_deref_mut() {
            Some(p) => model.model.forward_paged(&mut batch, p),
            None => model.model.forward(&mut batch),
        }
        .unwrap();
        rows.push(l.to_vec2::<f32>().unwrap().remove(0));
        at += n;
    }
    rows
}

#[test]
fn paged_forward_through_scattered_blocks_equals_the_unpaged_path() {
    let model = load_tiny();
    let tokens: Vec<u32> = (0..70).map(|i| 3 + (i * 37 % 250) as u32).collect();
    let chunks = [23, 1, 30, 1, 15];
    let want = last_rows(
        &model,
        &tokens,
        &chunks,
        &mut model.model.new_cache(),
        None,
        &mut |_| vec![],
    );
    for (dtype, tol) in [
        (KvDtype::F32, 1e-5f32),
        (KvDtype::Bf16, 0.02),
        (KvDtype::F16, 0.005),
        (KvDtype::Int8, 0.06),
    ] {
        let shape = model.model.pool_shape(200, 8, dtype);
        let mut pool = KvPool::new(shape).unwrap();
        // Blocks handed out out of order, far apart.
        let mut order: Vec<u32> = (0..shape.blocks as u32).rev().step_by(2).collect();
        let mut cache = KvCache::paged();
        let mut have = 0usize;
        let mut blocks = |need: usize| {
            let mut out = Vec::new();
            while have * 8 < need {
                out.push(order.remove(0));
                have += 1;
            }
            out
        };
        let got = last_rows(
            &model,
            &tokens,
            &chunks,
            &mut cache,
            Some(&mut pool),
            &mut blocks,
        );
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| max_abs_diff(g, w))
            .fold(0f32, f32::max);
        eprintln!("{dtype:?}: logits within {worst}");
        assert!(worst < tol, "{dtype:?}: {worst}");
    }
    // A table that does not cover the new positions is refused, not written past.
    let mut pool = KvPool::new(model.model.pool_shape(64, 8, KvDtype::F32)).unwrap();
    let mut cache = KvCache::paged();
    cache.push_block(0);
    let err = model
        .model
        .forward_paged(
            &mut BatchInput {
                seqs: vec![SeqInput::new(&tokens[..9], &mut cache)],
                logits: LogitsRows::Last,
            },
            &mut pool,
        )
        .unwrap_err();
    assert!(err.to_string().contains("do not hold 9 positions"), "{err}");
}

fn config(max_running: usize, batched: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_running,
        kv_cache_tokens: 4096,
        max_queue: 64,
        max_queue_per_tenant: 64,
        max_batched_tokens: batched,
        fair_lag_tokens: 256,
    }
}

/// An engine with the default KV cache and its worker, not started, and its metrics.
fn manual(model: &Arc<LoadedModel>, config: SchedulerConfig) -> (Engine, Worker, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (engine, worker) =
        Engine::manual(model.clone(), config, KvConfig::default(), metrics.clone()).unwrap();
    (engine, worker, metrics)
}

fn request(prompt: Vec<u32>, adapter: Option<Lease>, max_tokens: usize) -> ValidRequest {
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
        tenant: None,
        class: Default::default(),
    }
}

/// Three waves of requests sharing a 37-token system prompt under two adapters and the base
/// model, the later waves concurrent and chunked (7 tokens a step): the same tokens with prefix
/// caching on and off; with it on, the later waves take their prefix from the cache.
#[test]
fn answers_are_the_same_with_the_prefix_cache_on_and_off() {
    let model = Arc::new(load_tiny());
    let adapters = AdapterCache::new(CacheConfig::default());
    let a = lease(&adapters, &model, "lora-r8-all", "lora-r8-all", 1);
    let d = lease(&adapters, &model, "dora-r8-all", "dora-r8-all", 1);
    let system: Vec<u32> = (0..37).map(|i| 4 + (i * 53 % 240) as u32).collect();
    let prompt = |k: u32| {
        let mut p = system.clone();
        p.extend([7 + k, 100 + k * 3, 9]);
        p
    };
    let waves: Vec<Vec<(u32, Option<Lease>)>> = vec![
        vec![(0, Some(a.clone())), (1, Some(d.clone())), (2, None)],
        (3..9)
            .map(|k| {
                (
                    k,
                    [Some(a.clone()), Some(d.clone()), None][k as usize % 3].clone(),
                )
            })
            .collect(),
        vec![(0, Some(a.clone())), (4, None)],
    ];
    let mut answers = Vec::new();
    let mut hits = Vec::new();
    for prefix_caching in [true, false] {
        let metrics = Arc::new(Metrics::new());
        let (engine, mut worker) = Engine::manual(
            model.clone(),
            config(8, 7),
            KvConfig {
                block_size: 4,
                dtype: KvDtype::F32,
                prefix_caching,
            },
            metrics.clone(),
        )
        .unwrap();
        let mut got = Vec::new();
        for wave in &waves {
            let rxs = wave
                .iter()
                .map(|(k, l)| engine.submit(request(prompt(*k), l.clone(), 6)).unwrap())
                .collect();
            got.extend(drive(&mut worker, rxs).into_iter().map(Result::unwrap));
        }
        assert!(engine.is_idle());
        answers.push(got);
        hits.push((
            metrics.prefix_cache_hits.get(),
            metrics.prefix_cache_queries.get(),
        ));
    }
    assert_eq!(answers[0], answers[1]);
    assert!(answers[0].iter().all(|t| t.len() == 6));
    // Off: nothing looked up. On: every request after the first of its adapter in wave 1 reuses
    // the system prompt's 9 whole blocks (36 tokens); wave 3's repeated prompt reuses 40 - 4 = 36
    // of the first block chain plus what its own first run left (still 36: one token must remain).
    assert_eq!(hits[1], (0, 0));
    assert_eq!(hits[0].1, 11 * 40);
    assert_eq!(hits[0].0, 8 * 36, "{:?}", hits[0]);
}

#[test]
fn kv_is_never_reused_under_another_adapter_or_another_version() {
    let model = Arc::new(load_tiny());
    let adapters = AdapterCache::new(CacheConfig::default());
    let a1 = lease(&adapters, &model, "lora-r8-all", "lora-r8-all", 1);
    let a2 = lease(&adapters, &model, "lora-r8-all", "lora-r8-all", 2);
    let b = lease(&adapters, &model, "lora-r4-qv", "lora-r4-qv", 1);
    let (engine, mut worker, metrics) = manual(&model, config(4, 0));
    let prompt: Vec<u32> = (0..50).map(|i| 5 + i as u32).collect();
    let run = |worker: &mut Worker, l: Option<Lease>| {
        let rx = engine.submit(request(prompt.clone(), l, 3)).unwrap();
        drive(worker, vec![rx]).remove(0).unwrap()
    };
    let first = run(&mut worker, Some(a1.clone()));
    for other in [Some(a2), Some(b), None] {
        let before = metrics.prefix_cache_hits.get();
        run(&mut worker, other);
        assert_eq!(
            metrics.prefix_cache_hits.get(),
            before,
            "reused across adapters"
        );
    }
    let before = metrics.prefix_cache_hits.get();
    assert_eq!(run(&mut worker, Some(a1)), first);
    assert_eq!(metrics.prefix_cache_hits.get() - before, 48); // 3 blocks of 16
}

#[test]
fn a_panicking_step_fails_what_runs_and_the_waiting_requests_still_succeed() {
    let model = Arc::new(load_tiny());
    let (engine, mut worker, metrics) = manual(&model, config(1, 0));
    let first = engine.submit(request(vec![5, 6, 7], None, 4)).unwrap();
    let second = engine.submit(request(vec![8, 9, 10], None, 4)).unwrap();
    engine.inject_panic_in_next_step();
    assert!(worker.step(), "the waiting request is still there");
    assert_eq!(metrics.engine_restarts.get(), 1);
    assert!(engine.is_healthy());
    let got = drive(&mut worker, vec![first, second]);
    assert!(
        matches!(&got[0], Err(m) if m.contains("engine restarted")),
        "{:?}",
        got[0]
    );
    assert_eq!(got[1].as_ref().map(Vec::len), Ok(4));
    // And a request after it.
    let third = engine.submit(request(vec![5, 6, 7], None, 4)).unwrap();
    assert_eq!(
        drive(&mut worker, vec![third])[0].as_ref().map(Vec::len),
        Ok(4)
    );
    assert!(engine.is_idle());
}

/// Log-probabilities come with the text they belong to: when a stop string cuts the answer,
/// the tokens after the cut (generated, held back, then cut) report none, and the bytes of the
/// reported tokens cover exactly the text sent.
#[test]
fn logprobs_match_the_text_sent_when_a_stop_string_cuts_it() {
    let model = Arc::new(load_tiny());
    let (engine, mut worker, _) = manual(&model, config(2, 0));
    let tok = &model.tokenizer;
    let run = |worker: &mut Worker, stop: Vec<String>| {
        let mut r = request(vec![5, 17, 42, 9], None, 12);
        r.config.stop = stop;
        r.logprobs = Some(0);
        let mut rx = engine.submit(r).unwrap();
        while worker.step() {}
        let (mut text, mut ids) = (String::new(), Vec::new());
        while let Ok(e) = rx.try_recv() {
            if let Event::Token {
                text: t, logprobs, ..
            } = e
            {
                text.push_str(&t);
                ids.extend(logprobs.iter().map(|l| l.id));
            }
        }
        (text, ids)
    };
    let (full, ids) = run(&mut worker, vec![]);
    assert_eq!(ids.len(), 12);
    let bytes = |ids: &[u32]| -> Vec<u8> { ids.iter().flat_map(|&i| tok.token_bytes(i)).collect() };
    assert_eq!(bytes(&ids), full.as_bytes());
    // A stop string made of tokens 5..7's text (where that text first occurs at token 5).
    let start = bytes(&ids[..5]).len();
    let stop = String::from_utf8(bytes(&ids[5..7])).expect("ASCII pieces");
    assert!(
        !stop.is_empty() && full.find(&stop) == Some(start),
        "pick another prompt"
    );
    let (cut, cut_ids) = run(&mut worker, vec![stop]);
    assert_eq!(cut, full[..start]);
    assert_eq!(cut_ids, ids[..5], "only the tokens whose text was sent");
    assert_eq!(bytes(&cut_ids), cut.as_bytes());
}

/// The attacker's view: tenant B sends the prompt tenant A sent (same base model, same shared
/// adapter). A prefix-cache hit would give B a faster first token — a timing channel telling B
/// what A asked. Cached blocks are per tenant, so B gets none of A's; A itself still does.
#[test]
fn one_tenant_never_reuses_another_tenants_prompt_prefix() {
    let model = Arc::new(load_tiny());
    let adapters = AdapterCache::new(CacheConfig::default());
    let shared = lease(&adapters, &model, "lora-r8-all", "lora-r8-all", 1);
    let (engine, mut worker, metrics) = manual(&model, config(4, 0));
    let secret: Vec<u32> = (0..40).map(|i| 9 + (i * 13 % 200) as u32).collect();
    let run = |worker: &mut Worker, tenant: &str, l: Option<Lease>| {
        let mut r = request(secret.clone(), l, 2);
        r.tenant = Some(tenant.to_string());
        let rx = engine.submit(r).unwrap();
        let before = metrics.prefix_cache_hits.get();
        drive(worker, vec![rx]).remove(0).unwrap();
        metrics.prefix_cache_hits.get() - before
    };
    for adapter in [None, Some(shared)] {
        assert_eq!(run(&mut worker, "a", adapter.clone()), 0);
        assert_eq!(
            run(&mut worker, "b", adapter.clone()),
            0,
            "B reused A's prompt"
        );
        assert_eq!(
            run(&mut worker, "a", adapter.clone()),
            32,
            "A reuses its own"
        );
    }
}
