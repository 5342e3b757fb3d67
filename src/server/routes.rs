//! Route handlers, thin: each parses its body and asks the validation stage (`stage.rs`) or the
//! tenant policy (`policy.rs`); chat and completions share one path.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::auth::Caller;
use super::error::ApiError;
use super::meter::Meter;
use super::openai::{self, AddAdapterRequest, VllmLoraRequest};
use super::pages::{newest_first, Page};
use super::policy::{AdapterSource, Policy, Registration};
use super::rate_limit::{duration_text, Standing};
use super::responses::{self, Kind, Meta};
use super::stage;
use super::state::AppState;
use crate::adapters::{bind, hub, AdapterError, PeftAdapter};
use crate::engine::scheduler::RequestClass;
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
/// The header a gateway sets to pass a request's priority (vLLM's sense: lower is served
/// first); it overrides the body's `priority`.
pub const PRIORITY_HEADER: &str = "x-loraplex-priority";

/// The request's priority from the header or the body, within what the key may ask for.
fn priority(headers: &HeaderMap, body: Option<i64>, caller: &Caller) -> Result<i32, ApiError> {
    let (field, value) = match headers.get(PRIORITY_HEADER) {
        Some(v) => (
            PRIORITY_HEADER,
            v.to_str()
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    ApiError::bad(
                        PRIORITY_HEADER,
                        format!("`{PRIORITY_HEADER}` must be an integer"),
                    )
                })?,
        ),
        None => ("priority", body.unwrap_or(0)),
    };
    let p = i32::try_from(value)
        .map_err(|_| ApiError::bad(field, format!("`{field}` = {value} is out of range")))?;
    let min = caller.limits.min_priority;
    if p < min {
        return Err(ApiError::forbidden(
            field,
            format!("`{field}` = {p} is more urgent than this key may ask for (its `min_priority` is {min}; lower values are served first)"),
        ));
    }
    Ok(p)
}

async fn generate(
    st: Arc<AppState>,
    caller: Caller,
    headers: HeaderMap,
    kind: Kind,
    body: Bytes,
) -> Result<Response, ApiError> {
    let stage_caller = caller.clone();
    let p = st
        .prepare_for(&caller, move |st| {
            stage::prepare(st, &stage_caller, kind, &body)
        })
        .await?;
    let (adapter, adapter_label) = match &p.adapter {
        Some(entry) => (
            Some(
                st.lease(entry, None, p.adapter_name.as_deref())
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
    let priority = priority(&headers, p.sampling.priority, &caller)?;
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
            class: RequestClass {
                priority,
                weight: caller.limits.weight,
            },
        }
    };
    // A default `max_tokens` (the client sent none) is what the KV budget leaves, so that
    // it never comes back as a 400 about a field the client did not send.
    let defaulted = p.sampling.max_tokens.is_none() && p.sampling.max_completion_tokens.is_none();
    let budget = st.engine.kv_budget();
    let fits = |r: &ValidRequest| st.engine.kv_held(r) <= budget;
    let request = |i: usize| {
        let mut r = request(i);
        if defaulted && !fits(&r) {
            let fixed = r.kv_positions() - r.config.max_tokens;
            r.config.max_tokens = budget.saturating_sub(fixed);
            r.config.min_tokens = r.config.min_tokens.min(r.config.max_tokens);
        }
        r
    };
    if defaulted && request(0).config.max_tokens == 0 {
        let field = if matches!(kind, Kind::Chat) {
            "messages"
        } else {
            "prompt"
        };
        return Err(ApiError::bad(
            field,
            format!("`{field}` takes {} KV positions with the adapter's virtual tokens; the server holds {budget} per request", request(0).kv_positions()),
        ));
    }
    // The tenant's rate limits: the request is estimated at its prompt and `max_tokens` per
    // choice, and counted as it is served.
    let tenant = caller.tenant.clone().unwrap_or_default();
    let estimate = (p.prompt.len() + n * request(0).config.max_tokens) as u64;
    let permit = st
        .rate
        .admit(&tenant, &caller.limits.rate, estimate)
        .map_err(|l| {
            st.metrics.rate_limited.with_label_values(&[l.limit]).inc();
            ApiError::RateLimited(l)
        })?;
    let meter = Meter::new(
        permit,
        st.usage.clone(),
        st.metrics.clone(),
        &tenant,
        adapter_label.as_deref().unwrap_or(""),
        p.prompt.len(),
    );
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
    let mut resp = if p.sampling.stream {
        responses::stream(meta, rxs, meter)
    } else {
        responses::collect(meta, rxs, p.logprobs.is_some(), meter).await?
    };
    rate_headers(
        resp.headers_mut(),
        &st.rate.standing(&tenant, &caller.limits.rate),
    );
    Ok(resp)
}

/// OpenAI's `x-ratelimit-*` headers, for the limits the tenant has.
fn rate_headers(h: &mut HeaderMap, s: &Standing) {
    let mut put = |name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    if let Some(l) = s.limit_requests {
        put("x-ratelimit-limit-requests", l.to_string());
        put(
            "x-ratelimit-remaining-requests",
            s.remaining_requests.to_string(),
        );
        put(
            "x-ratelimit-reset-requests",
            duration_text(s.reset_requests),
        );
    }
    if let Some(l) = s.limit_tokens {
        put("x-ratelimit-limit-tokens", l.to_string());
        put(
            "x-ratelimit-remaining-tokens",
            s.remaining_tokens.to_string(),
        );
        put("x-ratelimit-reset-tokens", duration_text(s.reset_tokens));
    }
}

#[derive(Debug, serde::Deserialize)]
pub struct UsageQuery {
    tenant: Option<String>,
    start: Option<u64>,
    end: Option<u64>,
}

/// `GET /v1/usage?tenant=…&start=…&end=…` (unix seconds; buckets of a minute, of an hour past a
/// day): prompt, completion and cached tokens and requests per tenant and adapter. Admins read
/// any tenant (all without `tenant`); a tenant's key reads its own only.
pub async fn usage(
    State(st): St,
    Extension(caller): Extension<Caller>,
    query: Result<axum::extract::Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::BadRequest {
        message: format!("bad query: {}", e.body_text()),
        param: None,
    })?;
    let start = q.start.unwrap_or(0);
    let end = q.end.unwrap_or(u64::MAX);
    if end <= start {
        return Err(ApiError::bad(
            "end",
            format!("`end` ({end}) must be after `start` ({start})"),
        ));
    }
    let tenant = match (caller.admin, &q.tenant, &caller.tenant) {
        (true, want, _) => want.clone(),
        (false, Some(want), Some(mine)) if want != mine => {
            return Err(ApiError::forbidden(
                "tenant",
                "a tenant's key may read only its own usage",
            ))
        }
        (false, _, mine) => Some(mine.clone().unwrap_or_default()),
    };
    let rows = st.usage.report(tenant.as_deref(), start, end);
    Ok(Json(json!({
        "object": "list",
        "start": start,
        "end": q.end,
        "data": rows,
    }))
    .into_response())
}

pub async fn chat(
    State(st): St,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(st, caller, headers, Kind::Chat, body(b)?).await
}

pub async fn completions(
    State(st): St,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(st, caller, headers, Kind::Completion, body(b)?).await
}

/// `GET /v1/models[?after=ID&limit=N]`: the base model, then the adapters the caller may use,
/// by id. Without `after` or `limit` the whole list (what OpenAI's clients expect of this
/// route); with either, one page of at most `limit` (1 … 1,000, default 100) with `has_more`,
/// `first_id` and `last_id`, as OpenAI's paginated lists.
pub async fn models(
    State(st): St,
    Extension(caller): Extension<Caller>,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Result<Response, ApiError> {
    let base = st.base_id().to_string();
    let (listing_caller, window, lead) = (caller.clone(), page.clone(), base.clone());
    let (entries, with_base, more) = st
        .prepare_for(&caller, move |st| {
            Ok(Policy::listing(
                &listing_caller,
                &st.registry,
                &window,
                &[lead],
            ))
        })
        .await?;
    let mut data = Vec::with_capacity(entries.len() + 1);
    if with_base {
        data.push(json!({"id": base, "object": "model", "created": st.created, "owned_by": "loraplex", "root": base, "parent": null}));
    }
    data.extend(entries.iter().map(|e| {
        let id = e.name.key();
        let root = if Policy::shows_paths(&caller) {
            e.dir.display().to_string()
        } else {
            id.clone()
        };
        json!({"id": id, "object": "model", "created": st.created, "owned_by": e.name.tenant.clone().unwrap_or_else(|| "loraplex".into()), "root": root, "parent": base})
    }));
    Ok(Json(page.list(data, more)).into_response())
}

/// `GET /v1/adapters[?after=NAME&limit=N]`: the adapters the caller may use, by name, paged as
/// `/v1/models` is (only a page's configs are read).
pub async fn list_adapters(
    State(st): St,
    Extension(caller): Extension<Caller>,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Result<Response, ApiError> {
    let resident = st.cache.resident();
    let shows_cache = Policy::shows_cache(&caller);
    let window = page.clone();
    let (entries, more) = st
        .blocking(
            |s| &s.prepare,
            move |st| {
                let (page, _, more) = Policy::listing(&caller, &st.registry, &window, &[]);
                // With each adapter's method, from its config (off the async threads).
                let entries = page
                    .into_iter()
                    .map(|e| {
                        let method = crate::adapters::PeftAdapter::read_config(&e.dir)
                            .ok()
                            .map(|c| c.method_name());
                        (e, method)
                    })
                    .collect::<Vec<_>>();
                Ok((entries, more))
            },
        )
        .await?;
    let data: Vec<_> = entries
        .into_iter()
        .map(|(e, method)| {
            let mut v = json!({"name": e.name.key(), "pinned": e.pinned, "version": e.revision, "revisions": st.registry.revisions(&e.name), "method": method});
            if shows_cache {
                v["resident"] = json!(resident.contains(&e.name));
            }
            v
        })
        .collect();
    Ok(Json(page.list(data, more)).into_response())
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
    // Where the new revision's files come from: a directory (the hub's download lands in one)
    // or a kept revision.
    enum Files {
        Dir(std::path::PathBuf),
        Kept(crate::adapters::registry::AdapterEntry),
    }
    let files = match source {
        AdapterSource::Dir(d) => Files::Dir(d),
        AdapterSource::Kept(e) => Files::Kept(e),
        AdapterSource::Hub { id, options } => {
            let _permit = st
                .loads
                .acquire()
                .await
                .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
            Files::Dir(
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
                })?,
            )
        }
    };
    let restored = match &files {
        Files::Kept(e) => Some(e.revision),
        Files::Dir(_) => None,
    };
    let (check_caller, check_name) = (caller.clone(), name.clone());
    let (bytes, weights, version, snap) = st
        .blocking(
            |s| &s.loads,
            move |st| {
                // The files as they are now (or a kept revision's) are what this revision
                // serves for as long as it lives, whatever happens to the source afterwards.
                let (version, snap) = match &files {
                    Files::Dir(d) => st.registry.snapshot(d)?,
                    Files::Kept(kept) => st.registry.restore(kept)?,
                };
                let checked = (|| {
                    let header = PeftAdapter::inspect(&snap.dir)?;
                    bind::check(&header, &st.engine.model().model, &st.config.bind)?;
                    Policy::check_quota(&check_caller, &st.registry, &check_name, header.bytes)?;
                    let bytes = header.bytes;
                    let weights = bind::bind(
                        &PeftAdapter::load_tensors(header)?,
                        &st.engine.model().model,
                        &st.config.bind,
                    )?;
                    Ok::<_, ApiError>((bytes, weights))
                })();
                match checked {
                    Ok((bytes, weights)) => Ok((bytes, weights, version, snap)),
                    Err(e) => {
                        snap.discard();
                        // Errors name the files the caller gave, not the snapshot's copies.
                        let source = match &files {
                            Files::Dir(d) => d.display().to_string(),
                            Files::Kept(kept) => format!("{}@{}", kept.name, kept.revision),
                        };
                        Err(e.replace_in_message(&snap.dir.display().to_string(), &source))
                    }
                }
            },
        )
        .await?;
    let entry = st.registry.add(&name, snap, version, reg.pinned, bytes)?;
    st.lease(&entry, Some(weights), None).await?;
    let mut out = json!({"name": entry.name.key(), "pinned": entry.pinned, "version": entry.revision, "revisions": st.registry.revisions(&entry.name)});
    if let Some(r) = restored {
        out["restored_revision"] = json!(r);
    }
    Ok((StatusCode::CREATED, Json(out)).into_response())
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
        revision: req.revision,
        rollback: req.rollback,
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
        revision: None,
        rollback: false,
    };
    add(st.clone(), caller, reg).await
}

/// `POST /tokenize` (as vLLM has it): `{"prompt"}` or `{"messages"}` → `{"count",
/// "max_model_len", "tokens"}`.
pub async fn tokenize(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body(b)?;
    let ids = st
        .prepare_for(&caller, move |st| stage::tokenize(st, &body))
        .await?;
    Ok(
        Json(json!({"count": ids.len(), "max_model_len": st.config.limits.context, "tokens": ids}))
            .into_response(),
    )
}

/// `POST /detokenize`: `{"tokens": [ids]}` → `{"prompt"}`.
pub async fn detokenize(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(b)?;
    // Parsing a large array and decoding it is CPU work: off the async threads, in the
    // caller's share of the preparation pool.
    let text = st
        .prepare_for(&caller, move |st| {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
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
            st.engine
                .model()
                .tokenizer
                .decode(&ids, false)
                .map_err(|e| ApiError::bad("tokens", e.to_string()))
        })
        .await?;
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
    // The check, the quota and the write off the async threads, in the caller's share.
    let record = st
        .prepare_for(&caller.clone(), move |st| {
            let limit =
                (!caller.admin).then_some((caller.limits.max_file_bytes, caller.limits.max_files));
            st.files.create(
                caller.tenant.as_deref(),
                &name,
                &purpose,
                &content,
                limit,
                Some(st.config.train.max_messages),
            )
        })
        .await?;
    Ok((StatusCode::OK, Json(record.public())).into_response())
}

/// `GET /v1/files`: the caller's files, newest first.
pub async fn list_files(
    State(st): St,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let data: Vec<serde_json::Value> = st
        .prepare_for(&caller.clone(), move |st| {
            Ok(st
                .files
                .list(Policy::owner_scope(&caller))
                .iter()
                .map(|f| f.public())
                .collect())
        })
        .await?;
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/files/{id}`: another tenant's file is the same 404 as a missing one.
pub async fn get_file(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = st
        .prepare_for(&caller.clone(), move |st| {
            st.files.get(&id, Policy::owner_scope(&caller))
        })
        .await?;
    Ok(Json(record.public()).into_response())
}

/// `DELETE /v1/files/{id}`.
pub async fn delete_file(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let file = id.clone();
    st.prepare_for(&caller.clone(), move |st| {
        st.files.delete(&file, Policy::owner_scope(&caller))
    })
    .await?;
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
}

/// `POST /v1/fine_tuning/jobs`: checked, kept, queued for validation.
pub async fn create_job(
    State(st): St,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(b)?;
    let job = st
        .prepare_for(&caller.clone(), move |st| {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::bad("body", format!("is not valid JSON: {e}")))?;
            let base = st.engine.model().id.clone();
            let (job, file) = super::job_request::new_job(&v, caller.tenant.clone(), &base)?;
            // Another tenant's file and a missing one are the same 404.
            let record = st.files.get(&file, Policy::owner_scope(&caller))?;
            if let Some(v) = &job.validation_file {
                st.files.get(v, Policy::owner_scope(&caller))?;
            }
            let limits = &st.config.train;
            let examples = record.lines.saturating_mul(job.hyperparameters.n_epochs);
            if examples > limits.max_job_examples {
                return Err(ApiError::bad(
                    "method.supervised.hyperparameters.n_epochs",
                    format!(
                        "{} epochs over {} examples is {examples}; this server trains at most {} per job (`--train-max-job-examples`)",
                        job.hyperparameters.n_epochs, record.lines, limits.max_job_examples
                    ),
                ));
            }
            if !caller.admin {
                check_job_quotas(st, &caller, &job)?;
            }
            let max_jobs = (!caller.admin).then_some(caller.limits.max_jobs);
            st.jobs.submit(st, job, max_jobs)
        })
        .await?;
    Ok(Json(job.public()).into_response())
}

/// What a new job will register and write stays within the caller's quotas: its model and
/// three checkpoints count as adapters (`max_adapters`, `max_adapter_bytes`), and its outputs
/// (those four plus the resume state) as job bytes (`max_job_bytes`), with every job of the
/// caller still at work counted the same.
fn check_job_quotas(
    st: &AppState,
    caller: &Caller,
    job: &super::jobs::JobRecord,
) -> Result<(), ApiError> {
    let Some(tenant) = caller.tenant.as_deref() else {
        return Ok(());
    };
    let limits = &caller.limits;
    let adapter =
        super::job_runner::adapter_bytes(st, job.adapter.rank, job.adapter.method == "dora");
    let at_work = st.jobs.busy(Some(tenant)) + 1;
    let (count, bytes) = st.registry.added_by(tenant);
    if count + 4 * at_work > limits.max_adapters {
        return Err(ApiError::forbidden(
            "training_file",
            format!(
                "quota: a job registers its model and three checkpoints as adapters; with {count} registered and {} more coming from your jobs at work this would exceed your key's {} (`max_adapters`)",
                4 * (at_work - 1),
                limits.max_adapters
            ),
        ));
    }
    if bytes + 4 * adapter * at_work as u64 > limits.max_adapter_bytes {
        return Err(ApiError::forbidden(
            "adapter.rank",
            format!(
                "quota: the job's model and checkpoints ({} bytes) would exceed your key's `max_adapter_bytes` ({})",
                4 * adapter,
                limits.max_adapter_bytes
            ),
        ));
    }
    // Model + three checkpoints + the resume state (adapter and two optimizer moments).
    let outputs = 7 * adapter;
    let used = st.jobs.output_bytes(Some(tenant), outputs);
    if used + outputs > limits.max_job_bytes {
        return Err(ApiError::forbidden(
            "adapter.rank",
            format!(
                "quota: the job's outputs (about {outputs} bytes) would bring your fine-tuning jobs' disk use to {} bytes, over your key's `max_job_bytes` ({}); delete fine-tuned models (`DELETE /v1/models/{{model}}`) first",
                used + outputs,
                limits.max_job_bytes
            ),
        ));
    }
    Ok(())
}

/// `DELETE /v1/models/{model}` (OpenAI's route) for a fine-tuned model: its adapter and
/// checkpoints are unregistered and their files removed, for good (a restart does not bring
/// them back). Any other model is a 404 here.
pub async fn delete_model(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let scope_caller = caller.clone();
    let requested = name.clone();
    st.prepare_for(&caller, move |st| {
        let scope = Policy::owner_scope(&scope_caller);
        let job = st
            .jobs
            .by_model(&requested, scope)
            .ok_or_else(|| ApiError::ModelNotFound(requested.clone()))?;
        if requested.contains(":ckpt-step-") {
            return Err(ApiError::bad(
                "model",
                format!(
                    "`{requested}` is a checkpoint of `{}`; delete that model (its checkpoints go with it)",
                    job.fine_tuned_model.as_deref().unwrap_or_default()
                ),
            ));
        }
        super::job_runner::delete_model(st, &job)
    })
    .await?;
    Ok(Json(json!({"id": name, "object": "model", "deleted": true})).into_response())
}

/// `GET /v1/fine_tuning/jobs?after=ID&limit=N`: the caller's jobs, newest first.
pub async fn list_jobs(
    State(st): St,
    Extension(caller): Extension<Caller>,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Result<Response, ApiError> {
    let jobs = st
        .prepare_for(&caller.clone(), move |st| {
            Ok(st.jobs.list(Policy::owner_scope(&caller)))
        })
        .await?;
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
    let job = st
        .prepare_for(&caller.clone(), move |st| {
            st.jobs.get(&id, Policy::owner_scope(&caller))
        })
        .await?;
    Ok(Json(job.public()).into_response())
}

/// `GET /v1/fine_tuning/jobs/{id}/events?after=ID&limit=N`: a line per training step, newest
/// first (ids `ftevent-JOB-N`, N counting from the first event).
pub async fn job_events(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Result<Response, ApiError> {
    let events = st
        .prepare_for(&caller.clone(), move |st| {
            let job = st.jobs.get(&id, Policy::owner_scope(&caller))?;
            let events = st.jobs.events(&job);
            Ok((job, events))
        })
        .await
        .map(|(job, events)| {
            let prefix = job.id[6..].to_string();
            events
                .into_iter()
                .enumerate()
                .map(|(i, mut e)| {
                    e["id"] = json!(format!("ftevent-{prefix}-{i}"));
                    e
                })
                .collect::<Vec<_>>()
        })?;
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
    let checkpoints = st
        .prepare_for(&caller.clone(), move |st| {
            let job = st.jobs.get(&id, Policy::owner_scope(&caller))?;
            Ok(st.jobs.checkpoints(&job))
        })
        .await?;
    Ok(Json(newest_first(checkpoints, &page)).into_response())
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`: 409 once the job has finished.
pub async fn cancel_job(
    State(st): St,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = st
        .prepare_for(&caller.clone(), move |st| {
            st.jobs.cancel(&id, Policy::owner_scope(&caller))
        })
        .await?;
    Ok(Json(job.public()).into_response())
}
