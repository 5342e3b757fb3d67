//! Constraints compiled by llguidance over the model's tokenizer, and the per-sequence matcher.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use super::GuidedError;
use crate::tokenizer::Tokenizer;

/// What a request constrains its answer to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON schema, as canonical JSON text.
    JsonSchema(String),
    /// A regular expression the whole answer matches (vLLM's `guided_regex`).
    Regex(String),
    /// One of these strings exactly (vLLM's `guided_choice`).
    Choice(Vec<String>),
}

impl Constraint {
    /// Bytes of the constraint's text.
    pub fn text_len(&self) -> usize {
        match self {
            Self::JsonObject => 0,
            Self::JsonSchema(s) | Self::Regex(s) => s.len(),
            Self::Choice(o) => o.iter().map(String::len).sum(),
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar, GuidedError> {
        if self.text_len() > MAX_CONSTRAINT_BYTES {
            return Err(GuidedError::Invalid(format!(
                "the constraint is {} bytes; at most {MAX_CONSTRAINT_BYTES} are compiled",
                self.text_len()
            )));
        }
        Ok(match self {
            Self::JsonObject => json_grammar(serde_json::json!({"type": "object"})),
            Self::JsonSchema(s) => json_grammar(
                serde_json::from_str(s).map_err(|e| GuidedError::Invalid(e.to_string()))?,
            ),
            Self::Regex(r) => {
                regex::RegexBuilder::new(r)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| GuidedError::Invalid(e.to_string()))?;
                TopLevelGrammar::from_regex(r)
            }
            Self::Choice(options) => {
                if options.is_empty() {
                    return Err(GuidedError::Invalid("no choices given".into()));
                }
                let alternatives: Vec<String> = options.iter().map(|o| regex::escape(o)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
        })
    }
}

/// JSON as OpenAI writes it (`{"a": 1, "b": 2}`): fixed separators, no other whitespace, unless
/// the schema's `x-guidance` says otherwise. (The library's default allows any whitespace
/// between tokens, and a model can spend its whole answer on it.)
fn json_grammar(mut schema: serde_json::Value) -> TopLevelGrammar {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
        });
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// The tokenizer as llguidance sees it: every token's bytes in a trie, and plain-text
/// tokenization of forced byte strings.
struct Env {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.tokenizer
            .encode_plain(&String::from_utf8_lossy(s))
            .unwrap_or_default()
    }
}

/// Compiles constraints for one model's tokenizer; compiled matchers are cached (LRU) per scope
/// (the tenant), so a schema used again costs a clone — no tenant can time whether another one
/// used a schema, and none can evict another's entries: each scope has its own LRU, bounded in
/// entries and in constraint bytes.
pub struct Guidance {
    factory: ParserFactory,
    cache: Mutex<std::collections::HashMap<Option<String>, ScopeCache>>,
    /// Constraints compiled (cache misses).
    compiled: std::sync::atomic::AtomicUsize,
    /// The end-of-sequence token the grammar allows once it is complete.
    eos: TokenId,
}

/// Compiled constraints one scope keeps at once.
pub const CACHED_PER_SCOPE: usize = 32;
/// Constraint text one scope's cache holds (each compiled matcher is bounded too: the parser's
/// lexer states are capped, see `Guidance::new`).
pub const CACHED_BYTES_PER_SCOPE: usize = 1 << 20;
/// The largest constraint (schema, regex, choices) compiled at all.
pub const MAX_CONSTRAINT_BYTES: usize = 64 << 10;

/// One scope's cached matchers, least recently used first out.
struct ScopeCache {
    lru: lru::LruCache<Constraint, Matcher>,
    bytes: usize,
}

impl ScopeCache {
    fn new() -> Self {
        Self {
            lru: lru::LruCache::new(NonZeroUsize::new(CACHED_PER_SCOPE).expect("non-zero")),
            bytes: 0,
        }
    }

    fn put(&mut self, c: Constraint, m: Matcher) {
        let size = c.text_len();
        if size > CACHED_BYTES_PER_SCOPE {
            return;
        }
        while self.bytes + size > CACHED_BYTES_PER_SCOPE || self.lru.len() == CACHED_PER_SCOPE {
            match self.lru.pop_lru() {
                Some((old, _)) => self.bytes -= old.text_len(),
                None => break,
            }
        }
        if let Some((old, _)) = self.lru.push(c, m) {
            self.bytes -= old.text_len();
        }
        self.bytes += size;
    }
}

impl Guidance {
    /// `eos`: the token that ends an answer (the chat template's end of turn).
    pub fn new(tokenizer: &Tokenizer, eos: u32) -> Result<Self, GuidedError> {
        let json: serde_json::Value = serde_json::from_str(
            &tokenizer
                .to_json()
                .map_err(|e| GuidedError::Tokenizer(e.to_string()))?,
        )
        .map_err(|e| GuidedError::Tokenizer(e.to_string()))?;
        let bytes = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| GuidedError::Tokenizer(e.to_string()))?;
        let info = TokRxInfo::new(bytes.len() as u32, eos);
        let env = Env {
            trie: TokTrie::from(&info, &bytes),
            tokenizer: tokenizer.clone(),
        };
        let mut factory = ParserFactory::new_simple(&(std::sync::Arc::new(env) as _))
            .map_err(|e| GuidedError::Tokenizer(e.to_string()))?;
        factory.quiet();
        // Compilation and each mask are bounded by the library's fuel; its lexer states (1–2 kB
        // each) are capped lower than its default 250,000, so one matcher stays under ~100 MB.
        let limits = factory.limits_mut();
        limits.max_lexer_states = 50_000;
        limits.initial_lexer_fuel = 1_000_000;
        limits.step_lexer_fuel = 200_000;
        Ok(Self {
            factory,
            cache: Mutex::default(),
            eos,
            compiled: Default::default(),
        })
    }

    /// A fresh matcher for `c` (compiled once per scope, then cloned from the cache).
    pub fn compile(&self, c: &Constraint) -> Result<Guide, GuidedError> {
        self.compile_for(None, c)
    }

    /// `compile` with a cache of `scope`'s own (the tenant's).
    pub fn compile_for(&self, scope: Option<&str>, c: &Constraint) -> Result<Guide, GuidedError> {
        let scope = scope.map(str::to_string);
        if let Some(m) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&scope)
            .and_then(|s| s.lru.get(c))
        {
            return Ok(Guide::new(m.clone(), self.eos));
        }
        self.compiled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let parser = self
            .factory
            .create_parser(c.grammar()?)
            .map_err(|e| GuidedError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GuidedError::Invalid(e));
        }
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(scope)
            .or_insert_with(ScopeCache::new)
            .put(c.clone(), matcher.clone());
        Ok(Guide::new(matcher, self.eos))
    }

    /// Constraints compiled so far (each a cache miss).
    pub fn compiled(&self) -> usize {
        self.compiled.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One sequence's matcher: masks its logits to the tokens the constraint allows next, and
/// follows the tokens sampled. After each token it computes the next mask on the compute pool
/// (`commit`), off the model thread, overlapping the next forward; `mask` collects it.
pub struct Guide {
    matcher: Option<Matcher>,
    eos: TokenId,
    /// The next mask, being computed: the matcher comes back with it. (In a mutex only so that
    /// a guide is `Sync`, as the requests holding one are shared across an await.)
    pending: Option<Mutex<std::sync::mpsc::Receiver<Computed>>>,
    /// Nanoseconds spent computing masks (for the benchmark).
    pub mask_nanos: Vec<u64>,
}

type Mask = (Result<llguidance::toktrie::SimpleVob, String>, u64);
/// A computed mask with its matcher back, or why there is none.
type Computed = Result<(Matcher, Mask), String>;

impl Clone for Guide {
    /// A copy in the same state (before it runs: a guide is cloned from the compiled one).
    fn clone(&self) -> Self {
        assert!(self.pending.is_none(), "a running guide is not cloned");
        Self {
            matcher: self.matcher.clone(),
            eos: self.eos,
            pending: None,
            mask_nanos: self.mask_nanos.clone(),
        }
    }
}

/// `f()`, or the message of its panic.
fn caught<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("the structured-output mask computation failed: {what}")
    })
}

/// Runs `f` on the compute pool; its result (or its panic, as an error) arrives on the receiver.
fn spawn_caught<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> std::sync::mpsc::Receiver<Result<T, String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    rayon::spawn(move || {
        let _ = tx.send(caught(f).and_then(|r| r));
    });
    rx
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guide")
    }
}

impl Guide {
    fn new(matcher: Matcher, eos: TokenId) -> Self {
        Self {
            matcher: Some(matcher),
            eos,
            pending: None,
            mask_nanos: Vec::new(),
        }
    }

    /// The next mask, with the matcher back; a panic inside the library fails this request
    /// (an error), never the process: on the compute pool an unwinding task would abort it.
    fn compute(mut m: Matcher) -> Result<(Matcher, Mask), String> {
        caught(move || {
            let start = std::time::Instant::now();
            let r = m.compute_mask_or_eos().map_err(|e| e.to_string());
            (m, (r, start.elapsed().as_nanos() as u64))
        })
    }

    /// Starts computing the next mask on the compute pool.
    fn prefetch(&mut self) {
        let Some(m) = self.matcher.take() else { return };
        self.pending = Some(Mutex::new(spawn_caught(move || Self::compute(m))));
    }

    /// The next mask: the one computed in the background, else now.
    fn next_mask(&mut self) -> Result<llguidance::toktrie::SimpleVob, String> {
        let (m, (mask, nanos)) = match self.pending.take() {
            Some(rx) => loop {
                let got = rx.lock().unwrap_or_else(|p| p.into_inner()).try_recv();
                match got {
                    Ok(done) => break done?,
                    Err(std::sync::mpsc::TryRecvError::Empty) => {
                        // On a pool thread, run pool work meanwhile (perhaps this very task):
                        // a pool thread never blocks on the pool.
                        if rayon::yield_now().is_none() {
                            std::thread::yield_now();
                        }
                    }
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        return Err("the mask computation was lost".into())
                    }
                }
            },
            None => Self::compute(self.matcher.take().ok_or("the matcher was lost")?)?,
        };
        self.matcher = Some(m);
        self.mask_nanos.push(nanos);
        mask
    }

    /// Sets every logit the constraint does not allow next to −∞. Where the constraint allows
    /// ending, every id of `stops` is allowed; once it is complete, only they are.
    pub fn mask(&mut self, logits: &mut [f32], stops: &[u32]) -> Result<(), String> {
        let allowed = self.next_mask()?;
        let may_end = allowed.is_allowed(self.eos);
        let saved: Vec<(u32, f32)> = if may_end {
            stops
                .iter()
                .filter_map(|&t| logits.get(t as usize).map(|&l| (t, l)))
                .collect()
        } else {
            Vec::new()
        };
        let n = allowed.len().min(logits.len());
        allowed.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        logits[n..].fill(f32::NEG_INFINITY);
        for (t, l) in saved {
            logits[t as usize] = l;
        }
        Ok(())
    }

    /// Follows a sampled token (not an end-of-sequence one), then starts on the next mask.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.matcher
            .as_mut()
            .ok_or("the matcher was lost")?
            .consume_token(token)
            .map_err(|e| e.to_string())?;
        if !self.is_stopped() {
            self.prefetch();
        }
        Ok(())
    }

    /// The constraint is complete and nothing may follow.
    pub fn is_stopped(&self) -> bool {
        self.matcher.as_ref().is_none_or(|m| m.is_stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_cache_stays_within_its_entries_and_bytes() {
        let tok = crate::tokenizer::Tokenizer::from_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tiny-llama/tokenizer.json"),
        )
        .unwrap();
        let g = Guidance::new(&tok, 2).unwrap();
        // One tenant's flood of distinct regexes leaves the other's entry cached.
        g.compile_for(Some("light"), &Constraint::Regex("(yes|no)".into()))
            .unwrap();
        for i in 0..3 * CACHED_PER_SCOPE {
            g.compile_for(Some("heavy"), &Constraint::Regex(format!("a{{{i}}}b")))
                .unwrap();
        }
        let before = g.compiled();
        g.compile_for(Some("light"), &Constraint::Regex("(yes|no)".into()))
            .unwrap();
        assert_eq!(
            g.compiled(),
            before,
            "the light tenant's constraint was evicted"
        );
        let cache = g.cache.lock().unwrap();
        let heavy = &cache[&Some("heavy".to_string())];
        assert!(heavy.lru.len() <= CACHED_PER_SCOPE && heavy.bytes <= CACHED_BYTES_PER_SCOPE);
        drop(cache);
        // Too large to compile at all: an error naming the bound.
        let big = Constraint::Regex("a".repeat(MAX_CONSTRAINT_BYTES + 1));
        let err = g
            .compile_for(Some("heavy"), &big)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn a_panicking_mask_task_is_an_error_not_an_abort() {
        let rx = super::spawn_caught::<u32>(|| panic!("inside the library"));
        let got = rx.recv().expect("the task answers");
        let err = got.expect_err("a panic is an error");
        assert!(err.contains("inside the library"), "{err}");
        let ok = super::spawn_caught(|| Ok(7u32)).recv().unwrap();
        assert_eq!(ok, Ok(7));
    }
}
