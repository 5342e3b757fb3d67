//! How far each KV dtype moves the default model (served as is: native Q4_1) from an f32 pool:
//! ten chat questions, 64 greedy tokens each through the paged pool, against the same with f32.
//! Prints, per dtype, answers identical to f32's, the mean share of f32's answer kept before the
//! first difference, the largest and mean |Δlogit| of the first step after each prompt, and, fed
//! f32's answers, the mean |Δlogit| of every step and how often the top token is f32's.
//!
//! ```sh
//! cargo run --release --example kv_dtype_quality
//! ```

use loraplex::chat::{ChatMessage, ChatTemplate};
use loraplex::model::llama::SeqInput;
use loraplex::model::source::SourceConfig;
use loraplex::model::{
    load_model, BatchInput, KvCache, KvDtype, KvPool, LoadedModel, LogitsRows, ModelOptions,
    ModelSource,
};

const QUESTIONS: [&str; 10] = [
    "Name a color of the sky.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain what a prime number is.",
    "Give me three tips for better sleep.",
    "What does a compiler do?",
    "Tell me a fun fact about octopuses.",
    "How do plants make their food?",
    "Summarize the plot of Cinderella in two sentences.",
    "Why is the ocean salty?",
];

/// 64 greedy tokens after `prompt` through a fresh pool of `dtype`, and the first step's logits.
fn answer(m: &LoadedModel, prompt: &[u32], dtype: KvDtype) -> (Vec<u32>, Vec<f32>) {
    let len = prompt.len() + 64;
    let mut pool = KvPool::new(m.model.pool_shape(len + 16, 16, dtype)).unwrap();
    let mut cache = KvCache::paged();
    for b in 0..len.div_ceil(16) as u32 {
        cache.push_block(b);
    }
    let mut step = |ids: &[u32], cache: &mut KvCache| -> Vec<f32> {
        m.model
            .forward_paged(
                &mut BatchInput {
                    seqs: vec![SeqInput::new(ids, cache)],
                    logits: LogitsRows::Last,
                },
                &mut pool,
            )
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .remove(0)
    };
    let argmax = |r: &[f32]| (0..r.len()).max_by(|a, b| r[*a].total_cmp(&r[*b])).unwrap() as u32;
    let first = step(prompt, &mut cache);
    let mut out = vec![argmax(&first)];
    while out.len() < 64 {
        let row = step(&[*out.last().unwrap()], &mut cache);
        out.push(argmax(&row));
    }
    (out, first)
}

/// Logits of every step when `answer` (64 tokens) is fed after `prompt`, one token a step.
fn forced(m: &LoadedModel, prompt: &[u32], answer: &[u32], dtype: KvDtype) -> Vec<Vec<f32>> {
    let len = prompt.len() + answer.len();
    let mut pool = KvPool::new(m.model.pool_shape(len + 16, 16, dtype)).unwrap();
    let mut cache = KvCache::paged();
    for b in 0..len.div_ceil(16) as u32 {
        cache.push_block(b);
    }
    let mut rows = Vec::new();
    for ids in std::iter::once(prompt).chain(answer[..answer.len() - 1].chunks(1)) {
        rows.push(
            m.model
                .forward_paged(
                    &mut BatchInput {
                        seqs: vec![SeqInput::new(ids, &mut cache)],
                        logits: LogitsRows::Last,
                    },
                    &mut pool,
                )
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .remove(0),
        );
    }
    rows
}

fn main() {
    loraplex::init_threads();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resolved = rt
        .block_on(
            ModelSource::parse(None)
                .unwrap()
                .resolve(&SourceConfig::from_env()),
        )
        .unwrap();
    let m = load_model(
        &resolved,
        &ModelOptions {
            native_quant: true,
            ..Default::default()
        },
    )
    .unwrap();
    let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
    let prompts: Vec<Vec<u32>> = QUESTIONS
        .iter()
        .map(|q| {
            let chat = [ChatMessage::new("user", q)];
            let text = template.render(&chat, true, &m.special_tokens()).unwrap();
            m.tokenizer.encode(&text).unwrap()
        })
        .collect();
    let want: Vec<(Vec<u32>, Vec<f32>)> = prompts
        .iter()
        .map(|p| answer(&m, p, KvDtype::F32))
        .collect();
    let base: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .zip(&want)
        .map(|(p, (w, _))| forced(&m, p, w, KvDtype::F32))
        .collect();
    println!(
        "| KV dtype | answers identical to f32 | f32 answer kept (mean) | first step max / mean |Δlogit| \
         | teacher-forced: mean |Δlogit|, top token same |"
    );
    println!("|---|---|---|---|---|");
    let argmax = |v: &[f32]| (0..v.len()).max_by(|a, c| v[*a].total_cmp(&v[*c])).unwrap();
    for dtype in [KvDtype::Bf16, KvDtype::F16, KvDtype::Int8] {
        let (mut same, mut kept, mut worst, mut mean) = (0, 0.0, 0f32, 0f32);
        let (mut tf_mean, mut tf_same, mut tf_total) = (0f64, 0, 0);
        for ((p, (w, wl)), b) in prompts.iter().zip(&want).zip(&base) {
            let (got, gl) = answer(&m, p, dtype);
            same += usize::from(&got == w);
            kept += got.iter().zip(w).take_while(|(a, b)| a == b).count() as f64 / 64.0;
            for (a, b) in gl.iter().zip(wl) {
                worst = worst.max((a - b).abs());
                mean += (a - b).abs() / (gl.len() * prompts.len()) as f32;
            }
            for (r, br) in forced(&m, p, w, dtype).iter().zip(b) {
                let d: f64 = r.iter().zip(br).map(|(x, y)| (x - y).abs() as f64).sum();
                tf_mean += d / r.len() as f64;
                tf_same += usize::from(argmax(r) == argmax(br));
                tf_total += 1;
            }
        }
        println!(
            "| {} | {same} of {} | {:.0} % | {worst:.3} / {mean:.3} | {:.3}, {tf_same} of {tf_total} |",
            dtype.as_str(),
            prompts.len(),
            100.0 * kept / prompts.len() as f64,
            tf_mean / tf_total as f64
        );
    }
}
