//! Scalar reference kernels: the oracle every SIMD path is tested against.

/// Unnormalized in-place FWHT (butterfly order: h = 1, 2, 4, ...; `a+b`, `a-b`).
pub fn fwht_ref(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let a = x[j];
                let b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

/// `idx[j]` = number of boundaries strictly below `y[j]` (`bits` is unused).
pub fn quantize_ref(y: &[f32], boundaries: &[f32], _bits: u32, idx: &mut [u8]) {
    for (o, &v) in idx.iter_mut().zip(y) {
        *o = boundaries.partition_point(|&b| b < v) as u8;
    }
}

/// `e^x` for `x <= 0` (0 below −87.3, where f32 underflows), within 2 ulp:
/// `x = n·ln2 + r`, |r| <= ln2/2, Cephes' degree-6 polynomial for `e^r`, `2^n`
/// through the exponent bits. Branch-free, with no float-to-int cast and no
/// `round` call, so that it vectorizes (on the x86-64 baseline as well).
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // round to nearest through the float adder (exact for |y| < 2^22); the
    // integer n is then the low mantissa bits of `y`
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let xc = x.max(-87.3);
    let y = xc * LOG2E + MAGIC;
    let n = y - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 5.0e-1;
    let e = p * r * r + r + 1.0;
    let ni = (y.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        e * scale
    }
}

/// Softmax in place (max-subtracted, [`exp_neg`], 8-lane sums in a fixed
/// tree): the reference, and the body the SIMD paths compile with their
/// target features (no FMA, same order: the same bits on every path).
#[inline(always)]
pub fn softmax_body(scores: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; 8];
    let mut chunks = scores.chunks_exact(8);
    for c in &mut chunks {
        for (m, &x) in mx.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let m = chunks.remainder().iter().chain(&mx).copied().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    scores.iter_mut().for_each(|s| *s = exp_neg(*s - m));
    let mut lanes = [0.0f32; 8];
    let mut chunks = scores.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    let z = reduce8(&lanes) + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / z;
    scores.iter_mut().for_each(|s| *s *= inv);
}

/// Softmax in place (see [`softmax_body`]).
pub fn softmax_ref(scores: &mut [f32]) {
    softmax_body(scores)
}

/// Fixed reduction tree over the 8 lane sums.
#[inline]
pub fn reduce8(l: &[f32; 8]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// Σ x² in the canonical order (8 lanes, lane = index mod 8, [`reduce8`]).
pub fn sum_sq_ref(x: &[f32]) -> f32 {
    let mut l = [0.0f32; 8];
    for (i, &v) in x.iter().enumerate() {
        l[i % 8] += v * v;
    }
    reduce8(&l)
}

/// Σ a·b in the canonical order (as [`sum_sq_ref`]).
pub fn dot_ref(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut l = [0.0f32; 8];
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        l[i % 8] += x * y;
    }
    reduce8(&l)
}

/// The `j`-th `bits`-bit field of an LSB-first bit stream.
#[inline]
pub fn get_field(packed: &[u8], bits: u32, j: usize) -> usize {
    let bit = j * bits as usize;
    let byte = bit / 8;
    let shift = bit % 8;
    let mut w = packed[byte] as u32;
    if shift + bits as usize > 8 {
        w |= (packed[byte + 1] as u32) << 8;
    }
    ((w >> shift) & ((1u32 << bits) - 1)) as usize
}

/// `Σ_j q[j] · table[field_j]` over the `q.len()` `bits`-bit fields of `packed`.
pub fn dot_codes_ref(q: &[f32], packed: &[u8], bits: u32, table: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for (j, &qj) in q.iter().enumerate() {
        s += qj * table[get_field(packed, bits, j)];
    }
    s
}

/// `acc[j] += w · table[field_j]` over the `acc.len()` fields of `packed`.
pub fn axpy_codes_ref(packed: &[u8], bits: u32, table: &[f32], w: f32, acc: &mut [f32]) {
    for (j, a) in acc.iter_mut().enumerate() {
        *a += w * table[get_field(packed, bits, j)];
    }
}

/// `out[j] = table[field_j]` over the `out.len()` fields of `packed`.
pub fn lookup_codes_ref(packed: &[u8], bits: u32, table: &[f32], out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = table[get_field(packed, bits, j)];
    }
}

/// Bytes of the packed indices of a group-kernel code (`d` fields of `bits`).
pub fn packed_bytes(d: usize, bits: u32) -> usize {
    (d * bits as usize).div_ceil(8)
}

/// The scale of a group-kernel code `c = [packed indices][scale]`: a
/// little-endian f32 when 4 bytes follow the indices, a bf16 (the upper half
/// of an f32) when 2.
#[inline(always)]
pub fn code_scale(c: &[u8], packed: usize) -> f32 {
    match c.len() - packed {
        2 => f32::from_bits((u16::from_le_bytes([c[packed], c[packed + 1]]) as u32) << 16),
        4 => f32::from_le_bytes([c[packed], c[packed + 1], c[packed + 2], c[packed + 3]]),
        n => panic!("a group-kernel code ends with a 2- or 4-byte scale, not {n} bytes"),
    }
}

/// Scores of a GQA group against `n` codebook codes (`[packed][scale]`, see
/// [`code_scale`]; `code_size` bytes each): `out[g·ld + t] = scale · s_t · Σ_j
/// qs[g·d + j] · table[idx_tj]`, with rows of `ld = out.len() / G ≥ n` (G query
/// heads): a caller may score the first `n` tokens of longer rows.
#[allow(clippy::too_many_arguments)]
pub fn group_scores_ref(codes: &[u8], code_size: usize, bits: u32, table: &[f32], qs: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let packed = packed_bytes(d, bits);
    let g = qs.len() / d;
    let ld = out.len() / g.max(1);
    for (t, c) in codes.chunks_exact(code_size).enumerate() {
        let s = code_scale(c, packed) * scale;
        for h in 0..g {
            out[h * ld + t] = dot_codes_ref(&qs[h * d..(h + 1) * d], &c[..packed], bits, table) * s;
        }
    }
}

/// Value sums of a GQA group over `n` codebook codes (`[packed][scale]`):
/// `acc[g·d + j] += Σ_t (w[g·ld + t] · s_t) · table[idx_tj]`, with weight rows
/// of `ld = w.len() / G ≥ n` (the first `n` weights of each row are used).
pub fn group_values_ref(codes: &[u8], code_size: usize, bits: u32, table: &[f32], w: &[f32], d: usize, acc: &mut [f32]) {
    let packed = packed_bytes(d, bits);
    let g = acc.len() / d;
    let ld = w.len() / g.max(1);
    for (t, c) in codes.chunks_exact(code_size).enumerate() {
        let s = code_scale(c, packed);
        for h in 0..g {
            axpy_codes_ref(&c[..packed], bits, table, w[h * ld + t] * s, &mut acc[h * d..(h + 1) * d]);
        }
    }
}

/// Reference for the fused power-of-two encode (see `Kernels::had2_quantize`):
/// exactly the operations of the unfused path, in the same order.
pub fn had2_quantize_ref(x: &[f32], p: &super::Had2<'_>, y: &mut [f32], idx: &mut [u8]) -> Option<f32> {
    for ((o, &v), &m) in y.iter_mut().zip(x).zip(p.s1) {
        *o = f32::from_bits(v.to_bits() ^ m);
    }
    fwht_ref(y);
    for (o, &m) in y.iter_mut().zip(p.s2) {
        *o = f32::from_bits(o.to_bits() ^ m);
    }
    fwht_ref(y);
    y.iter_mut().for_each(|v| *v *= p.total);
    let s = sum_sq_ref(y);
    if !s.is_normal() {
        return None;
    }
    let norm = s.sqrt();
    let inv = 1.0 / norm;
    y.iter_mut().for_each(|v| *v *= inv);
    quantize_ref(y, p.boundaries, p.bits, idx);
    Some(norm)
}

/// Reference fast-scan block kernel (see `crate::fastscan` for the layout):
/// `out[i] = Σ_pairs T_2p[sub-code 2p of vector i] + T_2p+1[sub-code 2p+1 of vector i]`.
pub fn fastscan_block_ref(block: &[u8], tables: &[u8], out: &mut [u32; 32]) {
    *out = [0; 32];
    for (pair, t) in block.chunks_exact(32).zip(tables.chunks_exact(32)) {
        for i in 0..16 {
            let (a, b) = (pair[i], pair[16 + i]);
            out[i] += t[(a & 15) as usize] as u32 + t[16 + (b & 15) as usize] as u32;
            out[i + 16] += t[(a >> 4) as usize] as u32 + t[16 + (b >> 4) as usize] as u32;
        }
    }
}

/// Reference multi-query fast scan: `nq = tables.len() / bb` queries (tables of
/// `bb = 16·m` bytes each) against `nb = blocks.len() / bb` consecutive blocks;
/// `out[(q·nb + b)·32 + i]` is [`fastscan_block_ref`] of block `b` under the
/// tables of query `q` (`out.len() == nq·nb·32`).
pub fn fastscan_multi_ref(blocks: &[u8], tables: &[u8], bb: usize, out: &mut [u32]) {
    assert!(bb > 0 && bb.is_multiple_of(32) && blocks.len().is_multiple_of(bb) && tables.len().is_multiple_of(bb));
    let nb = blocks.len() / bb;
    assert_eq!(out.len(), nb * (tables.len() / bb) * 32, "fast-scan output size");
    for (q, t) in tables.chunks_exact(bb).enumerate() {
        for (b, blk) in blocks.chunks_exact(bb).enumerate() {
            let o: &mut [u32; 32] = (&mut out[(q * nb + b) * 32..(q * nb + b + 1) * 32]).try_into().expect("32 sums");
            fastscan_block_ref(blk, t, o);
        }
    }
}

/// Fast-scan estimates from integer sums: `out[i] = factors[i] · (bias + delta · sums[i])`
/// for `i < out.len()` (`factors.len() == out.len() <= sums.len()`, sums below
/// 2^31), and `maxes[j]` the largest of `out[32j..32j + 32]` (`maxes.len() ==
/// out.len().div_ceil(32)`). Element-wise, no FMA: the same bits on every path
/// (the maxima equal as numbers; +0 and -0 may differ).
pub fn fastscan_values_ref(sums: &[u32], factors: &[f32], bias: f32, delta: f32, out: &mut [f32], maxes: &mut [f32]) {
    assert!(factors.len() == out.len() && sums.len() >= out.len() && maxes.len() == out.len().div_ceil(32), "fast-scan value shapes");
    for ((o, &s), &f) in out.iter_mut().zip(sums).zip(factors) {
        *o = f * (bias + delta * s as f32);
    }
    for (m, c) in maxes.iter_mut().zip(out.chunks(32)) {
        *m = c.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    }
}

/// The fast-scan estimates `v = factor · (bias + Δ · sum)` (for L2
/// `2·v − sqnorm`) of `factors.len()` codes that are not below `thr` (NaN is
/// not below anything): writes them to `out[..c]` and their positions to
/// `idx[..c]`, in order, and returns `c`. `sums.len()`, `out.len()`,
/// `idx.len()` (and `sqnorms.len()`) are at least `factors.len()`.
pub fn fastscan_select_ref(
    sums: &[u32],
    factors: &[f32],
    sqnorms: Option<&[f32]>,
    (bias, delta): (f32, f32),
    thr: f32,
    out: &mut [f32],
    idx: &mut [u32],
) -> usize {
    let n = factors.len();
    assert!(sums.len() >= n && out.len() >= n && idx.len() >= n && sqnorms.is_none_or(|q| q.len() >= n), "fast-scan select shapes");
    let mut c = 0;
    for i in 0..n {
        let mut v = factors[i] * (bias + delta * sums[i] as f32);
        if let Some(q) = sqnorms {
            v = 2.0 * v - q[i];
        }
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(v < thr) {
            out[c] = v;
            idx[c] = i as u32;
            c += 1;
        }
    }
    c
}
// --- Hadamard rounds of dimensions that are not powers of two (`crate::rotation`) ---

/// `x ← scale · H x` (unnormalized FWHT, then one multiply per element).
pub fn fwht_scaled_ref(x: &mut [f32], scale: f32) {
    fwht_ref(x);
    x.iter_mut().for_each(|v| *v *= scale);
}

/// Both scaled blocks of a round, `[0, p)` first when `forward`, else `[n-p, n)` first.
fn had_blocks_ref(x: &mut [f32], p: usize, scale: f32, forward: bool) {
    let off = x.len() - p;
    if forward || off == 0 {
        fwht_scaled_ref(&mut x[..p], scale);
    }
    if off != 0 {
        fwht_scaled_ref(&mut x[off..], scale);
        if !forward {
            fwht_scaled_ref(&mut x[..p], scale);
        }
    }
}

/// `dst[j] = src[gather[j]] ^ mask[j]`.
fn gather_masked_ref(src: &[f32], r: &super::HadRound, dst: &mut [f32]) {
    for ((o, &j), &m) in dst.iter_mut().zip(r.gather()).zip(r.masks()) {
        *o = f32::from_bits(src[j as usize].to_bits() ^ m);
    }
}

/// Reference of `Kernels::had_round` (`src`, `dst`: `r.len()` floats each).
pub fn had_round_ref(src: &[f32], r: &super::HadRound, dst: &mut [f32]) {
    assert!(src.len() == r.len() && dst.len() == r.len(), "a Hadamard round of {} coordinates", r.len());
    gather_masked_ref(src, r, dst);
    had_blocks_ref(dst, r.block(), r.scale(), true);
}

/// Reference of `Kernels::had_round_t` (`src`, `dst`: `r.len()` floats each).
pub fn had_round_t_ref(src: &mut [f32], r: &super::HadRound, dst: &mut [f32]) {
    assert!(src.len() == r.len() && dst.len() == r.len(), "a Hadamard round of {} coordinates", r.len());
    had_blocks_ref(src, r.block(), r.scale(), false);
    gather_masked_ref(src, r, dst);
}

/// Reference of `Kernels::norm_quantize`.
pub fn norm_quantize_ref(y: &mut [f32], boundaries: &[f32], bits: u32, idx: &mut [u8]) -> Option<f32> {
    let s = sum_sq_ref(y);
    if !s.is_normal() {
        return None;
    }
    let norm = s.sqrt();
    let inv = 1.0 / norm;
    y.iter_mut().for_each(|v| *v *= inv);
    quantize_ref(y, boundaries, bits, idx);
    Some(norm)
}
// --- end of the Hadamard rounds ---

// --- encode input check (`codec::check_vectors`) ---

/// Reference of `Kernels::max_abs_bits`.
pub fn max_abs_bits_ref(x: &[f32]) -> u32 {
    x.iter().fold(0u32, |m, &v| m.max(v.to_bits() & 0x7FFF_FFFF))
}
// --- end of the encode input check ---
