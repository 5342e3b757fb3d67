//! Long contexts on the default model through the paged KV pool, as the engine runs them:
//! where a prefill's time goes (by part, chunk by chunk under `--max-batched-tokens`), and
//! single-stream decode speed at a short and a long context.
//!
//! ```sh
//! cargo run --release --example context_profile                # 3,000-token prompt, chunks of 256
//! cargo run --release --example context_profile -- 3000 0     # the prompt in one step
//! cargo run --release --example context_profile -- 3000 256 bf16   # KV stored in bf16
//! cargo run --release --example context_profile -- 2000 256 --gguf=/tmp/loraplex-real-size/llama.q4_k_m.gguf
//! ```

use std::time::Instant;

use loraplex::model::llama::SeqInput;
use loraplex::model::source::SourceConfig;
use loraplex::model::{
    load_model, BatchInput, KvCache, KvDtype, KvPool, Llama, LogitsRows, ModelOptions, ModelSource,
};
use loraplex::ops::profile::{self, Part};

/// Feeds `tokens` to a fresh paged cache in chunks of `chunk` (0: all at once); returns the cache.
fn prefill(
    model: &Llama,
    pool: &mut KvPool,
    next: &mut u32,
    tokens: &[u32],
    chunk: usize,
) -> KvCache {
    let mut cache = KvCache::paged();
    let bs = pool.block_size();
    let chunk = if chunk == 0 { tokens.len() } else { chunk };
    for piece in tokens.chunks(chunk) {
        feed(model, pool, next, &mut cache, piece, bs);
    }
    cache
}

fn feed(
    model: &Llama,
    pool: &mut KvPool,
    next: &mut u32,
    cache: &mut KvCache,
    piece: &[u32],
    bs: usize,
) {
    while cache.table().unwrap().len() * bs < cache.len() + piece.len() {
        cache.push_block(*next);
        *next += 1;
    }
    model
        .forward_paged(
            &mut BatchInput {
                seqs: vec![SeqInput::new(piece, cache)],
                logits: LogitsRows::Last,
            },
            pool,
        )
        .unwrap();
}

fn main() {
    loraplex::init_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let len: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3000);
    let chunk: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let dtype: KvDtype = args.get(2).map(|a| a.parse().unwrap()).unwrap_or_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resolved = rt
        .block_on(
            ModelSource::parse(None)
                .unwrap()
                .resolve(&SourceConfig::from_env()),
        )
        .unwrap();
    let resolved = match args.iter().find_map(|a| a.strip_prefix("--gguf=")) {
        Some(path) => loraplex::model::source::ResolvedModel::Gguf {
            id: path.into(),
            path: path.into(),
        },
        None => resolved,
    };
    let loaded = load_model(
        &resolved,
        &ModelOptions {
            native_quant: true,
            ..Default::default()
        },
    )
    .unwrap();
    let model = &loaded.model;
    let mut pool = KvPool::new(model.pool_shape(len + 4096, 16, dtype)).unwrap();
    let prompt: Vec<u32> = (0..len as u32).map(|i| 1000 + i * 7919 % 39000).collect();
    let mut next = 0u32;
    // Warm-up (thread pool, page faults of the pool's first blocks).
    prefill(model, &mut pool, &mut next, &prompt[..256.min(len)], chunk);
    next = 0;
    profile::reset();
    profile::enable(true);
    let t = Instant::now();
    if !args.iter().any(|a| a == "decode-only") {
        prefill(model, &mut pool, &mut next, &prompt, chunk);
    }
    let took = t.elapsed().as_secs_f64();
    profile::enable(false);
    println!(
        "prefill of {len} tokens, chunks of {}, KV {}: {took:.2} s ({:.0} tokens/s)\n",
        if chunk == 0 { len } else { chunk },
        dtype.as_str(),
        len as f64 / took
    );
    println!("| part | s | share |\n|---|---|---|");
    let mut counted = 0.0;
    for (p, ns) in profile::totals() {
        if p == Part::AdapterDelta {
            continue;
        }
        let s = ns as f64 / 1e9;
        counted += s;
        println!("| {} | {s:.2} | {:.0} % |", p.name(), 100.0 * s / took);
    }
    println!(
        "| other | {:.2} | {:.0} % |",
        took - counted,
        100.0 * (took - counted) / took
    );
    // Decode at a short and a long context: 32 steps each, one stream (`decode-only`: 512).
    let steps: u32 = if args.iter().any(|a| a == "decode-only") {
        512
    } else {
        32
    };
    println!("\n| context | decode tokens/s | attention per step |\n|---|---|---|");
    let mut rates = Vec::new();
    for ctx in [64usize, 2048] {
        let mut next = 0u32;
        let mut cache = prefill(model, &mut pool, &mut next, &prompt[..ctx.min(len)], 256);
        profile::reset();
        profile::enable(true);
        let t = Instant::now();
        for i in 0..steps {
            feed(model, &mut pool, &mut next, &mut cache, &[2000 + i], 16);
        }
        let took = t.elapsed().as_secs_f64();
        profile::enable(false);
        let attention = profile::totals()
            .into_iter()
            .find(|(p, _)| *p == Part::Attention)
            .map_or(0.0, |(_, ns)| ns as f64 / 1e6 / steps as f64);
        let rate = steps as f64 / took;
        rates.push(rate);
        println!(
            "| {ctx} | {rate:.1} | {:.2} ms of {:.2} ms |",
            attention,
            took * 1e3 / steps as f64
        );
    }
    println!("\ndecode at 2,048 / at 64: {:.2}x", rates[1] / rates[0]);
}
