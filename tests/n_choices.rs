//! `n` choices per request on the default model (served as stored, whose numbers do not depend
//! on the batch): greedy choices are identical; seeded ones differ from each other and repeat
//! exactly; the prompt is prefilled once (the other choices take its full KV blocks from the
//! prefix cache, as `loraplex_prefix_cache_hits_total` shows); usage counts the prompt once;
//! streams interleave the choices by index.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use loraplex::server::{router, AppState};
use serde_json::{json, Value};

async fn state() -> Arc<AppState> {
    let tmp = std::env::temp_dir().join(format!("loraplex-n-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    common::http::state(&[
        "--adapters",
        tmp.to_str().unwrap(),
        "--kv-cache-tokens",
        "4096",
    ])
    .await
}

async fn send(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, String) {
    let (status, _, text) = common::http::request(app, method, uri, body, None).await;
    (status, text)
}

fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .unwrap_or(0.0)
}

fn contents(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["message"]["content"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_share_the_prefill_and_greedy_ones_agree() {
    let app = router(state().await);
    let messages = json!([
        {"role": "system", "content": "You are a helpful assistant who answers questions about the weather, the sea and ships, in two sentences at most, politely and plainly."},
        {"role": "user", "content": "What should a sailor do when fog comes in?"}
    ]);
    let (status, text) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(json!({"messages": messages, "max_tokens": 16, "temperature": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let one: Value = serde_json::from_str(&text).unwrap();
    let prompt_tokens = one["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert!(prompt_tokens >= 48, "{prompt_tokens}");
    let (_, before) = send(&app, "GET", "/metrics", None).await;
    // Greedy, n = 4: four identical choices, the prompt counted once.
    let (status, text) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(json!({"messages": messages, "max_tokens": 16, "temperature": 0, "n": 4})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let four: Value = serde_json::from_str(&text).unwrap();
    let c = contents(&four);
    assert_eq!(c.len(), 4);
    assert!(c.iter().all(|x| x == &c[0]), "{c:?}");
    assert_eq!(
        c[0],
        one["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(four["usage"]["prompt_tokens"], prompt_tokens);
    let completion: u64 = 4 * one["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(four["usage"]["completion_tokens"], completion);
    // Prefilled once: each later choice found every full block of the prompt cached (the first
    // choice did too, from the n = 1 request before).
    let (_, after) = send(&app, "GET", "/metrics", None).await;
    let hits = counter(&after, "loraplex_prefix_cache_hits_total")
        - counter(&before, "loraplex_prefix_cache_hits_total");
    let full = (prompt_tokens - 1) / 16 * 16;
    assert_eq!(hits as usize, 4 * full, "prompt {prompt_tokens} tokens");
    // Seeded: the choices differ, and the same request gives the same four again.
    let seeded =
        json!({"messages": messages, "max_tokens": 12, "temperature": 1.0, "seed": 11, "n": 4});
    let (_, a) = send(&app, "POST", "/v1/chat/completions", Some(seeded.clone())).await;
    let (_, b) = send(&app, "POST", "/v1/chat/completions", Some(seeded)).await;
    let (a, b) = (
        contents(&serde_json::from_str(&a).unwrap()),
        contents(&serde_json::from_str(&b).unwrap()),
    );
    assert_eq!(a, b);
    let distinct: std::collections::HashSet<_> = a.iter().collect();
    assert!(distinct.len() >= 3, "{a:?}");
    // Streamed: chunks of both indexes, one finish each, usage once, one [DONE].
    let (status, text) = send(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(json!({"messages": messages, "max_tokens": 6, "temperature": 0, "n": 2, "stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let mut per = [String::new(), String::new()];
    let (mut finishes, mut usage, mut done) = ([0, 0], 0, 0);
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            done += 1;
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        if v["usage"].is_object() {
            usage += 1;
            assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
        }
        for ch in v["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            per[i].push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            if ch["finish_reason"].is_string() {
                finishes[i] += 1;
            }
        }
    }
    assert_eq!((finishes, usage, done), ([1, 1], 1, 1), "{text}");
    assert_eq!(per[0], per[1]);
    assert!(c[0].starts_with(&per[0]), "{per:?} vs {c:?}");
}
