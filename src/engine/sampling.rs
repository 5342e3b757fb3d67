//! Token sampling: greedy, temperature, top-k, top-p, reproducible with a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: Option<u64>,
    /// OpenAI's: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// transformers' (1 = off): the logit of every token of the prompt or the output is
    /// divided by it where positive, multiplied where negative.
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids (OpenAI's `logit_bias`, −100..100).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Temperatures below `GREEDY_BELOW` are greedy: dividing by them only turns rounding noise
    /// into certainty (and `1e-38` used to overflow into NaN probabilities).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW || self.top_k == 1
    }
}

/// See `SamplingParams::is_greedy`.
pub const GREEDY_BELOW: f32 = 1e-5;

impl SamplingParams {
    /// Whether `process` changes anything.
    pub fn processes(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
    }

    /// Applies the penalties and biases to `logits` in place: `counts` holds how often each
    /// generated token occurred, `seen` every token of the prompt or the output (for the
    /// repetition penalty). The order is vLLM's: repetition, then frequency and presence, then
    /// the bias.
    pub fn process(
        &self,
        logits: &mut [f32],
        counts: &std::collections::HashMap<u32, u32>,
        seen: &std::collections::HashSet<u32>,
    ) {
        if self.repetition_penalty != 1.0 {
            for &t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / self.repetition_penalty
                    } else {
                        *l * self.repetition_penalty
                    };
                }
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            for (&t, &c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= self.frequency_penalty * c as f32 + self.presence_penalty;
                }
            }
        }
        for &(t, b) in &self.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest value; the first one on ties, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let Some((cand, probs)) = self.distribution(logits) else {
            return argmax(logits);
        };
        let r: f32 = self.rng.random();
        pick(&cand, &probs, r)
    }

    /// The candidates (most likely first) and their probabilities after temperature, top-k and
    /// top-p; `None` where no logit is finite.
    fn distribution(&self, logits: &[f32]) -> Option<(Vec<u32>, Vec<f32>)> {
        let t = self.params.temperature;
        // Scaled relative to the largest logit: (v − max) / t ≤ 0 never overflows.
        let top = logits
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, (v - top) / t))
            .collect();
        if cand.is_empty() {
            return None;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, v)| (v - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        cand.truncate(probs.len());
        Some((cand.into_iter().map(|(t, _)| t).collect(), probs))
    }
}

/// The token whose cumulative probability first exceeds `r` (the last one on rounding).
fn pick(cand: &[u32], probs: &[f32], r: f32) -> u32 {
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if r < acc {
            return cand[i];
        }
    }
    cand[probs.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_temperatures_are_greedy_and_huge_logits_do_not_overflow() {
        let logits = [0.1, 30.0, 29.0, -5.0];
        for t in [1e-38f32, 1e-20, 1e-6] {
            let mut s = Sampler::new(SamplingParams {
                temperature: t,
                seed: Some(3),
                ..SamplingParams::default()
            });
            for _ in 0..50 {
                assert_eq!(s.sample(&logits), 1, "temperature {t}");
            }
        }
        // Above the greedy cut, logits whose quotient by t would overflow f32.
        let big = [1e35f32, 3e35, 2e35];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1e-4,
            seed: Some(3),
            ..SamplingParams::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&big), 1);
        }
    }

    #[test]
    fn penalties_and_biases_follow_their_definitions() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 2.0,
            logit_bias: vec![(3, -100.0), (0, 1.5)],
            ..SamplingParams::greedy()
        };
        let mut logits = vec![1.0, 4.0, -2.0, 9.0, 0.5];
        let counts = [(1u32, 3u32), (2, 1)].into_iter().collect();
        let seen = [1u32, 2, 4].into_iter().collect();
        p.process(&mut logits, &counts, &seen);
        // 0: bias only; 1: 4 / 2 − (3 · 0.25 + 0.5); 2: −2 · 2 − (0.25 + 0.5); 3: bias −100;
        // 4: 0.5 / 2 (in the prompt, never generated).
        assert_eq!(logits, vec![2.5, 0.75, -4.75, -91.0, 0.25]);
        assert!(!SamplingParams::greedy().processes());
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varies() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..40).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        let distinct: std::collections::HashSet<_> = draw(&params).into_iter().collect();
        assert!(
            distinct.len() > 5,
            "temperature 1 should spread: {distinct:?}"
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.0, 1.0, 0.5, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 2.0,
            top_k: 2,
            seed: Some(1),
            ..SamplingParams::default()
        });
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
        // p(0) ≈ 0.72 at temperature 1, so top_p 0.5 keeps token 0 alone.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            ..SamplingParams::default()
        });
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
    }
}
