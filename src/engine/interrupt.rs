//! Interrupting a step for a first token: on a CPU one step under load takes about a second
//! (24 streams deep in their answers beside a prompt chunk), so a short request that arrives
//! just after a step began would wait for all of it, then share the next one with every stream.
//! A request that is *owed* a prompt step of its own instead stops the step in progress between
//! two layers (its work is thrown away and redone: a paged cache's positions are simply written
//! again) and gets the next step to itself.
//!
//! Owed (see `owed`): a strictly better priority than anything the step serves; or, at the best
//! priority the step serves, a tenant with nothing in the engine yet, when no other tenant was
//! given such a step in the last `SAME_PRIORITY_EVERY` steps (so that many tenants arriving
//! one after another cannot keep the streams from ever finishing a step), and a prompt that
//! fits one step's token budget (a longer one needs several steps anyway).
//!
//! Whatever the reason, a step is stopped at most once in `SAME_PRIORITY_EVERY` completed steps
//! (`StepView::interrupt_open`): a client that sends requests and drops them at once, in a loop,
//! would otherwise stop every step and the streams would never advance.
//!
//! `Engine::submit` notes each request it sends (`Interrupt::sent`); the step in progress asks
//! between layers whether a request sent since it began is owed (`Interrupt::should_stop`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Steps a same-priority first-token step waits after the last one (a bound on how much of
/// the streams' time arriving tenants take: at most one step in this many).
pub const SAME_PRIORITY_EVERY: u64 = 4;

/// What the step in progress serves.
#[derive(Debug, Clone, Default)]
pub struct StepView {
    /// The best (lowest) priority among the sequences in the engine; `None`: nothing runs.
    pub best_priority: Option<i32>,
    /// Tenants with a sequence in the engine (running, preempted or admitted).
    pub tenants: HashSet<String>,
    /// Whether a same-priority first-token step may be given now (see `SAME_PRIORITY_EVERY`).
    pub same_priority_open: bool,
    /// The step's token budget (0: whole prompts, not interrupted for a newcomer).
    pub budget: usize,
    /// Whether the step in progress may be stopped at all: `SAME_PRIORITY_EVERY` steps have
    /// completed since the last one was (a bound on the work stopped steps throw away).
    pub interrupt_open: bool,
}

/// Whether a request of `tenant` at `priority` with `prompt` tokens to compute is owed a
/// prompt step of its own while `view` runs.
pub fn owed(view: &StepView, tenant: &str, priority: i32, prompt: usize) -> bool {
    let Some(best) = view.best_priority else {
        return false; // nothing to interrupt or to keep out
    };
    if view.budget == 0 || prompt > view.budget {
        return false;
    }
    priority < best
        || (priority == best && view.same_priority_open && !view.tenants.contains(tenant))
}

/// A request sent to the worker, not yet received by it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub id: u64,
    pub tenant: String,
    pub priority: i32,
    /// Its prompt's tokens.
    pub prompt: usize,
}

/// Requests in flight to the worker: `Engine::submit` notes each before sending it, the worker
/// strikes each out as it receives it, and the step in progress asks whether one of those in
/// flight is owed a step (`should_stop`). A note outlives its request's receipt only between
/// the two, so a request sent while the worker drains its channel is never missed.
#[derive(Debug, Default)]
pub struct Interrupt {
    notes: Mutex<Vec<Arrival>>,
    any: AtomicBool,
    /// Test hook: the next step in progress stops.
    once: AtomicBool,
}

impl Interrupt {
    pub fn sent(&self, a: Arrival) {
        let mut notes = self.notes.lock().expect("interrupt lock");
        notes.push(a);
        self.any.store(true, Ordering::SeqCst);
    }

    pub fn received(&self, id: u64) {
        let mut notes = self.notes.lock().expect("interrupt lock");
        notes.retain(|a| a.id != id);
        self.any.store(!notes.is_empty(), Ordering::SeqCst);
    }

    /// Test hook: the next step stops after its first layer, as for a request owed a step.
    pub fn stop_next_step(&self) {
        self.once.store(true, Ordering::SeqCst);
    }

    /// Whether a request in flight is owed a step while `view` runs.
    pub fn should_stop(&self, view: &StepView) -> bool {
        if self.once.swap(false, Ordering::SeqCst) {
            return true;
        }
        if !view.interrupt_open || !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let notes = self.notes.lock().expect("interrupt lock");
        notes
            .iter()
            .any(|a| owed(view, &a.tenant, a.priority, a.prompt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(best: i32, tenants: &[&str], open: bool) -> StepView {
        StepView {
            best_priority: Some(best),
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            same_priority_open: open,
            budget: 256,
            interrupt_open: true,
        }
    }

    #[test]
    fn a_new_tenant_or_a_better_priority_is_owed_a_step() {
        let v = view(0, &["heavy"], true);
        assert!(owed(&v, "light", 0, 40));
        assert!(
            !owed(&v, "heavy", 0, 40),
            "a tenant already served waits its turn"
        );
        assert!(
            !owed(&v, "light", 1, 40),
            "a worse priority never interrupts"
        );
        assert!(
            !owed(&v, "light", 0, 257),
            "a prompt over the budget takes steps anyway"
        );
        assert!(owed(&v, "heavy", -1, 40), "a better priority always does");
    }

    #[test]
    fn newcomers_take_at_most_one_step_in_a_few() {
        let v = view(0, &["heavy"], false);
        assert!(!owed(&v, "light", 0, 40));
        assert!(owed(&v, "light", -1, 40));
    }

    #[test]
    fn nothing_running_nothing_to_interrupt() {
        let v = StepView::default();
        assert!(!owed(&v, "light", -5, 4));
        let i = Interrupt::default();
        let running = view(0, &["heavy"], true);
        let note = |id, tenant: &str| Arrival {
            id,
            tenant: tenant.into(),
            priority: 0,
            prompt: 10,
        };
        i.sent(note(1, "heavy"));
        assert!(!i.should_stop(&running));
        i.sent(note(2, "light"));
        assert!(i.should_stop(&running));
        i.received(2);
        assert!(
            !i.should_stop(&running),
            "received: the worker knows it now"
        );
        i.received(1);
        assert!(!i.should_stop(&running));
        // Right after a stopped step, nothing stops the next ones for a while.
        i.sent(note(3, "light"));
        let closed = StepView {
            interrupt_open: false,
            ..running
        };
        assert!(!i.should_stop(&closed));
    }
}
