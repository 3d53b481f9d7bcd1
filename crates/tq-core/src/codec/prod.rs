//! TurboQuant_prod (Algorithm 2); `tq-prod-1` is QJL alone.

use std::sync::Arc;

use super::{norm_of, normalize, read_f32, with_scratch, Codec, CodecInfo, PreparedQuery};
use crate::bitpack::{pack, packed_len, unpack};
use crate::codebook::{LloydMax, SphereCoordinate};
use crate::error::{Result, TqError};
use crate::kernels::kernels;
use crate::rng::derive_seed;
use crate::rotation::{DenseMatrix, Rotation, RotationKind};

/// The QJL projection `S` of TurboQuant_prod, applied in the rotated domain
/// (`S Π` has the same law as `S` for both choices). Both use the estimator
/// constant `κ = 1/(dim · E|T|)` (E|T| the sphere's 1-bit centroid, → √(2/π)/√dim).
pub enum QjlProjection {
    /// The paper's `S` (i.i.d. N(0,1) entries) with each row normalized to unit
    /// length: signs are unchanged, and the estimator becomes unbiased for the
    /// fixed `S` in use, not only on average over `S` (with raw Gaussian rows one
    /// fixed `S` at dim 128 showed a 1.3% bias from its row-norm spread). `O(dim²)`.
    /// `D_prod = E γ² (1/(d² E|T|²) − 1/d²)` ≈ `E γ² · π/(2d)` (the paper's figure).
    Gaussian(Arc<DenseMatrix>),
    /// `S = R₂`, a second, independently seeded rotation of the codec's kind
    /// (orthogonal rows, `O(dim log dim)` with Hadamard). Lower variance:
    /// `D_prod = E γ² (1/(d² E|T|²) − 1/d)` ≈ `E γ² (π/2 − 1)/d`.
    Orthogonal(Rotation),
}

impl QjlProjection {
    fn project(&self, r: &mut [f32], tmp: &mut [f32]) {
        match self {
            QjlProjection::Gaussian(m) => {
                m.apply(r, tmp);
                r.copy_from_slice(tmp);
            }
            QjlProjection::Orthogonal(rot) => rot.rotate_in_place(r, tmp),
        }
    }
    fn project_t(&self, s: &mut [f32], tmp: &mut [f32]) {
        match self {
            QjlProjection::Gaussian(m) => {
                m.apply_t(s, tmp);
                s.copy_from_slice(tmp);
            }
            QjlProjection::Orthogonal(rot) => rot.unrotate_in_place(s, tmp),
        }
    }
}

/// TurboQuant_prod: `bits-1` bits of TurboQuant_mse, then a 1-bit QJL sketch
/// `s = sign(S r)` of the residual `r = u − û` and `γ = ‖r‖`;
/// `est⟨q,x⟩ = ‖x‖ (⟨Πq, c⟩ + γ·κ·⟨SΠq, s⟩)`, unbiased.
pub struct TurboQuantProd {
    info: CodecInfo,
    dim: usize,
    bits: u32,
    rotation: Rotation,
    qjl: QjlProjection,
    codebook: Option<Arc<LloydMax>>,
    qjl_scale: f32,
    packed_mse: usize,
    packed_sign: usize,
}

const SIGN_TABLE: [f32; 2] = [-1.0, 1.0];
/// Sub-seed purpose tag for the QJL projection.
const QJL_PURPOSE: u64 = 0x0051_4A4C;

impl TurboQuantProd {
    /// `orthogonal`: structured orthogonal projection instead of the paper's Gaussian one.
    pub fn new(dim: usize, bits: u32, seed: u64, rotation: RotationKind, orthogonal: bool) -> Result<Self> {
        if !(1..=8).contains(&bits) {
            return Err(TqError::UnsupportedBits(bits));
        }
        let qjl_seed = derive_seed(seed, QJL_PURPOSE);
        // the d×d projection is refused (before any allocation) above its limit
        let qjl = if orthogonal {
            QjlProjection::Orthogonal(Rotation::new(rotation, dim, qjl_seed)?)
        } else {
            QjlProjection::Gaussian(DenseMatrix::random_directions(dim, qjl_seed)?)
        };
        let codebook = if bits >= 2 { Some(LloydMax::get(dim, bits - 1)?) } else { None };
        let (packed_mse, packed_sign) = (packed_len(dim, bits - 1), packed_len(dim, 1));
        let code_size = packed_mse + packed_sign + if bits >= 2 { 8 } else { 4 };
        let name = format!("tq-prod-{bits}{}", if orthogonal { "-orth" } else { "" });
        let qjl_scale = (1.0 / (dim as f64 * SphereCoordinate::new(dim).mean_abs())) as f32;
        Ok(Self {
            info: CodecInfo::new(name, dim, seed, rotation, code_size),
            dim,
            bits,
            rotation: Rotation::new(rotation, dim, seed)?,
            qjl,
            codebook,
            qjl_scale,
            packed_mse,
            packed_sign,
        })
    }

    fn gamma(&self, code: &[u8]) -> f32 {
        if self.bits >= 2 {
            read_f32(code, self.packed_mse + self.packed_sign + 4)
        } else {
            1.0
        }
    }
}

impl Codec for TurboQuantProd {
    fn info(&self) -> &CodecInfo {
        &self.info
    }

    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]) {
        let k = kernels();
        with_scratch(self.dim, |y, tmp, idx| {
            y.copy_from_slice(x);
            self.rotation.rotate_in_place(y, tmp);
            let norm = norm_of(y);
            let (pm, ps) = (self.packed_mse, self.packed_sign);
            if norm > 0.0 {
                normalize(y, norm);
            }
            let mut gamma = 1.0;
            if let Some(cb) = &self.codebook {
                (k.quantize)(y, &cb.boundaries, self.bits - 1, idx);
                pack(idx, self.bits - 1, &mut code[..pm]);
                for (r, &i) in y.iter_mut().zip(idx.iter()) {
                    *r -= cb.centroids[i as usize];
                }
                gamma = norm_of(y);
            }
            self.qjl.project(y, tmp);
            for (s, &v) in idx.iter_mut().zip(y.iter()) {
                *s = (v > 0.0) as u8;
            }
            pack(idx, 1, &mut code[pm..pm + ps]);
            code[pm + ps..pm + ps + 4].copy_from_slice(&norm.to_le_bytes());
            if self.bits >= 2 {
                code[pm + ps + 4..pm + ps + 8].copy_from_slice(&gamma.to_le_bytes());
            }
        })
    }

    fn decode_unchecked(&self, code: &[u8], out: &mut [f32]) {
        let (pm, ps) = (self.packed_mse, self.packed_sign);
        with_scratch(self.dim, |v, tmp, idx| {
            unpack(&code[pm..pm + ps], 1, idx);
            for (o, &s) in v.iter_mut().zip(idx.iter()) {
                *o = SIGN_TABLE[s as usize];
            }
            self.qjl.project_t(v, tmp);
            let g = self.gamma(code) * self.qjl_scale;
            v.iter_mut().for_each(|e| *e *= g);
            if let Some(cb) = &self.codebook {
                unpack(&code[..pm], self.bits - 1, idx);
                for (o, &i) in v.iter_mut().zip(idx.iter()) {
                    *o += cb.centroids[i as usize];
                }
            }
            self.rotation.unrotate_in_place(v, tmp);
            let norm = read_f32(code, pm + ps);
            for (o, &e) in out.iter_mut().zip(v.iter()) {
                *o = e * norm;
            }
        })
    }

    fn prepare_unchecked(&self, q: &[f32]) -> PreparedQuery {
        let qr = self.rotation.rotate(q);
        let mut qs = qr.clone();
        let mut tmp = vec![0.0; self.dim];
        self.qjl.project(&mut qs, &mut tmp);
        PreparedQuery { parts: vec![qr, qs], norm_sq: (kernels().sum_sq)(q) }
    }

    fn score_ip(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let k = kernels();
        let (pm, ps) = (self.packed_mse, self.packed_sign);
        let mut s = 0.0;
        if let Some(cb) = &self.codebook {
            s = (k.dot_codes)(&q.parts[0], &code[..pm], self.bits - 1, &cb.centroids);
        }
        let sk = (k.dot_codes)(&q.parts[1], &code[pm..pm + ps], 1, &SIGN_TABLE);
        (s + self.gamma(code) * self.qjl_scale * sk) * read_f32(code, pm + ps)
    }

    /// ‖q‖² + ‖x‖² − 2·est⟨q,x⟩ with the stored (exact) norm: unbiased.
    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let norm = read_f32(code, self.packed_mse + self.packed_sign);
        q.norm_sq + norm * norm - 2.0 * self.score_ip(q, code)
    }
}
