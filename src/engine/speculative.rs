//! Speculative decoding without a draft model (prompt lookup, vLLM's `ngram` method, llama.cpp's
//! lookup decoding): the last few tokens of a sequence are looked up earlier in its own prompt
//! and answer, and the tokens that followed there are proposed as the next ones. The engine
//! feeds the sequence's last token and the proposal in one step, so one forward gives the
//! logits of every proposed position; each is then sampled in order exactly as a plain decode
//! step would sample it (`Sampler::sample_drafted`), and the proposal is kept up to the first
//! token the sampler did not take. Greedy answers are the same token for token (the kernels
//! give a row the same numbers whatever its step holds); sampled answers keep their
//! distribution. The positions of the tokens not kept are taken back from the KV cache.

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
/// before, at its latest earlier occurrence, and the tokens that followed it there. Empty
/// where no suffix recurs.
pub fn propose(context: &[u32], spec: &NgramSpec, limit: usize) -> Vec<u32> {
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
        let found = (0..n_len - n)
            .rev()
            .find(|&start| &context[start..start + n] == suffix);
        if let Some(start) = found {
            let from = start + n;
            let to = (from + limit).min(n_len);
            return context[from..to].to_vec();
        }
    }
    Vec::new()
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
        assert_eq!(propose(&ctx, &spec(3, 1, 3), 8), vec![5, 2, 3]);
        // The 3-gram "1 2 3" recurs at 4 (then 9 1); with 1-grams only, "3" last occurred at 6.
        let ctx = [7, 2, 3, 8, 1, 2, 3, 9, 1, 2, 3];
        assert_eq!(propose(&ctx, &spec(2, 1, 3), 8), vec![9, 1]);
        // The longer match wins over a later shorter one.
        let ctx = [1, 2, 3, 9, 5, 3, 7, 2, 3];
        assert_eq!(propose(&ctx, &spec(2, 1, 3), 8), vec![9, 5]);
        assert_eq!(propose(&ctx, &spec(2, 1, 1), 8), vec![7, 2]);
    }

    #[test]
    fn limits_and_missing_suffixes_give_short_or_empty_proposals() {
        let ctx = [1, 2, 3, 1, 2];
        assert_eq!(propose(&ctx, &spec(4, 1, 2), 8), vec![3, 1, 2]);
        assert_eq!(propose(&ctx, &spec(4, 1, 2), 1), vec![3]);
        assert_eq!(propose(&ctx, &spec(4, 1, 2), 0), Vec::<u32>::new());
        assert!(propose(&[1, 2, 3, 4], &spec(4, 1, 3), 8).is_empty());
        // Only suffixes of at least `min_ngram` tokens count.
        assert!(propose(&[5, 1, 6, 1], &spec(4, 2, 3), 8).is_empty());
        assert_eq!(propose(&[5, 1, 6, 1], &spec(4, 1, 3), 8), vec![6, 1]);
        assert!(propose(&[], &spec(4, 1, 3), 8).is_empty());
        assert!(propose(&[3], &spec(4, 1, 3), 8).is_empty());
    }
}
