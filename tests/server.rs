//! The HTTP server on the tiny model, through `Router::oneshot` (and a loopback socket where a
//! real connection matters).

mod common;

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use common::http::{chat_body, wait_until};
use common::*;
use http_body_util::BodyExt;
use loraplex::server::{router, AppState};
use serde_json::{json, Value};
use tower::ServiceExt;

async fn state(extra: &[&str]) -> Arc<AppState> {
    let tiny = tiny_dir();
    let adapters = tiny.join("adapters");
    let mut args = vec!["serve", "--model", tiny.to_str().unwrap()];
    if !extra.contains(&"--adapters") {
        args.extend_from_slice(&["--adapters", adapters.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    let cli = loraplex::cli::Cli::try_parse_from(args).unwrap();
    loraplex::cli::build_state(&cli.serve).await.unwrap()
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, Value, String) {
    common::http::request(app, method, uri, body, key).await
}

/// Concatenated `delta.content` of an SSE body, its finish_reason and usage chunk.
fn parse_sse(text: &str) -> (String, Option<String>, Option<Value>) {
    let mut content = String::new();
    let (mut finish, mut usage) = (None, None);
    let mut done = false;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(u) = v.get("usage") {
            usage = Some(u.clone());
        }
        if let Some(c) = v["choices"].get(0) {
            content.push_str(
                c["delta"]["content"]
                    .as_str()
                    .or(c["text"].as_str())
                    .unwrap_or(""),
            );
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    assert!(done, "stream must end with [DONE]: {text}");
    (content, finish, usage)
}

#[tokio::test]
async fn streamed_and_plain_chat_agree_and_usage_is_right() {
    let st = state(&[]).await;
    let app = router(st.clone());
    let body = chat_body(Some("dora-r8-all"), "the model learns", 12);
    let (status, plain, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(body.clone()),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    let text = plain["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["model"], "dora-r8-all");
    let usage = &plain["usage"];
    let prompt_ids = st
        .engine
        .model()
        .tokenizer
        .encode("<|im_start|>user\nthe model learns<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    assert_eq!(usage["prompt_tokens"], prompt_ids.len());
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion));
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        prompt_ids.len() as u64 + completion
    );

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let (status, _, sse) = call(&app, "POST", "/v1/chat/completions", Some(sbody), None).await;
    assert_eq!(status, StatusCode::OK);
    let (streamed, finish, susage) = parse_sse(&sse);
    assert_eq!(streamed, text);
    assert_eq!(
        finish.as_deref(),
        plain["choices"][0]["finish_reason"].as_str()
    );
    // The same usage; the second time the prompt's first whole block (16 positions) came from
    // the prefix cache.
    let mut susage = susage.unwrap();
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(susage["prompt_tokens_details"]["cached_tokens"], 16);
    susage["prompt_tokens_details"]["cached_tokens"] = json!(0);
    assert_eq!(susage, *usage);

    // Completions endpoint, streamed and not, with logprobs.
    let cbody = json!({"prompt": "the model", "max_tokens": 6, "temperature": 0, "logprobs": 2, "adapter": "lora-r4-qv"});
    let (status, c, _) = call(&app, "POST", "/v1/completions", Some(cbody.clone()), None).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    let lp = &c["choices"][0]["logprobs"];
    assert_eq!(
        lp["tokens"].as_array().unwrap().len(),
        c["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);
    let mut cs = cbody.clone();
    cs["stream"] = json!(true);
    let (_, _, sse) = call(&app, "POST", "/v1/completions", Some(cs), None).await;
    assert_eq!(parse_sse(&sse).0, c["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn sixteen_concurrent_requests_over_four_adapters_equal_each_alone() {
    sixteen_concurrent_equal_alone(&[]).await;
}

/// The same with a step budget of 5 tokens: prompts are fed in chunks of a few tokens next to
/// running streams, and every answer is still the one it gets alone without chunks (and
/// without the prefix cache).
#[tokio::test]
async fn chunked_prefill_changes_no_answer() {
    sixteen_concurrent_equal_alone(&["--max-batched-tokens", "5"]).await;
}

async fn sixteen_concurrent_equal_alone(extra: &[&str]) {
    let unchunked = state(&["--max-batched-tokens", "0", "--no-prefix-cache"]).await;
    let st = state(extra).await;
    let app = router(st.clone());
    let reference = router(unchunked);
    let adapters = [
        None,
        Some("lora-r8-all"),
        Some("lora-r4-qv"),
        Some("rslora-r16-pattern"),
        Some("dora-r8-all"),
    ];
    let reqs: Vec<Value> = (0..16)
        .map(|i| {
            chat_body(
                adapters[i % 5],
                // A shared lead: with the prefix cache on, later requests of an adapter reuse
                // the KV of the earlier ones' first blocks.
                &format!(
                    "Please answer briefly and kindly, and think about the question first: \
                     request number {i} learns"
                ),
                10 + (i as u32 % 4) * 3,
            )
        })
        .collect();
    let mut alone = Vec::new();
    for r in &reqs {
        let (s, v, _) = call(
            &reference,
            "POST",
            "/v1/chat/completions",
            Some(r.clone()),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        alone.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // One request per adapter first, so the concurrent ones find cached prefixes.
    for (i, r) in reqs.iter().enumerate().take(5) {
        let (s, v, _) = call(&app, "POST", "/v1/chat/completions", Some(r.clone()), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"], alone[i],
            "request {i}"
        );
    }
    let hits_before = st.metrics.prefix_cache_hits.get();
    let handles: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| {
            let app = app.clone();
            tokio::spawn(
                async move { call(&app, "POST", "/v1/chat/completions", Some(r), None).await },
            )
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (s, v, _) = h.await.unwrap();
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            v["choices"][0]["message"]["content"].as_str().unwrap(),
            alone[i],
            "request {i}"
        );
    }
    assert!(
        st.metrics.prefix_cache_hits.get() >= hits_before + 11 * 16,
        "the concurrent requests reused no cached prefix"
    );
    // Different adapters really give different texts (otherwise the test proves nothing).
    let distinct: std::collections::HashSet<_> = alone.iter().take(5).collect();
    assert!(distinct.len() >= 3, "{alone:?}");
}

/// The default model: slow enough on CPU (tens of ms a token) that a sequence is reliably
/// still running when the test acts on it.
async fn default_model_state(extra: &[&str]) -> Arc<AppState> {
    let mut args = vec!["serve"];
    if !extra.contains(&"--adapters") {
        args.extend_from_slice(&["--adapters", "adapters"]);
    }
    args.extend_from_slice(extra);
    let cli = loraplex::cli::Cli::try_parse_from(args).unwrap();
    loraplex::cli::build_state(&cli.serve).await.unwrap()
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_sequence() {
    let st = default_model_state(&[]).await;
    let app = router(st.clone());
    let mut stream = common::http::stream_chat(&app, "a long answer please", 200).await;
    // The role chunk, then the first token: the sequence is running.
    for _ in 0..2 {
        assert!(stream.frame().await.unwrap().unwrap().is_data());
    }
    assert_eq!(st.engine.running(), 1);
    drop(stream);
    wait_until(|| st.engine.running() == 0).await;
    assert_eq!(
        st.engine.running(),
        0,
        "the disconnected sequence must be freed"
    );
    // It was cancelled, not finished: no completed generation was recorded.
    assert_eq!(st.metrics.generation_tokens.get_sample_count(), 0);
}

/// A model step that panics mid-stream (the test hook): the stream ends with an error event
/// and `[DONE]`, a plain request in the same step gets a 500, the restart is counted, and the
/// server answers the next request and `/health` as before.
#[tokio::test]
async fn a_panicking_step_ends_streams_with_an_error_and_serving_goes_on() {
    let st = default_model_state(&[]).await;
    let app = router(st.clone());
    let mut stream = common::http::stream_chat(&app, "a long answer please", 200).await;
    for _ in 0..2 {
        assert!(stream.frame().await.unwrap().unwrap().is_data());
    }
    let mut plain = chat_body(None, "and another", 100);
    plain["ignore_eos"] = json!(true);
    let plain = tokio::spawn({
        let app = app.clone();
        async move { call(&app, "POST", "/v1/chat/completions", Some(plain), None).await }
    });
    wait_until(|| st.engine.running() == 2).await;
    st.engine.inject_panic_in_next_step();
    let mut rest = String::new();
    while let Some(frame) = stream.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            rest.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let events: Vec<&str> = rest
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    let n = events.len();
    assert!(n >= 2, "{rest}");
    assert_eq!(events[n - 1], "[DONE]");
    assert!(events[n - 2].contains("\"error\""), "{rest}");
    let (status, v, _) = plain.await.unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(st.metrics.engine_restarts.get(), 1);
    let (status, v, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(None, "still there?", 3)),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _, _) = call(&app, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let st = default_model_state(&["--max-running", "1", "--max-queue", "1"]).await;
    let app = router(st.clone());
    let mut long = chat_body(None, "hold the slot", 250);
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    let mut held = Vec::new();
    for i in 0..2 {
        let req = Request::builder()
            .method("POST")
            .uri("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(long.to_string()))
            .unwrap();
        held.push(app.clone().oneshot(req).await.unwrap());
        // The first must hold the slot before the second queues: until the worker admits it,
        // it is itself the one waiting request, and the second would be refused instead.
        if i == 0 {
            wait_until(|| st.engine.running() == 1).await;
        }
    }
    wait_until(|| st.engine.running() == 1 && st.engine.waiting() == 1).await;
    assert_eq!((st.engine.running(), st.engine.waiting()), (1, 1));
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(chat_body(None, "x", 2).to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    drop(held);
}

fn write_keys(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("keys.toml");
    std::fs::write(
        &p,
        "[keys.\"sk-acme\"]\ntenant = \"acme\"\n[keys.\"sk-globex\"]\ntenant = \"globex\"\n[keys.\"sk-root\"]\ntenant = \"ops\"\nadmin = true\n",
    )
    .unwrap();
    p
}

fn tenant_adapters(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("adapters");
    for (sub, src) in [
        ("public-lora", "lora-r8-all"),
        ("acme/qv", "lora-r4-qv"),
        ("globex/secret", "dora-r8-all"),
    ] {
        let d = root.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(tiny_dir().join("adapters").join(src).join(f), d.join(f)).unwrap();
        }
    }
    root
}

#[tokio::test]
async fn tenants_cannot_see_use_or_unload_each_others_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = write_keys(tmp.path());
    let root = tenant_adapters(tmp.path());
    let st = state(&[
        "--api-keys",
        keys.to_str().unwrap(),
        "--adapters",
        root.to_str().unwrap(),
    ])
    .await;
    let app = router(st.clone());

    // Keys are required everywhere but /health.
    assert_eq!(
        call(&app, "GET", "/health", None, None).await.0,
        StatusCode::OK
    );
    let (s, v, _) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(
        call(&app, "GET", "/v1/models", None, Some("sk-wrong"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    let ids = |v: &Value| {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let (_, acme_models, _) = call(&app, "GET", "/v1/models", None, Some("sk-acme")).await;
    let acme_ids = ids(&acme_models);
    assert!(
        acme_ids.contains(&"acme/qv".to_string()) && acme_ids.contains(&"public-lora".to_string()),
        "{acme_ids:?}"
    );
    assert!(
        !acme_ids.iter().any(|i| i.contains("globex")),
        "{acme_ids:?}"
    );
    let (_, acme_adapters, _) = call(&app, "GET", "/v1/adapters", None, Some("sk-acme")).await;
    assert!(!acme_adapters.to_string().contains("globex"));
    let (_, root_models, _) = call(&app, "GET", "/v1/models", None, Some("sk-root")).await;
    assert!(ids(&root_models).contains(&"globex/secret".to_string()));

    // Using: own adapter (full or short name) works; the other tenant's answers like an unknown one.
    for model in ["acme/qv", "qv", "public-lora"] {
        let (s, v, _) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            Some(chat_body(Some(model), "hi", 2)),
            Some("sk-acme"),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{model}: {v}");
    }
    let (s_other, other, other_text) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(Some("globex/secret"), "hi", 2)),
        Some("sk-acme"),
    )
    .await;
    let (s_unknown, _, unknown_text) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(Some("globex/nothing"), "hi", 2)),
        Some("sk-acme"),
    )
    .await;
    assert_eq!(
        (s_other, s_unknown),
        (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND),
        "{other}"
    );
    assert_eq!(
        other_text, unknown_text,
        "another tenant's adapter must look exactly unknown"
    );
    let (s, _, via_field) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(json!({"messages": [{"role": "user", "content": "hi"}], "adapter": "globex/secret", "max_tokens": 2})),
        Some("sk-acme"),
    )
    .await;
    assert_eq!(
        (s, via_field),
        (StatusCode::NOT_FOUND, unknown_text.clone())
    );
    // A revision of it (`name@REV`) and a rollback of it look unknown too.
    let (s, _, at_rev) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(Some("globex/secret@0"), "hi", 2)),
        Some("sk-acme"),
    )
    .await;
    let (_, _, unknown_at_rev) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(Some("globex/nothing@0"), "hi", 2)),
        Some("sk-acme"),
    )
    .await;
    assert_eq!((s, at_rev), (StatusCode::NOT_FOUND, unknown_at_rev));
    let mut rollbacks = Vec::new();
    for name in ["globex/secret", "globex/nothing"] {
        let body = json!({"name": name, "rollback": true});
        rollbacks.push(call(&app, "POST", "/v1/adapters", Some(body), Some("sk-acme")).await);
    }
    assert_eq!(rollbacks[0].0, StatusCode::NOT_FOUND, "{}", rollbacks[0].2);
    assert_eq!(rollbacks[0].2, rollbacks[1].2);

    // Unloading: another tenant's adapter is not found either, and stays usable by its owner.
    let (s, _, t) = call(
        &app,
        "DELETE",
        "/v1/adapters/globex/secret",
        None,
        Some("sk-acme"),
    )
    .await;
    assert_eq!((s, t), (StatusCode::NOT_FOUND, unknown_text.clone()));
    let (s, _, t) = call(
        &app,
        "POST",
        "/v1/unload_lora_adapter",
        Some(json!({"lora_name": "globex/secret"})),
        Some("sk-acme"),
    )
    .await;
    assert_eq!((s, t), (StatusCode::NOT_FOUND, unknown_text));
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(Some("secret"), "hi", 2)),
        Some("sk-globex"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Loading: a tenant registers adapters of its own namespace by name (files under the
    // adapters root; tenants name no paths); only there can it unload them.
    let src = tiny_dir().join("adapters").join("lora-r4-qv");
    let mine = root.join("acme").join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), mine.join(f)).unwrap();
    }
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/adapters",
        Some(json!({"name": "mine"})),
        Some("sk-acme"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "acme/mine");
    let (s, _, _) = call(
        &app,
        "POST",
        "/v1/adapters",
        Some(json!({"name": "globex/planted"})),
        Some("sk-acme"),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, globex_models, _) = call(&app, "GET", "/v1/models", None, Some("sk-globex")).await;
    assert!(!ids(&globex_models).contains(&"acme/mine".to_string()));
    assert_eq!(
        call(
            &app,
            "DELETE",
            "/v1/adapters/acme/mine",
            None,
            Some("sk-globex")
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&app, "DELETE", "/v1/adapters/mine", None, Some("sk-acme"))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn adapters_load_and_unload_at_run_time_and_bad_ones_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let st = state(&["--adapter-path-allow", tmp.path().to_str().unwrap()]).await;
    let app = router(st.clone());
    let src = tiny_dir().join("adapters").join("dora-r8-all");
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/load_lora_adapter",
        Some(json!({"lora_name": "fresh", "lora_path": src})),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, _, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(Some("fresh"), "hi", 3)),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = call(
        &app,
        "POST",
        "/v1/unload_lora_adapter",
        Some(json!({"lora_name": "fresh"})),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(Some("fresh"), "hi", 3)),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A broken adapter is refused at load time and the server keeps serving.
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        "{\"r\": 4, \"target_modules\": [\"q_proj\"]}",
    )
    .unwrap();
    std::fs::write(tmp.path().join("adapter_model.safetensors"), b"garbage").unwrap();
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/adapters",
        Some(json!({"name": "broken", "path": tmp.path()})),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("adapter_model.safetensors"),
        "{v}"
    );
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/adapters",
        Some(json!({"name": "../../etc", "path": tmp.path()})),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        call(
            &app,
            "POST",
            "/v1/chat/completions",
            Some(chat_body(None, "still here", 2)),
            None
        )
        .await
        .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn bad_requests_get_4xx_naming_the_field() {
    let st = state(&["--max-tokens-cap", "64", "--max-body-bytes", "4096"]).await;
    let app = router(st.clone());
    let raw = |body: &str| {
        Request::builder()
            .method("POST")
            .uri("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let resp = app.clone().oneshot(raw("{\"messages\": [")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let msg = |v: Value| {
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"messages": user, "temperature": "hot"}),
            "temperature",
        ),
        (json!({"messages": "hi"}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (json!({"messages": []}), "messages"),
        (json!({"messages": user, "temperature": 3}), "temperature"),
        (json!({"messages": user, "max_tokens": 0}), "max_tokens"),
        (json!({"messages": user, "max_tokens": 65}), "max_tokens"),
        (json!({"messages": user, "n": 9}), "n"),
        (json!({"messages": user, "top_logprobs": 3}), "top_logprobs"),
        (
            json!({"messages": [{"role": "user", "content": "word ".repeat(300)}]}),
            "messages",
        ),
    ];
    for (body, field) in cases {
        let (s, v, _) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            Some(body.clone()),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["param"], field, "{body}: {v}");
        assert!(
            msg(v.clone()).contains(field.split('[').next().unwrap()),
            "{v}"
        );
    }
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/completions",
        Some(json!({"prompt": ["a", "b"]})),
        None,
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("prompt"))
    );
    let (s, _, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(Some("no-such-adapter"), "hi", 2)),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let resp = app.clone().oneshot(raw(&big.to_string())).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Nothing broke: a good request still works.
    assert_eq!(
        call(
            &app,
            "POST",
            "/v1/chat/completions",
            Some(chat_body(None, "hi", 2)),
            None
        )
        .await
        .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn metrics_parse_and_counters_move() {
    let st = state(&[]).await;
    let app = router(st.clone());
    let scrape =
        |app: axum::Router| async move { call(&app, "GET", "/metrics", None, None).await.2 };
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse().unwrap())
            .unwrap_or(0.0)
    };
    let before = scrape(app.clone()).await;
    for _ in 0..2 {
        call(
            &app,
            "POST",
            "/v1/chat/completions",
            Some(chat_body(Some("lora-r4-qv"), "hi", 3)),
            None,
        )
        .await;
    }
    call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(Some("missing"), "hi", 3)),
        None,
    )
    .await;
    let after = scrape(app.clone()).await;
    // Every sample line is `name{labels} value` with a float value.
    for line in after
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, v) = line.rsplit_once(' ').unwrap();
        assert!(name.starts_with("loraplex_"), "{line}");
        v.parse::<f64>()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
    }
    let ok = "loraplex_requests_total{route=\"/v1/chat/completions\",status=\"200\"}";
    let nf = "loraplex_requests_total{route=\"/v1/chat/completions\",status=\"404\"}";
    assert_eq!(value(&after, ok) - value(&before, ok), 2.0);
    assert_eq!(value(&after, nf) - value(&before, nf), 1.0);
    assert_eq!(
        value(
            &after,
            "loraplex_adapter_requests_total{adapter=\"lora-r4-qv\"}"
        ),
        2.0
    );
    assert_eq!(value(&after, "loraplex_adapter_cache_misses_total"), 1.0);
    assert_eq!(value(&after, "loraplex_adapter_cache_hits_total"), 1.0);
    assert_eq!(value(&after, "loraplex_adapters_resident "), 1.0);
    // The residency series: one resident adapter, its bytes, its last use.
    let bytes = value(&after, "loraplex_adapter_residency_bytes{adapter=\"lora-r4-qv\",pinned=\"false\",state=\"resident\"}");
    assert_eq!(bytes, value(&after, "loraplex_adapters_resident_bytes "));
    assert!(bytes > 0.0);
    let used = value(
        &after,
        "loraplex_adapter_last_use_timestamp_seconds{adapter=\"lora-r4-qv\"}",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - 60.0..=now + 1.0).contains(&used), "{used} vs {now}");
    assert!(value(&after, "loraplex_time_to_first_token_seconds_count") >= 2.0);
    assert!(after.contains("loraplex_lora_requests_info{max_lora=\"32\""));
    assert!(
        after.contains("loraplex_num_requests_waiting")
            && after.contains("loraplex_kv_cache_usage_perc")
    );
}

/// The PEFT family over HTTP: an adapters folder with LoRA, DoRA, IA³, prefix and prompt
/// tuning adapters, an AdapterHub bottleneck adapter and an AdapterFusion; `/v1/adapters` names each one's
/// method; 12 concurrent requests over all of them (and the base) answer as each alone; `usage.prompt_tokens` counts the real tokens; a
/// prompt that with the adapter's virtual tokens overflows the context is a 400 naming
/// `messages`.
#[tokio::test]
async fn every_served_peft_method_mixes_in_one_server() {
    let dir = tempfile::tempdir().unwrap();
    let family = tiny_dir().join("peft-family/adapters");
    let plain = tiny_dir().join("adapters");
    for (src, name) in [
        (plain.join("lora-r4-qv"), "lora-r4-qv"),
        (plain.join("dora-r8-all"), "dora-r8-all"),
        (family.join("ia3-kvd"), "ia3-kvd"),
        (family.join("prefix-n4"), "prefix-n4"),
        (family.join("prompt-n5"), "prompt-n5"),
        (family.join("bn-seq-bn"), "bn-seq-bn"),
        (family.join("fuse-ab"), "fuse-ab"),
    ] {
        copy_tree(&src, &dir.path().join(name));
    }
    let st = state(&["--adapters", dir.path().to_str().unwrap()]).await;
    let app = router(st.clone());
    let (s, v, _) = call(&app, "GET", "/v1/adapters", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let methods: std::collections::BTreeMap<String, String> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["method"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    assert_eq!(methods["lora-r4-qv"], "lora");
    assert_eq!(methods["dora-r8-all"], "dora");
    assert_eq!(methods["ia3-kvd"], "ia3");
    assert_eq!(methods["prefix-n4"], "prefix_tuning");
    assert_eq!(methods["prompt-n5"], "prompt_tuning");
    assert_eq!(methods["bn-seq-bn"], "bottleneck");
    assert_eq!(methods["fuse-ab"], "adapter_fusion");
    let names = [
        None,
        Some("lora-r4-qv"),
        Some("dora-r8-all"),
        Some("ia3-kvd"),
        Some("prefix-n4"),
        Some("prompt-n5"),
        Some("bn-seq-bn"),
        Some("fuse-ab"),
    ];
    let reqs: Vec<Value> = (0..12)
        .map(|i| chat_body(names[i % 8], &format!("family member {i} says"), 8))
        .collect();
    let mut alone = Vec::new();
    for r in &reqs {
        let (s, v, _) = call(&app, "POST", "/v1/chat/completions", Some(r.clone()), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        alone.push(v);
    }
    // Real prompt tokens only: the same text counts the same with or without virtual tokens.
    let mut counts = Vec::new();
    for name in [None, Some("prefix-n4"), Some("prompt-n5")] {
        let body = chat_body(name, "the same words", 1);
        let (_, v, _) = call(&app, "POST", "/v1/chat/completions", Some(body), None).await;
        counts.push(v["usage"]["prompt_tokens"].as_u64().unwrap());
    }
    assert!(
        counts[0] > 5 && counts.iter().all(|&n| n == counts[0]),
        "{counts:?}"
    );
    let handles: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| {
            let app = app.clone();
            tokio::spawn(
                async move { call(&app, "POST", "/v1/chat/completions", Some(r), None).await },
            )
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (s, v, _) = h.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"], alone[i]["choices"][0]["message"]["content"],
            "request {i}"
        );
        assert_eq!(
            v["usage"]["prompt_tokens"],
            alone[i]["usage"]["prompt_tokens"]
        );
    }
    let distinct: std::collections::HashSet<String> = alone
        .iter()
        .take(8)
        .map(|v| v["choices"][0]["message"]["content"].to_string())
        .collect();
    assert!(distinct.len() >= 4, "{distinct:?}");
    // The tiny model's context is 256 tokens: a prompt that fits alone but not after the
    // prompt-tuning adapter's 5 virtual tokens.
    let mut long = None;
    for words in 100..260 {
        let text = vec!["a"; words].join(" ");
        let (s, v, _) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            Some(chat_body(None, &text, 1)),
            None,
        )
        .await;
        if s != StatusCode::OK {
            break;
        }
        let n = v["usage"]["prompt_tokens"].as_u64().unwrap();
        if n >= 252 && n <= 255 {
            long = Some(text);
            break;
        }
    }
    let text = long.expect("a prompt of 252-255 tokens");
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(Some("prompt-n5"), &text, 1)),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "messages", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("virtual tokens"),
        "{v}"
    );
}

/// Copies a folder with its subfolders.
/// Served log-probabilities on an f32 model against transformers' logits (f32, the log-softmax
/// taken in f64 here): the first generated token's within 1e-4 for every reference case
/// (measured: 1.2e-6 for case 0).
#[tokio::test]
async fn served_logprobs_equal_the_reference_log_softmax() {
    let app = router(state(&[]).await);
    let expected = read_json(tiny_dir().join("expected_logits.json"));
    let mut checked = 0;
    for case in expected["cases"].as_array().unwrap() {
        let ids = as_u32_vec(&case["input_ids"]);
        let body = json!({"model": "tiny-llama", "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 5});
        let (status, v, text) = call(&app, "POST", "/v1/completions", Some(body), None).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let last = as_f32_vec(case["base_logits"].as_array().unwrap().last().unwrap());
        let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + last
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let best = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap();
        let lp = v["choices"][0]["logprobs"]["token_logprobs"][0]
            .as_f64()
            .unwrap();
        let want = last[best] as f64 - lse;
        assert!((lp - want).abs() < 1e-4, "served {lp} vs reference {want}");
        checked += 1;
    }
    assert!(checked >= 2);
}

/// `/v1/models` and `/v1/adapters` page with `after` and `limit` (OpenAI's list fields); a walk
/// of pages gives the unpaged list exactly, in order, and only a page's configs are read.
#[tokio::test]
async fn model_and_adapter_lists_page_with_after_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("adapters");
    std::fs::create_dir_all(&root).unwrap();
    let sources = [
        "lora-r8-all",
        "lora-r4-qv",
        "dora-r8-all",
        "rslora-r16-pattern",
    ];
    for i in 0..250 {
        // hard links: the registry does not follow symbolic ones out of its directory
        let (src, dst) = (
            tiny_dir().join("adapters").join(sources[i % 4]),
            root.join(format!("a{i:03}")),
        );
        std::fs::create_dir(&dst).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            if std::fs::hard_link(src.join(f), dst.join(f)).is_err() {
                std::fs::copy(src.join(f), dst.join(f)).unwrap();
            }
        }
    }
    let st = state(&["--adapters", root.to_str().unwrap()]).await;
    let app = router(st);
    let ids = |v: &Value, key: &str| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d[key].as_str().unwrap().to_string())
            .collect()
    };

    // Unpaged: everything, as OpenAI's clients expect of /v1/models.
    let (s, all, _) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::OK, "{all}");
    let all_ids = ids(&all, "id");
    assert_eq!(all_ids.len(), 251);
    assert!(all.get("has_more").is_none());
    assert_eq!(all_ids[1], "a000");
    assert_eq!(all_ids[250], "a249");

    for (route, key, total) in [("/v1/models", "id", 251), ("/v1/adapters", "name", 250)] {
        let (_, whole, _) = call(&app, "GET", route, None, None).await;
        let whole = ids(&whole, key);
        assert_eq!(whole.len(), total);
        let mut walked = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let uri = match &after {
                Some(a) => format!("{route}?limit=64&after={a}"),
                None => format!("{route}?limit=64"),
            };
            let (s, page, _) = call(&app, "GET", &uri, None, None).await;
            assert_eq!(s, StatusCode::OK, "{page}");
            let got = ids(&page, key);
            assert!(got.len() <= 64 && !got.is_empty(), "{uri}: {}", got.len());
            assert_eq!(page["first_id"], got[0].as_str());
            assert_eq!(page["last_id"], got[got.len() - 1].as_str());
            walked.extend(got.iter().cloned());
            pages += 1;
            if !page["has_more"].as_bool().unwrap() {
                break;
            }
            after = Some(got[got.len() - 1].clone());
        }
        assert_eq!(walked, whole, "{route}");
        assert_eq!(pages, total.div_ceil(64), "{route}");
    }

    // `after` an id that is not (or no longer) listed: the page starts past it.
    let (_, page, _) = call(&app, "GET", "/v1/adapters?after=a100x&limit=2", None, None).await;
    assert_eq!(ids(&page, "name"), ["a101", "a102"]);
    // past the end: an empty last page
    let (_, page, _) = call(&app, "GET", "/v1/adapters?after=zzz", None, None).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 0);
    assert_eq!(page["has_more"], false);
    // the base model's id leads /v1/models whatever it sorts as
    let base = all_ids[0].clone();
    let (_, page, _) = call(
        &app,
        "GET",
        &format!("/v1/models?after={base}&limit=1"),
        None,
        None,
    )
    .await;
    assert_eq!(ids(&page, "id"), ["a000"]);
    // limits are clamped to 1 … 1,000; a limit that is no number is refused
    let (_, page, _) = call(&app, "GET", "/v1/models?limit=0", None, None).await;
    assert_eq!(ids(&page, "id").len(), 1);
    let (s, _, text) = call(&app, "GET", "/v1/models?limit=lots", None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
}
