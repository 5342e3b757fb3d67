//! `serve train`: JSONL data → token ids and loss mask, trainable LoRA/DoRA sites on the very
//! same Llama, AdamW with clipping and schedules, checkpoints and resume, PEFT export.
//! Depends on `model`, `adapters` (format), `chat`, `tokenizer`; never on `engine` or `server`.

pub mod bottleneck_train;
pub mod checkpointed;
pub mod dataset;
pub mod error;
pub mod head_loss;
pub mod optim;
pub mod trainable;
pub mod trainer;

pub use dataset::{Dataset, Example, Format};
pub use error::TrainError;
pub use trainable::{Method, TrainableAdapter};
pub use trainer::{train, TrainConfig, TrainReport};
