//! Server state: the engine, the adapter registry and cache, keys, the tenant policy, metrics,
//! the bounded pools for request preparation and adapter loads, and how an adapter is leased.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::auth::ApiKeys;
use super::error::ApiError;
use super::policy::{Policy, PolicyConfig};
use super::validate::Limits;
use crate::adapters::registry::AdapterEntry;
use crate::adapters::{bind, AdapterCache, AdapterKey, BindOptions, Lease, Registry};
use crate::chat::ChatTemplate;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::model::source::SourceConfig;
use crate::model::AdapterWeights;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub limits: Limits,
    pub bind: BindOptions,
    pub sources: SourceConfig,
    pub policy: PolicyConfig,
    /// `--max-concurrent-loads`: adapter loads (disk or hub) running at once.
    pub max_concurrent_loads: usize,
    /// Requests being parsed, rendered and tokenized at once (on blocking threads).
    pub max_concurrent_prepare: usize,
    /// `--state-dir`: uploaded files (and, later, fine-tuning jobs) live here.
    pub state_dir: std::path::PathBuf,
    /// `--max-training-jobs`: fine-tuning jobs running at once (one worker thread each).
    pub max_training_jobs: usize,
    /// `--train-threads`: compute threads each job trains with (0: the cores), run at a lower
    /// scheduling priority than serving's.
    pub train_threads: usize,
    /// What one fine-tuning job may take (`--train-*` flags).
    pub train: super::job_runner::TrainLimits,
}

/// Seconds since the Unix epoch (OpenAI's `created` / `created_at`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An adapter's default constraint and the field it came from, if it declares one.
pub type Sidecar = Option<(String, crate::guided::Constraint)>;

pub struct AppState {
    pub engine: Engine,
    pub registry: Registry,
    pub cache: AdapterCache,
    pub metrics: Arc<Metrics>,
    pub keys: Option<ApiKeys>,
    pub policy: Policy,
    pub template: ChatTemplate,
    pub config: ServerConfig,
    pub created: u64,
    /// Bounds adapter loads: each holds a whole adapter in memory while it loads.
    pub loads: Semaphore,
    /// Bounds request preparation on the blocking pool.
    pub prepare: Semaphore,
    /// Each tenant's share of `prepare`: all its permits but one, so one tenant's flood of
    /// large bodies always leaves a thread for the others.
    prepare_shares: std::sync::Mutex<std::collections::HashMap<Option<String>, Arc<Semaphore>>>,
    /// Uploaded files (`/v1/files`).
    pub files: super::file_store::FileStore,
    /// Fine-tuning jobs (`/v1/fine_tuning/jobs`).
    pub jobs: super::jobs::JobStore,
    /// Structured outputs' compiler over the model's tokenizer, built in the background (an
    /// error: the tokenizer's vocabulary cannot be read for it; such requests get a 400).
    pub guidance: crate::guided::Deferred,
    /// Adapters' default constraints (`loraplex.json`), read once per adapter version.
    pub sidecars: std::sync::Mutex<lru::LruCache<AdapterKey, Sidecar>>,
    /// Tenants' rate limits (`tokens_per_minute` and the like in the keys file).
    pub rate: Arc<super::rate_limit::RateLimiter>,
    /// Usage per tenant and adapter (`GET /v1/usage`), kept under `--state-dir`.
    pub usage: Arc<super::usage::UsageLedger>,
    evictions_seen: AtomicU64,
    /// Test hook (`delay_loads`): milliseconds added to every adapter load from disk.
    load_delay_ms: AtomicU64,
}

/// What the server is made of; `AppState::new` wires it up.
pub struct Parts {
    pub engine: Engine,
    pub registry: Registry,
    pub cache: AdapterCache,
    pub metrics: Arc<Metrics>,
    pub keys: Option<ApiKeys>,
    pub template: ChatTemplate,
    pub config: ServerConfig,
}

impl AppState {
    pub fn new(parts: Parts) -> Self {
        let Parts {
            engine,
            registry,
            cache,
            metrics,
            keys,
            template,
            config,
        } = parts;
        let loaded = engine.model().clone();
        // Built while the server already answers; a request with a constraint waits for it.
        let guidance = match loaded.stop_token_ids(&template).first() {
            Some(&eos) => crate::guided::Deferred::start(move || {
                crate::guided::Guidance::new(&loaded.tokenizer, eos).map_err(|e| e.to_string())
            }),
            None => {
                tracing::warn!(
                    "structured outputs are off: the model has no end-of-sequence token"
                );
                crate::guided::Deferred::ready(Err("the model has no end-of-sequence token".into()))
            }
        };
        Self {
            guidance,
            sidecars: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(1024).expect("non-zero"),
            )),
            usage: Arc::new(
                super::usage::UsageLedger::open(&config.state_dir, unix_now()).unwrap_or_else(
                    |e| {
                        tracing::error!("{e}; usage is kept in memory only");
                        super::usage::UsageLedger::in_memory()
                    },
                ),
            ),
            rate: Arc::default(),
            files: super::file_store::FileStore::new(&config.state_dir),
            jobs: super::jobs::JobStore::new(&config.state_dir),
            policy: Policy::new(config.policy.clone(), registry.root()),
            loads: Semaphore::new(config.max_concurrent_loads.max(1)),
            prepare: Semaphore::new(config.max_concurrent_prepare.max(1)),
            prepare_shares: std::sync::Mutex::default(),
            engine,
            registry,
            cache,
            metrics,
            keys,
            template,
            config,
            created: unix_now(),
            evictions_seen: AtomicU64::new(0),
            load_delay_ms: AtomicU64::new(0),
        }
    }

    pub fn base_id(&self) -> &str {
        &self.engine.model().id
    }

    /// Runs `f` on the blocking pool within one of the `permits`.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        permits: fn(&AppState) -> &Semaphore,
        f: impl FnOnce(&Arc<AppState>) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _permit = permits(self)
            .acquire()
            .await
            .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
        let st = self.clone();
        tokio::task::spawn_blocking(move || f(&st))
            .await
            .map_err(|e| ApiError::Internal(format!("blocking task: {e}")))?
    }

    /// Runs `f` on the blocking pool within `caller`'s share of the preparation permits.
    pub async fn prepare_for<T: Send + 'static>(
        self: &Arc<Self>,
        caller: &super::auth::Caller,
        f: impl FnOnce(&Arc<AppState>) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let share = {
            let mut shares = self
                .prepare_shares
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let all = self.config.max_concurrent_prepare.max(1);
            shares
                .entry(caller.tenant.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(all.saturating_sub(1).max(1))))
                .clone()
        };
        let _share = share
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
        self.blocking(|s| &s.prepare, f).await
    }

    /// A lease on the adapter, loading it (header-first, within the load bound) on a miss.
    /// `preloaded` weights are used instead of reading the files (a registration just read them).
    /// While it loads, the adapter counts as waiting in `loraplex_lora_requests_info` under
    /// `requested` (the name as the request gave it; the registry's name when none).
    pub async fn lease(
        self: &Arc<Self>,
        entry: &AdapterEntry,
        preloaded: Option<AdapterWeights>,
        requested: Option<&str>,
    ) -> Result<Lease, ApiError> {
        if preloaded.is_none() && !entry.pinned {
            if let Some(lease) = self.cache.hit(&entry.key()) {
                self.metrics.adapter_hits.inc();
                return Ok(lease);
            }
        }
        let entry = entry.clone();
        let waiting_as = requested.map_or_else(|| entry.name.key(), str::to_string);
        let load = move |st: &Arc<AppState>| {
            let loaded = AtomicBool::new(false);
            let start = Instant::now();
            let lease = st.cache.acquire(&entry.key(), entry.pinned, || {
                loaded.store(true, Ordering::Relaxed);
                let _waiting = st.metrics.loading(&waiting_as);
                match preloaded {
                    Some(w) => Ok(w),
                    None => {
                        let delay = st.load_delay_ms.load(Ordering::Relaxed);
                        if delay > 0 {
                            std::thread::sleep(std::time::Duration::from_millis(delay));
                        }
                        if let Some(snap) = &entry.snapshot {
                            snap.verify(&format!("{}@{}", entry.name, entry.revision))?;
                        }
                        bind::load_checked(&entry.dir, &st.engine.model().model, &st.config.bind)
                    }
                }
            });
            if loaded.load(Ordering::Relaxed) {
                st.metrics.adapter_misses.inc();
                st.metrics
                    .adapter_load_seconds
                    .observe(start.elapsed().as_secs_f64());
                if lease.is_err() {
                    st.metrics.adapter_load_failures.inc();
                }
            } else {
                st.metrics.adapter_hits.inc();
            }
            lease.map_err(ApiError::from)
        };
        self.blocking(|s| &s.loads, load).await
    }

    /// Test hook: every later adapter load from disk takes `delay` longer, as from a slow
    /// volume (what is tested is that nothing else waits for it).
    pub fn delay_loads(&self, delay: std::time::Duration) {
        self.load_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Brings cache gauges and counters up to date (at scrape time).
    pub fn refresh_cache_metrics(&self) {
        let m = &self.metrics;
        m.adapter_residency.reset();
        m.adapter_last_use.reset();
        for r in self.cache.residency() {
            let name = r.name.key();
            m.adapter_residency
                .with_label_values(&[
                    name.as_str(),
                    "resident",
                    if r.pinned { "true" } else { "false" },
                ])
                .set(r.bytes as i64);
            let at = r
                .last_use
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            m.adapter_last_use
                .with_label_values(&[name.as_str()])
                .set(at);
        }
        for name in self.cache.loading() {
            m.adapter_residency
                .with_label_values(&[name.key().as_str(), "loading", "false"])
                .set(0);
        }
        m.adapters_resident.set(self.cache.resident().len() as i64);
        m.adapters_resident_bytes
            .set(self.cache.resident_bytes() as i64);
        let now = self.cache.stats().evictions.load(Ordering::Relaxed);
        let before = self.evictions_seen.swap(now, Ordering::Relaxed);
        m.adapter_evictions.inc_by(now.saturating_sub(before));
    }
}
