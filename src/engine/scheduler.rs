//! Admission policy, pure: one waiting queue per tenant, admitted round-robin across tenants
//! (FIFO within each), a cap on running sequences and a KV budget in tokens. A sequence
//! reserves `prompt + max_tokens` positions when admitted, so a running sequence can always
//! finish. The worker owns the `Scheduler`; `submit` passes only the `QueueGate`, where each
//! tenant may hold at most `max_queue_per_tenant` waiting requests, so one tenant cannot fill
//! the queue for everyone. No tensors here; unit-tested alone.

use std::collections::{HashMap, VecDeque};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// `--max-running`.
    pub max_running: usize,
    /// `--kv-cache-tokens`.
    pub kv_cache_tokens: usize,
    /// `--max-queue`.
    pub max_queue: usize,
    /// `max_queue_per_tenant` of the keys file (default: a fair share of `max_queue`).
    pub max_queue_per_tenant: usize,
    /// `--max-batched-tokens`: tokens one step feeds; decode rows take one each, prompts share
    /// the rest in chunks (0: no limit).
    pub max_batched_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    QueueFull,
    /// Needs more KV positions than the whole budget.
    TooLarge {
        needed: usize,
        budget: usize,
    },
}

#[derive(Debug)]
struct TenantQueue {
    tenant: String,
    waiting: VecDeque<(u64, usize)>,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    /// Tenants with waiting requests, in round-robin order; `next` is whose turn it is.
    queues: Vec<TenantQueue>,
    next: usize,
    waiting: usize,
    running: Vec<(u64, usize)>,
    reserved: usize,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            queues: Vec::new(),
            next: 0,
            waiting: 0,
            running: Vec::new(),
            reserved: 0,
        }
    }

    /// Queues request `id` of `tenant` (`""`: no tenant) that needs `tokens` KV positions.
    pub fn enqueue(&mut self, id: u64, tenant: &str, tokens: usize) -> Result<(), Refusal> {
        if tokens > self.cfg.kv_cache_tokens {
            return Err(Refusal::TooLarge {
                needed: tokens,
                budget: self.cfg.kv_cache_tokens,
            });
        }
        let pos = match self.queues.iter().position(|q| q.tenant == tenant) {
            Some(p) => p,
            None => {
                self.queues.push(TenantQueue {
                    tenant: tenant.to_string(),
                    waiting: VecDeque::new(),
                });
                self.queues.len() - 1
            }
        };
        self.queues[pos].waiting.push_back((id, tokens));
        self.waiting += 1;
        Ok(())
    }

    /// Moves waiting requests to running, one tenant's head at a time in turn, while both
    /// bounds allow. A head that does not fit stops admission (no overtaking it, so a large
    /// request is not starved).
    pub fn admit(&mut self) -> Vec<u64> {
        let mut admitted = Vec::new();
        while !self.queues.is_empty() {
            let turn = self.next % self.queues.len();
            let &(id, tokens) = self.queues[turn]
                .waiting
                .front()
                .expect("queues are non-empty");
            if self.running.len() >= self.cfg.max_running
                || self.reserved + tokens > self.cfg.kv_cache_tokens
            {
                break;
            }
            self.queues[turn].waiting.pop_front();
            self.waiting -= 1;
            self.running.push((id, tokens));
            self.reserved += tokens;
            admitted.push(id);
            if self.queues[turn].waiting.is_empty() {
                self.queues.remove(turn);
                self.next = turn;
            } else {
                self.next = turn + 1;
            }
        }
        admitted
    }

    /// Removes `id` wherever it is (finished, failed or cancelled); whether it was waiting.
    pub fn remove(&mut self, id: u64) -> bool {
        let mut was_waiting = false;
        if let Some(qi) = self
            .queues
            .iter()
            .position(|q| q.waiting.iter().any(|(w, _)| *w == id))
        {
            self.queues[qi].waiting.retain(|(w, _)| *w != id);
            self.waiting -= 1;
            was_waiting = true;
            if self.queues[qi].waiting.is_empty() {
                self.queues.remove(qi);
                if self.next > qi {
                    self.next -= 1;
                }
            }
        }
        if let Some(pos) = self.running.iter().position(|(r, _)| *r == id) {
            self.reserved -= self.running.swap_remove(pos).1;
        }
        was_waiting
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    pub fn waiting_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.queues
            .iter()
            .flat_map(|q| q.waiting.iter().map(|(id, _)| *id))
    }

    /// Reserved fraction of the KV budget.
    pub fn kv_usage(&self) -> f64 {
        self.reserved as f64 / self.cfg.kv_cache_tokens.max(1) as f64
    }
}

/// The bound on waiting requests, checked when a request is submitted (before the worker sees
/// it): `max_queue` in all, `max_queue_per_tenant` for each tenant. A request leaves when the
/// worker admits or drops it.
#[derive(Debug)]
pub struct QueueGate {
    max_queue: usize,
    per_tenant: usize,
    waiting: usize,
    by_tenant: HashMap<String, usize>,
}

impl QueueGate {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        Self {
            max_queue: cfg.max_queue,
            per_tenant: cfg.max_queue_per_tenant,
            waiting: 0,
            by_tenant: HashMap::new(),
        }
    }

    pub fn enter(&mut self, tenant: &str) -> Result<(), Refusal> {
        let mine = self.by_tenant.get(tenant).copied().unwrap_or(0);
        if self.waiting >= self.max_queue || mine >= self.per_tenant {
            return Err(Refusal::QueueFull);
        }
        self.waiting += 1;
        *self.by_tenant.entry(tenant.to_string()).or_default() += 1;
        Ok(())
    }

    pub fn leave(&mut self, tenant: &str) {
        if let Some(n) = self.by_tenant.get_mut(tenant) {
            *n -= 1;
            self.waiting -= 1;
            if *n == 0 {
                self.by_tenant.remove(tenant);
            }
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(max_running: usize, kv: usize, queue: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_running,
            kv_cache_tokens: kv,
            max_queue: queue,
            max_queue_per_tenant: queue,
            max_batched_tokens: 0,
        })
    }

    #[test]
    fn admits_in_order_within_running_cap() {
        let mut s = sched(2, 1000, 10);
        for id in 0..4 {
            s.enqueue(id, "", 10).unwrap();
        }
        assert_eq!(s.admit(), vec![0, 1]);
        assert_eq!(s.admit(), Vec::<u64>::new());
        s.remove(0);
        assert_eq!(s.admit(), vec![2]);
        assert_eq!((s.running_len(), s.waiting_len()), (2, 1));
    }

    #[test]
    fn kv_budget_holds_back_and_releases() {
        let mut s = sched(10, 100, 10);
        s.enqueue(1, "", 60).unwrap();
        s.enqueue(2, "", 60).unwrap();
        s.enqueue(3, "", 10).unwrap();
        // FIFO: 3 would fit but must not overtake 2.
        assert_eq!(s.admit(), vec![1]);
        assert!((s.kv_usage() - 0.6).abs() < 1e-9);
        s.remove(1);
        assert_eq!(s.admit(), vec![2, 3]);
        assert_eq!(
            s.enqueue(4, "", 101),
            Err(Refusal::TooLarge {
                needed: 101,
                budget: 100
            })
        );
    }

    #[test]
    fn tenants_take_turns_and_one_cannot_fill_the_queue() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_running: 1,
            kv_cache_tokens: 1000,
            max_queue: 10,
            max_queue_per_tenant: 4,
            max_batched_tokens: 0,
        });
        let mut gate = QueueGate::new(&s.cfg);
        for id in 0..6 {
            let r = gate.enter("a").and_then(|_| s.enqueue(id, "a", 1));
            assert_eq!(r.is_ok(), id < 4, "{id}");
        }
        s.enqueue(10, "b", 1).unwrap();
        s.enqueue(11, "b", 1).unwrap();
        s.enqueue(20, "c", 1).unwrap();
        let mut order = Vec::new();
        while s.waiting_len() > 0 {
            let got = s.admit();
            assert_eq!(got.len(), 1);
            order.push(got[0]);
            s.remove(got[0]);
        }
        assert_eq!(order, vec![0, 10, 20, 1, 11, 2, 3]);
        // A late tenant is served at its turn, not after everything queued before it.
        for id in 30..34 {
            s.enqueue(id, "a", 1).unwrap();
        }
        let first = s.admit();
        s.enqueue(40, "b", 1).unwrap();
        s.remove(first[0]);
        assert_eq!(s.admit(), vec![40]);
    }

    #[test]
    fn queue_bound_refuses() {
        let mut s = sched(1, 100, 2);
        let mut gate = QueueGate::new(&s.cfg);
        for id in [1, 2] {
            gate.enter("").unwrap();
            s.enqueue(id, "", 1).unwrap();
        }
        assert_eq!(gate.enter(""), Err(Refusal::QueueFull));
        assert!(s.remove(2));
        gate.leave("");
        gate.enter("").unwrap();
        s.enqueue(3, "", 1).unwrap();
        assert_eq!(s.waiting_ids().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(gate.waiting(), 2);
        // Another tenant has its own share; the total bound still holds.
        let mut gate = QueueGate::new(&SchedulerConfig {
            max_queue: 3,
            max_queue_per_tenant: 2,
            ..s.cfg.clone()
        });
        gate.enter("a").unwrap();
        gate.enter("a").unwrap();
        assert_eq!(gate.enter("a"), Err(Refusal::QueueFull));
        gate.enter("b").unwrap();
        assert_eq!(gate.enter("b"), Err(Refusal::QueueFull));
        gate.leave("a");
        gate.enter("b").unwrap();
    }
}
