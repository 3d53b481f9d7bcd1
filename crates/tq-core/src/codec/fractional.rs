//! Fractional rates by an outlier-channel split.

use super::{check_vectors, with_split, Codec, CodecInfo, PreparedQuery, TurboQuantMse};
use crate::error::{Result, TqError};
use crate::kernels::kernels;
use crate::rng::derive_seed;
use crate::rotation::RotationKind;

/// `tq-mse-2.5` / `tq-mse-3.5`: two independent TurboQuant_mse instances over a
/// channel split: `dim/2` *outlier* channels at `hi` bits, the rest at `lo` bits
/// (2.5 = 3+2, 3.5 = 4+3 on average, before the two f32 norms).
///
/// Outlier rule: the `dim/2` channels with the largest mean square over the
/// training sample (the first vectors of the stream; ties to the lower channel
/// index), fixed for the whole stream and stored with the codes (`params`).
/// Untrained, the outliers are channels `0..dim/2`.
pub struct TurboQuantFractional {
    info: CodecInfo,
    dim: usize,
    hi: TurboQuantMse,
    lo: TurboQuantMse,
    outliers: Vec<u32>,
    rest: Vec<u32>,
}

impl TurboQuantFractional {
    /// The split codec `name` with `hi_bits` on `dim/2` outlier channels and `lo_bits` on the rest (`dim >= 4`).
    pub fn new(name: &str, dim: usize, hi_bits: u32, lo_bits: u32, seed: u64, rotation: RotationKind) -> Result<Self> {
        if dim < 4 {
            return Err(TqError::BadDim(dim, 4));
        }
        let n_out = dim / 2;
        let hi = TurboQuantMse::new(n_out, hi_bits, derive_seed(seed, 1), rotation, false)?;
        let lo = TurboQuantMse::new(dim - n_out, lo_bits, derive_seed(seed, 2), rotation, false)?;
        let info = CodecInfo::new(name, dim, seed, hi.rotation_kind(), hi.code_size() + lo.code_size()).trained();
        let mut c = Self { info, dim, hi, lo, outliers: Vec::new(), rest: Vec::new() };
        c.set_outliers((0..n_out as u32).collect());
        Ok(c)
    }

    fn set_outliers(&mut self, mut outliers: Vec<u32>) {
        outliers.sort_unstable();
        let mut is_out = vec![false; self.dim];
        for &o in &outliers {
            is_out[o as usize] = true;
        }
        self.rest = (0..self.dim as u32).filter(|&c| !is_out[c as usize]).collect();
        self.outliers = outliers;
    }

    /// Restores the channel split from stored `params`.
    pub fn with_params(mut self, params: &[u8]) -> Result<Self> {
        let n_out = self.dim / 2;
        if params.len() != 4 * n_out {
            return Err(TqError::BadParams(format!(
                "{} needs {} outlier channel ids, the stored parameters hold {} bytes",
                self.info.name,
                n_out,
                params.len()
            )));
        }
        let ids: Vec<u32> = params.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if ids.windows(2).any(|w| w[0] >= w[1]) || ids.iter().any(|&i| i as usize >= self.dim) {
            return Err(TqError::BadParams("outlier channel ids must be increasing and < dim".into()));
        }
        self.set_outliers(ids);
        Ok(self)
    }

    /// The outlier channel ids (increasing, `dim/2` of them).
    pub fn outliers(&self) -> &[u32] {
        &self.outliers
    }

    fn split(&self, x: &[f32], a: &mut [f32], b: &mut [f32]) {
        for (o, &c) in a.iter_mut().zip(&self.outliers) {
            *o = x[c as usize];
        }
        for (o, &c) in b.iter_mut().zip(&self.rest) {
            *o = x[c as usize];
        }
    }
}

impl Codec for TurboQuantFractional {
    fn info(&self) -> &CodecInfo {
        &self.info
    }
    fn params(&self) -> Vec<u8> {
        self.outliers.iter().flat_map(|c| c.to_le_bytes()).collect()
    }

    fn train(&mut self, sample: &[f32]) -> Result<()> {
        check_vectors(sample, self.dim)?;
        let mut ms = vec![0.0f64; self.dim];
        for v in sample.chunks_exact(self.dim) {
            for (m, &x) in ms.iter_mut().zip(v) {
                *m += x as f64 * x as f64;
            }
        }
        let mut order: Vec<u32> = (0..self.dim as u32).collect();
        // largest mean square first; ties to the lower index (stable sort)
        order.sort_by(|&a, &b| ms[b as usize].total_cmp(&ms[a as usize]));
        order.truncate(self.dim / 2);
        self.set_outliers(order);
        Ok(())
    }

    fn two_scaled_parts(&self) -> Option<(usize, usize)> {
        Some((self.hi.code_size() - 4, self.lo.code_size() - 4))
    }

    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]) {
        with_split(self.dim, |buf| {
            let (a, b) = buf.split_at_mut(self.outliers.len());
            self.split(x, a, b);
            let h = self.hi.code_size();
            self.hi.encode_unchecked(a, &mut code[..h]);
            self.lo.encode_unchecked(b, &mut code[h..]);
        })
    }

    fn decode_unchecked(&self, code: &[u8], out: &mut [f32]) {
        with_split(self.dim, |buf| {
            let (a, b) = buf.split_at_mut(self.outliers.len());
            let h = self.hi.code_size();
            self.hi.decode_unchecked(&code[..h], a);
            self.lo.decode_unchecked(&code[h..], b);
            for (&v, &c) in a.iter().zip(&self.outliers) {
                out[c as usize] = v;
            }
            for (&v, &c) in b.iter().zip(&self.rest) {
                out[c as usize] = v;
            }
        })
    }

    fn prepare_unchecked(&self, q: &[f32]) -> PreparedQuery {
        let mut a = vec![0.0; self.outliers.len()];
        let mut b = vec![0.0; self.rest.len()];
        self.split(q, &mut a, &mut b);
        let pa = self.hi.prepare_unchecked(&a);
        let pb = self.lo.prepare_unchecked(&b);
        let norms = vec![pa.norm_sq, pb.norm_sq];
        let mut parts = pa.parts;
        parts.extend(pb.parts);
        parts.push(norms);
        PreparedQuery { norm_sq: (kernels().sum_sq)(q), parts }
    }

    fn score_ip(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let h = self.hi.code_size();
        self.hi.ip_rotated(&q.parts[0], &code[..h]) + self.lo.ip_rotated(&q.parts[1], &code[h..])
    }

    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let h = self.hi.code_size();
        self.hi.l2_rotated(&q.parts[0], q.parts[2][0], &code[..h]) + self.lo.l2_rotated(&q.parts[1], q.parts[2][1], &code[h..])
    }
}
