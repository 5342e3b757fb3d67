//! A fine-tuning job request (`POST /v1/fine_tuning/jobs`) read into a new `JobRecord`: every
//! field checked, a 400 naming the field otherwise.

use serde_json::Value;

use super::error::ApiError;
use super::jobs::{AdapterSpec, Hyperparameters, JobRecord};
use super::state::unix_now as now;

/// A new job from a request's fields, checked (400 naming the field).
pub fn new_job(
    body: &Value,
    owner: Option<String>,
    base_id: &str,
) -> Result<(JobRecord, String), ApiError> {
    let model = body["model"]
        .as_str()
        .ok_or_else(|| ApiError::bad("model", "is missing"))?;
    if model != base_id {
        return Err(ApiError::bad(
            "model",
            format!("is `{model}`; this server fine-tunes its base model `{base_id}` only"),
        ));
    }
    let file = body["training_file"]
        .as_str()
        .ok_or_else(|| ApiError::bad("training_file", "is missing"))?
        .to_string();
    let validation_file = match &body["validation_file"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        _ => {
            return Err(ApiError::bad(
                "validation_file",
                "must be a file id (a string) or null",
            ))
        }
    };
    let hp = &body["method"]["supervised"]["hyperparameters"];
    let hp = if hp.is_object() {
        hp
    } else {
        &body["hyperparameters"]
    };
    let field = |k: &str| format!("method.supervised.hyperparameters.{k}");
    let int = |k: &str, default: usize, max: usize| -> Result<usize, ApiError> {
        match &hp[k] {
            Value::Null => Ok(default),
            Value::String(s) if s == "auto" => Ok(default),
            v => v
                .as_u64()
                .map(|n| n as usize)
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::bad(
                        &field(k),
                        format!("must be an integer in 1..={max} or \"auto\""),
                    )
                }),
        }
    };
    let lr = match &hp["learning_rate_multiplier"] {
        Value::Null => 1.0,
        Value::String(s) if s == "auto" => 1.0,
        v => v
            .as_f64()
            .filter(|x| *x > 0.0 && *x <= 100.0)
            .ok_or_else(|| {
                ApiError::bad(
                    &field("learning_rate_multiplier"),
                    "must be a number in (0, 100] or \"auto\"",
                )
            })?,
    };
    let hyperparameters = Hyperparameters {
        n_epochs: int("n_epochs", 3, 50)?,
        batch_size: int("batch_size", 4, 64)?,
        learning_rate_multiplier: lr,
    };
    let a = &body["adapter"];
    let method = a["method"].as_str().unwrap_or("lora").to_string();
    if !matches!(method.as_str(), "lora" | "dora") {
        return Err(ApiError::bad(
            "adapter.method",
            format!("is `{method}`; jobs train lora or dora"),
        ));
    }
    let rank = match &a["rank"] {
        Value::Null => 8,
        v => v
            .as_u64()
            .filter(|r| (1..=256).contains(r))
            .ok_or_else(|| ApiError::bad("adapter.rank", "must be an integer in 1..=256"))?
            as usize,
    };
    let alpha = match &a["alpha"] {
        Value::Null => 2.0 * rank as f64,
        v => v
            .as_f64()
            .filter(|x| *x > 0.0)
            .ok_or_else(|| ApiError::bad("adapter.alpha", "must be a positive number"))?,
    };
    let suffix = match &body["suffix"] {
        Value::Null => None,
        Value::String(s) => {
            if s.is_empty()
                || s.len() > 18
                || !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ApiError::bad(
                    "suffix",
                    "must be 1 to 18 characters of A-Z a-z 0-9 - _",
                ));
            }
            Some(s.clone())
        }
        _ => return Err(ApiError::bad("suffix", "must be a string")),
    };
    let seed = match &body["seed"] {
        Value::Null => rand::random::<u32>() as u64,
        v => v
            .as_u64()
            .ok_or_else(|| ApiError::bad("seed", "must be a non-negative integer"))?,
    };
    let job = JobRecord {
        id: format!("ftjob-{:024x}", rand::random::<u128>() >> 32),
        model: model.to_string(),
        created_at: now(),
        created_subsec: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
        finished_at: None,
        status: "validating_files".into(),
        training_file: file.clone(),
        validation_file,
        fine_tuned_model: None,
        hyperparameters,
        adapter: AdapterSpec {
            method,
            rank,
            alpha,
        },
        suffix,
        seed,
        error: None,
        trained_tokens: None,
        owner,
        model_deleted: false,
        output_bytes: 0,
    };
    Ok((job, file))
}
