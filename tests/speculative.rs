//! Speculative decoding by prompt lookup (`engine::speculative`): greedy answers are the same
//! bit for bit as without it (tokens and log-probabilities), in mixed batches with adapters and
//! beside rows that do not speculate; sampled answers keep their distribution; and it does
//! save steps where the answer copies the prompt.

mod common;

use std::sync::Arc;

use common::*;
use loraplex::adapters::{
    bind, AdapterCache, AdapterKey, AdapterName, BindOptions, CacheConfig, Lease, PeftAdapter,
};
use loraplex::chat::{ChatMessage, ChatTemplate};
use loraplex::engine::{
    Engine, KvConfig, NgramSpec, SamplingParams, SchedulerConfig, ValidRequest, Worker,
};
use loraplex::metrics::Metrics;
use loraplex::model::LoadedModel;

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
    /// Constrained to the json-extract schema (structured outputs): each proposed position is
    /// masked after the tokens before it were committed.
    guide: Option<loraplex::guided::Guide>,
}

fn request(c: &Case, eos: &[u32], speculative: Option<NgramSpec>) -> ValidRequest {
    let mut r = greedy_request(c.prompt.clone(), c.max_tokens);
    r.config.ignore_eos = c.ignore_eos;
    r.config.eos_token_ids = eos.to_vec();
    r.config.speculative = speculative;
    r.logprobs = Some(2);
    r.adapter = c.adapter.clone();
    r.config.guide = c.guide.clone();
    r
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
    let eos = model.stop_token_ids(&template);
    let schema = loraplex::guided::Guidance::new(&model.tokenizer, eos[0])
        .unwrap()
        .compile(&loraplex::guided::Constraint::JsonSchema(
            serde_json::json!({
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                               "city": {"type": "string"}},
                "required": ["name", "age", "city"],
                "additionalProperties": false
            })
            .to_string(),
        ))
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
            guide: (i % 2 == 1).then(|| schema.clone()),
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
            guide: None,
        });
    }
    cases
}

/// Every request alone without speculation, then all at once with it (steps mixing adapters,
/// base rows, rows constrained to a JSON schema, prompts and streams), then with only every other one speculating: the same
/// tokens and log-probabilities bit for bit; and proposals were both kept and refused.
#[test]
fn greedy_answers_with_prompt_lookup_equal_those_without_bit_for_bit() {
    let model = default_as_stored();
    let eos =
        model.stop_token_ids(&ChatTemplate::select(None, model.chat_template.as_deref()).unwrap());
    let cases = cases(&model);
    let (engine_a, mut worker_a, _) = engine(&model, 16);
    let mut alone = Vec::new();
    let mut plain_steps = 0;
    for c in &cases {
        let rx = engine_a.submit(request(c, &eos, None)).unwrap();
        let (mut a, steps) = drive_answers(&mut worker_a, vec![rx]);
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
        let (mut a, steps) = drive_answers(&mut worker_s, vec![rx]);
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
        let (together, _) = drive_answers(&mut worker_m, rxs);
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
/// tokens so that lookup proposes at most steps and its proposals are often right, 4,000 seeds
/// with and without speculation: each seed gives the same answer (each position is sampled with
/// the same one draw as without speculation), so the token frequencies are the same, while many
/// proposals were kept and many refused.
#[test]
fn sampled_answers_with_prompt_lookup_are_the_same_for_each_seed() {
    let model = Arc::new(load_tiny());
    let prompt: Vec<u32> = (0..6).flat_map(|_| [5u32, 17, 33, 5, 90, 17, 61]).collect();
    let n = 4000;
    let positions = 6;
    let mut answers: Vec<Vec<Vec<u32>>> = Vec::new();
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
                let mut r = greedy_request(prompt.clone(), positions);
                r.config.sampling = SamplingParams {
                    temperature: 1.0,
                    top_k: 8,
                    seed: Some(seed as u64),
                    logit_bias: [5, 17, 33, 61, 90].map(|t| (t, 3.0)).to_vec(),
                    ..SamplingParams::default()
                };
                r.config.speculative = speculative;
                engine.submit(r).unwrap()
            })
            .collect();
        let tokens: Vec<Vec<u32>> = drive(&mut worker, rxs)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(tokens.iter().all(|t| t.len() == positions));
        answers.push(tokens);
        if speculative.is_some() {
            let kept = metrics.spec_accepted_tokens.get();
            kept_refused = (kept, metrics.spec_draft_tokens.get() - kept);
        }
    }
    eprintln!("proposed tokens kept / refused: {kept_refused:?}");
    assert!(
        kept_refused.0 > 500 && kept_refused.1 > 500,
        "proposals kept / refused: {kept_refused:?}"
    );
    let distinct: std::collections::HashSet<_> = answers[0].iter().collect();
    assert!(
        distinct.len() > n / 2,
        "{} distinct answers of {n}",
        distinct.len()
    );
    for (seed, (plain, spec)) in answers[0].iter().zip(&answers[1]).enumerate() {
        assert_eq!(plain, spec, "seed {seed}");
    }
}
