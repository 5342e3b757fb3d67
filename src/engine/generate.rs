//! The decode loop for one sequence: prefill, then one token per step until EOS, a stop string,
//! `max_tokens` or the context ends. Text is streamed through a callback as it becomes final.

use std::time::{Duration, Instant};

use crate::model::llama::SeqInput;
use crate::model::{AdapterWeights, BatchInput, Llama, LogitsRows};
use crate::tokenizer::{Tokenizer, TokenizerError};

use super::sampling::SamplingParams;
use super::sequence::SequenceState;

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
    /// Tokens that end the answer as EOS does (`stop_token_ids`), even with `ignore_eos`; their
    /// text is not part of the answer.
    pub stop_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// A constraint on the answer (structured outputs): its compiled matcher masks each step.
    pub guide: Option<crate::guided::Guide>,
    /// Prompt lookup (speculative decoding): the engine proposes tokens from the sequence's own
    /// prompt and answer and verifies them in one step (`engine::speculative`).
    pub speculative: Option<super::speculative::NgramSpec>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            eos_token_ids: Vec::new(),
            stop_token_ids: Vec::new(),
            sampling: SamplingParams::default(),
            guide: None,
            speculative: None,
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
    let context = model.config.max_position_embeddings;
    let mut seq = SequenceState::new(
        prompt.to_vec(),
        cfg.clone(),
        context,
        model.new_cache(),
        None,
    )?;
    let start = Instant::now();
    let mut prefill_time = Duration::ZERO;
    let finish = loop {
        let input = seq.next_input().to_vec();
        let mut batch = BatchInput {
            seqs: vec![SeqInput::new(&input, &mut seq.cache).with_adapter(adapter)],
            logits: LogitsRows::Last,
        };
        let logits = model.forward(&mut batch)?;
        if seq.generated.is_empty() {
            prefill_time = start.elapsed();
        }
        let out = seq.step(logits.squeeze(0)?.to_vec1()?, tokenizer)?;
        if !out.text.is_empty() {
            on_text(&out.text);
        }
        if let Some(f) = out.finished {
            break f;
        }
    };
    Ok(Generation {
        token_ids: seq.generated.clone(),
        text: seq.text().to_string(),
        finish_reason: finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: start.elapsed() - prefill_time,
    })
}
