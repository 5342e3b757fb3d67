//! Route handlers: completions, models, adapter admin, health, metrics.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::auth::Caller;
use super::error::ApiError;
use super::openai::{
    self, AddAdapterRequest, ChatCompletionRequest, CompletionRequest, PromptField, Sampling,
    VllmLoraRequest,
};
use super::responses::{self, Kind, Meta};
use super::state::AppState;
use super::validate;
use crate::adapters::{bind, AdapterName, PeftAdapter};
use crate::engine::ValidRequest;

type St = State<Arc<AppState>>;

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|rej| {
        let text = rej.body_text();
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("the request body is too large: {text}"))
        } else if text.to_lowercase().contains("time") {
            ApiError::RequestTimeout
        } else {
            ApiError::BadRequest {
                message: format!("cannot read the request body: {text}"),
                param: None,
            }
        }
    })
}

fn request_id(prefix: &str) -> String {
    let n: u64 = rand::random();
    format!("{prefix}-{n:016x}")
}

/// The adapter a request asks for (`adapter`, else a `model` that is not the base) and the
/// `model` to report back.
async fn choose_adapter(
    st: &Arc<AppState>,
    caller: &Caller,
    s: &Sampling,
) -> Result<(Option<crate::adapters::Lease>, Option<String>, String), ApiError> {
    let base = st.base_id().to_string();
    let requested = match (&s.adapter, &s.model) {
        (Some(a), _) => Some(a.clone()),
        (None, Some(m)) if m != &base => Some(m.clone()),
        _ => None,
    };
    let model = s.model.clone().unwrap_or_else(|| base.clone());
    let Some(requested) = requested else {
        return Ok((None, None, model));
    };
    let name = st.find(caller, &requested)?;
    let lease = st.lease(&name).await?;
    let label = st.metrics.adapter_label(&name.key());
    Ok((Some(lease), Some(label), model))
}

struct Prepared {
    prompt: Vec<u32>,
    sampling: Sampling,
    logprobs: Option<usize>,
    field: &'static str,
    echo: Option<String>,
}

async fn run(
    st: Arc<AppState>,
    caller: Caller,
    kind: Kind,
    p: Prepared,
) -> Result<Response, ApiError> {
    let loaded = st.engine.model().clone();
    let eos = loaded.stop_token_ids(&st.template);
    let config =
        validate::generation(&p.sampling, p.prompt.len(), &st.config.limits, eos, p.field)?;
    let (adapter, adapter_label, model) = choose_adapter(&st, &caller, &p.sampling).await?;
    let rx = st.engine.submit(ValidRequest {
        prompt: p.prompt,
        config,
        logprobs: p.logprobs,
        adapter,
        adapter_label,
    })?;
    let meta = Meta {
        kind,
        id: request_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        model,
        created: st.created,
        include_usage: p
            .sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
        tokenizer: loaded.tokenizer.clone(),
        echo: p.echo,
    };
    if p.sampling.stream {
        Ok(responses::stream(meta, rx))
    } else {
        responses::collect(meta, rx, p.logprobs.is_some()).await
    }
}

pub async fn chat(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, sampling): (ChatCompletionRequest, Sampling) = openai::parse_generation(&body(b)?)?;
    let messages = validate::messages(&req.messages)?;
    let loaded = st.engine.model().clone();
    let text = st
        .template
        .render(&messages, true, &loaded.special_tokens())
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let prompt = loaded
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (_, Some(k)) if !(0..=20).contains(&k) => {
            return Err(ApiError::bad(
                "top_logprobs",
                "`top_logprobs` must be between 0 and 20",
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::bad(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let p = Prepared {
        prompt,
        sampling,
        logprobs,
        field: "messages",
        echo: None,
    };
    run(st, caller, Kind::Chat, p).await
}

pub async fn completions(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, sampling): (CompletionRequest, Sampling) = openai::parse_generation(&body(b)?)?;
    let loaded = st.engine.model().clone();
    let encode = |t: &str| {
        loaded
            .tokenizer
            .encode(t)
            .map_err(|e| ApiError::bad("prompt", e.to_string()))
    };
    let (prompt, text) = match &req.prompt {
        PromptField::Text(t) => (encode(t)?, t.clone()),
        PromptField::Texts(v) if v.len() == 1 => (encode(&v[0])?, v[0].clone()),
        PromptField::Texts(_) => {
            return Err(ApiError::bad(
                "prompt",
                "`prompt` must be one string (batches of prompts are not supported)",
            ))
        }
        PromptField::Ids(ids) => {
            let vocab = loaded.model.config.vocab_size as u32;
            if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                return Err(ApiError::bad(
                    "prompt",
                    format!("`prompt` token id {bad} is outside the vocabulary"),
                ));
            }
            (
                ids.clone(),
                loaded.tokenizer.decode(ids, false).unwrap_or_default(),
            )
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::bad("prompt", "`prompt` must not be empty"));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if (0..=20).contains(&k) => Some(k as usize),
        Some(_) => {
            return Err(ApiError::bad(
                "logprobs",
                "`logprobs` must be between 0 and 20",
            ))
        }
    };
    let echo = req.echo.then_some(text);
    let p = Prepared {
        prompt,
        sampling,
        logprobs,
        field: "prompt",
        echo,
    };
    run(st, caller, Kind::Completion, p).await
}

fn visible_adapters(
    st: &AppState,
    caller: &Caller,
) -> Vec<crate::adapters::registry::AdapterEntry> {
    st.registry
        .list()
        .into_iter()
        .filter(|e| AppState::visible(caller, &e.name))
        .collect()
}

pub async fn models(State(st): St, Extension(caller): Extension<Caller>) -> Response {
    let base = st.base_id().to_string();
    let mut data = vec![
        json!({"id": base, "object": "model", "created": st.created, "owned_by": "loraplex", "root": base, "parent": null}),
    ];
    for e in visible_adapters(&st, &caller) {
        data.push(json!({"id": e.name.key(), "object": "model", "created": st.created, "owned_by": e.name.tenant.clone().unwrap_or_else(|| "loraplex".into()), "root": e.dir.display().to_string(), "parent": base}));
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

pub async fn list_adapters(State(st): St, Extension(caller): Extension<Caller>) -> Response {
    let resident = st.cache.resident();
    let data: Vec<_> = visible_adapters(&st, &caller)
        .into_iter()
        .map(|e| {
            let key = e.name.key();
            json!({"name": key, "pinned": e.pinned, "version": e.version, "resident": resident.contains(&key)})
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// The name `caller` may add or remove: a tenant's names live in its namespace; only admins
/// act outside it. Another tenant's adapter is reported exactly like an unknown one.
fn owned_name(caller: &Caller, requested: &str) -> Result<AdapterName, ApiError> {
    let mut name = AdapterName::parse(requested)?;
    if caller.admin {
        return Ok(name);
    }
    match (&name.tenant, &caller.tenant) {
        (None, Some(t)) => name.tenant = Some(t.clone()),
        (Some(n), Some(t)) if n == t => {}
        (Some(_), Some(_)) => return Err(ApiError::ModelNotFound(requested.to_string())),
        (_, None) => {}
    }
    Ok(name)
}

async fn add(
    st: Arc<AppState>,
    caller: Caller,
    req: AddAdapterRequest,
) -> Result<Response, ApiError> {
    let name = owned_name(&caller, &req.name)?;
    let dir = match (&req.path, &req.hub_id) {
        (Some(p), None) => std::path::PathBuf::from(p),
        (None, Some(h)) => crate::adapters::hub::fetch(h, &st.config.sources).await?,
        _ => {
            return Err(ApiError::bad(
                "path",
                "give exactly one of `path` and `hub_id`",
            ))
        }
    };
    // Validate against the model now, so a bad adapter is refused here and never reaches a request.
    let model = st.engine.model().clone();
    let opts = st.config.bind.clone();
    let check_dir = dir.clone();
    tokio::task::spawn_blocking(move || {
        bind(&PeftAdapter::load(&check_dir)?, &model.model, &opts).map(|_| ())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let entry = st.registry.add(&name, &dir, req.pinned)?;
    st.cache.remove(&name.key());
    if req.pinned {
        st.lease(&name).await?;
        st.cache.set_pinned(&name.key(), true);
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": entry.name.key(), "pinned": entry.pinned, "version": entry.version})),
    )
        .into_response())
}

pub async fn add_adapter(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: AddAdapterRequest = openai::parse(&body(b)?)?;
    add(st, caller, req).await
}

async fn remove(st: &AppState, caller: &Caller, requested: &str) -> Result<Response, ApiError> {
    let name = owned_name(caller, requested)?;
    if !AppState::visible(caller, &name) {
        return Err(ApiError::ModelNotFound(requested.to_string()));
    }
    st.registry
        .remove(&name)
        .map_err(|_| ApiError::ModelNotFound(requested.to_string()))?;
    st.cache.remove(&name.key());
    Ok(Json(json!({"name": name.key(), "deleted": true})).into_response())
}

pub async fn remove_adapter(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    remove(&st, &caller, &name).await
}

pub async fn vllm_load(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: VllmLoraRequest = openai::parse(&body(b)?)?;
    let path = req
        .lora_path
        .ok_or_else(|| ApiError::bad("lora_path", "`lora_path` is required"))?;
    add(
        st,
        caller,
        AddAdapterRequest {
            name: req.lora_name,
            path: Some(path),
            hub_id: None,
            pinned: false,
        },
    )
    .await
}

pub async fn vllm_unload(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: VllmLoraRequest = openai::parse(&body(b)?)?;
    remove(&st, &caller, &req.lora_name).await
}

pub async fn health() -> &'static str {
    "ok"
}

pub async fn metrics(State(st): St) -> Response {
    st.refresh_cache_metrics();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.render(),
    )
        .into_response()
}
