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
use crate::model::LoadedModel;

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
    let config = validate::generation(&p.sampling, p.ids.len(), &st.config.limits, eos, p.field)?;
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
    let text = st
        .template
        .render(&escaped, true, &loaded.special_tokens())
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
