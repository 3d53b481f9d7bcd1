//! KV-cache precisions, parsed once at the edge into [`KvSpec`] values.
//!
//! A precision names how keys and values are stored, per layer and KV head:
//! `f32`, `f16`, `q8_0`, `q4_0`, `q8_0-rot`, `q4_0-rot`, `kivi-B`, `mxfp4`,
//! `nvfp4`, `tq-mse-B`, `tq-mse-B-nc`, `tq-prod-B`, `tq-mse-2.5`, `tq-mse-3.5`,
//! and the asymmetric `kBvC` / `kBvC-nc` (TurboQuant `tq-mse` keys at B bits,
//! values at C). A [`Store::Codec`] side holds its registry entry, so nothing
//! after parsing looks a codec up by name again. Bytes per token are exact:
//! every code's norms and scales are counted (KIVI's per-group scales are
//! amortized over its group of 32 tokens). The CPU cache keeps the scale of
//! codebook codes (TurboQuant MSE) as a bf16, see [`tq_core::KvLayout`].

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::budget::{Budget, ResolvedPlan};

use tq_core::registry::{lookup, CodecEntry};
use tq_core::{KvLayout, Result, RotationKind, TqError};

/// How one of K or V is stored.
#[derive(Clone, Copy, Debug)]
pub enum Store {
    /// f32 values (the reference).
    F32,
    /// f16 values.
    F16,
    /// A vector codec of the registry, one code per head vector.
    Codec(&'static CodecEntry),
    /// KIVI at `bits` (keys per channel over 32 tokens, values per token over 32 channels).
    Kivi(u32),
}

impl PartialEq for Store {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Store::F32, Store::F32) | (Store::F16, Store::F16) => true,
            (Store::Codec(a), Store::Codec(b)) => a.id == b.id,
            (Store::Kivi(a), Store::Kivi(b)) => a == b,
            _ => false,
        }
    }
}

impl Store {
    /// Bytes per head vector of `head_dim` values (amortized for KIVI).
    pub fn bytes_per_vector(&self, head_dim: usize) -> Result<f64> {
        Ok(match self {
            Store::F32 => 4.0 * head_dim as f64,
            Store::F16 => 2.0 * head_dim as f64,
            Store::Codec(e) => {
                if head_dim < e.min_dim() {
                    return Err(TqError::BadDim(head_dim, e.min_dim()));
                }
                KvLayout::of(e.build(head_dim, 0, RotationKind::Hadamard, &[])?.as_ref()).bytes() as f64
            }
            Store::Kivi(bits) => {
                let g = tq_core::baselines::kivi::DEFAULT_GROUP as f64;
                head_dim as f64 * (*bits as f64 + 32.0 / g) / 8.0
            }
        })
    }
    /// The registry entry of a codec side.
    pub fn codec(&self) -> Option<&'static CodecEntry> {
        match self {
            Store::Codec(e) => Some(e),
            _ => None,
        }
    }
}

/// A parsed KV precision: the string it was parsed from and its two sides,
/// or a bit budget ([`Budget`]: `3.5`, `budget:3.5:ctx=4096`) whose per-layer
/// plan is found for a model later (`tq_llm::budget::resolve`) and held in `plan`.
#[derive(Clone, Debug, PartialEq)]
pub struct KvSpec {
    /// The precision string, as given.
    pub name: String,
    /// How keys are stored (for a budget: f16, a placeholder; the plan decides per layer).
    pub keys: Store,
    /// How values are stored (for a budget: f16, a placeholder).
    pub values: Store,
    /// A bit budget instead of one precision for every layer.
    pub budget: Option<Budget>,
    /// The budget's per-layer plan, once resolved for a model.
    pub plan: Option<Arc<ResolvedPlan>>,
}

/// Every precision string family, for error messages and listings.
pub const PRECISIONS: &str = "f32, f16, q8_0, q4_0, q8_0-rot, q4_0-rot, kivi-B, mxfp4, nvfp4, tq-mse-B, tq-mse-B-nc, tq-prod-B, \
                              tq-mse-2.5, tq-mse-3.5, kBvC and kBvC-nc (B, C = 1..8: tq-mse keys at B bits, values at C; -nc: without the norm correction), \
                              and a bit budget B, budget:B or budget:B:ctx=N (a per-layer plan, every byte counted)";

impl KvSpec {
    /// Parses a precision string (see the module docs).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || TqError::BadParams(format!("unknown KV precision '{s}' (valid: {PRECISIONS})"));
        let both = |st: Store| Ok(KvSpec { name: s.to_string(), keys: st, values: st, budget: None, plan: None });
        if s.starts_with("budget:") || s.parse::<f64>().is_ok() {
            let b: Budget = s.parse()?;
            return Ok(KvSpec { name: s.to_string(), keys: Store::F16, values: Store::F16, budget: Some(b), plan: None });
        }
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
                        keys: Store::Codec(lookup(&format!("tq-mse-{kb}{nc}"))?),
                        values: Store::Codec(lookup(&format!("tq-mse-{vb}{nc}"))?),
                        budget: None,
                        plan: None,
                    });
                }
            }
        }
        match lookup(s) {
            // a registry codec usable as a KV precision (`Caps::kv`: online vector codecs)
            Ok(e) if e.caps.kv.is_some() => both(Store::Codec(e)),
            Err(TqError::UnsupportedBits(b)) => Err(TqError::UnsupportedBits(b)),
            _ => Err(bad()),
        }
    }

    /// Both sides f32: the reference cache.
    pub fn is_f32(&self) -> bool {
        self.budget.is_none() && self.keys == Store::F32 && self.values == Store::F32
    }

    /// The same budget with its plan (see [`ResolvedPlan`]).
    pub fn with_plan(&self, plan: Arc<ResolvedPlan>) -> Self {
        KvSpec { plan: Some(plan), ..self.clone() }
    }

    /// Cache bytes per token for one layer with `kv_heads` heads of `head_dim`
    /// (a budget: its plan's bytes at the planned context averaged over layers,
    /// or the budget itself, an upper bound, before it is planned).
    pub fn bytes_per_token_per_layer(&self, kv_heads: usize, head_dim: usize) -> Result<f64> {
        if let Some(b) = &self.budget {
            return Ok(self.bits_per_value(head_dim).unwrap_or(b.bits) * (2 * kv_heads * head_dim) as f64 / 8.0);
        }
        Ok(kv_heads as f64 * (self.keys.bytes_per_vector(head_dim)? + self.values.bytes_per_vector(head_dim)?))
    }

    /// Bits per cached value (K and V averaged), every overhead included (a
    /// budget: its plan's bits at the planned context, or the budget before it is planned).
    pub fn bits_per_value(&self, head_dim: usize) -> Result<f64> {
        if let Some(b) = &self.budget {
            return match &self.plan {
                Some(p) => p.plan.bits_at(p.plan.ctx),
                None => Ok(b.bits),
            };
        }
        Ok(8.0 * (self.keys.bytes_per_vector(head_dim)? + self.values.bytes_per_vector(head_dim)?) / (2 * head_dim) as f64)
    }
}

impl FromStr for KvSpec {
    type Err = TqError;
    fn from_str(s: &str) -> Result<Self> {
        KvSpec::parse(s)
    }
}

impl fmt::Display for KvSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}
