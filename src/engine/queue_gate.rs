//! The bound on waiting requests per tenant and in all, checked at submission, before the
//! worker's `Scheduler` sees a request. Pure bookkeeping, unit-tested with the scheduler.

use std::collections::HashMap;

use super::scheduler::{Refusal, SchedulerConfig};

/// The bound on waiting requests, checked when a request is submitted (before the worker sees
/// it): `max_queue` in all, `max_queue_per_tenant` for each tenant. A request leaves when the
/// worker admits or drops it. When the queue is full, a request of a better priority than some
/// waiting one still gets in: the worker sheds the worst waiting one (`pending_sheds`).
#[derive(Debug)]
pub struct QueueGate {
    max_queue: usize,
    per_tenant: usize,
    waiting: usize,
    by_tenant: HashMap<String, usize>,
    by_priority: std::collections::BTreeMap<i32, usize>,
    sheds: usize,
}

impl QueueGate {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        Self {
            max_queue: cfg.max_queue,
            per_tenant: cfg.max_queue_per_tenant,
            waiting: 0,
            by_tenant: HashMap::new(),
            by_priority: Default::default(),
            sheds: 0,
        }
    }

    pub fn enter(&mut self, tenant: &str, priority: i32) -> Result<(), Refusal> {
        let mine = self.by_tenant.get(tenant).copied().unwrap_or(0);
        if mine >= self.per_tenant {
            return Err(Refusal::QueueFull);
        }
        if self.waiting >= self.max_queue + self.sheds {
            let worse = self
                .by_priority
                .iter()
                .rev()
                .find(|(p, n)| **p > priority && **n > 0)
                .map(|(p, _)| *p)
                .ok_or(Refusal::QueueFull)?;
            dec(&mut self.by_priority, &worse);
            self.sheds += 1;
        }
        self.waiting += 1;
        *self.by_tenant.entry(tenant.to_string()).or_default() += 1;
        *self.by_priority.entry(priority).or_default() += 1;
        Ok(())
    }

    pub fn leave(&mut self, tenant: &str, priority: i32) {
        if self.by_tenant.contains_key(tenant) {
            dec(&mut self.by_priority, &priority);
            self.left(tenant);
        }
    }

    fn left(&mut self, tenant: &str) {
        if let Some(n) = self.by_tenant.get_mut(tenant) {
            *n -= 1;
            self.waiting -= 1;
            if *n == 0 {
                self.by_tenant.remove(tenant);
            }
        }
    }

    /// Requests to shed for better-priority ones that found the queue full (the worker takes
    /// them and calls `shed` or `cancel_shed` for each).
    pub fn pending_sheds(&self) -> usize {
        self.sheds
    }

    /// A shed the worker found nothing to shed for (the request was admitted meanwhile).
    pub fn cancel_shed(&mut self) {
        self.sheds = self.sheds.saturating_sub(1);
    }

    /// A shed request of `tenant` left (its priority was counted out when it was picked).
    pub fn shed(&mut self, tenant: &str) {
        self.sheds = self.sheds.saturating_sub(1);
        self.left(tenant);
    }

    pub fn waiting(&self) -> usize {
        self.waiting.saturating_sub(self.sheds)
    }
}

fn dec<K: Ord>(m: &mut std::collections::BTreeMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            m.remove(k);
        }
    }
}
