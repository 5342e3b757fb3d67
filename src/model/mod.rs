//! The one Llama: configuration, weights from any source, `Linear` layers with adapter sites,
//! KV cache, batched forward. Depends on `ops` and `tokenizer`.

pub mod adapter_site;
pub mod config;
pub mod embedding;
pub mod error;
pub mod export;
pub mod gguf;
pub mod kv_cache;
pub mod kv_pool;
pub mod linear;
pub mod llama;
pub mod loaded;
pub mod pypi;
pub mod safetensors_dir;
pub mod source;

pub use adapter_site::{
    AdapterGroup, AdapterWeights, BnActivation, BnInput, BnSite, FusionSite, Ia3Site, KvPrefix,
    LoraSite, Proj, Rows,
};
pub use config::LlamaConfig;
pub use embedding::Embedding;
pub use error::ModelError;
pub use kv_cache::{KvCache, LayerMark};
pub use kv_pool::{KvDtype, KvPool, PoolShape};
pub use linear::{BaseWeight, Linear};
pub use llama::{BatchInput, Llama, LogitsRows, Staged};
pub use loaded::{
    load_model, projection_footprint, quantize_nf4, to_bf16_weights, LoadedModel, ModelOptions,
};
pub use safetensors_dir::text_model_name;
pub use source::{ModelSource, DEFAULT_MODEL_ID};
