//! KIVI (Liu et al., ICML 2024): asymmetric min/max integer quantization of a
//! `tokens × channels` block, keys per channel over groups of `G` tokens and
//! values per token over groups of `G` channels, each group with an f16 scale
//! `(max − min)/(2^B − 1)` and an f16 zero point `min`; `G = 32` by default.
//! The full-precision window of recent tokens belongs to the KV cache.
//!
//! Layout: `[per group: f16 scale, f16 zero]` (groups in row-major group
//! order), then every element's `B`-bit index, row-major, bit-packed.
//! Quantization uses the f16-rounded scale and zero, so decode is exact to them.

use half::f16;

use crate::bitpack::{pack, packed_len, unpack};
use crate::error::{Result, TqError};
use crate::matrix::{Axis, MatrixCodec};

/// Default group size `G` (tokens or channels per group).
pub const DEFAULT_GROUP: usize = 32;

/// The KIVI matrix codec `kivi-B` (see the module docs).
pub struct Kivi {
    name: String,
    channels: usize,
    bits: u32,
    group: usize,
    axis: Axis,
}

impl Kivi {
    /// KIVI at `bits` (1..=8) with groups of `group` along `axis`, for `channels` columns.
    pub fn new(channels: usize, bits: u32, group: usize, axis: Axis) -> Result<Self> {
        if !(1..=8).contains(&bits) {
            return Err(TqError::UnsupportedBits(bits));
        }
        if group == 0 || channels == 0 {
            return Err(TqError::BadParams("KIVI needs a positive group size and channel count".into()));
        }
        Ok(Self { name: format!("kivi-{bits}"), channels, bits, group, axis })
    }

    /// Groups of a `tokens × channels` block: (number, element index list).
    fn groups(&self, tokens: usize) -> Vec<Vec<usize>> {
        let c = self.channels;
        let mut out = Vec::new();
        match self.axis {
            Axis::PerChannel => {
                for t0 in (0..tokens).step_by(self.group) {
                    for ch in 0..c {
                        out.push((t0..(t0 + self.group).min(tokens)).map(|t| t * c + ch).collect());
                    }
                }
            }
            Axis::PerToken => {
                for t in 0..tokens {
                    for c0 in (0..c).step_by(self.group) {
                        out.push((c0..(c0 + self.group).min(c)).map(|ch| t * c + ch).collect());
                    }
                }
            }
        }
        out
    }

    fn n_groups(&self, tokens: usize) -> usize {
        match self.axis {
            Axis::PerChannel => tokens.div_ceil(self.group) * self.channels,
            Axis::PerToken => tokens * self.channels.div_ceil(self.group),
        }
    }
}

impl MatrixCodec for Kivi {
    fn name(&self) -> &str {
        &self.name
    }
    fn channels(&self) -> usize {
        self.channels
    }
    fn encoded_size(&self, tokens: usize) -> usize {
        4 * self.n_groups(tokens) + packed_len(tokens * self.channels, self.bits)
    }
    /// The f16 zero (`min`) and scale (`(max − min)/(2^B − 1)`) are finite
    /// whenever every `|x| <= 65504/2`.
    fn safe_abs(&self) -> f32 {
        32752.0
    }

    fn encode_unchecked(&self, m: &[f32], tokens: usize, out: &mut [u8]) {
        let levels = ((1u32 << self.bits) - 1) as f32;
        let mut idx = vec![0u8; tokens * self.channels];
        for (g, members) in self.groups(tokens).iter().enumerate() {
            let (lo, hi) = members.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &i| (a.min(m[i]), b.max(m[i])));
            let zero = f16::from_f32(lo);
            let scale = f16::from_f32((hi - lo) / levels);
            out[4 * g..4 * g + 2].copy_from_slice(&scale.to_le_bytes());
            out[4 * g + 2..4 * g + 4].copy_from_slice(&zero.to_le_bytes());
            let (s, z) = (scale.to_f32(), zero.to_f32());
            for &i in members {
                idx[i] = if s > 0.0 { ((m[i] - z) / s).round().clamp(0.0, levels) as u8 } else { 0 };
            }
        }
        let at = 4 * self.n_groups(tokens);
        pack(&idx, self.bits, &mut out[at..]);
    }

    fn decode_unchecked(&self, code: &[u8], tokens: usize, out: &mut [f32]) {
        let mut idx = vec![0u8; tokens * self.channels];
        let at = 4 * self.n_groups(tokens);
        unpack(&code[at..], self.bits, &mut idx);
        for (g, members) in self.groups(tokens).iter().enumerate() {
            let s = f16::from_le_bytes([code[4 * g], code[4 * g + 1]]).to_f32();
            let z = f16::from_le_bytes([code[4 * g + 2], code[4 * g + 3]]).to_f32();
            for &i in members {
                out[i] = z + s * idx[i] as f32;
            }
        }
    }
}
