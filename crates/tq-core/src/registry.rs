//! The codec registry: every codec is declared once here, with a stable name
//! and numeric id (ids are never reused; a removed codec stays as a tombstone).
//! The CLI, file headers and tests iterate over it.

use std::sync::OnceLock;

use crate::bitpack::packed_len;
use crate::baselines::fp::{Fp4, Fp4Kind};
use crate::baselines::ggml::{Ggml, GgmlType, QK};
use crate::baselines::polar::Polar;
use crate::baselines::pq::{pq_m, Pq};
use crate::baselines::rabitq::RaBitQ;
use crate::codec::{Codec, TurboQuantFractional, TurboQuantMse, TurboQuantProd};
use crate::error::{Result, TqError};
use crate::rotation::RotationKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodecKind {
    /// TurboQuant_mse at `bits`; `nc` = norm correction.
    Mse { bits: u32, nc: bool },
    /// TurboQuant_prod at `bits` total (bits-1 MSE + 1 QJL); `orth` = orthogonal QJL projection.
    Prod { bits: u32, orth: bool },
    /// Outlier-channel split: half the channels at `hi`, half at `lo` bits.
    Fractional { hi: u32, lo: u32 },
    /// RaBitQ (`bits` = 1) and extended RaBitQ.
    RaBitQ { bits: u32 },
    /// Product quantization with 8-bit sub-codes, `dim·bits/8` sub-spaces.
    Pq { bits: u32 },
    /// llama.cpp block formats, optionally Hadamard-rotated.
    Ggml { t: GgmlType, rot: bool },
    /// FP4 (E2M1) with MX or NV block scales.
    Fp4 { kind: Fp4Kind },
    /// PolarQuant: recursive polar transform of blocks of 16, `bits` at level 1.
    Polar { bits: u32 },
}

impl CodecKind {
    /// One of the TurboQuant codecs (as opposed to a baseline).
    pub fn is_turboquant(&self) -> bool {
        matches!(self, CodecKind::Mse { .. } | CodecKind::Prod { .. } | CodecKind::Fractional { .. })
    }
}

#[derive(Clone, Debug)]
pub struct CodecEntry {
    /// Stable numeric id stored in file headers.
    pub id: u16,
    pub name: String,
    pub kind: CodecKind,
}

impl CodecEntry {
    /// Bytes per code at `dim`.
    pub fn code_size(&self, dim: usize) -> usize {
        match self.kind {
            CodecKind::Mse { bits, .. } => packed_len(dim, bits) + 4,
            CodecKind::Prod { bits, .. } => {
                packed_len(dim, bits - 1) + packed_len(dim, 1) + if bits >= 2 { 8 } else { 4 }
            }
            CodecKind::Fractional { hi, lo } => packed_len(dim / 2, hi) + packed_len(dim - dim / 2, lo) + 8,
            CodecKind::RaBitQ { bits } => packed_len(dim, bits) + 8,
            CodecKind::Pq { bits } => pq_m(dim, bits),
            CodecKind::Ggml { t, .. } => dim.div_ceil(QK) * t.block_bytes(),
            CodecKind::Fp4 { kind: Fp4Kind::Mx } => dim.div_ceil(32) * 17,
            CodecKind::Fp4 { kind: Fp4Kind::Nv } => dim.div_ceil(16) * 9 + 4,
            CodecKind::Polar { bits } => {
                let (b, h, n) = (bits as usize, bits.div_ceil(2) as usize, dim.div_ceil(16));
                (n * 8 * b).div_ceil(8) + (n * 4 * h).div_ceil(8) + (n * 2 * h).div_ceil(8) + (n * h).div_ceil(8) + 2 * n
            }
        }
    }

    /// True bits per value at `dim`, every overhead included.
    pub fn bits_per_value(&self, dim: usize) -> f64 {
        (self.code_size(dim) * 8) as f64 / dim as f64
    }

    /// Nominal bits per coordinate (before norms).
    pub fn nominal_bits(&self) -> f64 {
        match self.kind {
            CodecKind::Mse { bits, .. } | CodecKind::Prod { bits, .. } => bits as f64,
            CodecKind::Fractional { hi, lo } => (hi + lo) as f64 / 2.0,
            CodecKind::RaBitQ { bits } | CodecKind::Pq { bits } => bits as f64,
            CodecKind::Ggml { t: GgmlType::Q8_0, .. } => 8.0,
            CodecKind::Ggml { t: GgmlType::Q4_0, .. } | CodecKind::Fp4 { .. } => 4.0,
            CodecKind::Polar { bits } => (8 * bits + 7 * bits.div_ceil(2)) as f64 / 16.0,
        }
    }

    /// Human-readable code-size formula.
    pub fn code_size_formula(&self) -> String {
        match self.kind {
            CodecKind::Mse { bits, .. } => format!("ceil({bits}·dim/8) + 4"),
            CodecKind::Prod { bits: 1, .. } => "ceil(dim/8) + 4".to_string(),
            CodecKind::Prod { bits, .. } => format!("ceil({}·dim/8) + ceil(dim/8) + 8", bits - 1),
            CodecKind::Fractional { hi, lo } => format!("ceil({hi}·⌊dim/2⌋/8) + ceil({lo}·⌈dim/2⌉/8) + 8"),
            CodecKind::RaBitQ { bits } => format!("ceil({bits}·dim/8) + 8"),
            CodecKind::Pq { bits } => format!("round({bits}·dim/8) (+ 1 KiB·dim codebooks per collection)"),
            CodecKind::Ggml { t: GgmlType::Q8_0, .. } => "34·ceil(dim/32)".to_string(),
            CodecKind::Ggml { t: GgmlType::Q4_0, .. } => "18·ceil(dim/32)".to_string(),
            CodecKind::Fp4 { kind: Fp4Kind::Mx } => "17·ceil(dim/32)".to_string(),
            CodecKind::Fp4 { kind: Fp4Kind::Nv } => "9·ceil(dim/16) + 4".to_string(),
            CodecKind::Polar { bits } => {
                let h = bits.div_ceil(2);
                format!("per 16 values: ceil-packed {bits}·8 + {h}·7 angle bits + 2 bytes f16 radius")
            }
        }
    }

    pub fn description(&self) -> &'static str {
        match self.kind {
            CodecKind::Mse { nc: false, .. } => "TurboQuant_mse (Alg. 1): rotation + Lloyd-Max, f32 norm",
            CodecKind::Mse { nc: true, .. } => "TurboQuant_mse with norm correction ‖x‖/⟨u,û⟩ (unbiased ⟨q,x̂⟩)",
            CodecKind::Prod { bits: 1, orth: false } => "QJL: 1-bit sign sketch (Gaussian S) + f32 norm (unbiased)",
            CodecKind::Prod { bits: 1, orth: true } => "QJL with an orthogonal projection (lower variance, unbiased)",
            CodecKind::Prod { orth: false, .. } => {
                "TurboQuant_prod (Alg. 2): (b-1)-bit mse + 1-bit QJL (Gaussian S) of the residual"
            }
            CodecKind::Prod { orth: true, .. } => "TurboQuant_prod with an orthogonal QJL projection",
            CodecKind::Fractional { .. } => "two TurboQuant_mse instances over an outlier-channel split",
            CodecKind::RaBitQ { bits: 1 } => "baseline RaBitQ: rotation, sign bits, unbiased estimator (F, r per vector)",
            CodecKind::RaBitQ { .. } => "baseline extended RaBitQ: B-bit grid with the rescale maximizing ⟨ō,o⟩",
            CodecKind::Pq { .. } => "baseline PQ: k-means codebooks, 8-bit sub-codes, ADC tables (needs training)",
            CodecKind::Ggml { t: GgmlType::Q8_0, rot: false } => "baseline llama.cpp q8_0: blocks of 32 int8, f16 scale",
            CodecKind::Ggml { t: GgmlType::Q4_0, rot: false } => "baseline llama.cpp q4_0: blocks of 32 4-bit, f16 scale",
            CodecKind::Ggml { rot: true, .. } => "baseline llama.cpp block format after a Hadamard rotation",
            CodecKind::Fp4 { kind: Fp4Kind::Mx } => "baseline MXFP4: E2M1, blocks of 32, E8M0 scale",
            CodecKind::Fp4 { kind: Fp4Kind::Nv } => "baseline NVFP4: E2M1, blocks of 16, E4M3 scale, f32 vector scale",
            CodecKind::Polar { .. } => "baseline PolarQuant: rotation, 4-level polar transform of 16-blocks, angle codebooks, f16 radius",
        }
    }

    /// Smallest supported dimension.
    pub fn min_dim(&self) -> usize {
        match self.kind {
            CodecKind::Fractional { .. } => 4,
            _ => 2,
        }
    }

    /// Builds the codec; `params` are the stored parameters (empty for defaults).
    pub fn build(&self, dim: usize, seed: u64, rotation: RotationKind, params: &[u8]) -> Result<Box<dyn Codec>> {
        if dim < self.min_dim() {
            return Err(TqError::BadDim(dim, self.min_dim()));
        }
        crate::limits::check_dim(dim, None)?;
        let check_empty = || {
            if params.is_empty() {
                Ok(())
            } else {
                Err(TqError::BadParams(format!("{} takes no parameters, got {} bytes", self.name, params.len())))
            }
        };
        Ok(match self.kind {
            CodecKind::Mse { bits, nc } => {
                check_empty()?;
                Box::new(TurboQuantMse::new(dim, bits, seed, rotation, nc)?)
            }
            CodecKind::Prod { bits, orth } => {
                check_empty()?;
                Box::new(TurboQuantProd::new(dim, bits, seed, rotation, orth)?)
            }
            CodecKind::Fractional { hi, lo } => {
                let c = TurboQuantFractional::new(&self.name, dim, hi, lo, seed, rotation)?;
                Box::new(if params.is_empty() { c } else { c.with_params(params)? })
            }
            CodecKind::RaBitQ { bits } => Box::new(RaBitQ::new(dim, bits, seed, rotation, params)?),
            CodecKind::Pq { bits } => Box::new(Pq::new(dim, bits, seed, params)?),
            CodecKind::Ggml { t, rot } => {
                check_empty()?;
                Box::new(Ggml::new(dim, t, rot, seed, rotation)?)
            }
            CodecKind::Fp4 { kind } => {
                check_empty()?;
                Box::new(Fp4::new(dim, kind, seed)?)
            }
            CodecKind::Polar { bits } => {
                check_empty()?;
                Box::new(Polar::new(dim, bits, seed, rotation)?)
            }
        })
    }
}

/// All registered codecs, in id order.
pub fn registry() -> &'static [CodecEntry] {
    static R: OnceLock<Vec<CodecEntry>> = OnceLock::new();
    R.get_or_init(|| {
        let mut v = Vec::new();
        for bits in 1..=8u32 {
            v.push(CodecEntry { id: bits as u16, name: format!("tq-mse-{bits}"), kind: CodecKind::Mse { bits, nc: false } });
        }
        for bits in 1..=8u32 {
            v.push(CodecEntry {
                id: 8 + bits as u16,
                name: format!("tq-mse-{bits}-nc"),
                kind: CodecKind::Mse { bits, nc: true },
            });
        }
        for bits in 1..=8u32 {
            v.push(CodecEntry {
                id: 16 + bits as u16,
                name: format!("tq-prod-{bits}"),
                kind: CodecKind::Prod { bits, orth: false },
            });
        }
        v.push(CodecEntry { id: 25, name: "tq-mse-2.5".into(), kind: CodecKind::Fractional { hi: 3, lo: 2 } });
        v.push(CodecEntry { id: 26, name: "tq-mse-3.5".into(), kind: CodecKind::Fractional { hi: 4, lo: 3 } });
        for bits in 1..=8u32 {
            v.push(CodecEntry {
                id: 26 + bits as u16,
                name: format!("tq-prod-{bits}-orth"),
                kind: CodecKind::Prod { bits, orth: true },
            });
        }
        // baselines
        for bits in 1..=8u32 {
            v.push(CodecEntry { id: 34 + bits as u16, name: format!("rabitq-{bits}"), kind: CodecKind::RaBitQ { bits } });
        }
        for bits in 1..=8u32 {
            v.push(CodecEntry { id: 42 + bits as u16, name: format!("pq-{bits}"), kind: CodecKind::Pq { bits } });
        }
        for (id, name, t, rot) in [
            (51, "q8_0", GgmlType::Q8_0, false),
            (52, "q4_0", GgmlType::Q4_0, false),
            (53, "q8_0-rot", GgmlType::Q8_0, true),
            (54, "q4_0-rot", GgmlType::Q4_0, true),
        ] {
            v.push(CodecEntry { id, name: name.into(), kind: CodecKind::Ggml { t, rot } });
        }
        v.push(CodecEntry { id: 55, name: "mxfp4".into(), kind: CodecKind::Fp4 { kind: Fp4Kind::Mx } });
        v.push(CodecEntry { id: 56, name: "nvfp4".into(), kind: CodecKind::Fp4 { kind: Fp4Kind::Nv } });
        // (57..=78: the matrix codecs of `crate::matrix::matrix_registry`)
        for bits in 2..=8u32 {
            v.push(CodecEntry { id: 77 + bits as u16, name: format!("polar-{bits}"), kind: CodecKind::Polar { bits } });
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

pub fn by_id(id: u16) -> Option<&'static CodecEntry> {
    registry().iter().find(|e| e.id == id)
}

/// Builds a codec by name with default parameters.
pub fn build(name: &str, dim: usize, seed: u64, rotation: RotationKind) -> Result<Box<dyn Codec>> {
    lookup(name)?.build(dim, seed, rotation, &[])
}
