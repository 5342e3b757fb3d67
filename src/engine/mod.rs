//! The engine: continuous batching over the one model (worker thread, scheduler, sequences),
//! sampling, stop conditions, and the single-sequence loop of `serve generate`.
//! Depends on `model`, `adapters`, `tokenizer`, `metrics`.

pub mod generate;
pub mod handle;
pub mod interrupt;
pub mod kv_blocks;
pub mod queue_gate;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod speculative;
pub mod stop;
pub mod worker;

pub use generate::{generate, FinishReason, GenerateError, Generation, GenerationConfig};
pub use handle::{Engine, EngineError, Event, KvConfig, ValidRequest};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::SchedulerConfig;
pub use speculative::NgramSpec;
pub use worker::Worker;
