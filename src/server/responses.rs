//! Turning a request's engine events into OpenAI responses: one JSON body, or SSE chunks
//! (`data: {...}` … `data: [DONE]`) with an optional final usage chunk. With `n` choices, each
//! choice is a sequence of its own; their events are merged as they come (streams interleave by
//! `index`), and usage counts the prompt once.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::meter::Meter;
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

/// One choice's events: one already received (the first choice's first, which the others
/// waited for), then the rest from its receiver.
pub struct Choice {
    head: Option<Event>,
    rx: UnboundedReceiver<Event>,
}

impl Choice {
    pub fn with_head(head: Option<Event>, rx: UnboundedReceiver<Event>) -> Self {
        Self { head, rx }
    }
}

/// Every choice's events as `(index, event)`, in the order they come.
fn merged(choices: Vec<Choice>) -> BoxStream<'static, (usize, Event)> {
    stream::select_all(choices.into_iter().enumerate().map(|(i, c)| {
        let rest = stream::unfold(
            c.rx,
            |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
        );
        stream::iter(c.head)
            .chain(rest)
            .map(move |e| (i, e))
            .boxed()
    }))
    .boxed()
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// The choices' events, each seen by the request's meter on its way out.
fn metered(choices: Vec<Choice>, mut meter: Meter) -> BoxStream<'static, (usize, Event)> {
    merged(choices)
        .inspect(move |(i, ev)| meter.observe(*i, ev))
        .boxed()
}

/// Waits for every choice's whole answer and returns one JSON body.
pub async fn collect(
    meta: Meta,
    choices: Vec<Choice>,
    want_logprobs: bool,
    meter: Meter,
) -> Result<Response, ApiError> {
    let n = choices.len();
    let mut texts = vec![meta.echo.clone().unwrap_or_default(); n];
    let mut lps: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    let mut finish = vec![None; n];
    let (mut prompt_tokens, mut completion_tokens, mut cached) = (0, 0, 0);
    let mut events = metered(choices, meter);
    while let Some((i, ev)) = events.next().await {
        match ev {
            Event::Token {
                text: piece,
                logprobs,
                ..
            } => {
                texts[i].push_str(&piece);
                lps[i].extend(logprobs);
            }
            Event::Error(e) => return Err(ApiError::Internal(e)),
            Event::Aborted(e) => return Err(ApiError::Unavailable(e)),
            Event::Done {
                finish_reason,
                prompt_tokens: p,
                completion_tokens: c,
                cached_tokens,
            } => {
                if i == 0 {
                    cached = cached_tokens;
                }
                finish[i] = Some(finish_reason);
                prompt_tokens = p;
                completion_tokens += c;
                if finish.iter().all(Option::is_some) {
                    break;
                }
            }
        }
    }
    if finish.iter().any(Option::is_none) {
        return Err(ApiError::Internal("the engine dropped the request".into()));
    }
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let finish_reason = finish[i].expect("every choice finished").as_str();
            let logprobs = match (want_logprobs, meta.kind) {
                (false, _) => Value::Null,
                (true, Kind::Chat) => {
                    json!({"content": lps[i].iter().map(|l| chat_logprob(&meta.tokenizer, l)).collect::<Vec<_>>()})
                }
                (true, Kind::Completion) => completion_logprobs(
                    &meta.tokenizer,
                    &lps[i],
                    meta.echo.as_ref().map_or(0, String::len),
                ),
            };
            match meta.kind {
                Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                     "logprobs": logprobs, "finish_reason": finish_reason}),
                Kind::Completion => json!({"index": i, "text": texts[i], "logprobs": logprobs,
                                           "finish_reason": finish_reason}),
            }
        })
        .collect();
    let object = if meta.kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Ok(axum::Json(json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached),
    }))
    .into_response())
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
    index: usize,
    text: &str,
    logprobs: &[TokenLogprob],
    finish: Option<&str>,
    offset: usize,
) -> Value {
    let some = (!logprobs.is_empty()).then_some(logprobs);
    match meta.kind {
        Kind::Chat => {
            json!([{"index": index, "delta": if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) },
            "logprobs": some.map(|l| json!({"content": l.iter().map(|l| chat_logprob(&meta.tokenizer, l)).collect::<Vec<_>>()})),
            "finish_reason": finish}])
        }
        Kind::Completion => json!([{"index": index, "text": text,
            "logprobs": some.map(|l| completion_logprobs(&meta.tokenizer, l, offset)),
            "finish_reason": finish}]),
    }
}

/// Where a stream is: choices still running, each choice's text offset, usage so far.
struct Progress {
    left: usize,
    offsets: Vec<usize>,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    done: bool,
}

/// Streams the choices as server-sent events, interleaved by `index`. Dropping the stream
/// (client gone) drops the receivers, which cancels the sequences at the engine's next step.
pub fn stream(meta: Meta, choices: Vec<Choice>, meter: Meter) -> Response {
    let n = choices.len();
    let mut first: Vec<SseEvent> = Vec::new();
    for i in 0..n {
        match meta.kind {
            Kind::Chat => first.push(chunk(&meta, json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), None)),
            Kind::Completion => {
                if let Some(e) = &meta.echo {
                    first.push(chunk(&meta, delta_choice(&meta, i, e, &[], None, 0), None));
                }
            }
        }
    }
    let offset = meta.echo.as_ref().map_or(0, String::len);
    let progress = Progress {
        left: n,
        offsets: vec![offset; n],
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_tokens: 0,
        done: false,
    };
    let state = (meta, metered(choices, meter), progress);
    let body = stream::unfold(state, |(meta, mut events, mut p)| async move {
        if p.done {
            return None;
        }
        let (i, ev) = events.next().await?;
        let out: Vec<SseEvent> = match ev {
            Event::Token { text, logprobs, .. } => {
                if text.is_empty() && logprobs.is_empty() {
                    Vec::new()
                } else {
                    let ev = chunk(
                        &meta,
                        delta_choice(&meta, i, &text, &logprobs, None, p.offsets[i]),
                        None,
                    );
                    p.offsets[i] += text.len();
                    vec![ev]
                }
            }
            Event::Error(e) => {
                p.done = true;
                let body = ApiError::Internal(e).body();
                vec![
                    SseEvent::default().data(body.to_string()),
                    SseEvent::default().data("[DONE]"),
                ]
            }
            Event::Aborted(e) => {
                p.done = true;
                let body = ApiError::Unavailable(e).body();
                vec![
                    SseEvent::default().data(body.to_string()),
                    SseEvent::default().data("[DONE]"),
                ]
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                if i == 0 {
                    p.cached_tokens = cached_tokens;
                }
                p.left -= 1;
                p.prompt_tokens = prompt_tokens;
                p.completion_tokens += completion_tokens;
                let mut v = vec![chunk(
                    &meta,
                    delta_choice(
                        &meta,
                        i,
                        "",
                        &[],
                        Some(finish_reason.as_str()),
                        p.offsets[i],
                    ),
                    None,
                )];
                if p.left == 0 {
                    if meta.include_usage {
                        v.push(chunk(
                            &meta,
                            json!([]),
                            Some(usage(p.prompt_tokens, p.completion_tokens, p.cached_tokens)),
                        ));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    p.done = true;
                }
                v
            }
        };
        Some((out, (meta, events, p)))
    })
    .flat_map(|v| stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    let all = stream::iter(first.into_iter().map(Ok::<_, Infallible>)).chain(body);
    Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response()
}
