//! Turning a request's engine events into OpenAI responses: one JSON body, or SSE chunks
//! (`data: {...}` … `data: [DONE]`) with an optional final usage chunk.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use crate::engine::sequence::TokenLogprob;
use crate::engine::Event;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// What a response needs besides the events.
pub struct Meta {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub include_usage: bool,
    pub tokenizer: Tokenizer,
    /// Text to put before the answer (completions `echo`).
    pub echo: Option<String>,
}

/// A token's text as OpenAI reports it: its true bytes (a piece of a multi-byte character stays
/// that piece), shown lossily as text.
fn token_text(tok: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(&tok.token_bytes(id)).into_owned()
}

fn chat_logprob(tok: &Tokenizer, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let bytes = tok.token_bytes(id);
        json!({"token": String::from_utf8_lossy(&bytes), "logprob": logprob, "bytes": bytes})
    };
    let mut v = entry(lp.id, lp.logprob);
    v["top_logprobs"] = Value::Array(lp.top.iter().map(|(id, l)| entry(*id, *l)).collect());
    v
}

fn completion_logprobs(tok: &Tokenizer, lps: &[TokenLogprob], offset0: usize) -> Value {
    let mut offset = offset0;
    let mut tokens = Vec::new();
    let mut offsets = Vec::new();
    for lp in lps {
        offsets.push(offset);
        // Offsets count the token's true bytes, so they add up to the returned text's length.
        offset += tok.token_bytes(lp.id).len();
        tokens.push(token_text(tok, lp.id));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| l.top.iter().map(|(id, p)| (token_text(tok, *id), json!(p))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Waits for the whole answer and returns one JSON body.
pub async fn collect(
    meta: Meta,
    mut rx: UnboundedReceiver<Event>,
    want_logprobs: bool,
) -> Result<Response, ApiError> {
    let mut text = meta.echo.clone().unwrap_or_default();
    let mut lps = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token {
                text: piece,
                logprobs,
                ..
            } => {
                text.push_str(&piece);
                lps.extend(logprobs);
            }
            Event::Error(e) => return Err(ApiError::Internal(e)),
            Event::Aborted(e) => return Err(ApiError::Unavailable(e)),
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let logprobs = match (want_logprobs, meta.kind) {
                    (false, _) => Value::Null,
                    (true, Kind::Chat) => {
                        json!({"content": lps.iter().map(|l| chat_logprob(&meta.tokenizer, l)).collect::<Vec<_>>()})
                    }
                    (true, Kind::Completion) => completion_logprobs(
                        &meta.tokenizer,
                        &lps,
                        meta.echo.as_ref().map_or(0, String::len),
                    ),
                };
                let choice = match meta.kind {
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text},
                                         "logprobs": logprobs, "finish_reason": finish_reason.as_str()})
                    }
                    Kind::Completion => json!({"index": 0, "text": text, "logprobs": logprobs,
                                               "finish_reason": finish_reason.as_str()}),
                };
                let object = if meta.kind == Kind::Chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return Ok(axum::Json(json!({
                    "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
                    "choices": [choice], "usage": usage(prompt_tokens, completion_tokens),
                }))
                .into_response());
            }
        }
    }
    Err(ApiError::Internal("the engine dropped the request".into()))
}

fn chunk(meta: &Meta, choices: Value, usage: Option<Value>) -> SseEvent {
    let object = if meta.kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let mut v = json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model, "choices": choices});
    if let Some(u) = usage {
        v["usage"] = u;
    }
    SseEvent::default().data(v.to_string())
}

fn delta_choice(
    meta: &Meta,
    text: &str,
    logprobs: &[TokenLogprob],
    finish: Option<&str>,
    offset: usize,
) -> Value {
    let some = (!logprobs.is_empty()).then_some(logprobs);
    match meta.kind {
        Kind::Chat => {
            json!([{"index": 0, "delta": if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) },
            "logprobs": some.map(|l| json!({"content": l.iter().map(|l| chat_logprob(&meta.tokenizer, l)).collect::<Vec<_>>()})),
            "finish_reason": finish}])
        }
        Kind::Completion => json!([{"index": 0, "text": text,
            "logprobs": some.map(|l| completion_logprobs(&meta.tokenizer, l, offset)),
            "finish_reason": finish}]),
    }
}

/// Streams the answer as server-sent events. Dropping the stream (client gone) drops the
/// receiver, which cancels the sequence at the engine's next step.
pub fn stream(meta: Meta, rx: UnboundedReceiver<Event>) -> Response {
    let mut first: Vec<SseEvent> = Vec::new();
    match meta.kind {
        Kind::Chat => first.push(chunk(&meta, json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), None)),
        Kind::Completion => {
            if let Some(e) = &meta.echo {
                first.push(chunk(&meta, delta_choice(&meta, e, &[], None, 0), None));
            }
        }
    }
    let offset = meta.echo.as_ref().map_or(0, String::len);
    let state = (meta, rx, false, offset);
    let body = stream::unfold(state, |(meta, mut rx, done, offset)| async move {
        if done {
            return None;
        }
        let events: Vec<SseEvent> = match rx.recv().await {
            None => return None,
            Some(Event::Token { text, logprobs, .. }) => {
                if text.is_empty() && logprobs.is_empty() {
                    return Some((Vec::new(), (meta, rx, false, offset)));
                }
                let ev = chunk(
                    &meta,
                    delta_choice(&meta, &text, &logprobs, None, offset),
                    None,
                );
                return Some((vec![ev], (meta, rx, false, offset + text.len())));
            }
            Some(Event::Error(e)) => {
                let body = ApiError::Internal(e).body();
                vec![
                    SseEvent::default().data(body.to_string()),
                    SseEvent::default().data("[DONE]"),
                ]
            }
            Some(Event::Aborted(e)) => {
                let body = ApiError::Unavailable(e).body();
                vec![
                    SseEvent::default().data(body.to_string()),
                    SseEvent::default().data("[DONE]"),
                ]
            }
            Some(Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                let mut v = vec![chunk(
                    &meta,
                    delta_choice(&meta, "", &[], Some(finish_reason.as_str()), offset),
                    None,
                )];
                if meta.include_usage {
                    v.push(chunk(
                        &meta,
                        json!([]),
                        Some(usage(prompt_tokens, completion_tokens)),
                    ));
                }
                v.push(SseEvent::default().data("[DONE]"));
                let done = true;
                return Some((v, (meta, rx, done, offset)));
            }
        };
        Some((events, (meta, rx, false, offset)))
    })
    .flat_map(|v| stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    let all = stream::iter(first.into_iter().map(Ok::<_, Infallible>)).chain(body);
    Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response()
}
