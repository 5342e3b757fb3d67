//! Errors of compiling a constraint.

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GuidedError {
    /// The constraint does not compile (a bad schema, an unsupported feature, a bad regex):
    /// the library's message.
    #[error("{0}")]
    Invalid(String),
    /// The tokenizer's vocabulary could not be read for the matcher.
    #[error("structured outputs are unavailable for this tokenizer: {0}")]
    Tokenizer(String),
}
