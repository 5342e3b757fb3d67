//! Binding a PEFT adapter to the base model: every module checked against the model (exists,
//! shapes fit, rank within bounds), the scale folded into B, DoRA's `m / ‖W + s·B A‖` computed
//! once. The result is what the forward pass uses. The same checks run on a safetensors header
//! alone (`check`), so a bad adapter is refused before its tensors are read.

use std::path::Path;

use candle_core::{DType, Tensor, D};

use super::config::{AdapterConfig, Method, TargetModules};
use super::error::AdapterError;
use super::peft::{AdapterHeader, ModuleShapes, PeftAdapter};
use crate::model::{AdapterWeights, BnSite, FusionSite, Ia3Site, KvPrefix, Llama, LoraSite, Proj};
use crate::ops::transpose::transposed;

/// `--adapter-dtype`: how A and B are kept for serving on a CPU f32 model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterDType {
    /// As the file has them: 16-bit files stay 16-bit, f32 files stay f32.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone)]
pub struct BindOptions {
    /// `--max-lora-rank`: adapters of a higher rank are refused.
    pub max_rank: usize,
    /// `--adapter-dtype`.
    pub adapter_dtype: AdapterDType,
}

impl Default for BindOptions {
    fn default() -> Self {
        Self {
            max_rank: 256,
            adapter_dtype: AdapterDType::Auto,
        }
    }
}

/// The element type A and B are kept in: 16 bits (half the bytes streamed per step) where the
/// file has them so or `--adapter-dtype` asks, on a CPU f32 model whose kernels read them;
/// else the model's type.
fn storage_dtype(opts: &BindOptions, file: DType, model: &Llama) -> DType {
    let cpu_f32 = model.dtype() == DType::F32 && matches!(model.device(), candle_core::Device::Cpu);
    match (cpu_f32, opts.adapter_dtype) {
        (false, _) | (true, AdapterDType::F32) => model.dtype(),
        (true, AdapterDType::Bf16) => DType::BF16,
        (true, AdapterDType::F16) => DType::F16,
        (true, AdapterDType::Auto) if matches!(file, DType::BF16 | DType::F16) => file,
        (true, AdapterDType::Auto) => model.dtype(),
    }
}

/// `model.layers.{i}.{proj module}` → (i, proj).
pub fn parse_module(module: &str) -> Option<(usize, Proj)> {
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let proj = Proj::ALL.into_iter().find(|p| p.module() == rest)?;
    Some((layer.parse().ok()?, proj))
}

/// A fused module of a family that stores q/k/v (or gate/up) as one weight (Phi-3's
/// `self_attn.qkv_proj`, `mlp.gate_up_proj`): its layer and its parts (projection, first
/// output row, rows). The model holds the parts split; an adapter on the fused module is split
/// by the same rows (LoRA's B, DoRA's magnitudes and row norms, IA³'s output scales: all
/// row-wise, so the split is exact).
pub fn fused_parts(module: &str, model: &Llama) -> Option<(usize, Vec<(Proj, usize, usize)>)> {
    let c = &model.config;
    if !c.arch.fused {
        return None;
    }
    let (layer, rest) = module.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (q, kv, inter) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let parts = match rest {
        "self_attn.qkv_proj" => vec![(Proj::Q, 0, q), (Proj::K, q, kv), (Proj::V, q + kv, kv)],
        "mlp.gate_up_proj" => vec![(Proj::Gate, 0, inter), (Proj::Up, inter, inter)],
        _ => return None,
    };
    Some((layer, parts))
}

/// Row norms of `W + s·B A` (DoRA's `‖·‖` per output row), in f32.
pub fn dora_weight_norm(
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let w = w.to_dtype(DType::F32)?;
    let ba = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
    (w + ba)?.sqr()?.sum(D::Minus1)?.sqrt()
}

fn check_config(
    cfg: &AdapterConfig,
    dir: &Path,
    opts: &BindOptions,
    model: &Llama,
) -> Result<(), AdapterError> {
    if let TargetModules::List(names) = &cfg.target_modules {
        for n in names {
            let fused = model.config.arch.fused
                && ["qkv_proj", "gate_up_proj"]
                    .iter()
                    .any(|f| n == f || n.ends_with(&format!(".{f}")));
            let known = fused
                || Proj::ALL.iter().any(|p| {
                    p.short() == n || p.module() == n || n.ends_with(&format!(".{}", p.short()))
                });
            if !known {
                return Err(AdapterError::config(
                    dir.join(super::peft::CONFIG_FILE),
                    "target_modules",
                    format!("names `{n}`, which the base model lacks (it has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
                ));
            }
        }
    }
    if cfg.r > opts.max_rank {
        return Err(AdapterError::config(
            dir.join(super::peft::CONFIG_FILE),
            "r",
            format!("is {}, above --max-lora-rank {}", cfg.r, opts.max_rank),
        ));
    }
    Ok(())
}

/// Checks one module's shapes against the model; returns its layer and projection.
fn check_module(
    cfg: &AdapterConfig,
    path: &Path,
    module: &str,
    shapes: &ModuleShapes,
    model: &Llama,
    opts: &BindOptions,
) -> Result<(usize, Proj), AdapterError> {
    let err = |problem: String| AdapterError::Module {
        path: path.to_path_buf(),
        module: module.to_string(),
        problem,
    };
    let (layer, proj, out, inp) = match fused_parts(module, model) {
        Some((layer, parts)) if layer < model.layers.len() => {
            if matches!(cfg.method, Method::Ia3 { .. }) && cfg.is_feedforward(module) {
                return Err(err(
                    "an IA³ feed-forward (input) scale on a fused module is not supported".into(),
                ));
            }
            let rows = parts.iter().map(|p| p.2).sum();
            (layer, parts[0].0, rows, model.config.hidden_size)
        }
        _ => {
            let (layer, proj) = parse_module(module)
                .filter(|(l, _)| *l < model.layers.len())
                .ok_or_else(|| err("the base model has no such module".into()))?;
            let linear = model.linear(layer, proj).expect("layer checked");
            let (out, inp) = linear.base().dims()?;
            (layer, proj, out, inp)
        }
    };
    if let Method::Ia3 { .. } = cfg.method {
        let want = if cfg.is_feedforward(module) {
            vec![1, inp]
        } else {
            vec![out, 1]
        };
        return match (
            &shapes.ia3,
            &shapes.lora_a,
            &shapes.lora_b,
            &shapes.magnitude,
        ) {
            (Some(l), None, None, None) if *l == want => Ok((layer, proj)),
            (Some(l), None, None, None) => Err(err(format!(
                "ia3_l {l:?} does not fit the base weight [{out}, {inp}] (expected {want:?}{})",
                if cfg.is_feedforward(module) {
                    ", a feed-forward module: its input is scaled"
                } else {
                    ""
                }
            ))),
            (None, ..) => Err(err("ia3_l is missing (peft_type is IA3)".into())),
            _ => Err(err("has LoRA tensors, but peft_type is IA3".into())),
        };
    }
    if shapes.ia3.is_some() {
        return Err(err("has an IA³ vector, but peft_type is LORA".into()));
    }
    let a = shapes
        .lora_a
        .as_ref()
        .ok_or_else(|| err("lora_A is missing".into()))?;
    let b = shapes
        .lora_b
        .as_ref()
        .ok_or_else(|| err("lora_B is missing".into()))?;
    let r = a.first().copied().unwrap_or(0);
    if r > opts.max_rank {
        return Err(err(format!(
            "rank {r} is above --max-lora-rank {}",
            opts.max_rank
        )));
    }
    if a[..] != [r, inp] || b[..] != [out, r] {
        return Err(err(format!(
            "lora_A {a:?} and lora_B {b:?} do not fit the base weight [{out}, {inp}] (expected [{r}, {inp}] and [{out}, {r}])"
        )));
    }
    let expected_r = cfg.rank_for(module);
    if r != expected_r {
        return Err(err(format!(
            "has rank {r}, but adapter_config.json gives it rank {expected_r}"
        )));
    }
    match (cfg.use_dora, &shapes.magnitude) {
        (false, None) => {}
        (false, Some(_)) => return Err(err("has a DoRA magnitude but `use_dora` is false".into())),
        (true, None) => {
            return Err(err(
                "lora_magnitude_vector is missing (use_dora is true)".into()
            ))
        }
        (true, Some(m)) => {
            if m[..] != [out] {
                return Err(err(format!(
                    "lora_magnitude_vector {m:?} does not fit [{out}]"
                )));
            }
        }
    }
    Ok((layer, proj))
}

/// Checks prompt learning's `prompt_embeddings` shape against the model: prefix tuning
/// `[num_virtual_tokens, layers · 2 · kv_heads · head_dim]`, prompt tuning
/// `[num_virtual_tokens, hidden]`.
fn check_prefix(
    cfg: &AdapterConfig,
    path: &Path,
    shape: Option<&[usize]>,
    model: &Llama,
) -> Result<(), AdapterError> {
    let c = &model.config;
    let width = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim;
    let err = |problem: String| AdapterError::weights(path, problem);
    match (&cfg.method, shape) {
        (Method::PrefixTuning { num_virtual_tokens }, Some(s)) => {
            let want = [*num_virtual_tokens, width];
            if s != want {
                return Err(err(format!(
                    "`prompt_embeddings` is {s:?}; prefix tuning of this model needs {want:?} (num_virtual_tokens, layers · 2 · kv_heads · head_dim = {} · 2 · {} · {})",
                    c.num_hidden_layers, c.num_key_value_heads, c.head_dim
                )));
            }
            Ok(())
        }
        (Method::PromptTuning { num_virtual_tokens }, Some(s)) => {
            let want = [*num_virtual_tokens, c.hidden_size];
            if s != want {
                return Err(err(format!(
                    "`prompt_embeddings` is {s:?}; prompt tuning of this model needs {want:?} (num_virtual_tokens, hidden size)"
                )));
            }
            Ok(())
        }
        (Method::PrefixTuning { .. } | Method::PromptTuning { .. }, None) => Err(err(
            "`prompt_embeddings` is missing (peft_type is a prompt-learning method)".into(),
        )),
        (_, Some(_)) => Err(err(
            "has `prompt_embeddings`, but peft_type is neither PREFIX_TUNING nor PROMPT_TUNING"
                .into(),
        )),
        (_, None) => Ok(()),
    }
}

/// Prefix tuning's rows for the cache: per layer, keys then values from each row of `p`.
fn kv_prefix(p: &Tensor, model: &Llama) -> Result<KvPrefix, AdapterError> {
    let c = &model.config;
    let w = c.num_key_value_heads * c.head_dim;
    let (n, _) = p.dims2()?;
    let rows: Vec<Vec<f32>> = p.to_dtype(DType::F32)?.to_vec2()?;
    let part = |l: usize, kv: usize| -> Vec<f32> {
        rows.iter()
            .flat_map(|r| r[(l * 2 + kv) * w..(l * 2 + kv + 1) * w].iter().copied())
            .collect()
    };
    Ok(KvPrefix {
        tokens: n,
        layers: (0..c.num_hidden_layers)
            .map(|l| (part(l, 0), part(l, 1)))
            .collect(),
        tensor: None,
    })
}

/// Checks one bottleneck adapter module (`model.layers.L.attention_adapters` or
/// `.output_adapters`): down `[r, hidden]` + bias `[r]`, up `[hidden, r]` + bias `[hidden]`.
/// Returns its layer and place (0: after attention, 1: after the MLP).
fn check_bn_module(
    path: &Path,
    module: &str,
    shapes: &ModuleShapes,
    model: &Llama,
) -> Result<(usize, usize), AdapterError> {
    let err = |problem: String| AdapterError::Module {
        path: path.to_path_buf(),
        module: module.to_string(),
        problem,
    };
    let place = module
        .strip_prefix("model.layers.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, site)| {
            let at = match site {
                "attention_adapters" => 0,
                "output_adapters" => 1,
                _ => return None,
            };
            Some((l.parse::<usize>().ok()?, at))
        })
        .filter(|(l, _)| *l < model.layers.len())
        .ok_or_else(|| err("the base model has no such adapter place".into()))?;
    let h = model.config.hidden_size;
    let (Some(d), Some(u), Some(db), Some(ub)) = (
        &shapes.lora_a,
        &shapes.lora_b,
        &shapes.down_bias,
        &shapes.up_bias,
    ) else {
        return Err(err(
            "needs adapter_down.0.weight/bias and adapter_up.weight/bias".into(),
        ));
    };
    let r = d.first().copied().unwrap_or(0);
    if d[..] != [r, h] || u[..] != [h, r] || db[..] != [r] || ub[..] != [h] {
        return Err(err(format!(
            "adapter_down {d:?} + {db:?} and adapter_up {u:?} + {ub:?} do not fit hidden size {h} (expected [{r}, {h}] + [{r}], [{h}, {r}] + [{h}])"
        )));
    }
    Ok(place)
}

/// Checks an adapter known from its header against the model, before any tensor is read.
pub fn check(
    header: &AdapterHeader,
    model: &Llama,
    opts: &BindOptions,
) -> Result<(), AdapterError> {
    check_config(&header.config, &header.dir, opts, model)?;
    let path = header.dir.join(super::peft::WEIGHTS_FILE);
    let fusion = matches!(header.config.method, Method::Fusion { .. });
    if header.modules.is_empty() && header.prompt_embeddings.is_none() && !fusion {
        return Err(AdapterError::weights(&path, "holds no adapter tensors"));
    }
    check_prefix(
        &header.config,
        &path,
        header.prompt_embeddings.as_deref(),
        model,
    )?;
    for (module, shapes) in &header.modules {
        if let Method::Bottleneck(_) = header.config.method {
            check_bn_module(&path, module, shapes, model)?;
        } else {
            check_module(&header.config, &path, module, shapes, model, opts)?;
        }
    }
    Ok(())
}

/// Reads an adapter directory header-first (config and header checked against the model
/// before the tensors are read) and binds it.
pub fn load_checked(
    dir: &Path,
    model: &Llama,
    opts: &BindOptions,
) -> Result<AdapterWeights, AdapterError> {
    let header = PeftAdapter::inspect(dir)?;
    check(&header, model, opts)?;
    bind(&PeftAdapter::load_tensors(header)?, model, opts)
}

pub fn bind(
    adapter: &PeftAdapter,
    model: &Llama,
    opts: &BindOptions,
) -> Result<AdapterWeights, AdapterError> {
    let cfg = &adapter.config;
    let path = adapter.dir.join(super::peft::WEIGHTS_FILE);
    check_config(cfg, &adapter.dir, opts, model)?;
    let dtype = model.dtype();
    let mut layers: Vec<[Option<LoraSite>; 7]> = (0..model.layers.len())
        .map(|_| Default::default())
        .collect();
    let mut ia3: Vec<[Option<Ia3Site>; 7]> = Vec::new();
    let mut bottleneck: Vec<[Option<BnSite>; 2]> = Vec::new();
    if let Method::Bottleneck(bn) = cfg.method {
        bottleneck = (0..model.layers.len())
            .map(|_| Default::default())
            .collect();
        for (module, w) in &adapter.modules {
            let (layer, at) = check_bn_module(&path, module, &w.shapes(), model)?;
            let t = |x: &Option<Tensor>| -> Result<Tensor, AdapterError> {
                Ok(x.as_ref()
                    .expect("checked")
                    .to_dtype(dtype)?
                    .to_device(model.device())?)
            };
            bottleneck[layer][at] = Some(BnSite {
                down_t: transposed(&t(&w.lora_a)?)?,
                down_b: t(&w.down_bias)?,
                up_t: transposed(&t(&w.lora_b)?)?,
                up_b: t(&w.up_bias)?,
                scaling: bn.scaling,
                act: bn.act,
                input: bn.input,
            });
        }
    }
    let shape = adapter
        .prompt_embeddings
        .as_ref()
        .map(|p| p.dims().to_vec());
    check_prefix(cfg, &path, shape.as_deref(), model)?;
    let (mut prefix, mut soft_prompt) = (None, None);
    if let Some(p) = &adapter.prompt_embeddings {
        if let Method::PromptTuning { .. } = cfg.method {
            soft_prompt = Some(p.to_dtype(dtype)?.to_device(model.device())?);
        } else {
            prefix = Some(kv_prefix(p, model)?);
        }
    }
    for (module, w) in adapter.modules.iter().filter(|_| bottleneck.is_empty()) {
        let (layer, first) = check_module(cfg, &path, module, &w.shapes(), model, opts)?;
        // One part (the module itself), or the rows of each part of a fused module.
        let parts = match fused_parts(module, model) {
            Some((_, parts)) => parts,
            None => vec![(first, 0, 0)],
        };
        let whole = parts.len() == 1;
        let rows = |t: &Tensor, from: usize, n: usize| -> candle_core::Result<Tensor> {
            if whole {
                Ok(t.clone())
            } else {
                t.narrow(0, from, n)
            }
        };
        for (proj, from, n) in parts {
            if let Some(l) = &w.ia3 {
                if ia3.is_empty() {
                    ia3 = (0..model.layers.len())
                        .map(|_| Default::default())
                        .collect();
                }
                ia3[layer][proj as usize] = Some(Ia3Site {
                    scale: rows(&l.flatten_all()?, from, n)?
                        .to_dtype(dtype)?
                        .to_device(model.device())?,
                    on_input: cfg.is_feedforward(module),
                });
                continue;
            }
            let linear = model.linear(layer, proj).expect("layer checked");
            let (Some(a), Some(b)) = (&w.lora_a, &w.lora_b) else {
                unreachable!("check_module requires lora_A and lora_B")
            };
            let b = &rows(b, from, n)?;
            let magnitude = &match &w.magnitude {
                Some(m) => Some(rows(m, from, n)?),
                None => None,
            };
            let scale = cfg.scale_for(module);
            let dora_scale = match magnitude {
                None => None,
                Some(m) => {
                    let norm = dora_weight_norm(&linear.base().dense()?, a, b, scale)?;
                    Some((m.to_dtype(DType::F32)? / norm)?.to_dtype(dtype)?)
                }
            };
            let device = model.device();
            let keep = storage_dtype(opts, a.dtype(), model);
            layers[layer][proj as usize] = Some(LoraSite {
                a_t: transposed(&a.to_dtype(keep)?.to_device(device)?)?,
                b_t: transposed(
                    &(b.to_dtype(DType::F32)? * scale)?
                        .to_dtype(keep)?
                        .to_device(device)?,
                )?,
                dora_scale: match dora_scale {
                    Some(s) => Some(s.to_device(device)?),
                    None => None,
                },
                dropout: None,
            });
        }
    }
    let fusion = match (&cfg.method, &adapter.fusion) {
        (Method::Fusion { .. }, Some(parts)) => {
            let file = adapter.fusion_weights_file().unwrap_or(path);
            bind_fusion(parts, &file, model, opts)?
        }
        _ => Vec::new(),
    };
    Ok(AdapterWeights {
        layers,
        ia3,
        prefix,
        soft_prompt,
        bottleneck,
        fusion,
    })
}

/// `model.layers.L.attention_adapters` / `.output_adapters` → (L, 0 | 1).
fn bn_place(module: &str, layers: usize) -> Option<(usize, usize)> {
    let (l, site) = module.strip_prefix("model.layers.")?.split_once('.')?;
    let at = match site {
        "attention_adapters" => 0,
        "output_adapters" => 1,
        _ => return None,
    };
    let l: usize = l.parse().ok()?;
    (l < layers).then_some((l, at))
}

/// The fused adapters bound (bottleneck adapters reading one input, all present at every place
/// the fusion has a layer) and each fusion layer checked and laid out.
fn bind_fusion(
    parts: &super::peft::FusionParts,
    path: &Path,
    model: &Llama,
    opts: &BindOptions,
) -> Result<Vec<[Option<FusionSite>; 2]>, AdapterError> {
    let bound = parts
        .adapters
        .iter()
        .map(|a| {
            if !matches!(a.config.method, Method::Bottleneck(_)) {
                return Err(AdapterError::config(
                    a.dir.join(super::peft::CONFIG_FILE),
                    "config",
                    "a fused adapter must be a bottleneck adapter",
                ));
            }
            bind(a, model, opts)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let h = model.config.hidden_size;
    let dtype = model.dtype();
    let mut out: Vec<[Option<FusionSite>; 2]> = (0..model.layers.len())
        .map(|_| Default::default())
        .collect();
    for (module, t) in &parts.layers {
        let err = |problem: String| AdapterError::Module {
            path: path.to_path_buf(),
            module: module.to_string(),
            problem,
        };
        let (layer, at) = bn_place(module, model.layers.len())
            .ok_or_else(|| err("the base model has no such adapter place".into()))?;
        if bound.iter().all(|w| w.bn_site(layer, at).is_none()) {
            // No fused adapter is here (AdapterHub's `leave_out`): the library adds the fusion
            // layer to every layer but skips those without its adapters, and so do we.
            continue;
        }
        let sites = bound
            .iter()
            .zip(&parts.adapters)
            .map(|(w, a)| {
                w.bn_site(layer, at).cloned().ok_or_else(|| {
                    err(format!(
                        "the fused adapter {} has no adapter here",
                        a.dir.display()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if sites
            .iter()
            .any(|s| s.input != sites[0].input || s.input == crate::model::BnInput::BeforeSublayer)
        {
            return Err(err("the fused adapters must be sequential bottleneck adapters of one kind (seq_bn or double_seq_bn)".into()));
        }
        let square = |name: &str, w: &Tensor| -> Result<Tensor, AdapterError> {
            if w.dims() != [h, h] {
                return Err(err(format!(
                    "fusion {name} is {:?}, expected [{h}, {h}]",
                    w.dims()
                )));
            }
            Ok(transposed(&w.to_dtype(dtype)?.to_device(model.device())?)?)
        };
        let bias = |name: &str, b: &Tensor| -> Result<Tensor, AdapterError> {
            if b.dims() != [h] {
                return Err(err(format!(
                    "fusion {name} bias is {:?}, expected [{h}]",
                    b.dims()
                )));
            }
            Ok(b.to_dtype(dtype)?.to_device(model.device())?)
        };
        out[layer][at] = Some(FusionSite {
            adapters: sites,
            query_t: square("query", &t.query_w)?,
            query_b: bias("query", &t.query_b)?,
            key_t: square("key", &t.key_w)?,
            key_b: bias("key", &t.key_b)?,
            value_t: match &t.value_w {
                Some(v) => Some(square("value", v)?),
                None => None,
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_parse() {
        assert_eq!(
            parse_module("model.layers.12.mlp.down_proj"),
            Some((12, Proj::Down))
        );
        assert_eq!(
            parse_module("model.layers.0.self_attn.k_proj"),
            Some((0, Proj::K))
        );
        assert_eq!(parse_module("model.layers.0.self_attn.rotary"), None);
        assert_eq!(parse_module("lm_head"), None);
    }
}
