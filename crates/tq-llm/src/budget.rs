//! Budget plans on a model: `--kv 3.5` becomes a per-layer [`tq_kv::KvPlan`]
//! fitted on a text that is not evaluated, saved next to the model's cache
//! entry and reused.
//!
//! How a plan is fitted ([`fit`]):
//!
//! 1. Key transforms are calibrated on the fit text (chunks of the planned
//!    context, about 8K tokens, as `--calib-text` does).
//! 2. Sensitivity: for every layer l and side (K or V), the KL divergence of
//!    the model's next-token distribution (second half of one chunk of the
//!    fit text, against the f32 cache) when only that side of that layer is
//!    stored as `tq-mse-3-nc` codes (calibrated keys, token 0 in f32; the other
//!    side f16, every other layer f32). That is the quantity evaluated, so no
//!    proxy has to be trusted; it costs 2 × layers forward passes of one chunk.
//! 3. Distortion model: a side's KLD at b bits is its probe KLD scaled by the
//!    exact Lloyd–Max MSE of b-bit codes over that of 3-bit codes
//!    ([`tq_core::codebook::LloydMax`]): KLD is quadratic in small logit
//!    errors and the logit error linear in the cache error, so it is
//!    proportional to the codes' MSE; layers add (each one's KLD was measured
//!    alone).
//! 4. Windows by rule: token 0 in f32 (the attention sink) and a delayed
//!    q8_0 window of recent tokens that takes [`WINDOW_SHARE`] of the budget's
//!    bytes, as the hand-tuned recipes do (22 tokens at 4.5 bits, 18 at 3.5 at
//!    ctx 512); the window is not optimized per layer.
//! 5. The bits: [`tq_kv::budget::allocate`] over `tq-mse-B-nc`, B = 1..8,
//!    per layer and side, under the budget's bytes at the planned context
//!    minus the windows'. Every byte the cache holds at that context is
//!    counted ([`tq_kv::KvPlan::bytes_at`], equal to the cache's bytes: tested);
//!    the calibration is static per model (like weights) and is not.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{bail, Context, Result};
use crate::eval::{Log, Runtime};
use tq_kv::budget::{allocate, Choice};
use tq_kv::{F32Cache, KeyCalibration, KvCache, KvPlan, KvSpec, LayerChoice, ResolvedPlan, Store};

/// Default fit text: Shakespeare from this character on (evaluations read
/// the first 200,000 characters of Austen or Shakespeare, so the fit never
/// sees an evaluated token).
pub const FIT_TEXT: &str = "shakespeare";
/// Characters of the fit text skipped before the fit slice.
pub const FIT_SKIP: usize = 1_000_000;
/// Bits of the probe codes of the sensitivity runs.
pub const PROBE_BITS: u32 = 3;
/// Share of the budget's bytes the delayed q8_0 recent window takes.
pub const WINDOW_SHARE: f64 = 0.08;
/// Rotation seed of the sensitivity runs (a plan does not depend on the evaluation's seed).
pub const FIT_SEED: u64 = 0;

/// What a plan is fitted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fit {
    /// A text name (austen, shakespeare) or file.
    pub text: String,
    /// Characters skipped from its start.
    pub skip_chars: usize,
}

impl Default for Fit {
    fn default() -> Self {
        Fit { text: FIT_TEXT.into(), skip_chars: FIT_SKIP }
    }
}

impl Fit {
    /// A short key for file names and reports (`shakespeare@1000000`).
    pub fn key(&self) -> String {
        let base = std::path::Path::new(&self.text).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| self.text.clone());
        format!("{}@{}", sanitize(&base), self.skip_chars)
    }
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Recent-window tokens of a plan at `bits` and `ctx` ([`WINDOW_SHARE`] of the bytes at 8.5 bits per value).
pub fn window_tokens(bits: f64, ctx: usize) -> usize {
    ((WINDOW_SHARE * bits * ctx as f64 / 8.5).round() as usize).min(ctx / 4)
}

/// Tokens of the fit slice (enough for the calibration and the sensitivity chunk).
fn fit_ids(rt: &Runtime, fit: &Fit, ctx: usize, quiet: bool) -> Result<Vec<u32>> {
    let body = tq_data::datasets::text(&fit.text, quiet)?;
    let want = (calib_chunks(ctx) + 1) * ctx;
    // about 4 characters per token; take generously and check
    let slice: String = body.chars().skip(fit.skip_chars).take(want * 8 + 10_000).collect();
    if slice.trim().is_empty() {
        bail!("the fit text {} has nothing after character {}", fit.text, fit.skip_chars);
    }
    let ids = rt.encode(&slice)?;
    if ids.len() < want {
        bail!("the fit text {} after character {} has {} tokens, fewer than the {want} a plan at ctx {ctx} needs", fit.text, fit.skip_chars, ids.len());
    }
    Ok(ids)
}

fn calib_chunks(ctx: usize) -> usize {
    (8192 / ctx).max(1)
}

fn log_probs(row: &[f32]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// The sensitivity table: per layer, the KLD with only its keys, then only its
/// values, at [`PROBE_BITS`] (see the module docs), on `chunk`.
pub fn sensitivities(rt: &Runtime, chunk: &[u32], cal: &Arc<KeyCalibration>, log: Log<'_>) -> Result<Vec<[f64; 2]>> {
    let model = &rt.model;
    let shape = model.config.kv_shape();
    let vocab = model.config.vocab;
    let n = chunk.len();
    let mut f = F32Cache::new(shape);
    let ref_logits = model.forward(chunk, &mut f as &mut dyn KvCache, false)?;
    let ref_lp: Vec<Vec<f64>> = (n / 2..n - 1).map(|j| log_probs(&ref_logits[j * vocab..(j + 1) * vocab])).collect();
    drop(ref_logits);
    let probe = Store::Codec(tq_core::registry::lookup(&format!("tq-mse-{PROBE_BITS}-nc"))?);
    let t = Instant::now();
    let mut out = Vec::with_capacity(shape.layers);
    for l in 0..shape.layers {
        let mut row = [0.0; 2];
        for (side, r) in row.iter_mut().enumerate() {
            let mut layers = vec![LayerChoice::exact(); shape.layers];
            let (keys, values) = if side == 0 { (probe, Store::F16) } else { (Store::F16, probe) };
            layers[l] = LayerChoice { keys, values, sink: 1, recent: 0, recent_q8: false, delayed: false, calibrated: true };
            let plan = KvPlan {
                shape,
                ctx: n,
                budget_bits: 32.0,
                source: String::new(),
                seed: FIT_SEED,
                probe_bits: PROBE_BITS,
                layers,
                sensitivity: vec![[0.0; 2]; shape.layers],
            };
            let rp = ResolvedPlan { plan, calibration: Some(cal.clone()) };
            let mut cache = tq_kv::LayeredCache::new(shape, &rp, FIT_SEED)?;
            let logits = model.forward(chunk, &mut cache as &mut dyn KvCache, false)?;
            let mut kld = 0.0;
            for (j, lr) in (n / 2..n - 1).zip(&ref_lp) {
                let lp = log_probs(&logits[j * vocab..(j + 1) * vocab]);
                kld += lr.iter().zip(&lp).map(|(&p, &q)| p.exp() * (p - q)).sum::<f64>();
            }
            *r = kld / ref_lp.len() as f64;
        }
        log(&format!("layer {l:2}: KLD with {PROBE_BITS}-bit keys {:.5}, values {:.5} [{:.0} s]", row[0], row[1], t.elapsed().as_secs_f64()));
        out.push(row);
    }
    Ok(out)
}

/// The plan for `bits` at `ctx` from a sensitivity table (steps 3–5 of the module docs).
pub fn plan_from(shape: tq_core::KvGeometry, bits: f64, ctx: usize, sens: &[[f64; 2]], source: &str) -> Result<KvPlan> {
    let d = shape.head_dim;
    if sens.len() != shape.layers {
        bail!("sensitivity table has {} layers, the model {}", sens.len(), shape.layers);
    }
    if sens.iter().flatten().any(|x| !x.is_finite()) {
        bail!("sensitivity table has non-finite values");
    }
    let cap = bits * (ctx * shape.layers * shape.kv_heads * 2 * d) as f64 / 8.0;
    let probe_mse = tq_core::codebook::LloydMax::get(d, PROBE_BITS)?.mse_distortion;
    let cands: Vec<(u32, Store, f64)> = (1..=8u32)
        .map(|b| -> Result<(u32, Store, f64)> {
            let s = Store::Codec(tq_core::registry::lookup(&format!("tq-mse-{b}-nc"))?);
            Ok((b, s, tq_core::codebook::LloydMax::get(d, b)?.mse_distortion / probe_mse))
        })
        .collect::<Result<_>>()?;
    let mut last_err = None;
    // the windows of the rule, then smaller ones when the budget cannot hold them
    let w = window_tokens(bits, ctx);
    for (sink, recent) in [(1usize, w), (1, 0), (0, 0)] {
        let base = LayerChoice { keys: cands[0].1, values: cands[0].1, sink, recent, recent_q8: recent > 0, delayed: recent > 0, calibrated: true };
        // bytes of the windows alone, and coded tokens per side (delayed: the window holds no codes)
        let empty = LayerChoice { keys: Store::F16, values: Store::F16, ..base.clone() };
        let f16_codes = if recent > 0 { ctx.saturating_sub(recent) } else { ctx } * 2 * 2 * d * shape.kv_heads;
        let fixed = shape.layers as f64 * (empty.bytes_at(ctx, shape.kv_heads, d)? - f16_codes) as f64;
        let coded = (if recent > 0 { ctx.saturating_sub(recent) } else { ctx } * shape.kv_heads) as f64;
        let items: Vec<Vec<Choice>> = sens
            .iter()
            .flat_map(|s| s.iter())
            .map(|&s| cands.iter().map(|(_, st, r)| Ok(Choice { cost: coded * st.bytes_per_vector(d)?, dist: s * r })).collect::<tq_core::Result<Vec<_>>>())
            .collect::<tq_core::Result<_>>()?;
        match allocate(&items, cap - fixed) {
            Ok(pick) => {
                let layers: Vec<LayerChoice> =
                    pick.chunks_exact(2).map(|p| LayerChoice { keys: cands[p[0]].1, values: cands[p[1]].1, ..base.clone() }).collect();
                let plan = KvPlan {
                    shape,
                    ctx,
                    budget_bits: bits,
                    source: source.to_string(),
                    seed: FIT_SEED,
                    probe_bits: PROBE_BITS,
                    layers,
                    sensitivity: sens.to_vec(),
                };
                let used = plan.bytes_at(ctx)?;
                if used as f64 > cap {
                    bail!("internal: the plan holds {used} bytes over the budget of {cap:.0}");
                }
                return Ok(plan);
            }
            Err(e) => last_err = Some(e),
        }
    }
    let cheapest = 8.0 * cands[0].1.bytes_per_vector(d)? / d as f64;
    bail!(
        "a budget of {bits} bits per value at ctx {ctx} is below the cheapest plan ({cheapest:.3} bits: 1-bit codes everywhere, no windows): {}",
        last_err.map(|e| e.to_string()).unwrap_or_default()
    )
}

/// Where the plan of (model, budget, ctx, fit) lives: next to the model in the data cache.
pub fn plan_path(rt: &Runtime, bits: f64, ctx: usize, fit: &Fit) -> PathBuf {
    tq_data::datasets::cache_dir().join(format!("{}.kvplan-{bits}-ctx{ctx}-{}.tqp", sanitize(rt.name()), fit.key()))
}

fn calib_path(rt: &Runtime, ctx: usize, fit: &Fit) -> PathBuf {
    tq_data::datasets::cache_dir().join(format!("{}.kvcal-ctx{ctx}-{}.tqc", sanitize(rt.name()), fit.key()))
}

/// Reads a plan file (a clear error naming the file when it is bad).
pub fn load_plan(path: &std::path::Path) -> Result<KvPlan> {
    let b = std::fs::read(path).with_context(|| format!("cannot read KV plan {}", path.display()))?;
    KvPlan::from_bytes(&b).with_context(|| format!("in {}", path.display()))
}

fn save(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    tq_io::write_atomic(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// The calibration of a fit (from the cache, else computed and saved).
fn calibration(rt: &Runtime, ids: &[u32], ctx: usize, fit: &Fit, log: Log<'_>) -> Result<Arc<KeyCalibration>> {
    let shape = rt.model.config.kv_shape();
    let path = calib_path(rt, ctx, fit);
    if path.is_file() {
        let c = crate::eval::load_calibration(&path)?;
        c.check_shape(shape)?;
        return Ok(Arc::new(c));
    }
    let c = crate::eval::calibrate_ids(rt, ids, calib_chunks(ctx), ctx, crate::eval::CALIB_SHRINK, &fit.key(), log)?;
    save(&path, &c.to_bytes())?;
    log(&format!("key calibration saved to {}", path.display()));
    Ok(Arc::new(c))
}

/// The plan of `bits` at `ctx` for the model: read from its file when there
/// is one, else fitted (module docs) and saved; the sensitivities of another
/// budget's plan at the same (model, ctx, fit) are reused.
pub fn fit(rt: &Runtime, bits: f64, ctx: usize, fit: &Fit, quiet: bool, log: Log<'_>) -> Result<ResolvedPlan> {
    let shape = rt.model.config.kv_shape();
    if ctx < 4 || ctx > rt.model.config.context {
        bail!("a plan's ctx {ctx} is outside 4..={} (the model's context)", rt.model.config.context);
    }
    let path = plan_path(rt, bits, ctx, fit);
    let ids = fit_ids(rt, fit, ctx, quiet)?;
    let cal = calibration(rt, &ids, ctx, fit, log)?;
    if path.is_file() {
        let plan = load_plan(&path)?;
        plan.check_shape(shape).with_context(|| format!("in {}", path.display()))?;
        return Ok(ResolvedPlan { plan, calibration: Some(cal) });
    }
    // another budget's plan at this (model, ctx, fit) carries the same sensitivities
    let suffix = format!("-ctx{ctx}-{}.tqp", fit.key());
    let prefix = format!("{}.kvplan-", sanitize(rt.name()));
    let mut sens = None;
    if let Ok(dir) = std::fs::read_dir(tq_data::datasets::cache_dir()) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(&suffix) {
                if let Ok(p) = load_plan(&e.path()) {
                    if p.probe_bits == PROBE_BITS && p.check_shape(shape).is_ok() {
                        sens = Some(p.sensitivity);
                        break;
                    }
                }
            }
        }
    }
    let sens = match sens {
        Some(s) => s,
        None => {
            log(&format!("measuring per-layer sensitivities on {ctx} tokens of {} ({} forward passes)", fit.key(), 2 * shape.layers + 1));
            let chunk = &ids[calib_chunks(ctx) * ctx..(calib_chunks(ctx) + 1) * ctx];
            sensitivities(rt, chunk, &cal, log)?
        }
    };
    let plan = plan_from(shape, bits, ctx, &sens, &format!("{} on {}", rt.name(), fit.key()))?;
    save(&path, &plan.to_bytes())?;
    log(&format!("KV plan saved to {}", path.display()));
    Ok(ResolvedPlan { plan, calibration: Some(cal) })
}

/// `spec` with its plan when it is a budget (planned at its own `ctx=` or
/// at `ctx`); any other precision unchanged.
pub fn resolve(rt: &Runtime, spec: &KvSpec, ctx: usize, fit_on: &Fit, quiet: bool, log: Log<'_>) -> Result<KvSpec> {
    match (&spec.budget, &spec.plan) {
        (Some(b), None) => Ok(spec.with_plan(Arc::new(fit(rt, b.bits, b.ctx_or(ctx), fit_on, quiet, log)?))),
        _ => Ok(spec.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The allocator spends the bytes where the measured sensitivity is, and
    /// the plan holds at most the budget at its context (every byte counted).
    #[test]
    fn plans_follow_sensitivity_and_hold_the_budget() {
        let shape = tq_core::KvGeometry { layers: 4, q_heads: 9, kv_heads: 3, head_dim: 64 };
        let sens = vec![[0.1, 0.01], [0.001, 0.001], [0.05, 0.02], [0.001, 0.0001]];
        for (bits, ctx) in [(2.5, 512), (3.5, 512), (4.5, 4096)] {
            let p = plan_from(shape, bits, ctx, &sens, "t").unwrap();
            assert!(p.bits_at(ctx).unwrap() <= bits, "{bits}: {}", p.bits_at(ctx).unwrap());
            assert!(p.bits_at(ctx).unwrap() > bits - 0.3, "{bits}: {} leaves bytes unused", p.bits_at(ctx).unwrap());
            let b = |s: &Store| match s {
                Store::Codec(e) => e.nominal_bits(),
                _ => 0.0,
            };
            assert!(b(&p.layers[0].keys) > b(&p.layers[1].keys), "the sensitive layer gets more bits");
            assert!(b(&p.layers[0].keys) >= b(&p.layers[0].values));
            assert_eq!(p.layers[0].recent, window_tokens(bits, ctx));
        }
        let e = plan_from(shape, 1.0, 512, &sens, "t").unwrap_err().to_string();
        assert!(e.contains("below the cheapest plan"), "{e}");
        assert!(plan_from(shape, 3.0, 512, &sens[..2], "t").is_err());
    }
}
