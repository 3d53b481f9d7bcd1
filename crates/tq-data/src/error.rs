//! The one error type of tq-data: a one-line message naming the file, field
//! or dataset, or a codec / index error passed through.

use std::fmt::Display;

/// An error of tq-data. `Display` is one line and names the problem; no
/// variant repeats its cause in a `source()`, so printing a chain never says
/// the same thing twice.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A problem with a file, a dataset or an argument, described in full.
    #[error("{0}")]
    Msg(String),
    /// A codec rejected its parameters or input.
    #[error(transparent)]
    Codec(#[from] tq_core::TqError),
    /// The index rejected its parameters or input.
    #[error(transparent)]
    Index(#[from] tq_index::IndexError),
}

/// Result of tq-data.
pub type Result<T> = std::result::Result<T, DataError>;

/// `DataError::Msg(format!(...))`.
macro_rules! err {
    ($($t:tt)*) => { $crate::error::DataError::Msg(format!($($t)*)) };
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
        self.map_err(|e| DataError::Msg(format!("{msg}: {e}")))
    }
    fn with_context<M: Display>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.map_err(|e| DataError::Msg(format!("{}: {e}", f())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, msg: impl Display) -> Result<T> {
        self.ok_or_else(|| DataError::Msg(msg.to_string()))
    }
    fn with_context<M: Display>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.ok_or_else(|| DataError::Msg(f().to_string()))
    }
}
