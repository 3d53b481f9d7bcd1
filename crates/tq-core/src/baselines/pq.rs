//! Product quantization (Jégou et al.): `M = round(dim·B/8)` sub-spaces (sizes
//! differing by at most one), a k-means codebook of 256 centroids per
//! sub-space (8-bit sub-codes, so `B` bits per value), asymmetric distance
//! computation (ADC) with a per-query table of `M × 256` entries. Codebooks are
//! stored as codec parameters (`256·dim` f32, amortized over the collection;
//! not counted in `bits_per_value`). Training samples at most 65,536 rows.

use crate::codec::{check_vectors, Codec, CodecInfo, PreparedQuery};
use crate::error::{Result, TqError};
use crate::kernels::kernels;
use crate::kmeans::kmeans;
use crate::rng::derive_seed;
use crate::rotation::RotationKind;

use super::{bytes_to_f32s, f32s_to_bytes};

const K: usize = 256;
const MAX_TRAIN: usize = 65_536;
const ITERS: usize = 20;

/// Number of sub-spaces of `pq-B` at `dim`.
pub fn pq_m(dim: usize, bits: u32) -> usize {
    ((dim * bits as usize + 4) / 8).clamp(1, dim)
}

/// The product-quantization codec `pq-B` (needs training before use).
pub struct Pq {
    info: CodecInfo,
    dim: usize,
    /// Sub-space start offsets (`m + 1` entries).
    bounds: Vec<usize>,
    /// Per sub-space `256 × dsub` centroids, concatenated (empty untrained).
    books: Vec<f32>,
}

impl Pq {
    /// `pq-bits` (1..=8) with `pq_m(dim, bits)` sub-spaces; `params`: stored codebooks, or empty.
    pub fn new(dim: usize, bits: u32, seed: u64, params: &[u8]) -> Result<Self> {
        if !(1..=8).contains(&bits) {
            return Err(TqError::UnsupportedBits(bits));
        }
        Self::with_subspaces(&format!("pq-{bits}"), dim, pq_m(dim, bits), seed, params)
    }

    /// PQ with `m` sub-spaces (1 ≤ m ≤ dim) of 8-bit sub-codes.
    pub fn with_subspaces(name: &str, dim: usize, m: usize, seed: u64, params: &[u8]) -> Result<Self> {
        if m == 0 || m > dim {
            return Err(TqError::BadParams(format!("PQ needs 1..={dim} sub-spaces, got {m}")));
        }
        let bounds: Vec<usize> = (0..=m).map(|i| i * dim / m).collect();
        let books = if params.is_empty() {
            Vec::new()
        } else if params.len() == 4 * K * dim {
            let b = bytes_to_f32s(params);
            if b.iter().any(|v| !v.is_finite()) {
                return Err(TqError::BadParams("PQ codebook is not finite".into()));
            }
            b
        } else {
            return Err(TqError::BadParams(format!("PQ codebooks have {} bytes, expected {}", params.len(), 4 * K * dim)));
        };
        let info = CodecInfo::new(name, dim, seed, RotationKind::Hadamard, m).trained();
        Ok(Self { info, dim, bounds, books })
    }

    fn m(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Centroids of sub-space `s` (`256 × dsub`).
    fn book(&self, s: usize) -> &[f32] {
        let (a, b) = (self.bounds[s], self.bounds[s + 1]);
        &self.books[K * a..K * b]
    }
}

impl Codec for Pq {
    fn info(&self) -> &CodecInfo {
        &self.info
    }
    fn params(&self) -> Vec<u8> {
        f32s_to_bytes(&self.books)
    }
    fn is_trained(&self) -> bool {
        !self.books.is_empty()
    }

    fn train(&mut self, sample: &[f32]) -> Result<()> {
        check_vectors(sample, self.dim)?;
        let n = (sample.len() / self.dim).min(MAX_TRAIN);
        let mut books = vec![0.0f32; K * self.dim];
        for s in 0..self.m() {
            let (a, b) = (self.bounds[s], self.bounds[s + 1]);
            let ds = b - a;
            let sub: Vec<f32> = sample.chunks_exact(self.dim).take(n).flat_map(|v| v[a..b].to_vec()).collect();
            let c = kmeans(&sub, ds, K, ITERS, derive_seed(self.info.seed, 0x5051_0000 + s as u64));
            books[K * a..K * b].copy_from_slice(&c);
        }
        self.books = books;
        Ok(())
    }

    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]) {
        let norms_of = crate::kmeans::row_norms;
        for (s, o) in code.iter_mut().enumerate().take(self.m()) {
            let (a, b) = (self.bounds[s], self.bounds[s + 1]);
            let book = self.book(s);
            let norms = norms_of(book, b - a);
            *o = crate::kmeans::nearest(book, &norms, b - a, &x[a..b]) as u8;
        }
    }

    fn decode_unchecked(&self, code: &[u8], out: &mut [f32]) {
        for (s, &c) in code.iter().enumerate().take(self.m()) {
            let (a, b) = (self.bounds[s], self.bounds[s + 1]);
            let ds = b - a;
            out[a..b].copy_from_slice(&self.book(s)[c as usize * ds..(c as usize + 1) * ds]);
        }
    }

    /// Tables `⟨q_s, C_s[k]⟩` and `‖q_s − C_s[k]‖²`, `m × 256` each.
    fn prepare_unchecked(&self, q: &[f32]) -> PreparedQuery {
        let k = kernels();
        let m = self.m();
        let (mut ip, mut l2) = (vec![0.0f32; m * K], vec![0.0f32; m * K]);
        for s in 0..m {
            let (a, b) = (self.bounds[s], self.bounds[s + 1]);
            let ds = b - a;
            let qs = &q[a..b];
            let qn = (k.sum_sq)(qs);
            for (c, cen) in self.book(s).chunks_exact(ds).enumerate() {
                let d = (k.dot)(qs, cen);
                ip[s * K + c] = d;
                l2[s * K + c] = qn - 2.0 * d + (k.sum_sq)(cen);
            }
        }
        PreparedQuery { parts: vec![ip, l2], norm_sq: (k.sum_sq)(q) }
    }

    fn score_ip(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let t = &q.parts[0];
        code.iter().enumerate().map(|(s, &c)| t[s * K + c as usize]).sum()
    }

    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        let t = &q.parts[1];
        code.iter().enumerate().map(|(s, &c)| t[s * K + c as usize]).sum()
    }
}
