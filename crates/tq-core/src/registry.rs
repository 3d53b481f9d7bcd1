//! The codec registry: every codec is declared once here, with a stable name
//! and numeric id (ids are never reused; a removed codec stays as a tombstone).
//! The CLI, file headers and tests iterate over it.

use std::sync::OnceLock;

use crate::bitpack::packed_len;
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
        }
    }

    /// Human-readable code-size formula.
    pub fn code_size_formula(&self) -> String {
        match self.kind {
            CodecKind::Mse { bits, .. } => format!("ceil({bits}·dim/8) + 4"),
            CodecKind::Prod { bits: 1, .. } => "ceil(dim/8) + 4".to_string(),
            CodecKind::Prod { bits, .. } => format!("ceil({}·dim/8) + ceil(dim/8) + 8", bits - 1),
            CodecKind::Fractional { hi, lo } => format!("ceil({hi}·⌊dim/2⌋/8) + ceil({lo}·⌈dim/2⌉/8) + 8"),
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
        v
    })
}

/// Looks a codec up by name; unknown names and out-of-range bit widths are named in the error.
pub fn lookup(name: &str) -> Result<&'static CodecEntry> {
    if let Some(e) = registry().iter().find(|e| e.name == name) {
        return Ok(e);
    }
    // A well-formed TurboQuant name with an unsupported bit width gets the more precise error.
    for prefix in ["tq-mse-", "tq-prod-"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let num = rest.strip_suffix("-nc").or_else(|| rest.strip_suffix("-orth")).unwrap_or(rest);
            if let Ok(b) = num.parse::<u32>() {
                return Err(TqError::UnsupportedBits(b));
            }
        }
    }
    Err(TqError::UnknownCodec(name.to_string()))
}

pub fn by_id(id: u16) -> Option<&'static CodecEntry> {
    registry().iter().find(|e| e.id == id)
}

/// Builds a codec by name with default parameters.
pub fn build(name: &str, dim: usize, seed: u64, rotation: RotationKind) -> Result<Box<dyn Codec>> {
    lookup(name)?.build(dim, seed, rotation, &[])
}
