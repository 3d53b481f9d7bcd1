//! The codec interface and the TurboQuant codecs.
//!
//! A codec maps a vector of `dim` f32 values to a fixed-size code of
//! `code_size()` bytes. Queries are prepared once (`prepare`: rotate, build
//! lookup tables) and then scored straight from packed codes (`score_ip`,
//! `score_l2`) without decoding.
//!
//! Code layouts (all little-endian, indices bit-packed LSB-first, see `bitpack`):
//! - `tq-mse-B`      : `[B·dim bits of indices][f32 ‖x‖]`
//! - `tq-mse-B-nc`   : `[B·dim bits of indices][f32 ‖x‖ / ⟨u, û⟩]` (norm correction)
//! - `tq-prod-B`, B≥2: `[(B-1)·dim bits of indices][dim sign bits][f32 ‖x‖][f32 γ = ‖r‖]`
//! - `tq-prod-1`     : `[dim sign bits][f32 ‖x‖]` (QJL alone, γ = 1)
//! - `tq-mse-2.5/3.5`: `[hi sub-code][lo sub-code]`, two `tq-mse` codes over a channel split.

use std::cell::RefCell;
use std::sync::Arc;

use rayon::prelude::*;

use crate::bitpack::{pack, packed_len, unpack};
use crate::codebook::{LloydMax, SphereCoordinate};
use crate::error::{Result, TqError};
use crate::kernels::{kernels, Had2};
use crate::rng::derive_seed;
use crate::rotation::{DenseMatrix, Rotation, RotationKind};

/// A query prepared for one codec: rotated copies and constants.
#[derive(Clone, Debug)]
pub struct PreparedQuery {
    pub(crate) parts: Vec<Vec<f32>>,
    /// ‖q‖²
    pub norm_sq: f32,
}

impl PreparedQuery {
    /// The query in the codec's rotated domain (see `Codec::codebook_view`).
    pub fn rotated(&self) -> &[f32] {
        &self.parts[0]
    }
}

/// A code that is a scaled codebook vector in the codec's rotated domain:
/// `[bits·dim packed indices][f32 scale]`, with
/// `score_ip(prepare(q), code) = scale · Σ_j q.rotated()[j] · table[idx_j]`
/// and `accumulate(code, w, acc)` adding `w · scale · table[idx_j]` to `acc[j]`
/// before `finish_accumulated` rotates back.
#[derive(Clone, Copy, Debug)]
pub struct CodebookView<'a> {
    pub bits: u32,
    pub table: &'a [f32],
    /// Bytes of packed indices (the f32 scale follows).
    pub packed: usize,
}

/// Vectors per rayon task in batch calls (large enough to amortize scheduling;
/// results do not depend on it: every vector is encoded independently).
const BATCH_CHUNK: usize = 256;

pub trait Codec: Send + Sync {
    /// Registry name, e.g. `tq-mse-4`.
    fn name(&self) -> &str;
    fn dim(&self) -> usize;
    fn seed(&self) -> u64;
    fn rotation_kind(&self) -> RotationKind;
    /// Bytes per code (fixed).
    fn code_size(&self) -> usize;
    /// True storage cost per coordinate, every overhead included.
    fn bits_per_value(&self) -> f64 {
        (self.code_size() * 8) as f64 / self.dim() as f64
    }
    /// Codec parameters beyond (name, dim, seed, rotation) that stored codes depend on.
    fn params(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Fits data-dependent parameters on a row-major sample (fractional
    /// TurboQuant codecs, PQ, RaBitQ's centre). Must be called before encoding, never after.
    fn train(&mut self, _sample: &[f32]) -> Result<()> {
        Ok(())
    }
    /// Whether `train` does anything for this codec (callers then train first).
    fn wants_training(&self) -> bool {
        false
    }
    /// False while a codec that needs training has none (encode/decode/prepare refuse).
    fn is_trained(&self) -> bool {
        true
    }
    fn check_trained(&self) -> Result<()> {
        if self.is_trained() {
            Ok(())
        } else {
            Err(TqError::NotTrained(self.name().to_string()))
        }
    }

    /// Encodes one finite vector of length `dim` into `code` (`code_size` bytes).
    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]);
    fn decode_unchecked(&self, code: &[u8], out: &mut [f32]);
    fn prepare_unchecked(&self, q: &[f32]) -> PreparedQuery;
    /// Estimate of ⟨q, x⟩ from the code.
    fn score_ip(&self, q: &PreparedQuery, code: &[u8]) -> f32;
    /// Estimate of ‖q − x‖² from the code.
    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32;

    // ---- checked, provided API ----

    fn encode(&self, x: &[f32], code: &mut [u8]) -> Result<()> {
        self.check_trained()?;
        if x.len() != self.dim() {
            return Err(TqError::DimMismatch { expected: self.dim(), got: x.len() });
        }
        check_vectors(x, self.dim())?;
        check_len(code.len(), self.code_size())?;
        self.encode_unchecked(x, code);
        Ok(())
    }

    fn decode(&self, code: &[u8], out: &mut [f32]) -> Result<()> {
        self.check_trained()?;
        check_len(code.len(), self.code_size())?;
        if out.len() != self.dim() {
            return Err(TqError::DimMismatch { expected: self.dim(), got: out.len() });
        }
        self.decode_unchecked(code, out);
        Ok(())
    }

    /// Encodes row-major `xs` (`n·dim` values) into `codes` (`n·code_size` bytes), in parallel.
    /// The output bytes do not depend on the number of threads.
    fn encode_batch(&self, xs: &[f32], codes: &mut [u8]) -> Result<()> {
        self.check_trained()?;
        let (d, cs) = (self.dim(), self.code_size());
        check_vectors(xs, d)?;
        let n = xs.len() / d;
        check_len(codes.len(), n * cs)?;
        codes
            .par_chunks_mut(cs * BATCH_CHUNK)
            .zip(xs.par_chunks(d * BATCH_CHUNK))
            .for_each(|(cc, xx)| {
                for (c, x) in cc.chunks_exact_mut(cs).zip(xx.chunks_exact(d)) {
                    self.encode_unchecked(x, c);
                }
            });
        Ok(())
    }

    fn decode_batch(&self, codes: &[u8], out: &mut [f32]) -> Result<()> {
        self.check_trained()?;
        let (d, cs) = (self.dim(), self.code_size());
        if codes.len() % cs != 0 {
            return Err(TqError::BadParams(format!(
                "code buffer of {} bytes is not a whole number of {cs}-byte codes",
                codes.len()
            )));
        }
        let n = codes.len() / cs;
        if out.len() != n * d {
            return Err(TqError::DimMismatch { expected: n * d, got: out.len() });
        }
        out.par_chunks_mut(d * BATCH_CHUNK).zip(codes.par_chunks(cs * BATCH_CHUNK)).for_each(|(oo, cc)| {
            for (o, c) in oo.chunks_exact_mut(d).zip(cc.chunks_exact(cs)) {
                self.decode_unchecked(c, o);
            }
        });
        Ok(())
    }

    fn prepare(&self, q: &[f32]) -> Result<PreparedQuery> {
        self.check_trained()?;
        if q.len() != self.dim() {
            return Err(TqError::DimMismatch { expected: self.dim(), got: q.len() });
        }
        check_vectors(q, self.dim())?;
        Ok(self.prepare_unchecked(q))
    }

    /// Fast-scan support (see `crate::fastscan`): `Some(m)` when the first
    /// `m/2` bytes of every code are `m` 4-bit sub-codes and the inner-product
    /// estimate is `fastscan_factor(code) · Σ_i T_i[sub-code i]` plus a constant
    /// of the query, with the tables `T` of `fastscan_tables` (the rest of the
    /// code holds the factor and any other per-code values).
    fn fastscan_m(&self) -> Option<usize> {
        None
    }
    /// The `16·m` float tables of a prepared query (empty without fast-scan support).
    fn fastscan_tables(&self, _q: &PreparedQuery) -> Vec<f32> {
        Vec::new()
    }
    /// The per-code factor of the fast-scan estimate.
    fn fastscan_factor(&self, _code: &[u8]) -> f32 {
        1.0
    }

    /// Adds `w · decode(code)` into `acc` (`dim` floats) in a domain of the
    /// codec's choosing; `finish_accumulated` maps the sum back. Attention
    /// accumulates values this way, so a rotating codec rotates back once per
    /// head instead of once per value. Default: decode and add.
    fn accumulate(&self, code: &[u8], w: f32, acc: &mut [f32]) {
        let mut x = vec![0.0f32; self.dim()];
        self.decode_unchecked(code, &mut x);
        for (a, v) in acc.iter_mut().zip(&x) {
            *a += w * v;
        }
    }
    /// Completes an `accumulate` sum (default: nothing to do).
    fn finish_accumulated(&self, _acc: &mut [f32]) {}

    /// `Some` when every code is a scaled codebook vector in the rotated
    /// domain (see [`CodebookView`]): attention can then decode each code
    /// once and share it between the query heads of a GQA group.
    fn codebook_view(&self) -> Option<CodebookView<'_>> {
        None
    }

    /// Inner-product scores of one prepared query against `n` consecutive codes.
    fn score_ip_many(&self, q: &PreparedQuery, codes: &[u8], out: &mut [f32]) {
        for (o, c) in out.iter_mut().zip(codes.chunks_exact(self.code_size())) {
            *o = self.score_ip(q, c);
        }
    }
}

fn check_len(got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(TqError::CodeSizeMismatch { expected, got });
    }
    Ok(())
}

/// Validates a row-major batch: length a multiple of `dim`, all values finite,
/// every norm representable in f32.
pub fn check_vectors(xs: &[f32], dim: usize) -> Result<()> {
    if xs.is_empty() || xs.len() % dim != 0 {
        return Err(TqError::DimMismatch { expected: dim, got: if xs.is_empty() { 0 } else { xs.len() % dim } });
    }
    // Largest |x| (as ordered bits) per vector: a branch-free, vectorizable scan.
    // Only vectors with a huge coordinate need the exact f64 norm check.
    const HUGE: u32 = 0x5D5E_0B6B; // 1e18: below it, Σx² cannot overflow f64 nor ‖x‖ f32
    for (i, v) in xs.chunks_exact(dim).enumerate() {
        let m = v.iter().fold(0u32, |m, &x| m.max(x.to_bits() & 0x7FFF_FFFF));
        if m >= 0x7F80_0000 {
            let (j, &x) = v.iter().enumerate().find(|(_, x)| !x.is_finite()).expect("a non-finite value");
            return Err(TqError::NonFinite { vector: i, coord: j, value: x });
        }
        if m > HUGE {
            let s: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
            if s.sqrt() > f32::MAX as f64 {
                return Err(TqError::BadParams(format!("vector {i} has a norm that overflows f32")));
            }
        }
    }
    Ok(())
}

struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    idx: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const { RefCell::new(Scratch { a: Vec::new(), b: Vec::new(), idx: Vec::new() }) };
}

fn with_scratch<R>(dim: usize, f: impl FnOnce(&mut [f32], &mut [f32], &mut [u8]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.a.len() < dim {
            s.a.resize(dim, 0.0);
            s.b.resize(dim, 0.0);
            s.idx.resize(dim, 0);
        }
        let s = &mut *s;
        f(&mut s.a[..dim], &mut s.b[..dim], &mut s.idx[..dim])
    })
}

thread_local! {
    /// The two channel groups of a fractional codec (apart from `SCRATCH`,
    /// which the inner codecs borrow while this is held).
    static SPLIT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_split<R>(dim: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SPLIT.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < dim {
            s.resize(dim, 0.0);
        }
        f(&mut s[..dim])
    })
}

/// ‖y‖ with the canonical summation order; exact f64 fallback when f32 squares
/// overflow or underflow (the norm itself is checked to fit f32 at the API).
fn norm_of(y: &[f32]) -> f32 {
    let s = (kernels().sum_sq)(y);
    if s.is_normal() || s == 0.0 && y.iter().all(|&v| v == 0.0) {
        s.sqrt()
    } else {
        let mut t = 0.0f64;
        for &v in y {
            t += v as f64 * v as f64;
        }
        t.sqrt() as f32
    }
}

/// Scales `y` by `1/norm` (multiplying by the reciprocal when it is finite).
fn normalize(y: &mut [f32], norm: f32) {
    let inv = 1.0 / norm;
    if inv.is_finite() {
        y.iter_mut().for_each(|v| *v *= inv);
    } else {
        y.iter_mut().for_each(|v| *v /= norm);
    }
}

#[inline]
fn read_f32(code: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([code[at], code[at + 1], code[at + 2], code[at + 3]])
}

// ---------------------------------------------------------------------------
// TurboQuant_mse (Algorithm 1) with optional norm correction
// ---------------------------------------------------------------------------

/// TurboQuant_mse: rotate, quantize each coordinate with the Lloyd–Max
/// codebook of the sphere's coordinate law, store the norm (or, with norm
/// correction, `‖x‖/⟨u, û⟩`, which makes `⟨q, decode(x)⟩` unbiased).
pub struct TurboQuantMse {
    name: String,
    dim: usize,
    bits: u32,
    seed: u64,
    norm_correction: bool,
    rotation: Rotation,
    codebook: Arc<LloydMax>,
    centroids_sq: Vec<f32>,
    ones: Vec<f32>,
    packed: usize,
}

impl TurboQuantMse {
    pub fn new(dim: usize, bits: u32, seed: u64, rotation: RotationKind, norm_correction: bool) -> Result<Self> {
        let codebook = LloydMax::get(dim, bits)?;
        let rotation = Rotation::new(rotation, dim, seed)?;
        let name = format!("tq-mse-{bits}{}", if norm_correction { "-nc" } else { "" });
        Ok(Self {
            name,
            dim,
            bits,
            seed,
            norm_correction,
            rotation,
            centroids_sq: codebook.centroids.iter().map(|c| c * c).collect(),
            codebook,
            ones: vec![1.0; dim],
            packed: packed_len(dim, bits),
        })
    }

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
    fn name(&self) -> &str {
        &self.name
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn seed(&self) -> u64 {
        self.seed
    }
    fn rotation_kind(&self) -> RotationKind {
        self.rotation.kind()
    }
    fn code_size(&self) -> usize {
        self.packed + 4
    }

    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]) {
        with_scratch(self.dim, |y, tmp, idx| {
            let k = kernels();
            // fused fast path (same bits as the general one); None for zero/extreme norms
            let fused = self.rotation.two_round_pow2().and_then(|(s1, s2, total)| {
                let p = Had2 { s1, s2, total, boundaries: &self.codebook.boundaries, bits: self.bits };
                (k.had2_quantize)(x, &p, y, idx)
            });
            let scale = match fused {
                Some(norm) => self.scale_for(norm, y, tmp, idx),
                None => {
                    y.copy_from_slice(x);
                    self.rotation.rotate_in_place(y, tmp);
                    self.encode_rotated(y, tmp, idx)
                }
            };
            pack(idx, self.bits, &mut code[..self.packed]);
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

    /// Batch scoring. For 1, 2 and 4 bits (whole coordinates per byte) and
    /// batches of at least `BYTE_LUT_MIN_BATCH` codes, builds a per-query table
    /// of the partial inner product of every possible byte at every byte
    /// position (`packed × 256` f32), so a code costs one lookup per byte.
    fn score_ip_many(&self, q: &PreparedQuery, codes: &[u8], out: &mut [f32]) {
        let cs = self.code_size();
        let n = codes.len() / cs;
        if !matches!(self.bits, 1 | 2 | 4) || n < BYTE_LUT_MIN_BATCH {
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(cs)) {
                *o = self.ip_rotated(&q.parts[0], c);
            }
            return;
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

    /// ‖q − x̂‖², the distance to the decoded vector (asymmetric distance).
    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32 {
        self.l2_rotated(&q.parts[0], q.norm_sq, code)
    }

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

    /// 1, 2 and 4 bits: nibble `i` of the packed indices holds `4/B` whole
    /// coordinates, and the code is `[indices][f32 scale]`.
    fn fastscan_m(&self) -> Option<usize> {
        matches!(self.bits, 1 | 2 | 4).then_some(2 * self.packed)
    }

    fn fastscan_tables(&self, q: &PreparedQuery) -> Vec<f32> {
        if self.fastscan_m().is_none() {
            return Vec::new();
        }
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
    for (i, row) in t.chunks_exact_mut(16).enumerate() {
        for (v, e) in row.iter_mut().enumerate() {
            let mut s = 0.0f32;
            for k in 0..per {
                if let Some(&q) = qr.get(i * per + k) {
                    s += q * table[(v >> (k * b)) & mask];
                }
            }
            *e = s;
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
    fn ip_rotated(&self, qr: &[f32], code: &[u8]) -> f32 {
        let s = (kernels().dot_codes)(qr, &code[..self.packed], self.bits, &self.codebook.centroids);
        s * read_f32(code, self.packed)
    }

    fn l2_rotated(&self, qr: &[f32], q_norm_sq: f32, code: &[u8]) -> f32 {
        let k = kernels();
        let p = &code[..self.packed];
        let scale = read_f32(code, self.packed);
        let ip = (k.dot_codes)(qr, p, self.bits, &self.codebook.centroids) * scale;
        let cc = (k.dot_codes)(&self.ones, p, self.bits, &self.centroids_sq) * scale * scale;
        q_norm_sq - 2.0 * ip + cc
    }
}

// ---------------------------------------------------------------------------
// TurboQuant_prod (Algorithm 2); `tq-prod-1` is QJL alone
// ---------------------------------------------------------------------------

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
    name: String,
    dim: usize,
    bits: u32,
    seed: u64,
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
        crate::limits::check_dim(dim, (!orthogonal).then_some("the Gaussian QJL projection"))?;
        let codebook = if bits >= 2 { Some(LloydMax::get(dim, bits - 1)?) } else { None };
        let qjl_seed = derive_seed(seed, QJL_PURPOSE);
        let qjl = if orthogonal {
            QjlProjection::Orthogonal(Rotation::new(rotation, dim, qjl_seed)?)
        } else {
            QjlProjection::Gaussian(DenseMatrix::random_directions(dim, qjl_seed))
        };
        let qjl_scale = (1.0 / (dim as f64 * SphereCoordinate::new(dim).mean_abs())) as f32;
        Ok(Self {
            name: format!("tq-prod-{bits}{}", if orthogonal { "-orth" } else { "" }),
            dim,
            bits,
            seed,
            rotation: Rotation::new(rotation, dim, seed)?,
            qjl,
            codebook,
            qjl_scale,
            packed_mse: packed_len(dim, bits - 1),
            packed_sign: packed_len(dim, 1),
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
    fn name(&self) -> &str {
        &self.name
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn seed(&self) -> u64 {
        self.seed
    }
    fn rotation_kind(&self) -> RotationKind {
        self.rotation.kind()
    }
    fn code_size(&self) -> usize {
        self.packed_mse + self.packed_sign + if self.bits >= 2 { 8 } else { 4 }
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

// ---------------------------------------------------------------------------
// Fractional rates by an outlier-channel split
// ---------------------------------------------------------------------------

/// `tq-mse-2.5` / `tq-mse-3.5`: two independent TurboQuant_mse instances over a
/// channel split: `dim/2` *outlier* channels at `hi` bits, the rest at `lo` bits
/// (2.5 = 3+2, 3.5 = 4+3 on average, before the two f32 norms).
///
/// Outlier rule: the `dim/2` channels with the largest mean square over the
/// training sample (the first vectors of the stream; ties to the lower channel
/// index), fixed for the whole stream and stored with the codes (`params`).
/// Untrained, the outliers are channels `0..dim/2`.
pub struct TurboQuantFractional {
    name: String,
    dim: usize,
    seed: u64,
    hi: TurboQuantMse,
    lo: TurboQuantMse,
    outliers: Vec<u32>,
    rest: Vec<u32>,
}

impl TurboQuantFractional {
    pub fn new(name: &str, dim: usize, hi_bits: u32, lo_bits: u32, seed: u64, rotation: RotationKind) -> Result<Self> {
        if dim < 4 {
            return Err(TqError::BadDim(dim, 4));
        }
        let n_out = dim / 2;
        let hi = TurboQuantMse::new(n_out, hi_bits, derive_seed(seed, 1), rotation, false)?;
        let lo = TurboQuantMse::new(dim - n_out, lo_bits, derive_seed(seed, 2), rotation, false)?;
        let mut c = Self { name: name.to_string(), dim, seed, hi, lo, outliers: Vec::new(), rest: Vec::new() };
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
                self.name,
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
    fn name(&self) -> &str {
        &self.name
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn seed(&self) -> u64 {
        self.seed
    }
    fn rotation_kind(&self) -> RotationKind {
        self.hi.rotation_kind()
    }
    fn code_size(&self) -> usize {
        self.hi.code_size() + self.lo.code_size()
    }
    fn params(&self) -> Vec<u8> {
        self.outliers.iter().flat_map(|c| c.to_le_bytes()).collect()
    }

    fn wants_training(&self) -> bool {
        true
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
        self.hi.l2_rotated(&q.parts[0], q.parts[2][0], &code[..h])
            + self.lo.l2_rotated(&q.parts[1], q.parts[2][1], &code[h..])
    }
}
