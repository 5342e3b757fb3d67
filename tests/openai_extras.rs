//! OpenAI request fields beyond the basics, on the tiny model over HTTP: `logit_bias`,
//! `presence_penalty` / `frequency_penalty` / `repetition_penalty`, `stop_token_ids`, `user`; the
//! `/tokenize` and `/detokenize` routes (tenants may call them); each bad value a 400 naming its
//! field.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::*;
use loraplex::server::{router, AppState};
use serde_json::{json, Value};

async fn state(extra: &[&str]) -> Arc<AppState> {
    let tiny = tiny_dir();
    let adapters = tiny.join("adapters");
    let mut args = vec![
        "--model",
        tiny.to_str().unwrap(),
        "--adapters",
        adapters.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    common::http::state(&args).await
}

async fn call(
    app: &axum::Router,
    uri: &str,
    body: Value,
    key: Option<&str>,
) -> (StatusCode, Value, String) {
    common::http::request(app, "POST", uri, Some(body), key).await
}

/// Greedy completion of `prompt` (12 tokens, EOS ignored) with `extra` fields: its text and
/// finish reason.
async fn complete(app: &axum::Router, prompt: &str, extra: Value) -> (String, String) {
    let mut body =
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v, text) = call(app, "/v1/completions", body, None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let c = &v["choices"][0];
    (
        c["text"].as_str().unwrap().to_string(),
        c["finish_reason"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn biases_penalties_and_stop_token_ids_change_what_is_generated() {
    let st = state(&[]).await;
    let app = router(st.clone());
    let tok = &st.engine.model().tokenizer;
    let prompt = "one two one two one two";
    let (plain, _) = complete(&app, prompt, json!({})).await;
    // The ids of that answer, from the library (the engine's numbers are the library's).
    let loaded = st.engine.model();
    let mut input: Vec<u32> = loaded.prompt_bos().into_iter().collect();
    input.extend(tok.encode(prompt).unwrap());
    let cfg = loraplex::engine::GenerationConfig {
        max_tokens: 12,
        ignore_eos: true,
        sampling: loraplex::engine::SamplingParams::greedy(),
        ..Default::default()
    };
    let ids = loraplex::engine::generate(&loaded.model, tok, &input, None, &cfg, |_| {})
        .unwrap()
        .token_ids;
    assert_eq!(tok.decode(&ids, false).unwrap(), plain);
    // A +100 bias on one token: greedy picks it every time.
    let target = tok.encode(" zebra").unwrap()[0];
    let (biased, _) = complete(
        &app,
        prompt,
        json!({"logit_bias": {target.to_string(): 100}}),
    )
    .await;
    let want: String = tok.decode(&[target; 12], false).unwrap();
    assert_eq!(biased, want);
    // −100 on the plain answer's first token: it never appears first.
    let (avoided, _) = complete(
        &app,
        prompt,
        json!({"logit_bias": {ids[0].to_string(): -100}}),
    )
    .await;
    let mut cfg_avoid = cfg.clone();
    cfg_avoid.sampling.logit_bias = vec![(ids[0], -100.0)];
    let lib =
        loraplex::engine::generate(&loaded.model, tok, &input, None, &cfg_avoid, |_| {}).unwrap();
    assert_ne!(lib.token_ids[0], ids[0]);
    assert_eq!(avoided, lib.text);
    // Penalties change a repetitive greedy answer, the same way each time.
    for field in [
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
    ] {
        let value = if field == "repetition_penalty" {
            3.0
        } else {
            2.0
        };
        let (a, _) = complete(&app, prompt, json!({ field: value })).await;
        let (b, _) = complete(&app, prompt, json!({ field: value })).await;
        assert_eq!(a, b, "{field}");
        assert_ne!(a, plain, "{field} changed nothing");
    }
    // A stop token ends the answer before its text, even with ignore_eos.
    let (cut, finish) = complete(
        &app,
        prompt,
        json!({"stop_token_ids": [ids[2]], "user": "user-1234"}),
    )
    .await;
    assert_eq!(finish, "stop");
    // (Bytes of a character the stop token would have completed are not emitted, as at EOS.)
    let before = tok.decode(&ids[..2], false).unwrap();
    assert_eq!(cut, before.trim_end_matches('\u{FFFD}'));
    assert!(plain.starts_with(&cut));
    // Bad values: a 400 naming the field.
    for (patch, param) in [
        (json!({"logit_bias": {"99999": 1}}), "logit_bias.99999"),
        (json!({"logit_bias": {"5": 101}}), "logit_bias.5"),
        (json!({"logit_bias": {"five": 1}}), "logit_bias.five"),
        (json!({"presence_penalty": 2.5}), "presence_penalty"),
        (json!({"frequency_penalty": -3}), "frequency_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"stop_token_ids": [99999]}), "stop_token_ids"),
        (json!({"stop_token_ids": vec![3; 1025]}), "stop_token_ids"),
        (json!({"logit_bias": {"5": 1, "05": 2}}), "logit_bias.5"),
        (
            json!({"logit_bias": (0..1025).map(|i| (i.to_string(), json!(1))).collect::<serde_json::Map<_, _>>()}),
            "logit_bias",
        ),
    ] {
        let mut body = json!({"prompt": prompt, "max_tokens": 2});
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v, text) = call(&app, "/v1/completions", body, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(v["error"]["param"], param, "{text}");
    }
}

#[tokio::test]
async fn tokenize_and_detokenize_as_vllm_has_them() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys.toml");
    std::fs::write(&keys, "[keys.\"sk-acme\"]\ntenant = \"acme\"\n").unwrap();
    let st = state(&["--api-keys", keys.to_str().unwrap()]).await;
    let app = router(st.clone());
    let key = Some("sk-acme");
    let (status, _, _) = call(&app, "/tokenize", json!({"prompt": "hi"}), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let loaded = st.engine.model();
    let (status, v, text) = call(&app, "/tokenize", json!({"prompt": "hello world"}), key).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let mut want: Vec<u32> = loaded.prompt_bos().into_iter().collect();
    want.extend(loaded.tokenizer.encode("hello world").unwrap());
    let ids: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(ids, want);
    assert_eq!(v["count"], want.len());
    assert_eq!(
        v["max_model_len"],
        loaded.model.config.max_position_embeddings
    );
    // Messages through the chat template: the count is the chat request's prompt_tokens.
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]);
    let (_, v, _) = call(&app, "/tokenize", json!({"messages": messages}), key).await;
    let (status, chat, text) = call(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 1}),
        key,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(v["count"], chat["usage"]["prompt_tokens"]);
    let (status, back, text) = call(
        &app,
        "/detokenize",
        json!({"tokens": loaded.tokenizer.encode("hello world").unwrap()}),
        key,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(back["prompt"], "hello world");
    let (status, v, text) = call(&app, "/detokenize", json!({"tokens": [99999]}), key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert_eq!(v["error"]["param"], "tokens");
}

#[tokio::test]
async fn chat_template_kwargs_reach_the_template_and_bad_ones_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("thinking.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
         {% if enable_thinking is defined and not enable_thinking %}(no thinking)\n{% endif %}\
         {% if add_generation_prompt %}assistant:{% endif %}",
    )
    .unwrap();
    let st = state(&["--chat-template", template.to_str().unwrap()]).await;
    let app = router(st.clone());
    let loaded = st.engine.model();
    let messages = json!([{"role": "user", "content": "hello world"}]);
    let ids = |v: &Value| serde_json::from_value::<Vec<u32>>(v["tokens"].clone()).unwrap();
    let want = |text: &str| {
        let mut w: Vec<u32> = loaded.prompt_bos().into_iter().collect();
        w.extend(loaded.tokenizer.encode(text).unwrap());
        w
    };
    let (status, plain, text) = call(&app, "/tokenize", json!({"messages": messages}), None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(ids(&plain), want("user: hello world\nassistant:"));
    let (status, off, text) = call(
        &app,
        "/tokenize",
        json!({"messages": messages, "chat_template_kwargs": {"enable_thinking": false}}),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        ids(&off),
        want("user: hello world\n(no thinking)\nassistant:")
    );
    for bad in [
        json!([1]),
        json!({"messages": []}),
        json!({"add_generation_prompt": false}),
    ] {
        let (status, v, text) = call(
            &app,
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 1, "chat_template_kwargs": bad}),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(v["error"]["param"], "chat_template_kwargs", "{text}");
    }
}

/// `speculative` over HTTP, with `--speculative-ngram` as the server's default: answers equal
/// those without it (greedy, and sampled with a seed), a request may turn it off, a bad setting
/// is a 400 naming its field, and `/metrics` counts the proposals.
#[tokio::test]
async fn speculative_requests_answer_as_without_and_are_counted() {
    let st = state(&["--speculative-ngram", "3", "--speculative-max-batch", "8"]).await;
    let app = router(st.clone());
    let prompt = "one two three one two three one two three one two";
    let off = json!({"speculative": {"method": "ngram", "num_tokens": 0}});
    let on = json!({"speculative": {"method": "ngram", "num_tokens": 5, "prompt_lookup_max": 2}});
    let (plain, _) = complete(&app, prompt, off.clone()).await;
    let steps = || st.metrics.spec_steps.get();
    assert_eq!(steps(), 0, "num_tokens 0 turns the server's default off");
    assert_eq!(complete(&app, prompt, json!({})).await.0, plain);
    let by_default = steps();
    assert!(by_default > 0, "the server's default speculates");
    assert_eq!(complete(&app, prompt, on).await.0, plain);
    assert!(steps() > by_default);
    let seeded = json!({"temperature": 1.0, "seed": 5, "top_k": 20});
    let mut with_off = seeded.clone();
    with_off["speculative"] = off["speculative"].clone();
    assert_eq!(
        complete(&app, prompt, seeded).await.0,
        complete(&app, prompt, with_off).await.0,
        "a seed gives the same answer with and without speculation"
    );
    for (bad, field) in [
        (json!({"method": "eagle"}), "speculative.method"),
        (
            json!({"method": "ngram", "num_tokens": 99}),
            "speculative.num_tokens",
        ),
    ] {
        let body = json!({"prompt": prompt, "max_tokens": 4, "speculative": bad});
        let (status, v, text) = call(&app, "/v1/completions", body, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(v["error"]["param"], field, "{text}");
    }
    let (status, _, text) = common::http::request(&app, "GET", "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    for series in [
        "loraplex_spec_decode_steps_total",
        "loraplex_spec_decode_tokens_total",
        "loraplex_spec_decode_draft_tokens_total",
        "loraplex_spec_decode_accepted_tokens_total",
    ] {
        assert!(text.contains(series), "{series} missing from /metrics");
    }
}
