//! Resident adapters: an LRU bounded by a count and a byte budget. A request holds a `Lease`
//! on the version it started with; leased and pinned adapters are never evicted (the cache
//! may run over its bounds while everything resident is in use, and shrinks as leases end).
//! A miss loads outside the lock, and concurrent misses for one adapter load it once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use lru::LruCache;

use super::error::AdapterError;
use crate::model::AdapterWeights;

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `--max-resident-adapters`.
    pub max_resident: usize,
    /// `--adapter-cache-bytes`.
    pub max_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_resident: 64,
            max_bytes: 2 << 30,
        }
    }
}

struct Resident {
    version: u64,
    weights: Arc<AdapterWeights>,
    bytes: usize,
    pinned: bool,
}

struct Inner {
    lru: LruCache<String, Resident>,
    loading: HashSet<String>,
    bytes: usize,
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub load_micros: AtomicU64,
}

/// A running request's hold on one adapter version.
#[derive(Debug, Clone)]
pub struct Lease {
    pub key: String,
    pub version: u64,
    pub weights: Arc<AdapterWeights>,
}

pub struct AdapterCache {
    config: CacheConfig,
    inner: Mutex<Inner>,
    loaded: Condvar,
    pub stats: CacheStats,
}

impl AdapterCache {
    pub fn new(config: CacheConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                loading: HashSet::new(),
                bytes: 0,
            }),
            loaded: Condvar::new(),
            stats: CacheStats::default(),
        }
    }

    /// A lease on `key` at `version`, loading it with `load` on a miss.
    pub fn acquire(
        &self,
        key: &str,
        version: u64,
        pinned: bool,
        load: impl FnOnce() -> Result<AdapterWeights, AdapterError>,
    ) -> Result<Lease, AdapterError> {
        let mut inner = self.inner.lock().expect("cache lock");
        loop {
            if let Some(r) = inner.lru.get_mut(key) {
                if r.version == version {
                    r.pinned |= pinned;
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Lease {
                        key: key.to_string(),
                        version,
                        weights: r.weights.clone(),
                    });
                }
            }
            if !inner.loading.contains(key) {
                break;
            }
            inner = self.loaded.wait(inner).expect("cache lock");
        }
        inner.loading.insert(key.to_string());
        drop(inner);
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let result = load();
        self.stats
            .load_micros
            .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        let mut inner = self.inner.lock().expect("cache lock");
        inner.loading.remove(key);
        self.loaded.notify_all();
        let weights = Arc::new(result?);
        let bytes = weights.bytes();
        if bytes > self.config.max_bytes {
            return Err(AdapterError::OverBudget {
                name: key.to_string(),
                bytes,
                budget: self.config.max_bytes,
            });
        }
        if let Some(old) = inner.lru.pop(key) {
            inner.bytes -= old.bytes;
        }
        inner.bytes += bytes;
        inner.lru.put(
            key.to_string(),
            Resident {
                version,
                weights: weights.clone(),
                bytes,
                pinned,
            },
        );
        self.evict(&mut inner, key);
        Ok(Lease {
            key: key.to_string(),
            version,
            weights,
        })
    }

    /// Evicts least-recently-used adapters that nobody leases and nobody pinned until the
    /// bounds hold (or nothing more can go).
    fn evict(&self, inner: &mut Inner, keep: &str) {
        while inner.lru.len() > self.config.max_resident || inner.bytes > self.config.max_bytes {
            let victim = inner
                .lru
                .iter()
                .rev()
                .find(|(k, r)| {
                    k.as_str() != keep && !r.pinned && Arc::strong_count(&r.weights) == 1
                })
                .map(|(k, _)| k.clone());
            let Some(k) = victim else { break };
            if let Some(r) = inner.lru.pop(&k) {
                inner.bytes -= r.bytes;
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Applies the bounds again (after leases ended).
    pub fn trim(&self) {
        let mut inner = self.inner.lock().expect("cache lock");
        self.evict(&mut inner, "");
    }

    /// Drops a resident adapter (unload); running leases keep their copy.
    pub fn remove(&self, key: &str) {
        let mut inner = self.inner.lock().expect("cache lock");
        if let Some(r) = inner.lru.pop(key) {
            inner.bytes -= r.bytes;
        }
    }

    pub fn set_pinned(&self, key: &str, pinned: bool) {
        if let Some(r) = self.inner.lock().expect("cache lock").lru.peek_mut(key) {
            r.pinned = pinned;
        }
    }

    /// Resident keys, most recently used first.
    pub fn resident(&self) -> Vec<String> {
        self.inner
            .lock()
            .expect("cache lock")
            .lru
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn resident_bytes(&self) -> usize {
        self.inner.lock().expect("cache lock").bytes
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoraSite;
    use candle_core::{Device, Tensor};
    use std::sync::atomic::AtomicUsize;

    fn weights(scale: f32) -> AdapterWeights {
        let t = |r, c| {
            (Tensor::ones((r, c), candle_core::DType::F32, &Device::Cpu).unwrap() * scale as f64)
                .unwrap()
        };
        AdapterWeights {
            layers: vec![[
                Some(LoraSite {
                    a_t: t(4, 2),
                    b_t: t(2, 4),
                    dora_scale: None,
                    dropout: None,
                }),
                None,
                None,
                None,
                None,
                None,
                None,
            ]],
        }
    }

    fn cache(n: usize) -> AdapterCache {
        AdapterCache::new(CacheConfig {
            max_resident: n,
            max_bytes: 1 << 20,
        })
    }

    #[test]
    fn lru_evicts_the_least_recent_unleased() {
        let c = cache(2);
        for k in ["a", "b"] {
            c.acquire(k, 0, false, || Ok(weights(1.0))).unwrap();
        }
        c.acquire("a", 0, false, || panic!("hit expected")).unwrap();
        c.acquire("c", 0, false, || Ok(weights(1.0))).unwrap();
        assert_eq!(c.resident(), vec!["c", "a"]);
        assert_eq!(c.stats.evictions.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_held_lease_is_never_evicted_and_pinned_stays() {
        let c = cache(2);
        let held = c.acquire("held", 0, false, || Ok(weights(1.0))).unwrap();
        c.acquire("pinned", 0, true, || Ok(weights(2.0))).unwrap();
        for k in ["x", "y", "z"] {
            c.acquire(k, 0, false, || Ok(weights(3.0))).unwrap();
        }
        let resident = c.resident();
        assert!(
            resident.contains(&"held".to_string()) && resident.contains(&"pinned".to_string()),
            "{resident:?}"
        );
        // Over the count while everything else is leased or pinned; shrinks once the lease ends.
        drop(held);
        c.trim();
        assert_eq!(c.resident().len(), 2);
        assert!(c.resident().contains(&"pinned".to_string()));
    }

    #[test]
    fn concurrent_misses_load_once() {
        let c = Arc::new(cache(4));
        let loads = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, loads) = (c.clone(), loads.clone());
                std::thread::spawn(move || {
                    c.acquire("one", 0, false, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Ok(weights(1.0))
                    })
                    .unwrap()
                })
            })
            .collect();
        let leases: Vec<Lease> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(leases
            .windows(2)
            .all(|w| Arc::ptr_eq(&w[0].weights, &w[1].weights)));
    }

    #[test]
    fn a_new_version_replaces_but_running_leases_keep_theirs() {
        let c = cache(4);
        let v0 = c.acquire("a", 0, false, || Ok(weights(1.0))).unwrap();
        let v1 = c.acquire("a", 1, false, || Ok(weights(5.0))).unwrap();
        assert!(!Arc::ptr_eq(&v0.weights, &v1.weights));
        let a0 = v0.weights.layers[0][0]
            .as_ref()
            .unwrap()
            .a_t
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(a0, 8.0);
        assert_eq!(c.resident(), vec!["a"]);
    }

    #[test]
    fn over_budget_is_refused_and_failures_do_not_stick() {
        let c = AdapterCache::new(CacheConfig {
            max_resident: 4,
            max_bytes: 8,
        });
        let err = c
            .acquire("big", 0, false, || Ok(weights(1.0)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("big") && err.contains("budget"), "{err}");
        let err = c
            .acquire("bad", 0, false, || {
                Err(AdapterError::NotFound("bad".into()))
            })
            .unwrap_err();
        assert!(matches!(err, AdapterError::NotFound(_)));
        assert!(c.resident().is_empty());
    }
}
