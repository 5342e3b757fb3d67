//! OpenAI request shapes (with the extensions `adapter`, `top_k`, `ignore_eos`, `min_tokens`),
//! parsed so that a wrong type names its field.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Chat message content: a string, or a list of parts of which the `text` ones count.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// Fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Option<StopField>,
    pub seed: Option<u64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub adapter: Option<String>,
    pub top_k: Option<i64>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub min_tokens: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Extension (vLLM, transformers): 1 = off.
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) → bias in −100..100.
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// Extension (vLLM): token ids that end the answer.
    pub stop_token_ids: Option<Vec<u32>>,
    /// An end-user id, recorded in the server log.
    pub user: Option<String>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema",
    /// "strict"}}`.
    pub response_format: Option<serde_json::Value>,
    /// Extensions (vLLM's names).
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    /// Extension (vLLM's): lower is served first; default 0.
    pub priority: Option<i64>,
    /// Extension: prompt-lookup speculative decoding, `{"method": "ngram", "num_tokens": k,
    /// "prompt_lookup_min": a, "prompt_lookup_max": b}` (`num_tokens` 0: off); absent: the
    /// server's default (`--speculative-ngram`).
    pub speculative: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub messages: Vec<MessageIn>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    /// Extension (vLLM's): more variables for the chat template, as `apply_chat_template`'s
    /// keyword arguments (`{"enable_thinking": false}` for Qwen3, `date_string` for Llama 3).
    pub chat_template_kwargs: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    /// Completions API: an integer number of alternatives.
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AddAdapterRequest {
    pub name: String,
    pub path: Option<String>,
    pub hub_id: Option<String>,
    #[serde(default)]
    pub pinned: bool,
    /// Register this kept revision of `name` again (a rollback to it).
    pub revision: Option<u64>,
    /// Register the revision before the current one again.
    #[serde(default)]
    pub rollback: bool,
}

/// vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
#[derive(Debug, Clone, Deserialize)]
pub struct VllmLoraRequest {
    pub lora_name: String,
    pub lora_path: Option<String>,
    /// The base the adapter is for (the adapter syncer of the Inference Extension sends it):
    /// must be the served model's id.
    pub base_model_name: Option<String>,
}

/// Parses a JSON body; a malformed body or a field of the wrong type is a 400 naming it.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_value(&json_object(body)?)
}

/// A generation request: its own fields and the shared sampling fields, each parsed so that
/// errors keep the field's name (serde's `flatten` would lose it).
pub fn parse_generation<T: DeserializeOwned>(body: &[u8]) -> Result<(T, Sampling), ApiError> {
    let value = json_object(body)?;
    Ok((from_value(&value)?, from_value(&value)?))
}

fn json_object(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::BadRequest {
        message: format!("the body is not valid JSON: {e}"),
        param: None,
    })?;
    if !value.is_object() {
        return Err(ApiError::BadRequest {
            message: "the body must be a JSON object".into(),
            param: None,
        });
    }
    Ok(value)
}

fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let param = if path == "." || path.is_empty() {
            None
        } else {
            Some(path.clone())
        };
        let message = match &param {
            Some(p) => format!("`{p}`: {inner}"),
            None => inner,
        };
        ApiError::BadRequest { message, param }
    })
}
