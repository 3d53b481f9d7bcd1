//! The crate's error type.

use thiserror::Error;

/// Errors reachable from user input. Messages are one line and name the problem.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TqError {
    /// No registered codec has this name.
    #[error("unknown codec '{name}' (known: {known})")]
    UnknownCodec {
        /// The name asked for.
        name: String,
        /// The registered names, comma-separated.
        known: String,
    },
    /// A bit width outside the range the codec supports.
    #[error("unsupported bit width {0}: TurboQuant codecs take 1..=8 bits per coordinate")]
    UnsupportedBits(u32),
    /// A dimension (first) below the codec's minimum (second).
    #[error("dimension {0} is not supported: need dim >= {1}")]
    BadDim(usize, usize),
    /// A vector (or buffer of vectors) of the wrong length.
    #[error("dimension mismatch: codec expects {expected} values per vector, got {got}")]
    DimMismatch {
        /// Values expected.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A code buffer of the wrong size.
    #[error("code buffer has {got} bytes, expected {expected}")]
    CodeSizeMismatch {
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// An input value that is NaN or infinite.
    #[error("non-finite input: value {value} at vector {vector}, coordinate {coord}")]
    NonFinite {
        /// Index of the vector in the batch.
        vector: usize,
        /// Coordinate within the vector.
        coord: usize,
        /// The offending value.
        value: f32,
    },
    /// Codec parameters (stored or given) that are invalid; the message says why.
    #[error("invalid codec parameters: {0}")]
    BadParams(String),
    /// A size above a documented limit of `crate::limits` (`hint`: what to do instead).
    #[error("{field} = {value} exceeds the limit of {limit}{hint}")]
    LimitExceeded {
        /// What was too large.
        field: &'static str,
        /// Its value.
        value: usize,
        /// The limit it exceeds.
        limit: usize,
        /// Advice appended to the message (may be empty).
        hint: String,
    },
    /// A finite vector the codec cannot represent (its code would decode to inf/NaN).
    #[error("vector {vector} cannot be encoded: {reason}")]
    Unencodable {
        /// Index of the vector in the batch.
        vector: usize,
        /// Why it cannot be represented.
        reason: String,
    },
    /// A codec that needs training (named) was used untrained.
    #[error("{0} must be trained before use (it learns codebooks from data)")]
    NotTrained(String),
}

/// Result with a [`TqError`].
pub type Result<T> = std::result::Result<T, TqError>;
