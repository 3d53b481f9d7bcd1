//! AVX-512F/BW kernels: group attention over 2- and 4-bit codebook codes
//! (and 3- and 5-bit codes in natural order) and fast scan.
//!
//! 16 code bytes are widened to 16 dword lanes at once; with F = 8 / bits
//! fields per byte, phase r (0..F) of the lanes holds fields `F·i + r` of the
//! block, decoded by one `vpermps` over the 16-entry table. The kernels thus
//! see each block's coordinates deinterleaved (phase-major): queries are
//! permuted into that order once per call, value sums are accumulated in it
//! and permuted back on store, so every coordinate's sum over tokens runs in
//! the reference's token order (values: the same bits as the AVX2 path).

use super::avx2::{fastscan_finish_avx2, fastscan_pair_avx2, group_scores, group_values};
use super::scalar;
use super::{group_phase_ok, per_byte, phase_permute, scale_at, scaled_weights, VBLOCK};
use std::arch::x86_64::*;

/// The F phase vectors of the 16 code bytes at `p`, decoded through `table`.
///
/// # Safety
/// The CPU supports AVX-512F and AVX-512BW; 16 readable bytes at `p`.
#[inline(always)]
unsafe fn unpack_block<const BITS: u32>(p: *const u8, table: __m512) -> [__m512; 4] {
    // SAFETY: AVX-512F/BW; the caller guarantees 16 readable bytes at p.
    unsafe {
        let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        let mask = _mm512_set1_epi32((1 << BITS) - 1);
        let mut v = [_mm512_setzero_ps(); 4];
        for (r, vr) in v.iter_mut().enumerate().take(per_byte(BITS)) {
            let f = _mm512_and_si512(_mm512_srlv_epi32(b, _mm512_set1_epi32(r as i32 * BITS as i32)), mask);
            *vr = _mm512_permutexvar_ps(f, table);
        }
        v
    }
}

/// # Safety
/// The CPU supports AVX-512F and AVX-512BW; `bits <= 4` and `table.len() >= 2^bits`.
#[inline(always)]
unsafe fn table16(bits: u32, table: &[f32]) -> __m512 {
    let mut t = [0.0f32; 16];
    t[..1 << bits].copy_from_slice(&table[..1 << bits]);
    // SAFETY: AVX-512F; the load reads the 16 floats of `t`.
    unsafe { _mm512_loadu_ps(t.as_ptr()) }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn group_scores_512(codes: &[u8], code_size: usize, bits: u32, table: &[f32], qs: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let n = codes.len() / code_size;
    let g = qs.len() / d;
    if !group_phase_ok(16, code_size, bits, d, g, table) || out.len() < g * n {
        if wide_ok(code_size, bits, d, g, table) && out.len() >= g * n {
            // SAFETY: AVX-512F/BW were detected (`detect_all` hands out this table
            // only then); `wide_ok` and `out.len() >= g·n` checked here.
            return unsafe { dispatch_g!(g, group_scores_wide512, codes, code_size, bits, table, qs, d, scale, out) };
        }
        return group_scores(codes, code_size, bits, table, qs, d, scale, out);
    }
    // SAFETY: AVX-512F/BW were detected (`detect_all`); `group_phase_ok` and
    // `out.len() >= g·n` checked above (every code holds d·bits/8 packed bytes,
    // then its 2- or 4-byte scale).
    unsafe { dispatch_bg!(bits, g, group_scores_avx512, codes, code_size, table, qs, d, scale, out) }
}

/// # Safety
/// The CPU supports AVX-512F and AVX-512BW; the shapes `group_scores_512` checks:
/// `group_phase_ok(16, ..)` with `G` heads, `out.len() >= G·n`.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // head h indexes four accumulator sets
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn group_scores_avx512<const BITS: u32, const G: usize>(
    codes: &[u8],
    code_size: usize,
    table: &[f32],
    qs: &[f32],
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    let n = codes.len() / code_size;
    let packed = scalar::packed_bytes(d, BITS);
    let sb = code_size - packed;
    let f = per_byte(BITS);
    // the queries in phase order
    let mut qp = [0.0f32; 8 * 256];
    phase_permute(BITS, 16, d, G, qs, &mut qp, true);
    // SAFETY: AVX-512F/BW (this function's contract). Token t < n: its block
    // blk < d / (16·F) reads bytes 16·blk .. 16·blk + 16 <= d / F (its packed
    // bytes) and its scale lies after them; `qp` holds 8·256 >= G·d floats;
    // out.len() >= G·n, so `scores_by4` gets G rows of ld = out.len() / G >= n.
    unsafe {
        let tab = table16(BITS, table);
        let one = |t: usize, acc: &mut [__m512; G]| {
            let c = codes.as_ptr().add(t * code_size);
            for blk in 0..d / (16 * f) {
                let v = unpack_block::<BITS>(c.add(16 * blk), tab);
                for r in 0..f {
                    for (h, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.as_ptr().add(h * d + (blk * f + r) * 16)), v[r], *a);
                    }
                }
            }
        };
        let scale_of = |t: usize| scale_at(codes.as_ptr().add(t * code_size + packed), sb) * scale;
        scores_by4::<G>(n, out.len() / G, out, one, scale_of);
    }
}

/// The token loop of the AVX-512 score kernels: `one(t, acc)` adds token
/// `t`'s products into its `G` head accumulators; four tokens at a time, one
/// transpose-add tree gives their four sums per head, times `scale_of(t)`,
/// stored at `out[h·ld + t]`.
///
/// # Safety
/// The CPU supports AVX-512F and AVX-512BW; `out` holds `G` rows of `ld ≥ n` floats (`out.len() >= G·ld`);
/// `one` and `scale_of` are sound for every token `t < n`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // head h indexes four accumulator sets
unsafe fn scores_by4<const G: usize>(n: usize, ld: usize, out: &mut [f32], one: impl Fn(usize, &mut [__m512; G]), scale_of: impl Fn(usize) -> f32) {
    // SAFETY: AVX-512F/BW (this function's contract); t + 4 <= n4 <= n <= ld and
    // h < G, so the 4 floats at h·ld + t and the float at h·ld + t lie in `out`.
    unsafe {
        let n4 = n / 4 * 4;
        for t in (0..n4).step_by(4) {
            let mut acc = [[_mm512_setzero_ps(); G]; 4];
            for (i, a) in acc.iter_mut().enumerate() {
                one(t + i, a);
            }
            let sc = _mm_set_ps(scale_of(t + 3), scale_of(t + 2), scale_of(t + 1), scale_of(t));
            for h in 0..G {
                store_sums4(acc[0][h], acc[1][h], acc[2][h], acc[3][h], sc, out.as_mut_ptr().add(h * ld + t));
            }
        }
        for t in n4..n {
            let mut acc = [_mm512_setzero_ps(); G];
            one(t, &mut acc);
            let s = scale_of(t);
            for (h, a) in acc.iter().enumerate() {
                *out.get_unchecked_mut(h * ld + t) = _mm512_reduce_add_ps(*a) * s;
            }
        }
    }
}

/// The four sums of `a0..a3` (one token each), times `sc`, stored at `out`.
///
/// # Safety
/// The CPU supports AVX-512F and AVX-512BW; `out` is valid for writes of 4 floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn store_sums4(a0: __m512, a1: __m512, a2: __m512, a3: __m512, sc: __m128, out: *mut f32) {
    let t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    let t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    let u4 = _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(t0, t1), _mm512_shuffle_ps::<0b11_10_11_10>(t0, t1));
    let h8 = _mm256_add_ps(_mm512_castps512_ps256(u4), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(u4))));
    let s4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
    // SAFETY: AVX-512F/BW; the caller guarantees 4 writable floats at out.
    unsafe { _mm_storeu_ps(out, _mm_mul_ps(s4, sc)) }
}

/// 3- and 5-bit codes (fields straddle bytes) on AVX-512: 16 consecutive
/// fields (2·bits bytes) per step, in natural coordinate order.
fn wide_ok(code_size: usize, bits: u32, d: usize, g: usize, table: &[f32]) -> bool {
    (bits == 3 || bits == 5)
        && d.is_multiple_of(16)
        && d <= 256
        && matches!(code_size.checked_sub(scalar::packed_bytes(d, bits)), Some(2 | 4))
        && (1..=8).contains(&g)
        && table.len() >= 1 << bits
}

/// Decoder of 16 fields of 3 or 5 bits: the group's bytes broadcast to every
/// 128-bit lane, each dword lane gathers the two bytes its field spans
/// (`vpshufb`), shifts and masks, then `vpermps` (3 bits, 8 entries) or
/// `vpermt2ps` (5 bits, 32 entries) over the table.
struct Wide16 {
    shuf: __m512i,
    shifts: __m512i,
    mask: __m512i,
    lo: __m512,
    hi: __m512,
    bits: u32,
}

impl Wide16 {
    /// # Safety
    /// The CPU supports AVX-512F and AVX-512BW; `bits <= 5` and `table.len() >= 2^bits`.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn new(bits: u32, table: &[f32]) -> Self {
        let mut t = [0.0f32; 32];
        t[..1 << bits].copy_from_slice(&table[..1 << bits]);
        let mut shuf = [-1i8; 64];
        let mut sh = [0i32; 16];
        for j in 0..16 {
            let start = j * bits as usize;
            let o = (start / 8) as i8;
            // lane j of the 512-bit vector sits in 128-bit lane j / 4; every lane holds the same 16 bytes
            shuf[4 * j] = o;
            shuf[4 * j + 1] = if (o as usize) < 15 { o + 1 } else { -1 };
            sh[j] = (start % 8) as i32;
        }
        // SAFETY: AVX-512F (this function's contract); `shuf`, `sh` and `t` have
        // the 64 bytes each load reads (`t` at 0 and 16 of its 32 floats).
        unsafe {
            Wide16 {
                shuf: _mm512_loadu_si512(shuf.as_ptr() as *const _),
                shifts: _mm512_loadu_si512(sh.as_ptr() as *const _),
                mask: _mm512_set1_epi32((1 << bits) - 1),
                lo: _mm512_loadu_ps(t.as_ptr()),
                hi: _mm512_loadu_ps(t.as_ptr().add(16)),
                bits,
            }
        }
    }

    /// The 16 table values of the field group at byte `off` of `codes`
    /// (16 bytes read where in bounds, else the group's 2·bits bytes copied).
    ///
    /// # Safety
    /// The CPU supports AVX-512F and AVX-512BW; the group's `2·bits` bytes at `off` lie in `codes`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn get(&self, codes: &[u8], off: usize) -> __m512 {
        // SAFETY: AVX-512F/BW; the 16-byte read is guarded by its bounds check,
        // the copy of the group's 2·bits bytes is bounds-checked slicing.
        unsafe {
            let b = if off + 16 <= codes.len() {
                _mm_loadu_si128(codes.as_ptr().add(off) as *const __m128i)
            } else {
                let mut t = [0u8; 16];
                let k = 2 * self.bits as usize;
                t[..k].copy_from_slice(&codes[off..off + k]);
                _mm_loadu_si128(t.as_ptr() as *const __m128i)
            };
            let v = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(b), self.shuf);
            let idx = _mm512_and_si512(_mm512_srlv_epi32(v, self.shifts), self.mask);
            if self.bits == 5 {
                _mm512_permutex2var_ps(self.lo, idx, self.hi)
            } else {
                _mm512_permutexvar_ps(idx, self.lo)
            }
        }
    }
}

/// # Safety
/// The CPU supports AVX-512F and AVX-512BW; the shapes `group_scores_512` checks:
/// `wide_ok` with `G` heads, `out.len() >= G·n`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn group_scores_wide512<const G: usize>(codes: &[u8], code_size: usize, bits: u32, table: &[f32], qs: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let n = codes.len() / code_size;
    let packed = scalar::packed_bytes(d, bits);
    let sb = code_size - packed;
    // SAFETY: AVX-512F/BW (this function's contract). Token t < n: group k <
    // d / 16 spans bytes 2·bits·k .. 2·bits·(k + 1) <= d·bits / 8 of its code and
    // its scale lies after them; head h < G = qs.len() / d reads qs[h·d + 16·k ..][..16];
    // out.len() >= G·n, so `scores_by4` gets G rows of ld = out.len() / G >= n.
    unsafe {
        let u = Wide16::new(bits, table);
        let one = |t: usize, acc: &mut [__m512; G]| {
            for k in 0..d / 16 {
                let v = u.get(codes, t * code_size + k * 2 * bits as usize);
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(qs.as_ptr().add(h * d + k * 16)), v, *a);
                }
            }
        };
        let scale_of = |t: usize| scale_at(codes.as_ptr().add(t * code_size + packed), sb) * scale;
        scores_by4::<G>(n, out.len() / G, out, one, scale_of);
    }
}

/// # Safety
/// The CPU supports AVX-512F and AVX-512BW; the shapes `group_values_512` checks:
/// `wide_ok` with `G` heads (`acc.len() >= G·d`), `w.len() >= G·n`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn group_values_wide512<const G: usize>(codes: &[u8], code_size: usize, bits: u32, table: &[f32], w: &[f32], d: usize, acc: &mut [f32]) {
    let n = codes.len() / code_size;
    // SAFETY: AVX-512F/BW (this function's contract). Token t0 + i < n: its
    // groups and scale lie in its code (as in `group_scores_wide512`); head h <
    // G = acc.len() / d touches acc[h·d + 16·k ..][..16]; h·VBLOCK + i < 8·VBLOCK.
    unsafe {
        let u = Wide16::new(bits, table);
        let mut ws = [0.0f32; 8 * VBLOCK];
        for t0 in (0..n).step_by(VBLOCK) {
            let m = VBLOCK.min(n - t0);
            scaled_weights(codes, code_size, scalar::packed_bytes(d, bits), w, w.len() / G, G, t0, m, &mut ws);
            for k in 0..d / 16 {
                let mut a = [_mm512_setzero_ps(); G];
                for (h, ah) in a.iter_mut().enumerate() {
                    *ah = _mm512_loadu_ps(acc.as_ptr().add(h * d + k * 16));
                }
                for i in 0..m {
                    let v = u.get(codes, (t0 + i) * code_size + k * 2 * bits as usize);
                    for (h, ah) in a.iter_mut().enumerate() {
                        *ah = _mm512_fmadd_ps(_mm512_set1_ps(*ws.get_unchecked(h * VBLOCK + i)), v, *ah);
                    }
                }
                for (h, ah) in a.iter().enumerate() {
                    _mm512_storeu_ps(acc.as_mut_ptr().add(h * d + k * 16), *ah);
                }
            }
        }
    }
}

pub(super) fn group_values_512(codes: &[u8], code_size: usize, bits: u32, table: &[f32], w: &[f32], d: usize, acc: &mut [f32]) {
    let n = codes.len() / code_size;
    let g = acc.len() / d;
    if !group_phase_ok(16, code_size, bits, d, g, table) || w.len() < g * n {
        if wide_ok(code_size, bits, d, g, table) && w.len() >= g * n {
            // SAFETY: AVX-512F/BW were detected (`detect_all`); `wide_ok` and
            // `w.len() >= g·n` checked here.
            return unsafe { dispatch_g!(g, group_values_wide512, codes, code_size, bits, table, w, d, acc) };
        }
        return group_values(codes, code_size, bits, table, w, d, acc);
    }
    // SAFETY: AVX-512F/BW were detected (`detect_all`); `group_phase_ok` and
    // `w.len() >= g·n` checked above.
    unsafe { dispatch_bg!(bits, g, group_values_avx512, codes, code_size, table, w, d, acc) }
}

/// # Safety
/// The CPU supports AVX-512F and AVX-512BW; the shapes `group_values_512` checks:
/// `group_phase_ok(16, ..)` with `G` heads, `w.len() >= G·n`.
#[allow(clippy::needless_range_loop)] // phase r indexes F accumulator sets
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn group_values_avx512<const BITS: u32, const G: usize>(codes: &[u8], code_size: usize, table: &[f32], w: &[f32], d: usize, acc: &mut [f32]) {
    let n = codes.len() / code_size;
    let f = per_byte(BITS);
    // the sums in phase order
    let mut ap = [0.0f32; 8 * 256];
    phase_permute(BITS, 16, d, G, acc, &mut ap, true);
    // SAFETY: AVX-512F/BW (this function's contract). Token t0 + i < n: its
    // block blk < d / (16·F) reads 16 bytes inside its packed bytes and its
    // scale lies after them (`scaled_weights`); `ap` holds 8·256 >= G·d floats;
    // h·VBLOCK + i < 8·VBLOCK.
    unsafe {
        let tab = table16(BITS, table);
        let mut ws = [0.0f32; 8 * VBLOCK];
        for t0 in (0..n).step_by(VBLOCK) {
            let m = VBLOCK.min(n - t0);
            scaled_weights(codes, code_size, scalar::packed_bytes(d, BITS), w, w.len() / G, G, t0, m, &mut ws);
            // one 16-byte block of every token at a time: its F·G sums stay in registers
            for blk in 0..d / (16 * f) {
                let mut a = [[_mm512_setzero_ps(); G]; 4];
                for r in 0..f {
                    for (h, ah) in a[r].iter_mut().enumerate() {
                        *ah = _mm512_loadu_ps(ap.as_ptr().add(h * d + (blk * f + r) * 16));
                    }
                }
                for i in 0..m {
                    let v = unpack_block::<BITS>(codes.as_ptr().add((t0 + i) * code_size + 16 * blk), tab);
                    for h in 0..G {
                        let wb = _mm512_set1_ps(*ws.get_unchecked(h * VBLOCK + i));
                        for r in 0..f {
                            a[r][h] = _mm512_fmadd_ps(wb, v[r], a[r][h]);
                        }
                    }
                }
                for r in 0..f {
                    for (h, ah) in a[r].iter().enumerate() {
                        _mm512_storeu_ps(ap.as_mut_ptr().add(h * d + (blk * f + r) * 16), *ah);
                    }
                }
            }
        }
    }
    phase_permute(BITS, 16, d, G, &ap, acc, false);
}

// ---------------------------------------------------------------------------
// AVX-512BW fast scan: two pairs of sub-codes per 512-bit shuffle
// ---------------------------------------------------------------------------

pub(super) fn fastscan_block_512(block: &[u8], tables: &[u8], out: &mut [u32; 32]) {
    assert!(block.len().is_multiple_of(32) && tables.len() == block.len());
    // SAFETY: AVX-512F/BW were detected (`detect_all`); both buffers hold
    // `block.len() / 32` pairs of 32 bytes (asserted above).
    unsafe { fastscan_block_avx512(block, tables, out) }
}

/// As `fastscan_block_avx2`, two pairs per step; the two 256-bit halves of
/// each accumulator are added at the end (sums modulo 2^16 do not depend on
/// the order, so the result is identical).
///
/// # Safety
/// The CPU supports AVX-512F and AVX-512BW; `block.len()` is a multiple of 32 and `tables.len() == block.len()`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn fastscan_block_avx512(block: &[u8], tables: &[u8], out: &mut [u32; 32]) {
    let pairs = block.len() / 32;
    let mask = _mm512_set1_epi8(0x0F);
    let z = _mm512_setzero_si512();
    let (mut lo, mut lo_odd, mut hi, mut hi_odd) = (z, z, z, z);
    for p in 0..pairs / 2 {
        // SAFETY: AVX-512F; 64·p + 64 <= 32·pairs = block.len() == tables.len().
        let (c, t) = unsafe { (_mm512_loadu_si512(block.as_ptr().add(64 * p) as *const _), _mm512_loadu_si512(tables.as_ptr().add(64 * p) as *const _)) };
        let rlo = _mm512_shuffle_epi8(t, _mm512_and_si512(c, mask));
        let rhi = _mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(c, 4), mask));
        lo = _mm512_add_epi16(lo, rlo);
        lo_odd = _mm512_add_epi16(lo_odd, _mm512_srli_epi16(rlo, 8));
        hi = _mm512_add_epi16(hi, rhi);
        hi_odd = _mm512_add_epi16(hi_odd, _mm512_srli_epi16(rhi, 8));
    }
    let fold = |v: __m512i| _mm256_add_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v));
    let mut acc = [fold(lo), fold(lo_odd), fold(hi), fold(hi_odd)];
    if pairs % 2 == 1 {
        let p = pairs - 1;
        // SAFETY: the last pair's 32 bytes are in bounds of both buffers; AVX2
        // was detected too (`detect_all` offers AVX-512 only on top of AVX2).
        unsafe { fastscan_pair_avx2(block.as_ptr().add(32 * p), tables.as_ptr().add(32 * p), &mut acc) };
    }
    // SAFETY: AVX2 was detected (`detect_all` offers AVX-512 only on top of AVX2).
    unsafe { fastscan_finish_avx2(acc, out) }
}

/// Queries per pass of the AVX-512 multi-query kernel (4 accumulators each:
/// 6 queries and the masks fit the 32 registers).
const MULTI_G: usize = 6;

pub(super) fn fastscan_multi_512(blocks: &[u8], tables: &[u8], bb: usize, out: &mut [u32]) {
    let (nb, nq) = super::avx2::fastscan_multi_shape(blocks, tables, bb, out);
    let mut q = 0;
    while q < nq {
        let g = (nq - q).min(MULTI_G);
        let (t, o) = (&tables[q * bb..(q + g) * bb], &mut out[q * nb * 32..(q + g) * nb * 32]);
        // SAFETY: AVX-512F/BW and AVX2 were detected (`detect_all`); `t` holds
        // g tables of bb bytes, `blocks` nb blocks of bb bytes (bb a multiple
        // of 32) and `o` g·nb·32 sums (checked by `fastscan_multi_shape`).
        unsafe {
            match g {
                1 => fastscan_multi_avx512::<1>(blocks, t, bb, o),
                2 => fastscan_multi_avx512::<2>(blocks, t, bb, o),
                3 => fastscan_multi_avx512::<3>(blocks, t, bb, o),
                4 => fastscan_multi_avx512::<4>(blocks, t, bb, o),
                5 => fastscan_multi_avx512::<5>(blocks, t, bb, o),
                _ => fastscan_multi_avx512::<6>(blocks, t, bb, o),
            }
        }
        q += g;
    }
}

/// As `fastscan_block_avx512` for `G` queries at once: every 64-byte load of
/// codes (two pairs of sub-codes) and its nibble masks serve the `G` tables.
///
/// # Safety
/// The CPU supports AVX-512F/BW and AVX2; `tables` holds `G` tables of `bb`
/// bytes, `blocks` a whole number of blocks of `bb` bytes (a multiple of 32),
/// and `out.len() == G · (blocks.len() / bb) · 32`.
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn fastscan_multi_avx512<const G: usize>(blocks: &[u8], tables: &[u8], bb: usize, out: &mut [u32]) {
    let (nb, pairs) = (blocks.len() / bb, bb / 32);
    let mask = _mm512_set1_epi8(0x0F);
    let z = _mm512_setzero_si512();
    for b in 0..nb {
        let blk = b * bb;
        let mut acc = [[z; 4]; G];
        for p in 0..pairs / 2 {
            // SAFETY: AVX-512F; blk + 64·p + 64 <= blk + 32·pairs <= blocks.len().
            let c = unsafe { _mm512_loadu_si512(blocks.as_ptr().add(blk + 64 * p) as *const _) };
            let clo = _mm512_and_si512(c, mask);
            let chi = _mm512_and_si512(_mm512_srli_epi16(c, 4), mask);
            for (g, a) in acc.iter_mut().enumerate() {
                // SAFETY: AVX-512F; g·bb + 64·p + 64 <= g·bb + bb <= tables.len().
                let t = unsafe { _mm512_loadu_si512(tables.as_ptr().add(g * bb + 64 * p) as *const _) };
                let rlo = _mm512_shuffle_epi8(t, clo);
                let rhi = _mm512_shuffle_epi8(t, chi);
                a[0] = _mm512_add_epi16(a[0], rlo);
                a[1] = _mm512_add_epi16(a[1], _mm512_srli_epi16(rlo, 8));
                a[2] = _mm512_add_epi16(a[2], rhi);
                a[3] = _mm512_add_epi16(a[3], _mm512_srli_epi16(rhi, 8));
            }
        }
        let fold = |v: __m512i| _mm256_add_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v));
        for (g, a) in acc.into_iter().enumerate() {
            let mut a256 = a.map(fold);
            if pairs % 2 == 1 {
                let p = pairs - 1;
                // SAFETY: AVX2; the last pair's 32 bytes lie in block b and in table g.
                unsafe { fastscan_pair_avx2(blocks.as_ptr().add(blk + 32 * p), tables.as_ptr().add(g * bb + 32 * p), &mut a256) };
            }
            let o: &mut [u32; 32] = (&mut out[(g * nb + b) * 32..(g * nb + b + 1) * 32]).try_into().expect("32 sums");
            // SAFETY: AVX2 (this function's contract).
            unsafe { fastscan_finish_avx2(a256, o) }
        }
    }
}

// ---------------------------------------------------------------------------
// AVX-512 VBMI + VNNI fast scan: byte permutes into 64-entry tables and
// 4-byte dot products, on the same layout and with the same integer sums
// ---------------------------------------------------------------------------

/// Queries per pass of the VBMI/VNNI kernel (2 accumulators each).
const VNNI_G: usize = 12;

pub(super) fn fastscan_block_vnni(block: &[u8], tables: &[u8], out: &mut [u32; 32]) {
    assert!(!block.is_empty() && block.len().is_multiple_of(32) && tables.len() == block.len(), "fast-scan shapes");
    // SAFETY: AVX-512F/BW/VBMI/VNNI and AVX2 were detected (`detect_all`);
    // one table and one block of block.len() bytes (a multiple of 32), and
    // 32 sums: the contract of `fastscan_multi_vnni::<1>`.
    unsafe { fastscan_multi_vnni::<1>(block, tables, block.len(), out) }
}

pub(super) fn fastscan_multi_vnni_entry(blocks: &[u8], tables: &[u8], bb: usize, out: &mut [u32]) {
    let (nb, nq) = super::avx2::fastscan_multi_shape(blocks, tables, bb, out);
    let mut q = 0;
    while q < nq {
        let g = (nq - q).min(VNNI_G);
        let (t, o) = (&tables[q * bb..(q + g) * bb], &mut out[q * nb * 32..(q + g) * nb * 32]);
        // SAFETY: AVX-512F/BW/VBMI/VNNI and AVX2 were detected (`detect_all`);
        // `t` holds g tables of bb bytes, `blocks` nb blocks of bb bytes (bb a
        // multiple of 32) and `o` g·nb·32 sums (`fastscan_multi_shape`).
        unsafe {
            match g {
                1 => fastscan_multi_vnni::<1>(blocks, t, bb, o),
                2 => fastscan_multi_vnni::<2>(blocks, t, bb, o),
                3 => fastscan_multi_vnni::<3>(blocks, t, bb, o),
                4 => fastscan_multi_vnni::<4>(blocks, t, bb, o),
                5 => fastscan_multi_vnni::<5>(blocks, t, bb, o),
                6 => fastscan_multi_vnni::<6>(blocks, t, bb, o),
                7 => fastscan_multi_vnni::<7>(blocks, t, bb, o),
                8 => fastscan_multi_vnni::<8>(blocks, t, bb, o),
                9 => fastscan_multi_vnni::<9>(blocks, t, bb, o),
                10 => fastscan_multi_vnni::<10>(blocks, t, bb, o),
                11 => fastscan_multi_vnni::<11>(blocks, t, bb, o),
                _ => fastscan_multi_vnni::<12>(blocks, t, bb, o),
            }
        }
        q += g;
    }
}

/// `G` queries over every block. 64 code bytes hold sub-codes `4s..4s+4` of
/// the 32 vectors (two pairs of the layout of `crate::fastscan`); one byte
/// permute (shared by the queries) puts the four sub-codes of vector `i` in
/// bytes `4i..4i+4`, the nibbles become indices `16·L + nibble` into the 64
/// table bytes `T_4s..T_4s+3` (the query's tables there, as stored), one
/// `vpermb` per nibble half looks them up and one `vpdpbusd` adds the four
/// bytes of each vector into its 32-bit lane. Exact: the same integers as
/// the block kernels. A last odd pair is read with the upper half masked to
/// zero (zero codes meet zero table bytes).
///
/// # Safety
/// The CPU supports AVX-512F/BW/VBMI/VNNI; `tables` holds `G` tables of `bb`
/// bytes, `blocks` a whole number of blocks of `bb` bytes (a multiple of 32),
/// and `out.len() == G · (blocks.len() / bb) · 32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
unsafe fn fastscan_multi_vnni<const G: usize>(blocks: &[u8], tables: &[u8], bb: usize, out: &mut [u32]) {
    let (nb, pairs) = (blocks.len() / bb, bb / 32);
    let perm_bytes: [u8; 64] = std::array::from_fn(|j| (16 * (j % 4) + j / 4) as u8);
    let pos_bytes: [u8; 64] = std::array::from_fn(|j| ((j % 4) << 4) as u8);
    // SAFETY: AVX-512F; both arrays are 64 bytes.
    let (perm, pos) = unsafe { (_mm512_loadu_si512(perm_bytes.as_ptr() as *const _), _mm512_loadu_si512(pos_bytes.as_ptr() as *const _)) };
    let nib = _mm512_set1_epi8(0x0F);
    let ones = _mm512_set1_epi8(1);
    let z = _mm512_setzero_si512();
    // (c & 0x0F) | pos: ternary-logic table of (A & B) | C
    const AND_OR: i32 = 0xEA;
    // one step of 64 code bytes (or 32, `half`) at byte offset `off` of the block and of each table
    let step = |acc: &mut [[__m512i; 2]; G], blk: usize, off: usize, half: bool| {
        let mask: u64 = if half { 0xFFFF_FFFF } else { u64::MAX };
        // SAFETY: AVX-512BW; the `half` load reads the 32 bytes of the last
        // pair (in bounds), a full one 64 bytes (off + 64 <= the block's end).
        let c = unsafe { _mm512_maskz_loadu_epi8(mask, blocks.as_ptr().add(blk + off) as *const i8) };
        let c = _mm512_permutexvar_epi8(perm, c);
        let lo = _mm512_ternarylogic_epi32::<AND_OR>(c, nib, pos);
        let hi = _mm512_ternarylogic_epi32::<AND_OR>(_mm512_srli_epi16::<4>(c), nib, pos);
        for (g, a) in acc.iter_mut().enumerate() {
            // SAFETY: AVX-512BW; table g spans [g·bb, (g+1)·bb) and `off`
            // is the offset in the block (off + 64 <= bb, or 32 when `half`).
            let t = unsafe { _mm512_maskz_loadu_epi8(mask, tables.as_ptr().add(g * bb + off) as *const i8) };
            a[0] = _mm512_dpbusd_epi32(a[0], _mm512_permutexvar_epi8(lo, t), ones);
            a[1] = _mm512_dpbusd_epi32(a[1], _mm512_permutexvar_epi8(hi, t), ones);
        }
    };
    for b in 0..nb {
        let mut acc = [[z; 2]; G];
        for s in 0..pairs / 2 {
            step(&mut acc, b * bb, 64 * s, false);
        }
        if pairs % 2 == 1 {
            step(&mut acc, b * bb, 64 * (pairs / 2), true);
        }
        for (g, a) in acc.iter().enumerate() {
            let at = (g * nb + b) * 32;
            // SAFETY: AVX-512F; out[at..at + 32] lies in `out` (length G·nb·32).
            unsafe {
                _mm512_storeu_si512(out.as_mut_ptr().add(at) as *mut _, a[0]);
                _mm512_storeu_si512(out.as_mut_ptr().add(at + 16) as *mut _, a[1]);
            }
        }
    }
}

pub(super) fn fastscan_values_512(sums: &[u32], factors: &[f32], bias: f32, delta: f32, out: &mut [f32], maxes: &mut [f32]) {
    assert!(factors.len() == out.len() && sums.len() >= out.len() && maxes.len() == out.len().div_ceil(32), "fast-scan value shapes");
    // SAFETY: AVX-512F was detected (`detect_all`); the lengths are checked above.
    unsafe { fastscan_values_avx512(sums, factors, bias, delta, out, maxes) }
}

/// Blocks of 32 as two masked vectors of 16; the maximum of a block is that
/// of the two vectors (absent lanes read as -inf).
///
/// # Safety
/// The CPU supports AVX-512F; `factors.len() == out.len() <= sums.len()`,
/// `maxes.len() == out.len().div_ceil(32)`.
#[target_feature(enable = "avx512f")]
unsafe fn fastscan_values_avx512(sums: &[u32], factors: &[f32], bias: f32, delta: f32, out: &mut [f32], maxes: &mut [f32]) {
    let n = out.len();
    let (b, d, ninf) = (_mm512_set1_ps(bias), _mm512_set1_ps(delta), _mm512_set1_ps(f32::NEG_INFINITY));
    let mut half = |i: usize| -> __m512 {
        let k: __mmask16 = if i >= n {
            0
        } else if n - i >= 16 {
            0xFFFF
        } else {
            (1u16 << (n - i)) - 1
        };
        // SAFETY: AVX-512F; the masked loads and store touch only lanes
        // i..min(i + 16, n), inside all three slices (none when i >= n).
        unsafe {
            let s = _mm512_cvtepu32_ps(_mm512_maskz_loadu_epi32(k, sums.as_ptr().add(i.min(n)) as *const i32));
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, factors.as_ptr().add(i.min(n))), _mm512_add_ps(b, _mm512_mul_ps(d, s)));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i.min(n)), k, v);
            _mm512_mask_blend_ps(k, ninf, v)
        }
    };
    for (j, m) in maxes.iter_mut().enumerate() {
        let lo = half(32 * j);
        let hi = half(32 * j + 16);
        *m = _mm512_reduce_max_ps(_mm512_max_ps(lo, hi));
    }
}

// ---------------------------------------------------------------------------
// Batched fast-scan search: candidate selection
// ---------------------------------------------------------------------------

pub(super) fn fastscan_select_512(sums: &[u32], factors: &[f32], sqnorms: Option<&[f32]>, bd: (f32, f32), thr: f32, out: &mut [f32], idx: &mut [u32]) -> usize {
    let n = factors.len();
    assert!(sums.len() >= n && out.len() >= n && idx.len() >= n && sqnorms.is_none_or(|q| q.len() >= n), "fast-scan select shapes");
    // SAFETY: AVX-512F was detected (`detect_all`); the lengths are checked above.
    unsafe { fastscan_select_avx512(sums, factors, sqnorms, bd, thr, out, idx) }
}

/// Thirty-two estimates per step (then sixteen, masked loads for the last
/// ones; the operations of the reference, no FMA); the lanes not below the
/// threshold (`!(v < thr)`, NaN included) are compressed into `out` and `idx`.
///
/// # Safety
/// The CPU supports AVX-512F; `sums`, `out`, `idx` (and `sqnorms`) hold at least `factors.len()` elements.
#[target_feature(enable = "avx512f")]
unsafe fn fastscan_select_avx512(
    sums: &[u32],
    factors: &[f32],
    sqnorms: Option<&[f32]>,
    (bias, delta): (f32, f32),
    thr: f32,
    out: &mut [f32],
    idx: &mut [u32],
) -> usize {
    let n = factors.len();
    let (b, d, t, two) = (_mm512_set1_ps(bias), _mm512_set1_ps(delta), _mm512_set1_ps(thr), _mm512_set1_ps(2.0));
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut c = 0;
    let mut i = 0;
    // whole groups of 32: two vectors, one branch on both masks
    while i + 32 <= n {
        // SAFETY: AVX-512F; i + 32 <= n: the loads read inside every slice;
        // the compressed stores write popcount(m0) + popcount(m1) elements at
        // c, and c + that <= i + 32 <= n (c <= i: one output per lane at most).
        unsafe {
            let value = |j: usize| {
                let s = _mm512_cvtepu32_ps(_mm512_loadu_si512(sums.as_ptr().add(j) as *const _));
                let mut v = _mm512_mul_ps(_mm512_loadu_ps(factors.as_ptr().add(j)), _mm512_add_ps(b, _mm512_mul_ps(d, s)));
                if let Some(q) = sqnorms {
                    v = _mm512_sub_ps(_mm512_mul_ps(two, v), _mm512_loadu_ps(q.as_ptr().add(j)));
                }
                v
            };
            let (v0, v1) = (value(i), value(i + 16));
            let (m0, m1) = (_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(v0, t), _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(v1, t));
            if (m0 | m1) != 0 {
                _mm512_mask_compressstoreu_ps(out.as_mut_ptr().add(c) as *mut _, m0, v0);
                _mm512_mask_compressstoreu_epi32(idx.as_mut_ptr().add(c) as *mut _, m0, _mm512_add_epi32(iota, _mm512_set1_epi32(i as i32)));
                c += m0.count_ones() as usize;
                _mm512_mask_compressstoreu_ps(out.as_mut_ptr().add(c) as *mut _, m1, v1);
                _mm512_mask_compressstoreu_epi32(idx.as_mut_ptr().add(c) as *mut _, m1, _mm512_add_epi32(iota, _mm512_set1_epi32(i as i32 + 16)));
                c += m1.count_ones() as usize;
            }
        }
        i += 32;
    }
    while i < n {
        let k: __mmask16 = if n - i >= 16 { 0xFFFF } else { (1u16 << (n - i)) - 1 };
        // SAFETY: AVX-512F; the masked loads touch lanes i..min(i + 16, n)
        // only, inside every slice; the compressed stores write popcount(m)
        // elements at c, and c + popcount(m) <= i + popcount(k) <= n.
        unsafe {
            let s = _mm512_cvtepu32_ps(_mm512_maskz_loadu_epi32(k, sums.as_ptr().add(i) as *const i32));
            let mut v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, factors.as_ptr().add(i)), _mm512_add_ps(b, _mm512_mul_ps(d, s)));
            if let Some(q) = sqnorms {
                v = _mm512_sub_ps(_mm512_mul_ps(two, v), _mm512_maskz_loadu_ps(k, q.as_ptr().add(i)));
            }
            let m = _mm512_mask_cmp_ps_mask::<_CMP_NLT_UQ>(k, v, t);
            if m != 0 {
                _mm512_mask_compressstoreu_ps(out.as_mut_ptr().add(c) as *mut _, m, v);
                _mm512_mask_compressstoreu_epi32(idx.as_mut_ptr().add(c) as *mut _, m, _mm512_add_epi32(iota, _mm512_set1_epi32(i as i32)));
                c += m.count_ones() as usize;
            }
        }
        i += 16;
    }
    c
}
