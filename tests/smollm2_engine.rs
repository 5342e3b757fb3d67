//! The engine on the real default model (SmolLM2-135M-Instruct, its Q4_1 GGUF served as stored,
//! with the server's defaults: KV `auto`, blocks of 16, 256 batched tokens a step): a row's
//! numbers must not depend on what else its step holds. Answers and their log-probabilities,
//! compared bit for bit, are the same with the prefix cache on and off, and the same for requests
//! batched together (steps far above 128 rows) as for each alone.

mod common;

use std::sync::Arc;

use common::*;
use loraplex::engine::{
    Engine, Event, GenerationConfig, KvConfig, SamplingParams, SchedulerConfig, ValidRequest,
    Worker,
};
use loraplex::metrics::Metrics;
use loraplex::model::LoadedModel;
use tokio::sync::mpsc::UnboundedReceiver;

/// The engine `serve` builds by default, not started; and its metrics.
fn default_engine(
    model: &Arc<LoadedModel>,
    prefix_caching: bool,
    max_running: usize,
) -> (Engine, Worker, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (engine, worker) = Engine::manual(
        model.clone(),
        SchedulerConfig {
            max_running,
            kv_cache_tokens: 8192,
            max_queue: 64,
            max_queue_per_tenant: 64,
            max_batched_tokens: 256,
            fair_lag_tokens: 256,
        },
        KvConfig {
            block_size: 16,
            dtype: model.model.auto_kv_dtype(),
            prefix_caching,
        },
        metrics.clone(),
    )
    .unwrap();
    (engine, worker, metrics)
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> ValidRequest {
    ValidRequest {
        prompt,
        config: GenerationConfig {
            max_tokens,
            ignore_eos: true,
            sampling: SamplingParams::greedy(),
            ..Default::default()
        },
        logprobs: Some(2),
        adapter: None,
        adapter_label: None,
        adapter_name: None,
        tenant: None,
        class: Default::default(),
    }
}

fn drive(worker: &mut Worker, rxs: Vec<UnboundedReceiver<Event>>) -> Vec<Answer> {
    drive_answers(worker, rxs).0
}

fn encode(model: &LoadedModel, text: &str) -> Vec<u32> {
    model.tokenizer.encode(text).unwrap()
}

/// Three questions after one ~600-token system prompt, in turn: with the prefix cache on, the
/// second and third prefill only their own tails (steps of a few rows after the first one's
/// steps of 256) — and answer exactly as with the cache off.
#[test]
fn default_model_answers_the_same_with_the_prefix_cache_on_and_off() {
    let model = default_as_stored();
    let facts = [
        "The lighthouse keeper logs the weather at dawn, noon and dusk.",
        "Ships that pass the northern reef must signal twice with their horn.",
        "Supplies arrive by boat every second Tuesday unless the sea is rough.",
        "The lamp is cleaned each morning and its oil is checked each evening.",
        "Visitors may climb the tower only with the keeper's written permission.",
        "In fog, the bell is rung once a minute until the fog has lifted.",
        "The keeper's cat, Pepper, sleeps in the store room beside the oil drums.",
        "A spare lens is kept in a padded crate under the spiral staircase.",
    ];
    let mut system = String::from("You answer questions about the Harrow Point lighthouse.\n");
    for round in 0..5 {
        for (i, f) in facts.iter().enumerate() {
            system.push_str(&format!("Rule {}.{}: {f}\n", round + 1, i + 1));
        }
    }
    let questions = [
        "When do supplies arrive?",
        "What happens in fog?",
        "Where does the cat sleep?",
    ];
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| encode(&model, &format!("{system}\nQuestion: {q}\nAnswer:")))
        .collect();
    assert!(
        prompts[0].len() > 550,
        "system prompt of {} tokens",
        prompts[0].len()
    );
    let mut answers = Vec::new();
    let mut hits = Vec::new();
    for prefix_caching in [true, false] {
        let (engine, mut worker, metrics) = default_engine(&model, prefix_caching, 8);
        let mut got = Vec::new();
        for p in &prompts {
            let rx = engine.submit(request(p.clone(), 24)).unwrap();
            got.extend(drive(&mut worker, vec![rx]));
        }
        answers.push(got);
        hits.push(metrics.prefix_cache_hits.get());
    }
    assert!(
        hits[0] > 1000,
        "the later questions reuse the system prompt: {hits:?}"
    );
    assert_eq!(hits[1], 0);
    for (q, (on, off)) in questions.iter().zip(answers[0].iter().zip(&answers[1])) {
        assert_eq!(on.len(), 24);
        assert_eq!(on, off, "{q}: cache on vs off");
    }
}

/// Sixteen requests at once (first steps of 256 rows, then decode steps of 16) and each alone
/// (steps of its own prompt's size, then of one row): the same tokens and log-probabilities.
#[test]
fn default_model_rows_batched_together_equal_each_alone() {
    let model = default_as_stored();
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            encode(
                &model,
                &format!(
                    "Request {i}: write one sentence about the number {}, and mention the \
                     colour {}.",
                    i * 37 + 11,
                    ["red", "green", "blue", "amber"][i % 4]
                ),
            )
        })
        .collect();
    let total: usize = prompts.iter().map(Vec::len).sum();
    assert!(
        total > 256,
        "the first step must be full: {total} prompt tokens"
    );
    let (engine, mut worker, _) = default_engine(&model, false, 16);
    let rxs = prompts
        .iter()
        .map(|p| engine.submit(request(p.clone(), 12)).unwrap())
        .collect();
    let together = drive(&mut worker, rxs);
    let (engine, mut worker, _) = default_engine(&model, false, 16);
    for (i, p) in prompts.iter().enumerate() {
        let rx = engine.submit(request(p.clone(), 12)).unwrap();
        let alone = drive(&mut worker, vec![rx]).remove(0);
        assert_eq!(alone.len(), 12);
        assert_eq!(together[i], alone, "request {i}: batched vs alone");
    }
}
