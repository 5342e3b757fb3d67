//! Speculative decoding by prompt lookup (`engine::speculative`): greedy answers are the same
//! bit for bit as without it (tokens and log-probabilities), in mixed batches with adapters and
//! beside rows that do not speculate; sampled answers keep their distribution; and it does
//! save steps where the answer copies the prompt.

mod common;

use std::sync::{Arc, OnceLock};

use common::*;
use loraplex::adapters::{
    bind, AdapterCache, AdapterKey, AdapterName, BindOptions, CacheConfig, Lease, PeftAdapter,
};
use loraplex::chat::{ChatMessage, ChatTemplate};
use loraplex::engine::{
    Engine, Event, GenerationConfig, KvConfig, NgramSpec, SamplingParams, SchedulerConfig,
    ValidRequest, Worker,
};
use loraplex::metrics::Metrics;
use loraplex::model::LoadedModel;
use tokio::sync::mpsc::UnboundedReceiver;

fn default_model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            // As `serve` runs it: the GGUF's Q4_1 and Q8_0 weights as stored.
            Arc::new(load_default_with(&loraplex::model::ModelOptions {
                native_quant: true,
                ..Default::default()
            }))
        })
        .clone()
}

fn engine(model: &Arc<LoadedModel>, max_running: usize) -> (Engine, Worker, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (engine, worker) = Engine::manual(
        model.clone(),
        SchedulerConfig {
            max_running,
            kv_cache_tokens: 8192,
            max_queue: 1024,
            max_queue_per_tenant: 1024,
            max_batched_tokens: 256,
            fair_lag_tokens: 256,
        },
        KvConfig {
            block_size: 16,
            dtype: model.model.auto_kv_dtype(),
            prefix_caching: true,
        },
        metrics.clone(),
    )
    .unwrap();
    (engine, worker, metrics)
}

fn spec(num_tokens: usize, max_batch: usize) -> NgramSpec {
    NgramSpec {
        num_tokens,
        min_ngram: 1,
        max_ngram: 3,
        max_batch,
    }
}

#[derive(Clone)]
struct Case {
    prompt: Vec<u32>,
    max_tokens: usize,
    ignore_eos: bool,
    adapter: Option<Lease>,
}

fn request(c: &Case, eos: &[u32], speculative: Option<NgramSpec>) -> ValidRequest {
    ValidRequest {
        prompt: c.prompt.clone(),
        config: GenerationConfig {
            max_tokens: c.max_tokens,
            ignore_eos: c.ignore_eos,
            eos_token_ids: eos.to_vec(),
            sampling: SamplingParams::greedy(),
            speculative,
            ..Default::default()
        },
        logprobs: Some(2),
        adapter: c.adapter.clone(),
        adapter_label: None,
        adapter_name: None,
        tenant: None,
        class: Default::default(),
    }
}

/// Each token with the bits of its log-probability and of its two best alternatives'.
type Answer = Vec<(u32, u32, Vec<(u32, u32)>)>;

/// Steps until idle; each answer, and the steps taken.
fn answers(worker: &mut Worker, rxs: Vec<UnboundedReceiver<Event>>) -> (Vec<Answer>, usize) {
    let mut steps = 0;
    while worker.step() {
        steps += 1;
        assert!(steps < 10_000, "the worker never went idle");
    }
    let answers = rxs
        .into_iter()
        .map(|mut rx| {
            let mut answer = Vec::new();
            let mut done = false;
            for e in received(&mut rx) {
                match e {
                    Event::Token { logprobs, .. } => answer.extend(logprobs.into_iter().map(|l| {
                        let top = l.top.iter().map(|&(t, p)| (t, p.to_bits())).collect();
                        (l.id, l.logprob.to_bits(), top)
                    })),
                    Event::Error(m) | Event::Aborted(m) => panic!("request failed: {m}"),
                    Event::Done {
                        completion_tokens, ..
                    } => {
                        assert_eq!(completion_tokens, answer.len());
                        done = true;
                    }
                }
            }
            assert!(done, "the request never finished");
            answer
        })
        .collect();
    (answers, steps)
}

/// The json-extract task's prompts (the example adapter's held-out lines, chat template) with
/// and without the adapter, and prompts whose answers copy long spans of them.
fn cases(model: &LoadedModel) -> Vec<Case> {
    let cache = AdapterCache::new(CacheConfig::default());
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("adapters/json-extract");
    let lease = cache
        .acquire(
            &AdapterKey {
                name: AdapterName::parse("json-extract").unwrap(),
                version: 0,
            },
            true,
            || {
                bind(
                    &PeftAdapter::load(&dir)?,
                    &model.model,
                    &BindOptions::default(),
                )
            },
        )
        .unwrap();
    let template = ChatTemplate::select(None, model.chat_template.as_deref()).unwrap();
    let chat = |user: &str| {
        let text = template
            .render(
                &[ChatMessage::new("user", user)],
                true,
                &model.special_tokens(),
            )
            .unwrap();
        model.tokenizer.encode(&text).unwrap()
    };
    let eval = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("adapters/json-extract-data/eval.jsonl"),
    )
    .unwrap();
    let mut cases = Vec::new();
    for (i, line) in eval.lines().take(6).enumerate() {
        let ex: serde_json::Value = serde_json::from_str(line).unwrap();
        let user = format!(
            "{}\n\n{}",
            ex["instruction"].as_str().unwrap(),
            ex["input"].as_str().unwrap()
        );
        cases.push(Case {
            prompt: chat(&user),
            max_tokens: 40,
            ignore_eos: false,
            adapter: (i % 3 != 2).then(|| lease.clone()),
        });
    }
    for text in [
        "Repeat the following paragraph word for word.\n\nThe committee met on Tuesday to review the \
         budget for the new library wing. After a long discussion, the members agreed to fund \
         the reading room, the children's corner and the archive, but postponed the cafe.",
        "Copy this list exactly, one item per line:\napples, 3 kg\nflour, 2 kg\nmilk, 4 litres\n\
         eggs, 12\nbutter, 500 g\nsugar, 1 kg",
    ] {
        cases.push(Case {
            prompt: chat(text),
            max_tokens: 48,
            ignore_eos: true,
            adapter: None,
        });
    }
    cases
}

/// Every request alone without speculation, then all at once with it (steps mixing adapters,
/// base rows, prompts and streams), then with only every other one speculating: the same
/// tokens and log-probabilities bit for bit; and proposals were both kept and refused.
#[test]
fn greedy_answers_with_prompt_lookup_equal_those_without_bit_for_bit() {
    let model = default_model();
    let eos =
        model.stop_token_ids(&ChatTemplate::select(None, model.chat_template.as_deref()).unwrap());
    let cases = cases(&model);
    let (engine_a, mut worker_a, _) = engine(&model, 16);
    let mut alone = Vec::new();
    let mut plain_steps = 0;
    for c in &cases {
        let rx = engine_a.submit(request(c, &eos, None)).unwrap();
        let (mut a, steps) = answers(&mut worker_a, vec![rx]);
        alone.push(a.remove(0));
        plain_steps += steps;
    }
    // Speculating alone: the same answers in fewer steps.
    let (engine_s, mut worker_s, metrics) = engine(&model, 16);
    let mut spec_steps = 0;
    for (i, c) in cases.iter().enumerate() {
        let rx = engine_s
            .submit(request(c, &eos, Some(spec(4, 16))))
            .unwrap();
        let (mut a, steps) = answers(&mut worker_s, vec![rx]);
        assert_eq!(a.remove(0), alone[i], "case {i} speculating alone");
        spec_steps += steps;
    }
    let proposed = metrics.spec_draft_tokens.get();
    let kept = metrics.spec_accepted_tokens.get();
    assert!(
        kept > 0 && proposed > kept,
        "proposed {proposed}, kept {kept}"
    );
    assert_eq!(
        metrics.spec_tokens.get() - metrics.spec_steps.get(),
        kept,
        "each step gives its kept proposals and one token more"
    );
    assert!(
        (spec_steps as f64) < 0.8 * plain_steps as f64,
        "steps {spec_steps} with prompt lookup, {plain_steps} without"
    );
    // All at once, every one speculating; then every other one.
    for every in [1, 2] {
        let (engine_m, mut worker_m, metrics) = engine(&model, 16);
        let rxs = cases
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let s = (i % every == 0).then(|| spec(4, 16));
                engine_m.submit(request(c, &eos, s)).unwrap()
            })
            .collect();
        let (together, _) = answers(&mut worker_m, rxs);
        for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(
                t, a,
                "case {i} in a mixed batch (every {every} speculating)"
            );
        }
        assert!(metrics.spec_accepted_tokens.get() > 0);
    }
}

/// The tiny model at temperature 1 with top-k 8, a prompt that repeats and a bias towards its
/// tokens so that lookup proposes at most steps and its proposals are often right, 1,500 seeds with and without speculation: the distribution of each of the
/// first six tokens is the same (two-sample chi-square per position, 0.1 % critical value),
/// while many proposals were kept and many refused.
#[test]
fn sampled_answers_with_prompt_lookup_keep_their_distribution() {
    let model = Arc::new(load_tiny());
    let prompt: Vec<u32> = (0..6).flat_map(|_| [5u32, 17, 33, 5, 90, 17, 61]).collect();
    let n = 4000;
    let positions = 6;
    let mut counts: Vec<Vec<std::collections::HashMap<u32, usize>>> = Vec::new();
    let mut kept_refused = (0, 0);
    for speculative in [None, Some(spec(3, 64))] {
        let metrics = Arc::new(Metrics::new());
        let (engine, mut worker) = loraplex::engine::Engine::manual(
            model.clone(),
            SchedulerConfig {
                max_running: 64,
                kv_cache_tokens: 64 * 64,
                max_queue: 8192,
                max_queue_per_tenant: 8192,
                max_batched_tokens: 1024,
                fair_lag_tokens: 0,
            },
            KvConfig {
                block_size: 4,
                dtype: loraplex::model::KvDtype::F32,
                prefix_caching: true,
            },
            metrics.clone(),
        )
        .unwrap();
        let rxs: Vec<_> = (0..n)
            .map(|seed| {
                engine
                    .submit(ValidRequest {
                        prompt: prompt.clone(),
                        config: GenerationConfig {
                            max_tokens: positions,
                            ignore_eos: true,
                            sampling: SamplingParams {
                                temperature: 1.0,
                                top_k: 8,
                                seed: Some(seed as u64),
                                logit_bias: [5, 17, 33, 61, 90].map(|t| (t, 3.0)).to_vec(),
                                ..SamplingParams::default()
                            },
                            speculative,
                            ..Default::default()
                        },
                        logprobs: None,
                        adapter: None,
                        adapter_label: None,
                        adapter_name: None,
                        tenant: None,
                        class: Default::default(),
                    })
                    .unwrap()
            })
            .collect();
        let tokens = drive(&mut worker, rxs);
        let mut per_position = vec![std::collections::HashMap::new(); positions];
        for t in tokens {
            let t = t.unwrap();
            assert_eq!(t.len(), positions);
            for (p, &tok) in t.iter().enumerate() {
                *per_position[p].entry(tok).or_insert(0) += 1;
            }
        }
        counts.push(per_position);
        if speculative.is_some() {
            let kept = metrics.spec_accepted_tokens.get();
            kept_refused = (kept, metrics.spec_draft_tokens.get() - kept);
        }
    }
    assert!(
        kept_refused.0 > 500 && kept_refused.1 > 500,
        "proposals kept / refused: {kept_refused:?}"
    );
    for p in 0..positions {
        let (a, b) = (&counts[0][p], &counts[1][p]);
        let mut keys: Vec<u32> = a.keys().chain(b.keys()).copied().collect();
        keys.sort_unstable();
        keys.dedup();
        // Tokens seen fewer than 10 times in all are pooled into one category.
        let (mut chi2, mut df) = (0.0, 0usize);
        let (mut pool_a, mut pool_b) = (0usize, 0usize);
        let mut cells = Vec::new();
        for k in keys {
            let (x, y) = (*a.get(&k).unwrap_or(&0), *b.get(&k).unwrap_or(&0));
            if x + y < 10 {
                pool_a += x;
                pool_b += y;
            } else {
                cells.push((x, y));
            }
        }
        if pool_a + pool_b > 0 {
            cells.push((pool_a, pool_b));
        }
        for &(x, y) in &cells {
            // Equal sample sizes: (x − y)² / (x + y).
            chi2 += (x as f64 - y as f64).powi(2) / (x + y) as f64;
            df += 1;
        }
        df -= 1;
        assert!(df >= 1, "position {p}: {cells:?}");
        // The 0.1 % critical value of chi-square (Wilson–Hilferty; 10.9 for 1 degree of
        // freedom against 10.83 exact, 18.5 for 4 against 18.47).
        let d = df as f64;
        let critical = d * (1.0 - 2.0 / (9.0 * d) + 3.09 * (2.0 / (9.0 * d)).sqrt()).powi(3);
        assert!(
            chi2 < critical,
            "position {p}: chi2 {chi2:.2} with {df} degrees of freedom; {cells:?}"
        );
    }
}
