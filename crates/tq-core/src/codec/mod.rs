//! The codec interface and the TurboQuant codecs.
//!
//! A codec maps a vector of `dim` f32 values to a fixed-size code of
//! `code_size()` bytes. Queries are prepared once (`prepare`: rotate, build
//! lookup tables) and then scored straight from packed codes (`score_ip`,
//! `score_l2`) without decoding.
//!
//! The [`Codec`] trait is small: its [`CodecInfo`] (written once per codec),
//! training, encode/decode (with the checked batch API provided), and
//! prepare/score. Optional abilities are capability traits a codec opts into:
//! [`FastScanCodec`] (4-bit sub-code tables, see `crate::fastscan`) through
//! `Codec::fastscan`, and [`AttentionCodec`] (KV-cache attention: accumulate
//! in the rotated domain, codebook views, batch scoring) through
//! `Codec::attention`. `impl dyn Codec` offers each capability method with its
//! generic fallback (`fastscan_m`, `accumulate`, `score_ip_many`, ...).
//!
//! Code layouts (all little-endian, indices bit-packed LSB-first, see `bitpack`):
//! - `tq-mse-B`      : `[B·dim bits of indices][f32 ‖x‖]`
//! - `tq-mse-B-nc`   : `[B·dim bits of indices][f32 ‖x‖ / ⟨u, û⟩]` (norm correction)
//! - `tq-prod-B`, B≥2: `[(B-1)·dim bits of indices][dim sign bits][f32 ‖x‖][f32 γ = ‖r‖]`
//! - `tq-prod-1`     : `[dim sign bits][f32 ‖x‖]` (QJL alone, γ = 1)
//! - `tq-mse-2.5/3.5`: `[hi sub-code][lo sub-code]`, two `tq-mse` codes over a channel split.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::error::{Result, TqError};
use crate::kernels::kernels;
use crate::rotation::RotationKind;

mod fractional;
mod mse;
mod prod;

pub use fractional::TurboQuantFractional;
pub(crate) use mse::nibble_tables;
pub use mse::TurboQuantMse;
pub use prod::{QjlProjection, TurboQuantProd};

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
    /// Bits per index.
    pub bits: u32,
    /// The `2^bits` codebook values, by index.
    pub table: &'a [f32],
    /// Bytes of packed indices (the f32 scale follows).
    pub packed: usize,
}

/// Vectors per rayon task in batch calls (large enough to amortize scheduling;
/// results do not depend on it: every vector is encoded independently).
const BATCH_CHUNK: usize = 256;

/// What every codec states about itself, written once by its constructor:
/// the provided getters of [`Codec`] read it.
#[derive(Clone, Debug, PartialEq)]
pub struct CodecInfo {
    /// Registry name, e.g. `tq-mse-4`.
    pub name: String,
    /// Values per vector.
    pub dim: usize,
    /// Seed of the rotation and any other random parts.
    pub seed: u64,
    /// The rotation stored codes depend on (`Hadamard` for codecs without one).
    pub rotation: RotationKind,
    /// Bytes per code (fixed).
    pub code_size: usize,
    /// True storage cost per coordinate, every overhead included (`8·code_size/dim`).
    pub bits_per_value: f64,
    /// Whether `train` fits data-dependent parameters (callers then train first).
    pub trains: bool,
    /// Largest `|x_i|` below which every finite vector is represented (its code
    /// decodes to finite values): see [`Codec::safe_abs`].
    pub safe_abs: f32,
}

impl CodecInfo {
    /// An online codec (no training) representing every `|x| <= SAFE_ABS`.
    pub fn new(name: impl Into<String>, dim: usize, seed: u64, rotation: RotationKind, code_size: usize) -> Self {
        Self { name: name.into(), dim, seed, rotation, code_size, bits_per_value: (code_size * 8) as f64 / dim as f64, trains: false, safe_abs: SAFE_ABS }
    }
    /// Marks a codec whose `train` learns parameters.
    pub fn trained(mut self) -> Self {
        self.trains = true;
        self
    }
    /// Sets the representable magnitude (see [`Codec::safe_abs`]).
    pub fn with_safe_abs(mut self, safe_abs: f32) -> Self {
        self.safe_abs = safe_abs;
        self
    }
}

/// A vector codec: fixed-size codes of `dim`-vectors, scored without decoding (see the module docs).
pub trait Codec: Send + Sync {
    /// Name, dimension, seed, rotation, code size, ...: see [`CodecInfo`].
    fn info(&self) -> &CodecInfo;

    /// Registry name, e.g. `tq-mse-4`.
    fn name(&self) -> &str {
        &self.info().name
    }
    /// Values per vector.
    fn dim(&self) -> usize {
        self.info().dim
    }
    /// Seed of the rotation and any other random parts.
    fn seed(&self) -> u64 {
        self.info().seed
    }
    /// The rotation stored codes depend on.
    fn rotation_kind(&self) -> RotationKind {
        self.info().rotation
    }
    /// Bytes per code (fixed).
    fn code_size(&self) -> usize {
        self.info().code_size
    }
    /// True storage cost per coordinate, every overhead included.
    fn bits_per_value(&self) -> f64 {
        self.info().bits_per_value
    }
    /// Largest `|x_i|` below which every finite vector is represented (its code
    /// decodes to finite values). The checked encoders verify vectors above it
    /// with one encode and decode and refuse those that would not decode finite.
    fn safe_abs(&self) -> f32 {
        self.info().safe_abs
    }
    /// Whether `train` does anything for this codec (callers then train first).
    fn wants_training(&self) -> bool {
        self.info().trains
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
    /// False while a codec that needs training has none (encode/decode/prepare refuse).
    fn is_trained(&self) -> bool {
        true
    }
    /// `Err(NotTrained)` unless `is_trained`.
    fn check_trained(&self) -> Result<()> {
        if self.is_trained() {
            Ok(())
        } else {
            Err(TqError::NotTrained(self.name().to_string()))
        }
    }

    /// Encodes one finite vector of length `dim` into `code` (`code_size` bytes).
    fn encode_unchecked(&self, x: &[f32], code: &mut [u8]);
    /// Decodes one code into `out` (`dim` values).
    fn decode_unchecked(&self, code: &[u8], out: &mut [f32]);
    /// Prepares one finite query of length `dim` for scoring.
    fn prepare_unchecked(&self, q: &[f32]) -> PreparedQuery;
    /// Estimate of ⟨q, x⟩ from the code.
    fn score_ip(&self, q: &PreparedQuery, code: &[u8]) -> f32;
    /// Estimate of ‖q − x‖² from the code.
    fn score_l2(&self, q: &PreparedQuery, code: &[u8]) -> f32;

    // ---- capabilities (opt-in) ----

    /// Fast-scan support (see [`FastScanCodec`]).
    fn fastscan(&self) -> Option<&dyn FastScanCodec> {
        None
    }
    /// KV-cache attention hooks (see [`AttentionCodec`]).
    fn attention(&self) -> Option<&dyn AttentionCodec> {
        None
    }
    /// For a code made of two codebook codes back to back, each its packed
    /// indices then an f32 scale (the fractional codecs: `[hi][norm][lo][norm]`):
    /// the packed bytes of each. A KV cache stores both scales as bf16
    /// ([`crate::KvLayout`]).
    fn two_scaled_parts(&self) -> Option<(usize, usize)> {
        None
    }

    // ---- checked, provided API ----

    /// Checked `encode_unchecked`: refuses an untrained codec, a wrong length, non-finite or
    /// unrepresentable input, and a `code` that is not `code_size` bytes.
    fn encode(&self, x: &[f32], code: &mut [u8]) -> Result<()> {
        self.check_trained()?;
        if x.len() != self.dim() {
            return Err(TqError::DimMismatch { expected: self.dim(), got: x.len() });
        }
        check_encodable(self, x)?;
        check_len(code.len(), self.code_size())?;
        self.encode_unchecked(x, code);
        Ok(())
    }

    /// Checked `decode_unchecked`: refuses an untrained codec, a wrong code size or output length.
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
        check_encodable(self, xs)?;
        let n = xs.len() / d;
        check_len(codes.len(), n * cs)?;
        codes.par_chunks_mut(cs * BATCH_CHUNK).zip(xs.par_chunks(d * BATCH_CHUNK)).for_each(|(cc, xx)| {
            for (c, x) in cc.chunks_exact_mut(cs).zip(xx.chunks_exact(d)) {
                self.encode_unchecked(x, c);
            }
        });
        Ok(())
    }

    /// Decodes `codes` (whole `code_size`-byte codes) into `out` (`dim` values each), in parallel.
    fn decode_batch(&self, codes: &[u8], out: &mut [f32]) -> Result<()> {
        self.check_trained()?;
        let (d, cs) = (self.dim(), self.code_size());
        if !codes.len().is_multiple_of(cs) {
            return Err(TqError::BadParams(format!("code buffer of {} bytes is not a whole number of {cs}-byte codes", codes.len())));
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

    /// Checked `prepare_unchecked`: refuses an untrained codec, a wrong length or non-finite query.
    fn prepare(&self, q: &[f32]) -> Result<PreparedQuery> {
        self.check_trained()?;
        if q.len() != self.dim() {
            return Err(TqError::DimMismatch { expected: self.dim(), got: q.len() });
        }
        check_vectors(q, self.dim())?;
        Ok(self.prepare_unchecked(q))
    }
}

/// Fast-scan support (see `crate::fastscan`): the first `m/2` bytes of every
/// code are `m` 4-bit sub-codes and the inner-product estimate is
/// `fastscan_factor(code) · Σ_i T_i[sub-code i]` plus a constant of the query,
/// with the tables `T` of `fastscan_tables` (the rest of the code holds the
/// factor and any other per-code values).
pub trait FastScanCodec: Send + Sync {
    /// Number `m` of 4-bit sub-codes.
    fn fastscan_m(&self) -> usize;
    /// The `16·m` float tables of a prepared query.
    fn fastscan_tables(&self, q: &PreparedQuery) -> Vec<f32>;
    /// The per-code factor of the fast-scan estimate.
    fn fastscan_factor(&self, code: &[u8]) -> f32;
}

/// KV-cache attention hooks of a codec (`tq-kv`): value accumulation in the
/// codec's own domain, codebook views shared between the query heads of a
/// GQA group, and batch scoring. Codecs without them get the generic
/// fallbacks of `impl dyn Codec` (decode and add; one `score_ip` per code).
pub trait AttentionCodec: Send + Sync {
    /// Adds `w · decode(code)` into `acc` (`dim` floats) in a domain of the
    /// codec's choosing; `finish_accumulated` maps the sum back. Attention
    /// accumulates values this way, so a rotating codec rotates back once per
    /// head instead of once per value.
    fn accumulate(&self, code: &[u8], w: f32, acc: &mut [f32]);
    /// Completes an `accumulate` sum.
    fn finish_accumulated(&self, acc: &mut [f32]);
    /// `Some` when every code is a scaled codebook vector in the rotated
    /// domain (see [`CodebookView`]): attention can then decode each code
    /// once and share it between the query heads of a GQA group.
    fn codebook_view(&self) -> Option<CodebookView<'_>> {
        None
    }
    /// Inner-product scores of one prepared query against `n` consecutive codes.
    fn score_ip_many(&self, q: &PreparedQuery, codes: &[u8], out: &mut [f32]);
}

/// Each capability method with its generic fallback, for any codec.
impl dyn Codec + '_ {
    /// `Some(m)` with fast-scan support (see [`FastScanCodec`]).
    pub fn fastscan_m(&self) -> Option<usize> {
        self.fastscan().map(|f| f.fastscan_m())
    }
    /// The fast-scan tables of `q` (empty without fast-scan support).
    pub fn fastscan_tables(&self, q: &PreparedQuery) -> Vec<f32> {
        self.fastscan().map_or_else(Vec::new, |f| f.fastscan_tables(q))
    }
    /// The fast-scan factor of `code` (1 without fast-scan support).
    pub fn fastscan_factor(&self, code: &[u8]) -> f32 {
        self.fastscan().map_or(1.0, |f| f.fastscan_factor(code))
    }
    /// [`AttentionCodec::accumulate`]; fallback: decode and add.
    pub fn accumulate(&self, code: &[u8], w: f32, acc: &mut [f32]) {
        if let Some(a) = self.attention() {
            return a.accumulate(code, w, acc);
        }
        let mut x = vec![0.0f32; self.dim()];
        self.decode_unchecked(code, &mut x);
        for (a, v) in acc.iter_mut().zip(&x) {
            *a += w * v;
        }
    }
    /// [`AttentionCodec::finish_accumulated`]; fallback: nothing to do.
    pub fn finish_accumulated(&self, acc: &mut [f32]) {
        if let Some(a) = self.attention() {
            a.finish_accumulated(acc);
        }
    }
    /// [`AttentionCodec::codebook_view`]; `None` without attention hooks.
    pub fn codebook_view(&self) -> Option<CodebookView<'_>> {
        self.attention().and_then(|a| a.codebook_view())
    }
    /// [`AttentionCodec::score_ip_many`]; fallback: one `score_ip` per code.
    pub fn score_ip_many(&self, q: &PreparedQuery, codes: &[u8], out: &mut [f32]) {
        if let Some(a) = self.attention() {
            return a.score_ip_many(q, codes, out);
        }
        score_each(self, q, codes, out)
    }
}

/// One `score_ip` per code.
pub(crate) fn score_each<C: Codec + ?Sized>(c: &C, q: &PreparedQuery, codes: &[u8], out: &mut [f32]) {
    for (o, code) in out.iter_mut().zip(codes.chunks_exact(c.code_size())) {
        *o = c.score_ip(q, code);
    }
}

fn check_len(got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(TqError::CodeSizeMismatch { expected, got });
    }
    Ok(())
}

/// Below this largest `|x|` (1e18), `Σx²` cannot overflow f64 nor `‖x‖` f32
/// (for any `dim <= MAX_DIM`), and every codec but the f16-scaled ones
/// represents the vector with a finite decode (see `Codec::safe_abs`).
pub const SAFE_ABS: f32 = 1e18;

/// Validates a row-major batch: length a multiple of `dim`, all values finite,
/// every norm representable in f32.
pub fn check_vectors(xs: &[f32], dim: usize) -> Result<()> {
    scan_vectors(xs, dim, f32::INFINITY, |_, _| Ok(()))
}

/// The validation of `check_vectors`, plus `flagged(i, v)` for every vector
/// whose largest `|x|` exceeds `flag_above`.
fn scan_vectors(xs: &[f32], dim: usize, flag_above: f32, mut flagged: impl FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
    if dim == 0 || xs.is_empty() || !xs.len().is_multiple_of(dim) {
        return Err(TqError::DimMismatch { expected: dim, got: if xs.is_empty() || dim == 0 { 0 } else { xs.len() % dim } });
    }
    // Largest |x| (as ordered bits) per vector: a branch-free scan (kernel).
    // Only vectors with a huge coordinate need the exact f64 norm check.
    const HUGE: u32 = 0x5D5E_0B6B; // 1e18 = SAFE_ABS: below it, Σx² cannot overflow f64 nor ‖x‖ f32
    let flag = flag_above.to_bits();
    let max_abs_bits = kernels().max_abs_bits;
    for (i, v) in xs.chunks_exact(dim).enumerate() {
        let m = max_abs_bits(v);
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
        if m > flag {
            flagged(i, v)?;
        }
    }
    Ok(())
}

/// `check_vectors` for encoding with `c`: a vector with a coordinate above
/// `c.safe_abs()` (rare: 1e18 for most codecs, about 8e6 for q8_0) is encoded
/// and decoded once here, and refused if its code would decode to inf/NaN.
/// The codes of every accepted vector are those the encoder writes anyway.
pub fn check_encodable<C: Codec + ?Sized>(c: &C, xs: &[f32]) -> Result<()> {
    scan_vectors(xs, c.dim(), c.safe_abs(), |i, v| {
        let mut code = vec![0u8; c.code_size()];
        c.encode_unchecked(v, &mut code);
        let mut out = vec![0.0f32; c.dim()];
        c.decode_unchecked(&code, &mut out);
        if out.iter().all(|x| x.is_finite()) {
            return Ok(());
        }
        let amax = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        Err(TqError::Unencodable {
            vector: i,
            reason: format!(
                "{} cannot represent its magnitude (largest |x| = {amax:e}, the code would decode to inf/NaN; every vector with |x| <= {:e} is representable)",
                c.name(),
                c.safe_abs()
            ),
        })
    })
}

struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    idx: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const { RefCell::new(Scratch { a: Vec::new(), b: Vec::new(), idx: Vec::new() }) };
}

pub(crate) fn with_scratch<R>(dim: usize, f: impl FnOnce(&mut [f32], &mut [f32], &mut [u8]) -> R) -> R {
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

pub(crate) fn with_split<R>(dim: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
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
pub(crate) fn norm_of(y: &[f32]) -> f32 {
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
pub(crate) fn normalize(y: &mut [f32], norm: f32) {
    let inv = 1.0 / norm;
    if inv.is_finite() {
        y.iter_mut().for_each(|v| *v *= inv);
    } else {
        y.iter_mut().for_each(|v| *v /= norm);
    }
}

#[inline]
pub(crate) fn read_f32(code: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([code[at], code[at + 1], code[at + 2], code[at + 3]])
}
