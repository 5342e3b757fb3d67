//! Held-out score of the `json-extract` example adapter: for each line of
//! `adapters/json-extract-data/eval.jsonl`, a greedy answer from the default model with and without
//! the adapter (all requests batched through the engine); an answer scores when it is exactly
//! one JSON object equal to the expected `{"name", "age", "city"}`.
//!
//! `cargo run --release --example json_extract_score [-- ADAPTER_DIR] [--stored] [--schema]`
//! (`--stored`: on the GGUF weights as `serve` runs them, for an adapter trained with
//! `--stored-weights`; `--schema`: every answer constrained to the task's JSON schema)

use std::sync::Arc;

use loraplex::adapters::{bind, AdapterCache, BindOptions, CacheConfig, PeftAdapter};
use loraplex::chat::{ChatMessage, ChatTemplate};
use loraplex::engine::{
    Engine, Event, GenerationConfig, SamplingParams, SchedulerConfig, ValidRequest,
};
use loraplex::model::source::SourceConfig;
use loraplex::model::{load_model, ModelSource};
use serde_json::Value;

#[tokio::main]
async fn main() {
    loraplex::init_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "adapters/json-extract".into());
    // `--schema`: every answer constrained to the task's JSON schema (structured outputs).
    let constrained = args.iter().any(|a| a == "--schema");
    let dir = std::path::PathBuf::from(dir);
    let resolved = ModelSource::parse(None)
        .unwrap()
        .resolve(&SourceConfig::from_env())
        .await
        .unwrap();
    // `--stored`: the model as `serve` runs it (the GGUF's weights as stored), not an f32 copy.
    let stored = args.iter().any(|a| a == "--stored");
    let opts = loraplex::model::ModelOptions {
        native_quant: stored,
        ..Default::default()
    };
    let loaded = Arc::new(load_model(&resolved, &opts).unwrap());
    let template = ChatTemplate::select(None, loaded.chat_template.as_deref()).unwrap();
    let eos = loaded.stop_token_ids(&template);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["name", "age", "city"],
        "additionalProperties": false
    });
    let guidance = loraplex::guided::Guidance::new(&loaded.tokenizer, eos[0]).unwrap();
    let started = std::time::Instant::now();
    let compiled = guidance
        .compile(&loraplex::guided::Constraint::JsonSchema(
            schema.to_string(),
        ))
        .unwrap();
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let peft = PeftAdapter::load(&dir).unwrap();
    let cache = AdapterCache::new(CacheConfig::default());
    let lease = cache
        .acquire(
            &loraplex::adapters::AdapterKey {
                name: loraplex::adapters::AdapterName::parse("json-extract").unwrap(),
                version: 0,
            },
            true,
            || bind(&peft, &loaded.model, &BindOptions::default()),
        )
        .unwrap();
    let metrics = Arc::new(loraplex::metrics::Metrics::new());
    let engine = Engine::start(
        loaded.clone(),
        SchedulerConfig {
            max_running: 16,
            kv_cache_tokens: 60 * 256,
            max_queue: 1024,
            max_queue_per_tenant: 1024,
            max_batched_tokens: 0,
            fair_lag_tokens: 256,
        },
        metrics,
    );
    let lines: Vec<Value> = std::fs::read_to_string("adapters/json-extract-data/eval.jsonl")
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut rows = Vec::new();
    for with_adapter in [false, true] {
        let mut pending = Vec::new();
        for ex in &lines {
            let user = format!(
                "{}\n\n{}",
                ex["instruction"].as_str().unwrap(),
                ex["input"].as_str().unwrap()
            );
            let prompt = template
                .render(
                    &[ChatMessage::new("user", &user)],
                    true,
                    &loaded.special_tokens(),
                )
                .unwrap();
            let ids = loaded.tokenizer.encode(&prompt).unwrap();
            let rx = engine
                .submit(ValidRequest {
                    prompt: ids,
                    config: GenerationConfig {
                        max_tokens: 48,
                        eos_token_ids: eos.clone(),
                        sampling: SamplingParams::greedy(),
                        guide: constrained.then(|| compiled.clone()),
                        ..Default::default()
                    },
                    logprobs: None,
                    adapter: with_adapter.then(|| lease.clone()),
                    adapter_label: None,
                    adapter_name: None,
                    tenant: None,
                    class: Default::default(),
                })
                .unwrap();
            pending.push(rx);
        }
        let mut correct = 0;
        let mut valid = 0;
        let mut answers = Vec::new();
        for (ex, mut rx) in lines.iter().zip(pending) {
            let mut text = String::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Token { text: t, .. } => text.push_str(&t),
                    Event::Done { .. } => break,
                    Event::Error(e) | Event::Aborted(e) => panic!("{e}"),
                }
            }
            let expected: Value = serde_json::from_str(ex["output"].as_str().unwrap()).unwrap();
            let got: Option<Value> = serde_json::from_str(text.trim()).ok();
            if got.as_ref() == Some(&expected) {
                correct += 1;
            }
            if got.as_ref().is_some_and(fits_schema) {
                valid += 1;
            }
            answers.push(text);
        }
        rows.push((with_adapter, correct, valid, answers));
    }
    let n = lines.len();
    println!(
        "{}",
        if constrained {
            format!("constrained to the task's JSON schema (compiled in {compile_ms:.1} ms)")
        } else {
            "unconstrained".to_string()
        }
    );
    println!("| | exact JSON matches on {n} held-out sentences | answers valid against the schema |\n|---|---|---|");
    for (with, correct, valid, _) in &rows {
        println!(
            "| {} | {correct} / {n} ({:.0} %) | {valid} / {n} |",
            if *with {
                "with json-extract"
            } else {
                "base model"
            },
            100.0 * *correct as f64 / n as f64
        );
    }
    for (i, line) in lines.iter().take(3).enumerate() {
        println!("\ninput: {}", line["input"].as_str().unwrap());
        println!("base:    {:?}", rows[0].3[i].trim());
        println!("adapter: {:?}", rows[1].3[i].trim());
    }
}

/// `{"name": string, "age": integer, "city": string}` and nothing else.
fn fits_schema(v: &Value) -> bool {
    let Some(o) = v.as_object() else { return false };
    o.len() == 3
        && o.get("name").is_some_and(Value::is_string)
        && o.get("age").is_some_and(|a| a.is_i64() || a.is_u64())
        && o.get("city").is_some_and(Value::is_string)
}
