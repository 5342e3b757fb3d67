//! Admission policy, pure: FIFO waiting queue, a cap on running sequences and a KV budget in
//! tokens. A sequence reserves `prompt + max_tokens` positions when admitted, so a running
//! sequence can always finish. No tensors here; unit-tested alone.

use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// `--max-running`.
    pub max_running: usize,
    /// `--kv-cache-tokens`.
    pub kv_cache_tokens: usize,
    /// `--max-queue`.
    pub max_queue: usize,
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
pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<(u64, usize)>,
    running: Vec<(u64, usize)>,
    reserved: usize,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
        }
    }

    /// Queues request `id` that needs `tokens` KV positions.
    pub fn enqueue(&mut self, id: u64, tokens: usize) -> Result<(), Refusal> {
        if tokens > self.cfg.kv_cache_tokens {
            return Err(Refusal::TooLarge {
                needed: tokens,
                budget: self.cfg.kv_cache_tokens,
            });
        }
        if self.waiting.len() >= self.cfg.max_queue {
            return Err(Refusal::QueueFull);
        }
        self.waiting.push_back((id, tokens));
        Ok(())
    }

    /// Moves waiting requests to running, in order, while both bounds allow.
    pub fn admit(&mut self) -> Vec<u64> {
        let mut admitted = Vec::new();
        while let Some(&(id, tokens)) = self.waiting.front() {
            if self.running.len() >= self.cfg.max_running
                || self.reserved + tokens > self.cfg.kv_cache_tokens
            {
                break;
            }
            self.waiting.pop_front();
            self.running.push((id, tokens));
            self.reserved += tokens;
            admitted.push(id);
        }
        admitted
    }

    /// Removes `id` wherever it is (finished, failed or cancelled).
    pub fn remove(&mut self, id: u64) {
        self.waiting.retain(|(w, _)| *w != id);
        if let Some(pos) = self.running.iter().position(|(r, _)| *r == id) {
            self.reserved -= self.running.swap_remove(pos).1;
        }
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    pub fn waiting_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.waiting.iter().map(|(id, _)| *id)
    }

    /// Reserved fraction of the KV budget.
    pub fn kv_usage(&self) -> f64 {
        self.reserved as f64 / self.cfg.kv_cache_tokens.max(1) as f64
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
        })
    }

    #[test]
    fn admits_in_order_within_running_cap() {
        let mut s = sched(2, 1000, 10);
        for id in 0..4 {
            s.enqueue(id, 10).unwrap();
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
        s.enqueue(1, 60).unwrap();
        s.enqueue(2, 60).unwrap();
        s.enqueue(3, 10).unwrap();
        // FIFO: 3 would fit but must not overtake 2.
        assert_eq!(s.admit(), vec![1]);
        assert!((s.kv_usage() - 0.6).abs() < 1e-9);
        s.remove(1);
        assert_eq!(s.admit(), vec![2, 3]);
        assert_eq!(
            s.enqueue(4, 101),
            Err(Refusal::TooLarge {
                needed: 101,
                budget: 100
            })
        );
    }

    #[test]
    fn queue_bound_refuses() {
        let mut s = sched(1, 100, 2);
        s.enqueue(1, 1).unwrap();
        s.enqueue(2, 1).unwrap();
        assert_eq!(s.enqueue(3, 1), Err(Refusal::QueueFull));
        s.remove(2);
        s.enqueue(3, 1).unwrap();
        assert_eq!(s.waiting_ids().collect::<Vec<_>>(), vec![1, 3]);
    }
}
