//! Writing a model as a Hugging Face directory (`config.json`, `model.safetensors`, tokenizer
//! files) that this project and `transformers` both load.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use super::adapter_site::Proj;
use super::config::Family;
use super::error::ModelError;
use super::llama::Llama;
use super::loaded::LoadedModel;

fn write(path: &Path, text: String) -> Result<(), ModelError> {
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

/// The `config.json` transformers reads for this architecture.
pub fn hf_config_json(model: &Llama, loaded: &LoadedModel) -> serde_json::Value {
    let c = &model.config;
    let mut rope = json!({"rope_type": "default", "rope_theta": c.rope_theta});
    if let Some(s) = &c.rope_scaling {
        rope = json!({"rope_type": "llama3", "rope_theta": c.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings});
    }
    let family = c.arch.family;
    let class = match family {
        Family::Llama => "LlamaForCausalLM",
        Family::Mistral => "MistralForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
        Family::Qwen3 => "Qwen3ForCausalLM",
        Family::Gemma2 => "Gemma2ForCausalLM",
        Family::Gemma3 => "Gemma3ForCausalLM",
        Family::Phi3 => "Phi3ForCausalLM",
    };
    let mut config = json!({
        "architectures": [class],
        "model_type": family.model_type(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": if c.rope_scaling.is_some() { rope.clone() } else { serde_json::Value::Null },
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": loaded.eos_token_ids.first(),
        "torch_dtype": format!("{:?}", model.dtype()).to_lowercase().replace("f32", "float32").replace("bf16", "bfloat16").replace("f16", "float16"),
    });
    // The padding id as the source's config states it (Phi-3's config class defaults to 32000,
    // past a smaller vocabulary); none where it states none.
    let source = std::fs::read_to_string(loaded.path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    config["pad_token_id"] = source
        .as_ref()
        .and_then(|v| v.get("pad_token_id").cloned())
        .unwrap_or(serde_json::Value::Null);
    // The sliding windows as the family's config states them (transformers derives the rest).
    let window = c.arch.windows.iter().flatten().next().copied();
    if family != Family::Llama {
        config["sliding_window"] = json!(window);
    }
    if let Some(d) = c.arch.rotary_dim {
        let partial = d as f64 / c.head_dim as f64;
        config["partial_rotary_factor"] = json!(partial);
        config["rope_parameters"]["partial_rotary_factor"] = json!(partial);
    }
    if let Some(l) = &c.arch.longrope {
        let mut rope = json!({"rope_type": "longrope", "rope_theta": c.rope_theta,
            "short_factor": l.short, "long_factor": l.long,
            "original_max_position_embeddings": l.original_max,
            "attention_factor": l.attention_factor});
        if let Some(d) = c.arch.rotary_dim {
            rope["partial_rotary_factor"] = json!(d as f64 / c.head_dim as f64);
        }
        config["original_max_position_embeddings"] = json!(l.original_max);
        config["rope_parameters"] = rope.clone();
        config["rope_scaling"] = rope;
    }
    if family == Family::Gemma3 {
        let mut full = json!({"rope_type": "default", "rope_theta": c.rope_theta});
        if let Some(f) = c.arch.rope_linear {
            full = json!({"rope_type": "linear", "factor": f, "rope_theta": c.rope_theta});
        }
        let local = c.arch.local_rope_theta.unwrap_or(c.rope_theta);
        config["rope_parameters"] = json!({"full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local}});
        config
            .as_object_mut()
            .expect("object")
            .remove("rope_scaling");
    }
    if family.is_gemma() {
        let a = &c.arch;
        config["hidden_activation"] = json!("gelu_pytorch_tanh");
        config.as_object_mut().expect("object").remove("hidden_act");
        // An integer in transformers' config class (it refuses `24.0`).
        config["query_pre_attn_scalar"] = json!(a
            .attn_scale
            .map(|s| (1.0 / (s as f64 * s as f64)).round() as u64));
        config["attn_logit_softcapping"] = json!(a.attn_softcap);
        config["final_logit_softcapping"] = json!(a.final_softcap);
    }
    if matches!(family, Family::Qwen2 | Family::Qwen3) || family.is_gemma() {
        let types: Vec<&str> = (0..c.num_hidden_layers)
            .map(|l| match c.arch.window(l) {
                Some(_) => "sliding_attention",
                None => "full_attention",
            })
            .collect();
        if !family.is_gemma() {
            config["use_sliding_window"] = json!(window.is_some());
        }
        config["layer_types"] = json!(types);
        if let Some(first) = (0..c.num_hidden_layers).find(|&l| c.arch.window(l).is_some()) {
            config["max_window_layers"] = json!(first);
        }
    }
    config
}

/// Writes `model` (e.g. with an adapter merged in) with `loaded`'s tokenizer and template.
pub fn save_hf_dir(model: &Llama, loaded: &LoadedModel, dir: &Path) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        model.embed_tokens.dense()?,
    );
    // Norms as the family stores them (Gemma: `w`, applied as `1 + w`).
    let norm = |t: &Tensor| -> candle_core::Result<Tensor> {
        if model.config.arch.norm_plus_one {
            t - 1.0
        } else {
            Ok(t.clone())
        }
    };
    tensors.insert("model.norm.weight".into(), norm(&model.norm)?);
    if !model.config.tie_word_embeddings {
        tensors.insert("lm_head.weight".into(), model.lm_head.base().dense()?);
    }
    for (i, block) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        tensors.insert(
            format!("{p}.input_layernorm.weight"),
            norm(&block.input_layernorm)?,
        );
        match (&block.attn_out_norm, &block.mlp_out_norm) {
            (Some(attn_out), Some(mlp_out)) => {
                tensors.insert(
                    format!("{p}.pre_feedforward_layernorm.weight"),
                    norm(&block.post_attention_layernorm)?,
                );
                tensors.insert(
                    format!("{p}.post_attention_layernorm.weight"),
                    norm(attn_out)?,
                );
                tensors.insert(
                    format!("{p}.post_feedforward_layernorm.weight"),
                    norm(mlp_out)?,
                );
            }
            _ => {
                tensors.insert(
                    format!("{p}.post_attention_layernorm.weight"),
                    norm(&block.post_attention_layernorm)?,
                );
            }
        }
        if model.config.arch.fused {
            // Phi-3 stores q/k/v and gate/up fused.
            let dense = |p: Proj| model.linear(i, p).expect("layer exists").base().dense();
            let qkv = Tensor::cat(&[dense(Proj::Q)?, dense(Proj::K)?, dense(Proj::V)?], 0)?;
            let gate_up = Tensor::cat(&[dense(Proj::Gate)?, dense(Proj::Up)?], 0)?;
            tensors.insert(format!("{p}.self_attn.qkv_proj.weight"), qkv);
            tensors.insert(format!("{p}.mlp.gate_up_proj.weight"), gate_up);
        }
        for proj in Proj::ALL {
            if model.config.arch.fused
                && matches!(proj, Proj::Q | Proj::K | Proj::V | Proj::Gate | Proj::Up)
            {
                continue;
            }
            let linear = model.linear(i, proj).expect("layer exists");
            tensors.insert(
                format!("{p}.{}.weight", proj.module()),
                linear.base().dense()?,
            );
            if let Some(b) = linear.bias() {
                tensors.insert(format!("{p}.{}.bias", proj.module()), b.clone());
            }
        }
        for (name, norm) in [
            ("q_norm", &block.self_attn.q_norm),
            ("k_norm", &block.self_attn.k_norm),
        ] {
            if let Some(w) = norm {
                let w = if model.config.arch.norm_plus_one {
                    (w - 1.0)?
                } else {
                    w.clone()
                };
                tensors.insert(format!("{p}.self_attn.{name}.weight"), w);
            }
        }
    }
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let config = hf_config_json(model, loaded);
    write(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )?;
    loaded.tokenizer.save(&dir.join("tokenizer.json"))?;
    let tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": loaded.bos_token,
        "eos_token": loaded.eos_token,
        "chat_template": loaded.chat_template,
    });
    write(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc).expect("json"),
    )?;
    let gen =
        json!({"bos_token_id": model.config.bos_token_id, "eos_token_id": loaded.eos_token_ids});
    write(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gen).expect("json"),
    )
}
