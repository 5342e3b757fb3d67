//! One sequence's generation state: what to feed next, and what one step's logits turn into
//! (sampled token, final text piece, log-probabilities, whether it finished). Shared by the
//! single-sequence loop of `serve generate` and the batching engine.

use crate::model::KvCache;
use crate::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};

use super::generate::{FinishReason, GenerateError, GenerationConfig};
use super::sampling::Sampler;
use super::stop::StopMatcher;

/// Log-probability of a chosen token and, if asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What one step produced.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub token: u32,
    /// Text that became final with this token (may be empty).
    pub text: String,
    /// Log-probabilities of the tokens whose text is released with this step (a token's text
    /// may be held back while it could begin a stop string; tokens a stop string cuts off
    /// entirely never get theirs reported).
    pub logprobs: Vec<TokenLogprob>,
    pub finished: Option<FinishReason>,
}

pub struct SequenceState {
    pub prompt_len: usize,
    pub cache: KvCache,
    pub generated: Vec<u32>,
    next_input: Vec<u32>,
    cfg: GenerationConfig,
    max_tokens: usize,
    sampler: Sampler,
    /// How often each token was generated (penalties; kept only when they are on).
    counts: std::collections::HashMap<u32, u32>,
    /// Tokens of the prompt and the output (the repetition penalty; only when it is on).
    seen: std::collections::HashSet<u32>,
    /// The constraint's matcher (structured outputs).
    guide: Option<crate::guided::Guide>,
    stops: StopMatcher,
    decoder: IncrementalDecoder,
    text: String,
    emitted: usize,
    /// `Some(k)`: report log-probabilities with `k` alternatives.
    logprobs: Option<usize>,
    /// Log-probabilities not yet released, with the byte range of their token's text.
    held: std::collections::VecDeque<(usize, usize, TokenLogprob)>,
    pub finished: Option<FinishReason>,
}

/// `log_softmax(logits)[id]` and the `k` most likely `(id, logprob)`.
pub fn logprobs_of(logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| {
            logits[*b as usize].total_cmp(&logits[*a as usize])
        });
        idx.truncate(k);
        idx.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        top = idx
            .into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect();
    }
    TokenLogprob {
        id,
        logprob: logits
            .get(id as usize)
            .map(|l| l - lse)
            .unwrap_or(f32::NEG_INFINITY),
        top,
    }
}

impl SequenceState {
    pub fn new(
        prompt: Vec<u32>,
        cfg: GenerationConfig,
        context: usize,
        cache: KvCache,
        logprobs: Option<usize>,
    ) -> Result<Self, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if cfg.max_tokens == 0 {
            return Err(GenerateError::ZeroMaxTokens);
        }
        if prompt.len() >= context {
            return Err(GenerateError::PromptTooLong {
                prompt: prompt.len(),
                context,
            });
        }
        let mut cfg = cfg;
        let guide = cfg.guide.take();
        Ok(Self {
            guide,
            prompt_len: prompt.len(),
            cache,
            generated: Vec::new(),
            max_tokens: cfg.max_tokens.min(context - prompt.len()),
            sampler: Sampler::new(cfg.sampling.clone()),
            counts: Default::default(),
            seen: if cfg.sampling.repetition_penalty != 1.0 {
                prompt.iter().copied().collect()
            } else {
                Default::default()
            },
            stops: StopMatcher::new(&cfg.stop),
            decoder: IncrementalDecoder::new(),
            text: String::new(),
            emitted: 0,
            next_input: prompt,
            cfg,
            logprobs,
            held: Default::default(),
            finished: None,
        })
    }

    /// Tokens for the next forward: the (rest of the) prompt first, then the last sampled token.
    pub fn next_input(&self) -> &[u32] {
        &self.next_input
    }

    /// The position the next input starts at (the sequence's own tokens already fed).
    pub fn position(&self) -> usize {
        (self.prompt_len + self.generated.len()).saturating_sub(self.next_input.len())
    }

    /// Whether tokens remain to be fed before the next sample: the prompt, or after a
    /// `restart` the prompt and the answer so far (a decode step has one input token).
    pub fn prefilling(&self) -> bool {
        !self.next_input.is_empty() && (self.generated.is_empty() || self.next_input.len() > 1)
    }

    /// After preemption (its KV was given back): starts `prompt`'s sequence again from `cache`, which holds the
    /// first `cached` of its own tokens (prompt, then answer); the rest is fed again before the
    /// next token is sampled. Sampling state, stop matching and text so far are kept.
    pub fn restart(&mut self, prompt: &[u32], cache: KvCache, cached: usize) {
        let all: Vec<u32> = prompt.iter().chain(&self.generated).copied().collect();
        let cached = cached.min(all.len().saturating_sub(1));
        self.cache = cache;
        self.next_input = all[cached..].to_vec();
    }

    /// Records that the first `n` tokens of `next_input` went through the model without
    /// sampling (a chunk of a long prompt); the rest follow in later steps.
    pub fn fed(&mut self, n: usize) {
        self.next_input.drain(..n.min(self.next_input.len()));
    }

    /// Positions this sequence will occupy at most (for KV budgeting).
    pub fn max_total_tokens(&self) -> usize {
        self.prompt_len + self.max_tokens
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Tokens it may still generate.
    pub fn remaining(&self) -> usize {
        self.max_tokens.saturating_sub(self.generated.len())
    }

    /// Its prompt-lookup settings, if it speculates.
    pub fn speculative(&self) -> Option<&super::speculative::NgramSpec> {
        self.cfg.speculative.as_ref()
    }

    /// Turns this step's last-position logits into a token and its text.
    pub fn step(
        &mut self,
        mut logits: Vec<f32>,
        tokenizer: &Tokenizer,
    ) -> Result<StepOutput, TokenizerError> {
        let early = self.generated.len() < self.cfg.min_tokens;
        if early || self.cfg.ignore_eos {
            for &e in &self.cfg.eos_token_ids {
                if let Some(l) = logits.get_mut(e as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let params = &self.cfg.sampling;
        if params.processes() {
            params.process(&mut logits, &self.counts, &self.seen);
        }
        // A constraint: only the tokens it allows next (its end: the stop tokens). Once it is
        // complete and no stop token may be sampled (`ignore_eos`), the answer ends here.
        let mut forced_end = false;
        if let Some(g) = &mut self.guide {
            let stops: Vec<u32> = self
                .cfg
                .eos_token_ids
                .iter()
                .chain(&self.cfg.stop_token_ids)
                .copied()
                .collect();
            match g.mask(&mut logits, &stops) {
                Ok(()) => forced_end = g.is_stopped() || !logits.iter().any(|l| l.is_finite()),
                Err(e) => {
                    tracing::warn!(
                        "structured output: the matcher failed ({e}); ending the answer"
                    );
                    forced_end = true;
                }
            }
        }
        let token = match (forced_end, self.cfg.eos_token_ids.first()) {
            (true, Some(&eos)) => eos,
            _ => self.sampler.sample(&logits),
        };
        let ends =
            self.cfg.eos_token_ids.contains(&token) || self.cfg.stop_token_ids.contains(&token);
        if let (Some(g), false) = (&mut self.guide, ends || forced_end) {
            if let Err(e) = g.commit(token) {
                tracing::warn!("structured output: token {token} refused ({e}); ending the answer");
                forced_end = true;
            }
        }
        let logprob = self.logprobs.map(|k| logprobs_of(&logits, token, k));
        self.generated.push(token);
        if params.processes() {
            *self.counts.entry(token).or_default() += 1;
            if params.repetition_penalty != 1.0 {
                self.seen.insert(token);
            }
        }
        self.next_input = vec![token];
        let mut out = StepOutput {
            token,
            text: String::new(),
            logprobs: Vec::new(),
            finished: None,
        };
        let before = self.text.len();
        let (mut eos, mut cut) = (false, false);
        let stop_token = !early && self.cfg.stop_token_ids.contains(&token);
        if (!self.cfg.ignore_eos && self.cfg.eos_token_ids.contains(&token))
            || stop_token
            || forced_end
        {
            out.finished = Some(FinishReason::Stop);
            eos = true;
        } else {
            self.text.push_str(&self.decoder.push(tokenizer, token)?);
            if !early {
                if let Some(at) = self.stops.find(&self.text, before) {
                    self.text.truncate(at);
                    cut = true;
                    out.finished = Some(FinishReason::Stop);
                }
            }
            if out.finished.is_none() && self.generated.len() >= self.max_tokens {
                self.text.push_str(&self.decoder.flush(tokenizer)?);
                out.finished = Some(FinishReason::Length);
            }
        }
        let safe = if out.finished.is_some() || early {
            self.text.len()
        } else {
            self.stops.safe_len(&self.text)
        };
        if safe > self.emitted {
            out.text = self.text[self.emitted..safe].to_string();
            self.emitted = safe;
        }
        if let Some(lp) = logprob {
            self.held
                .push_back((before, self.text.len().max(before), lp));
        }
        // Released: tokens whose text is out in full; at the end, every token with any text
        // before the cut (and the end-of-sequence token).
        let end = self.text.len();
        while let Some(&(start, stop, _)) = self.held.front() {
            let release = match out.finished {
                None => stop <= safe,
                Some(_) => eos || !cut || start < end,
            };
            if !release {
                break;
            }
            out.logprobs.push(self.held.pop_front().expect("front").2);
        }
        if out.finished.is_some() {
            self.held.clear();
        }
        self.finished = out.finished;
        Ok(out)
    }
}
