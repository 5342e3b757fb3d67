//! Server state: the engine, the adapter registry and cache, keys, metrics, and how a request's
//! adapter is chosen and leased (with tenant visibility).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::{ApiKeys, Caller};
use super::error::ApiError;
use super::validate::Limits;
use crate::adapters::{bind, AdapterCache, AdapterName, BindOptions, Lease, PeftAdapter, Registry};
use crate::chat::ChatTemplate;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::model::source::SourceConfig;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub limits: Limits,
    pub bind: BindOptions,
    pub sources: SourceConfig,
}

pub struct AppState {
    pub engine: Engine,
    pub registry: Registry,
    pub cache: AdapterCache,
    pub metrics: Arc<Metrics>,
    pub keys: Option<ApiKeys>,
    pub template: ChatTemplate,
    pub config: ServerConfig,
    pub created: u64,
    evictions_seen: AtomicU64,
}

impl AppState {
    pub fn new(
        engine: Engine,
        registry: Registry,
        cache: AdapterCache,
        metrics: Arc<Metrics>,
        keys: Option<ApiKeys>,
        template: ChatTemplate,
        config: ServerConfig,
    ) -> Self {
        Self {
            engine,
            registry,
            cache,
            metrics,
            keys,
            template,
            config,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            evictions_seen: AtomicU64::new(0),
        }
    }

    pub fn base_id(&self) -> &str {
        &self.engine.model().id
    }

    /// Whether `caller` may see `name`: public adapters, its own namespace, everything for
    /// admins and on an open server.
    pub fn visible(caller: &Caller, name: &AdapterName) -> bool {
        caller.admin
            || caller.tenant.is_none()
            || name.tenant.is_none()
            || name.tenant == caller.tenant
    }

    /// The registry name `requested` refers to for `caller`; anything it may not see is
    /// reported exactly like an unknown adapter.
    pub fn find(&self, caller: &Caller, requested: &str) -> Result<AdapterName, ApiError> {
        let not_found = || ApiError::ModelNotFound(requested.to_string());
        let name = AdapterName::parse(requested).map_err(|_| not_found())?;
        let mut candidates = Vec::new();
        if let (None, Some(t)) = (&name.tenant, &caller.tenant) {
            candidates.push(AdapterName {
                tenant: Some(t.clone()),
                name: name.name.clone(),
            });
        }
        candidates.push(name);
        candidates
            .into_iter()
            .filter(|c| Self::visible(caller, c))
            .find(|c| self.registry.get(c).is_ok())
            .ok_or_else(not_found)
    }

    /// A lease on the adapter, loading it off the async threads on a miss.
    pub async fn lease(self: &Arc<Self>, name: &AdapterName) -> Result<Lease, ApiError> {
        let entry = self
            .registry
            .get(name)
            .map_err(|_| ApiError::ModelNotFound(name.key()))?;
        let st = self.clone();
        let key = name.key();
        tokio::task::spawn_blocking(move || {
            let loaded = AtomicBool::new(false);
            let start = Instant::now();
            let lease = st.cache.acquire(&key, entry.version, entry.pinned, || {
                loaded.store(true, Ordering::Relaxed);
                let peft = PeftAdapter::load(&entry.dir)?;
                bind(&peft, &st.engine.model().model, &st.config.bind)
            });
            if loaded.load(Ordering::Relaxed) {
                st.metrics.adapter_misses.inc();
                st.metrics
                    .adapter_load_seconds
                    .observe(start.elapsed().as_secs_f64());
            } else {
                st.metrics.adapter_hits.inc();
            }
            lease.map_err(ApiError::from)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("adapter load task: {e}")))?
    }

    /// Brings cache gauges and counters up to date (at scrape time).
    pub fn refresh_cache_metrics(&self) {
        let m = &self.metrics;
        m.adapters_resident.set(self.cache.resident().len() as i64);
        m.adapters_resident_bytes
            .set(self.cache.resident_bytes() as i64);
        let now = self.cache.stats.evictions.load(Ordering::Relaxed);
        let before = self.evictions_seen.swap(now, Ordering::Relaxed);
        m.adapter_evictions.inc_by(now.saturating_sub(before));
    }
}
