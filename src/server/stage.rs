//! The validation stage every generation request passes, on the blocking pool (bounded by
//! `AppState::prepare`), never on the async threads: parse → a cheap length bound → render →
//! tokenize → check → which adapter (as TGI's router validates before it queues). Chat and
//! completions share it; they differ only in how the prompt becomes token ids.
//!
//! Chat message contents are tokenized with special tokens as plain text: only the template's
//! own markup yields control tokens, so user text cannot forge a turn.

use super::auth::Caller;
use super::error::ApiError;
use super::openai::{self, ChatCompletionRequest, CompletionRequest, PromptField, Sampling};
use super::policy::Policy;
use super::responses::Kind;
use super::state::AppState;
use super::validate;
use crate::adapters::registry::AdapterEntry;
use crate::chat::ChatMessage;
use crate::engine::GenerationConfig;
use crate::guided::Constraint;
use crate::model::LoadedModel;
use serde_json::Value;

/// A request ready for the engine, but for its adapter lease.
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    pub config: GenerationConfig,
    pub logprobs: Option<usize>,
    /// Text to put before the answer (completions `echo`).
    pub echo: Option<String>,
    /// The adapter it asked for, as the caller may see it.
    pub adapter: Option<AdapterEntry>,
    /// The `model` to report back.
    pub model: String,
    /// The adapter's name as the request gave it.
    pub adapter_name: Option<String>,
}

struct Prompt {
    ids: Vec<u32>,
    sampling: Sampling,
    logprobs: Option<usize>,
    echo: Option<String>,
    field: &'static str,
}

/// Parses and checks a generation request.
pub fn prepare(
    st: &AppState,
    caller: &Caller,
    kind: Kind,
    body: &[u8],
) -> Result<Prepared, ApiError> {
    let loaded = st.engine.model();
    let p = match kind {
        Kind::Chat => chat_prompt(st, loaded, body)?,
        Kind::Completion => completion_prompt(st, loaded, body)?,
    };
    let eos = loaded.stop_token_ids(&st.template);
    let mut config =
        validate::generation(&p.sampling, p.ids.len(), &st.config.limits, eos, p.field)?;
    let base = st.base_id();
    let requested = match (&p.sampling.adapter, &p.sampling.model) {
        (Some(a), _) => Some(a.as_str()),
        (None, Some(m)) if m != base => Some(m.as_str()),
        _ => None,
    };
    let adapter = requested
        .map(|r| Policy::find(caller, &st.registry, r))
        .transpose()?;
    let adapter_name = requested.map(str::to_string);
    // Structured outputs: the request's constraint, else the adapter's default (`loraplex.json`
    // beside its PEFT config).
    // (`response_format: {"type": "text"}` asks for no constraint, over the adapter's default.)
    let constraint = match (constraint(&p.sampling)?, &adapter) {
        (Some(c), _) => Some(c),
        (None, _) if p.sampling.response_format.is_some() => None,
        (None, Some(entry)) => adapter_default(st, entry)?,
        (None, None) => None,
    };
    if let Some((field, c)) = constraint {
        let guidance = st.guidance.get().map_err(|_| {
            ApiError::bad(
                &field,
                "structured outputs are unavailable for this model's tokenizer",
            )
        })?;
        config.guide = Some(
            guidance
                .compile_for(caller.tenant.as_deref(), &c)
                .map_err(|e| ApiError::bad(&field, format!("`{field}`: {e}")))?,
        );
    }
    if let Some(user) = &p.sampling.user {
        tracing::info!(user = %user, adapter = ?adapter_name, tenant = ?caller.tenant, "generation request");
    }
    Ok(Prepared {
        adapter_name,
        prompt: p.ids,
        model: p.sampling.model.clone().unwrap_or_else(|| base.to_string()),
        sampling: p.sampling,
        config,
        logprobs: p.logprobs,
        echo: p.echo,
        adapter,
    })
}

/// Refuses text that cannot fit the context whatever it tokenizes to (no token covers more
/// bytes than the vocabulary's longest), before any tokenizing.
fn length_bound(
    st: &AppState,
    loaded: &LoadedModel,
    bytes: usize,
    field: &str,
) -> Result<(), ApiError> {
    let at_least = loaded.tokenizer.min_tokens_for_bytes(bytes);
    let context = st.config.limits.context;
    if at_least + 1 > context {
        return Err(ApiError::bad(
            field,
            format!(
                "`{field}` is at least {at_least} tokens; the model's context is {context} tokens"
            ),
        ));
    }
    Ok(())
}

/// The constraint a request asks for, and the field that names it (for errors).
fn constraint(s: &Sampling) -> Result<Option<(String, Constraint)>, ApiError> {
    let mut found = Vec::new();
    if let Some(rf) = &s.response_format {
        if let Some(c) = response_format(rf, "response_format")? {
            found.push(c);
        }
    }
    if let Some(schema) = &s.guided_json {
        found.push((
            "guided_json".to_string(),
            json_schema(schema, "guided_json")?,
        ));
    }
    if let Some(r) = &s.guided_regex {
        found.push(("guided_regex".to_string(), Constraint::Regex(r.clone())));
    }
    if let Some(c) = &s.guided_choice {
        found.push(("guided_choice".to_string(), Constraint::Choice(c.clone())));
    }
    if found.len() > 1 {
        return Err(ApiError::bad(
            &found[1].0,
            format!(
                "`{}` and `{}` cannot both constrain one answer",
                found[0].0, found[1].0
            ),
        ));
    }
    Ok(found.pop())
}

/// OpenAI's `response_format` (at `field`): `text` is no constraint.
fn response_format(rf: &Value, field: &str) -> Result<Option<(String, Constraint)>, ApiError> {
    let bad = |f: &str, m: &str| ApiError::bad(f, format!("`{f}` {m}"));
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some((field.to_string(), Constraint::JsonObject))),
        Some("json_schema") => {
            let js = rf
                .get("json_schema")
                .filter(|v| v.is_object())
                .ok_or_else(|| {
                    bad(
                        &format!("{field}.json_schema"),
                        "must be an object with `schema`",
                    )
                })?;
            let at = format!("{field}.json_schema.schema");
            let schema = js.get("schema").ok_or_else(|| bad(&at, "is missing"))?;
            Ok(Some((at.clone(), json_schema(schema, &at)?)))
        }
        _ => Err(bad(
            &format!("{field}.type"),
            "must be `text`, `json_object` or `json_schema`",
        )),
    }
}

fn json_schema(schema: &Value, field: &str) -> Result<Constraint, ApiError> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(ApiError::bad(
            field,
            format!("`{field}` must be a JSON schema (an object)"),
        ));
    }
    Ok(Constraint::JsonSchema(schema.to_string()))
}

/// An adapter's default `response_format`, from `loraplex.json` in its directory.
/// Read once per adapter version (cached in `AppState::sidecars`; a bad file is not cached).
fn adapter_default(
    st: &AppState,
    entry: &AdapterEntry,
) -> Result<Option<(String, Constraint)>, ApiError> {
    let cached = st
        .sidecars
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&entry.key())
        .cloned();
    if let Some(c) = cached {
        return Ok(c);
    }
    let read = read_sidecar(entry)?;
    st.sidecars
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .put(entry.key(), read.clone());
    Ok(read)
}

fn read_sidecar(entry: &AdapterEntry) -> Result<Option<(String, Constraint)>, ApiError> {
    let path = entry.dir.join(ADAPTER_SIDECAR);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let invalid = |m: String| {
        ApiError::Internal(format!(
            "adapter `{}`: {ADAPTER_SIDECAR}: {m}",
            entry.name.key()
        ))
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    match v.get("response_format") {
        Some(rf) => response_format(rf, "response_format").map_err(|e| invalid(e.message())),
        None => Ok(None),
    }
}

/// The file beside an adapter's PEFT config that holds its serving defaults.
pub const ADAPTER_SIDECAR: &str = "loraplex.json";

/// `/tokenize`: the ids a chat body (`messages`, rendered with the chat template and the
/// assistant's turn opened) or a completions body (`prompt`) would be generated from.
pub fn tokenize(st: &AppState, body: &[u8]) -> Result<Vec<u32>, ApiError> {
    let loaded = st.engine.model();
    let is_chat = serde_json::from_slice::<serde_json::Value>(body)
        .map(|v| v.get("messages").is_some())
        .unwrap_or(false);
    let p = if is_chat {
        chat_prompt(st, loaded, body)?
    } else {
        completion_prompt(st, loaded, body)?
    };
    Ok(p.ids)
}

/// `chat_template_kwargs`: an object whose keys are not the ones the server sets itself.
fn template_kwargs(
    v: Option<&serde_json::Value>,
) -> Result<std::collections::BTreeMap<String, minijinja::Value>, ApiError> {
    const FIELD: &str = "chat_template_kwargs";
    let Some(v) = v else {
        return Ok(Default::default());
    };
    let Some(map) = v.as_object() else {
        return Err(ApiError::bad(
            FIELD,
            "`chat_template_kwargs` must be an object",
        ));
    };
    map.iter()
        .map(|(k, v)| {
            if [
                "messages",
                "add_generation_prompt",
                "bos_token",
                "eos_token",
            ]
            .contains(&k.as_str())
            {
                return Err(ApiError::bad(
                    FIELD,
                    format!("`chat_template_kwargs.{k}` is set by the server"),
                ));
            }
            Ok((k.clone(), minijinja::Value::from_serialize(v)))
        })
        .collect()
}

fn chat_prompt(st: &AppState, loaded: &LoadedModel, body: &[u8]) -> Result<Prompt, ApiError> {
    let (req, sampling): (ChatCompletionRequest, Sampling) = openai::parse_generation(body)?;
    let messages = validate::messages(&req.messages)?;
    let bytes = messages.iter().map(|m| m.content.len()).sum();
    length_bound(st, loaded, bytes, "messages")?;
    let tok = &loaded.tokenizer;
    let escaped: Vec<ChatMessage> = messages
        .iter()
        .map(|m| ChatMessage::new(&m.role, &tok.escape(&m.content)))
        .collect();
    let vars = template_kwargs(req.chat_template_kwargs.as_ref())?;
    let text = st
        .template
        .render_with(&escaped, true, &loaded.special_tokens(), &vars)
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let ids = tok
        .encode_escaped(&text)
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
    Ok(Prompt {
        ids,
        sampling,
        logprobs,
        echo: None,
        field: "messages",
    })
}

fn completion_prompt(st: &AppState, loaded: &LoadedModel, body: &[u8]) -> Result<Prompt, ApiError> {
    let (req, sampling): (CompletionRequest, Sampling) = openai::parse_generation(body)?;
    let encode = |t: &str| {
        length_bound(st, loaded, t.len(), "prompt")?;
        let mut ids: Vec<u32> = loaded.prompt_bos().into_iter().collect();
        ids.extend(
            loaded
                .tokenizer
                .encode(t)
                .map_err(|e| ApiError::bad("prompt", e.to_string()))?,
        );
        Ok::<_, ApiError>(ids)
    };
    let (ids, text) = match &req.prompt {
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
    if ids.is_empty()
        || text.is_empty() && matches!(req.prompt, PromptField::Text(_) | PromptField::Texts(_))
    {
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
    Ok(Prompt {
        ids,
        sampling,
        logprobs,
        echo: req.echo.then_some(text),
        field: "prompt",
    })
}
