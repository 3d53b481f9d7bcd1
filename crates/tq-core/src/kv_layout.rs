//! How a KV cache stores one head vector coded by a codec: the one owner of
//! that layout, used by the CPU caches (`tq-kv`) and by the GPU planes
//! (`tq-cuda`).
//!
//! Codebook codecs (TurboQuant MSE: a code is a scale times centroids, see
//! [`CodebookView`](crate::CodebookView)) are stored as their packed indices
//! followed by the scale as a bf16 ([`KV_SCALE_BYTES`] instead of the codec's
//! f32: relative error ≤ 2^-9, far below the quantization error; 16 bits per
//! vector saved, 0.25 bits per value at head_dim 64). Every other codec keeps
//! its whole code, with the scales it holds itself (f32 norms, f16 or
//! E8M0/E4M3 block scales): [`KvScale::InCode`].

use crate::registry::KvScale;
use crate::Codec;

/// Bytes of the scale a KV cache stores with each codebook code (a bf16).
pub const KV_SCALE_BYTES: usize = 2;

/// The stored form of one head vector's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Bytes before the scale: the packed indices of a codebook code, or the
    /// whole code.
    pub packed: usize,
    /// How the scale is stored.
    pub scale: KvScale,
}

impl KvLayout {
    /// The layout of `codec`'s codes in a KV cache.
    pub fn of(codec: &dyn Codec) -> Self {
        match codec.codebook_view() {
            Some(v) => Self { packed: v.packed, scale: KvScale::Bf16 },
            None => Self { packed: codec.code_size(), scale: KvScale::InCode },
        }
    }
    /// Bytes stored per vector.
    pub fn bytes(&self) -> usize {
        self.packed + self.scale_bytes()
    }
    /// Bytes of the separate scale (0 when the code holds its own).
    pub fn scale_bytes(&self) -> usize {
        match self.scale {
            KvScale::Bf16 => KV_SCALE_BYTES,
            KvScale::InCode => 0,
        }
    }
    /// Turns the codec's code just appended to `out` (from `start`) into its
    /// stored form: a codebook code's f32 scale becomes a bf16 (round to
    /// nearest even); other codes are kept as they are.
    pub fn narrow_in_place(&self, out: &mut Vec<u8>, start: usize) {
        if self.scale == KvScale::Bf16 {
            let p = start + self.packed;
            let s = f32::from_le_bytes([out[p], out[p + 1], out[p + 2], out[p + 3]]);
            out.truncate(p);
            out.extend_from_slice(&half::bf16::from_f32(s).to_bits().to_le_bytes());
        }
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
        assert!((stored - s).abs() <= s.abs() * 2f32.powi(-9), "{stored} vs {s}");
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
