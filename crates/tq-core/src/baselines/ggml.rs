//! llama.cpp's `q8_0` and `q4_0` block formats (blocks of 32 values, one f16
//! scale each: 8.5 and 4.5 bits per value), optionally after the codec's
//! seeded Hadamard rotation (`q8_0-rot`, `q4_0-rot`, as llama.cpp's rotated
//! KV cache). Quantization follows ggml's reference code exactly:
//! - q8_0: `d = amax/127`, `q = round(x/d)` (half away from zero), stored `f16(d)`;
//! - q4_0: `d = m/−8` with `m` the value of largest magnitude, `q = min(15,
//!   trunc(x/d + 8.5))`, byte `j` = `q_j | q_{j+16} << 4`, decoded `(q − 8)·f16(d)`.
//!
//! A last partial block is padded with zeros. Scores are computed from the
//! integer codes and block scales without decoding.

use half::f16;

use crate::codec::{Codec, CodecInfo, PreparedQuery};
use crate::error::Result;
use crate::kernels::kernels;
use crate::rotation::{Rotation, RotationKind};

/// Values per ggml block.
pub const QK: usize = 32;

/// Which llama.cpp block format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// `q8_0`: 8-bit values and an f16 scale per block (8.5 bits per value).
    Q8_0,
    /// `q4_0`: 4-bit values and an f16 scale per block (4.5 bits per value).
    Q4_0,
}

impl GgmlType {
    /// Bytes per block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::Q8_0 => 2 + QK,
            GgmlType::Q4_0 => 2 + QK / 2,
        }
    }
}

/// Quantizes one block of 32 values (ggml reference), returning the block bytes.
pub fn quantize_block(t: GgmlType, x: &[f32; QK], out: &mut [u8]) {
    match t {
        GgmlType::Q8_0 => {
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for (o, &v) in out[2..2 + QK].iter_mut().zip(x) {
                *o = ((v * id).round() as i8) as u8;
            }
        }
        GgmlType::Q4_0 => {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for &v in x {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for j in 0..QK / 2 {
                let x0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
                let x1 = ((x[QK / 2 + j] * id + 8.5) as i8).min(15) as u8;
                out[2 + j] = x0 | (x1 << 4);
            }
        }
    }
}

/// Decodes one block.
pub fn dequantize_block(t: GgmlType, b: &[u8], out: &mut [f32; QK]) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    match t {
        GgmlType::Q8_0 => {
            for (o, &q) in out.iter_mut().zip(&b[2..2 + QK]) {
                *o = (q as i8) as f32 * d;
            }
        }
        GgmlType::Q4_0 => {
            for j in 0..QK / 2 {
                out[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                out[QK / 2 + j] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }
    }
}

/// The `q8_0` / `q4_0` codecs, optionally after a seeded rotation (`-rot`).
pub struct Ggml {
    info: CodecInfo,
    dim: usize,
    t: GgmlType,
    rotation: Option<Rotation>,
    blocks: usize,
}

impl Ggml {
    /// A ggml codec for `dim`-vectors; `rotated` applies the `rotation` of `seed` first.
    pub fn new(dim: usize, t: GgmlType, rotated: bool, seed: u64, rotation: RotationKind) -> Result<Self> {
        let base = match t {
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4_0 => "q4_0",
        };
        let rotation = if rotated { Some(Rotation::new(rotation, dim, seed)?) } else { None };
        let blocks = dim.div_ceil(QK);
        // The f16 block scale (`amax/127` for q8_0, `max/−8` for q4_0) is finite
        // up to 65,504; after a rotation a coordinate is at most `‖x‖ <= √dim·max|x|`.
        let amax = 65504.0 * if t == GgmlType::Q8_0 { 127.0 } else { 8.0 };
        let safe_abs = if rotated { (amax / (dim as f64).sqrt() * 0.99) as f32 } else { amax as f32 };
        let kind = rotation.as_ref().map_or(RotationKind::Hadamard, |r| r.kind());
        let name = format!("{base}{}", if rotated { "-rot" } else { "" });
        Ok(Self { info: CodecInfo::new(name, dim, seed, kind, blocks * t.block_bytes()).with_safe_abs(safe_abs), dim, t, rotation, blocks })
    }

    fn rotated(&self, x: &[f32]) -> Vec<f32> {
        match &self.rotation {
            Some(r) => r.rotate(x),
            None => x.to_vec(),
        }
    }

    fn blocks_of(&self, y: &[f32]) -> impl Iterator<Item = [f32; QK]> + '_ {
        let y = y.to_vec();
        (0..self.blocks).map(move |b| {
            let mut blk = [0.0f32; QK];
            let end = (b * QK + QK).min(self.dim);
            blk[..end - b * QK].copy_from_slice(&y[b * QK..end]);
            blk
        })
    }
}

impl Codec for Ggml {
    fn info(&self) -> &CodecInfo {
        &self.info
    }

    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]) {
        let y = self.rotated(x);
        let bb = self.t.block_bytes();
        for (blk, out) in self.blocks_of(&y).zip(code.chunks_exact_mut(bb)) {
            quantize_block(self.t, &blk, out);
        }
    }

    fn decode_unchecked(&self, code: &[u8], out: &mut [f32]) {
        let mut y = vec![0.0f32; self.blocks * QK];
        let mut blk = [0.0f32; QK];
        for (b, bytes) in code.chunks_exact(self.t.block_bytes()).enumerate() {
            dequantize_block(self.t, bytes, &mut blk);
            y[b * QK..(b + 1) * QK].copy_from_slice(&blk);
        }
        out.copy_from_slice(&y[..self.dim]);
        if let Some(r) = &self.rotation {
            let mut tmp = vec![0.0f32; self.dim];
            r.unrotate_in_place(out, &mut tmp);
        }
    }

    fn prepare_unchecked(&self, q: &[f32]) -> PreparedQuery {
        let mut y = self.rotated(q);
        y.resize(self.blocks * QK, 0.0);
        PreparedQuery { parts: vec![y], norm_sq: (kernels().sum_sq)(q) }
    }

    fn score_ip(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let y = &q.parts[0];
        let mut s = 0.0f32;
        for (b, bytes) in code.chunks_exact(self.t.block_bytes()).enumerate() {
            let d = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
            let qy = &y[b * QK..(b + 1) * QK];
            let mut acc = 0.0f32;
            match self.t {
                GgmlType::Q8_0 => {
                    for (&c, &v) in bytes[2..].iter().zip(qy) {
                        acc += (c as i8) as f32 * v;
                    }
                }
                GgmlType::Q4_0 => {
                    for j in 0..QK / 2 {
                        let c = bytes[2 + j];
                        acc += ((c & 0x0F) as i32 - 8) as f32 * qy[j] + ((c >> 4) as i32 - 8) as f32 * qy[QK / 2 + j];
                    }
                }
            }
            s += d * acc;
        }
        s
    }

    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let mut x = vec![0.0f32; self.dim];
        self.decode_unchecked(code, &mut x);
        let xx = (kernels().sum_sq)(&x);
        q.norm_sq - 2.0 * self.score_ip(q, code) + xx
    }
}
