//! Generation on top of the model: sampling, stop conditions, the decode loop.
//! Depends on `model` and `tokenizer`.

pub mod generate;
pub mod sampling;
pub mod sequence;
pub mod stop;

pub use generate::{generate, FinishReason, GenerateError, Generation, GenerationConfig};
pub use sampling::{Sampler, SamplingParams};
