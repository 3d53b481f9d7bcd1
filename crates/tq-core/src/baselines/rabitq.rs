//! RaBitQ (Gao & Long, SIGMOD 2024) and extended RaBitQ (Gao et al., 2024).
//!
//! With centre `c` (the training mean; zero untrained) and rotation `P`:
//! `v = x − c`, `r = ‖v‖`, `o = P v / r`. Each coordinate is quantized to
//! `y_i = ±(k_i + ½)`, `k_i ∈ {0 … 2^(B−1) − 1}` with the sign of `o_i`
//! (1 bit: `y = sign(o)/2`). For B ≥ 2 the magnitudes are `min(⌊t·|o_i|⌋, K)`
//! for the rescale factor `t` that maximizes `⟨ō, o⟩` (`ō = y/‖y‖`), found
//! exactly by sweeping every breakpoint `t = j/|o_i|` in increasing order.
//!
//! Estimator (unbiased for a random rotation): `⟨q, v⟩ ≈ r·⟨Pq, ō⟩/⟨ō, o⟩
//! = F·⟨Pq, y⟩` with the per-vector factor `F = r/⟨y, o⟩`.
//! Code: `[B·dim bits: u_i = y_i + (2^B − 1)/2][f32 F][f32 r]`.
//! `decode` returns `c + F·Pᵀy`, the vector whose inner products are the
//! estimator (as for TurboQuant_prod).

use std::collections::BinaryHeap;

use crate::bitpack::{pack, packed_len, unpack};
use crate::codec::{check_vectors, Codec, CodecInfo, FastScanCodec, PreparedQuery};
use crate::error::{Result, TqError};
use crate::kernels::kernels;
use crate::rotation::{Rotation, RotationKind};

use super::{bytes_to_f32s, f32s_to_bytes, read_f32};

/// The RaBitQ codec `rabitq-B` (B = 1: RaBitQ, B ≥ 2: extended RaBitQ).
pub struct RaBitQ {
    info: CodecInfo,
    dim: usize,
    bits: u32,
    rotation: Rotation,
    center: Vec<f32>,
    trained: bool,
    packed: usize,
    /// `u − (2^B − 1)/2` for every code value `u`.
    levels: Vec<f32>,
}

#[derive(PartialEq)]
struct Event {
    t: f32,
    i: usize,
}
impl Eq for Event {}
impl Ord for Event {
    // min-heap on (t, i)
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.t.total_cmp(&self.t).then(o.i.cmp(&self.i))
    }
}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl RaBitQ {
    /// RaBitQ at `bits` (1..=8); `params`: the stored centre (`dim` f32), or empty for the origin.
    pub fn new(dim: usize, bits: u32, seed: u64, rotation: RotationKind, params: &[u8]) -> Result<Self> {
        if !(1..=8).contains(&bits) {
            return Err(TqError::UnsupportedBits(bits));
        }
        let (center, trained) = if params.is_empty() {
            (vec![0.0; dim], false)
        } else if params.len() == 4 * dim {
            let c = bytes_to_f32s(params);
            if c.iter().any(|v| !v.is_finite()) {
                return Err(TqError::BadParams("RaBitQ centre is not finite".into()));
            }
            (c, true)
        } else {
            return Err(TqError::BadParams(format!("RaBitQ centre has {} bytes, expected {}", params.len(), 4 * dim)));
        };
        let half = ((1u32 << bits) - 1) as f32 / 2.0;
        let rotation = Rotation::new(rotation, dim, seed)?;
        let info = CodecInfo::new(format!("rabitq-{bits}"), dim, seed, rotation.kind(), packed_len(dim, bits) + 8).trained();
        Ok(Self { info, dim, bits, rotation, center, trained, packed: packed_len(dim, bits), levels: (0..1u32 << bits).map(|u| u as f32 - half).collect() })
    }

    /// Magnitude steps `k_i` maximizing `⟨y, |o|⟩/‖y‖`; returns `⟨y, |o|⟩`.
    fn search(&self, a: &[f32], k: &mut [u32]) -> f32 {
        let kmax = (1u32 << (self.bits - 1)) - 1;
        k.iter_mut().for_each(|v| *v = 0);
        let mut num: f64 = a.iter().map(|&v| 0.5 * v as f64).sum();
        if kmax == 0 {
            return num as f32;
        }
        let mut den = 0.25 * self.dim as f64;
        let mut best = (num / den.sqrt(), 0usize);
        let mut heap: BinaryHeap<Event> = a.iter().enumerate().filter(|(_, &v)| v > 0.0).map(|(i, &v)| Event { t: 1.0 / v, i }).collect();
        let mut steps = 0usize;
        let mut cur = vec![0u32; self.dim];
        while let Some(Event { i, .. }) = heap.pop() {
            let kk = cur[i];
            cur[i] = kk + 1;
            num += a[i] as f64;
            den += 2.0 * kk as f64 + 2.0;
            steps += 1;
            let ratio = num / den.sqrt();
            if ratio > best.0 {
                best = (ratio, steps);
            }
            if kk + 1 < kmax {
                heap.push(Event { t: (kk + 2) as f32 / a[i], i });
            }
        }
        // replay the sweep up to the best step (same order: deterministic)
        let mut heap: BinaryHeap<Event> = a.iter().enumerate().filter(|(_, &v)| v > 0.0).map(|(i, &v)| Event { t: 1.0 / v, i }).collect();
        for _ in 0..best.1 {
            let Event { i, .. } = heap.pop().expect("replay");
            k[i] += 1;
            if k[i] < kmax {
                heap.push(Event { t: (k[i] + 1) as f32 / a[i], i });
            }
        }
        k.iter().zip(a).map(|(&kk, &v)| (kk as f64 + 0.5) * v as f64).sum::<f64>() as f32
    }

    fn factors(&self, code: &[u8]) -> (f32, f32) {
        (read_f32(code, self.packed), read_f32(code, self.packed + 4))
    }

    /// `⟨qr, y⟩` for a rotated query.
    fn ip_y(&self, qr: &[f32], code: &[u8]) -> f32 {
        (kernels().dot_codes)(qr, &code[..self.packed], self.bits, &self.levels)
    }
}

impl Codec for RaBitQ {
    fn info(&self) -> &CodecInfo {
        &self.info
    }
    /// Bits 1, 2 and 4: whole levels per nibble, `[levels][f32 F][f32 r]`.
    fn fastscan(&self) -> Option<&dyn FastScanCodec> {
        matches!(self.bits, 1 | 2 | 4).then_some(self as &dyn FastScanCodec)
    }
    fn params(&self) -> Vec<u8> {
        if self.trained {
            f32s_to_bytes(&self.center)
        } else {
            Vec::new()
        }
    }
    /// The centre is the mean of the sample.
    fn train(&mut self, sample: &[f32]) -> Result<()> {
        check_vectors(sample, self.dim)?;
        let n = (sample.len() / self.dim) as f64;
        let mut c = vec![0.0f64; self.dim];
        for v in sample.chunks_exact(self.dim) {
            for (s, &x) in c.iter_mut().zip(v) {
                *s += x as f64;
            }
        }
        self.center = c.iter().map(|s| (s / n) as f32).collect();
        self.trained = true;
        Ok(())
    }

    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]) {
        let d = self.dim;
        let mut v: Vec<f32> = x.iter().zip(&self.center).map(|(a, c)| a - c).collect();
        let r = (v.iter().map(|&t| t as f64 * t as f64).sum::<f64>()).sqrt() as f32;
        let mut tmp = vec![0.0f32; d];
        let mut u = vec![0u8; d];
        let half = (1u32 << (self.bits - 1)) as u8; // first non-negative level
        let f = if r > 0.0 {
            self.rotation.rotate_in_place(&mut v, &mut tmp);
            let inv = 1.0 / r;
            let a: Vec<f32> = v.iter().map(|&t| (t * inv).abs()).collect();
            let mut k = vec![0u32; d];
            let num = self.search(&a, &mut k);
            for ((o, &t), &kk) in u.iter_mut().zip(&v).zip(&k) {
                *o = if t >= 0.0 { half + kk as u8 } else { half - 1 - kk as u8 };
            }
            if num > 0.0 {
                r / num
            } else {
                0.0
            }
        } else {
            u.iter_mut().for_each(|o| *o = half);
            0.0
        };
        pack(&u, self.bits, &mut code[..self.packed]);
        code[self.packed..self.packed + 4].copy_from_slice(&f.to_le_bytes());
        code[self.packed + 4..self.packed + 8].copy_from_slice(&r.to_le_bytes());
    }

    fn decode_unchecked(&self, code: &[u8], out: &mut [f32]) {
        let mut u = vec![0u8; self.dim];
        unpack(&code[..self.packed], self.bits, &mut u);
        let (f, _) = self.factors(code);
        for (o, &uu) in out.iter_mut().zip(&u) {
            *o = self.levels[uu as usize] * f;
        }
        let mut tmp = vec![0.0f32; self.dim];
        self.rotation.unrotate_in_place(out, &mut tmp);
        for (o, &c) in out.iter_mut().zip(&self.center) {
            *o += c;
        }
    }

    fn prepare_unchecked(&self, q: &[f32]) -> PreparedQuery {
        let k = kernels();
        let qc: Vec<f32> = q.iter().zip(&self.center).map(|(a, c)| a - c).collect();
        let consts = vec![(k.dot)(q, &self.center), (k.sum_sq)(&qc)];
        PreparedQuery { parts: vec![self.rotation.rotate(q), self.rotation.rotate(&qc), consts], norm_sq: (k.sum_sq)(q) }
    }

    fn score_ip(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let (f, _) = self.factors(code);
        q.parts[2][0] + f * self.ip_y(&q.parts[0], code)
    }

    /// `‖q − c‖² − 2·est⟨q − c, v⟩ + r²`.
    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let (f, r) = self.factors(code);
        q.parts[2][1] - 2.0 * f * self.ip_y(&q.parts[1], code) + r * r
    }
}

impl FastScanCodec for RaBitQ {
    fn fastscan_m(&self) -> usize {
        2 * self.packed
    }

    /// Up to the per-query constant `⟨q, c⟩`: tables of `q'_j · y_j`.
    fn fastscan_tables(&self, q: &PreparedQuery) -> Vec<f32> {
        crate::codec::nibble_tables(&q.parts[0], self.bits, &self.levels)
    }

    fn fastscan_factor(&self, code: &[u8]) -> f32 {
        self.factors(code).0
    }
}
