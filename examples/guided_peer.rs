//! The two maintained constrained-decoding libraries on the default model's tokenizer (49,152
//! tokens), for the json-extract schema: compile time, and the mask per token along a real
//! answer — llguidance (what the server uses) vs outlines-core (a dev-dependency, here only).
//! The same token bytes feed both (llguidance's reading of tokenizer.json).
//!
//! `cargo run --release --example guided_peer`

use std::time::Instant;

use loraplex::guided::{Constraint, Guidance};
use loraplex::model::source::SourceConfig;
use loraplex::model::{load_model, ModelOptions, ModelSource};

fn quantiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p) as usize];
    (q(0.5), q(0.99))
}

#[tokio::main]
async fn main() {
    let resolved = ModelSource::parse(None)
        .unwrap()
        .resolve(&SourceConfig::from_env())
        .await
        .unwrap();
    let loaded = load_model(
        &resolved,
        &ModelOptions {
            native_quant: true,
            ..Default::default()
        },
    )
    .unwrap();
    let template =
        loraplex::chat::ChatTemplate::select(None, loaded.chat_template.as_deref()).unwrap();
    let eos = loaded.stop_token_ids(&template)[0];
    let schema = r#"{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}, "required": ["name", "age", "city"], "additionalProperties": false}"#;
    let answer = loaded
        .tokenizer
        .encode_plain(r#"{"name": "Kofi", "age": 64, "city": "Bilbao"}"#)
        .unwrap();
    let vocab = loaded.model.config.vocab_size;

    // llguidance.
    let t = Instant::now();
    let guidance = Guidance::new(&loaded.tokenizer, eos).unwrap();
    let llg_setup = t.elapsed().as_secs_f64() * 1e3;
    let mut llg_compile = Vec::new();
    let mut llg_mask = Vec::new();
    for run in 0..5 {
        // A schema text not seen before (the cache would answer otherwise).
        let text = schema.replace("\"name\"", &format!("\"name{run}\""));
        let answer = loaded
            .tokenizer
            .encode_plain(&format!(
                r#"{{"name{run}": "Kofi", "age": 64, "city": "Bilbao"}}"#
            ))
            .unwrap();
        let t = Instant::now();
        let mut g = guidance.compile(&Constraint::JsonSchema(text)).unwrap();
        llg_compile.push(t.elapsed().as_secs_f64() * 1e3);
        let mut logits = vec![0f32; vocab];
        for &tok in &answer {
            logits.fill(0.0);
            g.mask(&mut logits, &[eos]).unwrap();
            assert!(
                logits[tok as usize].is_finite(),
                "llguidance refused token {tok}"
            );
            g.commit(tok).unwrap();
        }
        // The computation's own time (after a commit it runs on the pool, off this thread).
        llg_mask.extend(g.mask_nanos.iter().map(|&n| n as f64 / 1e3));
    }

    // outlines-core on the same token bytes.
    let json: serde_json::Value =
        serde_json::from_str(&loaded.tokenizer.to_json().unwrap()).unwrap();
    let bytes = llguidance::token_bytes_from_tokenizer_json(&json).unwrap();
    let t = Instant::now();
    let mut v = outlines_core::vocabulary::Vocabulary::new(eos);
    for (id, b) in bytes.iter().enumerate() {
        // Special tokens (marked 0xFF by llguidance) are not text.
        if id as u32 != eos && !b.is_empty() && b[0] != 0xFF {
            let _ = v.try_insert(b.clone(), id as u32);
        }
    }
    let oc_setup = t.elapsed().as_secs_f64() * 1e3;
    let regex = outlines_core::json_schema::regex_from_str(schema, Some(r"[ ]?"), None).unwrap();
    let mut oc_compile = Vec::new();
    let mut oc_mask = Vec::new();
    for _ in 0..2 {
        let t = Instant::now();
        let index = outlines_core::index::Index::new(&regex, &v).unwrap();
        oc_compile.push(t.elapsed().as_secs_f64() * 1e3);
        let mut state = index.initial_state();
        let mut logits = vec![0f32; vocab];
        for &tok in &answer {
            let t = Instant::now();
            logits.fill(f32::NEG_INFINITY);
            for &a in index.allowed_tokens_iter(&state).unwrap() {
                logits[a as usize] = 0.0;
            }
            oc_mask.push(t.elapsed().as_secs_f64() * 1e6);
            state = index
                .next_state(&state, &tok)
                .unwrap_or_else(|| panic!("outlines-core refused token {tok}"));
        }
    }
    let (lp50, lp99) = quantiles(llg_mask);
    let (op50, op99) = quantiles(oc_mask);
    println!("| | llguidance | outlines-core |\n|---|---|---|");
    println!("| set-up for the tokenizer | {llg_setup:.0} ms | {oc_setup:.0} ms |");
    println!(
        "| compile the json-extract schema | {:.1} ms (median of 5) | {:.0} ms (median of 2) |",
        quantiles(llg_compile).0,
        quantiles(oc_compile).0
    );
    println!("| mask per token, p50 / p99 | {lp50:.1} / {lp99:.1} µs | {op50:.1} / {op99:.1} µs |");
}
