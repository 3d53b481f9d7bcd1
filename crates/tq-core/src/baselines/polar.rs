//! PolarQuant (Han et al., 2025): random preconditioning, then a recursive
//! polar transform of blocks of 16 coordinates over 4 levels. Level 1 turns
//! each coordinate pair into a radius and an angle in (−π, π], uniformly
//! distributed after a random rotation (uniform quantizer = Lloyd–Max). Level
//! ℓ ≥ 2 turns pairs of radii into a radius and an angle ψ ∈ [0, π/2] whose
//! density is ∝ sin^(k−1)ψ·cos^(k−1)ψ for two independent χ_k radii (k =
//! 2^(ℓ−1)); each level has its Lloyd–Max codebook of that density. The last
//! radius of each block is stored as f16.
//!
//! `polar-B`: B bits for the level-1 angles and ⌈B/2⌉ for the other levels
//! (`polar-4` = 4, 2, 2, 2 bits: the paper's setting, 3.875 bits per value).
//! Dimensions are padded to a multiple of 16 with zeros.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use half::f16;

use crate::bitpack::{pack, packed_len, unpack};
use crate::codec::{Codec, CodecInfo, PreparedQuery};
use crate::error::{Result, TqError};
use crate::kernels::kernels;
use crate::rotation::{Rotation, RotationKind};

const BLOCK: usize = 16;
const LEVELS: usize = 4;

/// Lloyd–Max codebook (centroids, boundaries) of ψ ∈ [0, π/2] with density
/// ∝ (sin 2ψ)^(k−1), by Lloyd iterations on a fine grid (f64, deterministic).
fn angle_codebook(k: u32, bits: u32) -> Arc<(Vec<f32>, Vec<f32>)> {
    type Cache = Mutex<HashMap<(u32, u32), Arc<(Vec<f32>, Vec<f32>)>>>;
    static C: OnceLock<Cache> = OnceLock::new();
    let cache = C.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(c) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&(k, bits)) {
        return c.clone();
    }
    let n = 1usize << bits;
    let g = 20_000usize;
    let hi = std::f64::consts::FRAC_PI_2;
    let xs: Vec<f64> = (0..g).map(|i| (i as f64 + 0.5) * hi / g as f64).collect();
    let w: Vec<f64> = xs.iter().map(|&x| (2.0 * x).sin().powi(k as i32 - 1)).collect();
    // start from equal-mass cells
    let total: f64 = w.iter().sum();
    let mut bnd: Vec<f64> = Vec::with_capacity(n - 1);
    let mut acc = 0.0;
    for (x, wi) in xs.iter().zip(&w) {
        acc += wi;
        if bnd.len() < n - 1 && acc >= total * (bnd.len() + 1) as f64 / n as f64 {
            bnd.push(*x);
        }
    }
    while bnd.len() < n - 1 {
        bnd.push(hi);
    }
    let mut cen = vec![0.0f64; n];
    for _ in 0..300 {
        let (mut s, mut m) = (vec![0.0f64; n], vec![0.0f64; n]);
        for (x, wi) in xs.iter().zip(&w) {
            let c = bnd.partition_point(|b| b < x);
            s[c] += x * wi;
            m[c] += wi;
        }
        for c in 0..n {
            let lo = if c == 0 { 0.0 } else { bnd[c - 1] };
            let up = if c == n - 1 { hi } else { bnd[c] };
            cen[c] = if m[c] > 0.0 { s[c] / m[c] } else { 0.5 * (lo + up) };
        }
        for c in 0..n - 1 {
            bnd[c] = 0.5 * (cen[c] + cen[c + 1]);
        }
    }
    let cb = Arc::new((cen.iter().map(|&v| v as f32).collect(), bnd.iter().map(|&v| v as f32).collect()));
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert((k, bits), cb.clone());
    cb
}

/// The PolarQuant codec `polar-B` (see the module docs).
pub struct Polar {
    info: CodecInfo,
    dim: usize,
    rotation: Rotation,
    bits: [u32; LEVELS],
    blocks: usize,
    /// Level ≥ 2 codebooks (centroids, boundaries).
    books: Vec<Arc<(Vec<f32>, Vec<f32>)>>,
    /// Byte offset of each level's packed indices, and of the radii.
    offsets: [usize; LEVELS + 1],
    /// Per level, (cos, sin) of every codebook angle (decoding without trig calls).
    trig: Vec<Vec<(f32, f32)>>,
}

impl Polar {
    /// PolarQuant at `b` bits (2..=8) for level-1 angles, after the seeded `rotation`.
    pub fn new(dim: usize, b: u32, seed: u64, rotation: RotationKind) -> Result<Self> {
        if !(2..=8).contains(&b) {
            return Err(TqError::UnsupportedBits(b));
        }
        let hi = b.div_ceil(2);
        let bits = [b, hi, hi, hi];
        let blocks = dim.div_ceil(BLOCK);
        let mut offsets = [0usize; LEVELS + 1];
        for l in 0..LEVELS {
            let count = blocks * (BLOCK >> (l + 1));
            offsets[l + 1] = offsets[l] + packed_len(count, bits[l]);
        }
        let books: Vec<Arc<(Vec<f32>, Vec<f32>)>> = (1..LEVELS).map(|l| angle_codebook(1 << l, bits[l])).collect();
        let n1 = 1u32 << bits[0];
        let mut trig = vec![(0..n1)
            .map(|q| {
                let a = -std::f32::consts::PI + (q as f32 + 0.5) * (2.0 * std::f32::consts::PI / n1 as f32);
                (a.cos(), a.sin())
            })
            .collect::<Vec<_>>()];
        for book in &books {
            trig.push(book.0.iter().map(|a| (a.cos(), a.sin())).collect());
        }
        let rotation = Rotation::new(rotation, dim, seed)?;
        // The f16 radius of a rotated 16-block is finite up to 65,504, and is at
        // most `‖x‖ <= √dim·max|x|`.
        let safe_abs = (65504.0 / (dim as f64).sqrt() * 0.99) as f32;
        let code_size = offsets[LEVELS] + 2 * blocks;
        let info = CodecInfo::new(format!("polar-{b}"), dim, seed, rotation.kind(), code_size).with_safe_abs(safe_abs);
        Ok(Self { info, dim, rotation, bits, blocks, books, offsets, trig })
    }

    /// Rotated, zero-padded coordinates of a decoded code.
    fn decode_rotated(&self, code: &[u8]) -> Vec<f32> {
        let mut radii: Vec<f32> = (0..self.blocks)
            .map(|bk| {
                let at = self.offsets[LEVELS] + 2 * bk;
                f16::from_le_bytes([code[at], code[at + 1]]).to_f32()
            })
            .collect();
        for l in (0..LEVELS).rev() {
            let per = BLOCK >> (l + 1); // angles per block at this level
            let count = self.blocks * per;
            let mut idx = vec![0u8; count];
            unpack(&code[self.offsets[l]..self.offsets[l + 1]], self.bits[l], &mut idx);
            let mut next = vec![0.0f32; 2 * count];
            for (i, &q) in idx.iter().enumerate() {
                let r = radii[i];
                let (c, s) = self.trig[l][q as usize];
                next[2 * i] = r * c;
                next[2 * i + 1] = r * s;
            }
            radii = next;
        }
        radii
    }
}

impl Codec for Polar {
    fn info(&self) -> &CodecInfo {
        &self.info
    }

    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]) {
        let mut y = self.rotation.rotate(x);
        y.resize(self.blocks * BLOCK, 0.0);
        let mut vals = y;
        for l in 0..LEVELS {
            let count = vals.len() / 2;
            let mut idx = vec![0u8; count];
            let mut radii = vec![0.0f32; count];
            for i in 0..count {
                let (a, b) = (vals[2 * i], vals[2 * i + 1]);
                radii[i] = a.hypot(b);
                idx[i] = if l == 0 {
                    let n = (1u32 << self.bits[0]) as f32;
                    let t = (b.atan2(a) + std::f32::consts::PI) / (2.0 * std::f32::consts::PI) * n;
                    (t.floor() as i64).clamp(0, n as i64 - 1) as u8
                } else {
                    let psi = b.atan2(a);
                    self.books[l - 1].1.partition_point(|&bd| bd < psi) as u8
                };
            }
            pack(&idx, self.bits[l], &mut code[self.offsets[l]..self.offsets[l + 1]]);
            vals = radii;
        }
        for (bk, r) in vals.iter().enumerate() {
            let at = self.offsets[LEVELS] + 2 * bk;
            code[at..at + 2].copy_from_slice(&f16::from_f32(*r).to_le_bytes());
        }
    }

    fn decode_unchecked(&self, code: &[u8], out: &mut [f32]) {
        let y = self.decode_rotated(code);
        out.copy_from_slice(&y[..self.dim]);
        let mut tmp = vec![0.0f32; self.dim];
        self.rotation.unrotate_in_place(out, &mut tmp);
    }

    fn prepare_unchecked(&self, q: &[f32]) -> PreparedQuery {
        PreparedQuery { parts: vec![self.rotation.rotate(q)], norm_sq: (kernels().sum_sq)(q) }
    }

    fn score_ip(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let y = self.decode_rotated(code);
        (kernels().dot)(&q.parts[0], &y[..self.dim])
    }

    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let y = self.decode_rotated(code);
        let k = kernels();
        q.norm_sq - 2.0 * (k.dot)(&q.parts[0], &y[..self.dim]) + (k.sum_sq)(&y[..self.dim])
    }
}
