//! x86_64 SIMD kernels, selected at run time by `detect`: the `avx2` table
//! (AVX2 + FMA, module `avx2`) and the `avx512` table (the AVX2 table with the
//! AVX-512F/BW group-attention and fast-scan kernels of module `avx512` and
//! the Hadamard rounds of module `had512`). This module holds the tables,
//! their detection and the helpers both ISAs share.
//!
//! Soundness: the safe entry points of `avx2`, `avx512` and `had512` run
//! `#[target_feature]` code, so they must only run on a CPU with those
//! features. They are `pub(super)`: only the tables below name them, and
//! `detect_all` (hence `detect`, `kernels::kernels` and `kernels::available`)
//! hands out a table only after `is_x86_feature_detected!` found every
//! feature it uses. The `// SAFETY:` comments of the entry points rely on this
//! ("detected (`detect_all`)"); the `unsafe fn`s below them state the lengths
//! they need in `# Safety` and the entry points check those first.

/// Expands `f!(BITS, G)` for the runtime (bits, g) of a call (bits 2/4, g 1..=8).
macro_rules! dispatch_bg {
    ($bits:expr, $g:expr, $f:ident, $($arg:expr),*) => {
        match ($bits, $g) {
            (4, 1) => $f::<4, 1>($($arg),*), (4, 2) => $f::<4, 2>($($arg),*), (4, 3) => $f::<4, 3>($($arg),*), (4, 4) => $f::<4, 4>($($arg),*),
            (4, 5) => $f::<4, 5>($($arg),*), (4, 6) => $f::<4, 6>($($arg),*), (4, 7) => $f::<4, 7>($($arg),*), (4, 8) => $f::<4, 8>($($arg),*),
            (2, 1) => $f::<2, 1>($($arg),*), (2, 2) => $f::<2, 2>($($arg),*), (2, 3) => $f::<2, 3>($($arg),*), (2, 4) => $f::<2, 4>($($arg),*),
            (2, 5) => $f::<2, 5>($($arg),*), (2, 6) => $f::<2, 6>($($arg),*), (2, 7) => $f::<2, 7>($($arg),*), _ => $f::<2, 8>($($arg),*),
        }
    };
}

/// Expands `f!(G)` for the runtime group size `g` of a call (1..=8).
macro_rules! dispatch_g {
    ($g:expr, $f:ident, $($arg:expr),*) => {
        match $g {
            1 => $f::<1>($($arg),*), 2 => $f::<2>($($arg),*), 3 => $f::<3>($($arg),*), 4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*), 6 => $f::<6>($($arg),*), 7 => $f::<7>($($arg),*), _ => $f::<8>($($arg),*),
        }
    };
}

mod avx2;
mod avx512;
mod had512;

use super::scalar;
use super::Kernels;

static AVX2: Kernels = Kernels {
    name: "avx2",
    fwht: avx2::fwht,
    quantize: avx2::quantize,
    sum_sq: avx2::sum_sq,
    dot: avx2::dot,
    dot_codes: avx2::dot_codes,
    axpy_codes: avx2::axpy_codes,
    lookup_codes: avx2::lookup_codes,
    group_scores: avx2::group_scores,
    group_values: avx2::group_values,
    had2_quantize: avx2::had2_quantize,
    fastscan_block: avx2::fastscan_block,
    fastscan_multi: avx2::fastscan_multi,
    fastscan_values: avx2::fastscan_values,
    softmax: avx2::softmax,
    fastscan_select: avx2::fastscan_select,
    had_round: avx2::had_round,
    had_round_t: avx2::had_round_t,
    norm_quantize: avx2::norm_quantize,
    max_abs_bits: avx2::max_abs_bits,
};

/// AVX2 plus the AVX-512 group-attention kernels (16 fields per `vpermps`).
static AVX512: Kernels = Kernels {
    name: "avx512",
    group_scores: avx512::group_scores_512,
    group_values: avx512::group_values_512,
    fastscan_block: avx512::fastscan_block_512,
    fastscan_multi: avx512::fastscan_multi_512,
    fastscan_values: avx512::fastscan_values_512,
    fastscan_select: avx512::fastscan_select_512,
    had_round: had512::had_round,
    had_round_t: had512::had_round_t,
    ..AVX2
};

/// AVX-512 plus the VBMI/VNNI fast-scan kernels (byte permutes into 64-entry
/// tables, 4-byte dot products; the same integer sums).
static AVX512_VNNI: Kernels =
    Kernels { name: "avx512vnni", fastscan_block: avx512::fastscan_block_vnni, fastscan_multi: avx512::fastscan_multi_vnni_entry, ..AVX512 };

/// The best table for this CPU.
pub fn detect() -> Option<&'static Kernels> {
    detect_all().last().copied()
}

/// Every SIMD table this CPU supports, weakest first.
pub fn detect_all() -> Vec<&'static Kernels> {
    let mut v = Vec::new();
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        v.push(&AVX2);
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            v.push(&AVX512);
            if is_x86_feature_detected!("avx512vbmi") && is_x86_feature_detected!("avx512vnni") {
                v.push(&AVX512_VNNI);
            }
        }
    }
    v
}

/// The scale of the code whose indices end at `p` (`sb` = 2: bf16, 4: f32;
/// see `scalar::code_scale`).
///
/// # Safety
/// `p` is valid for reads of `sb` bytes (`sb` is 2 or 4).
#[inline(always)]
unsafe fn scale_at(p: *const u8, sb: usize) -> f32 {
    // SAFETY: the caller guarantees `sb` readable bytes at `p`; the reads are
    // unaligned and of 2 bytes (sb == 2) or 4 (otherwise).
    unsafe {
        if sb == 2 {
            f32::from_bits(((p as *const u16).read_unaligned() as u32) << 16)
        } else {
            (p as *const f32).read_unaligned()
        }
    }
}

/// Tokens per block of the value kernels: their codes stay in L1 over the
/// coordinate passes, their scaled weights live on the stack.
const VBLOCK: usize = 128;

/// `ws[h·VBLOCK + i] = w[h·ld + t0 + i] · s_{t0+i}` for the `m` tokens of a block
/// (the same product the scalar reference forms).
///
/// # Safety
/// `codes` holds tokens `t0..t0+m` (`code_size` bytes each: `packed` index
/// bytes, then a 2- or 4-byte scale).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scaled_weights(codes: &[u8], code_size: usize, packed: usize, w: &[f32], ld: usize, g: usize, t0: usize, m: usize, ws: &mut [f32; 8 * VBLOCK]) {
    for i in 0..m {
        // SAFETY: token t0 + i lies in `codes` (the caller's contract), so its
        // code_size - packed scale bytes at offset `packed` are readable.
        let s = unsafe { scale_at(codes.as_ptr().add((t0 + i) * code_size + packed), code_size - packed) };
        for h in 0..g {
            ws[h * VBLOCK + i] = w[h * ld + t0 + i] * s;
        }
    }
}

// Phase order of the group-attention kernels over 2- and 4-bit codes (see
// `avx512`; the AVX2 phase kernels use blocks of 8 bytes, AVX-512 of 16).

/// Fields per byte.
const fn per_byte(bits: u32) -> usize {
    (8 / bits) as usize
}

/// Coordinate of lane `i` of phase vector `k` (in order `k = block·F + r`)
/// for blocks of `lanes` bytes.
#[inline]
fn phase_coord(bits: u32, lanes: usize, k: usize, i: usize) -> usize {
    let f = per_byte(bits);
    lanes * f * (k / f) + f * i + k % f
}

/// `x` (G rows of `d`) permuted into phase order (`to_phase`) or back.
#[inline]
fn phase_permute(bits: u32, lanes: usize, d: usize, g: usize, x: &[f32], y: &mut [f32], to_phase: bool) {
    for h in 0..g {
        for k in 0..d / lanes {
            for i in 0..lanes {
                let (p, c) = (h * d + k * lanes + i, h * d + phase_coord(bits, lanes, k, i));
                if to_phase {
                    y[p] = x[c];
                } else {
                    y[c] = x[p];
                }
            }
        }
    }
}

/// Shapes the phase kernels take: 2 or 4 bits, whole blocks of `lanes` code
/// bytes, every code its packed bytes then an f32 scale, 1..=8 heads of at
/// most 256 coordinates.
fn group_phase_ok(lanes: usize, code_size: usize, bits: u32, d: usize, g: usize, table: &[f32]) -> bool {
    (bits == 4 || bits == 2)
        && d.is_multiple_of(lanes * per_byte(bits))
        && d <= 256
        && matches!(code_size.checked_sub(scalar::packed_bytes(d, bits)), Some(2 | 4))
        && (1..=8).contains(&g)
        && table.len() >= 1 << bits
}
