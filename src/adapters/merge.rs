//! Merging an adapter into the base weights: LoRA `W + s·B A`; DoRA
//! `(m / ‖W + s·B A‖) ⊙ (W + s·B A)` row-wise; IA³ `l ⊙ W` row-wise (columns for a
//! feed-forward module). The result is an ordinary Llama.

use candle_core::{DType, Tensor};

use super::bind::{dora_weight_norm, fused_parts, parse_module};
use super::error::AdapterError;
use super::peft::PeftAdapter;
use crate::model::{BaseWeight, Llama};

pub fn merge(model: &Llama, adapter: &PeftAdapter) -> Result<Llama, AdapterError> {
    // Bind first: it validates every module, shape and rank the same way serving does.
    super::bind::bind(adapter, model, &super::bind::BindOptions::default())?;
    let cfg = &adapter.config;
    use super::config::Method;
    let why = match cfg.method {
        Method::PrefixTuning { .. } => Some("is PREFIX_TUNING, which cannot be merged into the weights: its key/value rows are extra positions every sequence attends to, not a change of any W (serve it unmerged)"),
        Method::PromptTuning { .. } => Some("is PROMPT_TUNING, which cannot be merged into the weights: its virtual tokens are extra input rows before every prompt, not a change of any W (serve it unmerged)"),
        Method::Bottleneck(_) => Some("is a bottleneck adapter, which cannot be merged into the weights: its down/up projections with a non-linearity are a new layer, not a change of any W (serve it unmerged)"),
        Method::Fusion { .. } => Some("is an AdapterFusion, which cannot be merged into the weights: it mixes its adapters' outputs per token by attention (serve it unmerged)"),
        Method::Lora | Method::Ia3 { .. } => None,
    };
    if let Some(why) = why {
        return Err(AdapterError::config(
            adapter.dir.join(super::peft::CONFIG_FILE),
            "peft_type",
            why,
        ));
    }
    let mut merged = model.clone();
    for (module, w) in &adapter.modules {
        // A fused module (Phi-3's `qkv_proj`, `gate_up_proj`) merges into each part by rows.
        let (layer, parts) = match fused_parts(module, model) {
            Some((layer, parts)) => (
                layer,
                parts
                    .into_iter()
                    .map(|(p, from, n)| (p, Some((from, n))))
                    .collect(),
            ),
            None => {
                let (layer, proj) = parse_module(module).expect("validated by bind");
                (layer, vec![(proj, None)])
            }
        };
        let rows = |t: &Tensor, part: Option<(usize, usize)>| -> candle_core::Result<Tensor> {
            match part {
                Some((from, n)) => t.narrow(0, from, n),
                None => Ok(t.clone()),
            }
        };
        for (proj, part) in parts {
            let linear = merged.linear_mut(layer, proj).expect("validated by bind");
            let base = linear.base().dense()?;
            let dtype = base.dtype();
            if let Some(l) = &w.ia3 {
                let l = rows(&l.to_dtype(DType::F32)?, part)?;
                // `[out, 1]` scales rows, `[1, in]` (feed-forward) columns: a broadcast either way.
                let new = base.to_dtype(DType::F32)?.broadcast_mul(&l)?;
                linear.set_base(BaseWeight::Dense(
                    new.to_dtype(dtype)?.to_device(base.device())?,
                ));
                // An output scale scales the bias too (PEFT scales the layer's whole output).
                if let (Some(bias), false) = (linear.bias(), cfg.is_feedforward(module)) {
                    let scaled = (bias.to_dtype(DType::F32)? * l.flatten_all()?)?;
                    linear.set_bias(Some(scaled.to_dtype(bias.dtype())?));
                }
                continue;
            }
            let a = w.lora_a.as_ref().expect("bound");
            let b = &rows(w.lora_b.as_ref().expect("bound"), part)?;
            let scale = cfg.scale_for(module);
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let sum = (f32(&base)? + (f32(b)?.matmul(&f32(a)?)? * scale)?)?;
            let new = match &w.magnitude {
                Some(m) if cfg.use_dora => {
                    let m = rows(m, part)?;
                    let norm = dora_weight_norm(&base, a, b, scale)?;
                    sum.broadcast_mul(&(f32(&m)? / norm)?.unsqueeze(1)?)?
                }
                _ => sum,
            };
            linear.set_base(BaseWeight::Dense(
                new.to_dtype(dtype)?.to_device(base.device())?,
            ));
        }
    }
    Ok(merged)
}
