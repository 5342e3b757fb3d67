//! Structured outputs: a request's `response_format` (JSON object, JSON schema), or vLLM's
//! `guided_regex` / `guided_choice`, compiled by llguidance into a token-level matcher that
//! masks each step's logits of that row. Grammars are compiled once per (kind, text) and cached;
//! a sequence clones the compiled matcher. Depends on the tokenizer only.

mod compiler;
mod deferred;
mod error;

pub use compiler::{Constraint, Guidance, Guide};
pub use deferred::Deferred;
pub use error::GuidedError;
