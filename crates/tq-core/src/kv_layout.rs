//! How a KV cache stores one head vector coded by a codec: the one owner of
//! that layout, used by the CPU caches (`tq-kv`) and by the GPU planes
//! (`tq-cuda`).
//!
//! Codebook codecs (TurboQuant MSE: a code is a scale times centroids, see
//! [`CodebookView`](crate::CodebookView)) are stored as their packed indices
//! followed by the scale as a bf16 ([`KV_SCALE_BYTES`] instead of the codec's
//! f32: relative error ≤ 2^-8, far below the quantization error; 16 bits per
//! vector saved, 0.25 bits per value at head_dim 64). A code of two codebook
//! codes back to back (the fractional codecs `tq-mse-2.5`/`-3.5`:
//! [`Codec::two_scaled_parts`]) stores both scales as bf16 the same way. Every
//! other codec keeps its whole code, with the scales it holds itself (f32
//! norms, f16 or E8M0/E4M3 block scales): [`KvScale::InCode`].

use crate::registry::KvScale;
use crate::Codec;

/// Bytes of the scale a KV cache stores with each codebook code (a bf16).
pub const KV_SCALE_BYTES: usize = 2;

/// The stored form of one head vector's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Bytes before the scale: the packed indices of a codebook code (of the
    /// first part of a two-part code), or the whole code.
    pub packed: usize,
    /// How the scale is stored.
    pub scale: KvScale,
    /// The packed bytes of the second part of a two-part code (after the
    /// first part's scale, before its own); 0 for a one-part code.
    pub second: usize,
}

impl KvLayout {
    /// The layout of `codec`'s codes in a KV cache.
    pub fn of(codec: &dyn Codec) -> Self {
        if let Some(v) = codec.codebook_view() {
            return Self { packed: v.packed, scale: KvScale::Bf16, second: 0 };
        }
        match codec.two_scaled_parts() {
            Some((a, b)) => Self { packed: a, scale: KvScale::Bf16, second: b },
            None => Self { packed: codec.code_size(), scale: KvScale::InCode, second: 0 },
        }
    }
    /// Bytes stored per vector.
    pub fn bytes(&self) -> usize {
        self.packed + self.second + self.scale_bytes()
    }
    /// Bytes of the separate scales (0 when the code holds its own).
    pub fn scale_bytes(&self) -> usize {
        match self.scale {
            KvScale::Bf16 => KV_SCALE_BYTES * if self.second > 0 { 2 } else { 1 },
            KvScale::InCode => 0,
        }
    }
    /// Whether stored codes differ from the codec's (their scales are bf16):
    /// codec functions other than the codebook kernels need [`Self::widen`] first.
    pub fn narrows(&self) -> bool {
        self.scale == KvScale::Bf16
    }
    /// Turns the codec's code just appended to `out` (from `start`) into its
    /// stored form: a codebook code's f32 scale (both of a two-part code)
    /// becomes a bf16 (round to nearest even); other codes are kept as they are.
    pub fn narrow_in_place(&self, out: &mut Vec<u8>, start: usize) {
        if self.scale != KvScale::Bf16 {
            return;
        }
        let f32_at = |b: &[u8], p: usize| f32::from_le_bytes([b[p], b[p + 1], b[p + 2], b[p + 3]]);
        let bf = |s: f32| half::bf16::from_f32(s).to_bits().to_le_bytes();
        let p = start + self.packed;
        let s1 = f32_at(out, p);
        if self.second == 0 {
            out.truncate(p);
            out.extend_from_slice(&bf(s1));
            return;
        }
        let q = p + 4 + self.second;
        let s2 = f32_at(out, q);
        // [a][s1 f32][b][s2 f32] -> [a][s1 bf16][b][s2 bf16]
        out.copy_within(p + 4..q, p + KV_SCALE_BYTES);
        out[p..p + KV_SCALE_BYTES].copy_from_slice(&bf(s1));
        let q2 = p + KV_SCALE_BYTES + self.second;
        out.truncate(q2);
        out.extend_from_slice(&bf(s2));
    }
    /// The scale of a stored codebook code (`None` for codes that hold their own).
    pub fn scale_of(&self, stored: &[u8]) -> Option<f32> {
        match self.scale {
            KvScale::Bf16 => Some(bf16_to_f32([stored[self.packed], stored[self.packed + 1]])),
            KvScale::InCode => None,
        }
    }
    /// The codec's code for a stored one (the bf16 scale widened back to
    /// f32, exactly): what `Codec::decode` takes.
    pub fn widen(&self, stored: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&stored[..self.packed]);
        if let Some(s) = self.scale_of(stored) {
            out.extend_from_slice(&s.to_le_bytes());
        }
        if self.second > 0 {
            let b = self.packed + KV_SCALE_BYTES;
            out.extend_from_slice(&stored[b..b + self.second]);
            let s = bf16_to_f32([stored[b + self.second], stored[b + self.second + 1]]);
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
}

/// A little-endian bf16 as f32 (exact: a bf16 is the top half of an f32).
pub fn bf16_to_f32(b: [u8; 2]) -> f32 {
    f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RotationKind;

    #[test]
    fn two_part_codes_store_two_bf16_scales_and_widen_back() {
        for (name, d, bytes) in [("tq-mse-3.5", 64usize, 16 + 2 + 12 + 2), ("tq-mse-3.5", 128, 32 + 2 + 24 + 2), ("tq-mse-2.5", 64, 12 + 2 + 8 + 2)] {
            let c = crate::build(name, d, 3, RotationKind::Hadamard).unwrap();
            let l = KvLayout::of(c.as_ref());
            assert_eq!((l.scale, l.bytes()), (KvScale::Bf16, bytes), "{name} d={d}");
            assert_eq!(l.bytes() + 4, c.code_size(), "{name}: two f32 scales become two bf16");
            let x: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3 + (i % 5) as f32).collect();
            let mut out = vec![9u8; 5];
            out.resize(5 + c.code_size(), 0);
            c.encode(&x, &mut out[5..]).unwrap();
            let full = out[5..].to_vec();
            l.narrow_in_place(&mut out, 5);
            assert_eq!((out.len(), &out[..5]), (5 + l.bytes(), &[9u8; 5][..]));
            let mut back = Vec::new();
            l.widen(&out[5..], &mut back);
            assert_eq!(back.len(), c.code_size());
            // the packed indices are kept; each scale is its bf16 rounding
            let (a, b) = (l.packed, l.second);
            assert_eq!((&back[..a], &back[a + 4..a + 4 + b]), (&full[..a], &full[a + 4..a + 4 + b]));
            for at in [a, a + 4 + b] {
                let s = f32::from_le_bytes(full[at..at + 4].try_into().unwrap());
                let w = f32::from_le_bytes(back[at..at + 4].try_into().unwrap());
                assert_eq!(w, half::bf16::from_f32(s).to_f32());
                assert!(s > 0.0 && (w - s).abs() <= s * 2f32.powi(-8));
            }
        }
    }

    #[test]
    fn codebook_codes_store_a_bf16_scale_and_widen_back() {
        let c = crate::build("tq-mse-4", 64, 1, RotationKind::Hadamard).unwrap();
        let l = KvLayout::of(c.as_ref());
        assert_eq!((l.packed, l.scale, l.bytes()), (32, KvScale::Bf16, 34));
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let mut out = vec![7u8; 3]; // the layout works at any offset
        out.resize(3 + c.code_size(), 0);
        c.encode(&x, &mut out[3..]).unwrap();
        let full = out[3..].to_vec();
        l.narrow_in_place(&mut out, 3);
        assert_eq!(out.len(), 3 + l.bytes());
        assert_eq!(&out[..3], &[7, 7, 7]);
        let s = f32::from_le_bytes(full[32..36].try_into().unwrap());
        let stored = l.scale_of(&out[3..]).unwrap();
        assert!((stored - s).abs() <= s.abs() * 2f32.powi(-8), "{stored} vs {s}");
        assert_eq!(stored, half::bf16::from_f32(s).to_f32());
        let mut back = Vec::new();
        l.widen(&out[3..], &mut back);
        assert_eq!(&back[..32], &full[..32]);
        assert_eq!(back.len(), c.code_size());
    }

    #[test]
    fn other_codes_are_kept_whole() {
        for name in ["q8_0", "q4_0-rot", "nvfp4", "tq-prod-4"] {
            let c = crate::build(name, 64, 1, RotationKind::Hadamard).unwrap();
            let l = KvLayout::of(c.as_ref());
            assert_eq!((l.bytes(), l.scale), (c.code_size(), KvScale::InCode), "{name}");
            let mut out = vec![1, 2, 3];
            l.narrow_in_place(&mut out, 0);
            assert_eq!(out, [1, 2, 3]);
            assert_eq!(l.scale_of(&out), None);
        }
    }
}
