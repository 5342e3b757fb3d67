//! The decode loop for one sequence: prefill, then one token per step until EOS, a stop string,
//! `max_tokens` or the context ends. Text is streamed through a callback as it becomes final.

use std::time::{Duration, Instant};

use crate::model::llama::SeqInput;
use crate::model::{AdapterWeights, BatchInput, Llama, LogitsRows};
use crate::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};

use super::sampling::{Sampler, SamplingParams};
use super::stop::StopMatcher;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("`prompt` is empty")]
    EmptyPrompt,
    #[error("`prompt` has {prompt} tokens; the context holds {context}")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("`max_tokens` must be at least 1")]
    ZeroMaxTokens,
    #[error(transparent)]
    Model(#[from] candle_core::Error),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_tokens: usize,
    /// EOS and stop strings are ignored until this many tokens are generated.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub eos_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            eos_token_ids: Vec::new(),
            sampling: SamplingParams::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS token or stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, including a final EOS if one ended generation.
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Generation {
    /// Generated tokens per second over the whole request (prefill included).
    pub fn tokens_per_second(&self) -> f64 {
        let secs = (self.prefill_time + self.decode_time).as_secs_f64();
        if secs > 0.0 {
            self.token_ids.len() as f64 / secs
        } else {
            0.0
        }
    }
}

/// Generates from `prompt` (with `adapter` applied unmerged, if any), calling `on_text` with
/// each piece of final text.
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    adapter: Option<&AdapterWeights>,
    cfg: &GenerationConfig,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if cfg.max_tokens == 0 {
        return Err(GenerateError::ZeroMaxTokens);
    }
    let context = model.config.max_position_embeddings;
    if prompt.len() >= context {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            context,
        });
    }
    let max_tokens = cfg.max_tokens.min(context - prompt.len());
    let mut sampler = Sampler::new(cfg.sampling.clone());
    let stops = StopMatcher::new(&cfg.stop);
    let mut decoder = IncrementalDecoder::new();
    let mut cache = model.new_cache();
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut emitted = 0;
    let mut finish = FinishReason::Length;
    let start = Instant::now();
    let mut prefill_time = Duration::ZERO;
    let mut next_input: Vec<u32> = prompt.to_vec();
    while ids.len() < max_tokens {
        let logits = model.forward(&mut BatchInput {
            seqs: vec![SeqInput::new(&next_input, &mut cache).with_adapter(adapter)],
            logits: LogitsRows::Last,
        })?;
        if ids.is_empty() {
            prefill_time = start.elapsed();
        }
        let mut logits: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let early = ids.len() < cfg.min_tokens;
        if early || cfg.ignore_eos {
            for &e in &cfg.eos_token_ids {
                if let Some(l) = logits.get_mut(e as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let token = sampler.sample(&logits);
        ids.push(token);
        if !cfg.ignore_eos && cfg.eos_token_ids.contains(&token) {
            finish = FinishReason::Stop;
            break;
        }
        let before = text.len();
        text.push_str(&decoder.push(tokenizer, token)?);
        if !early {
            if let Some(at) = stops.find(&text, before) {
                text.truncate(at);
                finish = FinishReason::Stop;
                break;
            }
        }
        let safe = if early {
            text.len()
        } else {
            stops.safe_len(&text)
        };
        if safe > emitted {
            on_text(&text[emitted..safe]);
            emitted = safe;
        }
        next_input = vec![token];
    }
    if finish == FinishReason::Length {
        text.push_str(&decoder.flush(tokenizer)?);
    }
    if text.len() > emitted {
        on_text(&text[emitted..]);
    }
    Ok(Generation {
        token_ids: ids,
        text,
        finish_reason: finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: start.elapsed() - prefill_time,
    })
}
