//! The one error type of tq-llm: a one-line message naming the file, field,
//! tensor or argument, or an error of the crates below passed through.

use std::fmt::Display;

/// An error of tq-llm. `Display` is one line and names the problem; no
/// variant repeats its cause in a `source()`, so printing a chain never says
/// the same thing twice.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The GGUF's `general.architecture` is not one the forward pass runs.
    #[error("{path}: GGUF architecture '{arch}' is not supported (supported: {})", crate::llama::ARCHITECTURES.join(", "))]
    UnsupportedArchitecture {
        /// The GGUF file.
        path: String,
        /// Its `general.architecture`.
        arch: String,
    },
    /// The file ends before the tensor data its header describes.
    #[error("{path} is a truncated GGUF: {len} bytes, its tensors need {need}")]
    TruncatedGguf {
        /// The GGUF file.
        path: String,
        /// Its length in bytes.
        len: u64,
        /// The length its header implies.
        need: u64,
    },
    /// The GGUF's tokenizer (`tokenizer.ggml.model` / `.pre`) is not one we build.
    #[error("{path}: tokenizer {key} = '{value}' is not supported (supported: {supported})")]
    UnsupportedTokenizer {
        /// The GGUF file.
        path: String,
        /// The metadata key (`tokenizer.ggml.model` or `tokenizer.ggml.pre`).
        key: &'static str,
        /// Its value.
        value: String,
        /// The values we handle.
        supported: &'static str,
    },
    /// A required metadata key is missing or has the wrong type.
    #[error("{path}: GGUF metadata {key}: {problem}")]
    Metadata {
        /// The GGUF file.
        path: String,
        /// The key.
        key: String,
        /// Missing, or the wrong type.
        problem: String,
    },
    /// A problem with a file, an argument or the model's input, described in full.
    #[error("{0}")]
    Msg(String),
    /// A dataset or text could not be fetched or read.
    #[error(transparent)]
    Data(#[from] tq_data::DataError),
    /// A codec or KV cache rejected its parameters or input (its message
    /// once: transparent, so an error chain does not repeat it).
    #[error(transparent)]
    Kv(#[from] tq_core::TqError),
    /// A tensor operation failed.
    #[error("tensor operation")]
    Candle(#[from] candle_core::Error),
}

/// Result of tq-llm.
pub type Result<T> = std::result::Result<T, LlmError>;

/// `LlmError::Msg(format!(...))`.
macro_rules! err {
    ($($t:tt)*) => { $crate::error::LlmError::Msg(format!($($t)*)) };
}
/// `return Err(err!(...))`.
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::error::err!($($t)*)) };
}
pub(crate) use {bail, err};

/// Adds context to a failure: the result's error becomes `"{context}: {cause}"`
/// (one line).
pub trait Context<T> {
    /// Prefixes the error with `msg`.
    fn context(self, msg: impl Display) -> Result<T>;
    /// Prefixes the error with the message `f` builds (only on failure).
    fn with_context<M: Display>(self, f: impl FnOnce() -> M) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, msg: impl Display) -> Result<T> {
        self.map_err(|e| LlmError::Msg(format!("{msg}: {}", one_line(&e))))
    }
    fn with_context<M: Display>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.map_err(|e| LlmError::Msg(format!("{}: {}", f(), one_line(&e))))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, msg: impl Display) -> Result<T> {
        self.ok_or_else(|| LlmError::Msg(msg.to_string()))
    }
    fn with_context<M: Display>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.ok_or_else(|| LlmError::Msg(f().to_string()))
    }
}

/// The first line of an error's message (candle appends backtraces on
/// later lines when they are enabled).
fn one_line(e: &impl Display) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or("").trim_end().to_string()
}
