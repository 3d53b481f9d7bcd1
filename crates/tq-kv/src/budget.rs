//! Budget precisions: `--kv 3.5` means "at most 3.5 bits per cached value at
//! the planned context, every byte counted", and a per-layer plan ([`KvPlan`])
//! chooses, for keys and values separately, the codec and its bits, plus the
//! windows and key transforms of each layer.
//!
//! - [`Budget`]: the parsed budget (`3.5`, `budget:3.5`, `budget:3.5:ctx=4096`).
//! - [`KvPlan`]: one [`LayerChoice`] per layer, its exact bytes at a context
//!   ([`KvPlan::bytes_at`], equal to what the cache holds: tested), a small
//!   versioned and checksummed file image.
//! - [`allocate`]: the allocator, a greedy walk along each item's lower convex
//!   hull of (bytes, distortion) under a byte cap (the Lagrangian solution
//!   of the multiple-choice knapsack, then a fill of the leftover bytes).
//! - [`LayeredCache`]: a cache that holds one cache per layer, each built from
//!   its layer's choice, so attention is exactly that of what each layer stores.
//!
//! Measuring the sensitivities a plan is allocated from needs a model; that
//! part lives in `tq_llm::budget`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tq_core::registry::lookup;
use tq_core::{KvGeometry, Result, TqError};

use crate::calib::KeyCalibration;
use crate::spec::Store;
use crate::{CacheOptions, KvCache};

/// The smallest and largest budgets accepted (bits per value).
pub const BUDGET_BITS: (f64, f64) = (1.0, 32.0);

/// The longest context a budget may be planned for (tokens).
pub const MAX_PLAN_CTX: usize = 1 << 20;

/// A bit budget, parsed from `B`, `budget:B` or `budget:B:ctx=N`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Bits per cached value (K and V averaged), every byte counted.
    pub bits: f64,
    /// The context the plan is made for (`None`: the command's context).
    pub ctx: Option<usize>,
}

impl Budget {
    /// The context of the plan: the stated one, else `default`.
    pub fn ctx_or(&self, default: usize) -> usize {
        self.ctx.unwrap_or(default)
    }
}

impl FromStr for Budget {
    type Err = TqError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |m: &str| TqError::BadParams(format!("bad KV budget '{s}': {m} (write B, budget:B or budget:B:ctx=N, e.g. 3.5 or budget:3.5:ctx=4096)"));
        let body = s.strip_prefix("budget:").unwrap_or(s);
        let mut parts = body.split(':');
        let bits: f64 = parts.next().unwrap_or("").trim().parse().map_err(|_| bad("the bits are not a number"))?;
        if !bits.is_finite() || bits < BUDGET_BITS.0 || bits > BUDGET_BITS.1 {
            return Err(bad(&format!("{bits} bits per value is outside {}..={}", BUDGET_BITS.0, BUDGET_BITS.1)));
        }
        let mut ctx = None;
        for p in parts {
            let Some(n) = p.strip_prefix("ctx=") else { return Err(bad(&format!("unknown part '{p}'"))) };
            let n: usize = n.parse().map_err(|_| bad("ctx is not a whole number"))?;
            if n == 0 || n > MAX_PLAN_CTX {
                return Err(bad(&format!("ctx {n} is outside 1..={MAX_PLAN_CTX}")));
            }
            if ctx.replace(n).is_some() {
                return Err(bad("ctx given twice"));
            }
        }
        Ok(Budget { bits, ctx })
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ctx {
            Some(c) => write!(f, "budget:{}:ctx={c}", self.bits),
            None => write!(f, "{}", self.bits),
        }
    }
}

/// How one layer stores its keys and values.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerChoice {
    /// Keys (f32 only together with f32 values: the layer is then exact).
    pub keys: Store,
    /// Values.
    pub values: Store,
    /// First tokens also kept in f32.
    pub sink: usize,
    /// Most recent tokens also kept (f32, or q8_0 with `recent_q8`).
    pub recent: usize,
    /// The recent window as q8_0 codes.
    pub recent_q8: bool,
    /// Recent tokens get their codes only when they leave the window.
    pub delayed: bool,
    /// Keys through the calibrated transforms of the plan's calibration.
    pub calibrated: bool,
}

impl LayerChoice {
    /// An exact (f32) layer.
    pub fn exact() -> Self {
        LayerChoice { keys: Store::F32, values: Store::F32, sink: 0, recent: 0, recent_q8: false, delayed: false, calibrated: false }
    }
    /// Whether the layer is stored in f32.
    pub fn is_exact(&self) -> bool {
        self.keys == Store::F32 && self.values == Store::F32
    }
    /// Bytes this layer holds after `n` tokens with `kv_heads` heads of
    /// `head_dim` (the accounting of [`crate::CodecCache`]: codes of every
    /// coded token, the f32 sink, the recent window; a calibration's offsets
    /// and transforms are static per model and not counted).
    pub fn bytes_at(&self, n: usize, kv_heads: usize, head_dim: usize) -> Result<usize> {
        let d = head_dim;
        if self.is_exact() {
            return Ok(kv_heads * n * 2 * 4 * d);
        }
        let code = (self.keys.bytes_per_vector(d)? + self.values.bytes_per_vector(d)?) as usize;
        let sinks = n.min(self.sink);
        let coded = if self.delayed { sinks + n.saturating_sub(self.sink + self.recent) } else { n };
        let recents = n.saturating_sub(self.sink).min(self.recent);
        let recent_bytes = if self.recent_q8 { tq_core::build("q8_0", d, 0, tq_core::RotationKind::Hadamard)?.code_size() } else { 4 * d };
        Ok(kv_heads * (coded * code + sinks * 2 * 4 * d + recents * 2 * recent_bytes))
    }
    /// The cache options of this layer (`calibration` already cut to the layer).
    fn options(&self, calibration: Option<Arc<KeyCalibration>>) -> CacheOptions {
        CacheOptions {
            sink: self.sink,
            recent: self.recent,
            center_keys: false,
            recent_q8: self.recent_q8,
            delayed: self.delayed,
            calibration: if self.calibrated { calibration } else { None },
        }
    }
}

/// The name of a store in plan files and tables.
pub fn store_name(s: &Store) -> String {
    match s {
        Store::F32 => "f32".into(),
        Store::F16 => "f16".into(),
        Store::Codec(e) => e.name.to_string(),
        Store::Kivi(b) => format!("kivi-{b}"),
    }
}

/// A store from its name (f32, f16, or a KV-capable registry codec).
pub fn store_from_name(s: &str) -> Result<Store> {
    match s {
        "f32" => Ok(Store::F32),
        "f16" => Ok(Store::F16),
        _ => match lookup(s) {
            Ok(e) if e.caps.kv.is_some() => Ok(Store::Codec(e)),
            _ => Err(TqError::BadParams(format!("'{s}' is not a per-vector KV store (f32, f16 or a KV codec of the registry)"))),
        },
    }
}

/// A per-layer KV plan for one model at one context and budget.
#[derive(Clone, Debug, PartialEq)]
pub struct KvPlan {
    /// The model's KV geometry.
    pub shape: KvGeometry,
    /// The context the budget holds at.
    pub ctx: usize,
    /// The budget, bits per value.
    pub budget_bits: f64,
    /// What the plan was fitted on (model, text, slice), for reports.
    pub source: String,
    /// Rotation seed of the sensitivity runs.
    pub seed: u64,
    /// Bits of the probe codec the sensitivities were measured with.
    pub probe_bits: u32,
    /// One choice per layer.
    pub layers: Vec<LayerChoice>,
    /// Per layer: the measured KLD with only its keys / only its values at the probe bits.
    pub sensitivity: Vec<[f64; 2]>,
}

const MAGIC: &[u8; 8] = b"TQKVPLN\0";
const VERSION: u32 = 1;

impl KvPlan {
    /// Bytes the whole cache holds after `n` tokens of one sequence.
    pub fn bytes_at(&self, n: usize) -> Result<usize> {
        self.layers.iter().map(|l| l.bytes_at(n, self.shape.kv_heads, self.shape.head_dim)).sum()
    }
    /// Bits per cached value at `n` tokens (every byte counted).
    pub fn bits_at(&self, n: usize) -> Result<f64> {
        let values = (n * self.shape.layers * self.shape.kv_heads * 2 * self.shape.head_dim) as f64;
        Ok(8.0 * self.bytes_at(n)? as f64 / values)
    }
    /// Checks that the plan is for `shape` (layers, KV heads, head_dim).
    pub fn check_shape(&self, shape: KvGeometry) -> Result<()> {
        let key = |g: KvGeometry| (g.layers, g.kv_heads, g.head_dim);
        if key(self.shape) != key(shape) {
            return Err(TqError::BadParams(format!(
                "KV plan is for {} layers × {} KV heads × head_dim {}, the model has {} × {} × {}",
                self.shape.layers, self.shape.kv_heads, self.shape.head_dim, shape.layers, shape.kv_heads, shape.head_dim
            )));
        }
        Ok(())
    }

    /// The file image: magic, version, geometry, context, budget, seed, probe
    /// bits, source, the layers (store names, windows, flags, sensitivities),
    /// then a CRC-32 of everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let put_str = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        for x in [self.shape.layers, self.shape.q_heads, self.shape.kv_heads, self.shape.head_dim, self.ctx] {
            b.extend_from_slice(&(x as u32).to_le_bytes());
        }
        b.extend_from_slice(&self.budget_bits.to_bits().to_le_bytes());
        b.extend_from_slice(&self.seed.to_le_bytes());
        b.extend_from_slice(&self.probe_bits.to_le_bytes());
        put_str(&mut b, &self.source);
        for (l, s) in self.layers.iter().zip(&self.sensitivity) {
            put_str(&mut b, &store_name(&l.keys));
            put_str(&mut b, &store_name(&l.values));
            b.extend_from_slice(&(l.sink as u32).to_le_bytes());
            b.extend_from_slice(&(l.recent as u32).to_le_bytes());
            b.push(l.recent_q8 as u8 | (l.delayed as u8) << 1 | (l.calibrated as u8) << 2);
            for x in s {
                b.extend_from_slice(&x.to_bits().to_le_bytes());
            }
        }
        let crc = tq_io::crc32(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a file image (magic, version, checksum, sizes, stores, values).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |m: String| TqError::BadParams(format!("KV plan: {m}"));
        if b.len() < MAGIC.len() + 4 || &b[..MAGIC.len()] != MAGIC {
            return Err(bad("not a KV plan file (bad magic)".into()));
        }
        let mut r = tq_io::LeReader::new(&b[MAGIC.len()..]);
        let trunc = |e: tq_io::Truncated| bad(format!("truncated in {}", e.field));
        let version = r.u32("the version").map_err(trunc)?;
        if version != VERSION {
            return Err(bad(format!("unsupported version {version} (this build reads version {VERSION})")));
        }
        if b.len() < MAGIC.len() + 8 {
            return Err(bad("truncated in the checksum".into()));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if u32::from_le_bytes(crc.try_into().expect("4 bytes")) != tq_io::crc32(body) {
            return Err(bad("checksum mismatch (corrupt or truncated file)".into()));
        }
        let mut r = tq_io::LeReader::new(&body[MAGIC.len() + 4..]);
        let mut g = [0usize; 5];
        for x in g.iter_mut() {
            *x = r.u32("the geometry").map_err(trunc)? as usize;
        }
        let [layers, q_heads, kv_heads, head_dim, ctx] = g;
        if layers == 0
            || layers > 4096
            || kv_heads == 0
            || q_heads == 0
            || kv_heads > 4096
            || head_dim == 0
            || head_dim > 4096
            || ctx == 0
            || ctx > MAX_PLAN_CTX
        {
            return Err(bad(format!("implausible geometry {layers} layers × {kv_heads} KV heads × {head_dim} at ctx {ctx}")));
        }
        let budget_bits = f64::from_bits(r.u64("the budget").map_err(trunc)?);
        if !(BUDGET_BITS.0..=BUDGET_BITS.1).contains(&budget_bits) {
            return Err(bad(format!("budget {budget_bits} is outside {}..={}", BUDGET_BITS.0, BUDGET_BITS.1)));
        }
        let seed = r.u64("the seed").map_err(trunc)?;
        let probe_bits = r.u32("the probe bits").map_err(trunc)?;
        let get_str = |r: &mut tq_io::LeReader<'_>, field: &str| -> Result<String> {
            let n = r.u32(field).map_err(trunc)? as usize;
            let s = r.take(n, field).map_err(trunc)?;
            String::from_utf8(s.to_vec()).map_err(|_| bad(format!("{field} is not UTF-8")))
        };
        let source = get_str(&mut r, "the source")?;
        let mut ls = Vec::with_capacity(layers);
        let mut sens = Vec::with_capacity(layers);
        for i in 0..layers {
            let keys = store_from_name(&get_str(&mut r, "a layer's key store")?).map_err(|e| bad(format!("layer {i}: {e}")))?;
            let values = store_from_name(&get_str(&mut r, "a layer's value store")?).map_err(|e| bad(format!("layer {i}: {e}")))?;
            let sink = r.u32("a layer's sink").map_err(trunc)? as usize;
            let recent = r.u32("a layer's window").map_err(trunc)? as usize;
            let flags = r.u8("a layer's flags").map_err(trunc)?;
            if flags > 7 || sink > tq_core::limits::MAX_WINDOW_TOKENS || recent > tq_core::limits::MAX_WINDOW_TOKENS {
                return Err(bad(format!("layer {i}: implausible windows or flags")));
            }
            let c = LayerChoice { keys, values, sink, recent, recent_q8: flags & 1 != 0, delayed: flags & 2 != 0, calibrated: flags & 4 != 0 };
            if (c.keys == Store::F32) != (c.values == Store::F32) {
                return Err(bad(format!("layer {i}: f32 on one side only (a layer is f32 on both sides or on neither)")));
            }
            ls.push(c);
            let mut s = [0.0; 2];
            for x in s.iter_mut() {
                *x = f64::from_bits(r.u64("a layer's sensitivity").map_err(trunc)?);
                if !x.is_finite() {
                    return Err(bad(format!("layer {i}: non-finite sensitivity")));
                }
            }
            sens.push(s);
        }
        if r.remaining() != 0 {
            return Err(bad(format!("{} bytes of trailing data", r.remaining())));
        }
        Ok(KvPlan { shape: KvGeometry { layers, q_heads, kv_heads, head_dim }, ctx, budget_bits, source, seed, probe_bits, layers: ls, sensitivity: sens })
    }
}

/// A plan with the key calibration its calibrated layers read (the
/// calibration is static per model, like weights).
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedPlan {
    /// The plan.
    pub plan: KvPlan,
    /// The key transforms of the plan's calibrated layers.
    pub calibration: Option<Arc<KeyCalibration>>,
}

/// One option of an item of [`allocate`]: its cost and its distortion.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    /// Bytes (any unit, the same for every item).
    pub cost: f64,
    /// Predicted distortion (additive over items).
    pub dist: f64,
}

/// Chooses one option per item minimizing the total distortion with the
/// total cost at most `cap`: every item starts at its cheapest option, then
/// the upgrade with the largest distortion drop per byte along its lower
/// convex hull is taken while it fits (the Lagrangian solution), and leftover
/// bytes go to any upgrade that still fits and lowers the distortion most.
/// An error when even the cheapest options exceed `cap`.
pub fn allocate(items: &[Vec<Choice>], cap: f64) -> Result<Vec<usize>> {
    if items.iter().any(|o| o.is_empty() || o.iter().any(|c| !c.cost.is_finite() || !c.dist.is_finite())) {
        return Err(TqError::BadParams("allocate: every item needs finite options".into()));
    }
    let cheapest = |o: &[Choice]| (0..o.len()).min_by(|&a, &b| o[a].cost.total_cmp(&o[b].cost).then(o[a].dist.total_cmp(&o[b].dist))).expect("non-empty");
    let mut pick: Vec<usize> = items.iter().map(|o| cheapest(o)).collect();
    let total = |pick: &[usize]| pick.iter().zip(items).map(|(&p, o)| o[p].cost).sum::<f64>();
    let mut used = total(&pick);
    if used > cap * (1.0 + 1e-12) {
        return Err(TqError::BadParams(format!("the cheapest options need {used:.0} bytes, over the budget of {cap:.0}")));
    }
    // hull walk: from the current pick, the next hull point is the option of
    // higher cost with the steepest distortion drop per byte
    loop {
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, o) in items.iter().enumerate() {
            let cur = o[pick[i]];
            for (j, c) in o.iter().enumerate() {
                let dc = c.cost - cur.cost;
                if dc <= 0.0 || c.dist >= cur.dist || used + dc > cap * (1.0 + 1e-12) {
                    continue;
                }
                let slope = (cur.dist - c.dist) / dc;
                if best.is_none_or(|b| slope > b.0) {
                    best = Some((slope, i, j));
                }
            }
        }
        let Some((_, i, j)) = best else { break };
        used += items[i][j].cost - items[i][pick[i]].cost;
        pick[i] = j;
    }
    Ok(pick)
}

/// A cache holding one cache per layer, each built from its [`LayerChoice`]
/// (an f32 layer is an [`crate::F32Cache`], the others [`crate::CodecCache`]s
/// with the layer's windows and, for calibrated layers, the layer's part of
/// the calibration). Every layer's codecs take the same seed, as in one
/// [`crate::CodecCache`]: a plan that makes every layer the same choice is
/// that cache (tested bit for bit).
pub struct LayeredCache {
    layers: Vec<Box<dyn KvCache>>,
}

impl LayeredCache {
    /// The cache of `plan` for `shape` (checked against the plan).
    pub fn new(shape: KvGeometry, plan: &ResolvedPlan, seed: u64) -> Result<Self> {
        plan.plan.check_shape(shape)?;
        let one = KvGeometry { layers: 1, ..shape };
        let mut layers: Vec<Box<dyn KvCache>> = Vec::with_capacity(shape.layers);
        for (l, c) in plan.plan.layers.iter().enumerate() {
            if c.is_exact() {
                layers.push(Box::new(crate::F32Cache::new(one)));
                continue;
            }
            if c.keys == Store::F32 || c.values == Store::F32 {
                return Err(TqError::BadParams(format!("layer {l}: f32 on one side only (a layer is f32 on both sides or on neither)")));
            }
            let cal = match (&plan.calibration, c.calibrated) {
                (Some(k), true) => Some(Arc::new(k.layer(l)?)),
                (None, true) => return Err(TqError::BadParams(format!("layer {l} wants calibrated keys and the plan has no calibration"))),
                _ => None,
            };
            let spec = crate::KvSpec { name: format!("layer {l}"), keys: c.keys, values: c.values, budget: None, plan: None };
            layers.push(Box::new(crate::CodecCache::with_options(one, &spec, seed, &c.options(cal))?));
        }
        Ok(Self { layers })
    }
}

impl KvCache for LayeredCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        self.layers[layer].append(0, head, k, v);
    }
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        self.layers[layer].attend(0, head, q, len, out);
    }
    fn attend_group(&self, layer: usize, head: usize, qs: &[f32], group: usize, len: usize, out: &mut [f32]) {
        self.layers[layer].attend_group(0, head, qs, group, len, out);
    }
    fn prefix_stable(&self, layer: usize) -> bool {
        self.layers[layer].prefix_stable(0)
    }
    fn attend_positions(&self, layer: usize, qs: &[f32], kv_heads: usize, group: usize, d: usize, start: usize, out: &mut [f32]) {
        self.layers[layer].attend_positions(0, qs, kv_heads, group, d, start, out);
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.layers[layer].len(0, head)
    }
    fn bytes(&self) -> usize {
        self.layers.iter().map(|c| c.bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_and_absurd_ones_are_refused() {
        assert_eq!("3.5".parse::<Budget>().unwrap(), Budget { bits: 3.5, ctx: None });
        assert_eq!("budget:2.5:ctx=4096".parse::<Budget>().unwrap(), Budget { bits: 2.5, ctx: Some(4096) });
        for (s, want) in [
            ("0.5", "outside"),
            ("budget:100", "outside"),
            ("NaN", "outside"),
            ("inf", "outside"),
            ("budget:x", "not a number"),
            ("3.5:ctx=0", "ctx 0"),
            ("3.5:ctx=abc", "whole number"),
            ("3.5:win=4", "unknown part"),
            ("3.5:ctx=8:ctx=9", "twice"),
        ] {
            let e = s.parse::<Budget>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    /// Equal cost steps and convex distortions: the greedy hull walk is the
    /// exact optimum (checked against brute force).
    #[test]
    fn allocation_matches_brute_force_on_convex_items() {
        let mut s = 11u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        for _ in 0..20 {
            let items: Vec<Vec<Choice>> = (0..4)
                .map(|_| {
                    let (a, r) = (0.1 + rnd(), 0.2 + 0.5 * rnd());
                    (0..4).map(|b| Choice { cost: b as f64 + 1.0, dist: a * r.powi(b) }).collect()
                })
                .collect();
            let cap = 4.0 + (rnd() * 12.0).floor();
            let pick = allocate(&items, cap).unwrap();
            let cost: f64 = pick.iter().zip(&items).map(|(&p, o)| o[p].cost).sum();
            assert!(cost <= cap);
            let dist: f64 = pick.iter().zip(&items).map(|(&p, o)| o[p].dist).sum();
            let mut best = f64::INFINITY;
            for code in 0..256usize {
                let p: Vec<usize> = (0..4).map(|i| (code >> (2 * i)) & 3).collect();
                let c: f64 = p.iter().zip(&items).map(|(&p, o)| o[p].cost).sum();
                if c <= cap {
                    best = best.min(p.iter().zip(&items).map(|(&p, o)| o[p].dist).sum());
                }
            }
            assert!((dist - best).abs() < 1e-12, "greedy {dist} vs optimum {best}");
        }
        let e = allocate(&[vec![Choice { cost: 5.0, dist: 1.0 }]], 4.0).unwrap_err().to_string();
        assert!(e.contains("over the budget"), "{e}");
    }

    #[test]
    fn plan_files_round_trip_and_bad_files_are_named() {
        let codec = |n: &str| Store::Codec(lookup(n).unwrap());
        let shape = KvGeometry { layers: 2, q_heads: 9, kv_heads: 3, head_dim: 64 };
        let plan = KvPlan {
            shape,
            ctx: 512,
            budget_bits: 3.5,
            source: "unit".into(),
            seed: 7,
            probe_bits: 3,
            layers: vec![
                LayerChoice { keys: codec("tq-mse-4-nc"), values: codec("tq-mse-2-nc"), sink: 1, recent: 17, recent_q8: true, delayed: true, calibrated: true },
                LayerChoice::exact(),
            ],
            sensitivity: vec![[0.01, 0.002], [0.5, 0.25]],
        };
        let b = plan.to_bytes();
        assert_eq!(KvPlan::from_bytes(&b).unwrap(), plan);
        let msg = |b: &[u8]| KvPlan::from_bytes(b).unwrap_err().to_string();
        assert!(msg(&b[..3]).contains("magic"));
        assert!(msg(&b[..b.len() - 1]).contains("checksum"));
        let mut x = b.clone();
        x[30] ^= 1;
        assert!(msg(&x).contains("checksum"));
        let mut x = b.clone();
        x[8] = 2;
        assert!(msg(&x).contains("version"));
        // a valid checksum over a bad body: the parser still refuses it by name
        let reseal = |mut body: Vec<u8>| {
            body.truncate(body.len() - 4);
            let c = tq_io::crc32(&body);
            body.extend_from_slice(&c.to_le_bytes());
            body
        };
        let mut x = b.clone();
        let at = x.windows(11).position(|w| w == b"tq-mse-4-nc").unwrap();
        x[at..at + 11].copy_from_slice(b"tq-mse-9-nc");
        assert!(msg(&reseal(x)).contains("layer 0"));
        let mut x = b.clone();
        x.insert(x.len() - 4, 0);
        assert!(msg(&reseal(x)).contains("trailing"));
        let mut x = b[..b.len() - 20].to_vec();
        x.extend_from_slice(&[0; 4]);
        assert!(msg(&reseal(x)).contains("truncated"));
        assert!(plan.check_shape(KvGeometry { head_dim: 128, ..shape }).unwrap_err().to_string().contains("head_dim"));
    }
}
