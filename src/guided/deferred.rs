//! The compiler built on a thread of its own at start-up, so the server answers while it is
//! built (a vocabulary of 49k tokens takes a few tenths of a second to turn into llguidance's
//! token trie); the first request that needs it waits for it.

use std::sync::{Arc, OnceLock};

use super::Guidance;

/// `Guidance` once built, or why it could not be.
#[derive(Clone)]
pub struct Deferred {
    cell: Arc<OnceLock<Result<Guidance, String>>>,
}

impl Deferred {
    /// Starts `build` on a thread; a panic in it reads as an error, never as a wait forever.
    pub fn start(build: impl FnOnce() -> Result<Guidance, String> + Send + 'static) -> Self {
        let cell: Arc<OnceLock<Result<Guidance, String>>> = Arc::default();
        let fill = cell.clone();
        let spawned = std::thread::Builder::new()
            .name("guidance".into())
            .spawn(move || {
                let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
                    .unwrap_or_else(|_| Err("building the token trie panicked".into()));
                if let Err(e) = &built {
                    tracing::warn!("structured outputs are off: {e}");
                }
                let _ = fill.set(built);
            });
        if let Err(e) = spawned {
            let _ = cell.set(Err(format!("cannot start a thread for it: {e}")));
        }
        Self { cell }
    }

    /// Already built (tests, and callers that cannot wait).
    pub fn ready(built: Result<Guidance, String>) -> Self {
        Self {
            cell: Arc::new(OnceLock::from(built)),
        }
    }

    /// The compiler, waiting for it while it is being built.
    pub fn get(&self) -> Result<&Guidance, &str> {
        self.cell.wait().as_ref().map_err(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_that_fails_or_panics_reads_as_an_error() {
        let failed = Deferred::start(|| Err("no vocabulary".into()));
        assert_eq!(failed.get().err(), Some("no vocabulary"));
        let panicked = Deferred::start(|| panic!("boom"));
        assert_eq!(
            panicked.get().err(),
            Some("building the token trie panicked")
        );
    }
}
