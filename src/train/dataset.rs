//! Training data: JSONL lines of chat messages, prompt/completion pairs, or Alpaca
//! instructions, turned into token ids with a loss mask (only completion / assistant tokens
//! count), EOS appended to the target, truncated to the maximum length.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use super::error::TrainError;
use crate::chat::{ChatMessage, ChatTemplate, SpecialTokens};
use crate::tokenizer::Tokenizer;

/// How instruction rows are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Chat rows with the chat template, prompt/completion as raw text, Alpaca rows as a chat.
    Auto,
    /// Alpaca rows with `chat_templates/alpaca.jinja`.
    Alpaca,
    /// Every row as a chat with the chat template.
    Chat,
}

/// One training sequence: `labels[t]` is the token to predict after position `t`, or `None`
/// where the loss is masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<Option<u32>>,
}

impl Example {
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().filter(|l| l.is_some()).count()
    }
}

/// What tokenizing needs.
pub struct Tokenization<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub special: &'a SpecialTokens,
    pub eos: u32,
    pub max_seq_len: usize,
    pub format: Format,
}

/// Bounds on reading a data file (`Dataset::load_with`).
#[derive(Debug, Default)]
pub struct LoadLimits<'a> {
    /// Set to stop reading (a cancelled job).
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
    /// Messages one line may hold.
    pub max_messages: Option<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Lines skipped (bad lines with `--skip-bad-lines`, or nothing left after truncation).
    pub skipped: usize,
}

fn field<'v>(v: &'v Value, name: &str) -> Result<&'v str, String> {
    v.get(name)
        .ok_or_else(|| format!("missing field `{name}`"))?
        .as_str()
        .ok_or_else(|| format!("`{name}` must be a string"))
}

/// Tokens of `text` (each segment is tokenized alone, as `to_example` does).
fn count(t: &Tokenization<'_>, text: &str) -> Result<usize, String> {
    Ok(t.tokenizer.encode(text).map_err(|e| e.to_string())?.len())
}

/// Segments of a conversation, each `(text, is_target)`, found by rendering growing prefixes
/// (up to the maximum length).
fn chat_segments(
    messages: &[ChatMessage],
    t: &Tokenization<'_>,
) -> Result<Vec<(String, bool)>, String> {
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("the conversation has no assistant turn".into());
    }
    let render = |msgs: &[ChatMessage], gen: bool| {
        t.template
            .render(msgs, gen, t.special)
            .map_err(|e| e.to_string())
    };
    let mut segments = Vec::new();
    let mut done = String::new();
    // Rendering prefix k costs O(k): the whole is quadratic in messages, so stop once the
    // segments hold `max_seq_len` tokens (everything after is truncated away anyway).
    let mut tokens = 0usize;
    for k in 0..messages.len() {
        if tokens >= t.max_seq_len {
            break;
        }
        let full = render(&messages[..=k], false)?;
        if messages[k].role == "assistant" {
            let prompt = render(&messages[..k], true)?;
            let (Some(head), Some(answer)) = (
                prompt.strip_prefix(done.as_str()),
                full.strip_prefix(prompt.as_str()),
            ) else {
                return Err("the chat template does not render conversations incrementally".into());
            };
            tokens += count(t, head)? + count(t, answer)?;
            segments.push((head.to_string(), false));
            segments.push((answer.to_string(), true));
        } else {
            let Some(head) = full.strip_prefix(done.as_str()) else {
                return Err("the chat template does not render conversations incrementally".into());
            };
            tokens += count(t, head)?;
            segments.push((head.to_string(), false));
        }
        done = full;
    }
    Ok(segments)
}

fn to_example(
    segments: Vec<(String, bool)>,
    append_eos: bool,
    t: &Tokenization<'_>,
) -> Result<Option<Example>, String> {
    let mut ids = Vec::new();
    let mut target = Vec::new();
    for (text, is_target) in segments {
        let seg = t.tokenizer.encode(&text).map_err(|e| e.to_string())?;
        target.extend(std::iter::repeat_n(is_target, seg.len()));
        ids.extend(seg);
    }
    if append_eos {
        ids.push(t.eos);
        target.push(true);
    }
    ids.truncate(t.max_seq_len);
    target.truncate(t.max_seq_len);
    let labels: Vec<Option<u32>> = (0..ids.len().saturating_sub(1))
        .map(|i| target[i + 1].then_some(ids[i + 1]))
        .collect();
    ids.pop();
    let ex = Example { ids, labels };
    Ok((ex.target_tokens() > 0).then_some(ex))
}

/// Whether one record has the shape of a training example (`messages` with an assistant turn,
/// `prompt`/`completion`, or `instruction`/`output`), without tokenizing it: what an upload is
/// checked against before any model reads it. The message names the field.
pub fn check_record(v: &Value, max_messages: Option<usize>) -> Result<(), String> {
    if !v.is_object() {
        return Err("is not a JSON object".into());
    }
    if let Some(msgs) = v.get("messages") {
        check_messages(msgs, max_messages)?;
        let messages: Vec<ChatMessage> =
            serde_json::from_value(msgs.clone()).map_err(|e| format!("`messages`: {e}"))?;
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err("`messages` has no assistant turn to learn".into());
        }
        return Ok(());
    }
    if v.get("prompt").is_some() || v.get("completion").is_some() {
        return field(v, "prompt").and(field(v, "completion")).map(|_| ());
    }
    if v.get("instruction").is_some() || v.get("output").is_some() {
        field(v, "instruction")?;
        field(v, "output")?;
        return match v.get("input") {
            None | Some(Value::String(_)) | Some(Value::Null) => Ok(()),
            Some(_) => Err("`input` must be a string".into()),
        };
    }
    Err("expected `messages`, `prompt`/`completion`, or `instruction`/`output`".into())
}

/// `messages` holds at most `max` entries (checked before any is parsed).
fn check_messages(msgs: &Value, max: Option<usize>) -> Result<(), String> {
    match (msgs.as_array(), max) {
        (Some(list), Some(max)) if list.len() > max => Err(format!(
            "`messages` holds {} messages; at most {max} are allowed per line (`--train-max-messages`)",
            list.len()
        )),
        _ => Ok(()),
    }
}

fn parse_line(
    v: &Value,
    t: &Tokenization<'_>,
    max_messages: Option<usize>,
) -> Result<Option<Example>, String> {
    if let Some(msgs) = v.get("messages") {
        check_messages(msgs, max_messages)?;
        let messages: Vec<ChatMessage> =
            serde_json::from_value(msgs.clone()).map_err(|e| format!("`messages`: {e}"))?;
        return to_example(chat_segments(&messages, t)?, false, t);
    }
    if v.get("prompt").is_some() || v.get("completion").is_some() {
        let (p, c) = (field(v, "prompt")?, field(v, "completion")?);
        return to_example(vec![(p.to_string(), false), (c.to_string(), true)], true, t);
    }
    if v.get("instruction").is_some() || v.get("output").is_some() {
        let instruction = field(v, "instruction")?;
        let output = field(v, "output")?;
        let input = v
            .get("input")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        return match t.format {
            Format::Alpaca => {
                let alpaca =
                    ChatTemplate::select(Some("alpaca"), None).map_err(|e| e.to_string())?;
                let mut msgs = vec![ChatMessage::new("user", instruction)];
                if let Some(i) = input {
                    msgs.push(ChatMessage::new("input", i));
                }
                let prompt = alpaca
                    .render(&msgs, true, t.special)
                    .map_err(|e| e.to_string())?;
                to_example(vec![(prompt, false), (output.to_string(), true)], true, t)
            }
            Format::Auto | Format::Chat => {
                let user = match input {
                    Some(i) => format!("{instruction}\n\n{i}"),
                    None => instruction.to_string(),
                };
                let msgs = [
                    ChatMessage::new("user", &user),
                    ChatMessage::new("assistant", output),
                ];
                to_example(chat_segments(&msgs, t)?, false, t)
            }
        };
    }
    Err("expected `messages`, `prompt`/`completion`, or `instruction`/`output`".into())
}

impl Dataset {
    /// Reads a JSONL file. A bad line is an error naming its number, unless `skip_bad_lines`.
    pub fn load(
        path: &Path,
        t: &Tokenization<'_>,
        skip_bad_lines: bool,
    ) -> Result<Self, TrainError> {
        Self::load_with(path, t, skip_bad_lines, &LoadLimits::default())
    }

    /// `load` within `limits`: stops with an error when `limits.stop` is set (checked before
    /// every line), and refuses lines with more than `limits.max_messages` messages.
    pub fn load_with(
        path: &Path,
        t: &Tokenization<'_>,
        skip_bad_lines: bool,
        limits: &LoadLimits<'_>,
    ) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::Data {
            path: path.to_path_buf(),
            message: format!("cannot read: {e}"),
        })?;
        let mut ds = Dataset::default();
        let mut lines = 0;
        for (i, line) in text.lines().enumerate() {
            if limits
                .stop
                .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
            {
                return Err(TrainError::Data {
                    path: path.to_path_buf(),
                    message: "reading stopped: the job was cancelled".into(),
                });
            }
            if line.trim().is_empty() {
                continue;
            }
            lines += 1;
            let parsed = serde_json::from_str::<Value>(line)
                .map_err(|e| format!("not JSON: {e}"))
                .and_then(|v| {
                    if v.is_object() {
                        Ok(v)
                    } else {
                        Err("not a JSON object".into())
                    }
                })
                .and_then(|v| parse_line(&v, t, limits.max_messages));
            match parsed {
                Ok(Some(ex)) => ds.examples.push(ex),
                Ok(None) => ds.skipped += 1,
                Err(message) if skip_bad_lines => {
                    tracing::warn!("{}:{}: skipped: {message}", path.display(), i + 1);
                    ds.skipped += 1;
                }
                Err(message) => {
                    return Err(TrainError::Line {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message,
                    })
                }
            }
        }
        if lines == 0 {
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                message: "holds no examples".into(),
            });
        }
        if ds.examples.is_empty() {
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                message: format!(
                    "no usable example: all {lines} are bad or have no target tokens within --max-seq-len {}",
                    t.max_seq_len
                ),
            });
        }
        Ok(ds)
    }

    /// Splits off a seeded random `fraction` as the evaluation set.
    pub fn split(mut self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let n_eval = ((self.examples.len() as f64) * fraction).round() as usize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED);
        self.examples.shuffle(&mut rng);
        let eval = self
            .examples
            .split_off(self.examples.len() - n_eval.min(self.examples.len().saturating_sub(1)));
        (
            self,
            Dataset {
                examples: eval,
                skipped: 0,
            },
        )
    }

    /// The order of examples in `epoch` (seeded, so a resumed run sees the same order).
    pub fn order(&self, epoch: usize, seed: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.examples.len()).collect();
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(epoch as u64 * 0x9E37_79B9));
        idx.shuffle(&mut rng);
        idx
    }
}
