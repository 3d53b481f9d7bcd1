//! AVX2 (+FMA) kernels: every entry of the `avx2` table, and the fallbacks
//! and fast-scan steps the `avx512` table reuses.

use super::scalar;
use super::{group_phase_ok, per_byte, phase_permute, scale_at, scaled_weights, VBLOCK};
use crate::kernels::{Had2, HadRound};
use std::arch::x86_64::*;

pub(super) fn fwht(x: &mut [f32]) {
    if x.len() < 8 {
        return scalar::fwht_ref(x);
    }
    assert!(x.len().is_power_of_two(), "fwht takes a power-of-two length, not {}", x.len());
    // SAFETY: AVX2 was detected (`detect_all` hands out this table only then);
    // the length is a power of two >= 8 (checked above).
    unsafe { fwht_avx2(x) }
}

/// # Safety
/// The CPU supports AVX2 and FMA; `x.len()` is a power of two >= 8.
#[target_feature(enable = "avx2,fma")]
unsafe fn fwht_avx2(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    for c in (0..n).step_by(8) {
        // SAFETY: AVX2 and FMA (this function's contract); c + 8 <= n because n is a power of two >= 8.
        unsafe { _mm256_storeu_ps(p.add(c), low3(_mm256_loadu_ps(p.add(c)))) };
    }
    // SAFETY: AVX2 and FMA; `p` covers the n floats of `x`, n a power of two >= 8.
    unsafe { high_stages(p, n) };
}

/// FWHT stages h = 1, 2, 4 inside one 8-lane register. Lane j of the low half
/// of a pair gets x[j] + x[j^h]; the high lane gets x[j^h] - x[j] (= a - b of
/// the reference).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn low3(mut v: __m256) -> __m256 {
    // every lane takes sw + ±1·v in one fused multiply-add: ±1·v is exact, so
    // the single rounding gives sw + v on the low lanes and sw - v on the high
    // ones, the reference's `a + b` and `a - b` bit for bit
    let pm = |k: [f32; 8]| _mm256_setr_ps(k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]);
    let sw = _mm256_permute_ps(v, 0b10_11_00_01);
    v = _mm256_fmadd_ps(v, pm([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]), sw);
    let sw = _mm256_permute_ps(v, 0b01_00_11_10);
    v = _mm256_fmadd_ps(v, pm([1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0]), sw);
    let sw = _mm256_permute2f128_ps(v, v, 1);
    _mm256_fmadd_ps(v, pm([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0]), sw)
}

/// FWHT stages h = 8 .. n/2 over `n` floats at `p` (n a power of two >= 8).
/// Up to three consecutive stages run per pass over memory (8 registers at
/// stride h); each butterfly sees the same operands as in the reference, so
/// the result is bit-identical.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `p` is valid for reads and writes of `n` floats, `n` a power
/// of two >= 8.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn high_stages(p: *mut f32, n: usize) {
    let mut h = 8;
    while h < n {
        // SAFETY: AVX2 and FMA; h < n, so the pass taken has R·h <= n with h >= 8, both
        // powers of two: it stays inside the n floats at `p` (see `butterfly_pass`).
        unsafe {
            if h * 8 <= n {
                butterfly_pass::<8>(p, n, h);
                h *= 8;
            } else if h * 4 <= n {
                butterfly_pass::<4>(p, n, h);
                h *= 4;
            } else {
                butterfly_pass::<2>(p, n, h);
                h *= 2;
            }
        }
    }
}

/// Stages h, 2h, .. (R/2)h in one pass: `R` registers at stride `h`.
/// Requires `R·h <= n`, both powers of two, `h >= 8`.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `p` is valid for reads and writes of `n` floats; `R·h <= n`,
/// both powers of two, `h >= 8`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn butterfly_pass<const R: usize>(p: *mut f32, n: usize, h: usize) {
    // SAFETY: the caller's contract is this function's.
    unsafe { butterfly_pass_s::<R, false>(p, n, h, _mm256_setzero_ps()) }
}

/// [`butterfly_pass`], multiplying every result by `scale` before it is stored when `S`.
///
/// # Safety
/// As [`butterfly_pass`].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn butterfly_pass_s<const R: usize, const S: bool>(p: *mut f32, n: usize, h: usize, scale: __m256) {
    for base in (0..n).step_by(R * h) {
        for j in (base..base + h).step_by(8) {
            let mut v = [_mm256_setzero_ps(); R];
            for (r, reg) in v.iter_mut().enumerate() {
                // SAFETY: j + r·h + 8 <= base + R·h <= n.
                *reg = unsafe { _mm256_loadu_ps(p.add(j + r * h)) };
            }
            let mut d = 1;
            while d < R {
                for r in 0..R {
                    if r & d == 0 {
                        let (a, b) = (v[r], v[r + d]);
                        v[r] = _mm256_add_ps(a, b);
                        v[r + d] = _mm256_sub_ps(a, b);
                    }
                }
                d *= 2;
            }
            for (r, reg) in v.iter().enumerate() {
                let out = if S { _mm256_mul_ps(*reg, scale) } else { *reg };
                // SAFETY: j + r·h + 8 <= base + R·h <= n, as for the load.
                unsafe { _mm256_storeu_ps(p.add(j + r * h), out) };
            }
        }
    }
}

// --- Hadamard rounds of dimensions that are not powers of two (`Kernels::had_round`) ---

/// A masked gather `src[gather[j]] ^ masks[j]` read by the first pass of a block.
#[derive(Clone, Copy)]
struct Gather {
    src: *const f32,
    gather: *const u32,
    masks: *const u32,
}

/// The first pass of [`fwht_scaled`]: groups of `R` consecutive registers,
/// stages h = 1 .. 4·R (`low3`, then across the registers), scaled when that
/// is every stage (`p == 8·R`); it reads the block itself, or when `G` the
/// gather `from` (position j of the block from `from`'s j-th index).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `x` is valid for reads and writes of `p` floats,
/// `p = 8·R·k`; when `G`, `from.gather` and `from.masks` hold `p` elements and
/// every index is below the length of the buffer at `from.src`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn first_pass<const R: usize, const G: bool>(x: *mut f32, p: usize, scale: f32, from: Gather) {
    let (last, sc) = (p == 8 * R, _mm256_set1_ps(scale));
    for base in (0..p).step_by(8 * R) {
        let mut v = [_mm256_setzero_ps(); R];
        for (r, reg) in v.iter_mut().enumerate() {
            let c = base + 8 * r;
            // SAFETY: c + 8 <= p floats at `x`; when G, c + 8 <= p indices and
            // masks at `from`, every index inside `from.src` (the caller's contract).
            *reg = low3(unsafe {
                if G {
                    let idx = _mm256_loadu_si256(from.gather.add(c) as *const __m256i);
                    let m = _mm256_castsi256_ps(_mm256_loadu_si256(from.masks.add(c) as *const __m256i));
                    _mm256_xor_ps(_mm256_i32gather_ps::<4>(from.src, idx), m)
                } else {
                    _mm256_loadu_ps(x.add(c))
                }
            });
        }
        let mut d = 1;
        while d < R {
            for r in 0..R {
                if r & d == 0 {
                    let (a, b) = (v[r], v[r + d]);
                    v[r] = _mm256_add_ps(a, b);
                    v[r + d] = _mm256_sub_ps(a, b);
                }
            }
            d *= 2;
        }
        for (r, reg) in v.iter().enumerate() {
            let out = if last { _mm256_mul_ps(*reg, sc) } else { *reg };
            // SAFETY: as for the load.
            unsafe { _mm256_storeu_ps(x.add(base + 8 * r), out) };
        }
    }
}

/// `x[..p] ← scale · H x[..p]` (all stages; `p` a power of two >= 8): a first
/// pass over up to 64 consecutive floats in registers (read from `from` when
/// `G`), then `butterfly_pass`es (the multiply fused into the last: the same
/// products, the same bits).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `x` is valid for reads and writes of `p` floats;
/// when `G`, as in [`first_pass`].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwht_scaled<const G: bool>(x: *mut f32, p: usize, scale: f32, from: Gather) {
    let sc = _mm256_set1_ps(scale);
    // SAFETY: AVX2 and FMA; p = 8·R·k for the R chosen; every later pass has R·h <= p
    // with h >= 64 (the loop stops at h = p); the gather as the caller's contract.
    unsafe {
        let mut h = match p {
            8 => {
                first_pass::<1, G>(x, p, scale, from);
                8
            }
            16 => {
                first_pass::<2, G>(x, p, scale, from);
                16
            }
            32 => {
                first_pass::<4, G>(x, p, scale, from);
                32
            }
            _ => {
                first_pass::<8, G>(x, p, scale, from);
                64
            }
        };
        while h < p {
            if h * 8 < p {
                butterfly_pass::<8>(x, p, h);
                h *= 8;
            } else if h * 8 == p {
                butterfly_pass_s::<8, true>(x, p, h, sc);
                h *= 8;
            } else if h * 4 == p {
                butterfly_pass_s::<4, true>(x, p, h, sc);
                h *= 4;
            } else {
                butterfly_pass_s::<2, true>(x, p, h, sc);
                h *= 2;
            }
        }
    }
}

/// `dst[j] = src[gather[j]] ^ mask[j]` for `j` in `from..to`; 8 per gather,
/// the rest one at a time.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `src` and `dst` hold `r.len()` floats, `to <= r.len()`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn gather_masked(src: *const f32, r: &HadRound, dst: *mut f32, from: usize, to: usize) {
    let (g, m) = (r.gather().as_ptr(), r.masks().as_ptr());
    let mut c = from;
    while c + 8 <= to {
        // SAFETY: AVX2 and FMA; c + 8 <= to <= n indices and masks; every index is below
        // n (`HadRound::new`), so the gather reads inside `src`; the store is in `dst`.
        unsafe {
            let idx = _mm256_loadu_si256(g.add(c) as *const __m256i);
            let mk = _mm256_castsi256_ps(_mm256_loadu_si256(m.add(c) as *const __m256i));
            _mm256_storeu_ps(dst.add(c), _mm256_xor_ps(_mm256_i32gather_ps::<4>(src, idx), mk));
        }
        c += 8;
    }
    while c < to {
        // SAFETY: c < to <= n; the index is below n (`HadRound::new`).
        unsafe { *dst.add(c) = f32::from_bits((*src.add(*g.add(c) as usize)).to_bits() ^ *m.add(c)) };
        c += 1;
    }
}

pub(super) fn had_round(src: &[f32], r: &HadRound, dst: &mut [f32]) {
    let n = r.len();
    assert!(src.len() == n && dst.len() == n, "a Hadamard round of {n} coordinates");
    if r.block() < 8 {
        return scalar::had_round_ref(src, r, dst);
    }
    // SAFETY: AVX2 and FMA were detected (`detect_all`); `src` and `dst` hold n floats
    // (asserted); `HadRound::new` checked the indices, masks and block
    // (n/2 < p <= n, a power of two), and p >= 8 here.
    unsafe { had_round_avx2(src, r, dst) }
}

/// # Safety
/// As `had_round` checks: AVX2, `src` and `dst` of `r.len()` floats, `r.block() >= 8`.
#[target_feature(enable = "avx2,fma")]
unsafe fn had_round_avx2(src: &[f32], r: &HadRound, dst: &mut [f32]) {
    let (n, p) = (r.len(), r.block());
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: AVX2 and FMA; the first block [0, p) is gathered (p <= n indices
    // and masks, every index below n = src's length, `HadRound::new`) and
    // transformed in `dst`, [p, n) gathered, then the block [n - p, n) of
    // `dst` transformed.
    unsafe {
        let from = Gather { src: s, gather: r.gather().as_ptr(), masks: r.masks().as_ptr() };
        fwht_scaled::<true>(d, p, r.scale(), from);
        gather_masked(s, r, d, p, n);
        if n != p {
            fwht_scaled::<false>(d.add(n - p), p, r.scale(), from);
        }
    }
}

pub(super) fn had_round_t(src: &mut [f32], r: &HadRound, dst: &mut [f32]) {
    let n = r.len();
    assert!(src.len() == n && dst.len() == n, "a Hadamard round of {n} coordinates");
    if r.block() < 8 {
        return scalar::had_round_t_ref(src, r, dst);
    }
    // SAFETY: as in `had_round`.
    unsafe { had_round_t_avx2(src, r, dst) }
}

/// # Safety
/// As `had_round_t` checks: AVX2, `src` and `dst` of `r.len()` floats, `r.block() >= 8`.
#[target_feature(enable = "avx2,fma")]
unsafe fn had_round_t_avx2(src: &mut [f32], r: &HadRound, dst: &mut [f32]) {
    let (n, p) = (r.len(), r.block());
    let s = src.as_mut_ptr();
    // SAFETY: AVX2 and FMA; both blocks lie in the n floats of `src`; the gather as in `had_round_avx2`.
    unsafe {
        let none = Gather { src: s, gather: std::ptr::null(), masks: std::ptr::null() };
        if n != p {
            fwht_scaled::<false>(s.add(n - p), p, r.scale(), none);
        }
        fwht_scaled::<false>(s, p, r.scale(), none);
        gather_masked(s, r, dst.as_mut_ptr(), 0, n);
    }
}

pub(super) fn norm_quantize(y: &mut [f32], boundaries: &[f32], bits: u32, idx: &mut [u8]) -> Option<f32> {
    assert_eq!(boundaries.len(), (1usize << bits) - 1);
    assert!(idx.len() >= y.len());
    if !y.len().is_multiple_of(8) {
        return scalar::norm_quantize_ref(y, boundaries, bits, idx);
    }
    // SAFETY: AVX2 and FMA were detected (`detect_all`); y.len() is a multiple of 8, the
    // output length and the number of boundaries are asserted above.
    unsafe { norm_quantize_tail::<false>(y, 1.0, boundaries, bits, idx) }
}
// --- end of the Hadamard rounds ---

// --- encode input check (`codec::check_vectors`) ---

pub(super) fn max_abs_bits(x: &[f32]) -> u32 {
    // SAFETY: AVX2 was detected (`detect_all`); every load is in bounds of `x`.
    unsafe { max_abs_bits_avx2(x) }
}

/// # Safety
/// The CPU supports AVX2.
#[target_feature(enable = "avx2")]
unsafe fn max_abs_bits_avx2(x: &[f32]) -> u32 {
    let n = x.len();
    let p = x.as_ptr() as *const __m256i;
    let abs = _mm256_set1_epi32(0x7FFF_FFFF);
    let (mut m0, mut m1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut c = 0;
    while c + 16 <= n {
        // SAFETY: floats c .. c + 16 lie in `x`.
        unsafe {
            m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256(p.add(c / 8)), abs));
            m1 = _mm256_max_epu32(m1, _mm256_and_si256(_mm256_loadu_si256(p.add(c / 8 + 1)), abs));
        }
        c += 16;
    }
    let mut l = [0u32; 8];
    // SAFETY: `l` holds the 8 lanes stored.
    unsafe { _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, _mm256_max_epu32(m0, m1)) };
    l.iter().copied().max().unwrap_or(0).max(scalar::max_abs_bits_ref(&x[c..]))
}
// --- end of the encode input check ---

/// Both unnormalized signed transforms of `had2_quantize` for `n = 8·R` with
/// the whole vector held in `R` registers (same operations as `high_stages`).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `x` is valid for reads and `y` for writes of `8·R` floats;
/// `p.s1` and `p.s2` hold at least `8·R` masks each.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn rotate2_regs<const R: usize>(x: *const f32, p: &Had2<'_>, y: *mut f32) {
    let mut v = [_mm256_setzero_ps(); R];
    for (r, reg) in v.iter_mut().enumerate() {
        // SAFETY: 8·r + 8 <= 8·R floats, readable at `x` (the caller's contract).
        *reg = unsafe { _mm256_loadu_ps(x.add(8 * r)) };
    }
    // SAFETY: AVX2 and FMA; both sign arrays hold at least 8·R masks (the caller's contract).
    unsafe {
        signed_fwht_regs(&mut v, p.s1);
        signed_fwht_regs(&mut v, p.s2);
    }
    for (r, reg) in v.iter().enumerate() {
        // SAFETY: 8·r + 8 <= 8·R floats, writable at `y` (the caller's contract).
        unsafe { _mm256_storeu_ps(y.add(8 * r), *reg) };
    }
}

/// `v ← H (s ⊙ v)` (unnormalized) on a vector held in `R` registers.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `s` holds at least `8·R` masks.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn signed_fwht_regs<const R: usize>(v: &mut [__m256; R], s: &[u32]) {
    for (r, reg) in v.iter_mut().enumerate() {
        // SAFETY: 8·r + 8 <= 8·R masks, held by `s` (the caller's contract).
        let m = unsafe { _mm256_castsi256_ps(_mm256_loadu_si256(s.as_ptr().add(8 * r) as *const __m256i)) };
        *reg = low3(_mm256_xor_ps(*reg, m));
    }
    let mut h = 1;
    while h < R {
        for i in (0..R).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (v[j], v[j + h]);
                v[j] = _mm256_add_ps(a, b);
                v[j + h] = _mm256_sub_ps(a, b);
            }
        }
        h *= 2;
    }
}

pub(super) fn had2_quantize(x: &[f32], p: &Had2<'_>, y: &mut [f32], idx: &mut [u8]) -> Option<f32> {
    let n = x.len();
    assert!(n >= 8 && n.is_power_of_two());
    assert!(p.s1.len() >= n && p.s2.len() >= n && y.len() >= n && idx.len() >= n);
    assert_eq!(p.boundaries.len(), (1usize << p.bits) - 1);
    // SAFETY: AVX2 and FMA were detected (`detect_all`); the lengths and the number of
    // boundaries `had2_quantize_avx2` needs are asserted above.
    unsafe { had2_quantize_avx2(x, p, &mut y[..n], &mut idx[..n]) }
}

/// # Safety
/// The CPU supports AVX2 and FMA; `x.len()` is a power of two >= 8, `p.s1`, `p.s2`, `y` and
/// `idx` hold at least `x.len()` elements, `p.boundaries.len() == 2^p.bits - 1`
/// (as `had2_quantize` asserts).
#[target_feature(enable = "avx2,fma")]
unsafe fn had2_quantize_avx2(x: &[f32], p: &Had2<'_>, y: &mut [f32], idx: &mut [u8]) -> Option<f32> {
    let n = x.len();
    let yp = y.as_mut_ptr();
    // SAFETY: AVX2 and FMA (this function's contract). Every pointer access below is
    // at c + 8 <= n (c a multiple of 8, or c + 32 <= full <= n for the 32-wide
    // stores), and x, y, s1, s2, idx all hold at least n elements (the caller's
    // contract); n = 64 / 128 hold 8 / 16 registers for `rotate2_regs`.
    unsafe {
        match n {
            64 => rotate2_regs::<8>(x.as_ptr(), p, yp),
            128 => rotate2_regs::<16>(x.as_ptr(), p, yp),
            _ => {
                for c in (0..n).step_by(8) {
                    let m = _mm256_castsi256_ps(_mm256_loadu_si256(p.s1.as_ptr().add(c) as *const __m256i));
                    _mm256_storeu_ps(yp.add(c), low3(_mm256_xor_ps(_mm256_loadu_ps(x.as_ptr().add(c)), m)));
                }
                high_stages(yp, n);
                for c in (0..n).step_by(8) {
                    let m = _mm256_castsi256_ps(_mm256_loadu_si256(p.s2.as_ptr().add(c) as *const __m256i));
                    _mm256_storeu_ps(yp.add(c), low3(_mm256_xor_ps(_mm256_loadu_ps(yp.add(c)), m)));
                }
                high_stages(yp, n);
            }
        }
        norm_quantize_tail::<true>(y, p.total, p.boundaries, p.bits, idx)
    }
}

/// The end of `had2_quantize` and `norm_quantize` on the `n = y.len()`
/// floats of `y`: `y ← total·y` when `SCALE`, `norm = √sum_sq(y)` (canonical
/// order), `None` if `Σy²` is not normal (`y` then unchanged unless `SCALE`),
/// else `y ← y·(1/norm)` and `idx ← quantize(y)` (4 bits by bisection).
///
/// # Safety
/// The CPU supports AVX2; `n` is a multiple of 8, `idx` holds at least `n`
/// bytes, `boundaries.len() == 2^bits - 1`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn norm_quantize_tail<const SCALE: bool>(y: &mut [f32], total: f32, boundaries: &[f32], bits: u32, idx: &mut [u8]) -> Option<f32> {
    let n = y.len();
    let yp = y.as_mut_ptr();
    // SAFETY: AVX2 (this function's contract). Every pointer access below is
    // at c + 8 <= n (c a multiple of 8, n too), or c + 32 <= full <= n for the
    // 32-wide stores; y and idx hold at least n elements.
    unsafe {
        let total = _mm256_set1_ps(total);
        let mut acc = _mm256_setzero_ps();
        for c in (0..n).step_by(8) {
            let mut v = _mm256_loadu_ps(yp.add(c));
            if SCALE {
                v = _mm256_mul_ps(v, total);
                _mm256_storeu_ps(yp.add(c), v);
            }
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
        }
        let mut l = [0.0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), acc);
        let s = scalar::reduce8(&l);
        if !s.is_normal() {
            return None;
        }
        let norm = s.sqrt();
        let inv = _mm256_set1_ps(1.0 / norm);
        if bits > 4 {
            for c in (0..n).step_by(8) {
                _mm256_storeu_ps(yp.add(c), _mm256_mul_ps(_mm256_loadu_ps(yp.add(c)), inv));
            }
            quantize_avx2(y, boundaries, bits, idx);
            return Some(norm);
        }
        let nb = boundaries.len();
        let mut bv = [_mm256_setzero_ps(); 15];
        for (r, &b) in bv.iter_mut().zip(boundaries) {
            *r = _mm256_set1_ps(b);
        }
        // 4 bits: bisection. After the middle boundary b7, the 7 remaining
        // candidates of each lane are b0..b6 or b8..b14, one register each, so
        // each further step is two in-register permutes, a blend and a compare.
        let (lo7, hi7) = if bits == 4 {
            let mut lo = [0.0f32; 8];
            let mut hi = [0.0f32; 8];
            lo[..7].copy_from_slice(&boundaries[..7]);
            hi[..7].copy_from_slice(&boundaries[8..15]);
            (_mm256_loadu_ps(lo.as_ptr()), _mm256_loadu_ps(hi.as_ptr()))
        } else {
            (_mm256_setzero_ps(), _mm256_setzero_ps())
        };
        let ip = idx.as_mut_ptr();
        let count8 = |c: usize| -> __m256i {
            let v = _mm256_mul_ps(_mm256_loadu_ps(yp.add(c)), inv);
            _mm256_storeu_ps(yp.add(c), v);
            if bits == 4 {
                let up = _mm256_cmp_ps(v, bv[7], _CMP_GT_OQ);
                let upper = _mm256_castps_si256(up);
                let mut j = _mm256_setzero_si256();
                for step in [4, 2, 1] {
                    let k = _mm256_add_epi32(j, _mm256_set1_epi32(step - 1));
                    let thr = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo7, k), _mm256_permutevar8x32_ps(hi7, k), up);
                    let gt = _mm256_castps_si256(_mm256_cmp_ps(v, thr, _CMP_GT_OQ));
                    j = _mm256_add_epi32(j, _mm256_and_si256(gt, _mm256_set1_epi32(step)));
                }
                _mm256_add_epi32(j, _mm256_and_si256(upper, _mm256_set1_epi32(8)))
            } else {
                let mut cnt = _mm256_setzero_si256();
                for b in bv.iter().take(nb) {
                    cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(_mm256_cmp_ps(v, *b, _CMP_GT_OQ)));
                }
                cnt
            }
        };
        // 32 values per step: counts <= 15 narrow i32 -> i16 -> u8 within
        // 128-bit halves, then one cross-lane permute restores the order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let full = n / 32 * 32;
        for c in (0..full).step_by(32) {
            let a = _mm256_packs_epi32(count8(c), count8(c + 8));
            let b = _mm256_packs_epi32(count8(c + 16), count8(c + 24));
            let w = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, b), order);
            _mm256_storeu_si256(ip.add(c) as *mut __m256i, w);
        }
        for c in (full..n).step_by(8) {
            let cnt = count8(c);
            let w = _mm256_packus_epi16(_mm256_packs_epi32(cnt, cnt), cnt);
            (ip.add(c) as *mut i32).write_unaligned(_mm256_cvtsi256_si32(w));
            (ip.add(c + 4) as *mut i32).write_unaligned(_mm256_extract_epi32::<4>(w));
        }
        Some(norm)
    }
}

pub(super) fn quantize(y: &[f32], boundaries: &[f32], bits: u32, idx: &mut [u8]) {
    assert_eq!(boundaries.len(), (1usize << bits) - 1);
    assert!(idx.len() >= y.len());
    // SAFETY: AVX2 was detected (`detect_all`); boundary count and output
    // length asserted above.
    unsafe { quantize_avx2(y, boundaries, bits, idx) }
}

/// # Safety
/// The CPU supports AVX2; `boundaries.len() == 2^bits - 1` and `idx.len() >= y.len()`
/// (as `quantize` asserts).
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(y: &[f32], boundaries: &[f32], bits: u32, idx: &mut [u8]) {
    let n = y.len();
    let full = n / 8 * 8;
    let mut out = [0i32; 8];
    if bits <= 4 {
        let nb = boundaries.len();
        let mut bv = [_mm256_setzero_ps(); 15];
        for k in 0..nb {
            bv[k] = _mm256_set1_ps(boundaries[k]);
        }
        for c in (0..full).step_by(8) {
            // SAFETY: AVX2; c + 8 <= full <= n = y.len().
            let v = unsafe { _mm256_loadu_ps(y.as_ptr().add(c)) };
            let mut cnt = _mm256_setzero_si256();
            for b in bv.iter().take(nb) {
                // boundary < y  <=>  y > boundary (ordered, non-signalling; inputs are finite)
                let gt = _mm256_castps_si256(_mm256_cmp_ps(v, *b, _CMP_GT_OQ));
                cnt = _mm256_sub_epi32(cnt, gt);
            }
            // SAFETY: AVX2; `out` holds the 8 i32 lanes stored.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, cnt) };
            for l in 0..8 {
                idx[c + l] = out[l] as u8;
            }
        }
    } else {
        for c in (0..full).step_by(8) {
            // SAFETY: AVX2; c + 8 <= full <= n = y.len().
            let v = unsafe { _mm256_loadu_ps(y.as_ptr().add(c)) };
            let mut pos = _mm256_setzero_si256();
            let mut step = 1i32 << (bits - 1);
            while step > 0 {
                let cand = _mm256_add_epi32(pos, _mm256_set1_epi32(step));
                // SAFETY: AVX2; every lane's cand - 1 <= 2^bits - 2 < boundaries.len()
                // (the caller's contract), so the gather reads inside `boundaries`.
                let thr = unsafe { _mm256_i32gather_ps::<4>(boundaries.as_ptr(), _mm256_sub_epi32(cand, _mm256_set1_epi32(1))) };
                let gt = _mm256_castps_si256(_mm256_cmp_ps(v, thr, _CMP_GT_OQ));
                pos = _mm256_blendv_epi8(pos, cand, gt);
                step >>= 1;
            }
            // SAFETY: AVX2; `out` holds the 8 i32 lanes stored.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, pos) };
            for l in 0..8 {
                idx[c + l] = out[l] as u8;
            }
        }
    }
    scalar::quantize_ref(&y[full..], boundaries, bits, &mut idx[full..n]);
}

pub(super) fn softmax(s: &mut [f32]) {
    // SAFETY: AVX2 was detected (`detect_all`); the body is safe code.
    unsafe { softmax_avx2(s) }
}

/// The scalar body compiled for AVX2: 8 scores per instruction, the same bits.
///
/// # Safety
/// The CPU supports AVX2 (the body is safe code).
#[target_feature(enable = "avx2")]
unsafe fn softmax_avx2(s: &mut [f32]) {
    scalar::softmax_body(s)
}

pub(super) fn sum_sq(x: &[f32]) -> f32 {
    // SAFETY: AVX2 was detected (`detect_all`); no length requirement.
    unsafe { sum_sq_avx2(x) }
}

/// # Safety
/// The CPU supports AVX2 (every load is in bounds of `x`).
#[target_feature(enable = "avx2")]
unsafe fn sum_sq_avx2(x: &[f32]) -> f32 {
    let full = x.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for c in (0..full).step_by(8) {
        // SAFETY: AVX2; c + 8 <= full <= x.len().
        let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(c)) };
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    let mut l = [0.0f32; 8];
    // SAFETY: AVX2; `l` holds the 8 floats stored.
    unsafe { _mm256_storeu_ps(l.as_mut_ptr(), acc) };
    for (i, &v) in x[full..].iter().enumerate() {
        l[i] += v * v;
    }
    scalar::reduce8(&l)
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // SAFETY: AVX2 was detected (`detect_all`); equal lengths asserted above.
    unsafe { dot_avx2(a, b) }
}

/// # Safety
/// The CPU supports AVX2; `a.len() == b.len()`.
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    let full = a.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for c in (0..full).step_by(8) {
        // SAFETY: AVX2; c + 8 <= full <= a.len() == b.len().
        let (x, y) = unsafe { (_mm256_loadu_ps(a.as_ptr().add(c)), _mm256_loadu_ps(b.as_ptr().add(c))) };
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
    }
    let mut l = [0.0f32; 8];
    // SAFETY: AVX2; `l` holds the 8 floats stored.
    unsafe { _mm256_storeu_ps(l.as_mut_ptr(), acc) };
    for (i, (&x, &y)) in a[full..].iter().zip(&b[full..]).enumerate() {
        l[i] += x * y;
    }
    scalar::reduce8(&l)
}

pub(super) fn dot_codes(q: &[f32], packed: &[u8], bits: u32, table: &[f32]) -> f32 {
    assert!((1..=8).contains(&bits));
    assert!(table.len() >= 1 << bits);
    assert!(packed.len() * 8 >= q.len() * bits as usize);
    // SAFETY: AVX2 and FMA were detected (`detect_all`); width, table and
    // packed sizes asserted above.
    unsafe { dot_codes_avx2(q, packed, bits, table) }
}

/// Per bit width: the pshufb control that puts bytes `o, o+1` of the group into
/// 32-bit lane k (o = k·bits / 8), and the right shift `k·bits mod 8`.
#[allow(clippy::needless_range_loop)] // lane k fills two arrays at derived offsets
fn unpack_consts(bits: u32) -> ([i8; 32], [i32; 8]) {
    let mut shuf = [-1i8; 32];
    let mut shifts = [0i32; 8];
    for k in 0..8usize {
        let start = k * bits as usize;
        let o = start / 8;
        shifts[k] = (start % 8) as i32;
        // lanes 0-3 live in the low 128-bit half, 4-7 in the high half; both halves hold the group.
        let base = (k % 4) * 4 + if k >= 4 { 16 } else { 0 };
        shuf[base] = o as i8;
        if o + 1 < 8 {
            shuf[base + 1] = (o + 1) as i8;
        }
    }
    (shuf, shifts)
}

/// # Safety
/// The CPU supports AVX2 and FMA; `bits` in 1..=8, `table.len() >= 2^bits`,
/// `packed` holds `q.len()` fields (as `dot_codes` asserts).
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_codes_avx2(q: &[f32], packed: &[u8], bits: u32, table: &[f32]) -> f32 {
    let n = q.len();
    let groups = n / 8;
    let b = bits as usize;
    // SAFETY: AVX2+FMA (this function's contract); bits in 1..=8 and
    // table.len() >= 2^bits (the caller's contract).
    let u = unsafe { Unpack::new(bits, table) };
    let mut acc = _mm256_setzero_ps();
    let mut acc2 = _mm256_setzero_ps();
    for g in 0..groups {
        // SAFETY: AVX2+FMA; g·8 + 8 <= n = q.len(); `word_at` reads in bounds;
        // the table holds 2^bits entries for the gather of `vals`.
        let (vals, qv) = unsafe { (u.vals(Unpack::word_at(packed, g * b), table), _mm256_loadu_ps(q.as_ptr().add(g * 8))) };
        if g % 2 == 0 {
            acc = _mm256_fmadd_ps(qv, vals, acc);
        } else {
            acc2 = _mm256_fmadd_ps(qv, vals, acc2);
        }
    }
    let mut l = [0.0f32; 8];
    // SAFETY: AVX2; `l` holds the 8 floats stored.
    unsafe { _mm256_storeu_ps(l.as_mut_ptr(), _mm256_add_ps(acc, acc2)) };
    let mut s = scalar::reduce8(&l);
    for j in groups * 8..n {
        s += q[j] * table[scalar::get_field(packed, bits, j)];
    }
    s
}

pub(super) fn axpy_codes(packed: &[u8], bits: u32, table: &[f32], w: f32, acc: &mut [f32]) {
    assert!((1..=8).contains(&bits));
    assert!(table.len() >= 1 << bits);
    assert!(packed.len() * 8 >= acc.len() * bits as usize);
    // SAFETY: AVX2 and FMA were detected (`detect_all`); width, table and
    // packed sizes asserted above.
    unsafe { codes_avx2::<true>(packed, bits, table, w, acc) }
}

pub(super) fn lookup_codes(packed: &[u8], bits: u32, table: &[f32], out: &mut [f32]) {
    assert!((1..=8).contains(&bits));
    assert!(table.len() >= 1 << bits);
    assert!(packed.len() * 8 >= out.len() * bits as usize);
    // SAFETY: AVX2 and FMA were detected (`detect_all`); width, table and
    // packed sizes asserted above.
    unsafe { codes_avx2::<false>(packed, bits, table, 1.0, out) }
}

/// `ACC`: `acc[j] += w · table[field_j]`; else `acc[j] = table[field_j]`.
/// 8 coordinates per step (the unpacking of `dot_codes_avx2`).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `bits` in 1..=8, `table.len() >= 2^bits`,
/// `packed` holds `acc.len()` fields (as `axpy_codes` and `lookup_codes` assert).
#[target_feature(enable = "avx2,fma")]
unsafe fn codes_avx2<const ACC: bool>(packed: &[u8], bits: u32, table: &[f32], w: f32, acc: &mut [f32]) {
    let n = acc.len();
    let groups = n / 8;
    let b = bits as usize;
    // SAFETY: AVX2+FMA (this function's contract); bits in 1..=8 and
    // table.len() >= 2^bits (the caller's contract).
    let u = unsafe { Unpack::new(bits, table) };
    let wv = _mm256_set1_ps(w);
    for g in 0..groups {
        // SAFETY: AVX2+FMA; g·8 + 8 <= n = acc.len(); `word_at` reads in
        // bounds; the table holds 2^bits entries for the gather of `vals`.
        unsafe {
            let vals = u.vals(Unpack::word_at(packed, g * b), table);
            let a = acc.as_mut_ptr().add(g * 8);
            _mm256_storeu_ps(a, if ACC { _mm256_fmadd_ps(wv, vals, _mm256_loadu_ps(a)) } else { vals });
        }
    }
    for j in groups * 8..n {
        let v = table[scalar::get_field(packed, bits, j)];
        acc[j] = if ACC { acc[j] + w * v } else { v };
    }
}

/// Unpacking constants and tables for 8 fields per step (any width 1..=8:
/// `vpermps` over the table up to 4 bits, a gather beyond).
struct Unpack {
    shuf: __m256i,
    shifts: __m256i,
    mask: __m256i,
    t0: __m256,
    t1: __m256,
    bits: u32,
}

impl Unpack {
    /// # Safety
    /// The CPU supports AVX2 and FMA; `bits` in 1..=8 and `table.len() >= 2^bits` (the loads
    /// read 16 entries of `table` at 4 bits and 8 from 5 bits on).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn new(bits: u32, table: &[f32]) -> Self {
        let (shuf, shifts) = unpack_consts(bits);
        let pad = padded8(table);
        // SAFETY: AVX2 (this function's contract); `shuf` and `shifts` have the
        // 32 bytes each load reads, `pad` 8 floats; `table` is read only where
        // it has the entries: 16 at 4 bits, 8 at 5 bits or more (2^bits entries,
        // the caller's contract).
        unsafe {
            Unpack {
                shuf: _mm256_loadu_si256(shuf.as_ptr() as *const __m256i),
                shifts: _mm256_loadu_si256(shifts.as_ptr() as *const __m256i),
                mask: _mm256_set1_epi32((1i32 << bits) - 1),
                t0: _mm256_loadu_ps(if bits <= 3 { pad.as_ptr() } else { table.as_ptr() }),
                t1: if bits == 4 { _mm256_loadu_ps(table.as_ptr().add(8)) } else { _mm256_loadu_ps(pad.as_ptr()) },
                bits,
            }
        }
    }

    /// The 8 bytes of `packed` from `off` (zero-padded past the end).
    #[inline]
    fn word_at(packed: &[u8], off: usize) -> u64 {
        if off + 8 <= packed.len() {
            // SAFETY: off + 8 <= packed.len(): the 8 bytes read are in bounds.
            unsafe { (packed.as_ptr().add(off) as *const u64).read_unaligned() }
        } else {
            let mut tmp = [0u8; 8];
            tmp[..packed.len() - off].copy_from_slice(&packed[off..]);
            u64::from_le_bytes(tmp)
        }
    }

    /// Table values of the 8 fields that start at bit 0 of `word`.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; for `bits > 4`, `table.len() >= 2^bits` (the gather reads
    /// `table[idx]` for `idx < 2^bits`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn vals(&self, word: u64, table: &[f32]) -> __m256 {
        let idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(_mm256_set1_epi64x(word as i64), self.shuf), self.shifts), self.mask);
        match self.bits {
            1..=3 => _mm256_permutevar8x32_ps(self.t0, idx),
            4 => {
                let lo = _mm256_permutevar8x32_ps(self.t0, idx);
                let hi = _mm256_permutevar8x32_ps(self.t1, idx);
                _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
            }
            // SAFETY: AVX2; every idx < 2^bits <= table.len() (the caller's contract).
            _ => unsafe { _mm256_i32gather_ps::<4>(table.as_ptr(), idx) },
        }
    }

    /// The 8 values of the field group at byte `off` of `codes` (any width:
    /// up to 4 bits through `get`; wider ones read 8 bytes where in bounds,
    /// else copy the group's `bits` bytes, and gather from `table`).
    ///
    /// # Safety
    /// For bits <= 4, 4 readable bytes at `off`; for wider codes, the group's
    /// `bits` bytes in `codes` and every index < `table.len()`.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; for bits <= 4, 4 readable bytes at `off` of `codes`;
    /// for wider codes, the group's `bits` bytes in `codes` and every index < `table.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn get_at(&self, codes: &[u8], off: usize, table: &[f32]) -> __m256 {
        // SAFETY: AVX2+FMA; for bits <= 4 the caller guarantees 4 readable bytes
        // at `off`; the 8-byte read is guarded by its bounds check; the gather's
        // indices are < table.len() (the caller's contract).
        unsafe {
            if self.bits <= 4 {
                return self.get(codes.as_ptr().add(off));
            }
            let word = if off + 8 <= codes.len() {
                (codes.as_ptr().add(off) as *const u64).read_unaligned()
            } else {
                let mut b = [0u8; 8];
                b[..self.bits as usize].copy_from_slice(&codes[off..off + self.bits as usize]);
                u64::from_le_bytes(b)
            };
            self.vals(word, table)
        }
    }

    /// The 8 values of fields `8k .. 8k+8` (`p` points at byte `k·bits`, 4
    /// readable bytes; bits <= 4, so the group lies in those 4 bytes).
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `self.bits <= 4` and 4 readable bytes at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn get(&self, p: *const u8) -> __m256 {
        // SAFETY: AVX2+FMA; the caller guarantees 4 readable bytes at p; bits <= 4
        // decodes through the registers alone (the empty table is never read).
        unsafe { self.vals((p as *const u32).read_unaligned() as u64, &[]) }
    }
}

/// Fast paths need whole 8-field groups, a 2- or 4-byte scale after the
/// packed indices, and up to 4 bits 4 readable bytes at every group start (the
/// group's `bits` bytes, read as one u32; the scale covers the overhang).
/// Wider codes (5..8 bits) read 8 bytes where they are in bounds and copy
/// the group's bytes otherwise (`Unpack::get_at`).
fn group_fast(code_size: usize, bits: u32, d: usize, n: usize, codes_len: usize) -> bool {
    let packed = scalar::packed_bytes(d, bits);
    (1..=8).contains(&bits)
        && d.is_multiple_of(8)
        && n > 0
        && matches!(code_size.checked_sub(packed), Some(2 | 4))
        && (bits > 4 || (n - 1) * code_size + (d / 8 - 1) * bits as usize + 4 <= codes_len)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn group_scores(codes: &[u8], code_size: usize, bits: u32, table: &[f32], qs: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let n = codes.len() / code_size;
    let g = qs.len() / d;
    if !group_fast(code_size, bits, d, n, codes.len()) || g == 0 || g > 8 || out.len() < g * n || table.len() < 1 << bits {
        return scalar::group_scores_ref(codes, code_size, bits, table, qs, d, scale, out);
    }
    if group_phase_ok(8, code_size, bits, d, g, table) {
        // SAFETY: AVX2 and FMA were detected (`detect_all`); `group_fast`, the
        // head count, `out` and the table were checked above, `group_phase_ok` here.
        return unsafe { dispatch_bg!(bits, g, group_scores_avx2p, codes, code_size, table, qs, d, scale, out) };
    }
    // SAFETY: AVX2 and FMA were detected (`detect_all`); `group_fast`, the
    // head count, `out` and the table were checked above.
    unsafe { group_scores_avx2(codes, code_size, bits, table, qs, d, scale, out) }
}

/// # Safety
/// The CPU supports AVX2 and FMA; the shapes `group_scores` checks: `group_fast`, 1..=8
/// heads (`qs.len() / d`), `out.len() >= g·n`, `table.len() >= 2^bits`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_scores_avx2(codes: &[u8], code_size: usize, bits: u32, table: &[f32], qs: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let n = codes.len() / code_size;
    let g = qs.len() / d;
    let ld = out.len() / g;
    let packed = scalar::packed_bytes(d, bits);
    let sb = code_size - packed;
    // SAFETY: AVX2+FMA (this function's contract). Token t < n = codes.len() /
    // code_size, so its code and scale lie in `codes`; `group_fast` gives 4
    // readable bytes at every group start up to 4 bits (`get_at`); head h < g
    // reads qs[h·d + k·8 ..][..8] with k·8 + 8 <= d; out.len() >= g·n makes
    // ld >= n, so h·ld + t < out.len().
    unsafe {
        let u = Unpack::new(bits, table);
        for t in 0..n {
            let c = codes.as_ptr().add(t * code_size);
            let mut acc = [_mm256_setzero_ps(); 8];
            for k in 0..d / 8 {
                let v = u.get_at(codes, t * code_size + k * bits as usize, table);
                for (h, a) in acc.iter_mut().enumerate().take(g) {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(qs.as_ptr().add(h * d + k * 8)), v, *a);
                }
            }
            let s = scale_at(c.add(packed), sb) * scale;
            for (h, a) in acc.iter().enumerate().take(g) {
                let x = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps(*a, 1));
                let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
                let x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
                *out.get_unchecked_mut(h * ld + t) = _mm_cvtss_f32(x) * s;
            }
        }
    }
}

pub(super) fn group_values(codes: &[u8], code_size: usize, bits: u32, table: &[f32], w: &[f32], d: usize, acc: &mut [f32]) {
    let n = codes.len() / code_size;
    let g = acc.len() / d;
    if !group_fast(code_size, bits, d, n, codes.len()) || g == 0 || w.len() < g * n || table.len() < 1 << bits {
        return scalar::group_values_ref(codes, code_size, bits, table, w, d, acc);
    }
    if group_phase_ok(8, code_size, bits, d, g, table) {
        // SAFETY: AVX2 and FMA were detected (`detect_all`); `group_fast`, the
        // head count, `w` and the table were checked above, `group_phase_ok` here.
        return unsafe { dispatch_bg!(bits, g, group_values_avx2p, codes, code_size, table, w, d, acc) };
    }
    // SAFETY: AVX2 and FMA were detected (`detect_all`); `group_fast`, the
    // head count, `w` and the table were checked above.
    unsafe { group_values_avx2(codes, code_size, bits, table, w, d, acc) }
}

/// # Safety
/// The CPU supports AVX2 and FMA; the shapes `group_values` checks: `group_fast`, at least
/// one head (`acc.len() / d`), `w.len() >= g·n`, `table.len() >= 2^bits`.
#[target_feature(enable = "avx2,fma")]
unsafe fn group_values_avx2(codes: &[u8], code_size: usize, bits: u32, table: &[f32], w: &[f32], d: usize, acc: &mut [f32]) {
    let n = codes.len() / code_size;
    let g = acc.len() / d;
    let ld = w.len() / g;
    let gv = g.min(8);
    // SAFETY: AVX2+FMA (this function's contract). Token t0 + i < n, so its
    // code and scale lie in `codes` (`scaled_weights`, `get_at` with 4 readable
    // bytes per group start from `group_fast`); head h < gv <= acc.len() / d
    // touches acc[h·d + k·8 ..][..8] with k·8 + 8 <= d; h·VBLOCK + i < 8·VBLOCK.
    unsafe {
        let u = Unpack::new(bits, table);
        let mut ws = [0.0f32; 8 * VBLOCK];
        for t0 in (0..n).step_by(VBLOCK) {
            let m = VBLOCK.min(n - t0);
            scaled_weights(codes, code_size, scalar::packed_bytes(d, bits), w, ld, gv, t0, m, &mut ws);
            // coordinate groups outer: the group's accumulators stay in registers over the block
            for k in 0..d / 8 {
                let mut a = [_mm256_setzero_ps(); 8];
                for (h, ah) in a.iter_mut().enumerate().take(gv) {
                    *ah = _mm256_loadu_ps(acc.as_ptr().add(h * d + k * 8));
                }
                for i in 0..m {
                    let v = u.get_at(codes, (t0 + i) * code_size + k * bits as usize, table);
                    for (h, ah) in a.iter_mut().enumerate().take(gv) {
                        *ah = _mm256_fmadd_ps(_mm256_set1_ps(*ws.get_unchecked(h * VBLOCK + i)), v, *ah);
                    }
                }
                for (h, ah) in a.iter().enumerate().take(gv) {
                    _mm256_storeu_ps(acc.as_mut_ptr().add(h * d + k * 8), *ah);
                }
            }
        }
        if g > 8 {
            // rare: groups wider than 8 heads fall back for the remaining heads
            let rest = &mut acc[8 * d..];
            scalar::group_values_ref(codes, code_size, bits, table, &w[8 * ld..], d, rest);
        }
    }
}

/// AVX2 analogue of `unpack_block`: the F phase vectors of the 8 code bytes
/// at `p` (4 bits: two `vpermps` halves of the 16-entry table and a blend).
///
/// # Safety
/// The CPU supports AVX2 and FMA; 8 readable bytes at `p`.
#[inline(always)]
unsafe fn unpack_block8<const BITS: u32>(p: *const u8, t0: __m256, t1: __m256) -> [__m256; 4] {
    // SAFETY: AVX2+FMA; the caller guarantees 8 readable bytes at p.
    unsafe {
        let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
        let mask = _mm256_set1_epi32((1 << BITS) - 1);
        let mut v = [_mm256_setzero_ps(); 4];
        for (r, vr) in v.iter_mut().enumerate().take(per_byte(BITS)) {
            let f = _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_set1_epi32(r as i32 * BITS as i32)), mask);
            *vr = if BITS == 4 {
                let (lo, hi) = (_mm256_permutevar8x32_ps(t0, f), _mm256_permutevar8x32_ps(t1, f));
                _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(f, 28)))
            } else {
                _mm256_permutevar8x32_ps(t0, f)
            };
        }
        v
    }
}

/// The two 8-entry halves of a table of up to 16 entries (zero-padded).
///
/// # Safety
/// The CPU supports AVX2; `bits <= 4` and `table.len() >= 2^bits`.
#[inline(always)]
unsafe fn table8x2(bits: u32, table: &[f32]) -> (__m256, __m256) {
    let mut t = [0.0f32; 16];
    t[..1 << bits].copy_from_slice(&table[..1 << bits]);
    // SAFETY: AVX2; both loads stay inside the 16 floats of `t`.
    unsafe { (_mm256_loadu_ps(t.as_ptr()), _mm256_loadu_ps(t.as_ptr().add(8))) }
}

/// # Safety
/// The CPU supports AVX2 and FMA; the shapes `group_scores` checks: `group_fast`,
/// `group_phase_ok(8, ..)` with `G` heads, `out.len() >= G·n`.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // head h indexes four accumulator sets
#[target_feature(enable = "avx2,fma")]
unsafe fn group_scores_avx2p<const BITS: u32, const G: usize>(
    codes: &[u8],
    code_size: usize,
    table: &[f32],
    qs: &[f32],
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    let n = codes.len() / code_size;
    let ld = out.len() / G;
    let packed = scalar::packed_bytes(d, BITS);
    let sb = code_size - packed;
    let f = per_byte(BITS);
    let mut qp = [0.0f32; 8 * 256];
    phase_permute(BITS, 8, d, G, qs, &mut qp, true);
    // SAFETY: AVX2+FMA (this function's contract). Token t < n: its block blk <
    // d / (8·F) reads bytes 8·blk .. 8·blk + 8 <= d / F (its packed bytes) and
    // its scale lies after them; `qp` holds 8·256 >= G·d floats (d <= 256, G <=
    // 8); out.len() >= G·n makes ld >= n, so the 4 floats at h·ld + t (t + 4 <=
    // n) and the float at h·ld + t lie in `out`.
    unsafe {
        let (t0, t1) = table8x2(BITS, table);
        let one = |t: usize, acc: &mut [__m256; G]| {
            let c = codes.as_ptr().add(t * code_size);
            for blk in 0..d / (8 * f) {
                let v = unpack_block8::<BITS>(c.add(8 * blk), t0, t1);
                for r in 0..f {
                    for (h, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.as_ptr().add(h * d + (blk * f + r) * 8)), v[r], *a);
                    }
                }
            }
        };
        let scale_of = |t: usize| scale_at(codes.as_ptr().add(t * code_size + packed), sb) * scale;
        let n4 = n / 4 * 4;
        for t in (0..n4).step_by(4) {
            let mut acc = [[_mm256_setzero_ps(); G]; 4];
            for (i, a) in acc.iter_mut().enumerate() {
                one(t + i, a);
            }
            let sc = _mm_set_ps(scale_of(t + 3), scale_of(t + 2), scale_of(t + 1), scale_of(t));
            for h in 0..G {
                let x = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][h], acc[1][h]), _mm256_hadd_ps(acc[2][h], acc[3][h]));
                let s4 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
                _mm_storeu_ps(out.as_mut_ptr().add(h * ld + t), _mm_mul_ps(s4, sc));
            }
        }
        for t in n4..n {
            let mut acc = [_mm256_setzero_ps(); G];
            one(t, &mut acc);
            let s = scale_of(t);
            for (h, a) in acc.iter().enumerate() {
                let x = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps::<1>(*a));
                let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
                let x = _mm_add_ss(x, _mm_shuffle_ps::<1>(x, x));
                *out.get_unchecked_mut(h * ld + t) = _mm_cvtss_f32(x) * s;
            }
        }
    }
}

/// # Safety
/// The CPU supports AVX2 and FMA; the shapes `group_values` checks: `group_fast`,
/// `group_phase_ok(8, ..)` with `G` heads, `w.len() >= G·n`.
#[allow(clippy::needless_range_loop)] // phase r indexes F accumulator sets
#[target_feature(enable = "avx2,fma")]
unsafe fn group_values_avx2p<const BITS: u32, const G: usize>(codes: &[u8], code_size: usize, table: &[f32], w: &[f32], d: usize, acc: &mut [f32]) {
    let n = codes.len() / code_size;
    let f = per_byte(BITS);
    let mut ap = [0.0f32; 8 * 256];
    phase_permute(BITS, 8, d, G, acc, &mut ap, true);
    // SAFETY: AVX2+FMA (this function's contract). Token b0 + i < n: its block
    // blk < d / (8·F) reads 8 bytes inside its packed bytes and its scale lies
    // after them (`scaled_weights`); `ap` holds 8·256 >= G·d floats (d <= 256,
    // G <= 8); h·VBLOCK + i < 8·VBLOCK.
    unsafe {
        let (t0, t1) = table8x2(BITS, table);
        let mut ws = [0.0f32; 8 * VBLOCK];
        for b0 in (0..n).step_by(VBLOCK) {
            let m = VBLOCK.min(n - b0);
            scaled_weights(codes, code_size, scalar::packed_bytes(d, BITS), w, w.len() / G, G, b0, m, &mut ws);
            for blk in 0..d / (8 * f) {
                let mut a = [[_mm256_setzero_ps(); G]; 4];
                for r in 0..f {
                    for (h, ah) in a[r].iter_mut().enumerate() {
                        *ah = _mm256_loadu_ps(ap.as_ptr().add(h * d + (blk * f + r) * 8));
                    }
                }
                for i in 0..m {
                    let v = unpack_block8::<BITS>(codes.as_ptr().add((b0 + i) * code_size + 8 * blk), t0, t1);
                    for h in 0..G {
                        let wb = _mm256_set1_ps(*ws.get_unchecked(h * VBLOCK + i));
                        for r in 0..f {
                            a[r][h] = _mm256_fmadd_ps(wb, v[r], a[r][h]);
                        }
                    }
                }
                for r in 0..f {
                    for (h, ah) in a[r].iter().enumerate() {
                        _mm256_storeu_ps(ap.as_mut_ptr().add(h * d + (blk * f + r) * 8), *ah);
                    }
                }
            }
        }
    }
    phase_permute(BITS, 8, d, G, &ap, acc, false);
}

/// The first 8 entries of a table with fewer than 8 (padded with zeros).
#[inline]
fn padded8(table: &[f32]) -> [f32; 8] {
    let mut t = [0.0f32; 8];
    let k = table.len().min(8);
    t[..k].copy_from_slice(&table[..k]);
    t
}

pub(super) fn fastscan_block(block: &[u8], tables: &[u8], out: &mut [u32; 32]) {
    assert!(block.len().is_multiple_of(32) && tables.len() == block.len());
    // SAFETY: AVX2 was detected (`detect_all`); both buffers hold
    // `block.len() / 32` pairs of 32 bytes (asserted above).
    unsafe { fastscan_block_avx2(block, tables, out) }
}

/// 16-bit accumulation of `pshufb` lookups. Words hold (even byte + 256·odd
/// byte) sums modulo 2^16, and a second accumulator the odd bytes alone, so
/// both byte streams are recovered exactly (`QuantizedLut` caps the entries so
/// that no true sum exceeds 65535).
///
/// # Safety
/// The CPU supports AVX2; `block.len()` is a multiple of 32 and `tables.len() == block.len()`.
#[target_feature(enable = "avx2")]
unsafe fn fastscan_block_avx2(block: &[u8], tables: &[u8], out: &mut [u32; 32]) {
    let pairs = block.len() / 32;
    let z = _mm256_setzero_si256();
    let mut acc = [z; 4];
    for p in 0..pairs {
        // SAFETY: AVX2; 32·p + 32 <= block.len() == tables.len() (the caller's contract).
        unsafe { fastscan_pair_avx2(block.as_ptr().add(32 * p), tables.as_ptr().add(32 * p), &mut acc) };
    }
    // SAFETY: AVX2 (this function's contract).
    unsafe { fastscan_finish_avx2(acc, out) }
}

/// One pair of sub-codes into the (lo, lo_odd, hi, hi_odd) accumulators.
///
/// # Safety
/// The CPU supports AVX2; `c` and `t` are valid for reads of 32 bytes each.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn fastscan_pair_avx2(c: *const u8, t: *const u8, acc: &mut [__m256i; 4]) {
    let mask = _mm256_set1_epi8(0x0F);
    // SAFETY: AVX2; the caller guarantees 32 readable bytes at c and at t.
    let (c, t) = unsafe { (_mm256_loadu_si256(c as *const __m256i), _mm256_loadu_si256(t as *const __m256i)) };
    let rlo = _mm256_shuffle_epi8(t, _mm256_and_si256(c, mask));
    let rhi = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(c, 4), mask));
    acc[0] = _mm256_add_epi16(acc[0], rlo);
    acc[1] = _mm256_add_epi16(acc[1], _mm256_srli_epi16(rlo, 8));
    acc[2] = _mm256_add_epi16(acc[2], rhi);
    acc[3] = _mm256_add_epi16(acc[3], _mm256_srli_epi16(rhi, 8));
}

/// # Safety
/// The CPU supports AVX2 (the stores stay inside `out`).
#[target_feature(enable = "avx2")]
pub(super) unsafe fn fastscan_finish_avx2(acc: [__m256i; 4], out: &mut [u32; 32]) {
    let [lo, lo_odd, hi, hi_odd] = acc;
    let lo_even = _mm256_sub_epi16(lo, _mm256_slli_epi16(lo_odd, 8));
    let hi_even = _mm256_sub_epi16(hi, _mm256_slli_epi16(hi_odd, 8));
    // Word k of the low 128 bits holds tables 2p, word k+8 tables 2p+1, both
    // for vector 2k (even words) or 2k+1 (odd words); `hi` holds vectors 16..32.
    // Widen to u32, add the halves, interleave even/odd vectors back in order.
    let halves = |v: __m256i| _mm256_add_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(v)));
    for (half, (e, o)) in [(lo_even, lo_odd), (hi_even, hi_odd)].into_iter().enumerate() {
        let (e, o) = (halves(e), halves(o));
        // unpack within 128-bit lanes: [e0 o0 e1 o1 | e4 o4 e5 o5], [e2 o2 e3 o3 | e6 o6 e7 o7]
        let a = _mm256_unpacklo_epi32(e, o);
        let b = _mm256_unpackhi_epi32(e, o);
        let first = _mm256_permute2x128_si256::<0x20>(a, b); // vectors 0..8 of this half
        let second = _mm256_permute2x128_si256::<0x31>(a, b); // vectors 8..16
                                                              // SAFETY: AVX2; `out` has 32 u32 and half < 2: the stores write 8 each
                                                              // at 16·half and 16·half + 8.
        unsafe {
            _mm256_storeu_si256(out.as_mut_ptr().add(16 * half) as *mut __m256i, first);
            _mm256_storeu_si256(out.as_mut_ptr().add(16 * half + 8) as *mut __m256i, second);
        }
    }
}

/// Checks the shapes of a multi-query fast-scan call; returns `(nb, nq)`.
pub(super) fn fastscan_multi_shape(blocks: &[u8], tables: &[u8], bb: usize, out: &[u32]) -> (usize, usize) {
    assert!(bb > 0 && bb.is_multiple_of(32) && blocks.len().is_multiple_of(bb) && tables.len().is_multiple_of(bb), "fast-scan shapes");
    let (nb, nq) = (blocks.len() / bb, tables.len() / bb);
    assert_eq!(out.len(), nb * nq * 32, "fast-scan output size");
    (nb, nq)
}

/// Queries per pass of the AVX2 multi-query kernel: 4 accumulators each, so
/// that 2 queries, the nibble masks and a table fit the 16 registers (3 or 4
/// spill and measure slower, `cargo run -p tq-core --release --example fastscan_multi`).
const MULTI_G: usize = 2;

pub(super) fn fastscan_multi(blocks: &[u8], tables: &[u8], bb: usize, out: &mut [u32]) {
    let (nb, nq) = fastscan_multi_shape(blocks, tables, bb, out);
    let mut q = 0;
    while q < nq {
        let g = (nq - q).min(MULTI_G);
        let (t, o) = (&tables[q * bb..(q + g) * bb], &mut out[q * nb * 32..(q + g) * nb * 32]);
        // SAFETY: AVX2 was detected (`detect_all`); `t` holds g tables of bb
        // bytes, `blocks` nb blocks of bb bytes (bb a multiple of 32) and `o`
        // g·nb·32 sums (checked by `fastscan_multi_shape`).
        unsafe {
            match g {
                1 => fastscan_multi_avx2::<1>(blocks, t, bb, o),
                _ => fastscan_multi_avx2::<2>(blocks, t, bb, o),
            }
        }
        q += g;
    }
}

/// `G` queries over every block: each 32-byte load of codes and its two
/// nibble masks serve the `G` tables (the accumulation of `fastscan_pair_avx2`).
///
/// # Safety
/// The CPU supports AVX2; `tables` holds `G` tables of `bb` bytes, `blocks` a
/// whole number of blocks of `bb` bytes (a multiple of 32), and
/// `out.len() == G · (blocks.len() / bb) · 32`.
#[target_feature(enable = "avx2")]
unsafe fn fastscan_multi_avx2<const G: usize>(blocks: &[u8], tables: &[u8], bb: usize, out: &mut [u32]) {
    let (nb, pairs) = (blocks.len() / bb, bb / 32);
    let mask = _mm256_set1_epi8(0x0F);
    let z = _mm256_setzero_si256();
    for b in 0..nb {
        let mut acc = [[z; 4]; G];
        for p in 0..pairs {
            // SAFETY: AVX2; b·bb + 32·p + 32 <= nb·bb = blocks.len().
            let c = unsafe { _mm256_loadu_si256(blocks.as_ptr().add(b * bb + 32 * p) as *const __m256i) };
            let clo = _mm256_and_si256(c, mask);
            let chi = _mm256_and_si256(_mm256_srli_epi16(c, 4), mask);
            for (g, a) in acc.iter_mut().enumerate() {
                // SAFETY: AVX2; g·bb + 32·p + 32 <= G·bb = tables.len().
                let t = unsafe { _mm256_loadu_si256(tables.as_ptr().add(g * bb + 32 * p) as *const __m256i) };
                let rlo = _mm256_shuffle_epi8(t, clo);
                let rhi = _mm256_shuffle_epi8(t, chi);
                a[0] = _mm256_add_epi16(a[0], rlo);
                a[1] = _mm256_add_epi16(a[1], _mm256_srli_epi16(rlo, 8));
                a[2] = _mm256_add_epi16(a[2], rhi);
                a[3] = _mm256_add_epi16(a[3], _mm256_srli_epi16(rhi, 8));
            }
        }
        for (g, a) in acc.into_iter().enumerate() {
            let o: &mut [u32; 32] = (&mut out[(g * nb + b) * 32..(g * nb + b + 1) * 32]).try_into().expect("32 sums");
            // SAFETY: AVX2 (this function's contract).
            unsafe { fastscan_finish_avx2(a, o) }
        }
    }
}

pub(super) fn fastscan_values(sums: &[u32], factors: &[f32], bias: f32, delta: f32, out: &mut [f32], maxes: &mut [f32]) {
    assert!(factors.len() == out.len() && sums.len() >= out.len() && maxes.len() == out.len().div_ceil(32), "fast-scan value shapes");
    // SAFETY: AVX2 was detected (`detect_all`); the lengths are checked above.
    unsafe { fastscan_values_avx2(sums, factors, bias, delta, out) };
    for (m, c) in maxes.iter_mut().zip(out.chunks(32)) {
        *m = c.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    }
}

/// # Safety
/// The CPU supports AVX2; `factors.len() == out.len() <= sums.len()`.
#[target_feature(enable = "avx2")]
unsafe fn fastscan_values_avx2(sums: &[u32], factors: &[f32], bias: f32, delta: f32, out: &mut [f32]) {
    let n = out.len();
    let (b, d) = (_mm256_set1_ps(bias), _mm256_set1_ps(delta));
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: AVX2; i + 8 <= n <= sums.len() and == factors.len() == out.len().
        unsafe {
            // sums are below 2^31: the signed conversion is exact as `s as f32`
            let s = _mm256_cvtepi32_ps(_mm256_loadu_si256(sums.as_ptr().add(i) as *const __m256i));
            let v = _mm256_add_ps(b, _mm256_mul_ps(d, s));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(_mm256_loadu_ps(factors.as_ptr().add(i)), v));
        }
        i += 8;
    }
    for j in i..n {
        out[j] = factors[j] * (bias + delta * sums[j] as f32);
    }
}

// ---------------------------------------------------------------------------
// Batched fast-scan search: candidate selection
// ---------------------------------------------------------------------------

pub(super) fn fastscan_select(sums: &[u32], factors: &[f32], sqnorms: Option<&[f32]>, bd: (f32, f32), thr: f32, out: &mut [f32], idx: &mut [u32]) -> usize {
    let n = factors.len();
    assert!(sums.len() >= n && out.len() >= n && idx.len() >= n && sqnorms.is_none_or(|q| q.len() >= n), "fast-scan select shapes");
    // SAFETY: AVX2 was detected (`detect_all`); the lengths are checked above.
    unsafe { fastscan_select_avx2(sums, factors, sqnorms, bd, thr, out, idx) }
}

/// Eight estimates per step (the operations of the reference, no FMA); the
/// lanes not below the threshold (`!(v < thr)`, NaN included) are written out
/// one by one from the comparison's bit mask, in order.
///
/// # Safety
/// The CPU supports AVX2; `sums`, `out`, `idx` (and `sqnorms`) hold at least `factors.len()` elements.
#[target_feature(enable = "avx2")]
unsafe fn fastscan_select_avx2(
    sums: &[u32],
    factors: &[f32],
    sqnorms: Option<&[f32]>,
    (bias, delta): (f32, f32),
    thr: f32,
    out: &mut [f32],
    idx: &mut [u32],
) -> usize {
    let n = factors.len();
    let (b, d, t, two) = (_mm256_set1_ps(bias), _mm256_set1_ps(delta), _mm256_set1_ps(thr), _mm256_set1_ps(2.0));
    let mut c = 0;
    let mut i = 0;
    while i + 8 <= n {
        let mut lanes = [0.0f32; 8];
        // SAFETY: AVX2; i + 8 <= n, within every slice (the contract).
        let mask = unsafe {
            // sums are below 2^31: the signed conversion is exact as `s as f32`
            let s = _mm256_cvtepi32_ps(_mm256_loadu_si256(sums.as_ptr().add(i) as *const __m256i));
            let mut v = _mm256_mul_ps(_mm256_loadu_ps(factors.as_ptr().add(i)), _mm256_add_ps(b, _mm256_mul_ps(d, s)));
            if let Some(q) = sqnorms {
                v = _mm256_sub_ps(_mm256_mul_ps(two, v), _mm256_loadu_ps(q.as_ptr().add(i)));
            }
            let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLT_UQ>(v, t)) as u32;
            if m != 0 {
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            }
            m
        };
        let mut m = mask;
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            out[c] = lanes[j];
            idx[c] = (i + j) as u32;
            c += 1;
            m &= m - 1;
        }
        i += 8;
    }
    // the tail: the reference on the last elements, positions shifted back
    let tail = scalar::fastscan_select_ref(&sums[i..n], &factors[i..], sqnorms.map(|q| &q[i..n]), (bias, delta), thr, &mut out[c..n], &mut idx[c..n]);
    idx[c..c + tail].iter_mut().for_each(|j| *j += i as u32);
    c + tail
}
