use thiserror::Error;

/// Errors reachable from user input. Messages are one line and name the problem.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TqError {
    #[error("unknown codec '{name}' (known: {known})")]
    UnknownCodec { name: String, known: String },
    #[error("unsupported bit width {0}: TurboQuant codecs take 1..=8 bits per coordinate")]
    UnsupportedBits(u32),
    #[error("dimension {0} is not supported: need dim >= {1}")]
    BadDim(usize, usize),
    #[error("dimension mismatch: codec expects {expected} values per vector, got {got}")]
    DimMismatch { expected: usize, got: usize },
    #[error("code buffer has {got} bytes, expected {expected}")]
    CodeSizeMismatch { expected: usize, got: usize },
    #[error("non-finite input: value {value} at vector {vector}, coordinate {coord}")]
    NonFinite { vector: usize, coord: usize, value: f32 },
    #[error("invalid codec parameters: {0}")]
    BadParams(String),
    /// A size above a documented limit of `crate::limits` (`hint`: what to do instead).
    #[error("{field} = {value} exceeds the limit of {limit}{hint}")]
    LimitExceeded { field: &'static str, value: usize, limit: usize, hint: String },
    /// A finite vector the codec cannot represent (its code would decode to inf/NaN).
    #[error("vector {vector} cannot be encoded: {reason}")]
    Unencodable { vector: usize, reason: String },
    #[error("{0} must be trained before use (it learns codebooks from data)")]
    NotTrained(String),
}

pub type Result<T> = std::result::Result<T, TqError>;
