//! Where one decode step's time goes, by part, on the default model (SmolLM2-135M-Instruct):
//! each projection kind, norms, RoPE, attention, lm_head, adapter deltas, sampling (greedy argmax
//! on the host), and the rest (tensor bookkeeping) — at 1, 8 and 32 rows, each row a sequence
//! with 32 tokens of context.
//!
//! ```sh
//! cargo run --release --example step_profile                 # the GGUF's own Q4_1 (serving default)
//! cargo run --release --example step_profile -- f32          # dequantized to f32
//! cargo run --release --example step_profile -- nf4
//! cargo run --release --example step_profile -- q4_1 adapters   # 8 distinct rank-16 adapters
//! cargo run --release --example step_profile -- q4_1 adapters-bf16   # the same, A/B in bf16
//! cargo run --release --example step_profile -- q4_k --gguf=/tmp/loraplex-real-size/llama.q4_k_m.gguf
//! ```
//!
//! `--gguf=PATH`: another GGUF served as stored (the real-size files of `benches/real_size.sh`).

use std::time::Instant;

use candle_core::{Device, Tensor};
use loraplex::model::llama::SeqInput;
use loraplex::model::source::SourceConfig;
use loraplex::model::{
    load_model, AdapterWeights, BatchInput, KvCache, Llama, LogitsRows, LoraSite, ModelOptions,
    ModelSource, Proj,
};
use loraplex::ops::profile::{self, Part};

fn random_adapter(model: &Llama, rank: usize, seed: u64) -> AdapterWeights {
    let randn = |shape: (usize, usize), k: u64| {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n as u64)
            .map(|i| (((i + k) * 2654435761 % 10007) as f32 / 10007.0 - 0.5) * 0.1)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let layers = (0..model.layers.len())
        .map(|l| {
            Proj::ALL.map(|p| {
                let (out, inp) = model.linear(l, p).unwrap().base().dims().unwrap();
                Some(LoraSite {
                    a_t: randn((inp, rank), seed + l as u64),
                    b_t: randn((rank, out), seed + 7 * l as u64),
                    dora_scale: None,
                    dropout: None,
                })
            })
        })
        .collect();
    AdapterWeights::from_lora(layers)
}

fn main() {
    loraplex::init_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("q4_1");
    let with_adapters = args.iter().any(|a| a.starts_with("adapters"));
    // `adapters-bf16`: A and B kept in bf16 (`--adapter-dtype bf16`).
    let adapters_bf16 = args.iter().any(|a| a == "adapters-bf16");
    let opts = ModelOptions {
        native_quant: mode != "f32",
        nf4: mode == "nf4",
        ..Default::default()
    };
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
    let loaded = load_model(&resolved, &opts).unwrap();
    let model = &loaded.model;
    let mut adapters: Vec<AdapterWeights> = if with_adapters {
        (0..8).map(|i| random_adapter(model, 16, i)).collect()
    } else {
        Vec::new()
    };
    if adapters_bf16 {
        for s in adapters
            .iter_mut()
            .flat_map(|a| a.layers.iter_mut())
            .flatten()
            .flatten()
        {
            s.a_t = s.a_t.to_dtype(candle_core::DType::BF16).unwrap();
            s.b_t = s.b_t.to_dtype(candle_core::DType::BF16).unwrap();
        }
    }
    let ctx: Vec<u32> = (100..132).collect();
    let row_counts = [1usize, 8, 32];
    let steps = 8;
    let mut columns = Vec::new();
    for &rows in &row_counts {
        let caches: Vec<KvCache> = (0..rows)
            .map(|_| {
                let mut c = model.new_cache();
                model
                    .forward(&mut BatchInput {
                        seqs: vec![SeqInput::new(&ctx, &mut c)],
                        logits: LogitsRows::Last,
                    })
                    .unwrap();
                c
            })
            .collect();
        let adapter_of = |i: usize| -> Option<&AdapterWeights> {
            adapters.get(i * adapters.len().max(1) / rows)
        };
        let run = |caches: &mut Vec<KvCache>| -> (f64, f64) {
            let tokens: Vec<[u32; 1]> = (0..rows).map(|i| [200 + i as u32]).collect();
            let start = Instant::now();
            let seqs = caches
                .iter_mut()
                .zip(&tokens)
                .enumerate()
                .map(|(i, (c, t))| SeqInput::new(t, c).with_adapter(adapter_of(i)))
                .collect();
            let mut batch = BatchInput {
                seqs,
                logits: LogitsRows::Last,
            };
            // As the engine runs it: on a thread of the pool.
            let logits =
                loraplex::ops::cpu_features::on_pool(|| model.forward(&mut batch)).unwrap();
            let forward = start.elapsed().as_secs_f64();
            let s = Instant::now();
            let rows_v: Vec<Vec<f32>> = logits.to_vec2().unwrap();
            let _argmax: Vec<usize> = rows_v
                .iter()
                .map(|r| (0..r.len()).max_by(|a, b| r[*a].total_cmp(&r[*b])).unwrap())
                .collect();
            (forward, s.elapsed().as_secs_f64())
        };
        // Warm up, then profile `steps` consecutive steps (the context grows by one a step).
        let mut caches = caches;
        run(&mut caches);
        profile::reset();
        profile::enable(true);
        let (mut fwd, mut sample) = (0.0, 0.0);
        for _ in 0..steps {
            let (f, s) = run(&mut caches);
            fwd += f;
            sample += s;
        }
        profile::enable(false);
        let per = |ns: u64| ns as f64 / 1e6 / steps as f64;
        let parts: Vec<(Part, f64)> = profile::totals()
            .into_iter()
            .map(|(p, n)| (p, per(n)))
            .collect();
        let counted: f64 = parts.iter().map(|(_, t)| t).sum();
        let total = fwd * 1e3 / steps as f64;
        columns.push((
            rows,
            parts,
            total - counted,
            sample * 1e3 / steps as f64,
            total,
        ));
    }
    println!(
        "step profile: {mode}{}, ms per decode step (share of the step)\n",
        if with_adapters {
            ", 8 distinct rank-16 adapters"
        } else {
            ", base only"
        }
    );
    print!("| part |");
    for (rows, ..) in &columns {
        print!(" {rows} rows |");
    }
    println!();
    println!("|---|{}", "---|".repeat(columns.len()));
    let cell = |t: f64, total: f64| format!(" {t:.2} ({:.0} %) |", 100.0 * t / total);
    for (i, part) in Part::ALL.iter().enumerate() {
        if !with_adapters && *part == Part::AdapterDelta {
            continue;
        }
        print!("| {} |", part.name());
        for (_, parts, _, _, total) in &columns {
            print!("{}", cell(parts[i].1, *total + 0.0));
        }
        println!();
    }
    print!("| other (bookkeeping, copies, cache clones) |");
    for (_, _, other, _, total) in &columns {
        print!("{}", cell(*other, *total));
    }
    println!();
    print!("| **forward total** |");
    for (.., total) in &columns {
        print!(" **{total:.2}** |");
    }
    println!();
    print!("| sampling (logits to host, argmax) |");
    for (_, _, _, sample, _) in &columns {
        print!(" {sample:.2} |");
    }
    println!();
    print!("| tokens/s at this step time |");
    for (rows, .., total) in &columns {
        print!(" {:.0} |", *rows as f64 * 1e3 / total);
    }
    println!();
}
