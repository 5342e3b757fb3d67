//! The exact micro-batches `serve train` feeds, for a peer trainer to replay: tokenizes a data
//! file as `serve train` does (the default model's tokenizer and chat template, `--max-seq-len`
//! 512) and writes, per step, the examples of that step in `serve train`'s order (seeded per
//! epoch) as JSON lines `{"step", "examples": [{"ids", "labels"}]}`, `labels[t]` the target
//! after position t or null. Used by `benches/train_peer.sh`.
//!
//! ```sh
//! cargo run --release --example train_peer_batches -- DATA.jsonl STEPS BATCH SEED > batches.jsonl
//! ```

use loraplex::chat::ChatTemplate;
use loraplex::model::source::SourceConfig;
use loraplex::model::{load_model, ModelOptions, ModelSource};
use loraplex::train::dataset::{Dataset, Format, Tokenization};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let data = std::path::PathBuf::from(&args[0]);
    let steps: usize = args[1].parse().unwrap();
    let batch: usize = args[2].parse().unwrap();
    let seed: u64 = args[3].parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resolved = rt
        .block_on(
            ModelSource::parse(None)
                .unwrap()
                .resolve(&SourceConfig::from_env()),
        )
        .unwrap();
    let loaded = load_model(&resolved, &ModelOptions::default()).unwrap();
    let template = ChatTemplate::select(None, loaded.chat_template.as_deref()).unwrap();
    let special = loaded.special_tokens();
    let eos = loaded.stop_token_ids(&template)[0];
    let tok = Tokenization {
        tokenizer: &loaded.tokenizer,
        template: &template,
        special: &special,
        eos,
        max_seq_len: 512,
        format: Format::Auto,
    };
    let ds = Dataset::load(&data, &tok, false).unwrap();
    let per_epoch = ds.examples.len().div_ceil(batch);
    for step in 0..steps {
        let (epoch, i) = (step / per_epoch, step % per_epoch);
        let order = ds.order(epoch, seed);
        let examples: Vec<serde_json::Value> = order[i * batch..((i + 1) * batch).min(order.len())]
            .iter()
            .map(|&j| {
                let e = &ds.examples[j];
                serde_json::json!({"ids": e.ids, "labels": e.labels})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"step": step, "examples": examples})
        );
    }
}
