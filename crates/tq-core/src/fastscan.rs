//! Fast-scan: scoring many codes at once with 8-bit lookup tables and a SIMD
//! byte shuffle (the layout of FAISS's `*FastScan` indexes, written anew here).
//!
//! A code is seen as `m` 4-bit *sub-codes* (for `tq-mse-B`, B ∈ {1, 2, 4},
//! sub-code `i` is simply nibble `i` of the packed indices: `4/B` coordinates).
//! The inner-product estimate is `factor · Σ_i T_i[sub-code i]` with one
//! 16-entry table `T_i` per sub-code, built once per query.
//!
//! ## Layout
//! Vectors are stored in blocks of [`BLOCK`] = 32. A block is `16·m` bytes; for
//! each pair of sub-codes `(2p, 2p+1)` it holds 32 bytes:
//! `[16 bytes: sub-code 2p][16 bytes: sub-code 2p+1]`, where byte `i` of a
//! 16-byte half holds vector `i` in its low nibble and vector `i+16` in its high
//! nibble. One 32-byte load then meets one 32-byte register of the two tables
//! `T_2p | T_2p+1`, and `pshufb` looks up 64 sub-codes in one instruction.
//! Unused slots of the last block are zero.
//!
//! ## Quantized tables
//! The tables are quantized to integers `q_i[v] = round((T_i[v] − min T_i)/Δ)`
//! with one step `Δ` for all tables, so that `Σ_i T_i ≈ bias + Δ·Σ_i q_i`
//! (`bias = Σ_i min T_i`), with an absolute error of at most `m·Δ/2` (rms
//! `Δ·√(m/12)`). Sums are exact 16-bit integer arithmetic (the largest entry is
//! capped so that no lane can overflow), so every kernel path gives identical
//! integer sums. The scores are approximate: re-score the best candidates
//! exactly with the codec (`Codec::score_ip`) when ranking matters.

use crate::error::{Result, TqError};
use crate::kernels::kernels;

/// Vectors per block.
pub const BLOCK: usize = 32;

/// Codes of `m` 4-bit sub-codes each, blocked for fast scanning (see the module docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FastScanCodes {
    m: usize,
    n: usize,
    data: Vec<u8>,
}

impl FastScanCodes {
    /// An empty store for codes of `m` sub-codes (`m` even and positive).
    pub fn new(m: usize) -> Result<Self> {
        if m == 0 || !m.is_multiple_of(2) {
            return Err(TqError::BadParams(format!("fast-scan needs an even, positive number of sub-codes, got {m}")));
        }
        Ok(Self { m, n: 0, data: Vec::new() })
    }

    /// Rebuilds a store from its raw parts (e.g. read back from a file).
    pub fn from_raw(m: usize, n: usize, data: Vec<u8>) -> Result<Self> {
        let mut s = Self::new(m)?;
        let want = n.div_ceil(BLOCK) * s.block_bytes();
        if data.len() != want {
            return Err(TqError::BadParams(format!("fast-scan data of {} bytes does not hold {n} codes of {m} sub-codes ({want} bytes)", data.len())));
        }
        s.n = n;
        s.data = data;
        Ok(s)
    }

    /// Sub-codes per code.
    pub fn m(&self) -> usize {
        self.m
    }
    /// Number of codes stored.
    pub fn len(&self) -> usize {
        self.n
    }
    /// Whether no code is stored.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    /// Bytes per block of 32 vectors.
    pub fn block_bytes(&self) -> usize {
        16 * self.m
    }
    /// Number of blocks of 32 codes (the last one possibly partial).
    pub fn blocks(&self) -> usize {
        self.n.div_ceil(BLOCK)
    }
    /// The raw blocked bytes (`blocks() · block_bytes()`).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Appends one code given as `m/2` bytes of nibbles (sub-code `2k` in the
    /// low nibble of byte `k`, `2k+1` in the high one).
    pub fn push(&mut self, nibbles: &[u8]) {
        assert_eq!(nibbles.len(), self.m / 2, "fast-scan push: wrong code length");
        if self.n.is_multiple_of(BLOCK) {
            self.data.resize(self.data.len() + self.block_bytes(), 0);
        }
        self.n += 1;
        self.write_slot(self.n - 1, nibbles);
    }

    /// Writes code `i` back as `m/2` nibble bytes (the inverse of `push`).
    pub fn get(&self, i: usize, nibbles: &mut [u8]) {
        assert!(i < self.n && nibbles.len() == self.m / 2);
        let (base, shift) = self.slot(i);
        for (o, pair) in nibbles.iter_mut().zip(self.data[base..].chunks(32)) {
            *o = ((pair[0] >> shift) & 0x0F) | (((pair[16] >> shift) & 0x0F) << 4);
        }
    }

    /// Overwrites code `i` (same format as `push`).
    pub fn set(&mut self, i: usize, nibbles: &[u8]) {
        assert!(i < self.n && nibbles.len() == self.m / 2);
        self.write_slot(i, nibbles);
    }

    /// Removes the last code; the store then equals one that never held it.
    pub fn pop(&mut self) {
        assert!(self.n > 0);
        self.n -= 1;
        if self.n.is_multiple_of(BLOCK) {
            self.data.truncate(self.blocks() * self.block_bytes());
        } else {
            let zero = vec![0u8; self.m / 2];
            self.write_slot(self.n, &zero);
        }
    }

    /// Byte offset of slot `i` in pair 0 of its block, and its nibble shift.
    fn slot(&self, i: usize) -> (usize, u32) {
        let base = (i / BLOCK) * self.block_bytes();
        let s = i % BLOCK;
        if s < 16 {
            (base + s, 0)
        } else {
            (base + s - 16, 4)
        }
    }

    fn write_slot(&mut self, i: usize, nibbles: &[u8]) {
        let (base, shift) = self.slot(i);
        let keep = if shift == 0 { 0xF0u8 } else { 0x0F };
        for (p, &b) in nibbles.iter().enumerate() {
            let at = base + p * 32;
            self.data[at] = (self.data[at] & keep) | ((b & 0x0F) << shift);
            self.data[at + 16] = (self.data[at + 16] & keep) | ((b >> 4) << shift);
        }
    }

    /// Integer table sums of every code in block `b` (`out[i]` for vector `32b + i`).
    pub fn scan_block(&self, b: usize, lut: &QuantizedLut, out: &mut [u32; BLOCK]) {
        assert_eq!(lut.m, self.m, "lookup table built for a different code shape");
        let bb = self.block_bytes();
        (kernels().fastscan_block)(&self.data[b * bb..(b + 1) * bb], &lut.tables, out);
    }

    /// Integer table sums of many queries over blocks `b0..b1` in one pass
    /// (`kernels().fastscan_multi`): `tables` holds the `tables()` of the
    /// queries one after another, and `out[(q·(b1 − b0) + b − b0)·32 + i]`
    /// receives the sum of vector `32b + i` under query `q` (the same integers
    /// as `scan_block`).
    pub fn scan_blocks_multi(&self, b0: usize, b1: usize, tables: &[u8], out: &mut [u32]) {
        let bb = self.block_bytes();
        assert!(b0 <= b1 && b1 <= self.blocks() && tables.len().is_multiple_of(bb), "fast-scan block range or tables");
        (kernels().fastscan_multi)(&self.data[b0 * bb..b1 * bb], tables, bb, out);
    }

    /// Approximate `Σ_i T_i[sub-code i]` for every code, in order (`out.len() == len()`).
    pub fn scan(&self, lut: &QuantizedLut, out: &mut [f32]) {
        assert_eq!(out.len(), self.n);
        let mut sums = [0u32; BLOCK];
        for (b, chunk) in out.chunks_mut(BLOCK).enumerate() {
            self.scan_block(b, lut, &mut sums);
            for (o, &s) in chunk.iter_mut().zip(&sums) {
                *o = lut.value(s);
            }
        }
    }
}

/// Per-query tables quantized to bytes (see the module docs).
#[derive(Clone, Debug)]
pub struct QuantizedLut {
    m: usize,
    /// `m × 16` entries, table `i` at `[16 i, 16 i + 16)`.
    tables: Vec<u8>,
    /// Step Δ.
    pub delta: f32,
    /// Σ_i min T_i.
    pub bias: f32,
}

impl QuantizedLut {
    /// Quantizes `m` float tables of 16 entries each (`lut.len() == 16 m`, finite).
    ///
    /// Per table `lo = min T_i` (the first of equal minima, as a fold of
    /// `f32::min` from `+inf`), one step `Δ = max_i (max T_i − lo_i) / qmax`
    /// for all tables, entries `round((T_i[v] − lo_i) / Δ)` clamped to
    /// `0..=qmax` (rounded half away from zero), `bias = Σ lo_i` summed in f64.
    /// Written so that the compiler vectorizes it (no call per entry); the
    /// bytes equal those of the plain definition (`tests/it/fastscan.rs`).
    pub fn new(lut: &[f32]) -> Self {
        assert!(!lut.is_empty() && lut.len().is_multiple_of(32), "tables come in pairs of 16 entries");
        let m = lut.len() / 16;
        // largest entry so that a 16-bit lane summing m/2 entries cannot overflow
        let qmax = (65535 / (m / 2)).min(255) as f32;
        // minima by a vectorized tree (the value of a minimum does not depend
        // on the order); only a zero minimum can differ in its sign from the
        // fold of `f32::min` (the first of equal minima), so those tables are
        // folded again in order
        let mins: Vec<f32> = lut
            .chunks_exact(16)
            .map(|t| {
                let lo = |a: f32, b: f32| if b < a { b } else { a };
                let h: [f32; 8] = std::array::from_fn(|j| lo(t[j], t[j + 8]));
                let q: [f32; 4] = std::array::from_fn(|j| lo(h[j], h[j + 4]));
                let v = lo(lo(q[0], q[2]), lo(q[1], q[3]));
                if v == 0.0 || v.is_nan() {
                    t.iter().copied().fold(f32::INFINITY, f32::min)
                } else {
                    v
                }
            })
            .collect();
        // the largest spread (max is exact: the order does not matter but for ±0, which `range > 0` ignores)
        let mut spread = [0.0f32; 16];
        for (t, &lo) in lut.chunks_exact(16).zip(&mins) {
            for (s, &v) in spread.iter_mut().zip(t) {
                let d = v - lo;
                *s = if d > *s { d } else { *s };
            }
        }
        let range = spread.iter().fold(0.0f32, |a, &d| if d > a { d } else { a });
        let delta = if range > 0.0 { range / qmax } else { 1.0 };
        let mut tables = vec![0u8; lut.len()];
        for ((o, t), &lo) in tables.chunks_exact_mut(16).zip(lut.chunks_exact(16)).zip(&mins) {
            for (o, &v) in o.iter_mut().zip(t) {
                // x >= 0 (or NaN): round half away from zero is the truncation
                // plus one when the (exact) fraction is at least 1/2
                // (NaN, impossible for finite tables, becomes 0 as `as u8` makes it)
                let x = (v - lo) / delta;
                let x = if x >= 0.0 { x.min(256.0) } else { 0.0 };
                // SAFETY: 0 <= x <= 256, inside i32 and not NaN.
                let t = unsafe { x.to_int_unchecked::<i32>() } as f32;
                let r = if x - t >= 0.5 { t + 1.0 } else { t }.min(qmax);
                // SAFETY: 0 <= r <= qmax <= 255.
                *o = unsafe { r.to_int_unchecked::<i32>() } as u8;
            }
        }
        let bias = mins.iter().map(|&v| v as f64).sum::<f64>() as f32;
        Self { m, tables, delta, bias }
    }

    /// Number of tables (sub-codes).
    pub fn m(&self) -> usize {
        self.m
    }
    /// The quantized tables (`16 m` bytes).
    pub fn tables(&self) -> &[u8] {
        &self.tables
    }
    /// The float estimate of a table sum from its integer sum.
    #[inline]
    pub fn value(&self, sum: u32) -> f32 {
        self.bias + self.delta * sum as f32
    }
    /// `out[i] = factors[i] · value(sums[i])` for `i < out.len()`
    /// (`factors.len() == out.len() <= sums.len()`) and the maxima of its
    /// blocks of 32 (`maxes.len() == out.len().div_ceil(32)`), vectorized
    /// (`kernels().fastscan_values`).
    pub fn values(&self, sums: &[u32], factors: &[f32], out: &mut [f32], maxes: &mut [f32]) {
        (kernels().fastscan_values)(sums, factors, self.bias, self.delta, out, maxes)
    }
    /// The estimates `factors[i] · value(sums[i])` (for L2 then
    /// `2·v − sqnorms[i]`) of `factors.len()` codes that are not below `thr`:
    /// values to `out`, positions to `idx`, in order; returns how many
    /// (`kernels().fastscan_select`; the same bits as `values`).
    pub fn select(&self, sums: &[u32], factors: &[f32], sqnorms: Option<&[f32]>, thr: f32, out: &mut [f32], idx: &mut [u32]) -> usize {
        (kernels().fastscan_select)(sums, factors, sqnorms, (self.bias, self.delta), thr, out, idx)
    }
    /// Bound on |estimate − exact table sum|: `m·Δ/2`.
    pub fn max_error(&self) -> f32 {
        self.m as f32 * self.delta * 0.5
    }
}
