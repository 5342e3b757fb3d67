//! An opt-in profile of a forward step by part (`profile::enable`): each instrumented region
//! adds its exclusive time (nested regions are subtracted from their parent) to its part's
//! counter. Off, a region costs one relaxed atomic load. Used by `examples/step_profile.rs`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Embed,
    Norm,
    QkvProj,
    Rope,
    Attention,
    OProj,
    GateUpProj,
    Activation,
    DownProj,
    AdapterDelta,
    LmHead,
    /// Backward parts (training).
    BwdLora,
    BwdHead,
    BwdElementwise,
}

impl Part {
    pub const ALL: [Part; 14] = [
        Part::Embed,
        Part::Norm,
        Part::QkvProj,
        Part::Rope,
        Part::Attention,
        Part::OProj,
        Part::GateUpProj,
        Part::Activation,
        Part::DownProj,
        Part::AdapterDelta,
        Part::LmHead,
        Part::BwdLora,
        Part::BwdHead,
        Part::BwdElementwise,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Part::Embed => "embedding lookup",
            Part::Norm => "RMSNorm",
            Part::QkvProj => "q/k/v projections (base)",
            Part::Rope => "RoPE + head reshapes",
            Part::Attention => "KV append + attention",
            Part::OProj => "o projection (base)",
            Part::GateUpProj => "gate/up projections (base)",
            Part::Activation => "SiLU · up, residual adds",
            Part::DownProj => "down projection (base)",
            Part::AdapterDelta => "adapter deltas",
            Part::LmHead => "lm_head (sampled rows)",
            Part::BwdLora => "projections (frozen base, with any LoRA)",
            Part::BwdHead => "lm_head and loss",
            Part::BwdElementwise => "RMSNorm, RoPE, softmax, SiLU",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 14] = [const { AtomicU64::new(0) }; 14];

thread_local! {
    /// Open regions: (start, nanoseconds spent in nested regions).
    static STACK: RefCell<Vec<(Instant, u64)>> = const { RefCell::new(Vec::new()) };
}

pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Clears the counters.
pub fn reset() {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
}

/// Exclusive nanoseconds per part since the last `reset`.
pub fn totals() -> Vec<(Part, u64)> {
    Part::ALL
        .iter()
        .map(|&p| (p, NANOS[p as usize].load(Ordering::Relaxed)))
        .collect()
}

/// Runs `f`, counting its time (minus nested regions) to `part` when profiling is on.
#[inline]
pub fn time<T>(part: Part, f: impl FnOnce() -> T) -> T {
    let _region = region(part);
    f()
}

/// A region that counts to `part` until it is dropped (see [`time`]).
pub struct Region(Option<Part>);

/// Opens a region counted to `part` when profiling is on.
#[inline]
pub fn region(part: Part) -> Region {
    if !ON.load(Ordering::Relaxed) {
        return Region(None);
    }
    STACK.with(|s| s.borrow_mut().push((Instant::now(), 0)));
    Region(Some(part))
}

impl Drop for Region {
    fn drop(&mut self) {
        let Some(part) = self.0 else { return };
        close(part);
    }
}

fn close(part: Part) {
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        let (start, nested) = s.pop().expect("profile stack");
        let total = start.elapsed().as_nanos() as u64;
        NANOS[part as usize].fetch_add(total.saturating_sub(nested), Ordering::Relaxed);
        if let Some(parent) = s.last_mut() {
            parent.1 += total;
        }
    });
}
