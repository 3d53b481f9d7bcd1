//! Documented resource limits. Every size read from a header, a flag or an
//! input array is checked against these before anything is allocated, so a
//! tiny hostile input can never make the library allocate absurd memory.

/// Largest vector dimension any codec, file or index accepts.
pub const MAX_DIM: usize = 1 << 16;

// Index files (`tq-index`).

/// Largest number of IVF lists an index (or an index file header) may have.
pub const MAX_NLIST: usize = 1 << 20;
