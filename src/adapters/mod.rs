//! Adapters: the PEFT format (read and write), binding an adapter to the base model's
//! projections, the registry of names and tenants, and the resident LRU cache with leases.
//! Depends on `model`.

pub mod bind;
pub mod cache;
pub mod config;
pub mod error;
pub mod hub;
pub mod merge;
pub mod peft;
pub mod registry;
pub mod revisions;

pub use bind::{bind, AdapterDType, BindOptions};
pub use cache::{AdapterCache, CacheConfig, Lease};
pub use config::{AdapterConfig, Method, TargetModules};
pub use error::AdapterError;
pub use peft::PeftAdapter;
pub use registry::{locate, AdapterKey, AdapterName, Registry};
