//! QET (quantum-entanglement-tree-inspired reordering, arXiv 2024), as we read
//! its description: per row, each adjacent pair of columns is put in (min, max)
//! order with one bit recording whether it was swapped, the mins are gathered
//! into the first half and the maxes into the second, and the same is repeated
//! inside each half, then each quarter, for `L` layers (default 3: 0.5·L bits
//! per element). Product quantization (8-bit sub-codes) of the reordered rows
//! follows, and a second PQ stage on the residual; the PQ budget is split
//! 70/30 between the stages (`qet-B-nores`: all of it in the first stage).
//! `qet-B` spends `B` bits per element in total, permutation bits included.

use crate::baselines::pq::Pq;
use crate::bitpack::packed_len;
use crate::codec::Codec;
use crate::error::{Result, TqError};
use crate::matrix::MatrixCodec;
use crate::rng::derive_seed;

/// Reordering layers `L` (0.5·L permutation bits per element).
pub const LAYERS: usize = 3;

/// The QET matrix codec `qet-B` / `qet-B-nores` (see the module docs).
pub struct Qet {
    name: String,
    channels: usize,
    layers: usize,
    stage1: Pq,
    stage2: Option<Pq>,
    perm_bytes: usize,
}

/// Reorders one row in place over `layers` layers; writes one bit per pair.
fn reorder(row: &mut [f32], layers: usize, bits: &mut Vec<bool>) {
    let n = row.len();
    let mut tmp = vec![0.0f32; n];
    let mut seg = n;
    for _ in 0..layers {
        if seg < 2 {
            break;
        }
        for start in (0..n).step_by(seg) {
            let s = &mut row[start..(start + seg).min(n)];
            let half = s.len() / 2;
            for j in 0..half {
                let (a, b) = (s[2 * j], s[2 * j + 1]);
                let swap = a > b;
                bits.push(swap);
                tmp[j] = if swap { b } else { a };
                tmp[half + j] = if swap { a } else { b };
            }
            let odd = s.len() % 2 == 1;
            if odd {
                tmp[2 * half] = s[2 * half];
            }
            s.copy_from_slice(&tmp[..s.len()]);
        }
        seg /= 2;
    }
}

/// Inverse of `reorder` (bits in the order `reorder` wrote them).
fn restore(row: &mut [f32], layers: usize, bits: &[bool]) {
    // segment sizes and bit offsets per layer, undone last to first
    let mut plan = Vec::new();
    let (mut seg, mut at) = (row.len(), 0usize);
    for _ in 0..layers {
        if seg < 2 {
            break;
        }
        plan.push((seg, at));
        at += (0..row.len()).step_by(seg).map(|st| (seg.min(row.len() - st)) / 2).sum::<usize>();
        seg /= 2;
    }
    let n = row.len();
    let mut tmp = vec![0.0f32; n];
    for &(seg, mut at) in plan.iter().rev() {
        for start in (0..n).step_by(seg) {
            let s = &mut row[start..(start + seg).min(n)];
            let half = s.len() / 2;
            for j in 0..half {
                let (lo, hi) = (s[j], s[half + j]);
                let swap = bits[at + j];
                tmp[2 * j] = if swap { hi } else { lo };
                tmp[2 * j + 1] = if swap { lo } else { hi };
            }
            if s.len() % 2 == 1 {
                tmp[2 * half] = s[2 * half];
            }
            at += half;
            s.copy_from_slice(&tmp[..s.len()]);
        }
    }
}

impl Qet {
    /// `qet-B` over `channels` columns; `residual`: the second PQ stage.
    pub fn new(channels: usize, bits: u32, residual: bool, seed: u64) -> Result<Self> {
        let perm_bits = LAYERS as f64 * 0.5;
        if !(2..=8).contains(&bits) || channels < 8 {
            return Err(TqError::BadParams(format!("qet-{bits}: need 2..=8 bits and at least 8 channels")));
        }
        let pq_bits = bits as f64 - perm_bits;
        let (b1, b2) = if residual { (0.7 * pq_bits, 0.3 * pq_bits) } else { (pq_bits, 0.0) };
        let m1 = ((channels as f64 * b1 / 8.0).round() as usize).clamp(1, channels);
        let m2 = (channels as f64 * b2 / 8.0).round() as usize;
        let name = format!("qet-{bits}{}", if residual { "" } else { "-nores" });
        let stage1 = Pq::with_subspaces(&name, channels, m1, derive_seed(seed, 1), &[])?;
        let stage2 = if residual && m2 > 0 { Some(Pq::with_subspaces(&name, channels, m2.min(channels), derive_seed(seed, 2), &[])?) } else { None };
        let mut bits_per_row = 0;
        let mut seg = channels;
        for _ in 0..LAYERS {
            if seg < 2 {
                break;
            }
            bits_per_row += (0..channels).step_by(seg).map(|st| seg.min(channels - st) / 2).sum::<usize>();
            seg /= 2;
        }
        Ok(Self { name, channels, layers: LAYERS, stage1, stage2, perm_bytes: packed_len(bits_per_row, 1) })
    }

    fn row_size(&self) -> usize {
        self.perm_bytes + self.stage1.code_size() + self.stage2.as_ref().map_or(0, |p| p.code_size())
    }

    fn reordered(&self, m: &[f32]) -> (Vec<f32>, Vec<Vec<bool>>) {
        let mut r = m.to_vec();
        let bits = r
            .chunks_exact_mut(self.channels)
            .map(|row| {
                let mut b = Vec::new();
                reorder(row, self.layers, &mut b);
                b
            })
            .collect();
        (r, bits)
    }
}

impl MatrixCodec for Qet {
    fn name(&self) -> &str {
        &self.name
    }
    fn channels(&self) -> usize {
        self.channels
    }
    fn encoded_size(&self, tokens: usize) -> usize {
        tokens * self.row_size()
    }
    fn model_bytes(&self) -> usize {
        self.stage1.params().len() + self.stage2.as_ref().map_or(0, |p| p.params().len())
    }

    fn train(&mut self, m: &[f32]) -> Result<()> {
        crate::codec::check_vectors(m, self.channels)?;
        let (r, _) = self.reordered(m);
        self.stage1.train(&r)?;
        if let Some(s2) = &mut self.stage2 {
            let mut codes = vec![0u8; (r.len() / self.channels) * self.stage1.code_size()];
            self.stage1.encode_batch(&r, &mut codes)?;
            let mut dec = vec![0.0f32; r.len()];
            self.stage1.decode_batch(&codes, &mut dec)?;
            let resid: Vec<f32> = r.iter().zip(&dec).map(|(a, b)| a - b).collect();
            s2.train(&resid)?;
        }
        Ok(())
    }

    fn encode(&self, m: &[f32], out: &mut [u8]) -> Result<usize> {
        self.stage1.check_trained()?;
        crate::matrix::check_matrix_encodable(self, m)?;
        let t = m.len() / self.channels;
        if out.len() != self.encoded_size(t) {
            return Err(TqError::CodeSizeMismatch { expected: self.encoded_size(t), got: out.len() });
        }
        self.encode_unchecked(m, t, out);
        Ok(t)
    }

    fn encode_unchecked(&self, m: &[f32], _tokens: usize, out: &mut [u8]) {
        let (r, bits) = self.reordered(m);
        let (c1, rs) = (self.stage1.code_size(), self.row_size());
        let mut dec = vec![0.0f32; self.channels];
        for ((row, b), o) in r.chunks_exact(self.channels).zip(&bits).zip(out.chunks_exact_mut(rs)) {
            let idx: Vec<u8> = b.iter().map(|&x| x as u8).collect();
            crate::bitpack::pack(&idx, 1, &mut o[..self.perm_bytes]);
            self.stage1.encode_unchecked(row, &mut o[self.perm_bytes..self.perm_bytes + c1]);
            if let Some(s2) = &self.stage2 {
                self.stage1.decode_unchecked(&o[self.perm_bytes..self.perm_bytes + c1], &mut dec);
                let resid: Vec<f32> = row.iter().zip(&dec).map(|(a, b)| a - b).collect();
                s2.encode_unchecked(&resid, &mut o[self.perm_bytes + c1..]);
            }
        }
    }

    fn decode_unchecked(&self, code: &[u8], _tokens: usize, out: &mut [f32]) {
        let (c1, rs) = (self.stage1.code_size(), self.row_size());
        let mut extra = vec![0.0f32; self.channels];
        for (o, row) in code.chunks_exact(rs).zip(out.chunks_exact_mut(self.channels)) {
            self.stage1.decode_unchecked(&o[self.perm_bytes..self.perm_bytes + c1], row);
            if let Some(s2) = &self.stage2 {
                s2.decode_unchecked(&o[self.perm_bytes + c1..], &mut extra);
                row.iter_mut().zip(&extra).for_each(|(a, b)| *a += b);
            }
            let nbits = self.perm_bytes * 8;
            let mut idx = vec![0u8; nbits];
            crate::bitpack::unpack(&o[..self.perm_bytes], 1, &mut idx);
            let bits: Vec<bool> = idx.iter().map(|&x| x == 1).collect();
            restore(row, self.layers, &bits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reorder_then_restore_is_the_identity() {
        for n in [8usize, 9, 16, 50, 576] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
            // one layer puts every pair's minimum in the first half
            let mut one = row.clone();
            let mut b1 = Vec::new();
            reorder(&mut one, 1, &mut b1);
            assert_eq!(b1.len(), n / 2);
            for j in 0..n / 2 {
                assert!(one[j] <= one[n / 2 + j]);
            }
            let mut r = row.clone();
            let mut bits = Vec::new();
            reorder(&mut r, LAYERS, &mut bits);
            restore(&mut r, LAYERS, &bits);
            assert_eq!(r, row, "n = {n}");
        }
    }
}
