//! KV-cache precision strings and memory accounting (shared by the CLI, the
//! Python bindings and, later, the compressed cache itself).
//!
//! A precision names how keys and values are stored, per layer and KV head:
//! `f32`, `f16`, `q8_0`, `q4_0`, `q8_0-rot`, `q4_0-rot`, `kivi-B`, `mxfp4`,
//! `nvfp4`, `tq-mse-B`, `tq-mse-B-nc`, `tq-prod-B`, `tq-mse-2.5`, `tq-mse-3.5`,
//! and the asymmetric `kBvC` (TurboQuant `tq-mse` keys at B bits, values at C).
//! Bytes per token are exact: every code's norms and scales are counted (KIVI's
//! per-group scales are amortized over its group of 32 tokens). The cache keeps
//! the scale of codebook codes (TurboQuant MSE) as a bf16, see [`kv_code_size`].

use crate::error::{Result, TqError};
use crate::registry::lookup;

/// How one of K or V is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Store {
    F32,
    F16,
    /// A vector codec of the registry, one code per head vector.
    Codec(String),
    /// KIVI at `bits` (keys per channel over 32 tokens, values per token over 32 channels).
    Kivi(u32),
}

impl Store {
    /// Bytes per head vector of `head_dim` values (amortized for KIVI).
    pub fn bytes_per_vector(&self, head_dim: usize) -> Result<f64> {
        Ok(match self {
            Store::F32 => 4.0 * head_dim as f64,
            Store::F16 => 2.0 * head_dim as f64,
            Store::Codec(name) => {
                let e = lookup(name)?;
                if !dim_ok(e, head_dim) {
                    return Err(TqError::BadDim(head_dim, e.min_dim()));
                }
                kv_code_size(crate::build(name, head_dim, 0, crate::RotationKind::Hadamard)?.as_ref()) as f64
            }
            Store::Kivi(bits) => {
                let g = crate::baselines::kivi::DEFAULT_GROUP as f64;
                head_dim as f64 * (*bits as f64 + 32.0 / g) / 8.0
            }
        })
    }
}

/// Bytes of the scale a KV cache stores with each codebook code (a bf16).
pub const KV_SCALE_BYTES: usize = 2;

/// Bytes a KV cache stores per vector coded by `codec`: codebook codecs
/// (TurboQuant MSE, whose codes are a scale times centroids; see
/// `Codec::codebook_view`) keep their packed indices and the scale as a bf16
/// (relative error ≤ 2^-9, far below the quantization error; 16 bits per
/// vector saved, 0.25 bits per value at head_dim 64); other codecs keep their
/// whole code.
pub fn kv_code_size(codec: &dyn crate::Codec) -> usize {
    match codec.codebook_view() {
        Some(v) => v.packed + KV_SCALE_BYTES,
        None => codec.code_size(),
    }
}

fn dim_ok(e: &crate::registry::CodecEntry, d: usize) -> bool {
    d >= e.min_dim()
}

/// A parsed KV precision.
#[derive(Clone, Debug, PartialEq)]
pub struct KvSpec {
    pub name: String,
    pub keys: Store,
    pub values: Store,
}

/// Every precision string family, for error messages and listings.
pub const PRECISIONS: &str = "f32, f16, q8_0, q4_0, q8_0-rot, q4_0-rot, kivi-B, mxfp4, nvfp4, tq-mse-B, tq-mse-B-nc, tq-prod-B, \
                              tq-mse-2.5, tq-mse-3.5, kBvC and kBvC-nc (B, C = 1..8: tq-mse keys at B bits, values at C; -nc: without the norm correction)";

impl KvSpec {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || TqError::BadParams(format!("unknown KV precision '{s}' (valid: {PRECISIONS})"));
        let both = |st: Store| Ok(KvSpec { name: s.to_string(), keys: st.clone(), values: st });
        match s {
            "f32" => return both(Store::F32),
            "f16" => return both(Store::F16),
            _ => {}
        }
        if let Some(b) = s.strip_prefix("kivi-") {
            let bits: u32 = b.parse().map_err(|_| bad())?;
            if !(1..=8).contains(&bits) {
                return Err(TqError::UnsupportedBits(bits));
            }
            return both(Store::Kivi(bits));
        }
        // kBvC
        if let Some(rest) = s.strip_prefix('k') {
            let (rest, nc) = match rest.strip_suffix("-nc") {
                Some(r) => (r, "-nc"),
                None => (rest, ""),
            };
            if let Some((kb, vb)) = rest.split_once('v') {
                if let (Ok(kb), Ok(vb)) = (kb.parse::<u32>(), vb.parse::<u32>()) {
                    for b in [kb, vb] {
                        if !(1..=8).contains(&b) {
                            return Err(TqError::UnsupportedBits(b));
                        }
                    }
                    return Ok(KvSpec {
                        name: s.to_string(),
                        keys: Store::Codec(format!("tq-mse-{kb}{nc}")),
                        values: Store::Codec(format!("tq-mse-{vb}{nc}")),
                    });
                }
            }
        }
        // a registry codec usable as a KV precision (`Caps::kv`)
        match lookup(s) {
            Ok(e) if e.caps.kv.is_some() => both(Store::Codec(s.to_string())),
            Ok(_) => Err(bad()),
            Err(TqError::UnsupportedBits(b)) => Err(TqError::UnsupportedBits(b)),
            Err(_) => Err(bad()),
        }
    }

    /// Cache bytes per token for one layer with `kv_heads` heads of `head_dim`.
    pub fn bytes_per_token_per_layer(&self, kv_heads: usize, head_dim: usize) -> Result<f64> {
        Ok(kv_heads as f64 * (self.keys.bytes_per_vector(head_dim)? + self.values.bytes_per_vector(head_dim)?))
    }

    /// Bits per cached value (K and V averaged), every overhead included.
    pub fn bits_per_value(&self, head_dim: usize) -> Result<f64> {
        Ok(8.0 * (self.keys.bytes_per_vector(head_dim)? + self.values.bytes_per_vector(head_dim)?) / (2 * head_dim) as f64)
    }
}

/// A model geometry for memory planning.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelGeometry {
    pub name: &'static str,
    /// Parameters, in billions.
    pub params_b: f64,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_context: usize,
}

/// Built-in geometries (from the models' published configurations).
pub const MODELS: &[ModelGeometry] = &[
    ModelGeometry { name: "llama-3.1-8b", params_b: 8.03, layers: 32, kv_heads: 8, head_dim: 128, max_context: 131_072 },
    ModelGeometry { name: "llama-3.1-70b", params_b: 70.6, layers: 80, kv_heads: 8, head_dim: 128, max_context: 131_072 },
    ModelGeometry { name: "qwen2.5-32b", params_b: 32.8, layers: 64, kv_heads: 8, head_dim: 128, max_context: 131_072 },
    ModelGeometry { name: "glm-4-9b-chat", params_b: 9.4, layers: 40, kv_heads: 2, head_dim: 128, max_context: 131_072 },
    ModelGeometry { name: "mixtral-8x22b", params_b: 141.0, layers: 56, kv_heads: 8, head_dim: 128, max_context: 65_536 },
    ModelGeometry { name: "smollm2-135m", params_b: 0.135, layers: 30, kv_heads: 3, head_dim: 64, max_context: 8_192 },
];

pub fn model(name: &str) -> Result<&'static ModelGeometry> {
    MODELS.iter().find(|m| m.name == name).ok_or_else(|| {
        TqError::BadParams(format!("unknown model '{name}' (known: {})", MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")))
    })
}

/// Weight storage per parameter.
pub fn weight_bytes_per_param(weights: &str) -> Result<f64> {
    match weights {
        "bf16" | "f16" => Ok(2.0),
        "int8" => Ok(1.0),
        "int4" => Ok(0.5),
        _ => Err(TqError::BadParams(format!("unknown weight precision '{weights}' (valid: bf16, int8, int4)"))),
    }
}

/// A memory plan: bytes of weights and KV cache, and 24 GB cards needed.
#[derive(Clone, Debug, PartialEq)]
pub struct VramPlan {
    pub model: &'static str,
    pub kv: String,
    pub context: usize,
    pub kv_bits_per_value: f64,
    pub weights_gb: f64,
    pub kv_gb: f64,
    pub total_gb: f64,
    pub cards_24gb: usize,
}

/// Bytes are reported in GB (10^9), cards are 24 GB each.
pub fn vram(model_name: &str, weights: &str, context: usize, kv: &str) -> Result<VramPlan> {
    let m = model(model_name)?;
    if context == 0 {
        return Err(TqError::BadParams("context must be positive".into()));
    }
    let spec = KvSpec::parse(kv)?;
    let weights_gb = m.params_b * weight_bytes_per_param(weights)?;
    let kv_gb = spec.bytes_per_token_per_layer(m.kv_heads, m.head_dim)? * m.layers as f64 * context as f64 / 1e9;
    let total_gb = weights_gb + kv_gb;
    Ok(VramPlan {
        model: m.name,
        kv: spec.name.clone(),
        context,
        kv_bits_per_value: spec.bits_per_value(m.head_dim)?,
        weights_gb,
        kv_gb,
        total_gb,
        cards_24gb: (total_gb / 24.0).ceil() as usize,
    })
}
