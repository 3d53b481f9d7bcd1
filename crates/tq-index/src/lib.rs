//! Vector search over TurboQuant (or any registered) codes.
//!
//! - [`FlatIndex`]: every code in one store. Codecs with fast-scan support
//!   (`tq-mse-1/2/4`, with or without `-nc`) are kept in the blocked 4-bit
//!   layout of `tq_core::fastscan` and scanned with 8-bit tables; the best
//!   `rerank·k` candidates are then re-scored with the codec's exact estimator.
//!   Other codecs are scored exactly from their packed codes.
//! - [`IvfIndex`]: coarse k-means partitions, one flat store per list, `nprobe`.
//! - [`file`](mod@file): one versioned file per index, written atomically, loaded by
//!   mmap, with incremental appends that never rewrite existing bytes.
//!
//! Ids are caller-chosen `u64`. Adding needs no training for TurboQuant codecs.

#![warn(missing_docs)]

pub mod file;
mod flat;
mod ivf;
mod topk;

pub use flat::{FlatIndex, Hit, SearchParams, SharedIndex};
pub use ivf::IvfIndex;

use thiserror::Error;
use tq_core::{RotationKind, TqError};

/// Similarity used for ranking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Inner product (larger is better).
    Ip,
    /// Cosine similarity: vectors and queries are L2-normalized, then inner product.
    Cosine,
    /// Squared Euclidean distance (smaller is better).
    L2,
}

impl Metric {
    /// The lowercase name (`ip`, `cosine`, `l2`), as parsed by `FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Ip => "ip",
            Metric::Cosine => "cosine",
            Metric::L2 => "l2",
        }
    }
    /// The byte that stands for this metric in a `.tqi` spec.
    pub fn id(self) -> u8 {
        match self {
            Metric::Ip => 0,
            Metric::Cosine => 1,
            Metric::L2 => 2,
        }
    }
    /// The metric of a spec byte (inverse of [`Metric::id`]); `None` if unknown.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            0 => Some(Metric::Ip),
            1 => Some(Metric::Cosine),
            2 => Some(Metric::L2),
            _ => None,
        }
    }
}

impl std::str::FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ip" => Ok(Metric::Ip),
            "cosine" => Ok(Metric::Cosine),
            "l2" => Ok(Metric::L2),
            _ => Err(format!("unknown metric '{s}' (expected ip, cosine or l2)")),
        }
    }
}

/// Optional full-precision copies of the vectors, for exact re-ranking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawVectors {
    /// No copies (the default).
    None,
    /// Half precision, 2 bytes per coordinate.
    F16,
    /// Single precision, 4 bytes per coordinate.
    F32,
}

impl RawVectors {
    /// Bytes of one copy of a `dim`-dimensional vector (0 for `None`).
    pub fn bytes(self, dim: usize) -> usize {
        match self {
            RawVectors::None => 0,
            RawVectors::F16 => 2 * dim,
            RawVectors::F32 => 4 * dim,
        }
    }
    /// The byte that stands for this precision in a `.tqi` spec.
    pub fn id(self) -> u8 {
        match self {
            RawVectors::None => 0,
            RawVectors::F16 => 1,
            RawVectors::F32 => 2,
        }
    }
    /// The precision of a spec byte (inverse of [`RawVectors::id`]); `None` if unknown.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            0 => Some(RawVectors::None),
            1 => Some(RawVectors::F16),
            2 => Some(RawVectors::F32),
            _ => None,
        }
    }
}

impl std::str::FromStr for RawVectors {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(RawVectors::None),
            "f16" => Ok(RawVectors::F16),
            "f32" => Ok(RawVectors::F32),
            _ => Err(format!("unknown raw vector precision '{s}' (expected none, f16 or f32)")),
        }
    }
}

/// Everything stored codes depend on.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexSpec {
    /// Registered codec name (e.g. `tq-mse-2`).
    pub codec: String,
    /// Vector dimension (1 to `tq_core::limits::MAX_DIM`).
    pub dim: usize,
    /// Seed of the codec (its random rotation); IVF k-means derives its seed from it.
    pub seed: u64,
    /// The random rotation the codec applies before quantizing.
    pub rotation: RotationKind,
    /// Similarity used for ranking.
    pub metric: Metric,
    /// Codec parameters (e.g. the outlier channels of `tq-mse-2.5`).
    pub params: Vec<u8>,
    /// Full-precision copies kept beside the codes (off by default).
    pub raw: RawVectors,
}

impl IndexSpec {
    /// A spec with seed 0, the Hadamard rotation, no codec params and no raw vectors.
    pub fn new(codec: &str, dim: usize, metric: Metric) -> Self {
        Self { codec: codec.to_string(), dim, seed: 0, rotation: RotationKind::Hadamard, metric, params: Vec::new(), raw: RawVectors::None }
    }
}

/// Errors of index operations and `.tqi` files.
#[derive(Debug, Error)]
pub enum IndexError {
    /// An error from tq-core (unknown codec, bad vectors or parameters, limits).
    #[error(transparent)]
    Codec(#[from] TqError),
    /// A `.tqi` file that is not a valid index (bad magic, version, header or records).
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// An I/O error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The path being read or written.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Adding an id that the index already holds.
    #[error("id {0} is already in the index")]
    DuplicateId(u64),
    /// Removing an id that the index does not hold.
    #[error("id {0} is not in the index")]
    UnknownId(u64),
    /// The same id appears twice in one add or remove request.
    #[error("id {0} is given more than once in the request")]
    RepeatedId(u64),
    /// A writer's view is stale: another writer committed (or replaced the
    /// file) after this one loaded it. Nothing was written.
    #[error("{path}: index file changed since it was loaded: commit {loaded} -> {now}{}; reload and retry", if *.replaced { " (the file was replaced)" } else { "" })]
    Changed {
        /// The index file.
        path: String,
        /// `seq` of the commit the view was loaded from.
        loaded: u64,
        /// `seq` of the file's current commit (0 if the file is gone).
        now: u64,
        /// The file was replaced (another inode) or removed since the load.
        replaced: bool,
    },
    /// A commit slot fails its checksum: the last commit cannot be trusted.
    #[error("{path}: commit slot {slot} at byte {offset} is corrupt: {detail}")]
    CorruptSlot {
        /// The index file.
        path: String,
        /// 'A' or 'B'.
        slot: char,
        /// Byte offset of the slot in the file.
        offset: usize,
        /// What the other slot holds and how to recover.
        detail: String,
    },
    /// Another process holds the write lock longer than the caller waits.
    #[error("{lock}: timed out after {waited_ms} ms waiting for the index write lock, held by {}", match .holder_pid { Some(p) => format!("pid {p}"), None => "an unknown process".to_string() })]
    LockTimeout {
        /// The lock file (`<index>.lock`).
        lock: String,
        /// The pid written in the lock file, if it reads as one.
        holder_pid: Option<u32>,
        /// How long this writer waited, in milliseconds.
        waited_ms: u64,
    },
    /// A size field read from a file is beyond what the file or the
    /// documented limits allow (refused before anything is allocated).
    #[error("{path}: {field} is {value}, over the limit of {limit} (corrupt or hostile file)")]
    TooLarge {
        /// The file.
        path: String,
        /// Name of the size field (e.g. `dim`).
        field: &'static str,
        /// The value read.
        value: u64,
        /// The largest value allowed there.
        limit: u64,
    },
    /// An invalid argument or call (bad dimension, counts that disagree, train after add).
    #[error("{0}")]
    Invalid(String),
}

/// Result of tq-index operations.
pub type Result<T> = std::result::Result<T, IndexError>;

/// Scales every row of a row-major matrix to unit L2 norm (zero rows stay zero).
pub(crate) fn normalize_rows(v: &mut [f32], dim: usize) {
    for row in v.chunks_exact_mut(dim) {
        let n = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|x| *x = (*x as f64 / n) as f32);
        }
    }
}
