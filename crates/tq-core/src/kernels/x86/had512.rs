//! AVX-512F kernels of the Hadamard rounds of dimensions that are not powers
//! of two (`Kernels::had_round`, `had_round_t`): 16-lane masked gathers with
//! the sign masks, the four lowest FWHT stages inside each register, the next
//! ones across up to 16 registers held over one pass (a block of 256 floats
//! is one pass), the scale fused into the last pass. Every butterfly adds or
//! subtracts the operands of `scalar::fwht_ref` and every product is the
//! reference's, so the bits are the reference's.

use super::avx2;
use crate::kernels::HadRound;
use std::arch::x86_64::*;

/// FWHT stages h = 1, 2, 4, 8 inside one 16-lane register (lanes whose bit
/// `h` is clear get `x[j] + x[j^h]`, the others `x[j^h] - x[j]`: `a + b` and
/// `a - b` of the reference).
#[inline]
#[target_feature(enable = "avx512f")]
fn low4(mut v: __m512) -> __m512 {
    // every lane takes sw + ±1·v in one fused multiply-add: ±1·v is exact, so
    // the single rounding gives sw + v on the low lanes and sw - v on the
    // high ones, the reference's `a + b` and `a - b` bit for bit
    let pm = |k: __mmask16| _mm512_mask_blend_ps(k, _mm512_set1_ps(1.0), _mm512_set1_ps(-1.0));
    let sw = _mm512_permute_ps::<0b10_11_00_01>(v);
    v = _mm512_fmadd_ps(v, pm(0xAAAA), sw);
    let sw = _mm512_permute_ps::<0b01_00_11_10>(v);
    v = _mm512_fmadd_ps(v, pm(0xCCCC), sw);
    let sw = _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v);
    v = _mm512_fmadd_ps(v, pm(0xF0F0), sw);
    let sw = _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v);
    _mm512_fmadd_ps(v, pm(0xFF00), sw)
}

/// Butterflies across the `R` registers of `v` at register distances 1, 2, ..
/// R/2 (stages h = 16 .. 8·R of 16·R consecutive floats).
#[inline]
#[target_feature(enable = "avx512f")]
fn cross<const R: usize>(v: &mut [__m512; R]) {
    let mut d = 1;
    while d < R {
        for r in 0..R {
            if r & d == 0 {
                let (a, b) = (v[r], v[r + d]);
                v[r] = _mm512_add_ps(a, b);
                v[r + d] = _mm512_sub_ps(a, b);
            }
        }
        d *= 2;
    }
}

/// A masked gather `src[gather[j]] ^ masks[j]` read by the first pass of a block.
#[derive(Clone, Copy)]
struct Gather {
    src: *const f32,
    gather: *const u32,
    masks: *const u32,
}

/// The first pass over the block of `p` floats at `x`: groups of `R` = min(16,
/// p/16) consecutive registers, stages h = 1 .. 8·R, scaled by `scale` when
/// that is every stage (`p == 16·R`); it reads the block itself, or when `G`
/// the gather `from` (position j of the block from `from`'s j-th index).
/// Returns the next stage `h = 16·R`.
///
/// # Safety
/// The CPU supports AVX-512F; `x` is valid for reads and writes of `p` floats,
/// `p = 16·R·k` (a power of two >= 16·R); when `G`, `from.gather` and
/// `from.masks` hold `p` elements and every index is below the length of the
/// buffer at `from.src`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn first_pass<const R: usize, const G: bool>(x: *mut f32, p: usize, scale: __m512, from: Gather) -> usize {
    // loads and `low4` in one loop: a plain load loop into the array would be
    // turned into a memcpy call around a stack copy
    let last = p == 16 * R;
    let mut base = 0;
    while base < p {
        let mut v = [_mm512_setzero_ps(); R];
        for (r, reg) in v.iter_mut().enumerate() {
            let c = base + 16 * r;
            // SAFETY: c + 16 <= p floats at `x`; when G, c + 16 <= p indices and
            // masks at `from`, every index inside `from.src` (the caller's contract).
            *reg = low4(unsafe {
                if G {
                    let idx = _mm512_loadu_si512(from.gather.add(c) as *const __m512i);
                    let m = _mm512_loadu_si512(from.masks.add(c) as *const __m512i);
                    _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_i32gather_ps::<4>(idx, from.src)), m))
                } else {
                    _mm512_loadu_ps(x.add(c))
                }
            });
        }
        cross(&mut v);
        for (r, reg) in v.iter().enumerate() {
            let out = if last { _mm512_mul_ps(*reg, scale) } else { *reg };
            // SAFETY: base + 16·r + 16 <= p floats at `x`.
            unsafe { _mm512_storeu_ps(x.add(base + 16 * r), out) };
        }
        base += 16 * R;
    }
    16 * R
}

/// Stages h, 2h, .. (R/2)·h of the `p` floats at `x` in one pass (`R`
/// registers at stride h), scaled when `S`.
///
/// # Safety
/// The CPU supports AVX-512F; `x` is valid for reads and writes of `p` floats;
/// `R·h <= p`, both powers of two, `h >= 16`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pass<const R: usize, const S: bool>(x: *mut f32, p: usize, h: usize, scale: __m512) {
    for base in (0..p).step_by(R * h) {
        for j in (base..base + h).step_by(16) {
            let mut v = [_mm512_setzero_ps(); R];
            for (r, reg) in v.iter_mut().enumerate() {
                // SAFETY: j + r·h + 16 <= base + R·h <= p.
                *reg = unsafe { _mm512_loadu_ps(x.add(j + r * h)) };
            }
            cross(&mut v);
            for (r, reg) in v.iter().enumerate() {
                let out = if S { _mm512_mul_ps(*reg, scale) } else { *reg };
                // SAFETY: as for the load.
                unsafe { _mm512_storeu_ps(x.add(j + r * h), out) };
            }
        }
    }
}

/// `x[..p] ← scale · H x[..p]`, the input read from `from` when `G`.
///
/// # Safety
/// The CPU supports AVX-512F; `x` is valid for reads and writes of `p` floats,
/// `p` a power of two >= 16; when `G`, as in [`first_pass`].
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block<const G: bool>(x: *mut f32, p: usize, scale: f32, from: Gather) {
    let sc = _mm512_set1_ps(scale);
    // SAFETY: AVX-512F; p = 16·R·k for the R chosen, and every later pass has
    // R·h <= p with h >= 16 (the loop stops at h = p); the gather as the caller's contract.
    unsafe {
        let mut h = match p {
            16 => first_pass::<1, G>(x, p, sc, from),
            32 => first_pass::<2, G>(x, p, sc, from),
            64 => first_pass::<4, G>(x, p, sc, from),
            128 => first_pass::<8, G>(x, p, sc, from),
            _ => first_pass::<16, G>(x, p, sc, from),
        };
        while h < p {
            if h * 8 < p {
                pass::<8, false>(x, p, h, sc);
                h *= 8;
            } else if h * 8 == p {
                pass::<8, true>(x, p, h, sc);
                h *= 8;
            } else if h * 4 == p {
                pass::<4, true>(x, p, h, sc);
                h *= 4;
            } else {
                pass::<2, true>(x, p, h, sc);
                h *= 2;
            }
        }
    }
}

/// `dst[j] = src[gather[j]] ^ mask[j]` for `j` in `from..to` (16 per gather, a
/// masked gather for the rest).
///
/// # Safety
/// The CPU supports AVX-512F; `src` and `dst` hold `r.len()` floats, `from <= to <= r.len()`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn gather_masked(src: *const f32, r: &HadRound, dst: *mut f32, from: usize, to: usize) {
    let (g, m) = (r.gather().as_ptr(), r.masks().as_ptr());
    let mut c = from;
    while c < to {
        let k: __mmask16 = if to - c >= 16 { 0xFFFF } else { (1u16 << (to - c)) - 1 };
        // SAFETY: the lanes of `k` are positions c .. min(c + 16, to) <= n of the
        // indices, masks and `dst`; the masked-off lanes are not read nor
        // written; every index read is below n (`HadRound::new`).
        unsafe {
            let idx = _mm512_maskz_loadu_epi32(k, g.add(c) as *const i32);
            let mk = _mm512_maskz_loadu_epi32(k, m.add(c) as *const i32);
            let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), k, idx, src);
            _mm512_mask_storeu_ps(dst.add(c), k, _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), mk)));
        }
        c += 16;
    }
}

pub(super) fn had_round(src: &[f32], r: &HadRound, dst: &mut [f32]) {
    let n = r.len();
    assert!(src.len() == n && dst.len() == n, "a Hadamard round of {n} coordinates");
    if r.block() < 16 {
        return avx2::had_round(src, r, dst);
    }
    // SAFETY: AVX-512F was detected (`detect_all` hands out the tables naming
    // this only then); `src` and `dst` hold n floats (asserted); `HadRound::new`
    // checked the indices (below n), the masks and the block (a power of two,
    // n/2 < p <= n), and p >= 16 here.
    unsafe { had_round_512(src, r, dst) }
}

/// # Safety
/// As `had_round` checks: AVX-512F, `src` and `dst` of `r.len()` floats, `r.block() >= 16`.
#[target_feature(enable = "avx512f")]
unsafe fn had_round_512(src: &[f32], r: &HadRound, dst: &mut [f32]) {
    let (n, p) = (r.len(), r.block());
    let d = dst.as_mut_ptr();
    // SAFETY: AVX-512F; the first block [0, p) is gathered (p <= n indices and
    // masks, every index below n = src's length, `HadRound::new`) and
    // transformed in `dst`, [p, n) gathered, then the block [n - p, n) of `dst`
    // transformed.
    unsafe {
        let from = Gather { src: src.as_ptr(), gather: r.gather().as_ptr(), masks: r.masks().as_ptr() };
        block::<true>(d, p, r.scale(), from);
        gather_masked(src.as_ptr(), r, d, p, n);
        if n != p {
            block::<false>(d.add(n - p), p, r.scale(), from);
        }
    }
}

pub(super) fn had_round_t(src: &mut [f32], r: &HadRound, dst: &mut [f32]) {
    let n = r.len();
    assert!(src.len() == n && dst.len() == n, "a Hadamard round of {n} coordinates");
    if r.block() < 16 {
        return avx2::had_round_t(src, r, dst);
    }
    // SAFETY: as in `had_round`.
    unsafe { had_round_t_512(src, r, dst) }
}

/// # Safety
/// As `had_round_t` checks: AVX-512F, `src` and `dst` of `r.len()` floats, `r.block() >= 16`.
#[target_feature(enable = "avx512f")]
unsafe fn had_round_t_512(src: &mut [f32], r: &HadRound, dst: &mut [f32]) {
    let (n, p) = (r.len(), r.block());
    let s = src.as_mut_ptr();
    // SAFETY: AVX-512F; both blocks lie in the n floats of `src`; the gather
    // covers 0..n of `dst`, its indices below n.
    unsafe {
        let none = Gather { src: s, gather: std::ptr::null(), masks: std::ptr::null() };
        if n != p {
            block::<false>(s.add(n - p), p, r.scale(), none);
        }
        block::<false>(s, p, r.scale(), none);
        gather_masked(s, r, dst.as_mut_ptr(), 0, n);
    }
}
