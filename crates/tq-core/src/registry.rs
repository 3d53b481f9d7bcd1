//! The codec registry: every codec is declared once here, with a stable name
//! and numeric id (ids are never reused; a removed codec stays as a tombstone).
//! The CLI, file headers and tests iterate over it.
//!
//! An entry states what callers need to know without building the codec or
//! matching on its name: its family and bits ([`Family`], `bits`,
//! `norm_correction`), its capabilities ([`Caps`]), code size and
//! description, and a builder. Adding a codec = one impl file and one entry
//! function below (pushed in `registry()` with a new id).

use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::baselines::fp::{Fp4, Fp4Kind};
use crate::baselines::ggml::{Ggml, GgmlType, QK};
use crate::baselines::polar::Polar;
use crate::baselines::pq::{pq_m, Pq};
use crate::baselines::rabitq::RaBitQ;
use crate::bitpack::packed_len;
use crate::codec::{Codec, TurboQuantFractional, TurboQuantMse, TurboQuantProd};
use crate::error::{Result, TqError};
use crate::rotation::RotationKind;

/// A codec's family and parameters (what its name encodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodecKind {
    /// TurboQuant_mse at `bits`; `nc` = norm correction.
    Mse {
        /// Bits per coordinate.
        bits: u32,
        /// Norm correction (`-nc`).
        nc: bool,
    },
    /// TurboQuant_prod at `bits` total (bits-1 MSE + 1 QJL); `orth` = orthogonal QJL projection.
    Prod {
        /// Total bits per coordinate.
        bits: u32,
        /// Orthogonal QJL projection (`-orth`).
        orth: bool,
    },
    /// Outlier-channel split: half the channels at `hi`, half at `lo` bits.
    Fractional {
        /// Bits of the outlier channels.
        hi: u32,
        /// Bits of the other channels.
        lo: u32,
    },
    /// RaBitQ (`bits` = 1) and extended RaBitQ.
    RaBitQ {
        /// Bits per coordinate.
        bits: u32,
    },
    /// Product quantization with 8-bit sub-codes, `dim·bits/8` sub-spaces.
    Pq {
        /// Bits per value.
        bits: u32,
    },
    /// llama.cpp block formats, optionally Hadamard-rotated.
    Ggml {
        /// The block format.
        t: GgmlType,
        /// Rotated before quantizing (`-rot`).
        rot: bool,
    },
    /// FP4 (E2M1) with MX or NV block scales.
    Fp4 {
        /// MX or NV block scales.
        kind: Fp4Kind,
    },
    /// PolarQuant: recursive polar transform of blocks of 16, `bits` at level 1.
    Polar {
        /// Bits of the level-1 angles.
        bits: u32,
    },
}

impl CodecKind {
    /// One of the TurboQuant codecs (as opposed to a baseline).
    pub fn is_turboquant(&self) -> bool {
        matches!(self, CodecKind::Mse { .. } | CodecKind::Prod { .. } | CodecKind::Fractional { .. })
    }

    /// The family, without its parameters.
    pub fn family(&self) -> Family {
        match self {
            CodecKind::Mse { .. } => Family::Mse,
            CodecKind::Prod { .. } => Family::Prod,
            CodecKind::Fractional { .. } => Family::Fractional,
            CodecKind::RaBitQ { .. } => Family::RaBitQ,
            CodecKind::Pq { .. } => Family::Pq,
            CodecKind::Ggml { .. } => Family::Ggml,
            CodecKind::Fp4 { .. } => Family::Fp4,
            CodecKind::Polar { .. } => Family::Polar,
        }
    }
}

/// Codec families (the registry's structured alternative to name prefixes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `tq-mse-B`, `tq-mse-B-nc`
    Mse,
    /// `tq-prod-B`, `tq-prod-B-orth`
    Prod,
    /// `tq-mse-2.5`, `tq-mse-3.5`
    Fractional,
    /// `rabitq-B`
    RaBitQ,
    /// `pq-B`
    Pq,
    /// `q8_0`, `q4_0`, `q8_0-rot`, `q4_0-rot`
    Ggml,
    /// `mxfp4`, `nvfp4`
    Fp4,
    /// `polar-B`
    Polar,
}

/// How a KV cache stores a vector coded by a codec ([`crate::KvLayout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvScale {
    /// Codebook codes: the packed indices and the f32 scale as a bf16
    /// ([`crate::kv_layout::KV_SCALE_BYTES`]); two-part codes (fractional
    /// rates) both scales.
    Bf16,
    /// The whole code, with the scales it holds itself (f32 norms, f16 or
    /// E8M0/E4M3 block scales).
    InCode,
}

/// What a codec can do, known without building it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Encodes a stream without seeing data first (no training, or an optional
    /// one: RaBitQ's centre defaults to the origin).
    pub online: bool,
    /// `train` learns data-dependent parameters (`Codec::wants_training`).
    pub trainable: bool,
    /// Refuses to encode until trained (PQ).
    pub needs_training: bool,
    /// Codes are scaled codebook vectors (`AttentionCodec::codebook_view`).
    pub codebook: bool,
    /// 4-bit fast-scan support (`Codec::fastscan`).
    pub fastscan: bool,
    /// The CUDA KV kernels take it as a cache side (tq-cuda's `SideKind`).
    pub gpu: bool,
    /// Usable as a KV-cache precision, and how the cache stores its scale.
    pub kv: Option<KvScale>,
}

const ONLINE: Caps = Caps { online: true, trainable: false, needs_training: false, codebook: false, fastscan: false, gpu: false, kv: None };

type Builder = dyn Fn(&CodecEntry, usize, u64, RotationKind, &[u8]) -> Result<Box<dyn Codec>> + Send + Sync;
type SizeFn = dyn Fn(usize) -> usize + Send + Sync;

/// One registered codec: its id, name, kind, capabilities, sizes and builder.
#[derive(Clone)]
pub struct CodecEntry {
    /// Stable numeric id stored in file headers.
    pub id: u16,
    /// Registry name, e.g. `tq-mse-4`.
    pub name: String,
    /// Family and parameters.
    pub kind: CodecKind,
    /// The family (`kind.family()`).
    pub family: Family,
    /// The integer bit width in the name (`tq-mse-4`: 4, `q8_0`: 8, `mxfp4`: 4);
    /// `None` for the fractional rates (see `kind`, `nominal_bits`).
    pub bits: Option<u32>,
    /// TurboQuant_mse with norm correction (`-nc`).
    pub norm_correction: bool,
    /// What the codec can do.
    pub caps: Caps,
    description: &'static str,
    formula: String,
    nominal: f64,
    min_dim: usize,
    size: Arc<SizeFn>,
    builder: Arc<Builder>,
}

impl fmt::Debug for CodecEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodecEntry").field("id", &self.id).field("name", &self.name).field("kind", &self.kind).field("caps", &self.caps).finish_non_exhaustive()
    }
}

impl CodecEntry {
    /// Bytes per code at `dim`.
    pub fn code_size(&self, dim: usize) -> usize {
        (self.size)(dim)
    }

    /// True bits per value at `dim`, every overhead included.
    pub fn bits_per_value(&self, dim: usize) -> f64 {
        (self.code_size(dim) * 8) as f64 / dim as f64
    }

    /// Nominal bits per coordinate (before norms).
    pub fn nominal_bits(&self) -> f64 {
        self.nominal
    }

    /// Human-readable code-size formula.
    pub fn code_size_formula(&self) -> String {
        self.formula.clone()
    }

    /// One-line description.
    pub fn description(&self) -> &'static str {
        self.description
    }

    /// Smallest supported dimension.
    pub fn min_dim(&self) -> usize {
        self.min_dim
    }

    /// Builds the codec; `params` are the stored parameters (empty for defaults).
    pub fn build(&self, dim: usize, seed: u64, rotation: RotationKind, params: &[u8]) -> Result<Box<dyn Codec>> {
        crate::limits::check_dim("dim", dim)?;
        if dim < self.min_dim() {
            return Err(TqError::BadDim(dim, self.min_dim()));
        }
        (self.builder)(self, dim, seed, rotation, params)
    }

    /// Refuses stored parameters for a codec that takes none.
    fn no_params(&self, params: &[u8]) -> Result<()> {
        if params.is_empty() {
            Ok(())
        } else {
            Err(TqError::BadParams(format!("{} takes no parameters, got {} bytes", self.name, params.len())))
        }
    }
}

/// An entry with the defaults every field but these has.
#[allow(clippy::too_many_arguments)]
fn entry(
    id: u16,
    name: String,
    kind: CodecKind,
    bits: Option<u32>,
    caps: Caps,
    description: &'static str,
    formula: String,
    nominal: f64,
    size: impl Fn(usize) -> usize + Send + Sync + 'static,
    builder: impl Fn(&CodecEntry, usize, u64, RotationKind, &[u8]) -> Result<Box<dyn Codec>> + Send + Sync + 'static,
) -> CodecEntry {
    CodecEntry {
        id,
        name,
        kind,
        family: kind.family(),
        bits,
        norm_correction: matches!(kind, CodecKind::Mse { nc: true, .. }),
        caps,
        description,
        formula,
        nominal,
        min_dim: 2,
        size: Arc::new(size),
        builder: Arc::new(builder),
    }
}

// ---- one function per family ----

fn mse(id: u16, bits: u32, nc: bool) -> CodecEntry {
    let caps = Caps { codebook: true, fastscan: matches!(bits, 1 | 2 | 4), gpu: (2..=4).contains(&bits), kv: Some(KvScale::Bf16), ..ONLINE };
    let description = if nc {
        "TurboQuant_mse with norm correction ‖x‖/⟨u,û⟩ (unbiased ⟨q,x̂⟩)"
    } else {
        "TurboQuant_mse (Alg. 1): rotation + Lloyd-Max, f32 norm"
    };
    entry(
        id,
        format!("tq-mse-{bits}{}", if nc { "-nc" } else { "" }),
        CodecKind::Mse { bits, nc },
        Some(bits),
        caps,
        description,
        format!("ceil({bits}·dim/8) + 4"),
        bits as f64,
        move |dim| packed_len(dim, bits) + 4,
        move |e, dim, seed, rot, params| {
            e.no_params(params)?;
            Ok(Box::new(TurboQuantMse::new(dim, bits, seed, rot, nc)?))
        },
    )
}

fn prod(id: u16, bits: u32, orth: bool) -> CodecEntry {
    let description = match (bits, orth) {
        (1, false) => "QJL: 1-bit sign sketch (Gaussian S) + f32 norm (unbiased)",
        (1, true) => "QJL with an orthogonal projection (lower variance, unbiased)",
        (_, false) => "TurboQuant_prod (Alg. 2): (b-1)-bit mse + 1-bit QJL (Gaussian S) of the residual",
        (_, true) => "TurboQuant_prod with an orthogonal QJL projection",
    };
    let formula = if bits == 1 { "ceil(dim/8) + 4".to_string() } else { format!("ceil({}·dim/8) + ceil(dim/8) + 8", bits - 1) };
    entry(
        id,
        format!("tq-prod-{bits}{}", if orth { "-orth" } else { "" }),
        CodecKind::Prod { bits, orth },
        Some(bits),
        Caps { kv: Some(KvScale::InCode), ..ONLINE },
        description,
        formula,
        bits as f64,
        move |dim| packed_len(dim, bits - 1) + packed_len(dim, 1) + if bits >= 2 { 8 } else { 4 },
        move |e, dim, seed, rot, params| {
            e.no_params(params)?;
            Ok(Box::new(TurboQuantProd::new(dim, bits, seed, rot, orth)?))
        },
    )
}

fn fractional(id: u16, name: &str, hi: u32, lo: u32) -> CodecEntry {
    let caps = Caps { online: false, trainable: true, kv: Some(KvScale::Bf16), ..ONLINE };
    let mut e = entry(
        id,
        name.to_string(),
        CodecKind::Fractional { hi, lo },
        None,
        caps,
        "two TurboQuant_mse instances over an outlier-channel split",
        format!("ceil({hi}·⌊dim/2⌋/8) + ceil({lo}·⌈dim/2⌉/8) + 8"),
        (hi + lo) as f64 / 2.0,
        move |dim| packed_len(dim / 2, hi) + packed_len(dim - dim / 2, lo) + 8,
        move |e, dim, seed, rot, params| {
            let c = TurboQuantFractional::new(&e.name, dim, hi, lo, seed, rot)?;
            Ok(Box::new(if params.is_empty() { c } else { c.with_params(params)? }))
        },
    );
    e.min_dim = 4;
    e
}

fn rabitq(id: u16, bits: u32) -> CodecEntry {
    let description = if bits == 1 {
        "baseline RaBitQ: rotation, sign bits, unbiased estimator (F, r per vector)"
    } else {
        "baseline extended RaBitQ: B-bit grid with the rescale maximizing ⟨ō,o⟩"
    };
    entry(
        id,
        format!("rabitq-{bits}"),
        CodecKind::RaBitQ { bits },
        Some(bits),
        Caps { trainable: true, fastscan: matches!(bits, 1 | 2 | 4), ..ONLINE },
        description,
        format!("ceil({bits}·dim/8) + 8"),
        bits as f64,
        move |dim| packed_len(dim, bits) + 8,
        move |_, dim, seed, rot, params| Ok(Box::new(RaBitQ::new(dim, bits, seed, rot, params)?)),
    )
}

fn pq(id: u16, bits: u32) -> CodecEntry {
    entry(
        id,
        format!("pq-{bits}"),
        CodecKind::Pq { bits },
        Some(bits),
        Caps { online: false, trainable: true, needs_training: true, ..ONLINE },
        "baseline PQ: k-means codebooks, 8-bit sub-codes, ADC tables (needs training)",
        format!("round({bits}·dim/8) (+ 1 KiB·dim codebooks per collection)"),
        bits as f64,
        move |dim| pq_m(dim, bits),
        move |_, dim, seed, _, params| Ok(Box::new(Pq::new(dim, bits, seed, params)?)),
    )
}

fn ggml(id: u16, name: &str, t: GgmlType, rot: bool) -> CodecEntry {
    let (bits, description, formula) = match (t, rot) {
        (GgmlType::Q8_0, false) => (8, "baseline llama.cpp q8_0: blocks of 32 int8, f16 scale", "34·ceil(dim/32)"),
        (GgmlType::Q4_0, false) => (4, "baseline llama.cpp q4_0: blocks of 32 4-bit, f16 scale", "18·ceil(dim/32)"),
        (GgmlType::Q8_0, true) => (8, "baseline llama.cpp block format after a Hadamard rotation", "34·ceil(dim/32)"),
        (GgmlType::Q4_0, true) => (4, "baseline llama.cpp block format after a Hadamard rotation", "18·ceil(dim/32)"),
    };
    entry(
        id,
        name.to_string(),
        CodecKind::Ggml { t, rot },
        Some(bits),
        Caps { gpu: !rot, kv: Some(KvScale::InCode), ..ONLINE },
        description,
        formula.to_string(),
        bits as f64,
        move |dim| dim.div_ceil(QK) * t.block_bytes(),
        move |e, dim, seed, rotation, params| {
            e.no_params(params)?;
            Ok(Box::new(Ggml::new(dim, t, rot, seed, rotation)?))
        },
    )
}

fn fp4(id: u16, name: &str, kind: Fp4Kind) -> CodecEntry {
    let (description, formula) = match kind {
        Fp4Kind::Mx => ("baseline MXFP4: E2M1, blocks of 32, E8M0 scale", "17·ceil(dim/32)"),
        Fp4Kind::Nv => ("baseline NVFP4: E2M1, blocks of 16, E4M3 scale, f32 vector scale", "9·ceil(dim/16) + 4"),
    };
    entry(
        id,
        name.to_string(),
        CodecKind::Fp4 { kind },
        Some(4),
        Caps { kv: Some(KvScale::InCode), ..ONLINE },
        description,
        formula.to_string(),
        4.0,
        move |dim| match kind {
            Fp4Kind::Mx => dim.div_ceil(32) * 17,
            Fp4Kind::Nv => dim.div_ceil(16) * 9 + 4,
        },
        move |e, dim, seed, _, params| {
            e.no_params(params)?;
            Ok(Box::new(Fp4::new(dim, kind, seed)?))
        },
    )
}

fn polar(id: u16, bits: u32) -> CodecEntry {
    let h = bits.div_ceil(2);
    entry(
        id,
        format!("polar-{bits}"),
        CodecKind::Polar { bits },
        Some(bits),
        ONLINE,
        "baseline PolarQuant: rotation, 4-level polar transform of 16-blocks, angle codebooks, f16 radius",
        format!("per 16 values: ceil-packed {bits}·8 + {h}·7 angle bits + 2 bytes f16 radius"),
        (8 * bits + 7 * h) as f64 / 16.0,
        move |dim| {
            let (b, h, n) = (bits as usize, h as usize, dim.div_ceil(16));
            (n * 8 * b).div_ceil(8) + (n * 4 * h).div_ceil(8) + (n * 2 * h).div_ceil(8) + (n * h).div_ceil(8) + 2 * n
        },
        move |e, dim, seed, rot, params| {
            e.no_params(params)?;
            Ok(Box::new(Polar::new(dim, bits, seed, rot)?))
        },
    )
}

/// All registered codecs, in id order.
pub fn registry() -> &'static [CodecEntry] {
    static R: OnceLock<Vec<CodecEntry>> = OnceLock::new();
    R.get_or_init(|| {
        let mut v = Vec::new();
        for b in 1..=8u32 {
            v.push(mse(b as u16, b, false));
        }
        for b in 1..=8u32 {
            v.push(mse(8 + b as u16, b, true));
        }
        for b in 1..=8u32 {
            v.push(prod(16 + b as u16, b, false));
        }
        v.push(fractional(25, "tq-mse-2.5", 3, 2));
        v.push(fractional(26, "tq-mse-3.5", 4, 3));
        for b in 1..=8u32 {
            v.push(prod(26 + b as u16, b, true));
        }
        // baselines
        for b in 1..=8u32 {
            v.push(rabitq(34 + b as u16, b));
        }
        for b in 1..=8u32 {
            v.push(pq(42 + b as u16, b));
        }
        v.push(ggml(51, "q8_0", GgmlType::Q8_0, false));
        v.push(ggml(52, "q4_0", GgmlType::Q4_0, false));
        v.push(ggml(53, "q8_0-rot", GgmlType::Q8_0, true));
        v.push(ggml(54, "q4_0-rot", GgmlType::Q4_0, true));
        v.push(fp4(55, "mxfp4", Fp4Kind::Mx));
        v.push(fp4(56, "nvfp4", Fp4Kind::Nv));
        // (57..=78: the matrix codecs of `crate::matrix::matrix_registry`)
        for b in 2..=8u32 {
            v.push(polar(77 + b as u16, b));
        }
        v
    })
}

/// Looks a codec up by name; unknown names and out-of-range bit widths are named in the error.
pub fn lookup(name: &str) -> Result<&'static CodecEntry> {
    if let Some(e) = registry().iter().find(|e| e.name == name) {
        return Ok(e);
    }
    // A well-formed TurboQuant name with an unsupported bit width gets the more precise error.
    for prefix in ["tq-mse-", "tq-prod-", "rabitq-", "pq-", "polar-"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let num = rest.strip_suffix("-nc").or_else(|| rest.strip_suffix("-orth")).unwrap_or(rest);
            if let Ok(b) = num.parse::<u32>() {
                return Err(TqError::UnsupportedBits(b));
            }
        }
    }
    let known: Vec<&str> = registry().iter().map(|e| e.name.as_str()).collect();
    Err(TqError::UnknownCodec { name: name.to_string(), known: known.join(", ") })
}

/// The codec with the stable numeric `id`, if any.
pub fn by_id(id: u16) -> Option<&'static CodecEntry> {
    registry().iter().find(|e| e.id == id)
}

/// Builds a codec by name with default parameters.
pub fn build(name: &str, dim: usize, seed: u64, rotation: RotationKind) -> Result<Box<dyn Codec>> {
    lookup(name)?.build(dim, seed, rotation, &[])
}
