//! Bit packing of `bits`-bit indices (1..=8) into an LSB-first bit stream:
//! value `j` occupies stream bits `[j·bits, (j+1)·bits)`, stream bit `8k+i` is
//! bit `i` of byte `k`. Eight values always fill exactly `bits` bytes.

/// Bytes needed for `count` values of `bits` bits.
pub const fn packed_len(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(8)
}

/// Packs `idx` (each `< 2^bits`) into `out` (`packed_len(idx.len(), bits)` bytes).
pub fn pack(idx: &[u8], bits: u32, out: &mut [u8]) {
    let n = packed_len(idx.len(), bits);
    let out = &mut out[..n];
    match bits {
        8 => out.copy_from_slice(idx),
        4 => {
            // 8 values (one u64) -> 4 bytes: byte i of `w | w >> 4` is v_i | v_{i+1} << 4;
            // keep the even bytes and compress them.
            let full = idx.len() / 8;
            for (o, c) in out.chunks_exact_mut(4).zip(idx.chunks_exact(8)) {
                let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                let mut t = (w | (w >> 4)) & 0x00FF_00FF_00FF_00FF;
                t = (t | (t >> 8)) & 0x0000_FFFF_0000_FFFF;
                t = (t | (t >> 16)) & 0xFFFF_FFFF;
                o.copy_from_slice(&(t as u32).to_le_bytes());
            }
            for (o, pair) in out[full * 4..].iter_mut().zip(idx[full * 8..].chunks(2)) {
                *o = pair[0] | (pair.get(1).copied().unwrap_or(0) << 4);
            }
        }
        2 => {
            for (o, q) in out.iter_mut().zip(idx.chunks(4)) {
                let mut b = 0u8;
                for (i, &v) in q.iter().enumerate() {
                    b |= v << (2 * i);
                }
                *o = b;
            }
        }
        1 => {
            for (o, q) in out.iter_mut().zip(idx.chunks(8)) {
                let mut b = 0u8;
                for (i, &v) in q.iter().enumerate() {
                    b |= v << i;
                }
                *o = b;
            }
        }
        _ => {
            // 8 values -> `bits` bytes through a u64 accumulator
            let b = bits as usize;
            for (g, chunk) in idx.chunks(8).enumerate() {
                let mut w = 0u64;
                for (i, &v) in chunk.iter().enumerate() {
                    w |= (v as u64) << (i * b);
                }
                let bytes = w.to_le_bytes();
                let start = g * b;
                let end = (start + b).min(n);
                out[start..end].copy_from_slice(&bytes[..end - start]);
            }
        }
    }
}

/// Unpacks `idx.len()` values of `bits` bits from `packed`.
pub fn unpack(packed: &[u8], bits: u32, idx: &mut [u8]) {
    let b = bits as usize;
    let n = packed_len(idx.len(), bits);
    for (g, chunk) in idx.chunks_mut(8).enumerate() {
        let start = g * b;
        let end = (start + b).min(n);
        let mut bytes = [0u8; 8];
        bytes[..end - start].copy_from_slice(&packed[start..end]);
        let w = u64::from_le_bytes(bytes);
        let mask = (1u64 << b) - 1;
        for (i, v) in chunk.iter_mut().enumerate() {
            *v = ((w >> (i * b)) & mask) as u8;
        }
    }
}
