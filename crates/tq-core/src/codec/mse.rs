//! TurboQuant_mse (Algorithm 1) with optional norm correction.

use std::sync::Arc;

use super::{norm_of, normalize, read_f32, score_each, with_scratch, AttentionCodec, CodebookView, Codec, CodecInfo, FastScanCodec, PreparedQuery};
use crate::bitpack::{pack, packed_len, unpack};
use crate::codebook::LloydMax;
use crate::error::Result;
use crate::kernels::{kernels, Had2};
use crate::rotation::{Rotation, RotationKind};

/// TurboQuant_mse: rotate, quantize each coordinate with the Lloyd–Max
/// codebook of the sphere's coordinate law, store the norm (or, with norm
/// correction, `‖x‖/⟨u, û⟩`, which makes `⟨q, decode(x)⟩` unbiased).
pub struct TurboQuantMse {
    info: CodecInfo,
    dim: usize,
    bits: u32,
    norm_correction: bool,
    rotation: Rotation,
    codebook: Arc<LloydMax>,
    centroids_sq: Vec<f32>,
    ones: Vec<f32>,
    packed: usize,
}

impl TurboQuantMse {
    /// TurboQuant_mse at `bits` (1..=8) with the seeded `rotation`; `norm_correction` gives `-nc`.
    pub fn new(dim: usize, bits: u32, seed: u64, rotation: RotationKind, norm_correction: bool) -> Result<Self> {
        let codebook = LloydMax::get(dim, bits)?;
        let rotation = Rotation::new(rotation, dim, seed)?;
        let name = format!("tq-mse-{bits}{}", if norm_correction { "-nc" } else { "" });
        let packed = packed_len(dim, bits);
        Ok(Self {
            info: CodecInfo::new(name, dim, seed, rotation.kind(), packed + 4),
            dim,
            bits,
            norm_correction,
            rotation,
            centroids_sq: codebook.centroids.iter().map(|c| c * c).collect(),
            codebook,
            ones: vec![1.0; dim],
            packed,
        })
    }

    /// The Lloyd–Max codebook of `(dim, bits)`.
    pub fn codebook(&self) -> &LloydMax {
        &self.codebook
    }

    /// The seeded rotation (GPU kernels read its sign masks).
    pub fn rotation(&self) -> &Rotation {
        &self.rotation
    }

    /// Rotated, normalized → indices; returns the stored scale.
    fn encode_rotated(&self, y: &mut [f32], tmp: &mut [f32], idx: &mut [u8]) -> f32 {
        let k = kernels();
        let norm = norm_of(y);
        if norm == 0.0 {
            idx.iter_mut().for_each(|v| *v = 0);
            return 0.0;
        }
        normalize(y, norm);
        (k.quantize)(y, &self.codebook.boundaries, self.bits, idx);
        self.scale_for(norm, y, tmp, idx)
    }

    /// [`Self::scale_for`] from the packed indices (the centroids looked up by
    /// the `lookup_codes` kernel: the same values, so the same bits).
    fn scale_packed(&self, norm: f32, y: &[f32], tmp: &mut [f32], packed: &[u8]) -> f32 {
        if self.norm_correction {
            let k = kernels();
            (k.lookup_codes)(packed, self.bits, &self.codebook.centroids, tmp);
            norm / (k.dot)(y, tmp)
        } else {
            norm
        }
    }

    /// The stored scale for unit rotated `y` quantized to `idx`.
    fn scale_for(&self, norm: f32, y: &[f32], tmp: &mut [f32], idx: &[u8]) -> f32 {
        if self.norm_correction {
            for (t, &i) in tmp.iter_mut().zip(idx.iter()) {
                *t = self.codebook.centroids[i as usize];
            }
            // ⟨u, û⟩ > 0: every term y_j c_j is >= 0 and some is > 0.
            norm / (kernels().dot)(y, tmp)
        } else {
            norm
        }
    }
}

impl Codec for TurboQuantMse {
    fn info(&self) -> &CodecInfo {
        &self.info
    }
    fn fastscan(&self) -> Option<&dyn FastScanCodec> {
        // 1, 2 and 4 bits: nibble `i` of the packed indices holds `4/B` whole
        // coordinates, and the code is `[indices][f32 scale]`.
        matches!(self.bits, 1 | 2 | 4).then_some(self as &dyn FastScanCodec)
    }
    fn attention(&self) -> Option<&dyn AttentionCodec> {
        Some(self)
    }

    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]) {
        with_scratch(self.dim, |y, tmp, idx| {
            let k = kernels();
            // fused fast paths (same bits as the general one); None for zero/extreme norms
            let fused = self.rotation.two_round_pow2().and_then(|(s1, s2, total)| {
                let p = Had2 { s1, s2, total, boundaries: &self.codebook.boundaries, bits: self.bits };
                (k.had2_quantize)(x, &p, y, idx)
            });
            let fused = fused.or_else(|| {
                self.rotation.rotate_into(x, y, tmp);
                // y unchanged when None
                (k.norm_quantize)(y, &self.codebook.boundaries, self.bits, idx)
            });
            let scale = match fused {
                Some(norm) => {
                    pack(idx, self.bits, &mut code[..self.packed]);
                    self.scale_packed(norm, y, tmp, &code[..self.packed])
                }
                None => {
                    let scale = self.encode_rotated(y, tmp, idx);
                    pack(idx, self.bits, &mut code[..self.packed]);
                    scale
                }
            };
            code[self.packed..self.packed + 4].copy_from_slice(&scale.to_le_bytes());
        })
    }

    fn decode_unchecked(&self, code: &[u8], out: &mut [f32]) {
        with_scratch(self.dim, |_, tmp, idx| {
            unpack(&code[..self.packed], self.bits, idx);
            for (o, &i) in out.iter_mut().zip(idx.iter()) {
                *o = self.codebook.centroids[i as usize];
            }
            self.rotation.unrotate_in_place(out, tmp);
            let scale = read_f32(code, self.packed);
            out.iter_mut().for_each(|v| *v *= scale);
        })
    }

    fn prepare_unchecked(&self, q: &[f32]) -> PreparedQuery {
        let norm_sq = (kernels().sum_sq)(q);
        PreparedQuery { parts: vec![self.rotation.rotate(q)], norm_sq }
    }

    fn score_ip(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        self.ip_rotated(&q.parts[0], code)
    }

    /// ‖q − x̂‖², the distance to the decoded vector (asymmetric distance).
    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        self.l2_rotated(&q.parts[0], q.norm_sq, code)
    }
}

/// Value accumulation in the rotated domain, codebook views and byte-LUT batch scoring.
impl AttentionCodec for TurboQuantMse {
    /// Rotated domain: `acc += w·scale·c[idx]`, rotated back by `finish_accumulated`.
    fn accumulate(&self, code: &[u8], w: f32, acc: &mut [f32]) {
        let ws = w * read_f32(code, self.packed);
        (kernels().axpy_codes)(&code[..self.packed], self.bits, &self.codebook.centroids, ws, acc);
    }

    fn finish_accumulated(&self, acc: &mut [f32]) {
        with_scratch(self.dim, |_, tmp, _| self.rotation.unrotate_in_place(acc, tmp));
    }

    fn codebook_view(&self) -> Option<CodebookView<'_>> {
        Some(CodebookView { bits: self.bits, table: &self.codebook.centroids, packed: self.packed })
    }

    /// Batch scoring. For 1, 2 and 4 bits (whole coordinates per byte) and
    /// batches of at least `BYTE_LUT_MIN_BATCH` codes, builds a per-query table
    /// of the partial inner product of every possible byte at every byte
    /// position (`packed × 256` f32), so a code costs one lookup per byte.
    fn score_ip_many(&self, q: &PreparedQuery, codes: &[u8], out: &mut [f32]) {
        let cs = self.code_size();
        let n = codes.len() / cs;
        if !matches!(self.bits, 1 | 2 | 4) || n < BYTE_LUT_MIN_BATCH {
            return score_each(self, q, codes, out);
        }
        let lut = self.byte_lut(&q.parts[0]);
        let p = self.packed;
        for (o, c) in out.iter_mut().zip(codes.chunks_exact(cs)) {
            let mut acc = [0.0f32; 4];
            let mut chunks = c[..p].chunks_exact(4);
            let mut base = 0;
            for b in &mut chunks {
                acc[0] += lut[base + b[0] as usize];
                acc[1] += lut[base + 256 + b[1] as usize];
                acc[2] += lut[base + 512 + b[2] as usize];
                acc[3] += lut[base + 768 + b[3] as usize];
                base += 1024;
            }
            for &b in chunks.remainder() {
                acc[0] += lut[base + b as usize];
                base += 256;
            }
            *o = ((acc[0] + acc[1]) + (acc[2] + acc[3])) * read_f32(c, p);
        }
    }
}

/// Bits 1, 2 and 4 (see `Codec::fastscan`).
impl FastScanCodec for TurboQuantMse {
    fn fastscan_m(&self) -> usize {
        2 * self.packed
    }

    fn fastscan_tables(&self, q: &PreparedQuery) -> Vec<f32> {
        self.nibble_tables(&q.parts[0])
    }

    fn fastscan_factor(&self, code: &[u8]) -> f32 {
        read_f32(code, self.packed)
    }
}

/// Bits 1, 2, 4: table `i` (16 entries) gives `Σ qr[j]·table[field_j]` over the
/// `4/bits` coordinates `j` packed in nibble `i` of an LSB-first bit stream, for
/// each nibble value (`2·packed_len(qr.len(), bits)` tables; padding is zero).
pub(crate) fn nibble_tables(qr: &[f32], bits: u32, table: &[f32]) -> Vec<f32> {
    let b = bits as usize;
    let per = 4 / b;
    let mask = (1usize << b) - 1;
    let mut t = vec![0.0f32; 32 * packed_len(qr.len(), bits)];
    // the entries of field k for each nibble value
    let cols: Vec<[f32; 16]> = (0..per).map(|k| std::array::from_fn(|v| table[(v >> (k * b)) & mask])).collect();
    for (i, row) in t.chunks_exact_mut(16).enumerate() {
        // each entry: 0.0, then + q·c for the fields in order (a vectorized row)
        for (k, col) in cols.iter().enumerate() {
            if let Some(&q) = qr.get(i * per + k) {
                for (e, &c) in row.iter_mut().zip(col) {
                    *e += q * c;
                }
            }
        }
    }
    t
}

/// Smallest batch for which `score_ip_many` builds a byte lookup table.
const BYTE_LUT_MIN_BATCH: usize = 64;

impl TurboQuantMse {
    /// `lut[p·256 + v]` = the partial inner product of the coordinates packed in
    /// byte `p` when byte `p` is `v` (the sum of its two nibble tables).
    fn byte_lut(&self, qr: &[f32]) -> Vec<f32> {
        let t = self.nibble_tables(qr);
        let mut lut = vec![0.0f32; self.packed * 256];
        for (row, pair) in lut.chunks_exact_mut(256).zip(t.chunks_exact(32)) {
            for (v, e) in row.iter_mut().enumerate() {
                *e = pair[v & 15] + pair[16 + (v >> 4)];
            }
        }
        lut
    }

    fn nibble_tables(&self, qr: &[f32]) -> Vec<f32> {
        nibble_tables(qr, self.bits, &self.codebook.centroids)
    }

    /// ⟨q, x̂⟩ from the rotated query `qr = Π q`.
    pub(super) fn ip_rotated(&self, qr: &[f32], code: &[u8]) -> f32 {
        let s = (kernels().dot_codes)(qr, &code[..self.packed], self.bits, &self.codebook.centroids);
        s * read_f32(code, self.packed)
    }

    pub(super) fn l2_rotated(&self, qr: &[f32], q_norm_sq: f32, code: &[u8]) -> f32 {
        let k = kernels();
        let p = &code[..self.packed];
        let scale = read_f32(code, self.packed);
        let ip = (k.dot_codes)(qr, p, self.bits, &self.codebook.centroids) * scale;
        let cc = (k.dot_codes)(&self.ones, p, self.bits, &self.centroids_sq) * scale * scale;
        q_norm_sq - 2.0 * ip + cc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nibble_tables` gives the bits of the plain definition (per entry
    /// `0.0`, then `+ q·c` for the fields of the nibble in order; padding
    /// zero) for every width, lengths that leave partial nibbles, and ±0.
    #[test]
    fn nibble_tables_equal_the_plain_definition() {
        let mut r = crate::rng::Xoshiro256::new(9);
        for bits in [1u32, 2, 4] {
            let table: Vec<f32> = (0..1usize << bits).map(|i| if i == 1 { -0.0 } else { r.gaussian() as f32 }).collect();
            for n in [1usize, 2, 3, 5, 8, 50, 576] {
                let qr: Vec<f32> = (0..n).map(|i| if i % 7 == 3 { 0.0 } else { r.gaussian() as f32 }).collect();
                let (b, per) = (bits as usize, 4 / bits as usize);
                let want: Vec<u32> = (0..32 * packed_len(n, bits))
                    .map(|e| {
                        let (i, v) = (e / 16, e % 16);
                        let mut s = 0.0f32;
                        for k in 0..per {
                            if let Some(&q) = qr.get(i * per + k) {
                                s += q * table[(v >> (k * b)) & ((1 << b) - 1)];
                            }
                        }
                        s.to_bits()
                    })
                    .collect();
                let got: Vec<u32> = nibble_tables(&qr, bits, &table).iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "bits={bits} n={n}");
            }
        }
    }
}
