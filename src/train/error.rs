//! Errors of training: data (with file and line), configuration, numerics, I/O.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}:{line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },
    #[error("`{field}` {problem}")]
    Config { field: String, problem: String },
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },
    #[error(
        "loss became {value} at step {step}; stopped. The last good checkpoint is {checkpoint}"
    )]
    NonFinite {
        step: usize,
        value: f32,
        checkpoint: String,
    },
    #[error("cancelled after step {step}; a checkpoint of that step was saved")]
    Cancelled { step: usize },
    #[error(transparent)]
    Adapter(#[from] crate::adapters::AdapterError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    pub fn config(field: &str, problem: impl Into<String>) -> Self {
        Self::Config {
            field: field.to_string(),
            problem: problem.into(),
        }
    }

    pub fn output(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Output {
            path: path.into(),
            message: message.into(),
        }
    }
}
