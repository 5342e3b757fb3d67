//! Resident adapters, bounded by a count and a byte budget. A request holds a `Lease` on the
//! version it started with, from the moment it is accepted (so the adapters of queued requests
//! are resident before they run); leased and pinned adapters are never evicted (the cache may
//! run over its bounds while everything resident is in use, and shrinks as leases end).
//! Eviction is LRU-2 (O'Neil et al.): the victim is the adapter whose second-to-last use is
//! oldest, adapters used once going first by their last use, and the uses of adapters no longer
//! resident are remembered (a bounded history), so a popular adapter evicted once comes back
//! with its frequency and a burst of one-off adapters cannot flush the popular ones.
//! A miss loads outside the lock, and concurrent misses for one adapter load it once. One
//! version per name is resident; a load that finishes after a newer version arrived does not
//! displace it. The end of the last lease on an adapter applies the bounds again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Instant, SystemTime};

use lru::LruCache;

use super::error::AdapterError;
use super::registry::{AdapterKey, AdapterName};
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
    last_use: SystemTime,
}

/// One resident adapter as an operator sees it.
#[derive(Debug, Clone)]
pub struct Residency {
    pub name: AdapterName,
    pub bytes: usize,
    pub pinned: bool,
    pub last_use: SystemTime,
}

struct Inner {
    lru: LruCache<AdapterName, Resident>,
    loading: HashSet<AdapterName>,
    bytes: usize,
    uses: Uses,
}

/// The last two uses of each adapter (resident or not) on a logical clock, kept for at most
/// `cap` adapters: past that, the half whose last use is oldest is forgotten.
#[derive(Default)]
struct Uses {
    clock: u64,
    last: HashMap<AdapterName, [u64; 2]>,
    cap: usize,
}

impl Uses {
    fn touch(&mut self, name: &AdapterName) {
        self.clock += 1;
        let now = self.clock;
        match self.last.get_mut(name) {
            Some(t) => *t = [now, t[0]],
            None => {
                self.last.insert(name.clone(), [now, 0]);
                if self.last.len() > 2 * self.cap {
                    let mut by_age: Vec<u64> = self.last.values().map(|t| t[0]).collect();
                    let (_, cut, _) = by_age.select_nth_unstable(self.last.len() - self.cap);
                    let cut = *cut;
                    self.last.retain(|_, t| t[0] >= cut);
                }
            }
        }
    }

    /// Eviction order, smallest first: second-to-last use (0 when used once), then last use.
    fn rank(&self, name: &AdapterName) -> (u64, u64) {
        self.last.get(name).map_or((0, 0), |t| (t[1], t[0]))
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub load_micros: AtomicU64,
}

/// A running request's hold on one adapter version. Fields drop in order: the weights first,
/// then (with the last clone) the trim guard, which sees them released.
#[derive(Debug, Clone)]
pub struct Lease {
    pub key: AdapterKey,
    pub weights: Arc<AdapterWeights>,
    _trim: Arc<TrimOnDrop>,
}

/// Applies the cache's bounds when the last clone of a lease ends.
#[derive(Debug)]
struct TrimOnDrop(std::sync::Weak<Core>);

impl Drop for TrimOnDrop {
    fn drop(&mut self) {
        if let Some(core) = self.0.upgrade() {
            core.trim();
        }
    }
}

struct Core {
    config: CacheConfig,
    inner: Mutex<Inner>,
    loaded: Condvar,
    stats: CacheStats,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdapterCache")
    }
}

pub struct AdapterCache {
    core: Arc<Core>,
}

impl AdapterCache {
    pub fn new(config: CacheConfig) -> Self {
        let cap = (4 * config.max_resident).max(4096);
        Self {
            core: Arc::new(Core {
                config,
                inner: Mutex::new(Inner {
                    lru: LruCache::unbounded(),
                    loading: HashSet::new(),
                    bytes: 0,
                    uses: Uses {
                        cap,
                        ..Uses::default()
                    },
                }),
                loaded: Condvar::new(),
                stats: CacheStats::default(),
            }),
        }
    }

    fn lease(&self, key: &AdapterKey, weights: Arc<AdapterWeights>) -> Lease {
        Lease {
            key: key.clone(),
            weights,
            _trim: Arc::new(TrimOnDrop(Arc::downgrade(&self.core))),
        }
    }

    /// A lease on `key` when that version is resident (a hit), without waiting for loads.
    pub fn hit(&self, key: &AdapterKey) -> Option<Lease> {
        let mut inner = self.core.inner.lock().expect("cache lock");
        let r = inner
            .lru
            .get_mut(&key.name)
            .filter(|r| r.version == key.version)?;
        r.last_use = SystemTime::now();
        let weights = r.weights.clone();
        inner.uses.touch(&key.name);
        drop(inner);
        self.core.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(self.lease(key, weights))
    }

    /// A lease on `key` (name and version), loading it with `load` on a miss.
    pub fn acquire(
        &self,
        key: &AdapterKey,
        pinned: bool,
        load: impl FnOnce() -> Result<AdapterWeights, AdapterError>,
    ) -> Result<Lease, AdapterError> {
        let core = &*self.core;
        let (name, version) = (&key.name, key.version);
        let mut inner = core.inner.lock().expect("cache lock");
        loop {
            if let Some(r) = inner.lru.get_mut(name) {
                if r.version == version {
                    r.pinned |= pinned;
                    r.last_use = SystemTime::now();
                    core.stats.hits.fetch_add(1, Ordering::Relaxed);
                    let weights = r.weights.clone();
                    inner.uses.touch(name);
                    drop(inner);
                    return Ok(self.lease(key, weights));
                }
            }
            if !inner.loading.contains(name) {
                break;
            }
            inner = core.loaded.wait(inner).expect("cache lock");
        }
        inner.loading.insert(name.clone());
        drop(inner);
        core.stats.misses.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        // A loader that panics must not leave the name in `loading` (every later request for it
        // would wait forever): it becomes this caller's error.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(AdapterError::LoadFailed {
                    name: name.key(),
                    message: format!("the loader panicked: {what}"),
                })
            });
        core.stats
            .load_micros
            .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        let mut inner = core.inner.lock().expect("cache lock");
        inner.loading.remove(name);
        inner.uses.touch(name);
        core.loaded.notify_all();
        let weights = Arc::new(result?);
        let bytes = weights.bytes();
        if bytes > core.config.max_bytes {
            return Err(AdapterError::OverBudget {
                name: name.key(),
                bytes,
                budget: core.config.max_bytes,
            });
        }
        let newer = inner.lru.peek(name).is_some_and(|r| r.version > version);
        if !newer {
            if let Some(old) = inner.lru.pop(name) {
                inner.bytes -= old.bytes;
            }
            inner.bytes += bytes;
            inner.lru.put(
                name.clone(),
                Resident {
                    version,
                    weights: weights.clone(),
                    bytes,
                    pinned,
                    last_use: SystemTime::now(),
                },
            );
            core.evict(&mut inner, Some(name));
        }
        drop(inner);
        Ok(self.lease(key, weights))
    }

    /// Applies the bounds again (leases end this way too).
    pub fn trim(&self) {
        self.core.trim();
    }

    /// Drops a resident adapter (unload); running leases keep their copy.
    pub fn remove(&self, name: &AdapterName) {
        let mut inner = self.core.inner.lock().expect("cache lock");
        if let Some(r) = inner.lru.pop(name) {
            inner.bytes -= r.bytes;
        }
    }

    pub fn set_pinned(&self, name: &AdapterName, pinned: bool) {
        if let Some(r) = self
            .core
            .inner
            .lock()
            .expect("cache lock")
            .lru
            .peek_mut(name)
        {
            r.pinned = pinned;
        }
    }

    /// Resident adapters, most recently used first.
    pub fn resident(&self) -> Vec<AdapterName> {
        self.core
            .inner
            .lock()
            .expect("cache lock")
            .lru
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Resident adapters with their bytes, pinning and last use, most recent first.
    pub fn residency(&self) -> Vec<Residency> {
        let inner = self.core.inner.lock().expect("cache lock");
        inner
            .lru
            .iter()
            .map(|(k, r)| Residency {
                name: k.clone(),
                bytes: r.bytes,
                pinned: r.pinned,
                last_use: r.last_use,
            })
            .collect()
    }

    /// Adapters being loaded now.
    pub fn loading(&self) -> Vec<AdapterName> {
        let inner = self.core.inner.lock().expect("cache lock");
        inner.loading.iter().cloned().collect()
    }

    pub fn resident_bytes(&self) -> usize {
        self.core.inner.lock().expect("cache lock").bytes
    }

    pub fn config(&self) -> &CacheConfig {
        &self.core.config
    }

    pub fn stats(&self) -> &CacheStats {
        &self.core.stats
    }
}

impl Core {
    fn trim(&self) {
        let mut inner = self.inner.lock().expect("cache lock");
        self.evict(&mut inner, None);
    }

    /// Evicts adapters that nobody leases and nobody pinned, in LRU-2 order, until the bounds
    /// hold (or nothing more can go).
    fn evict(&self, inner: &mut Inner, keep: Option<&AdapterName>) {
        while inner.lru.len() > self.config.max_resident || inner.bytes > self.config.max_bytes {
            let victim = inner
                .lru
                .iter()
                .filter(|(k, r)| {
                    Some(*k) != keep && !r.pinned && Arc::strong_count(&r.weights) == 1
                })
                .min_by_key(|(k, _)| inner.uses.rank(k))
                .map(|(k, _)| k.clone());
            let Some(k) = victim else { break };
            if let Some(r) = inner.lru.pop(&k) {
                inner.bytes -= r.bytes;
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
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
            ia3: Vec::new(),
            prefix: None,
            soft_prompt: None,
            bottleneck: Vec::new(),
            fusion: Vec::new(),
        }
    }

    fn k(name: &str, version: u64) -> AdapterKey {
        AdapterKey {
            name: AdapterName::parse(name).unwrap(),
            version,
        }
    }

    fn names(c: &AdapterCache) -> Vec<String> {
        c.resident().iter().map(|n| n.key()).collect()
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
        for k_ in ["a", "b"] {
            c.acquire(&k(k_, 0), false, || Ok(weights(1.0))).unwrap();
        }
        c.acquire(&k("a", 0), false, || panic!("hit expected"))
            .unwrap();
        c.acquire(&k("c", 0), false, || Ok(weights(1.0))).unwrap();
        assert_eq!(names(&c), vec!["c", "a"]);
        assert_eq!(c.stats().evictions.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_popular_adapter_outlasts_a_burst_of_one_off_adapters() {
        // Plain LRU would evict `hot` at the second one-off adapter.
        let c = cache(2);
        for _ in 0..3 {
            c.acquire(&k("hot", 0), false, || Ok(weights(1.0))).unwrap();
        }
        for k_ in ["x", "y", "z", "w"] {
            c.acquire(&k(k_, 0), false, || Ok(weights(1.0))).unwrap();
        }
        assert_eq!(names(&c), vec!["w", "hot"]);
        c.acquire(&k("hot", 0), false, || panic!("`hot` must be resident"))
            .unwrap();
    }

    #[test]
    fn an_evicted_adapter_comes_back_with_its_history() {
        let c = cache(2);
        for k_ in ["a", "a", "b", "b"] {
            c.acquire(&k(k_, 0), false, || Ok(weights(1.0))).unwrap();
        }
        // Both used twice: `c` (used once) goes when `a` returns, not `a` or `b`...
        c.acquire(&k("c", 0), false, || Ok(weights(1.0))).unwrap();
        assert_eq!(
            names(&c),
            vec!["c", "b"],
            "`a` was used least recently twice"
        );
        c.acquire(&k("a", 0), false, || Ok(weights(1.0))).unwrap();
        // ...because `a`'s two earlier uses were remembered while it was not resident.
        assert_eq!(names(&c), vec!["a", "b"]);
    }

    #[test]
    fn a_held_lease_is_never_evicted_and_pinned_stays() {
        let c = cache(2);
        let held = c
            .acquire(&k("held", 0), false, || Ok(weights(1.0)))
            .unwrap();
        c.acquire(&k("pinned", 0), true, || Ok(weights(2.0)))
            .unwrap();
        for k_ in ["x", "y", "z"] {
            c.acquire(&k(k_, 0), false, || Ok(weights(3.0))).unwrap();
        }
        let resident = names(&c);
        assert!(
            resident.contains(&"held".to_string()) && resident.contains(&"pinned".to_string()),
            "{resident:?}"
        );
        // Over the count while everything else is leased or pinned; shrinks once the lease ends.
        drop(held);
        c.trim();
        assert_eq!(c.resident().len(), 2);
        assert!(names(&c).contains(&"pinned".to_string()));
    }

    #[test]
    fn concurrent_misses_load_once() {
        let c = Arc::new(cache(4));
        let loads = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, loads) = (c.clone(), loads.clone());
                std::thread::spawn(move || {
                    c.acquire(&k("one", 0), false, || {
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
        let v0 = c.acquire(&k("a", 0), false, || Ok(weights(1.0))).unwrap();
        let v1 = c.acquire(&k("a", 1), false, || Ok(weights(5.0))).unwrap();
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
        assert_eq!(names(&c), vec!["a"]);
    }

    #[test]
    fn the_end_of_the_last_lease_shrinks_the_cache() {
        let c = cache(1);
        let a = c.acquire(&k("a", 0), false, || Ok(weights(1.0))).unwrap();
        let a2 = a.clone();
        let b = c.acquire(&k("b", 0), false, || Ok(weights(1.0))).unwrap();
        assert_eq!(c.resident().len(), 2, "both leased: over the count");
        drop(a);
        assert_eq!(
            c.resident().len(),
            2,
            "a clone of the lease still holds `a`"
        );
        drop(a2);
        assert_eq!(
            names(&c),
            vec!["b"],
            "no explicit trim: the lease's end applies the bounds"
        );
        drop(b);
        assert_eq!(c.resident().len(), 1);
    }

    #[test]
    fn a_late_load_of_an_old_version_does_not_displace_the_new_one() {
        let c = cache(4);
        // A request read the registry before a re-registration and loads version 1 after a
        // request of the new version 2 did.
        let new = c.acquire(&k("a", 2), false, || Ok(weights(5.0))).unwrap();
        let old = c.acquire(&k("a", 1), false, || Ok(weights(1.0))).unwrap();
        assert_eq!(old.key.version, 1);
        let again = c
            .acquire(&k("a", 2), false, || {
                panic!("version 2 must still be resident")
            })
            .unwrap();
        assert!(Arc::ptr_eq(&again.weights, &new.weights));
    }

    #[test]
    fn a_panicking_load_fails_its_caller_and_blocks_nobody() {
        let c = cache(4);
        let err = c
            .acquire(&k("boom", 1), false, || panic!("corrupt file"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("boom") && err.contains("corrupt file"),
            "{err}"
        );
        // The next request for the same adapter loads it (it used to wait forever).
        let lease = c
            .acquire(&k("boom", 1), false, || Ok(weights(1.0)))
            .unwrap();
        assert_eq!(lease.key.version, 1);
    }

    #[test]
    fn over_budget_is_refused_and_failures_do_not_stick() {
        let c = AdapterCache::new(CacheConfig {
            max_resident: 4,
            max_bytes: 8,
        });
        let err = c
            .acquire(&k("big", 0), false, || Ok(weights(1.0)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("big") && err.contains("budget"), "{err}");
        let err = c
            .acquire(&k("bad", 0), false, || {
                Err(AdapterError::NotFound("bad".into()))
            })
            .unwrap_err();
        assert!(matches!(err, AdapterError::NotFound(_)));
        assert!(c.resident().is_empty());
    }
}
