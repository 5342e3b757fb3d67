//! Rate limits, priorities and usage accounting through the router on the tiny model: 429
//! bodies and headers in OpenAI's shapes (the `openai` client's own check is in
//! deploy/openai_client_check.py), `x-ratelimit-*` on success, one tenant's limits never
//! touching another's; usage totals equal the `usage` the clients were given; a tenant reads
//! only its own usage; the totals survive a restart; priorities within what a key may ask.

mod common;

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use common::*;
use http_body_util::BodyExt;
use loraplex::server::{router, AppState};
use serde_json::{json, Value};
use tower::ServiceExt;

const KEYS: &str = r#"
[keys."sk-acme"]
tenant = "acme"
requests_per_minute = 3
tokens_per_minute = 100

[keys."sk-globex"]
tenant = "globex"
weight = 2

[keys."sk-busy"]
tenant = "busy"
max_concurrent_requests = 1

[keys."sk-gw"]
tenant = "globex"
min_priority = -5

[keys."sk-root"]
tenant = "ops"
admin = true
"#;

async fn server(dir: &Path) -> Arc<AppState> {
    let keys = dir.join("keys.toml");
    std::fs::write(&keys, KEYS).unwrap();
    let tiny = tiny_dir();
    let state = dir.join("state");
    let args = [
        "serve",
        "--model",
        tiny.to_str().unwrap(),
        "--api-keys",
        keys.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let cli = loraplex::cli::Cli::try_parse_from(args).unwrap();
    loraplex::cli::build_state(&cli.serve).await.unwrap()
}

struct Resp {
    status: StatusCode,
    json: Value,
    text: String,
    headers: axum::http::HeaderMap,
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    key: &str,
    extra: &[(&str, &str)],
) -> Resp {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"));
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let body = body
        .map(|b| Body::from(b.to_string()))
        .unwrap_or_else(Body::empty);
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    Resp {
        status,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
        headers,
    }
}

fn header<'a>(r: &'a Resp, name: &str) -> &'a str {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("no `{name}` header: {:?}", r.headers))
        .to_str()
        .unwrap()
}

fn chat(max_tokens: u32) -> Value {
    json!({"messages": [{"role": "user", "content": "the model learns"}], "max_tokens": max_tokens,
           "temperature": 0, "ignore_eos": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_429_in_openais_shape_and_report_standing_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let app = router(server(dir.path()).await);
    // Success: the limits and what is left, OpenAI's headers.
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat(5)),
        "sk-acme",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "2");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "100");
    let used = r.json["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        (100 - used).to_string()
    );
    for h in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        let v = header(&r, h);
        assert!(v.ends_with('s'), "{h}: {v}");
    }
    // A request larger than the whole minute's tokens: 429 naming the limit, never servable.
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat(90)),
        "sk-acme",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.json["error"]["code"], "rate_limit_exceeded");
    assert_eq!(r.json["error"]["type"], "tokens");
    let m = r.json["error"]["message"].as_str().unwrap();
    assert!(m.contains("tokens per minute (TPM): limit 100"), "{m}");
    // Requests per minute: the third is let in, the fourth not.
    for _ in 0..2 {
        let r = call(
            &app,
            "POST",
            "/v1/chat/completions",
            Some(chat(2)),
            "sk-acme",
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat(2)),
        "sk-acme",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        r.json,
        json!({"error": {"message": r.json["error"]["message"], "type": "requests", "param": null,
                         "code": "rate_limit_exceeded"}})
    );
    assert!(r.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("requests per minute (RPM): limit 3"));
    let after: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&after), "{after}");
    assert_eq!(header(&r, "retry-after-ms"), (after * 1000).to_string());
    // Another tenant is untouched, and a tenant without limits gets no rate headers.
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat(2)),
        "sk-globex",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get("x-ratelimit-limit-requests").is_none());
    // Streams count as they go: a second concurrent request of `busy` is refused while the
    // first streams, and let in once it has ended.
    let mut body = chat(40);
    body["stream"] = json!(true);
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-busy")
        .body(Body::from(body.to_string()))
        .unwrap();
    let first = app.clone().oneshot(req).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat(2)),
        "sk-busy",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.json["error"]["type"], "requests");
    assert!(
        r.text.contains("concurrent requests: limit 1"),
        "{}",
        r.text
    );
    let _ = first.into_body().collect().await.unwrap();
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat(2)),
        "sk-busy",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_are_bounded_by_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let app = router(server(dir.path()).await);
    let mut urgent = chat(2);
    urgent["priority"] = json!(-1);
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(urgent.clone()),
        "sk-globex",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json["error"]["param"], "priority");
    assert!(r.text.contains("min_priority"), "{}", r.text);
    // Deferring one's own request is always allowed; the gateway's key may ask for -5..
    let mut later = chat(2);
    later["priority"] = json!(7);
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(later),
        "sk-globex",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(urgent),
        "sk-gw",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let hdr = [("x-loraplex-priority", "-5")];
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat(2)),
        "sk-gw",
        &hdr,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let hdr = [("x-loraplex-priority", "-6")];
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat(2)),
        "sk-gw",
        &hdr,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json["error"]["param"], "x-loraplex-priority");
    let hdr = [("x-loraplex-priority", "soon")];
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat(2)),
        "sk-gw",
        &hdr,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let mut huge = chat(2);
    huge["priority"] = json!(1u64 << 40);
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(huge),
        "sk-root",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json["error"]["param"], "priority");
}

/// Sums the `usage` of a plain or streamed (include_usage) response.
fn usage_of(r: &Resp, streamed: bool) -> (u64, u64, u64) {
    let u = if streamed {
        r.text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| v.get("usage").cloned())
            .expect("a usage chunk")
    } else {
        r.json["usage"].clone()
    };
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_equal_what_clients_were_told_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let st = server(dir.path()).await;
    let app = router(st.clone());
    let mut told: std::collections::HashMap<&str, (u64, u64, u64, u64)> = Default::default();
    let bodies = [
        (chat(5), false),
        (chat(7), true),
        (
            json!({"messages": [{"role": "user", "content": "two choices"}], "max_tokens": 4,
                   "n": 2, "temperature": 0.8, "seed": 3, "ignore_eos": true}),
            false,
        ),
        (
            json!({"prompt": "the model", "max_tokens": 3, "stream": true,
                   "stream_options": {"include_usage": true}}),
            true,
        ),
    ];
    for (key, tenant) in [("sk-globex", "globex"), ("sk-root", "ops")] {
        for (body, streamed) in &bodies {
            let mut body = body.clone();
            if *streamed && body.get("messages").is_some() {
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            let path = if body.get("prompt").is_some() {
                "/v1/completions"
            } else {
                "/v1/chat/completions"
            };
            let r = call(&app, "POST", path, Some(body), key, &[]).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let (p, c, cached) = usage_of(&r, *streamed);
            let t = told.entry(tenant).or_default();
            *t = (t.0 + p, t.1 + c, t.2 + cached, t.3 + 1);
        }
    }
    // A refused request is not usage.
    let r = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat(90)),
        "sk-acme",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let totals = |v: &Value, tenant: &str| {
        let mut t = (0, 0, 0, 0);
        for row in v["data"].as_array().unwrap() {
            if row["tenant"] == tenant {
                t.0 += row["prompt_tokens"].as_u64().unwrap();
                t.1 += row["completion_tokens"].as_u64().unwrap();
                t.2 += row["cached_tokens"].as_u64().unwrap();
                t.3 += row["requests"].as_u64().unwrap();
            }
        }
        t
    };
    let mine = call(&app, "GET", "/v1/usage", None, "sk-globex", &[]).await;
    assert_eq!(mine.status, StatusCode::OK, "{}", mine.text);
    assert_eq!(totals(&mine.json, "globex"), told["globex"]);
    assert!(
        told["globex"].2 > 0,
        "the repeated prompts hit the prefix cache"
    );
    assert!(mine.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["tenant"] == "globex"));
    // Another tenant's usage: refused whatever the name, and nothing of it shows.
    for other in ["ops", "acme", "nobody"] {
        let r = call(
            &app,
            "GET",
            &format!("/v1/usage?tenant={other}"),
            None,
            "sk-globex",
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{other}");
        assert!(!r.text.contains("prompt_tokens"));
    }
    let all = call(&app, "GET", "/v1/usage", None, "sk-root", &[]).await;
    assert_eq!(totals(&all.json, "ops"), told["ops"]);
    assert_eq!(totals(&all.json, "globex"), told["globex"]);
    let later = call(
        &app,
        "GET",
        "/v1/usage?start=4000000000",
        None,
        "sk-root",
        &[],
    )
    .await;
    assert_eq!(later.json["data"], json!([]));
    let bad = call(
        &app,
        "GET",
        "/v1/usage?start=10&end=5",
        None,
        "sk-root",
        &[],
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    // The admin-only metrics carry the same totals, labelled by tenant and adapter.
    let metrics = call(&app, "GET", "/metrics", None, "sk-root", &[]).await;
    let line = format!(
        "loraplex_usage_requests_total{{adapter=\"\",tenant=\"globex\"}} {}",
        told["globex"].3
    );
    assert!(metrics.text.contains(&line), "{}", metrics.text);
    // Restart: what was flushed comes back.
    st.usage.flush(loraplex::server::state::unix_now()).unwrap();
    drop(app);
    let st2 = server(dir.path()).await;
    let app = router(st2);
    let again = call(&app, "GET", "/v1/usage", None, "sk-root", &[]).await;
    assert_eq!(totals(&again.json, "globex"), told["globex"]);
    assert_eq!(totals(&again.json, "ops"), told["ops"]);
}
