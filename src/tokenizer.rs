//! Tokenizer: a `tokenizers::Tokenizer` loaded from `tokenizer.json` or built from GGUF
//! metadata, and incremental UTF-8-safe detokenization. A leaf: imports nothing of the crate.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot build the tokenizer: {message}")]
    Build { path: PathBuf, message: String },
    #[error("{path}: `{field}` {problem}")]
    Field {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// The vocabulary section of a GGUF file (`tokenizer.ggml.*`).
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`, e.g. `gpt2`.
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `smollm`, `llama-bpe`.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
}

/// GGUF token types that are control or user-defined tokens: matched whole, never split.
const GGUF_CONTROL: i32 = 3;
const GGUF_USER_DEFINED: i32 = 4;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({} tokens)", self.vocab_size())
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Build {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self { inner })
    }

    /// Builds a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.model = gpt2`).
    pub fn from_gguf(path: &Path, vocab: &GgufVocab) -> Result<Self, TokenizerError> {
        let field = |field: &str, problem: String| TokenizerError::Field {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem,
        };
        if vocab.model != "gpt2" {
            return Err(field(
                "tokenizer.ggml.model",
                format!(
                    "is `{}`; only byte-level BPE (`gpt2`) is supported",
                    vocab.model
                ),
            ));
        }
        if vocab.tokens.is_empty() {
            return Err(field("tokenizer.ggml.tokens", "is missing or empty".into()));
        }
        if vocab.merges.is_empty() {
            return Err(field("tokenizer.ggml.merges", "is missing or empty".into()));
        }
        let vocab_map: serde_json::Map<String, Value> = vocab
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let added: Vec<Value> = vocab
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, &ty)| ty == GGUF_CONTROL || ty == GGUF_USER_DEFINED)
            .map(|(i, &ty)| {
                json!({"id": i, "content": vocab.tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": ty == GGUF_CONTROL})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": true, "use_regex": true});
        // SmolLM's own tokenizer splits digits one by one before the byte-level regex.
        let pre_tokenizer = match vocab.pre.as_deref() {
            Some("smollm") => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
            _ => byte_level.clone(),
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true,
                               "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true,
                        "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab_map, "merges": vocab.merges},
        });
        let inner: tokenizers::Tokenizer =
            spec.to_string()
                .parse()
                .map_err(|e: tokenizers::Error| TokenizerError::Build {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
        Ok(Self { inner })
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner
            .save(path, false)
            .map_err(|e| TokenizerError::Build {
                path: path.to_path_buf(),
                message: format!("cannot write: {e}"),
            })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; special tokens written in the text are recognised, none are added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Turns a stream of token ids into text pieces that are always whole UTF-8 characters.
///
/// Decoding ids one by one breaks multi-byte characters split across tokens; instead, decode a
/// short window and emit only what grew, holding back a trailing replacement character until the
/// bytes that complete it arrive.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the end of generation).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
