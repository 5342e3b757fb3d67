//! Speculative decoding by prompt lookup on the default model served as stored: single-stream
//! tokens/s on the json-extract task (the example adapter on its held-out prompts, greedy, the
//! answer ends at EOS) without and with `speculative: {"method": "ngram", "num_tokens": K}`,
//! rounds alternating, same run; the answers must be the same. Then the same for prompts whose
//! answers copy long spans (repeat a paragraph), and 8 concurrent json-extract streams (above
//! `--speculative-max-batch` 4 nothing is proposed: the cost of the check only).
//!
//! Tokens/s counts every answer token over the wall time from submission to the last token
//! (prefill included, as a client sees it); decode tokens/s leaves out each request's first token.
//!
//! `cargo bench --bench speculative [-- ROUNDS [K]]`

mod common;

use std::sync::Arc;
use std::time::Instant;

use loraplex::adapters::{
    bind, AdapterCache, AdapterKey, AdapterName, BindOptions, CacheConfig, Lease, PeftAdapter,
};
use loraplex::chat::{ChatMessage, ChatTemplate};
use loraplex::engine::{
    Engine, Event, GenerationConfig, NgramSpec, SamplingParams, SchedulerConfig, ValidRequest,
};

struct Run {
    tokens: usize,
    wall: f64,
    decode_tokens: usize,
    decode_wall: f64,
    answers: Vec<Vec<u32>>,
}

async fn run(
    engine: &Engine,
    prompts: &[(Vec<u32>, Option<Lease>)],
    eos: &[u32],
    spec: Option<NgramSpec>,
    concurrency: usize,
    max_tokens: usize,
) -> Run {
    let mut out = Run {
        tokens: 0,
        wall: 0.0,
        decode_tokens: 0,
        decode_wall: 0.0,
        answers: Vec::new(),
    };
    let started = Instant::now();
    for group in prompts.chunks(concurrency) {
        let mut rxs = Vec::new();
        for (prompt, adapter) in group {
            let rx = engine
                .submit(ValidRequest {
                    prompt: prompt.clone(),
                    config: GenerationConfig {
                        max_tokens,
                        eos_token_ids: eos.to_vec(),
                        sampling: SamplingParams::greedy(),
                        speculative: spec,
                        ..Default::default()
                    },
                    logprobs: None,
                    adapter: adapter.clone(),
                    adapter_label: None,
                    adapter_name: None,
                    tenant: None,
                    class: Default::default(),
                })
                .unwrap();
            rxs.push(rx);
        }
        for mut rx in rxs {
            let mut tokens = Vec::new();
            let mut first = None;
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Token { token, .. } => {
                        first.get_or_insert_with(Instant::now);
                        tokens.push(token);
                    }
                    Event::Done { .. } => break,
                    Event::Error(e) | Event::Aborted(e) => panic!("{e}"),
                }
            }
            if let Some(f) = first {
                out.decode_wall += f.elapsed().as_secs_f64();
                out.decode_tokens += tokens.len() - 1;
            }
            out.tokens += tokens.len();
            out.answers.push(tokens);
        }
    }
    out.wall = started.elapsed().as_secs_f64();
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    loraplex::init_threads();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(2);
    let k = args.get(1).copied().unwrap_or(4);
    let loaded = common::default_as_stored().await;
    let template = ChatTemplate::select(None, loaded.chat_template.as_deref()).unwrap();
    let eos = loaded.stop_token_ids(&template);
    let chat = |user: &str| {
        let text = template
            .render(
                &[ChatMessage::new("user", user)],
                true,
                &loaded.special_tokens(),
            )
            .unwrap();
        loaded.tokenizer.encode(&text).unwrap()
    };
    let cache = AdapterCache::new(CacheConfig::default());
    let dir = std::path::PathBuf::from("adapters/json-extract");
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
                    &loaded.model,
                    &BindOptions::default(),
                )
            },
        )
        .unwrap();
    // Every run gets prompts no earlier run had (the json-extract data's 380 lines): prompt
    // lookup also searches the tenant's recent answers, and an answer to the same prompt would
    // be found there whole.
    let lines: Vec<serde_json::Value> = ["eval", "train"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(format!("adapters/json-extract-data/{f}.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut next = 0usize;
    // 12 json-extract prompts with the adapter (kind 0), or 3 prompts (kind 1) asking the base
    // model to repeat 4 of the data's sentences.
    let mut prompts = |kind: usize| -> Vec<(Vec<u32>, Option<Lease>)> {
        assert!(
            next + 12 <= lines.len(),
            "more runs than the data has fresh prompts for"
        );
        let batch = &lines[next..next + 12];
        next += 12;
        let field = |ex: &serde_json::Value, f: &str| ex[f].as_str().unwrap().to_string();
        match kind {
            0 => batch
                .iter()
                .map(|ex| {
                    let user = format!("{}\n\n{}", field(ex, "instruction"), field(ex, "input"));
                    (chat(&user), Some(lease.clone()))
                })
                .collect(),
            _ => batch
                .chunks(4)
                .map(|four| {
                    let text: Vec<String> = four.iter().map(|ex| field(ex, "input")).collect();
                    let user = format!(
                        "Repeat the following text word for word.\n\n{}",
                        text.join(" ")
                    );
                    (chat(&user), None)
                })
                .collect(),
        }
    };
    let metrics = Arc::new(loraplex::metrics::Metrics::new());
    let engine = Engine::start(
        loaded.clone(),
        SchedulerConfig {
            max_running: 16,
            kv_cache_tokens: 64 * 256,
            max_queue: 1024,
            max_queue_per_tenant: 1024,
            max_batched_tokens: 256,
            fair_lag_tokens: 256,
        },
        metrics.clone(),
    );
    let spec = NgramSpec {
        num_tokens: k,
        min_ngram: 1,
        max_ngram: 3,
        max_batch: 4,
    };
    println!(
        "CPU: {}",
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .unwrap_or("?")
    );
    println!("prompt lookup, K = {k}, {rounds} rounds alternating\n");
    println!("| load | without: tok/s (decode, per stream) | with: tok/s (decode, per stream) | ratio | kept / proposed | tokens per step |");
    println!("|---|---|---|---|---|---|");
    for (name, kind, concurrency, max_tokens) in [
        ("json-extract, 1 stream", 0, 1, 48),
        ("repeat 4 sentences, 1 stream", 1, 1, 96),
        ("json-extract, 2 streams", 0, 2, 48),
        ("json-extract, 4 streams", 0, 4, 48),
        ("json-extract, 8 streams", 0, 8, 48),
    ] {
        let (mut off, mut on) = (Vec::new(), Vec::new());
        let (p0, k0, s0, t0) = (
            metrics.spec_draft_tokens.get(),
            metrics.spec_accepted_tokens.get(),
            metrics.spec_steps.get(),
            metrics.spec_tokens.get(),
        );
        // One warm-up with speculation (its answers fill the history as a running server's
        // would), then alternate, each run on fresh prompts; then the last run's prompts once
        // more without speculation: the same answers.
        let warm = prompts(kind);
        run(&engine, &warm, &eos, Some(spec), concurrency, max_tokens).await;
        let mut last = Vec::new();
        for _ in 0..rounds {
            let p = prompts(kind);
            off.push(run(&engine, &p, &eos, None, concurrency, max_tokens).await);
            last = prompts(kind);
            on.push(run(&engine, &last, &eos, Some(spec), concurrency, max_tokens).await);
        }
        let again = run(&engine, &last, &eos, None, concurrency, max_tokens).await;
        assert_eq!(
            again.answers,
            on.last().unwrap().answers,
            "{name}: answers differ with prompt lookup"
        );
        let rate = |r: &[Run]| {
            let (t, w, dt, dw) = r.iter().fold((0, 0.0, 0, 0.0), |acc, x| {
                (
                    acc.0 + x.tokens,
                    acc.1 + x.wall,
                    acc.2 + x.decode_tokens,
                    acc.3 + x.decode_wall,
                )
            });
            (t as f64 / w, dt as f64 / dw)
        };
        let (a, b) = (rate(&off), rate(&on));
        let proposed = metrics.spec_draft_tokens.get() - p0;
        let kept = metrics.spec_accepted_tokens.get() - k0;
        let steps = metrics.spec_steps.get() - s0;
        let tokens = metrics.spec_tokens.get() - t0;
        println!(
            "| {name} | {:.1} ({:.1}) | {:.1} ({:.1}) | **{:.2}×** ({:.2}×) | {kept} / {proposed} ({:.0} %) | {:.2} |",
            a.0,
            a.1,
            b.0,
            b.1,
            b.0 / a.0,
            b.1 / a.1,
            100.0 * kept as f64 / proposed.max(1) as f64,
            tokens as f64 / steps.max(1) as f64
        );
    }
}
