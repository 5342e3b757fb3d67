//! Request validation: OpenAI request → generation settings, each bad value a 400 that names
//! its field.

use super::error::ApiError;
use super::openai::{Content, MessageIn, Sampling, StopField};
use crate::chat::ChatMessage;
use crate::engine::{GenerationConfig, NgramSpec, SamplingParams};

pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Limits that come from the server's configuration and the model.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `--max-tokens-cap`.
    pub max_tokens_cap: usize,
    /// The model's context in tokens.
    pub context: usize,
    /// Token ids are below this (logit_bias, stop_token_ids).
    pub vocab: usize,
    /// `--max-n`: choices per request.
    pub max_n: usize,
    /// `--max-stop-bytes`: the longest stop string (at most 4 of them): each is matched
    /// against the new text of every step, and held-back text is checked against its prefixes.
    pub max_stop_bytes: usize,
    /// `--speculative-ngram` and its settings: the prompt lookup of a request that does not say.
    pub speculative: Option<NgramSpec>,
    /// `--speculative-max-batch`.
    pub speculative_max_batch: usize,
}

pub fn messages(messages: &[MessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad("messages", "`messages` must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::bad(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` is `{}`; expected one of {}", m.role, ROLES.join(", ")),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        if p.kind != "text" {
                            return Err(ApiError::bad(
                                &format!("messages[{i}].content[{j}].type"),
                                format!("`messages[{i}].content[{j}].type` is `{}`; only text parts are supported", p.kind),
                            ));
                        }
                        text.push_str(p.text.as_deref().unwrap_or_default());
                    }
                    text
                }
            };
            Ok(ChatMessage::new(&m.role, &content))
        })
        .collect()
}

/// Builds the generation settings for a prompt of `prompt_len` tokens.
/// Most entries of `logit_bias` and of `stop_token_ids` (each is looked at every step).
pub const MAX_TOKEN_LIST: usize = 1024;

pub fn generation(
    s: &Sampling,
    prompt_len: usize,
    limits: &Limits,
    eos: Vec<u32>,
    prompt_field: &str,
) -> Result<GenerationConfig, ApiError> {
    if let Some(n) = s.n {
        if n < 1 || n as usize > limits.max_n {
            return Err(ApiError::bad(
                "n",
                format!("`n` must be between 1 and {} (--max-n)", limits.max_n),
            ));
        }
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            "`temperature` must be between 0 and 2",
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", "`top_p` must be in (0, 1]"));
    }
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(_) => {
            return Err(ApiError::bad(
                "top_k",
                "`top_k` must be -1, 0 (off) or positive",
            ))
        }
    };
    if prompt_len + 1 > limits.context {
        return Err(ApiError::bad(
            prompt_field,
            format!(
                "`{prompt_field}` is {prompt_len} tokens; the model's context is {} tokens",
                limits.context
            ),
        ));
    }
    let room = limits.context - prompt_len;
    let requested = s.max_completion_tokens.or(s.max_tokens);
    let field = if s.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match requested {
        None => room.min(limits.max_tokens_cap),
        Some(m) if m < 1 => return Err(ApiError::bad(field, format!("`{field}` must be at least 1"))),
        Some(m) if m as usize > limits.max_tokens_cap => {
            return Err(ApiError::bad(field, format!("`{field}` must be at most {}", limits.max_tokens_cap)))
        }
        Some(m) if m as usize > room => {
            return Err(ApiError::bad(
                field,
                format!("`{field}` ({m}) plus the prompt ({prompt_len} tokens) exceeds the context of {} tokens", limits.context),
            ))
        }
        Some(m) => m as usize,
    };
    let min_tokens = match s.min_tokens {
        None => 0,
        Some(m) if m < 0 => {
            return Err(ApiError::bad(
                "min_tokens",
                "`min_tokens` must not be negative",
            ))
        }
        Some(m) if m as usize > max_tokens => {
            return Err(ApiError::bad(
                "min_tokens",
                "`min_tokens` must not exceed `max_tokens`",
            ))
        }
        Some(m) => m as usize,
    };
    let penalty = |field: &str, v: Option<f64>, lo: f64, hi: f64, default: f64| match v {
        None => Ok(default as f32),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(x as f32),
        Some(_) => Err(ApiError::bad(
            field,
            format!("`{field}` must be between {lo} and {hi}"),
        )),
    };
    let presence_penalty = penalty("presence_penalty", s.presence_penalty, -2.0, 2.0, 0.0)?;
    let frequency_penalty = penalty("frequency_penalty", s.frequency_penalty, -2.0, 2.0, 0.0)?;
    let repetition_penalty = match s.repetition_penalty {
        Some(x) if !(x.is_finite() && x > 0.0 && x <= 10.0) => {
            return Err(ApiError::bad(
                "repetition_penalty",
                "`repetition_penalty` must be in (0, 10] (1 = off)",
            ))
        }
        v => v.unwrap_or(1.0) as f32,
    };
    let biases = s.logit_bias.as_ref().map_or(0, |m| m.len());
    if biases > MAX_TOKEN_LIST {
        return Err(ApiError::bad(
            "logit_bias",
            format!("`logit_bias` takes at most {MAX_TOKEN_LIST} tokens ({biases} given)"),
        ));
    }
    let mut logit_bias: Vec<(u32, f32)> = Vec::new();
    for (key, &bias) in s.logit_bias.iter().flatten() {
        let field = format!("logit_bias.{key}");
        let id: u32 = key.parse().map_err(|_| {
            ApiError::bad(&field, format!("`{field}`: keys are token ids (integers)"))
        })?;
        if id as usize >= limits.vocab {
            return Err(ApiError::bad(
                &field,
                format!(
                    "`{field}`: token {id} is outside the vocabulary of {}",
                    limits.vocab
                ),
            ));
        }
        if !(bias.is_finite() && (-100.0..=100.0).contains(&bias)) {
            return Err(ApiError::bad(
                &field,
                format!("`{field}`: a bias must be between -100 and 100"),
            ));
        }
        if logit_bias.iter().any(|&(t, _)| t == id) {
            return Err(ApiError::bad(
                &field,
                format!("`{field}`: token {id} is given twice"),
            ));
        }
        logit_bias.push((id, bias as f32));
    }
    let mut stop_token_ids = s.stop_token_ids.clone().unwrap_or_default();
    if stop_token_ids.len() > MAX_TOKEN_LIST {
        return Err(ApiError::bad(
            "stop_token_ids",
            format!("`stop_token_ids` takes at most {MAX_TOKEN_LIST} tokens"),
        ));
    }
    stop_token_ids.sort_unstable();
    stop_token_ids.dedup();
    if let Some(bad) = stop_token_ids.iter().find(|&&t| t as usize >= limits.vocab) {
        return Err(ApiError::bad(
            "stop_token_ids",
            format!(
                "`stop_token_ids`: token {bad} is outside the vocabulary of {}",
                limits.vocab
            ),
        ));
    }
    let stop = match &s.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) if v.len() > 4 => {
            return Err(ApiError::bad("stop", "`stop` takes at most 4 strings"))
        }
        Some(StopField::Many(v)) => v.clone(),
    };
    if let Some((i, long)) = stop
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > limits.max_stop_bytes)
    {
        let field = match &s.stop {
            Some(StopField::Many(_)) => format!("stop[{i}]"),
            _ => "stop".to_string(),
        };
        return Err(ApiError::bad(
            &field,
            format!(
                "`{field}` is {} bytes; stop strings are at most {} bytes (`--max-stop-bytes`)",
                long.len(),
                limits.max_stop_bytes
            ),
        ));
    }
    let speculative = speculative(s.speculative.as_ref(), limits)?;
    Ok(GenerationConfig {
        speculative,
        max_tokens,
        min_tokens,
        ignore_eos: s.ignore_eos,
        stop,
        eos_token_ids: eos,
        stop_token_ids,
        guide: None,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed: s.seed,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            logit_bias,
        },
    })
}

/// A request's `speculative` object (absent or null: the server's default).
fn speculative(
    v: Option<&serde_json::Value>,
    limits: &Limits,
) -> Result<Option<NgramSpec>, ApiError> {
    let default = limits.speculative;
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(default);
    };
    let Some(obj) = v.as_object() else {
        return Err(ApiError::bad(
            "speculative",
            "`speculative` must be an object such as {\"method\": \"ngram\", \"num_tokens\": 4}",
        ));
    };
    const KEYS: [&str; 4] = [
        "method",
        "num_tokens",
        "prompt_lookup_min",
        "prompt_lookup_max",
    ];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        let field = format!("speculative.{k}");
        return Err(ApiError::bad(
            &field,
            format!("`{field}` is not a setting; expected {}", KEYS.join(", ")),
        ));
    }
    match obj.get("method").and_then(|m| m.as_str()) {
        Some("ngram") => {}
        _ => {
            return Err(ApiError::bad(
                "speculative.method",
                "`speculative.method` must be \"ngram\" (prompt lookup; there is no draft model)",
            ))
        }
    }
    let int = |key: &str, lo: usize, hi: usize, default: usize| -> Result<usize, ApiError> {
        let field = format!("speculative.{key}");
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(x) => match x.as_u64() {
                Some(n) if (lo as u64..=hi as u64).contains(&n) => Ok(n as usize),
                _ => Err(ApiError::bad(
                    &field,
                    format!("`{field}` must be an integer from {lo} to {hi}"),
                )),
            },
        }
    };
    let base = default.unwrap_or(NgramSpec {
        num_tokens: 4,
        min_ngram: 1,
        max_ngram: 3,
        max_batch: limits.speculative_max_batch,
    });
    let num_tokens = int("num_tokens", 0, NgramSpec::MAX_TOKENS, base.num_tokens)?;
    let min_ngram = int("prompt_lookup_min", 1, NgramSpec::MAX_NGRAM, base.min_ngram)?;
    let max_ngram = int(
        "prompt_lookup_max",
        1,
        NgramSpec::MAX_NGRAM,
        base.max_ngram.max(min_ngram),
    )?;
    if min_ngram > max_ngram {
        return Err(ApiError::bad(
            "speculative.prompt_lookup_min",
            "`speculative.prompt_lookup_min` must not exceed `speculative.prompt_lookup_max`",
        ));
    }
    Ok((num_tokens > 0).then_some(NgramSpec {
        num_tokens,
        min_ngram,
        max_ngram,
        max_batch: limits.speculative_max_batch,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_stop_bytes: 256,
            max_tokens_cap: 100,
            context: 256,
            vocab: 512,
            max_n: 4,
            speculative: None,
            speculative_max_batch: 4,
        }
    }

    fn param(r: Result<GenerationConfig, ApiError>) -> String {
        match r {
            Err(ApiError::BadRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn each_bad_value_names_its_field() {
        let base = Sampling::default();
        let g = |s: Sampling| generation(&s, 10, &limits(), vec![2], "messages");
        assert_eq!(
            param(g(Sampling {
                temperature: Some(2.5),
                ..base.clone()
            })),
            "temperature"
        );
        assert_eq!(
            param(g(Sampling {
                top_p: Some(0.0),
                ..base.clone()
            })),
            "top_p"
        );
        assert_eq!(
            param(g(Sampling {
                max_tokens: Some(0),
                ..base.clone()
            })),
            "max_tokens"
        );
        assert_eq!(
            param(g(Sampling {
                max_tokens: Some(101),
                ..base.clone()
            })),
            "max_tokens"
        );
        assert_eq!(
            param(g(Sampling {
                max_completion_tokens: Some(0),
                ..base.clone()
            })),
            "max_completion_tokens"
        );
        assert_eq!(
            param(g(Sampling {
                n: Some(5),
                ..base.clone()
            })),
            "n"
        );
        assert_eq!(
            param(g(Sampling {
                top_k: Some(-3),
                ..base.clone()
            })),
            "top_k"
        );
        assert_eq!(
            param(g(Sampling {
                min_tokens: Some(50),
                max_tokens: Some(5),
                ..base.clone()
            })),
            "min_tokens"
        );
        assert_eq!(
            param(generation(&base, 256, &limits(), vec![], "prompt")),
            "prompt"
        );
        let ok = g(base.clone()).unwrap();
        assert_eq!((ok.max_tokens, ok.sampling.temperature), (100, 1.0));
    }

    #[test]
    fn messages_need_known_roles_and_text() {
        let m = |role: &str| MessageIn {
            role: role.into(),
            content: Some(Content::Text("x".into())),
        };
        assert!(messages(&[m("user")]).is_ok());
        match messages(&[m("user"), m("wizard")]) {
            Err(ApiError::BadRequest { param, .. }) => {
                assert_eq!(param.as_deref(), Some("messages[1].role"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(messages(&[]), Err(ApiError::BadRequest { .. })));
    }

    #[test]
    fn speculative_settings_are_checked_by_field_and_default_to_the_server() {
        let g = |v: serde_json::Value, l: &Limits| {
            generation(
                &Sampling {
                    speculative: Some(v),
                    ..Sampling::default()
                },
                10,
                l,
                vec![2],
                "messages",
            )
        };
        let l = limits();
        for (v, field) in [
            (serde_json::json!("ngram"), "speculative"),
            (serde_json::json!({"method": "draft"}), "speculative.method"),
            (serde_json::json!({"num_tokens": 2}), "speculative.method"),
            (
                serde_json::json!({"method": "ngram", "num_tokens": 17}),
                "speculative.num_tokens",
            ),
            (
                serde_json::json!({"method": "ngram", "num_tokens": -1}),
                "speculative.num_tokens",
            ),
            (
                serde_json::json!({"method": "ngram", "k": 2}),
                "speculative.k",
            ),
            (
                serde_json::json!({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}),
                "speculative.prompt_lookup_min",
            ),
            (
                serde_json::json!({"method": "ngram", "prompt_lookup_max": 9}),
                "speculative.prompt_lookup_max",
            ),
        ] {
            assert_eq!(param(g(v.clone(), &l)), field, "{v}");
        }
        let on = g(serde_json::json!({"method": "ngram", "num_tokens": 6}), &l).unwrap();
        assert_eq!(
            on.speculative,
            Some(NgramSpec {
                num_tokens: 6,
                min_ngram: 1,
                max_ngram: 3,
                max_batch: 4
            })
        );
        let off = g(serde_json::json!({"method": "ngram", "num_tokens": 0}), &l).unwrap();
        assert_eq!(off.speculative, None);
        // The server's default applies where the request does not say, and a request may turn
        // it off or change its settings.
        let server = Limits {
            speculative: Some(NgramSpec {
                num_tokens: 3,
                min_ngram: 2,
                max_ngram: 4,
                max_batch: 4,
            }),
            ..limits()
        };
        let plain = generation(&Sampling::default(), 10, &server, vec![2], "messages").unwrap();
        assert_eq!(plain.speculative, server.speculative);
        let off = g(
            serde_json::json!({"method": "ngram", "num_tokens": 0}),
            &server,
        )
        .unwrap();
        assert_eq!(off.speculative, None);
        let more = g(
            serde_json::json!({"method": "ngram", "num_tokens": 8}),
            &server,
        )
        .unwrap();
        assert_eq!(
            more.speculative.map(|s| (s.num_tokens, s.min_ngram)),
            Some((8, 2))
        );
    }
}
