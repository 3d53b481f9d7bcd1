//! FP4 formats: E2M1 elements (magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, round
//! to nearest with ties to even, saturating at 6) with
//! - `mxfp4`: blocks of 32 sharing an E8M0 scale `2^(⌊log₂ amax⌋ − 2)`
//!   (4.25 bits per value);
//! - `nvfp4`: blocks of 16 with an E4M3 scale `amax_block / 6 / g` and one f32
//!   scale `g = amax / (448·6)` per vector (the "tensor"), so 4.5 bits per
//!   value plus 32 bits per vector.
//!
//! Layouts: mxfp4 block = `[u8 E8M0][16 bytes: element 2j low nibble, 2j+1 high]`;
//! nvfp4 code = `[blocks: u8 E4M3 + 8 bytes][f32 g]`. Element nibble = sign bit
//! 3 | magnitude index 0..7. A last partial block is padded with zeros.

use crate::codec::{Codec, CodecInfo, PreparedQuery};
use crate::error::Result;
use crate::kernels::kernels;
use crate::rotation::RotationKind;

use super::read_f32;

/// E2M1 magnitudes by code.
pub const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Nearest entry of an increasing table, ties to the even index; values above
/// the last entry saturate to it.
fn nearest_even(table: &[f32], x: f32) -> usize {
    let i = table.partition_point(|&v| v < x);
    if i == 0 {
        return 0;
    }
    if i == table.len() {
        return table.len() - 1;
    }
    let (lo, hi) = (x as f64 - table[i - 1] as f64, table[i] as f64 - x as f64);
    if lo < hi || (lo == hi && (i - 1) % 2 == 0) {
        i - 1
    } else {
        i
    }
}

/// E2M1 nibble of `x` (sign in bit 3).
pub fn e2m1_encode(x: f32) -> u8 {
    let m = nearest_even(&E2M1, x.abs()) as u8;
    if x.is_sign_negative() && m != 0 {
        m | 8
    } else {
        m
    }
}

/// The value of an E2M1 nibble (sign in bit 3, magnitude index in bits 0..=2).
pub fn e2m1_decode(c: u8) -> f32 {
    let v = E2M1[(c & 7) as usize];
    if c & 8 != 0 {
        -v
    } else {
        v
    }
}

/// The 127 finite non-negative E4M3 values by code (0x00..=0x7E).
fn e4m3_table() -> &'static [f32; 127] {
    static T: std::sync::OnceLock<[f32; 127]> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0.0f32; 127];
        for (c, v) in t.iter_mut().enumerate() {
            let (e, m) = ((c >> 3) as i32, (c & 7) as f32);
            *v = if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) };
        }
        t
    })
}

/// E4M3 code of a non-negative `x` (nearest, ties to even, saturating at 448).
pub fn e4m3_encode(x: f32) -> u8 {
    nearest_even(e4m3_table(), x.max(0.0)) as u8
}

/// The non-negative value of an E4M3 code (the sign bit is ignored; 0x7F reads as 448).
pub fn e4m3_decode(c: u8) -> f32 {
    e4m3_table()[(c & 0x7F).min(126) as usize]
}

/// E8M0 code of the MX scale of a block with largest magnitude `amax`.
pub fn e8m0_for(amax: f32) -> u8 {
    if amax == 0.0 {
        return 0;
    }
    // ⌊log₂ amax⌋ exactly, subnormals included
    let e = if amax.is_normal() { ((amax.to_bits() >> 23) & 0xFF) as i32 - 127 } else { -127 - (amax.to_bits().leading_zeros() as i32 - 9) };
    ((e - 2).clamp(-127, 127) + 127) as u8
}

/// The scale `2^(c − 127)` of an E8M0 code.
pub fn e8m0_decode(c: u8) -> f32 {
    2f64.powi(c as i32 - 127) as f32
}

/// Which FP4 block-scale format (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp4Kind {
    /// `mxfp4`: blocks of 32 with an E8M0 scale.
    Mx,
    /// `nvfp4`: blocks of 16 with an E4M3 scale, plus one f32 scale per vector.
    Nv,
}

impl Fp4Kind {
    fn block(self) -> usize {
        match self {
            Fp4Kind::Mx => 32,
            Fp4Kind::Nv => 16,
        }
    }
}

/// The `mxfp4` / `nvfp4` codec (no rotation, no training).
pub struct Fp4 {
    info: CodecInfo,
    dim: usize,
    kind: Fp4Kind,
    blocks: usize,
}

impl Fp4 {
    /// An FP4 codec for `dim`-vectors; the last partial block is zero-padded.
    pub fn new(dim: usize, kind: Fp4Kind, seed: u64) -> Result<Self> {
        let name = match kind {
            Fp4Kind::Mx => "mxfp4",
            Fp4Kind::Nv => "nvfp4",
        };
        let blocks = dim.div_ceil(kind.block());
        let code_size = blocks * (1 + kind.block() / 2) + if kind == Fp4Kind::Nv { 4 } else { 0 };
        Ok(Self { info: CodecInfo::new(name, dim, seed, RotationKind::Hadamard, code_size), dim, kind, blocks })
    }

    fn block_bytes(&self) -> usize {
        1 + self.kind.block() / 2
    }

    /// Per-block scales (decoded) and element nibbles of a code.
    fn scales(&self, code: &[u8]) -> Vec<f32> {
        let g = match self.kind {
            Fp4Kind::Mx => 1.0,
            Fp4Kind::Nv => read_f32(code, self.blocks * self.block_bytes()),
        };
        (0..self.blocks)
            .map(|b| {
                let c = code[b * self.block_bytes()];
                match self.kind {
                    Fp4Kind::Mx => e8m0_decode(c),
                    Fp4Kind::Nv => e4m3_decode(c) * g,
                }
            })
            .collect()
    }

    fn element(&self, code: &[u8], j: usize) -> f32 {
        let bs = self.kind.block();
        let (b, i) = (j / bs, j % bs);
        let byte = code[b * self.block_bytes() + 1 + i / 2];
        e2m1_decode(if i % 2 == 0 { byte & 0x0F } else { byte >> 4 })
    }
}

impl Codec for Fp4 {
    fn info(&self) -> &CodecInfo {
        &self.info
    }

    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]) {
        code.iter_mut().for_each(|c| *c = 0);
        let bs = self.kind.block();
        let bb = self.block_bytes();
        let g = match self.kind {
            Fp4Kind::Mx => 1.0,
            Fp4Kind::Nv => x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / (448.0 * 6.0),
        };
        for b in 0..self.blocks {
            let blk = &x[b * bs..((b + 1) * bs).min(self.dim)];
            let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let (sc, scale) = match self.kind {
                Fp4Kind::Mx => {
                    let c = e8m0_for(amax);
                    (c, e8m0_decode(c))
                }
                Fp4Kind::Nv => {
                    if g > 0.0 {
                        let c = e4m3_encode(amax / 6.0 / g);
                        (c, e4m3_decode(c) * g)
                    } else {
                        (0, 0.0)
                    }
                }
            };
            code[b * bb] = sc;
            for (i, &v) in blk.iter().enumerate() {
                let e = if scale > 0.0 { e2m1_encode(v / scale) } else { 0 };
                code[b * bb + 1 + i / 2] |= if i % 2 == 0 { e } else { e << 4 };
            }
        }
        if self.kind == Fp4Kind::Nv {
            let at = self.blocks * bb;
            code[at..at + 4].copy_from_slice(&g.to_le_bytes());
        }
    }

    fn decode_unchecked(&self, code: &[u8], out: &mut [f32]) {
        let s = self.scales(code);
        let bs = self.kind.block();
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.element(code, j) * s[j / bs];
        }
    }

    fn prepare_unchecked(&self, q: &[f32]) -> PreparedQuery {
        PreparedQuery { parts: vec![q.to_vec()], norm_sq: (kernels().sum_sq)(q) }
    }

    fn score_ip(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let s = self.scales(code);
        let bs = self.kind.block();
        let q = &q.parts[0];
        let mut total = 0.0f32;
        for (b, &sc) in s.iter().enumerate() {
            let mut acc = 0.0f32;
            let end = ((b + 1) * bs).min(self.dim);
            for (j, &qj) in q.iter().enumerate().take(end).skip(b * bs) {
                acc += self.element(code, j) * qj;
            }
            total += sc * acc;
        }
        total
    }

    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let mut x = vec![0.0f32; self.dim];
        self.decode_unchecked(code, &mut x);
        q.norm_sq - 2.0 * self.score_ip(q, code) + (kernels().sum_sq)(&x)
    }
}
