//! Hot kernels: a scalar reference (`*_ref`, always compiled, the test oracle)
//! and SIMD variants chosen once at run time.
//!
//! Bit-exactness contract: `fwht`, `quantize`, `sum_sq`, `dot`, `had2_quantize`,
//! `had_round`, `had_round_t` and `norm_quantize` give the *same bits* on
//! every path (they perform the same IEEE operations in the same order; no
//! FMA, except `sw + (±1)·v` in the FWHT's in-register stages: the product is
//! exact, so the one rounding is that of `sw + v` or `sw - v`), because their
//! results are baked into stored codes.
//! `softmax` is bit-identical too (same body compiled per target). `dot_codes` (scoring) may differ from the reference by float reassociation
//! only; parity tests bound that difference.
//!
//! Set `TQ_SIMD=scalar` to force the reference path, `TQ_SIMD=avx2` to skip
//! AVX-512, `TQ_SIMD=avx512` to skip the VBMI/VNNI fast-scan kernels (e.g. to compare).
//!
//! Every `unsafe` block states, in a `// SAFETY:` comment, why it is sound
//! (the target features a kernel needs were detected at run time, the
//! lengths its loads and stores touch were checked); every `unsafe fn`
//! states the contract its callers uphold.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::sync::OnceLock;

pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

/// A table of kernel entry points resolved once per process.
pub struct Kernels {
    /// Name of the path: `scalar`, `avx2`, `avx512` or `avx512vnni`.
    pub name: &'static str,
    /// In-place unnormalized fast Walsh–Hadamard transform; `x.len()` is a power of two.
    pub fwht: fn(&mut [f32]),
    /// `idx[j] = #{k : boundaries[k] < y[j]}`; `boundaries.len() == 2^bits - 1`.
    pub quantize: fn(&[f32], &[f32], u32, &mut [u8]),
    /// Σ x² in the canonical order (8 lanes, lane = index mod 8, fixed reduction tree).
    pub sum_sq: fn(&[f32]) -> f32,
    /// Σ a·b in the canonical order.
    pub dot: fn(&[f32], &[f32]) -> f32,
    /// Σ_j q[j] · table[idx_j] where idx_j is the j-th `bits`-bit field of `packed`
    /// (LSB-first bit stream); `table.len() >= 2^bits`.
    pub dot_codes: fn(&[f32], &[u8], u32, &[f32]) -> f32,
    /// `acc[j] += w · table[idx_j]` for the `acc.len()` fields of `packed`
    /// (value accumulation of attention on codes; may use FMA).
    pub axpy_codes: fn(&[u8], u32, &[f32], f32, &mut [f32]),
    /// `out[j] = table[idx_j]` for the `out.len()` fields of `packed` (exact).
    pub lookup_codes: fn(&[u8], u32, &[f32], &mut [f32]),
    /// Attention scores of a GQA group over codebook codes (see `scalar::group_scores_ref`).
    pub group_scores: GroupScoresFn,
    /// Attention value sums of a GQA group over codebook codes (see `scalar::group_values_ref`).
    pub group_values: GroupValuesFn,
    /// Fused TurboQuant_mse front end for a power-of-two length `n >= 8` with
    /// two Hadamard rounds: `y ← total·H(s2 ⊙ H(s1 ⊙ x))`, `norm = √sum_sq(y)`,
    /// `y ← y·(1/norm)`, `idx ← quantize(y)`. Returns `None` (outputs
    /// unspecified) when `Σy²` is not a normal f32 (zero, tiny or huge vectors),
    /// which the caller handles on the general path. Bit-identical on every path
    /// to the unfused sequence of the other kernels.
    pub had2_quantize: Had2Fn,
    /// Integer table sums of one fast-scan block of 32 codes (`crate::fastscan`):
    /// `(block, tables, out)` with `block.len() == tables.len() == 16·m` (16 bytes
    /// per sub-code). Exact integer arithmetic: identical on every path.
    pub fastscan_block: fn(&[u8], &[u8], &mut [u32; 32]),
    /// Integer table sums of many queries over many fast-scan blocks in one
    /// pass: `(blocks, tables, bb, out)` with blocks and per-query tables of
    /// `bb = 16·m` bytes each, `out[(q·nb + b)·32 + i]` the sum of vector `i`
    /// of block `b` under query `q` (see `scalar::fastscan_multi_ref`). Each
    /// block is loaded once per group of queries whose tables stay in L1.
    /// Exact integer arithmetic: identical on every path and to `fastscan_block`.
    pub fastscan_multi: FastScanMultiFn,
    /// Fast-scan estimates `factor · (bias + Δ · sum)` of integer sums and their
    /// maxima per block of 32 (see `scalar::fastscan_values_ref`; element-wise,
    /// the same bits on every path).
    pub fastscan_values: FastScanValuesFn,
    /// Softmax in place (attention weights); the same bits on every path.
    pub softmax: fn(&mut [f32]),
    // --- batched fast-scan search: candidate selection ---
    /// Fast-scan estimates of `fastscan_values` (for L2 then `2·v − sqnorm`)
    /// that are not below a threshold, compressed: `(sums, factors, sqnorms,
    /// (bias, Δ), thr, out, idx)` writes the selected values and their
    /// positions and returns how many (see `scalar::fastscan_select_ref`;
    /// element-wise, the same bits and selection on every path).
    pub fastscan_select: FastScanSelectFn,
    // --- end batched fast-scan search ---
    // --- Hadamard rounds of dimensions that are not powers of two (`crate::rotation`) ---
    /// One round of the two-block randomized Hadamard transform, `(src, round, dst)`:
    /// `dst[j] = src[gather[j]] ^ mask[j]` (sign flips as bit masks), then
    /// `dst[..p] ← scale·H dst[..p]` and `dst[n-p..] ← scale·H dst[n-p..]`
    /// (`H` the unnormalized FWHT, `p` the block). Exact: the same bits on every
    /// path as `scalar::had_round_ref` (the FWHT butterflies and the scaling in
    /// the reference's order).
    pub had_round: fn(&[f32], &HadRound, &mut [f32]),
    /// The transposed round, `(src, round, dst)`: `src[n-p..] ← scale·H src[n-p..]`,
    /// `src[..p] ← scale·H src[..p]`, then `dst[j] = src[gather[j]] ^ mask[j]`.
    /// The same bits on every path as `scalar::had_round_t_ref`.
    pub had_round_t: fn(&mut [f32], &HadRound, &mut [f32]),
    /// `(y, boundaries, bits, idx)`: the end of `had2_quantize` for a rotated
    /// `y`: `norm = √sum_sq(y)`, `y ← y·(1/norm)`, `idx ← quantize(y)`; `None`
    /// (`y` unchanged) when `Σy²` is not a normal f32. The same bits on every
    /// path as those three kernels in sequence.
    pub norm_quantize: NormQuantizeFn,
    // --- end of the Hadamard rounds ---
    // --- encode input check (`codec::check_vectors`) ---
    /// `max_j (bits(x_j) & 0x7FFF_FFFF)`, 0 for no values: the largest `|x|`
    /// as ordered bits (±inf and NaN above every finite value). Exact.
    pub max_abs_bits: fn(&[f32]) -> u32,
    // --- end of the encode input check ---
}

// --- Hadamard rounds of dimensions that are not powers of two (`crate::rotation`) ---

/// Signature of `Kernels::norm_quantize`: `(y, boundaries, bits, idx) -> norm`.
pub type NormQuantizeFn = fn(&mut [f32], &[f32], u32, &mut [u8]) -> Option<f32>;

/// One round of `Kernels::had_round` / `had_round_t` over `n = gather.len()`
/// coordinates: a gather with sign masks, and the scaled FWHT of the two
/// overlapping blocks `[0, p)` and `[n - p, n)`. Built by [`HadRound::new`],
/// which checks what the kernels rely on (every index below `n`, one mask per
/// index, a power-of-two block with `n/2 < p <= n`).
#[derive(Clone, Debug)]
pub struct HadRound {
    gather: Vec<u32>,
    masks: Vec<u32>,
    block: usize,
    scale: f32,
}

impl HadRound {
    /// The round that gathers `src[gather[j]]`, XORs `masks[j]` into its bits and
    /// transforms blocks of `block` scaled by `scale`; `None` unless `gather`
    /// and `masks` have the same length `n >= 2`, every index is below `n`,
    /// every mask is 0 or the sign bit, and `block` is a power of two with
    /// `n/2 < block <= n`.
    pub fn new(gather: Vec<u32>, masks: Vec<u32>, block: usize, scale: f32) -> Option<Self> {
        let n = gather.len();
        let ok = n >= 2
            && masks.len() == n
            && n <= u32::MAX as usize
            && gather.iter().all(|&j| (j as usize) < n)
            && masks.iter().all(|&m| m == 0 || m == 0x8000_0000)
            && block.is_power_of_two()
            && block <= n
            && 2 * block > n;
        ok.then_some(Self { gather, masks, block, scale })
    }

    /// Coordinates `n`.
    pub fn len(&self) -> usize {
        self.gather.len()
    }

    /// Always false (`n >= 2`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `dst[j] = src[gather[j]]` (before the mask).
    pub fn gather(&self) -> &[u32] {
        &self.gather
    }

    /// Sign masks (0 or `0x8000_0000`), one per output coordinate.
    pub fn masks(&self) -> &[u32] {
        &self.masks
    }

    /// Block length `p` (a power of two, `n/2 < p <= n`).
    pub fn block(&self) -> usize {
        self.block
    }

    /// The factor applied after each block's unnormalized FWHT.
    pub fn scale(&self) -> f32 {
        self.scale
    }
}
// --- end of the Hadamard rounds ---

/// Signature of `Kernels::group_scores`: `(codes, code_size, bits, table, qs, d, scale, out)`.
pub type GroupScoresFn = fn(&[u8], usize, u32, &[f32], &[f32], usize, f32, &mut [f32]);

/// Signature of `Kernels::group_values`: `(codes, code_size, bits, table, w, d, acc)`.
pub type GroupValuesFn = fn(&[u8], usize, u32, &[f32], &[f32], usize, &mut [f32]);

/// Signature of `Kernels::fastscan_multi`: `(blocks, tables, bb, out)`.
pub type FastScanMultiFn = fn(&[u8], &[u8], usize, &mut [u32]);

/// Signature of `Kernels::fastscan_values`: `(sums, factors, bias, delta, out, maxes)`.
pub type FastScanValuesFn = fn(&[u32], &[f32], f32, f32, &mut [f32], &mut [f32]);

/// Signature of `Kernels::fastscan_select`: `(sums, factors, sqnorms, (bias, delta), thr, out, idx) -> count`.
pub type FastScanSelectFn = fn(&[u32], &[f32], Option<&[f32]>, (f32, f32), f32, &mut [f32], &mut [u32]) -> usize;

/// Signature of `Kernels::had2_quantize`.
pub type Had2Fn = fn(&[f32], &Had2<'_>, &mut [f32], &mut [u8]) -> Option<f32>;

/// Parameters of `Kernels::had2_quantize`.
pub struct Had2<'a> {
    /// Sign masks (0 or 0x8000_0000) of the two rounds, `n` each.
    pub s1: &'a [u32],
    /// Sign masks of the second round.
    pub s2: &'a [u32],
    /// Combined scale `n^-1` of the two unnormalized transforms.
    pub total: f32,
    /// Decision boundaries of the codebook (`2^bits - 1`, ascending).
    pub boundaries: &'a [f32],
    /// Bits per index.
    pub bits: u32,
}

/// The scalar reference kernels (`TQ_SIMD=scalar`).
pub static SCALAR: Kernels = Kernels {
    name: "scalar",
    fwht: scalar::fwht_ref,
    quantize: scalar::quantize_ref,
    sum_sq: scalar::sum_sq_ref,
    dot: scalar::dot_ref,
    dot_codes: scalar::dot_codes_ref,
    axpy_codes: scalar::axpy_codes_ref,
    lookup_codes: scalar::lookup_codes_ref,
    group_scores: scalar::group_scores_ref,
    group_values: scalar::group_values_ref,
    had2_quantize: scalar::had2_quantize_ref,
    fastscan_block: scalar::fastscan_block_ref,
    fastscan_multi: scalar::fastscan_multi_ref,
    fastscan_values: scalar::fastscan_values_ref,
    softmax: scalar::softmax_ref,
    fastscan_select: scalar::fastscan_select_ref,
    had_round: scalar::had_round_ref,
    had_round_t: scalar::had_round_t_ref,
    norm_quantize: scalar::norm_quantize_ref,
    max_abs_bits: scalar::max_abs_bits_ref,
};

/// The best kernels this CPU supports (resolved once; `TQ_SIMD=scalar` overrides).
pub fn kernels() -> &'static Kernels {
    static K: OnceLock<&'static Kernels> = OnceLock::new();
    K.get_or_init(|| {
        let want = std::env::var("TQ_SIMD").unwrap_or_default();
        if want == "scalar" {
            return &SCALAR;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let all = x86::detect_all();
            // TQ_SIMD=avx2 caps the choice (comparisons); otherwise the best
            if let Some(k) = all.iter().rev().find(|k| want.is_empty() || k.name == want).or(all.last()) {
                return k;
            }
        }
        &SCALAR
    })
}

/// Every kernel table usable on this CPU (for parity tests and benchmarks).
pub fn available() -> Vec<&'static Kernels> {
    let mut v = vec![&SCALAR];
    #[cfg(target_arch = "x86_64")]
    v.extend(x86::detect_all());
    v
}
