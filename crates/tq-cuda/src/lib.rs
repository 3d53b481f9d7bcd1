//! CUDA kernels for TurboQuant KV caches: encode (rotation + Lloyd–Max +
//! packing + norm, byte-identical to the CPU encoder) and fused decode
//! attention over packed K/V codes (flash-decoding, GQA, ragged batches).
//!
//! Built on cudarc with dynamic loading and NVRTC: the kernels in
//! `kernels.cu` are compiled at run time for the card found, once per
//! configuration and process. Without the `cuda` feature the same API exists
//! and every entry point returns [`Error::NoCuda`].
//!
//! Layout on the device, per side (K or V) and per (sequence, KV head), for
//! `cap` token slots: a plane of codes (`cap × code_bytes`) and a plane of
//! scales (TurboQuant: one f32 norm per token; `q8_0`/`q4_0`: one f16 per
//! block of 32 values). [`split_codes`] converts the codes of the CPU codecs
//! (what `Codec::encode` writes: TurboQuant `[packed indices][f32 norm]`, ggml
//! blocks for `q8_0`/`q4_0`) into these planes and [`join_tq_codes`] back, so
//! both sides can be compared byte for byte.
//!
//! These are not exactly the bytes `tq-kv` stores: for TurboQuant sides the
//! CPU caches keep each code's scale as a bf16 ([`tq_core::KvLayout`], the
//! owner of the stored layout), while the GPU planes keep the codec's f32 norm
//! per code (`q8_0`/`q4_0` codes are stored whole by both): a TurboQuant code
//! stored by `tq-kv` has 2 scale bytes instead of 4, its norm rounded to bf16.
//! An [`Encoder`] made with `bf16_scales` stores that rounded norm (still in
//! the f32 plane), so attention sees the CPU cache's values.
//!
//! Two ways to hold a cache: [`DeviceKv`] owns its planes (the checks and
//! benchmarks of `tq bench cuda`); [`AttendPlan`] and [`Encoder`] launch on
//! planes, queries, lengths and outputs another framework owns (the Python
//! wheel's `CudaKv` on PyTorch tensors), on the caller's stream.
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

use tq_core::baselines::ggml::GgmlType;
use tq_core::baselines::ggml::QK;
use tq_core::codec::TurboQuantMse;
use tq_core::registry::{CodecEntry, CodecKind};
use tq_core::{Codec, KvGeometry, RotationKind};

#[cfg(feature = "cuda")]
mod gpu;
#[cfg(not(feature = "cuda"))]
mod stub;
pub mod suite;
#[cfg(feature = "cuda")]
pub use gpu::*;
#[cfg(not(feature = "cuda"))]
pub use stub::*;

/// Errors of the GPU path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Built without the `cuda` feature: every GPU entry point returns this.
    #[error("this build of turboquant has no CUDA support (rebuild with the `cuda` feature)")]
    NoCuda,
    /// No CUDA driver, no NVRTC, or no device of the requested ordinal.
    #[error("no usable CUDA driver: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed (the driver's message).
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// NVRTC refused a kernel configuration (its defines and the log).
    #[error("CUDA kernel compilation failed: {0}")]
    Compile(String),
    /// A codec, precision, head dimension or group size the kernels do not take.
    #[error("{0}")]
    Unsupported(String),
    /// Buffers or shapes that do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// An error of the CPU side (building a codec, checking vectors).
    #[error(transparent)]
    Core(#[from] tq_core::TqError),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// How one side of the cache is coded on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideKind {
    /// TurboQuant_mse at `bits` (2, 3 or 4), with or without norm correction.
    Tq {
        /// Bits per coordinate (2, 3 or 4).
        bits: u32,
        /// Norm correction (`-nc` codecs): the decoded vector is rescaled to the input norm.
        nc: bool,
    },
    /// ggml `q4_0`: 4-bit values with one f16 scale per block of 32.
    Q4_0,
    /// ggml `q8_0`: 8-bit values with one f16 scale per block of 32.
    Q8_0,
}

impl SideKind {
    /// The kind of a side from its registry entry: `tq-mse-B` or `tq-mse-B-nc`
    /// (B = 2, 3 or 4), `q4_0` or `q8_0` (unrotated); any other codec is
    /// [`Error::Unsupported`].
    pub fn from_entry(e: &CodecEntry) -> Result<Self> {
        match e.kind {
            CodecKind::Mse { bits: bits @ 2..=4, nc } => Ok(SideKind::Tq { bits, nc }),
            CodecKind::Ggml { t: GgmlType::Q4_0, rot: false } => Ok(SideKind::Q4_0),
            CodecKind::Ggml { t: GgmlType::Q8_0, rot: false } => Ok(SideKind::Q8_0),
            _ => Err(Error::Unsupported(format!("the GPU kernels take tq-mse-2/3/4(-nc), q4_0 and q8_0 per side, not '{}'", e.name))),
        }
    }

    /// Bits per coordinate of the code plane.
    pub fn bits(self) -> u32 {
        match self {
            SideKind::Tq { bits, .. } => bits,
            SideKind::Q4_0 => 4,
            SideKind::Q8_0 => 8,
        }
    }
    /// Kernel mode number (see kernels.cu).
    pub fn mode(self) -> u32 {
        match self {
            SideKind::Tq { .. } => 0,
            SideKind::Q4_0 => 1,
            SideKind::Q8_0 => 2,
        }
    }
    /// Bytes of one head vector's code plane entry (`d · bits / 8`).
    pub fn code_bytes(self, d: usize) -> usize {
        d * self.bits() as usize / 8
    }
    /// Bytes of one head vector's scale plane entry: an f32 norm
    /// (TurboQuant) or one f16 per block of 32 values (`q8_0`/`q4_0`).
    pub fn scale_bytes(self, d: usize) -> usize {
        match self {
            SideKind::Tq { .. } => 4,
            _ => 2 * (d / QK),
        }
    }
    /// Bytes per head vector, scales included (equal to the CPU code size).
    pub fn bytes_per_vector(self, d: usize) -> usize {
        self.code_bytes(d) + self.scale_bytes(d)
    }
    fn rotated(self) -> bool {
        matches!(self, SideKind::Tq { .. })
    }
}

/// Device addresses of one decode-attention step's buffers, for
/// [`AttendPlan::launch`] (planes and layouts as the crate docs give them):
/// `q` and `out` `[batch][q_tokens][q_heads][head_dim]` f32; `kc`/`vc` code
/// planes and `ks`/`vs` scale planes of `batch · kv_heads · cap` slots;
/// `lens` `batch` i32 lengths (each ≤ cap, ≥ q_tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPtrs {
    /// Queries (f32).
    pub q: u64,
    /// Key codes (u8 plane).
    pub kc: u64,
    /// Key scales (f32 norms, or f16 block scales of `q8_0`/`q4_0`).
    pub ks: u64,
    /// Value codes.
    pub vc: u64,
    /// Value scales.
    pub vs: u64,
    /// Sequence lengths (i32, on the device).
    pub lens: u64,
    /// Output (f32).
    pub out: u64,
}

/// Device addresses of one [`Encoder::launch`]: `seqs · per` input vectors
/// (f32, `head_dim` each, sequence-major), written into planes of `seqs ·
/// cap` slots, vector `t` of sequence `s` into slot `t`, or with `lens` (the
/// address of `seqs / heads` i32 lengths that already count the `per` new
/// tokens; 0 for none) into slot `lens[s / heads] − per + t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeJob {
    /// Input vectors (f32).
    pub x: u64,
    /// Sequences (batch · kv_heads).
    pub seqs: usize,
    /// New vectors per sequence.
    pub per: usize,
    /// Slots per sequence in the planes.
    pub cap: usize,
    /// Sequences per length (KV heads).
    pub heads: usize,
    /// Lengths (i32), or 0.
    pub lens: u64,
    /// Code plane (u8).
    pub codes: u64,
    /// Scale plane (f32).
    pub scales: u64,
}

/// One side: its kind and, for TurboQuant, the CPU codec it must match.
pub struct SideSpec {
    /// The codec name (as `tq_core::build` takes it).
    pub name: String,
    /// How the GPU codes this side.
    pub kind: SideKind,
    /// The codec's seed (rotation and signs).
    pub seed: u64,
    /// Head dimension (64 or 128).
    pub head_dim: usize,
    codec: Box<dyn Codec>,
    tq: Option<TurboQuantMse>,
}

impl SideSpec {
    /// The side for codec `name` at `head_dim` (64 or 128) and `seed`, with its
    /// CPU codec (Hadamard rotation, as the GPU kernels apply it).
    pub fn new(entry: &'static CodecEntry, head_dim: usize, seed: u64) -> Result<Self> {
        if head_dim != 64 && head_dim != 128 {
            return Err(Error::Unsupported(format!("head_dim {head_dim}: the GPU kernels take 64 or 128")));
        }
        let kind = SideKind::from_entry(entry)?;
        let codec = entry.build(head_dim, seed, RotationKind::Hadamard, &[])?;
        let tq = match kind {
            SideKind::Tq { bits, nc } => Some(TurboQuantMse::new(head_dim, bits, seed, RotationKind::Hadamard, nc)?),
            _ => None,
        };
        Ok(Self { name: entry.name.clone(), kind, seed, head_dim, codec, tq })
    }
    /// The CPU codec (the reference this side matches).
    pub fn codec(&self) -> &dyn Codec {
        self.codec.as_ref()
    }
    /// Sign masks of the two Hadamard rounds and the final scale (TurboQuant sides).
    pub fn hadamard(&self) -> Option<(&[u32], &[u32], f32)> {
        self.tq.as_ref().and_then(|c| c.rotation().two_round_pow2())
    }
    /// Lloyd–Max (centroids, boundaries) of a TurboQuant side.
    pub fn codebook(&self) -> Option<(&[f32], &[f32])> {
        self.tq.as_ref().map(|c| (&c.codebook().centroids[..], &c.codebook().boundaries[..]))
    }
    /// Whether the side's vectors are rotated before coding (TurboQuant sides).
    pub fn rotated(&self) -> bool {
        self.kind.rotated()
    }
}

/// Keys and values of a KV precision as the GPU runs it: the same codecs and
/// seeds as `tq_kv::CodecCache` (values seeded with
/// [`tq_core::rng::kv_value_seed`]).
pub fn kv_sides(keys: &'static CodecEntry, values: &'static CodecEntry, head_dim: usize, seed: u64) -> Result<(SideSpec, SideSpec)> {
    Ok((SideSpec::new(keys, head_dim, seed)?, SideSpec::new(values, head_dim, tq_core::rng::kv_value_seed(seed))?))
}

/// CPU codes (`n` consecutive codes of the side's codec) → (code plane, scale plane bytes).
pub fn split_codes(kind: SideKind, d: usize, cpu: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let cs = kind.bytes_per_vector(d);
    if !cpu.len().is_multiple_of(cs) {
        return Err(Error::Shape(format!("{} bytes of codes is not a whole number of {cs}-byte codes", cpu.len())));
    }
    let n = cpu.len() / cs;
    let (pb, sb) = (kind.code_bytes(d), kind.scale_bytes(d));
    let mut codes = Vec::with_capacity(n * pb);
    let mut scales = Vec::with_capacity(n * sb);
    for c in cpu.chunks_exact(cs) {
        match kind {
            SideKind::Tq { .. } => {
                codes.extend_from_slice(&c[..pb]);
                scales.extend_from_slice(&c[pb..]);
            }
            SideKind::Q8_0 => {
                for blk in c.chunks_exact(2 + QK) {
                    scales.extend_from_slice(&blk[..2]);
                    codes.extend_from_slice(&blk[2..]);
                }
            }
            SideKind::Q4_0 => {
                // ggml: byte j = q_j | q_{j+16} << 4; GPU: coordinate j at nibble j (LSB-first)
                for blk in c.chunks_exact(2 + QK / 2) {
                    scales.extend_from_slice(&blk[..2]);
                    let q = |j: usize| {
                        if j < 16 {
                            blk[2 + j] & 15
                        } else {
                            blk[2 + j - 16] >> 4
                        }
                    };
                    for p in 0..QK / 2 {
                        codes.push(q(2 * p) | (q(2 * p + 1) << 4));
                    }
                }
            }
        }
    }
    Ok((codes, scales))
}

/// TurboQuant planes → CPU codes (`[packed indices][f32 scale]` per vector).
pub fn join_tq_codes(d: usize, bits: u32, codes: &[u8], scales: &[f32]) -> Vec<u8> {
    let pb = d * bits as usize / 8;
    let mut out = Vec::with_capacity(scales.len() * (pb + 4));
    for (c, s) in codes.chunks_exact(pb).zip(scales) {
        out.extend_from_slice(c);
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// Most query tokens one decode step takes per sequence.
pub const MAX_Q_TOKENS: usize = 8;

/// Geometry of a batch of sequences for decode attention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads, KV heads and head dimension of every sequence (the
    /// model's geometry; `layers` is not used: one call attends one layer).
    pub heads: KvGeometry,
    /// Tokens in the cache of each sequence (at least `q_tokens` each).
    pub lens: Vec<usize>,
    /// Query tokens per sequence (1 for plain decoding; up to
    /// [`MAX_Q_TOKENS`] when a step verifies several tokens): they are the
    /// last `q_tokens` tokens of each cache, and query token `i` sees the
    /// first `len - q_tokens + 1 + i` cached tokens.
    pub q_tokens: usize,
}

impl AttnShape {
    /// One query token per sequence (plain decoding).
    pub fn decode(heads: KvGeometry, lens: Vec<usize>) -> Self {
        Self { heads, lens, q_tokens: 1 }
    }
    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.lens.len()
    }
    /// Query heads per KV head (the GQA group).
    pub fn group(&self) -> usize {
        self.heads.q_heads / self.heads.kv_heads
    }
    /// The longest sequence (0 for an empty batch).
    pub fn max_len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }
    /// Score rows per KV head: query tokens × GQA group.
    pub fn rows(&self) -> usize {
        self.q_tokens * self.group()
    }
    /// Whether the kernels take this shape: head_dim 64 or 128, query heads
    /// grouped evenly over the KV heads, groups of at most 16, 1 to
    /// [`MAX_Q_TOKENS`] query tokens, every sequence at least as long as its
    /// query tokens.
    pub fn check(&self) -> Result<()> {
        if self.heads.head_dim != 64 && self.heads.head_dim != 128 {
            return Err(Error::Unsupported(format!("head_dim {}: the GPU kernels take 64 or 128", self.heads.head_dim)));
        }
        if self.heads.kv_heads == 0 || self.heads.q_heads == 0 || !self.heads.q_heads.is_multiple_of(self.heads.kv_heads) {
            return Err(Error::Shape(format!("{} query heads cannot be grouped over {} KV heads", self.heads.q_heads, self.heads.kv_heads)));
        }
        if self.group() > 16 {
            return Err(Error::Unsupported(format!("a GQA group of {} query heads (at most 16)", self.group())));
        }
        if self.q_tokens == 0 || self.q_tokens > MAX_Q_TOKENS {
            return Err(Error::Unsupported(format!("{} query tokens per sequence (1 to {MAX_Q_TOKENS})", self.q_tokens)));
        }
        if self.lens.is_empty() || self.lens.contains(&0) {
            return Err(Error::Shape("every sequence needs at least one cached token".into()));
        }
        if let Some(l) = self.lens.iter().find(|&&l| l < self.q_tokens) {
            return Err(Error::Shape(format!("a sequence of {l} cached tokens cannot hold its {} query tokens", self.q_tokens)));
        }
        Ok(())
    }
}

/// Reference decode attention in f64 over dequantized caches: `k`, `v` are
/// `[batch][kv_heads][max_len][head_dim]` decoded values (rows past a
/// sequence's length unused), `q` is `[batch][q_tokens][q_heads][head_dim]`;
/// returns `[batch][q_tokens][q_heads][head_dim]`. Query token `i` attends to
/// the first `len - q_tokens + 1 + i` tokens (see [`AttnShape::q_tokens`]).
pub fn reference_attention(shape: &AttnShape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
    let (d, hq, g, t, nq) = (shape.heads.head_dim, shape.heads.q_heads, shape.group(), shape.max_len(), shape.q_tokens);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0f64; shape.batch() * nq * hq * d];
    for (b, &len) in shape.lens.iter().enumerate() {
        for qi in 0..nq {
            let seen = len - nq + 1 + qi;
            for h in 0..hq {
                let kvh = h / g;
                let base = (b * shape.heads.kv_heads + kvh) * t * d;
                let row = (b * nq + qi) * hq + h;
                let qv = &q[row * d..(row + 1) * d];
                let s: Vec<f64> =
                    (0..seen).map(|i| qv.iter().zip(&k[base + i * d..base + (i + 1) * d]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale).collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = w.iter().sum();
                let o = &mut out[row * d..(row + 1) * d];
                for (i, wi) in w.iter().enumerate() {
                    for (oj, &vj) in o.iter_mut().zip(&v[base + i * d..base + (i + 1) * d]) {
                        *oj += wi / z * vj as f64;
                    }
                }
            }
        }
    }
    out
}

/// ‖a − b‖ / ‖b‖ (NaN anywhere gives NaN).
pub fn rel_error(a: &[f32], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y).powi(2);
        den += y * y;
    }
    if a.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tq_core::registry::lookup;

    #[test]
    fn planes_round_trip_cpu_codes() {
        let d = 128;
        let mut rng = tq_core::rng::Xoshiro256::new(5);
        let xs: Vec<f32> = (0..d * 7).map(|_| rng.gaussian() as f32).collect();
        for name in ["tq-mse-4", "tq-mse-3-nc", "q8_0", "q4_0"] {
            let side = SideSpec::new(lookup(name).unwrap(), d, 9).unwrap();
            let c = side.codec();
            let mut codes = vec![0u8; 7 * c.code_size()];
            c.encode_batch(&xs, &mut codes).unwrap();
            let (plane, scales) = split_codes(side.kind, d, &codes).unwrap();
            assert_eq!(plane.len(), 7 * side.kind.code_bytes(d));
            assert_eq!(scales.len(), 7 * side.kind.scale_bytes(d));
            if let SideKind::Tq { bits, .. } = side.kind {
                let f: Vec<f32> = scales.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                assert_eq!(join_tq_codes(d, bits, &plane, &f), codes);
            }
            if side.kind == SideKind::Q4_0 {
                // the GPU nibble j is coordinate j: decode by hand and compare with the codec
                let mut dec = vec![0.0f32; d];
                c.decode(&codes[..c.code_size()], &mut dec).unwrap();
                for j in 0..d {
                    let q = (plane[j / 2] >> (4 * (j % 2))) & 15;
                    let s = half::f16::from_le_bytes([scales[2 * (j / 32)], scales[2 * (j / 32) + 1]]).to_f32();
                    assert_eq!((q as f32 - 8.0) * s, dec[j], "coordinate {j}");
                }
            }
        }
    }

    #[test]
    fn specs_refuse_what_the_kernels_do_not_take() {
        assert!(matches!(SideSpec::new(lookup("tq-mse-4").unwrap(), 96, 1), Err(Error::Unsupported(_))));
        assert!(matches!(SideSpec::new(lookup("tq-prod-4").unwrap(), 128, 1), Err(Error::Unsupported(_))));
        assert!(matches!(SideSpec::new(lookup("q4_0-rot").unwrap(), 128, 1), Err(Error::Unsupported(_))));
        let (k, v) = kv_sides(lookup("tq-mse-4").unwrap(), lookup("tq-mse-3").unwrap(), 128, 1).unwrap();
        assert_eq!((k.kind, v.kind), (SideKind::Tq { bits: 4, nc: false }, SideKind::Tq { bits: 3, nc: false }));
        let geo = |q_heads, kv_heads| KvGeometry { layers: 1, q_heads, kv_heads, head_dim: 128 };
        assert!(matches!(AttnShape::decode(geo(9, 2), vec![4]).check(), Err(Error::Shape(_))));
        assert!(matches!(AttnShape::decode(geo(8, 2), vec![4, 0]).check(), Err(Error::Shape(_))));
        let multi = |q_tokens, lens| AttnShape { heads: geo(8, 2), lens, q_tokens };
        assert!(multi(4, vec![4, 9]).check().is_ok());
        assert!(matches!(multi(4, vec![3, 9]).check(), Err(Error::Shape(_))));
        assert!(matches!(multi(0, vec![9]).check(), Err(Error::Unsupported(_))));
        assert!(matches!(multi(MAX_Q_TOKENS + 1, vec![99]).check(), Err(Error::Unsupported(_))));
    }

    #[test]
    fn reference_attention_masks_each_query_token_causally() {
        // one head, d = 64, 3 cached tokens, 2 query tokens: token 0 sees the
        // first 2 cached tokens, token 1 all 3; with the same query for both and
        // keys equal, the outputs are the means of the values they see
        let d = 64;
        let shape = AttnShape { heads: KvGeometry { layers: 1, q_heads: 1, kv_heads: 1, head_dim: d }, lens: vec![3], q_tokens: 2 };
        let k = vec![0.5f32; 3 * d];
        let v: Vec<f32> = (0..3 * d).map(|i| (i / d) as f32 * 3.0).collect(); // rows 0, 3, 6
        let q = vec![1.0f32; 2 * d];
        let out = reference_attention(&shape, &q, &k, &v);
        assert!(out[..d].iter().all(|&x| (x - 1.5).abs() < 1e-12), "token 0 sees rows 0 and 3");
        assert!(out[d..].iter().all(|&x| (x - 3.0).abs() < 1e-12), "token 1 sees rows 0, 3 and 6");
    }
}
