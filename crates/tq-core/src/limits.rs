//! Documented resource limits. Every size read from a header, a flag or an
//! input array is checked against these before anything is allocated, so a
//! tiny hostile input can never make the library allocate absurd memory.
//!
//! | limit | value | what it bounds |
//! |---|---|---|
//! | [`MAX_DIM`] | 65,536 | vector dimension of every codec, file and index (checked by `CodecEntry::build` and `build_matrix`) |
//! | [`MAX_KV_BATCH`], [`MAX_KV_TOKENS`] | 4,096, 1,048,576 | sequences of one KV cache object and tokens per sequence |
//! | [`MAX_DENSE_DIM`] | 2,048 | dimension of a dense `d × d` transform: the Haar rotation (`O(d³)` to build) and the Gaussian QJL projection of `tq-prod-B` |
//!
//! Memory of the other per-codec tables, all linear in `dim` and so bounded by
//! [`MAX_DIM`]: PQ codebooks `256·dim` f32 (64 MiB at `MAX_DIM`) and a PQ
//! prepared query `2·256·m` f32 with `m ≤ dim` sub-spaces (128 MiB at
//! `MAX_DIM`, `pq-8`); QET: two PQ stages; Hadamard rotations `3·dim` u32 signs
//! plus permutations; polar and Lloyd–Max codebooks do not depend on `dim`.

use crate::error::{Result, TqError};

/// Largest vector dimension any codec, file or index accepts.
pub const MAX_DIM: usize = 1 << 16;

// Index files (`tq-index`).

/// Largest number of IVF lists an index (or an index file header) may have.
pub const MAX_NLIST: usize = 1 << 20;

/// Largest full-precision window (`sink` or `recent` tokens) a KV cache
/// allocates: the longest context of the built-in models (131,072 tokens).
pub const MAX_WINDOW_TOKENS: usize = 1 << 17;

/// Largest number of sequences one KV cache object holds (the Python
/// wheel's `KvCache(batch=…)`; each sequence has its own streams).
pub const MAX_KV_BATCH: usize = 1 << 12;

/// Longest sequence a KV cache object accepts tokens for (2^20 tokens, eight
/// times the longest context of the built-in models): appends past it are
/// refused before anything grows.
pub const MAX_KV_TOKENS: usize = 1 << 20;

/// Largest dimension of a dense `d × d` transform: the Haar rotation (built by
/// Gram–Schmidt in `O(d³)`: about 7 s at 1,536, 131 s at 4,000) and
/// the Gaussian QJL projection of `tq-prod-B` (`O(d²)` memory and time per
/// vector). At this limit both take [`dense_bytes`]`(2048)` = 64 MiB while
/// being built. Above it, use the structured alternatives: the Hadamard
/// rotation and the orthogonal QJL projection (`tq-prod-B-orth`), both
/// `O(d log d)` and `O(d)` memory.
pub const MAX_DENSE_DIM: usize = 2048;

/// Peak bytes to build one dense `dim × dim` transform: the f64 rows it is
/// computed in plus the f32 matrix and its transpose that are kept.
pub fn dense_bytes(dim: usize) -> u128 {
    let d2 = dim as u128 * dim as u128;
    d2 * 8 + 2 * d2 * 4
}

/// Refuses `dim > MAX_DIM`, naming `field`.
pub fn check_dim(field: &'static str, dim: usize) -> Result<()> {
    if dim > MAX_DIM {
        return Err(TqError::LimitExceeded { field, value: dim, limit: MAX_DIM, hint: String::new() });
    }
    Ok(())
}

/// Refuses a dense `dim × dim` transform (`what`, e.g. "a Haar rotation") above
/// [`MAX_DENSE_DIM`], before anything sized by `dim²` is allocated; the error
/// gives the memory it would take and the structured `alternative`.
pub fn check_dense(what: &'static str, dim: usize, alternative: &str) -> Result<()> {
    if dim > MAX_DENSE_DIM {
        let gib = dense_bytes(dim) as f64 / (1u64 << 30) as f64;
        return Err(TqError::LimitExceeded {
            field: "dim",
            value: dim,
            limit: MAX_DENSE_DIM,
            hint: format!(" for {what} (dense d×d, {gib:.1} GiB to build); use {alternative}"),
        });
    }
    Ok(())
}
