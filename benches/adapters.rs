//! One decode step of a batch on the default model's shapes (SmolLM2-135M: hidden 576,
//! intermediate 1536, 30 layers, 9 heads / 3 KV heads, vocab 49152), f32, random weights:
//! base only vs one adapter for all rows vs 8 distinct adapters, rank 16 on all seven
//! projections. Each sequence has 32 tokens of context. Reported as step time; the ratios
//! adapter/base are what matter. `LORAPLEX_BENCH_NF4=1` quantizes the base projections to NF4
//! first (the adapters stay f32).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use loraplex::model::llama::{Attention, Block, Mlp, SeqInput};
use loraplex::model::{
    AdapterWeights, BaseWeight, BatchInput, KvCache, Linear, Llama, LlamaConfig, LogitsRows,
    LoraSite, Proj,
};

fn config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

fn randn(shape: &[usize], std: f64) -> Tensor {
    Tensor::randn(0f32, std as f32, shape, &Device::Cpu).unwrap()
}

fn linear(out: usize, inp: usize) -> Linear {
    Linear::new(BaseWeight::Dense(randn(&[out, inp], 0.02)), None)
}

fn random_llama(c: &LlamaConfig) -> Llama {
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let layers = (0..c.num_hidden_layers)
        .map(|_| Block {
            input_layernorm: Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
            self_attn: Attention {
                q_proj: linear(c.num_attention_heads * hd, h),
                k_proj: linear(c.num_key_value_heads * hd, h),
                v_proj: linear(c.num_key_value_heads * hd, h),
                o_proj: linear(h, c.num_attention_heads * hd),
            },
            post_attention_layernorm: Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
            mlp: Mlp {
                gate_proj: linear(i, h),
                up_proj: linear(i, h),
                down_proj: linear(h, i),
            },
        })
        .collect();
    let embed = randn(&[c.vocab_size, h], 0.02);
    let lm_head = Linear::new(BaseWeight::Dense(embed.clone()), None);
    Llama::new(
        c.clone(),
        loraplex::model::Embedding::Dense(embed),
        layers,
        Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
        lm_head,
    )
    .unwrap()
}

fn random_adapter(model: &Llama, rank: usize) -> AdapterWeights {
    let layers = (0..model.layers.len())
        .map(|l| {
            Proj::ALL.map(|p| {
                let (out, inp) = model.linear(l, p).unwrap().base().dims().unwrap();
                Some(LoraSite {
                    a_t: randn(&[inp, rank], 0.05),
                    b_t: randn(&[rank, out], 0.05),
                    dora_scale: None,
                    dropout: None,
                })
            })
        })
        .collect();
    AdapterWeights::from_lora(layers)
}

fn prefilled(model: &Llama, rows: usize) -> Vec<KvCache> {
    let ctx: Vec<u32> = (100..132).collect();
    (0..rows)
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
        .collect()
}

fn step(model: &Llama, caches: &[KvCache], adapters: &[Option<&AdapterWeights>]) {
    let mut caches = caches.to_vec();
    let tokens: Vec<[u32; 1]> = (0..caches.len()).map(|i| [200 + i as u32]).collect();
    let seqs = caches
        .iter_mut()
        .zip(&tokens)
        .zip(adapters)
        .map(|((c, t), a)| SeqInput::new(t, c).with_adapter(*a))
        .collect();
    model
        .forward(&mut BatchInput {
            seqs,
            logits: LogitsRows::Last,
        })
        .unwrap();
}

fn bench(c: &mut Criterion) {
    loraplex::init_threads();
    let cfg = config();
    let mut model = random_llama(&cfg);
    if std::env::var("LORAPLEX_BENCH_NF4").is_ok_and(|v| v == "1") {
        loraplex::model::quantize_nf4(&mut model).unwrap();
    }
    let adapters: Vec<AdapterWeights> = (0..8).map(|_| random_adapter(&model, 16)).collect();
    let mut group = c.benchmark_group("decode_step");
    group.sample_size(10);
    for rows in [8usize, 32] {
        let caches = prefilled(&model, rows);
        let none: Vec<Option<&AdapterWeights>> = vec![None; rows];
        let one: Vec<Option<&AdapterWeights>> = vec![Some(&adapters[0]); rows];
        // Rows sorted by adapter (what the scheduler hands the model) and interleaved.
        let grouped: Vec<Option<&AdapterWeights>> =
            (0..rows).map(|i| Some(&adapters[i * 8 / rows])).collect();
        let interleaved: Vec<Option<&AdapterWeights>> =
            (0..rows).map(|i| Some(&adapters[i % 8])).collect();
        group.bench_function(format!("rows{rows}/base"), |b| {
            b.iter(|| step(&model, &caches, &none))
        });
        group.bench_function(format!("rows{rows}/one_adapter"), |b| {
            b.iter(|| step(&model, &caches, &one))
        });
        group.bench_function(format!("rows{rows}/8_adapters_grouped"), |b| {
            b.iter(|| step(&model, &caches, &grouped))
        });
        group.bench_function(format!("rows{rows}/8_adapters_interleaved"), |b| {
            b.iter(|| step(&model, &caches, &interleaved))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
