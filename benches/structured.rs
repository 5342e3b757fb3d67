//! Structured outputs' cost on the default model served as stored: decode tokens/s of 8
//! concurrent chats (the json-extract held-out prompts, greedy, 48 tokens) with no constraint
//! (EOS ignored, so every row decodes 48) vs every row constrained — to the json-extract schema (answers end when the
//! object closes) and to a schema whose one string must run past 48 tokens (every row decodes
//! all 48 under its mask) — rounds alternating, same run. Then the mask time per token, p50 and
//! p99, replaying the constrained answers through fresh matchers (the same work the engine does
//! per row and step).
//!
//! `cargo bench --bench structured [-- ROUNDS]`

mod common;

use std::sync::Arc;
use std::time::Instant;

use loraplex::chat::{ChatMessage, ChatTemplate};
use loraplex::engine::{
    Engine, Event, GenerationConfig, KvConfig, SamplingParams, SchedulerConfig, ValidRequest,
};
use loraplex::guided::{Constraint, Guidance};
use serde_json::{json, Value};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    loraplex::init_threads();
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let loaded = common::default_as_stored().await;
    let template = ChatTemplate::select(None, loaded.chat_template.as_deref()).unwrap();
    let eos = loaded.stop_token_ids(&template);
    let guidance = Guidance::new(&loaded.tokenizer, eos[0]).unwrap();
    let extract = json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}, "required": ["name", "age", "city"], "additionalProperties": false});
    let story = json!({"type": "object", "properties": {"story": {"type": "string", "minLength": 1000}}, "required": ["story"]});
    let kinds: Vec<(&str, Option<Constraint>)> = vec![
        ("none (EOS ignored: 48 tokens a row)", None),
        (
            "json-extract schema",
            Some(Constraint::JsonSchema(extract.to_string())),
        ),
        (
            "long-string schema",
            Some(Constraint::JsonSchema(story.to_string())),
        ),
    ];
    let lines: Vec<Value> = std::fs::read_to_string("adapters/json-extract-data/eval.jsonl")
        .unwrap()
        .lines()
        .take(8)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let prompts: Vec<Vec<u32>> = lines
        .iter()
        .map(|ex| {
            let user = format!(
                "{}\n\n{}",
                ex["instruction"].as_str().unwrap(),
                ex["input"].as_str().unwrap()
            );
            let text = template
                .render(
                    &[ChatMessage::new("user", &user)],
                    true,
                    &loaded.special_tokens(),
                )
                .unwrap();
            loaded.tokenizer.encode(&text).unwrap()
        })
        .collect();
    let engine = Engine::start_with(
        loaded.clone(),
        SchedulerConfig {
            max_running: 8,
            kv_cache_tokens: 8192,
            max_queue: 64,
            max_queue_per_tenant: 64,
            max_batched_tokens: 256,
            fair_lag_tokens: 256,
        },
        KvConfig {
            dtype: loaded.model.auto_kv_dtype(),
            ..KvConfig::default()
        },
        Arc::new(loraplex::metrics::Metrics::new()),
    )
    .unwrap();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut answers: Vec<Vec<Vec<u32>>> = vec![Vec::new(); kinds.len()];
    for _ in 0..rounds {
        for (k, (_, c)) in kinds.iter().enumerate() {
            let start = Instant::now();
            let rxs: Vec<_> = prompts
                .iter()
                .map(|p| {
                    engine
                        .submit(ValidRequest {
                            prompt: p.clone(),
                            config: GenerationConfig {
                                max_tokens: 48,
                                // The baseline decodes all 48 like the long-string rows.
                                ignore_eos: c.is_none(),
                                eos_token_ids: eos.clone(),
                                sampling: SamplingParams::greedy(),
                                guide: c.as_ref().map(|c| guidance.compile(c).unwrap()),
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
            let mut tokens = 0;
            let mut got = Vec::new();
            for mut rx in rxs {
                let mut t = Vec::new();
                while let Some(e) = rx.recv().await {
                    match e {
                        Event::Token { token, .. } => t.push(token),
                        Event::Done { .. } => break,
                        Event::Error(m) | Event::Aborted(m) => panic!("{m}"),
                    }
                }
                tokens += t.len();
                got.push(t);
            }
            // Prefill is in the time too; it is the same for every kind.
            rates[k].push(tokens as f64 / start.elapsed().as_secs_f64());
            answers[k] = got;
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    for (k, (name, _)) in kinds.iter().enumerate() {
        let lens: Vec<usize> = answers[k].iter().map(Vec::len).collect();
        println!(
            "{{\"kind\": \"{name}\", \"tokens_per_s\": {:?}, \"best\": {:.1}, \"ratio_to_none\": {:.3}, \"answer_tokens\": {lens:?}}}",
            rates[k].iter().map(|r| (r * 10.0).round() / 10.0).collect::<Vec<_>>(),
            best(&rates[k]),
            best(&rates[k]) / best(&rates[0])
        );
    }
    // Mask time per token: the constrained answers replayed through fresh matchers.
    let vocab = loaded.model.config.vocab_size;
    for (k, (name, c)) in kinds.iter().enumerate().skip(1) {
        let c = c.as_ref().unwrap();
        let compile_start = Instant::now();
        let _ = guidance.compile(&Constraint::JsonSchema(format!(
            "{{\"type\": \"object\", \"properties\": {{\"x{k}\": {{\"type\": \"integer\"}}}}}}"
        )));
        let compile_ms = compile_start.elapsed().as_secs_f64() * 1e3;
        let mut nanos = Vec::new();
        for a in &answers[k] {
            let mut g = guidance.compile(c).unwrap();
            let mut logits = vec![0f32; vocab];
            for &t in a {
                logits.fill(0.0);
                g.mask(&mut logits, &eos).unwrap();
                if eos.contains(&t) {
                    break;
                }
                g.commit(t).unwrap();
            }
            nanos.extend(g.mask_nanos.iter().copied());
        }
        nanos.sort_unstable();
        let q = |p: f64| nanos[((nanos.len() - 1) as f64 * p) as usize] as f64 / 1e3;
        println!(
            "{{\"kind\": \"{name}\", \"mask_us_p50\": {:.1}, \"mask_us_p99\": {:.1}, \"masks\": {}, \"compile_ms_small_schema\": {compile_ms:.2}}}",
            q(0.5),
            q(0.99),
            nanos.len()
        );
    }
}
