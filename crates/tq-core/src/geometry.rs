//! [`KvGeometry`]: the one description of a model's attention geometry, used
//! by the LLM runtime, the CPU caches, the GPU kernels and the VRAM planner.

use crate::error::{Result, TqError};
use crate::limits::MAX_DIM;

/// Layers, query heads, KV heads and head dimension of a model's attention.
/// `q_heads` is a multiple of `kv_heads` (GQA: `group()` query heads read one
/// KV head).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvGeometry {
    /// Transformer layers (each with its own cache).
    pub layers: usize,
    /// Query heads per layer.
    pub q_heads: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Values per head vector.
    pub head_dim: usize,
}

/// Largest number of layers × KV heads (streams) a geometry may have.
pub const MAX_STREAMS: usize = 1 << 20;

impl KvGeometry {
    /// A checked geometry: every count positive, `kv_heads` divides
    /// `q_heads`, `head_dim ≤ MAX_DIM`, streams ≤ [`MAX_STREAMS`].
    pub fn new(layers: usize, q_heads: usize, kv_heads: usize, head_dim: usize) -> Result<Self> {
        let g = Self { layers, q_heads, kv_heads, head_dim };
        g.check()?;
        Ok(g)
    }
    /// Checks the invariants of [`KvGeometry::new`].
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TqError::BadParams(format!("KV geometry: {m}")));
        if self.layers == 0 || self.q_heads == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return bad(format!("{self} has a zero count"));
        }
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            return bad(format!("{} query heads are not a multiple of {} KV heads", self.q_heads, self.kv_heads));
        }
        if self.head_dim > MAX_DIM {
            return bad(format!("head_dim {} exceeds the maximum dimension {MAX_DIM}", self.head_dim));
        }
        if self.layers.checked_mul(self.kv_heads).is_none_or(|s| s > MAX_STREAMS) {
            return bad(format!("{} layers × {} KV heads exceed {MAX_STREAMS} streams", self.layers, self.kv_heads));
        }
        Ok(())
    }
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }
    /// Cached streams: layers × KV heads.
    pub fn streams(&self) -> usize {
        self.layers * self.kv_heads
    }
    /// The same heads, one layer (the shape of one attention call).
    pub fn one_layer(&self) -> Self {
        Self { layers: 1, ..*self }
    }
}

impl std::fmt::Display for KvGeometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} layers × {} query / {} KV heads × head_dim {}", self.layers, self.q_heads, self.kv_heads, self.head_dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_checks_name_the_problem() {
        let g = KvGeometry::new(28, 12, 2, 128).unwrap();
        assert_eq!((g.group(), g.streams(), g.one_layer().layers), (6, 56, 1));
        assert!(KvGeometry::new(2, 12, 5, 128).unwrap_err().to_string().contains("multiple"));
        assert!(KvGeometry::new(0, 1, 1, 8).unwrap_err().to_string().contains("zero"));
        assert!(KvGeometry::new(1, 1, 1, MAX_DIM + 1).unwrap_err().to_string().contains("head_dim"));
        assert!(KvGeometry::new(usize::MAX, 1, 1, 8).unwrap_err().to_string().contains("streams"));
    }
}
