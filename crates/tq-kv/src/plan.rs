//! Memory planning: weights plus KV cache of a model at a context, and the
//! 24 GB cards they need. Geometries are the models' published configurations.

use tq_core::{KvGeometry, Result, TqError};

use crate::spec::KvSpec;

/// A model for memory planning.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// Name for `--model` (or the name of a GGUF model read at run time).
    pub name: std::borrow::Cow<'static, str>,
    /// Parameters, in billions.
    pub params_b: f64,
    /// Attention geometry.
    pub geometry: KvGeometry,
    /// Longest context the model supports.
    pub max_context: usize,
}

const fn m(name: &'static str, params_b: f64, layers: usize, q_heads: usize, kv_heads: usize, head_dim: usize, max_context: usize) -> ModelInfo {
    ModelInfo { name: std::borrow::Cow::Borrowed(name), params_b, geometry: KvGeometry { layers, q_heads, kv_heads, head_dim }, max_context }
}

/// Built-in models.
pub const MODELS: &[ModelInfo] = &[
    m("llama-3.1-8b", 8.03, 32, 32, 8, 128, 131_072),
    m("llama-3.1-70b", 70.6, 80, 64, 8, 128, 131_072),
    m("qwen2.5-32b", 32.8, 64, 40, 8, 128, 131_072),
    m("glm-4-9b-chat", 9.4, 40, 32, 2, 128, 131_072),
    m("mixtral-8x22b", 141.0, 56, 48, 8, 128, 65_536),
    m("smollm2-135m", 0.135, 30, 9, 3, 64, 8_192),
    m("qwen2.5-1.5b", 1.54, 28, 12, 2, 128, 32_768),
];

/// A built-in model by name.
pub fn model(name: &str) -> Result<&'static ModelInfo> {
    MODELS
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| TqError::BadParams(format!("unknown model '{name}' (known: {})", MODELS.iter().map(|m| m.name.as_ref()).collect::<Vec<_>>().join(", "))))
}

/// Weight storage per parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// 2 bytes per parameter (bf16 or f16).
    Bf16,
    /// 1 byte per parameter.
    Int8,
    /// Half a byte per parameter.
    Int4,
}

impl Weights {
    /// Bytes per parameter.
    pub fn bytes_per_param(self) -> f64 {
        match self {
            Weights::Bf16 => 2.0,
            Weights::Int8 => 1.0,
            Weights::Int4 => 0.5,
        }
    }
}

impl std::str::FromStr for Weights {
    type Err = TqError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bf16" | "f16" => Ok(Weights::Bf16),
            "int8" => Ok(Weights::Int8),
            "int4" => Ok(Weights::Int4),
            _ => Err(TqError::BadParams(format!("unknown weight precision '{s}' (valid: bf16, int8, int4)"))),
        }
    }
}

/// A memory plan: bytes of weights and KV cache, and 24 GB cards needed.
#[derive(Clone, Debug, PartialEq)]
pub struct VramPlan {
    /// The model's name.
    pub model: String,
    /// The KV precision.
    pub kv: String,
    /// Tokens of context.
    pub context: usize,
    /// Bits per cached value, every overhead included.
    pub kv_bits_per_value: f64,
    /// Weights, GB (10^9 bytes).
    pub weights_gb: f64,
    /// KV cache, GB.
    pub kv_gb: f64,
    /// Weights plus cache, GB.
    pub total_gb: f64,
    /// 24 GB cards needed.
    pub cards_24gb: usize,
}

/// The memory plan of `model` with `weights` at `context` tokens and `kv`.
pub fn vram(model: &ModelInfo, weights: Weights, context: usize, kv: &KvSpec) -> Result<VramPlan> {
    if context == 0 {
        return Err(TqError::BadParams("context must be positive".into()));
    }
    let g = model.geometry;
    let weights_gb = model.params_b * weights.bytes_per_param();
    let kv_gb = kv.bytes_per_token_per_layer(g.kv_heads, g.head_dim)? * g.layers as f64 * context as f64 / 1e9;
    let total_gb = weights_gb + kv_gb;
    Ok(VramPlan {
        model: model.name.to_string(),
        kv: kv.name.clone(),
        context,
        kv_bits_per_value: kv.bits_per_value(g.head_dim)?,
        weights_gb,
        kv_gb,
        total_gb,
        cards_24gb: (total_gb / 24.0).ceil() as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_geometries_are_valid() {
        for m in MODELS {
            m.geometry.check().unwrap();
        }
    }
}
