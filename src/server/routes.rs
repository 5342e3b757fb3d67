//! Route handlers, thin: each parses its body and asks the validation stage (`stage.rs`) or the
//! tenant policy (`policy.rs`); chat and completions share one path.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::auth::Caller;
use super::error::ApiError;
use super::openai::{self, AddAdapterRequest, VllmLoraRequest};
use super::policy::{AdapterSource, Policy, Registration};
use super::responses::{self, Kind, Meta};
use super::stage;
use super::state::AppState;
use crate::adapters::{bind, hub, AdapterError, PeftAdapter};
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

/// Chat and completions alike: the validation stage off the async threads, the adapter's
/// lease, the engine, the response.
async fn generate(
    st: Arc<AppState>,
    caller: Caller,
    kind: Kind,
    body: Bytes,
) -> Result<Response, ApiError> {
    let stage_caller = caller.clone();
    let p = st
        .blocking(
            |s| &s.prepare,
            move |st| stage::prepare(st, &stage_caller, kind, &body),
        )
        .await?;
    let (adapter, adapter_label) = match &p.adapter {
        Some(entry) => (
            Some(
                st.lease(entry, None)
                    .await
                    .map_err(|e| st.policy.redact(&caller, e))?,
            ),
            Some(st.metrics.adapter_label(&entry.name.key())),
        ),
        None => (None, None),
    };
    // Prompt and prefix tuning put virtual tokens before the prompt: they share its context.
    let virtual_tokens = adapter.as_ref().map_or(0, |l| l.weights.virtual_tokens());
    let context = st.config.limits.context;
    if virtual_tokens > 0 && p.prompt.len() + virtual_tokens >= context {
        let field = match kind {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        };
        return Err(ApiError::bad(
            field,
            format!(
                "`{field}` is {} tokens and the adapter puts {virtual_tokens} virtual tokens before it; the model's context is {context} tokens",
                p.prompt.len()
            ),
        ));
    }
    let loaded = st.engine.model().clone();
    // `n` choices: choice i samples with seed + i. The first prefills the prompt; the others
    // are submitted once its first token is out, when the prompt's full KV blocks are in the
    // prefix cache, so they reuse them instead of prefilling again.
    let n = p.sampling.n.unwrap_or(1).max(1) as usize;
    let request = |i: usize| {
        let mut config = p.config.clone();
        config.sampling.seed = config.sampling.seed.map(|s| s.wrapping_add(i as u64));
        ValidRequest {
            prompt: p.prompt.clone(),
            config,
            logprobs: p.logprobs,
            adapter: adapter.clone(),
            adapter_label: adapter_label.clone(),
            adapter_name: p.adapter_name.clone(),
            tenant: caller.tenant.clone(),
        }
    };
    let mut first = st.engine.submit(request(0))?;
    let mut rxs = Vec::with_capacity(n);
    if n > 1 {
        let head = first.recv().await;
        let rest: Vec<_> = (1..n)
            .map(|i| st.engine.submit(request(i)))
            .collect::<Result<_, _>>()?;
        rxs.push(responses::Choice::with_head(head, first));
        rxs.extend(
            rest.into_iter()
                .map(|rx| responses::Choice::with_head(None, rx)),
        );
    } else {
        rxs.push(responses::Choice::with_head(None, first));
    }
    let meta = Meta {
        kind,
        id: request_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        model: p.model,
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
        Ok(responses::stream(meta, rxs))
    } else {
        responses::collect(meta, rxs, p.logprobs.is_some()).await
    }
}

pub async fn chat(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(st, caller, Kind::Chat, body(b)?).await
}

pub async fn completions(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(st, caller, Kind::Completion, body(b)?).await
}

pub async fn models(
    State(st): St,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let base = st.base_id().to_string();
    let listing_caller = caller.clone();
    let entries = st
        .blocking(
            |s| &s.prepare,
            move |st| Ok(Policy::listing(&listing_caller, &st.registry)),
        )
        .await?;
    let mut data = vec![
        json!({"id": base, "object": "model", "created": st.created, "owned_by": "loraplex", "root": base, "parent": null}),
    ];
    for e in entries {
        let id = e.name.key();
        let root = if Policy::shows_paths(&caller) {
            e.dir.display().to_string()
        } else {
            id.clone()
        };
        data.push(json!({"id": id, "object": "model", "created": st.created, "owned_by": e.name.tenant.clone().unwrap_or_else(|| "loraplex".into()), "root": root, "parent": base}));
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

pub async fn list_adapters(
    State(st): St,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let resident = st.cache.resident();
    let shows_cache = Policy::shows_cache(&caller);
    let entries = st
        .blocking(
            |s| &s.prepare,
            move |st| {
                // With each adapter's method, from its config (off the async threads).
                Ok(Policy::listing(&caller, &st.registry)
                    .into_iter()
                    .map(|e| {
                        let method = crate::adapters::PeftAdapter::read_config(&e.dir)
                            .ok()
                            .map(|c| c.method_name());
                        (e, method)
                    })
                    .collect::<Vec<_>>())
            },
        )
        .await?;
    let data: Vec<_> = entries
        .into_iter()
        .map(|(e, method)| {
            let mut v = json!({"name": e.name.key(), "pinned": e.pinned, "version": st.registry.revision(&e.name), "method": method});
            if shows_cache {
                v["resident"] = json!(resident.contains(&e.name));
            }
            v
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// Registers an adapter as the policy allows: files checked header-first (against the model
/// and the caller's quota), then loaded once, through the cache, within the load bound.
async fn add(
    st: Arc<AppState>,
    caller: Caller,
    reg: Registration<'_>,
) -> Result<Response, ApiError> {
    let redact_caller = caller.clone();
    register(st.clone(), caller, reg)
        .await
        .map_err(|e| st.policy.redact(&redact_caller, e))
}

async fn register(
    st: Arc<AppState>,
    caller: Caller,
    reg: Registration<'_>,
) -> Result<Response, ApiError> {
    let (name, source) = st.policy.registration(&caller, &st.registry, &reg)?;
    let model = st.engine.model().clone();
    let dir = match source {
        AdapterSource::Dir(d) => d,
        AdapterSource::Hub { id, options } => {
            let _permit = st
                .loads
                .acquire()
                .await
                .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
            hub::fetch(&id, &st.config.sources, &options, |h| {
                bind::check(h, &model.model, &st.config.bind)?;
                Policy::check_quota(&caller, &st.registry, &name, h.bytes).map_err(|e| {
                    AdapterError::LoadFailed {
                        name: id.clone(),
                        message: e.message(),
                    }
                })
            })
            .await
            .map_err(|e| match e {
                AdapterError::InvalidName { .. } => ApiError::bad("hub_id", e.to_string()),
                other => ApiError::from(other),
            })?
        }
    };
    let (check_caller, check_name, check_dir) = (caller.clone(), name.clone(), dir.clone());
    let (bytes, weights) = st
        .blocking(
            |s| &s.loads,
            move |st| {
                let header = PeftAdapter::inspect(&check_dir)?;
                bind::check(&header, &st.engine.model().model, &st.config.bind)?;
                Policy::check_quota(&check_caller, &st.registry, &check_name, header.bytes)?;
                let bytes = header.bytes;
                let weights = bind::bind(
                    &PeftAdapter::load_tensors(header)?,
                    &st.engine.model().model,
                    &st.config.bind,
                )?;
                Ok((bytes, weights))
            },
        )
        .await?;
    let entry = st.registry.add(&name, &dir, reg.pinned, bytes)?;
    st.lease(&entry, Some(weights)).await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"name": entry.name.key(), "pinned": entry.pinned, "version": st.registry.revision(&entry.name)}),
        ),
    )
        .into_response())
}

pub async fn add_adapter(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: AddAdapterRequest = openai::parse(&body(b)?)?;
    let reg = Registration {
        name: &req.name,
        path: req.path.as_deref(),
        path_field: "path",
        hub_id: req.hub_id.as_deref(),
        pinned: req.pinned,
    };
    add(st.clone(), caller, reg).await
}

async fn remove(st: &AppState, caller: &Caller, requested: &str) -> Result<Response, ApiError> {
    let name = Policy::owned_name(caller, requested)?;
    if !Policy::visible(caller, &name) {
        return Err(ApiError::ModelNotFound(requested.to_string()));
    }
    st.registry
        .remove(&name)
        .map_err(|_| ApiError::ModelNotFound(requested.to_string()))?;
    st.cache.remove(&name);
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
    if let Some(base) = &req.base_model_name {
        let served = &st.engine.model().id;
        if base != served {
            return Err(ApiError::bad(
                "base_model_name",
                format!("is `{base}`; this server serves `{served}`"),
            ));
        }
    }
    let reg = Registration {
        name: &req.lora_name,
        path: req.lora_path.as_deref(),
        path_field: "lora_path",
        hub_id: None,
        pinned: false,
    };
    add(st.clone(), caller, reg).await
}

/// `POST /tokenize` (as vLLM has it): `{"prompt"}` or `{"messages"}` → `{"count",
/// "max_model_len", "tokens"}`.
pub async fn tokenize(
    State(st): St,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body(b)?;
    let ids = st
        .blocking(|s| &s.prepare, move |st| stage::tokenize(st, &body))
        .await?;
    Ok(
        Json(json!({"count": ids.len(), "max_model_len": st.config.limits.context, "tokens": ids}))
            .into_response(),
    )
}

/// `POST /detokenize`: `{"tokens": [ids]}` → `{"prompt"}`.
pub async fn detokenize(
    State(st): St,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(&body(b)?)
        .map_err(|e| ApiError::bad("body", format!("is not valid JSON: {e}")))?;
    let ids: Vec<u32> = serde_json::from_value(v["tokens"].clone())
        .map_err(|_| ApiError::bad("tokens", "must be an array of token ids"))?;
    let vocab = st.config.limits.vocab;
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad(
            "tokens",
            format!("token {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let text = st
        .engine
        .model()
        .tokenizer
        .decode(&ids, false)
        .map_err(|e| ApiError::bad("tokens", e.to_string()))?;
    Ok(Json(json!({"prompt": text})).into_response())
}

pub async fn vllm_unload(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: VllmLoraRequest = openai::parse(&body(b)?)?;
    remove(&st, &caller, &req.lora_name).await
}

/// `ok`, or 503 once the server drains for shutdown (so load balancers stop sending) and while
/// the engine rebuilds after a fault.
pub async fn health(State(st): St) -> Response {
    if st.engine.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if !st.engine.is_healthy() {
        (StatusCode::SERVICE_UNAVAILABLE, "rebuilding").into_response()
    } else {
        "ok".into_response()
    }
}

/// Outside the key middleware: the policy decides (admin key, `--metrics-key`, or open).
pub async fn metrics(State(st): St, headers: HeaderMap) -> Result<Response, ApiError> {
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    st.policy.scrape(st.keys.as_ref(), authorization)?;
    st.refresh_cache_metrics();
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.render(),
    )
        .into_response())
}

/// `POST /v1/files` (multipart: `purpose`, `file`): checked line by line, kept for the caller.
pub async fn upload_file(
    State(st): St,
    Extension(caller): Extension<Caller>,
    mut form: axum::extract::Multipart,
) -> Result<Response, ApiError> {
    let bad_form = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("the upload is too large: {}", e.body_text()))
        } else {
            ApiError::bad(
                "file",
                format!("cannot read the multipart form: {}", e.body_text()),
            )
        }
    };
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form.next_field().await.map_err(bad_form)? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(bad_form)?),
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                file = Some((name, field.bytes().await.map_err(bad_form)?));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::bad("purpose", "is missing"))?;
    let (name, content) = file.ok_or_else(|| ApiError::bad("file", "is missing"))?;
    // The quota and the write off the async threads (both read or write the store's folder).
    let record = st
        .blocking(
            |s| &s.prepare,
            move |st| {
                if !caller.admin {
                    let used: usize = st
                        .files
                        .list(Policy::owner_scope(&caller))
                        .iter()
                        .map(|f| f.bytes)
                        .sum();
                    let limit = caller.limits.max_file_bytes;
                    if (used + content.len()) as u64 > limit {
                        return Err(ApiError::forbidden(
                            "file",
                            format!(
                                "quota: {} more bytes of files would exceed `max_file_bytes` ({limit}); delete some first",
                                content.len()
                            ),
                        ));
                    }
                }
                st.files
                    .create(caller.tenant.as_deref(), &name, &purpose, &content)
            },
        )
        .await?;
    Ok((StatusCode::OK, Json(record.public())).into_response())
}

/// `GET /v1/files`: the caller's files, newest first.
pub async fn list_files(
    State(st): St,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let data: Vec<serde_json::Value> = st
        .files
        .list(Policy::owner_scope(&caller))
        .iter()
        .map(|f| f.public())
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/files/{id}`: another tenant's file is the same 404 as a missing one.
pub async fn get_file(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = st.files.get(&id, Policy::owner_scope(&caller))?;
    Ok(Json(record.public()).into_response())
}

/// `DELETE /v1/files/{id}`.
pub async fn delete_file(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    st.files.delete(&id, Policy::owner_scope(&caller))?;
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
}

/// `POST /v1/fine_tuning/jobs`: checked, kept, queued.
pub async fn create_job(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(&body(b)?)
        .map_err(|e| ApiError::bad("body", format!("is not valid JSON: {e}")))?;
    let base = st.engine.model().id.clone();
    let (job, file) = super::jobs::new_job(&v, caller.tenant.clone(), &base)?;
    // Another tenant's file and a missing one are the same 404.
    st.files.get(&file, Policy::owner_scope(&caller))?;
    if let Some(v) = &job.validation_file {
        st.files.get(v, Policy::owner_scope(&caller))?;
    }
    if !caller.admin {
        let active = st
            .jobs
            .list(Policy::owner_scope(&caller))
            .iter()
            .filter(|j| matches!(j.status.as_str(), "validating_files" | "queued" | "running"))
            .count();
        if active >= caller.limits.max_jobs {
            return Err(ApiError::forbidden(
                "training_file",
                format!(
                    "quota: your key allows {} fine-tuning jobs queued or running at once (`max_jobs`)",
                    caller.limits.max_jobs
                ),
            ));
        }
    }
    let job = st.jobs.submit(job)?;
    let (state, id) = (st.clone(), job.id.clone());
    tokio::task::spawn_blocking(move || state.jobs.validate(&state, &id));
    Ok(Json(job.public()).into_response())
}

#[derive(serde::Deserialize)]
pub struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/fine_tuning/jobs?after=ID&limit=N`: the caller's jobs, newest first.
pub async fn list_jobs(
    State(st): St,
    Extension(caller): Extension<Caller>,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Result<Response, ApiError> {
    let jobs = st.jobs.list(Policy::owner_scope(&caller));
    let start = match &page.after {
        Some(a) => jobs
            .iter()
            .position(|j| &j.id == a)
            .map_or(jobs.len(), |i| i + 1),
        None => 0,
    };
    let limit = page.limit.unwrap_or(20).clamp(1, 100);
    let data: Vec<serde_json::Value> = jobs
        .iter()
        .skip(start)
        .take(limit)
        .map(|j| j.public())
        .collect();
    let has_more = jobs.len() > start + data.len();
    Ok(Json(json!({"object": "list", "data": data, "has_more": has_more})).into_response())
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub async fn get_job(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(st.jobs.get(&id, Policy::owner_scope(&caller))?.public()).into_response())
}

/// `GET /v1/fine_tuning/jobs/{id}/events?after=ID&limit=N`: a line per training step, newest
/// first (ids `ftevent-JOB-N`, N counting from the first event).
pub async fn job_events(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Result<Response, ApiError> {
    let job = st.jobs.get(&id, Policy::owner_scope(&caller))?;
    let mut events = st.jobs.events(&job);
    for (i, e) in events.iter_mut().enumerate() {
        e["id"] = json!(format!("ftevent-{}-{i}", &job.id[6..]));
    }
    Ok(Json(newest_first(events, &page)).into_response())
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints?after=ID&limit=N`: the adapter at each epoch's
/// end with its training and validation loss, newest first.
pub async fn job_checkpoints(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Result<Response, ApiError> {
    let job = st.jobs.get(&id, Policy::owner_scope(&caller))?;
    Ok(Json(newest_first(st.jobs.checkpoints(&job), &page)).into_response())
}

/// One page of `items` (oldest first, each with an `id`) as an OpenAI list, newest first:
/// `limit` (default 20) after the item `after`.
fn newest_first(mut items: Vec<serde_json::Value>, page: &Page) -> serde_json::Value {
    items.reverse();
    let start = match &page.after {
        Some(a) => items
            .iter()
            .position(|e| e["id"] == a.as_str())
            .map_or(items.len(), |i| i + 1),
        None => 0,
    };
    let limit = page.limit.unwrap_or(20).clamp(1, 1000);
    let data: Vec<serde_json::Value> = items.iter().skip(start).take(limit).cloned().collect();
    let has_more = items.len() > start + data.len();
    let (first, last) = (
        data.first().map(|d| d["id"].clone()),
        data.last().map(|d| d["id"].clone()),
    );
    json!({"object": "list", "data": data, "has_more": has_more, "first_id": first, "last_id": last})
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`: 409 once the job has finished.
pub async fn cancel_job(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(st.jobs.cancel(&id, Policy::owner_scope(&caller))?.public()).into_response())
}
