//! Structured outputs on the tiny model: `response_format` (JSON object, JSON schema) and
//! `guided_regex` / `guided_choice` on chat and completions; bad constraints are a 400 naming
//! the field with the library's message; an answer cut by `max_tokens` ends with `length` and
//! its partial text; an adapter's `loraplex.json` default; and in one batch, constrained rows
//! leave the unconstrained rows' tokens exactly as they are alone.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::*;
use loraplex::adapters::{AdapterCache, CacheConfig};
use loraplex::engine::{
    Engine, GenerationConfig, KvConfig, SamplingParams, SchedulerConfig, ValidRequest,
};
use loraplex::guided::{Constraint, Guidance};
use loraplex::metrics::Metrics;
use loraplex::server::{router, AppState};
use serde_json::{json, Value};

async fn state(adapters: &std::path::Path) -> Arc<AppState> {
    let tiny = tiny_dir();
    common::http::state(&[
        "--model",
        tiny.to_str().unwrap(),
        "--adapters",
        adapters.to_str().unwrap(),
    ])
    .await
}

async fn post(app: &axum::Router, uri: &str, body: Value) -> (StatusCode, Value, String) {
    common::http::request(app, "POST", uri, Some(body), None).await
}

/// A chat answer under `extra` fields: its content and finish reason.
async fn chat(app: &axum::Router, content: &str, extra: Value) -> (String, String) {
    let mut body = json!({"messages": [{"role": "user", "content": content}], "max_tokens": 40, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v, text) = post(app, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        v["choices"][0]["finish_reason"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

#[tokio::test]
async fn constrained_answers_follow_their_constraint_and_bad_ones_are_named() {
    let st = state(&tiny_dir().join("adapters")).await;
    let app = router(st);
    let code = regex::Regex::new("^[0-9]{3}-[a-c]{2}$").unwrap();
    for prompt in ["hi", "Tell me about the sea.", "1 2 3"] {
        let (a, finish) = chat(
            &app,
            prompt,
            json!({"response_format": {"type": "json_object"}}),
        )
        .await;
        assert!(
            serde_json::from_str::<Value>(&a).unwrap().is_object(),
            "{a:?}"
        );
        assert_eq!(finish, "stop");
        let (a, finish) = chat(
            &app,
            prompt,
            json!({"guided_choice": ["yes", "no", "maybe"]}),
        )
        .await;
        assert!(["yes", "no", "maybe"].contains(&a.as_str()), "{a:?}");
        assert_eq!(finish, "stop");
        let (a, _) = chat(&app, prompt, json!({"guided_regex": "[0-9]{3}-[a-c]{2}"})).await;
        assert!(code.is_match(&a), "{a:?}");
        let schema = json!({"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["color", "n"], "additionalProperties": false});
        let (a, finish) = chat(
            &app,
            prompt,
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": true}}}),
        )
        .await;
        let v: Value = serde_json::from_str(&a).unwrap_or_else(|e| panic!("{a:?}: {e}"));
        assert!(
            ["red", "green"].contains(&v["color"].as_str().unwrap()),
            "{a}"
        );
        assert!((0..=9).contains(&v["n"].as_i64().unwrap()), "{a}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{a}");
        assert_eq!(finish, "stop");
    }
    // The body the official client's `chat.completions.parse(response_format=Person)` sends
    // (a Pydantic model's schema, `strict`).
    let person = json!({"properties": {"name": {"title": "Name", "type": "string", "maxLength": 8}, "age": {"title": "Age", "type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "title": "Person", "type": "object", "additionalProperties": false});
    let (a, _) = chat(
        &app,
        "Who is it?",
        json!({"max_tokens": 30, "response_format": {"type": "json_schema", "json_schema": {"name": "Person", "schema": person, "strict": true}}}),
    )
    .await;
    let v: Value = serde_json::from_str(&a).unwrap_or_else(|e| panic!("{a:?}: {e}"));
    assert!(v["name"].as_str().unwrap().chars().count() <= 8, "{a}");
    assert!((0..=120).contains(&v["age"].as_i64().unwrap()), "{a}");
    // Completions too.
    let (status, v, text) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "The answer is", "max_tokens": 8, "temperature": 0, "guided_choice": ["A", "B"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        ["A", "B"].contains(&v["choices"][0]["text"].as_str().unwrap()),
        "{text}"
    );
    // Not satisfiable within max_tokens: `length`, with the partial text.
    let long = json!({"type": "object", "properties": {"story": {"type": "string", "minLength": 200}}, "required": ["story"]});
    let (a, finish) = chat(
        &app,
        "hi",
        json!({"max_tokens": 5, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": long}}}),
    )
    .await;
    assert_eq!(finish, "length");
    assert!(a.starts_with('{') && !a.is_empty(), "{a:?}");
    // Bad constraints: a 400 naming the field, with the library's word on it.
    for (extra, param, says) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}),
            "response_format.json_schema.schema",
            "strin",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {"type": "object"}}}}}),
            "response_format.json_schema.schema",
            "Unimplemented keys",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
            "missing",
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format.type",
            "json_schema",
        ),
        (
            json!({"guided_regex": "(unclosed"}),
            "guided_regex",
            "unclosed",
        ),
        (json!({"guided_choice": []}), "guided_choice", "no choices"),
        (
            json!({"guided_choice": ["a"], "guided_regex": "b"}),
            "guided_choice",
            "cannot both",
        ),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v, text) = post(&app, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(v["error"]["param"], param, "{text}");
        assert!(text.contains(says), "{text}");
    }
}

/// An adapter's `loraplex.json` sets its default `response_format`; a request's own
/// `response_format` (even `text`) overrides it.
#[tokio::test]
async fn an_adapter_can_declare_its_response_format() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("json-lora");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(tiny_dir().join("adapters/lora-r4-qv").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("loraplex.json"),
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "y", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}}}}).to_string(),
    )
    .unwrap();
    let app = router(state(tmp.path()).await);
    for prompt in ["hi", "Say something long.", "What is 2 + 2?"] {
        let (a, _) = chat(&app, prompt, json!({"model": "json-lora"})).await;
        let v: Value = serde_json::from_str(&a).unwrap_or_else(|e| panic!("{a:?}: {e}"));
        assert!(v["ok"].is_boolean(), "{a}");
    }
    let (a, _) = chat(
        &app,
        "Say something long.",
        json!({"model": "json-lora", "response_format": {"type": "text"}, "max_tokens": 12}),
    )
    .await;
    assert!(serde_json::from_str::<Value>(&a).is_err(), "{a:?}");
}

/// One batch of rows under different adapters, some constrained: the unconstrained rows give
/// exactly the tokens they give alone (and the constrained ones what they give alone).
#[test]
fn constrained_rows_leave_the_others_as_they_are() {
    let model = Arc::new(load_tiny());
    let cache = AdapterCache::new(CacheConfig::default());
    let lease = |name: &str| lease(&cache, &model, name, name, 1);
    let template =
        loraplex::chat::ChatTemplate::select(None, model.chat_template.as_deref()).unwrap();
    let eos = model.stop_token_ids(&template);
    let guidance = Guidance::new(&model.tokenizer, eos[0]).unwrap();
    let rows: Vec<(Vec<u32>, Option<&str>, Option<Constraint>)> = vec![
        (vec![5, 6, 7, 8], Some("lora-r4-qv"), None),
        (
            vec![9, 10, 11],
            Some("dora-r8-all"),
            Some(Constraint::JsonObject),
        ),
        (vec![12, 13], None, None),
        (
            vec![14, 15, 16, 17, 18],
            Some("lora-r8-all"),
            Some(Constraint::Choice(vec!["yes".into(), "no".into()])),
        ),
        (vec![19, 20, 21], Some("dora-r8-all"), None),
        (
            vec![22, 23],
            None,
            Some(Constraint::Regex("[a-z]{4}".into())),
        ),
    ];
    let request = |(prompt, adapter, constraint): &(Vec<u32>, Option<&str>, Option<Constraint>)| {
        ValidRequest {
            prompt: prompt.clone(),
            config: GenerationConfig {
                max_tokens: 10,
                eos_token_ids: eos.clone(),
                sampling: SamplingParams::greedy(),
                guide: constraint.as_ref().map(|c| guidance.compile(c).unwrap()),
                ..Default::default()
            },
            logprobs: None,
            adapter: adapter.map(lease),
            adapter_label: None,
            adapter_name: None,
            tenant: None,
            class: Default::default(),
        }
    };
    let run = |batch: Vec<ValidRequest>| -> Vec<Vec<u32>> {
        let (engine, mut worker) = Engine::manual(
            model.clone(),
            SchedulerConfig {
                max_running: 8,
                kv_cache_tokens: 2048,
                max_queue: 16,
                max_queue_per_tenant: 16,
                max_batched_tokens: 256,
                fair_lag_tokens: 256,
            },
            KvConfig::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let rxs: Vec<_> = batch
            .into_iter()
            .map(|r| engine.submit(r).unwrap())
            .collect();
        drive(&mut worker, rxs)
            .into_iter()
            .map(Result::unwrap)
            .collect()
    };
    let together = run(rows.iter().map(request).collect());
    for (i, row) in rows.iter().enumerate() {
        let alone = run(vec![request(row)]).remove(0);
        assert_eq!(together[i], alone, "row {i} ({:?})", row.2);
        assert!(!alone.is_empty());
    }
    let text = |t: &[u32]| {
        let ids: Vec<u32> = t.iter().copied().filter(|x| !eos.contains(x)).collect();
        model.tokenizer.decode(&ids, false).unwrap()
    };
    assert!(["yes", "no"].contains(&text(&together[3]).as_str()));
    assert!(regex::Regex::new("^[a-z]{4}$")
        .unwrap()
        .is_match(&text(&together[5])));
}
