//! A work queue fair across tenants: one FIFO per tenant, served round-robin (a tenant with ten
//! jobs waiting gets every other turn against a tenant with one, not ten turns first), with a
//! condition variable for the worker threads that wait on it.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

#[derive(Debug, Default)]
pub struct FairQueue {
    /// Tenants with work waiting, in turn order, each with its ids in arrival order.
    turns: VecDeque<(Option<String>, VecDeque<String>)>,
}

impl FairQueue {
    pub fn push(&mut self, owner: Option<&str>, id: &str) {
        match self.turns.iter_mut().find(|(o, _)| o.as_deref() == owner) {
            Some((_, ids)) => ids.push_back(id.to_string()),
            None => self
                .turns
                .push_back((owner.map(str::to_string), VecDeque::from([id.to_string()]))),
        }
    }

    /// The next id: the first of the tenant whose turn it is; that tenant goes to the back.
    pub fn pop(&mut self) -> Option<String> {
        let (owner, mut ids) = self.turns.pop_front()?;
        let id = ids.pop_front();
        if !ids.is_empty() {
            self.turns.push_back((owner, ids));
        }
        id
    }

    /// Takes `id` out of the queue; whether it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        for (_, ids) in self.turns.iter_mut() {
            if let Some(i) = ids.iter().position(|j| j == id) {
                ids.remove(i);
                self.turns.retain(|(_, ids)| !ids.is_empty());
                return true;
            }
        }
        false
    }

    pub fn len(&self) -> usize {
        self.turns.iter().map(|(_, ids)| ids.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }
}

/// A `FairQueue` that worker threads block on.
#[derive(Debug, Default)]
pub struct WaitQueue {
    pub inner: Mutex<FairQueue>,
    wake: Condvar,
}

impl WaitQueue {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, FairQueue> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, owner: Option<&str>, id: &str) {
        self.lock().push(owner, id);
        self.wake.notify_one();
    }

    /// Blocks until an id is waiting and takes it.
    pub fn next(&self) -> String {
        let mut q = self.lock();
        loop {
            if let Some(id) = q.pop() {
                return id;
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_take_turns_and_each_keeps_its_order() {
        let mut q = FairQueue::default();
        for i in 0..4 {
            q.push(Some("heavy"), &format!("h{i}"));
        }
        q.push(Some("light"), "l0");
        q.push(None, "n0");
        q.push(Some("light"), "l1");
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["h0", "l0", "n0", "h1", "l1", "h2", "h3"]);
        assert!(q.is_empty());
    }

    #[test]
    fn removal_takes_one_id_and_drops_an_empty_turn() {
        let mut q = FairQueue::default();
        q.push(Some("a"), "a0");
        q.push(Some("b"), "b0");
        assert!(q.remove("a0"));
        assert!(!q.remove("a0"));
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop().as_deref(), Some("b0"));
        assert_eq!(q.pop(), None);
    }
}
