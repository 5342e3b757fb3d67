//! Speculative decoding without a draft model (prompt lookup, vLLM's `ngram` method, llama.cpp's
//! lookup decoding): the last few tokens of a sequence are looked up earlier in its own prompt
//! and answer, and the tokens that followed there are proposed as the next ones. The engine
//! feeds the sequence's last token and the proposal in one step, so one forward gives the
//! logits of every proposed position; each is then sampled in order exactly as a plain decode
//! step samples it (the same processing, the same one draw of the request's generator), and
//! the proposal is kept up to the first token that differs from the sampled one. The kernels
//! give a row the same numbers whatever its step holds, so answers are the same token for token
//! as without speculation: greedy ones, and sampled ones with the same seed. (For a proposal
//! that is one token, not a distribution, this keeps it with probability p(token), as the
//! rejection rule of speculative sampling does, without changing what the generator draws.)
//! The positions of the tokens not kept are taken back from the KV cache.
//!
//! Besides the sequence's own tokens, lookup searches the recent answers of the same tenant
//! with the same adapter (`History`, as llama.cpp's dynamic n-gram cache): answers of one task
//! share their structure (a JSON object's keys and punctuation) even where they copy nothing
//! from their prompt. One tenant's answers never propose tokens to another tenant's requests:
//! how fast an answer comes must not tell what someone else was answered.

use std::collections::{HashMap, VecDeque};

/// A request's prompt-lookup settings (`speculative: {"method": "ngram", ...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramSpec {
    /// Most tokens proposed per step (`num_tokens`).
    pub num_tokens: usize,
    /// Shortest and longest suffix looked up (`prompt_lookup_min` / `prompt_lookup_max`).
    pub min_ngram: usize,
    pub max_ngram: usize,
    /// Speculate only while a step holds at most this many decode rows
    /// (`--speculative-max-batch`): in a full step the proposed rows cost compute that the
    /// step's other rows would have had.
    pub max_batch: usize,
}

impl NgramSpec {
    /// Most tokens a request may ask to be proposed per step.
    pub const MAX_TOKENS: usize = 16;
    /// Longest suffix a request may ask to be looked up.
    pub const MAX_NGRAM: usize = 8;
}

/// Up to `limit` tokens proposed after `context` (a sequence's prompt, then its answer): the
/// longest suffix of `context` of `spec.min_ngram ..= spec.max_ngram` tokens that occurred
/// before, at its latest earlier occurrence, and the tokens that followed it there; a suffix
/// found in `context` wins over one as long in `past` (recent answers, `History::past`).
/// Empty where no suffix recurs.
pub fn propose(context: &[u32], past: &[u32], spec: &NgramSpec, limit: usize) -> Vec<u32> {
    let limit = limit.min(spec.num_tokens);
    if limit == 0 {
        return Vec::new();
    }
    let n_len = context.len();
    for n in (spec.min_ngram.max(1)..=spec.max_ngram).rev() {
        if n >= n_len {
            continue;
        }
        let suffix = &context[n_len - n..];
        // Latest earlier occurrence with at least one token after it (not the suffix itself).
        for source in [context, past] {
            if let Some(next) = after(source, suffix, limit) {
                return next.to_vec();
            }
        }
    }
    Vec::new()
}

/// The (at most `limit`) tokens after the latest occurrence of `suffix` in `source` that has
/// at least one token after it (not `SEPARATOR`); an occurrence at the very end (the suffix
/// itself, where `source` is the sequence) has none.
fn after<'s>(source: &'s [u32], suffix: &[u32], limit: usize) -> Option<&'s [u32]> {
    let n = suffix.len();
    if source.len() <= n {
        return None;
    }
    let start = (0..source.len() - n)
        .rev()
        .find(|&start| &source[start..start + n] == suffix && source[start + n] != SEPARATOR)?;
    let rest = &source[start + n..];
    let end = rest
        .iter()
        .take(limit)
        .position(|&t| t == SEPARATOR)
        .unwrap_or(limit.min(rest.len()));
    Some(&rest[..end])
}

/// Between answers in a `History` (no vocabulary has this id): no n-gram spans two answers.
pub const SEPARATOR: u32 = u32::MAX;

/// Recent answers per (tenant, adapter), the newest last, for prompt lookup; at most
/// `tokens_per_key` tokens per key and `keys` keys (the least recently used goes).
pub struct History {
    answers: HashMap<(String, usize), (u64, VecDeque<u32>)>,
    tokens_per_key: usize,
    keys: usize,
    clock: u64,
}

impl History {
    pub fn new(tokens_per_key: usize, keys: usize) -> Self {
        Self {
            answers: HashMap::new(),
            tokens_per_key,
            keys,
            clock: 0,
        }
    }

    /// Appends a finished answer of `tenant` with `adapter` (its weights' identity, 0: base).
    pub fn record(&mut self, tenant: &str, adapter: usize, answer: &[u32]) {
        if answer.is_empty() || self.tokens_per_key == 0 || self.keys == 0 {
            return;
        }
        self.clock += 1;
        let key = (tenant.to_string(), adapter);
        if !self.answers.contains_key(&key) && self.answers.len() >= self.keys {
            let oldest = self
                .answers
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.answers.remove(&k);
            }
        }
        let (used, tokens) = self.answers.entry(key).or_default();
        *used = self.clock;
        tokens.extend(answer.iter().copied());
        tokens.push_back(SEPARATOR);
        while tokens.len() > self.tokens_per_key {
            tokens.pop_front();
        }
        tokens.make_contiguous();
    }

    /// The recent answers of `tenant` with `adapter`, separated by `SEPARATOR` (empty: none).
    pub fn past(&self, tenant: &str, adapter: usize) -> &[u32] {
        // A lookup without allocating the key: keys are few, tenants' names short.
        self.answers
            .iter()
            .find(|((t, a), _)| *a == adapter && t == tenant)
            .map_or(&[], |(_, (_, tokens))| tokens.as_slices().0)
    }

    /// Tokens held in all.
    pub fn len(&self) -> usize {
        self.answers.values().map(|(_, t)| t.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(k: usize, min: usize, max: usize) -> NgramSpec {
        NgramSpec {
            num_tokens: k,
            min_ngram: min,
            max_ngram: max,
            max_batch: 8,
        }
    }

    #[test]
    fn the_longest_recurring_suffix_proposes_what_followed_it_last() {
        // "a b c d | x b c e | b c": suffix "b c" last occurred at 5 → proposes "e b c".
        let ctx = [1, 2, 3, 4, 9, 2, 3, 5, 2, 3];
        assert_eq!(propose(&ctx, &[], &spec(3, 1, 3), 8), vec![5, 2, 3]);
        // The 3-gram "1 2 3" recurs at 4 (then 9 1); with 1-grams only, "3" last occurred at 6.
        let ctx = [7, 2, 3, 8, 1, 2, 3, 9, 1, 2, 3];
        assert_eq!(propose(&ctx, &[], &spec(2, 1, 3), 8), vec![9, 1]);
        // The longer match wins over a later shorter one.
        let ctx = [1, 2, 3, 9, 5, 3, 7, 2, 3];
        assert_eq!(propose(&ctx, &[], &spec(2, 1, 3), 8), vec![9, 5]);
        assert_eq!(propose(&ctx, &[], &spec(2, 1, 1), 8), vec![7, 2]);
    }

    fn propose_own(ctx: &[u32], spec: &NgramSpec, limit: usize) -> Vec<u32> {
        propose(ctx, &[], spec, limit)
    }

    #[test]
    fn limits_and_missing_suffixes_give_short_or_empty_proposals() {
        let ctx = [1, 2, 3, 1, 2];
        assert_eq!(propose(&ctx, &[], &spec(4, 1, 2), 8), vec![3, 1, 2]);
        assert_eq!(propose(&ctx, &[], &spec(4, 1, 2), 1), vec![3]);
        assert_eq!(propose(&ctx, &[], &spec(4, 1, 2), 0), Vec::<u32>::new());
        assert!(propose_own(&[1, 2, 3, 4], &spec(4, 1, 3), 8).is_empty());
        // Only suffixes of at least `min_ngram` tokens count.
        assert!(propose_own(&[5, 1, 6, 1], &spec(4, 2, 3), 8).is_empty());
        assert_eq!(propose_own(&[5, 1, 6, 1], &spec(4, 1, 3), 8), vec![6, 1]);
        assert!(propose_own(&[], &spec(4, 1, 3), 8).is_empty());
        assert!(propose_own(&[3], &spec(4, 1, 3), 8).is_empty());
    }

    #[test]
    fn past_answers_propose_where_the_sequence_has_no_match_and_per_tenant_only() {
        let mut h = History::new(12, 2);
        h.record("a", 7, &[10, 11, 12, 13]);
        h.record("a", 7, &[10, 21, 22]);
        // "10" last occurred in the second answer; proposals stop at the answer's end.
        assert_eq!(
            propose(&[1, 10], h.past("a", 7), &spec(4, 1, 3), 8),
            vec![21, 22]
        );
        // A longer match in the past wins over a shorter one; "11 12" only in the first.
        assert_eq!(
            propose(&[1, 10, 11], h.past("a", 7), &spec(4, 1, 3), 8),
            vec![12, 13]
        );
        // The sequence's own tokens win at equal length.
        assert_eq!(
            propose(&[10, 5, 10], h.past("a", 7), &spec(4, 1, 3), 8),
            vec![5, 10]
        );
        // Another tenant, or another adapter, sees nothing of it.
        assert!(h.past("b", 7).is_empty() && h.past("a", 8).is_empty());
        assert!(propose(&[1, 10], h.past("b", 7), &spec(4, 1, 3), 8).is_empty());
        // Bounded per key (oldest tokens go) and in keys (least recently used goes).
        h.record("a", 7, &[30, 31, 32, 33, 34]);
        assert_eq!(h.past("a", 7).len(), 12);
        assert_eq!(h.past("a", 7)[0], 13, "{:?}", h.past("a", 7));
        h.record("b", 1, &[1]);
        h.record("c", 1, &[2]);
        assert!(
            h.past("a", 7).is_empty(),
            "the least recently used key went"
        );
        assert_eq!(h.past("c", 1), &[2, SEPARATOR]);
    }
}
