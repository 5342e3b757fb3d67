//! Errors of adapter loading, validation and caching; each names the adapter, file or field.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter `{0}` not found")]
    NotFound(String),
    #[error("invalid adapter name `{name}`: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: `{field}` {problem}")]
    Config {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("{path}: {problem}")]
    Weights { path: PathBuf, problem: String },
    #[error("{path}: module `{module}`: {problem}")]
    Module {
        path: PathBuf,
        module: String,
        problem: String,
    },
    #[error(
        "adapter `{name}` needs {bytes} bytes, over the adapter cache budget of {budget} bytes"
    )]
    OverBudget {
        name: String,
        bytes: usize,
        budget: usize,
    },
    #[error("adapter `{name}` failed to load: {message}")]
    LoadFailed { name: String, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl AdapterError {
    pub fn config(path: impl Into<PathBuf>, field: &str, problem: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            field: field.to_string(),
            problem: problem.into(),
        }
    }

    pub fn weights(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Self::Weights {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
