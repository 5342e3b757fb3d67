//! NF4 against bitsandbytes (`tests/fixtures/nf4/nf4_96x128.safetensors`: `quantize_4bit`,
//! blocksize 64, NF4, with and without `compress_statistics`).

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::*;
use loraplex::quant::nf4::{dynamic_map, Absmax, NF4_LEVELS};
use loraplex::quant::Nf4Weight;

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("nf4").join("nf4_96x128.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn tables_equal_bitsandbytes() {
    let f = fixture();
    assert_eq!(f32s(&f["nf4_code"]), NF4_LEVELS.to_vec());
    assert_eq!(f32s(&f["dq_nested_code"]), dynamic_map().to_vec());
}

#[test]
fn quantization_is_bit_exact() {
    let f = fixture();
    let w = f32s(&f["weight"]);
    let plain = Nf4Weight::quantize(&w, 96, 128, false);
    assert_eq!(plain.packed, u8s(&f["packed"]));
    assert_eq!(plain.absmax, Absmax::Plain(f32s(&f["absmax"])));
    let worst = plain
        .dequantize()
        .iter()
        .zip(f32s(&f["dequant"]))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-7, "dequant differs by {worst}");

    let dq = Nf4Weight::quantize(&w, 96, 128, true);
    assert_eq!(dq.packed, u8s(&f["dq_packed"]));
    match &dq.absmax {
        Absmax::Double {
            nested_absmax,
            offset,
            ..
        } => {
            assert_eq!(*nested_absmax, f32s(&f["dq_nested_absmax"]));
            assert_eq!(vec![*offset], f32s(&f["dq_offset"]));
        }
        other => panic!("{other:?}"),
    }
}

/// bitsandbytes' CPU kernel looks the 8-bit code up in a 65536-bin table rather than taking
/// the exact nearest code: here constant 128 sits 4e-6 above a midpoint and gets the lower code.
#[test]
fn double_quantized_codes_and_values_equal_bitsandbytes() {
    let f = fixture();
    let dq = Nf4Weight::quantize(&f32s(&f["weight"]), 96, 128, true);
    match &dq.absmax {
        Absmax::Double { codes, .. } => assert_eq!(*codes, u8s(&f["dq_qabsmax"])),
        other => panic!("{other:?}"),
    }
    let worst = dq
        .dequantize()
        .iter()
        .zip(f32s(&f["dq_dequant"]))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-7, "double-quantized dequant differs by {worst}");
}

/// `blockwise8.safetensors`: codes from bitsandbytes 0.50.2's native CPU kernel
/// (`make_blockwise8.py`), 11 of which are not the exact nearest code.
#[test]
fn blockwise_8bit_codes_equal_bitsandbytes_kernel() {
    use loraplex::quant::nf4::quantize_blockwise_dynamic;
    let f = candle_core::safetensors::load(
        fixtures().join("nf4").join("blockwise8.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut cases = 0;
    for k in 0.. {
        let Some(input) = f.get(&format!("input_{k}")) else {
            break;
        };
        let block: Vec<i64> = f[&format!("block_{k}")].to_vec1().unwrap();
        let (codes, absmax) = quantize_blockwise_dynamic(&f32s(input), block[0] as usize);
        let want = u8s(&f[&format!("codes_{k}")]);
        let differ: Vec<usize> = (0..want.len()).filter(|&i| codes[i] != want[i]).collect();
        assert!(differ.is_empty(), "case {k}: codes differ at {differ:?}");
        assert_eq!(absmax, f32s(&f[&format!("absmax_{k}")]), "case {k}");
        cases += 1;
    }
    assert_eq!(cases, 6);
}

#[test]
fn nf4_base_with_each_adapter_equals_the_dequantized_base() {
    use loraplex::adapters::{bind, BindOptions, PeftAdapter};
    use loraplex::model::llama::SeqInput;
    use loraplex::model::{quantize_nf4, BaseWeight, BatchInput, LogitsRows, Proj};
    let mut q = load_tiny();
    quantize_nf4(&mut q.model).unwrap();
    let (_, bits) = loraplex::model::projection_footprint(&q.model);
    assert!(bits < 4.6, "{bits} bits per parameter");
    // The oracle: the same model with every NF4 projection dequantized to a dense f32 weight.
    let mut dense = q.clone();
    for l in 0..dense.model.layers.len() {
        for p in Proj::ALL {
            let lin = dense.model.linear_mut(l, p).unwrap();
            let w = lin.base().dense().unwrap();
            assert!(matches!(lin.base(), BaseWeight::Nf4(_)));
            lin.set_base(BaseWeight::Dense(w));
        }
    }
    let ids: Vec<u32> = (3..40).collect();
    let run = |m: &loraplex::model::LoadedModel,
               a: Option<&loraplex::model::AdapterWeights>|
     -> Vec<Vec<f32>> {
        let mut c = m.model.new_cache();
        m.model
            .forward(&mut BatchInput {
                seqs: vec![SeqInput::new(&ids, &mut c).with_adapter(a)],
                logits: LogitsRows::All,
            })
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    for name in [
        None,
        Some("lora-r8-all"),
        Some("lora-r4-qv"),
        Some("rslora-r16-pattern"),
        Some("dora-r8-all"),
    ] {
        let (wq, wd) = match name {
            None => (None, None),
            Some(n) => {
                let peft = PeftAdapter::load(&tiny_dir().join("adapters").join(n)).unwrap();
                (
                    Some(bind(&peft, &q.model, &BindOptions::default()).unwrap()),
                    Some(bind(&peft, &dense.model, &BindOptions::default()).unwrap()),
                )
            }
        };
        let (a, b) = (run(&q, wq.as_ref()), run(&dense, wd.as_ref()));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0.0, f32::max);
        assert!(
            worst < 1e-4,
            "{name:?}: NF4 vs dequantized base differ by {worst}"
        );
    }
}

#[test]
fn qlora_training_lowers_the_loss_and_serves_on_the_nf4_base() {
    use loraplex::adapters::{bind, BindOptions, PeftAdapter};
    use loraplex::chat::ChatTemplate;
    use loraplex::model::{quantize_nf4, Proj};
    use loraplex::train::dataset::Tokenization;
    use loraplex::train::optim::Schedule;
    use loraplex::train::trainable::TrainSpec;
    use loraplex::train::{train, Dataset, Format, Method, TrainConfig};
    let mut m = load_tiny();
    quantize_nf4(&mut m.model).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..16)
        .map(|i| serde_json::json!({"prompt": format!("q{i} "), "completion": format!("answer {}", i % 4)}).to_string())
        .collect();
    std::fs::write(tmp.path().join("d.jsonl"), lines.join("\n")).unwrap();
    let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
    let special = m.special_tokens();
    let tok = Tokenization {
        tokenizer: &m.tokenizer,
        template: &template,
        special: &special,
        eos: 2,
        max_seq_len: 64,
        format: Format::Auto,
    };
    let data = Dataset::load(&tmp.path().join("d.jsonl"), &tok, false).unwrap();
    let out = tmp.path().join("qlora");
    let cfg = TrainConfig {
        output: out.clone(),
        overwrite: false,
        resume: false,
        spec: TrainSpec {
            method: Method::Lora,
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Proj::ALL.to_vec(),
            rslora: false,
            seed: 3,
            base_model: "tiny".into(),
            virtual_tokens: 0,
            reduction_factor: 0,
            prefix_projection: None,
            fuse: Vec::new(),
        },
        lr: 1e-2,
        weight_decay: 0.0,
        betas: (0.9, 0.999),
        schedule: Schedule::Constant,
        warmup_ratio: 0.0,
        batch_size: 4,
        grad_accum: 1,
        max_grad_norm: 1.0,
        epochs: 1,
        max_steps: Some(20),
        save_steps: 0,
        progress: false,
        args: serde_json::json!({}),
        interrupt_after: None,
        cancel: None,
        on_step: None,
        epoch_checkpoints: None,
        max_batch_tokens: None,
        checkpoint_activations: false,
        keep_checkpoint: false,
        keep_epoch_checkpoints: None,
        progress_every: std::time::Duration::from_secs(10),
    };
    let report = train(&m.model, &data, None, &cfg).unwrap();
    assert!(
        report.final_loss < 0.5 * report.first_loss,
        "{} -> {}",
        report.first_loss,
        report.final_loss
    );
    let served = bind(
        &PeftAdapter::load(&out).unwrap(),
        &m.model,
        &BindOptions::default(),
    );
    assert!(served.is_ok());
}
