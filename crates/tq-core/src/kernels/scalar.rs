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

pub fn quantize_ref(y: &[f32], boundaries: &[f32], _bits: u32, idx: &mut [u8]) {
    for (o, &v) in idx.iter_mut().zip(y) {
        *o = boundaries.partition_point(|&b| b < v) as u8;
    }
}

/// Fixed reduction tree over the 8 lane sums.
#[inline]
pub fn reduce8(l: &[f32; 8]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

pub fn sum_sq_ref(x: &[f32]) -> f32 {
    let mut l = [0.0f32; 8];
    for (i, &v) in x.iter().enumerate() {
        l[i % 8] += v * v;
    }
    reduce8(&l)
}

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

/// Scores of a GQA group against `n` codebook codes (`[packed][f32 scale]`,
/// `code_size` bytes each): `out[g·n + t] = scale · s_t · Σ_j qs[g·d + j] · table[idx_tj]`.
#[allow(clippy::too_many_arguments)]
pub fn group_scores_ref(codes: &[u8], code_size: usize, bits: u32, table: &[f32], qs: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let packed = code_size - 4;
    let n = codes.len() / code_size;
    let g = qs.len() / d;
    for (t, c) in codes.chunks_exact(code_size).enumerate() {
        let s = f32::from_le_bytes([c[packed], c[packed + 1], c[packed + 2], c[packed + 3]]) * scale;
        for h in 0..g {
            out[h * n + t] = dot_codes_ref(&qs[h * d..(h + 1) * d], &c[..packed], bits, table) * s;
        }
    }
}

/// Value sums of a GQA group over `n` codebook codes: `acc[g·d + j] += Σ_t
/// w[g·n + t] · table[idx_tj]` (the weights include each code's scale).
pub fn group_values_ref(codes: &[u8], code_size: usize, bits: u32, table: &[f32], w: &[f32], d: usize, acc: &mut [f32]) {
    let packed = code_size - 4;
    let n = codes.len() / code_size;
    let g = acc.len() / d;
    for (t, c) in codes.chunks_exact(code_size).enumerate() {
        for h in 0..g {
            axpy_codes_ref(&c[..packed], bits, table, w[h * n + t], &mut acc[h * d..(h + 1) * d]);
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
