//! Documented resource limits. Every size read from a header, a flag or an
//! input array is checked against these before anything is allocated, so a
//! tiny hostile input can never make the library allocate absurd memory.

/// Largest vector dimension any codec, file or index accepts.
pub const MAX_DIM: usize = 1 << 16;
