//! One decode step of a batch on the default model's shapes (SmolLM2-135M: hidden 576,
//! intermediate 1536, 30 layers, 9 heads / 3 KV heads, vocab 49152), f32, random weights:
//! base only vs one adapter for all rows vs 8 distinct adapters, rank 16 on all seven
//! projections, 8 adapters of mixed methods (LoRA, DoRA, IA³, prefix and prompt tuning), and 8 of
//! every method (those, `seq_bn`, `double_seq_bn`, AdapterFusion).
//! Each sequence has 32 tokens of context. Reported as step time; the ratios adapter/base are
//! what matter. `LORAPLEX_BENCH_NF4=1` quantizes the base projections to NF4
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
        arch: Default::default(),
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
            attn_out_norm: None,
            mlp_out_norm: None,
            self_attn: Attention {
                q_norm: None,
                k_norm: None,
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

/// One adapter of each kind for the mixed-methods case: LoRA and DoRA (rank 16, all seven
/// projections), IA³ (k, v, down), prefix tuning (8 virtual tokens), prompt tuning (5).
fn mixed_methods(model: &Llama) -> Vec<AdapterWeights> {
    let c = &model.config;
    let (kv, layers) = (c.num_key_value_heads * c.head_dim, c.num_hidden_layers);
    let lora = random_adapter(model, 16);
    let mut dora = random_adapter(model, 16);
    for site in dora.layers.iter_mut().flatten().flatten() {
        let out = site.b_t.dims()[1];
        site.dora_scale = Some((randn(&[out], 0.05) + 1.0).unwrap());
    }
    let mut ia3 = AdapterWeights::from_lora(vec![Default::default(); layers]);
    ia3.ia3 = (0..layers)
        .map(|_| {
            let mut row: [Option<loraplex::model::Ia3Site>; 7] = Default::default();
            for (p, n, on_input) in [
                (Proj::K, kv, false),
                (Proj::V, kv, false),
                (Proj::Down, c.intermediate_size, true),
            ] {
                row[p as usize] = Some(loraplex::model::Ia3Site {
                    scale: (randn(&[n], 0.1) + 1.0).unwrap(),
                    on_input,
                });
            }
            row
        })
        .collect();
    let mut prefix = AdapterWeights::from_lora(vec![Default::default(); layers]);
    let rows = |n: usize| randn(&[n * kv], 0.5).to_vec1::<f32>().unwrap();
    prefix.prefix = Some(loraplex::model::KvPrefix {
        tokens: 8,
        layers: (0..layers).map(|_| (rows(8), rows(8))).collect(),
        tensor: None,
    });
    let mut prompt = AdapterWeights::from_lora(vec![Default::default(); layers]);
    prompt.soft_prompt = Some(randn(&[5, c.hidden_size], 0.02));
    vec![
        lora.clone(),
        lora,
        dora.clone(),
        dora,
        ia3.clone(),
        ia3,
        prefix,
        prompt,
    ]
}

/// Every method once (8 distinct adapters): LoRA, DoRA, IA³, prefix and prompt tuning as in
/// `mixed_methods`, and AdapterHub's `seq_bn` and `double_seq_bn` (reduction factor 16) and a
/// dynamic AdapterFusion over two `seq_bn` adapters.
fn every_method(model: &Llama) -> Vec<AdapterWeights> {
    use loraplex::model::{BnActivation, BnInput, BnSite, FusionSite};
    let c = &model.config;
    let (h, layers) = (c.hidden_size, c.num_hidden_layers);
    let r = h / 16;
    let bn = |input: BnInput, act: BnActivation| BnSite {
        down_t: randn(&[h, r], 0.02),
        down_b: randn(&[r], 0.01),
        up_t: randn(&[r, h], 0.02),
        up_b: randn(&[h], 0.01),
        scaling: 1.0,
        act,
        input,
    };
    let with_bn = |places: &[usize], input: BnInput, act: BnActivation| {
        let mut w = AdapterWeights::from_lora(vec![Default::default(); layers]);
        w.bottleneck = (0..layers)
            .map(|_| {
                let mut row: [Option<BnSite>; 2] = Default::default();
                for &p in places {
                    row[p] = Some(bn(input, act));
                }
                row
            })
            .collect();
        w
    };
    let seq = with_bn(&[1], BnInput::AfterResidual, BnActivation::Relu);
    let double = with_bn(&[0, 1], BnInput::SublayerOutput, BnActivation::Silu);
    let mut fusion = AdapterWeights::from_lora(vec![Default::default(); layers]);
    fusion.fusion = (0..layers)
        .map(|_| {
            let mut row: [Option<FusionSite>; 2] = Default::default();
            row[1] = Some(FusionSite {
                adapters: vec![
                    bn(BnInput::AfterResidual, BnActivation::Relu),
                    bn(BnInput::AfterResidual, BnActivation::Relu),
                ],
                query_t: randn(&[h, h], 0.02),
                query_b: randn(&[h], 0.01),
                key_t: randn(&[h, h], 0.02),
                key_b: randn(&[h], 0.01),
                value_t: Some(
                    (randn(&[h, h], 0.01) + Tensor::eye(h, DType::F32, &Device::Cpu).unwrap())
                        .unwrap(),
                ),
            });
            row
        })
        .collect();
    let m = mixed_methods(model);
    vec![
        m[0].clone(),
        m[2].clone(),
        m[4].clone(),
        m[6].clone(),
        m[7].clone(),
        seq,
        double,
        fusion,
    ]
}

/// Caches with 32 tokens of context, each prefilled under its row's adapter.
fn prefilled_with(model: &Llama, adapters: &[Option<&AdapterWeights>]) -> Vec<KvCache> {
    let ctx: Vec<u32> = (100..132).collect();
    adapters
        .iter()
        .map(|a| {
            let mut c = model.new_cache();
            model
                .forward(&mut BatchInput {
                    seqs: vec![SeqInput::new(&ctx, &mut c).with_adapter(*a)],
                    logits: LogitsRows::Last,
                })
                .unwrap();
            c
        })
        .collect()
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
    // 8 rows, 8 adapters of mixed methods (two each of LoRA, DoRA, IA³, one prefix, one prompt
    // tuning), each row its own.
    let family = mixed_methods(&model);
    let mixed: Vec<Option<&AdapterWeights>> = family.iter().map(Some).collect();
    let caches = prefilled_with(&model, &mixed);
    group.bench_function("rows8/8_mixed_methods", |b| {
        b.iter(|| step(&model, &caches, &mixed))
    });
    // 8 rows, every method once: LoRA, DoRA, IA³, prefix, prompt, seq_bn, double_seq_bn, fusion.
    let family = every_method(&model);
    let every: Vec<Option<&AdapterWeights>> = family.iter().map(Some).collect();
    let caches = prefilled_with(&model, &every);
    group.bench_function("rows8/8_every_method", |b| {
        b.iter(|| step(&model, &caches, &every))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
