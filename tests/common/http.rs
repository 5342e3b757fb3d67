//! Driving a server in process: its state from `serve`'s arguments, and one request through the
//! router with an optional bearer key.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use http_body_util::BodyExt;
use loraplex::server::AppState;
use serde_json::Value;
use tower::ServiceExt;

/// The state `serve ARGS…` would run with.
pub async fn state(args: &[&str]) -> Arc<AppState> {
    let argv: Vec<&str> = std::iter::once("serve")
        .chain(args.iter().copied())
        .collect();
    let cli = loraplex::cli::Cli::try_parse_from(argv).unwrap();
    loraplex::cli::build_state(&cli.serve).await.unwrap()
}

/// `method uri` with a JSON body: the status, the body as JSON (`Null` when it is not), the text.
pub async fn request(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, Value, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let body = body
        .map(|b| Body::from(b.to_string()))
        .unwrap_or_else(Body::empty);
    send(app, req.body(body).unwrap()).await
}

/// Any request (a multipart upload, odd headers): the status, the body as JSON, the text.
pub async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, Value, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

/// A greedy chat body, naming `adapter` in `model` when given.
pub fn chat_body(adapter: Option<&str>, content: &str, max_tokens: u32) -> Value {
    let mut b = serde_json::json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0});
    if let Some(a) = adapter {
        b["model"] = serde_json::json!(a);
    }
    b
}

/// Polls `f` every 10 ms for up to 10 s.
pub async fn wait_until(mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A streamed greedy base chat of `max_tokens` tokens (`ignore_eos`), answered 200: the
/// response's body, to read frame by frame.
pub async fn stream_chat(app: &axum::Router, content: &str, max_tokens: u32) -> Body {
    let mut body = chat_body(None, content, max_tokens);
    body["stream"] = serde_json::json!(true);
    body["ignore_eos"] = serde_json::json!(true);
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body()
}
