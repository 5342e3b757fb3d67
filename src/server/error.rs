//! The one place that maps errors to HTTP status codes and OpenAI error bodies
//! (`{"error": {"message", "type", "param", "code"}}`). Internal errors are logged, not leaked.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::adapters::AdapterError;
use crate::engine::EngineError;

#[derive(Debug)]
pub enum ApiError {
    /// 400, naming the parameter.
    BadRequest {
        message: String,
        param: Option<String>,
    },
    Unauthorized,
    /// 404: the same body for an unknown adapter and another tenant's.
    ModelNotFound(String),
    NotFound(String),
    /// 403, naming the parameter the caller may not use.
    Forbidden {
        message: String,
        param: String,
    },
    PayloadTooLarge(String),
    /// 409: the request does not fit the resource's state (cancel of a finished job).
    Conflict(String),
    RequestTimeout,
    TooManyRequests,
    /// 429 from a tenant's rate limit: OpenAI's `rate_limit_exceeded`, the limit named, and
    /// `Retry-After`.
    RateLimited(super::rate_limit::Limited),
    Unavailable(String),
    Internal(String),
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    pub fn forbidden(param: &str, message: impl Into<String>) -> Self {
        Self::Forbidden {
            message: message.into(),
            param: param.to_string(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::TooManyRequests | Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message a client sees.
    pub fn message(&self) -> String {
        self.body()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The OpenAI error object.
    pub fn body(&self) -> serde_json::Value {
        let (message, kind, param, code) = match self {
            Self::BadRequest { message, param } => (
                message.clone(),
                "invalid_request_error",
                param.clone(),
                None,
            ),
            Self::Unauthorized => (
                "missing or invalid API key (send `Authorization: Bearer KEY`)".into(),
                "authentication_error",
                None,
                Some("invalid_api_key"),
            ),
            Self::ModelNotFound(_) => (
                "The requested model or adapter does not exist, or you do not have access to it."
                    .to_string(),
                "invalid_request_error",
                Some("model".to_string()),
                Some("model_not_found"),
            ),
            Self::NotFound(m) => (m.clone(), "invalid_request_error", None, Some("not_found")),
            Self::Forbidden { message, param } => (
                message.clone(),
                "permission_error",
                Some(param.clone()),
                None,
            ),
            Self::PayloadTooLarge(m) => (m.clone(), "invalid_request_error", None, None),
            Self::Conflict(m) => (m.clone(), "invalid_request_error", None, Some("conflict")),
            Self::RequestTimeout => (
                "the request body did not arrive in time".into(),
                "invalid_request_error",
                None,
                None,
            ),
            Self::TooManyRequests => (
                "the server is at capacity; retry later".into(),
                "rate_limit_error",
                None,
                None,
            ),
            Self::RateLimited(l) => (
                l.message.clone(),
                if l.limit == "tokens" {
                    "tokens"
                } else {
                    "requests"
                },
                None,
                Some("rate_limit_exceeded"),
            ),
            Self::Unavailable(m) => (m.clone(), "server_error", None, None),
            Self::Internal(_) => ("internal server error".into(), "server_error", None, None),
        };
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!("internal error: {detail}");
        }
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        let retry = match &self {
            Self::TooManyRequests => Some(1),
            Self::RateLimited(l) => Some(l.retry_after),
            _ => None,
        };
        if let Some(secs) = retry {
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            h.insert("retry-after-ms", HeaderValue::from(secs * 1000));
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull => Self::TooManyRequests,
            EngineError::TooLarge { .. } => Self::bad("max_tokens", e.to_string()),
            EngineError::Draining => Self::Unavailable(e.to_string()),
            EngineError::Pool(_) => Self::Internal(e.to_string()),
        }
    }
}

impl ApiError {
    /// The same error with `from` replaced by `to` in a 400's message.
    pub fn replace_in_message(self, from: &str, to: &str) -> Self {
        match self {
            Self::BadRequest { message, param } => Self::BadRequest {
                message: message.replace(from, to),
                param,
            },
            other => other,
        }
    }
}

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        match e {
            AdapterError::NotFound(name) => Self::ModelNotFound(name),
            AdapterError::InvalidName { .. } => Self::bad("name", e.to_string()),
            AdapterError::Candle(err) => Self::Internal(err.to_string()),
            other => Self::bad("adapter", other.to_string()),
        }
    }
}
