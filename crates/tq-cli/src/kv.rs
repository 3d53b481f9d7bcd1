//! `tq kv ...` and `tq generate`: argument handling and printing around the
//! evaluations of `tq_llm::eval` (perplexity and KLD, decode timing, needle
//! retrieval, calibration, K/V dumps; sweeps are `tq_report::sweep`).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use tq_kv::{CacheOptions, KvSpec};
use tq_llm::eval::{self, PplConfig, Runtime};
use tq_llm::ModelSpec;

/// The model of `--model` (SmolLM2 by default), loaded on first use and then
/// shared: by `--calib-text`'s calibration and the command it serves, or by
/// the report's sweeps.
#[derive(Default)]
pub struct Model(ModelSpec, std::cell::OnceCell<Runtime>);

impl Model {
    /// The model `spec` names, not loaded yet.
    pub fn new(spec: ModelSpec) -> Self {
        Self(spec, std::cell::OnceCell::new())
    }
    /// Which model it is.
    pub fn spec(&self) -> &ModelSpec {
        &self.0
    }
    /// The runtime, loading it (fetching the GGUF when needed) on the first call.
    pub fn get(&self, quiet: bool) -> tq_llm::Result<&Runtime> {
        if let Some(rt) = self.1.get() {
            return Ok(rt);
        }
        let rt = Runtime::load(&self.0, quiet)?;
        Ok(self.1.get_or_init(|| rt))
    }
}

/// A progress line on stderr unless `quiet`.
fn logger(quiet: bool) -> impl Fn(&str) {
    move |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    }
}

/// `tq kv eval`: one precision, one JSON object on stdout.
pub fn eval(model: &Model, cfg: &PplConfig<'_>, kv: &KvSpec, json: bool) -> Result<()> {
    let text = eval::ppl_text(cfg, json)?; // a bad text fails before the model loads
    let mut rows = eval::perplexity(model.get(json)?, cfg, &text, std::slice::from_ref(kv), &|_| {}, &logger(json))?;
    let out = rows.remove(0);
    crate::print_json(&out, json)?;
    Ok(())
}

/// `tq generate`: greedy decoding with a KV cache of the given precision,
/// tokens streamed to stdout as they are produced. The prompt is wrapped in
/// the model's chat template (ChatML) unless `raw`.
pub fn generate(model: &Model, kv: &KvSpec, prompt: &str, max_tokens: usize, raw: bool, opts: &CacheOptions, seed: u64) -> Result<()> {
    if prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let rt = model.get(false)?;
    let (model, tok) = (&rt.model, &rt.tok);
    let (ids, mut stop) = if raw { (rt.encode(prompt)?, Vec::new()) } else { eval::chat_ids(tok, prompt)? };
    if let Some(eos) = tok.token_to_id("<|endoftext|>") {
        stop.push(eos);
    }
    if ids.len() + max_tokens > model.config.context {
        bail!("{} prompt tokens + {max_tokens} new ones exceed the model's context of {}", ids.len(), model.config.context);
    }
    let mut cache = tq_kv::cache_with(model.config.kv_shape(), kv, seed, opts)?;
    let t0 = Instant::now();
    let mut first: Option<Instant> = None;
    let mut printed = 0usize;
    use std::io::Write;
    let mut stdout = std::io::stdout();
    let out_ids = eval::greedy(model, cache.as_mut(), &ids, max_tokens, &stop, &mut |so_far| {
        first.get_or_insert_with(Instant::now);
        // decode the whole answer each time: byte-level tokens may split characters
        let text = rt.decode(so_far)?;
        if text.len() > printed && text.is_char_boundary(printed) {
            let io = |e: std::io::Error| tq_llm::LlmError::Msg(format!("cannot write to stdout: {e}"));
            write!(stdout, "{}", &text[printed..]).map_err(io)?;
            stdout.flush().map_err(io)?;
            printed = text.len();
        }
        Ok(())
    })?;
    let t1 = first.unwrap_or_else(Instant::now);
    let prefill = (t1 - t0).as_secs_f64();
    writeln!(stdout)?;
    let secs = t1.elapsed().as_secs_f64();
    eprintln!(
        "[{kv}: {} prompt tokens in {prefill:.2} s, {} new tokens at {:.1} tok/s, cache {} bytes]",
        ids.len(),
        out_ids.len(),
        out_ids.len() as f64 / secs.max(1e-9),
        cache.bytes()
    );
    Ok(())
}

/// `tq kv bench`: JSON lines on stdout, a summary per context on stderr.
#[allow(clippy::too_many_arguments)]
pub fn bench(model: &Model, kv: &KvSpec, ctxs: &[usize], steps: usize, fill: usize, opts: &CacheOptions, seed: u64, json: bool) -> Result<()> {
    for r in eval::bench(model.get(json)?, kv, ctxs, steps, fill, opts, seed, json, &logger(json))? {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `tq kv needle`: a JSON line per trial as it finishes, then the summary.
#[allow(clippy::too_many_arguments)]
pub fn needle(
    model: &Model,
    kv: &KvSpec,
    lengths: &[usize],
    depths: &[f64],
    format: eval::NeedleFormat,
    opts: &CacheOptions,
    seed: u64,
    json: bool,
) -> Result<()> {
    if let Some(d) = depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        bail!("depth {d} is outside 0..1"); // before the model loads
    }
    let summary = eval::needle(model.get(json)?, kv, lengths, depths, format, opts, seed, json, &mut |row| println!("{row}"), &logger(json))?;
    println!("{summary}");
    Ok(())
}

/// `tq kv dump`: the arrays as npy files plus meta.json in `out`.
pub fn dump(model: &Model, text: &str, tokens: usize, layers: &[usize], all_queries: bool, out: &Path) -> Result<()> {
    let d = eval::dump(model.get(false)?, text, tokens, layers, all_queries)?;
    d.save(out)?;
    eprintln!("dumped {} layers × {} KV heads × {tokens} tokens (d = {}) to {}", layers.len(), d.meta["kv_heads"], d.head_dim, out.display());
    Ok(())
}

/// A budget precision with its plan for the model (fitted and saved on first
/// use, see `tq_llm::budget`), planned at `ctx` unless it names its own; any
/// other precision as it is.
pub fn resolve(model: &Model, kv: &KvSpec, ctx: usize, quiet: bool) -> Result<KvSpec> {
    if kv.budget.is_none() {
        return Ok(kv.clone());
    }
    Ok(tq_llm::budget::resolve(model.get(quiet)?, kv, ctx, &tq_llm::budget::Fit::default(), quiet, &logger(quiet))?)
}

/// `tq kv plan`: per budget, a table of the layers (or one JSON line per layer).
pub fn plan(model: &Model, kvs: &[KvSpec], ctx: usize, json: bool) -> Result<()> {
    if let Some(k) = kvs.iter().find(|k| k.budget.is_none()) {
        bail!("'{k}' is not a budget (write B, budget:B or budget:B:ctx=N)");
    }
    for kv in kvs {
        let spec = resolve(model, kv, ctx, json)?;
        let rp = spec.plan.as_ref().ok_or_else(|| anyhow::anyhow!("budget {kv}: no plan was fitted"))?;
        let p = &rp.plan;
        let name = |s: &tq_kv::Store| tq_kv::budget::store_name(s);
        if json {
            for (l, (c, s)) in p.layers.iter().zip(&p.sensitivity).enumerate() {
                let row = serde_json::json!({"kv": kv.name, "ctx": p.ctx, "layer": l, "keys": name(&c.keys), "values": name(&c.values), "sink": c.sink,
                    "recent": c.recent, "recent_q8": c.recent_q8, "delayed": c.delayed, "calibrated": c.calibrated,
                    "kld_keys_probe": s[0], "kld_values_probe": s[1], "probe_bits": p.probe_bits, "plan_bits_per_value": p.bits_at(p.ctx)?, "source": p.source});
                println!("{row}");
            }
            continue;
        }
        println!(
            "budget {} bits per value at ctx {}: the plan holds {:.4} bits per value ({} bytes per sequence, every byte counted; \
             the calibration is static per model); fitted on {}",
            p.budget_bits,
            p.ctx,
            p.bits_at(p.ctx)?,
            p.bytes_at(p.ctx)?,
            p.source
        );
        println!("{:>5} {:<12} {:<12} {:>4} {:>7} {:<14} {:>10} {:>10}", "layer", "keys", "values", "sink", "recent", "window", "KLD K@probe", "KLD V@probe");
        for (l, (c, s)) in p.layers.iter().zip(&p.sensitivity).enumerate() {
            let win = if c.recent == 0 {
                "-".to_string()
            } else {
                format!("{}{}", if c.recent_q8 { "q8_0" } else { "f32" }, if c.delayed { ", delayed" } else { "" })
            };
            println!("{l:>5} {:<12} {:<12} {:>4} {:>7} {:<14} {:>10.5} {:>10.5}", name(&c.keys), name(&c.values), c.sink, c.recent, win, s[0], s[1]);
        }
        println!(
            "(keys calibrated: {}; KLD columns: the measured KLD with only that side of the layer as tq-mse-{}-nc)",
            p.layers.iter().filter(|c| c.calibrated).count(),
            p.probe_bits
        );
    }
    Ok(())
}
