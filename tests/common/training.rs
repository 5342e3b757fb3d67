//! Training helpers shared by the training tests: the tiny model's data sets and configs.

use std::path::{Path, PathBuf};

use loraplex::chat::ChatTemplate;
use loraplex::model::{LoadedModel, Proj};
use loraplex::train::dataset::Tokenization;
use loraplex::train::optim::Schedule;
use loraplex::train::trainable::TrainSpec;
use loraplex::train::{Dataset, Format, Method, TrainConfig};

pub fn tok<'a>(
    m: &'a LoadedModel,
    template: &'a ChatTemplate,
    special: &'a loraplex::chat::SpecialTokens,
    max: usize,
) -> Tokenization<'a> {
    Tokenization {
        tokenizer: &m.tokenizer,
        template,
        special,
        eos: 2,
        max_seq_len: max,
        format: Format::Auto,
    }
}

pub fn write_data(dir: &Path, lines: &[String]) -> PathBuf {
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

pub fn small_dataset(m: &LoadedModel, dir: &Path) -> Dataset {
    let colors = ["red", "green", "blue", "black", "white", "pink"];
    let lines: Vec<String> = (0..24)
        .map(|i| {
            let c = colors[i % colors.len()];
            match i % 3 {
                0 => serde_json::json!({"prompt": format!("color {i}: "), "completion": format!("the {c} one")}).to_string(),
                1 => serde_json::json!({"messages": [{"role": "user", "content": format!("pick {i}")}, {"role": "assistant", "content": format!("the {c} one")}]}).to_string(),
                _ => serde_json::json!({"instruction": format!("name color {i}"), "output": format!("the {c} one")}).to_string(),
            }
        })
        .collect();
    let path = write_data(dir, &lines);
    let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
    let special = m.special_tokens();
    Dataset::load(&path, &tok(m, &template, &special, 64), false).unwrap()
}

/// Prompts that all want one answer: what a soft prompt can learn (it steers the model; it
/// cannot teach a random two-layer model `small_dataset`'s number → color mapping).
pub fn steering_dataset(m: &LoadedModel, dir: &Path) -> Dataset {
    let lines: Vec<String> = (0..24)
        .map(|i| {
            serde_json::json!({"prompt": format!("question {i}: "), "completion": "the red one"})
                .to_string()
        })
        .collect();
    let path = write_data(dir, &lines);
    let template = ChatTemplate::select(None, m.chat_template.as_deref()).unwrap();
    let special = m.special_tokens();
    Dataset::load(&path, &tok(m, &template, &special, 64), false).unwrap()
}

pub fn spec(method: Method, dropout: f32) -> TrainSpec {
    TrainSpec {
        method,
        rank: 4,
        alpha: 8.0,
        dropout,
        targets: Proj::ALL.to_vec(),
        rslora: false,
        seed: 11,
        base_model: "tiny-llama".into(),
        virtual_tokens: 6,
        reduction_factor: 0,
        prefix_projection: None,
        fuse: Vec::new(),
    }
}

pub fn config(output: PathBuf, method: Method, steps: usize) -> TrainConfig {
    TrainConfig {
        output,
        overwrite: false,
        resume: false,
        spec: spec(method, 0.05),
        lr: 5e-3,
        weight_decay: 0.01,
        betas: (0.9, 0.999),
        schedule: Schedule::Cosine,
        warmup_ratio: 0.03,
        batch_size: 4,
        grad_accum: 2,
        max_grad_norm: 1.0,
        epochs: 1,
        max_steps: Some(steps),
        save_steps: 5,
        progress: false,
        args: serde_json::json!({"test": true}),
        interrupt_after: None,
        cancel: None,
        on_step: None,
        epoch_checkpoints: None,
        max_batch_tokens: None,
        checkpoint_activations: false,
        keep_checkpoint: false,
        keep_epoch_checkpoints: None,
        progress_every: std::time::Duration::from_secs(10),
    }
}
