//! loraplex: one frozen Llama base model, many LoRA/DoRA adapters served unmerged per request.
//!
//! Layers depend downward only: `cli` → `engine` → `model` → `ops`; `chat` and `tokenizer`
//! are leaves.

pub mod adapters;
pub mod chat;
pub mod cli;
pub mod engine;
pub mod model;
pub mod ops;
pub mod tokenizer;
