//! `tq kv ...` and `tq generate`: argument handling and printing around the
//! evaluations of `tq_llm::eval` (perplexity and KLD, sweep tables and plots,
//! decode timing, needle retrieval, calibration, K/V dumps).

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
    /// The runtime, loading it (fetching the GGUF when needed) on the first call.
    pub fn get(&self, quiet: bool) -> Result<&Runtime> {
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
    if json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Precisions of `tq kv sweep` by default (and of the report's KV section).
pub const SWEEP: &str =
    "f16,q8_0-rot,k8v4,k5v4,q4_0-rot,q4_0,kivi-4,tq-mse-4,tq-mse-4-nc,nvfp4,tq-prod-4,k5v3,k4v3,tq-mse-3.5,tq-mse-3,kivi-2,tq-mse-2.5,tq-mse-2";

/// `tq kv sweep`: `tq kv eval` for every precision (optionally with windows),
/// as a markdown Pareto table (sorted by bits per value) and an SVG of KLD and
/// ΔPPL against bits per value in `out`. Returns (markdown, rows).
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    model: &Model,
    text: &str,
    chars: usize,
    ctx: usize,
    chunks: usize,
    precisions: &[KvSpec],
    opts: &CacheOptions,
    seed: u64,
    out: &Path,
) -> Result<(String, Vec<serde_json::Value>)> {
    let pb = indicatif::ProgressBar::new(chunks as u64);
    pb.set_style(indicatif::ProgressStyle::with_template("kv sweep [{bar:30}] {pos}/{len} chunks × {msg} ({eta})").unwrap().progress_chars("=> "));
    pb.set_message(format!("{} precisions", precisions.len()));
    let a = PplConfig { text, chars, ctx, chunks, opts: opts.clone(), seed };
    let body = eval::ppl_text(&a, true)?;
    let rt = model.get(true)?;
    let mut rows = eval::perplexity(rt, &a, &body, precisions, &|k| pb.set_position(k as u64), &eval::quiet)?;
    pb.finish_and_clear();
    rows.sort_by(|a, b| a["bits_per_value"].as_f64().unwrap_or(0.0).total_cmp(&b["bits_per_value"].as_f64().unwrap_or(0.0)));
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    // one plot per text and cache options
    let mut tag = String::new();
    if opts.sink + opts.recent > 0 {
        tag += &format!("_s{}r{}", opts.sink, opts.recent);
    }
    if opts.recent_q8 {
        tag += "q8";
    }
    if opts.delayed {
        tag += "d";
    }
    if opts.center_keys {
        tag += "_ck";
    }
    if let Some(c) = &opts.calibration {
        tag += &format!("_cal-{}", c.source.replace(['/', '.'], "_"));
    }
    if seed != 0 {
        tag += &format!("_seed{seed}");
    }
    if model.0 != ModelSpec::default() {
        tag += &format!("_{}", model.0.to_string().replace(['/', '.'], "_"));
    }
    let svg = format!("kv_sweep_{}{tag}.svg", text.replace(['/', '.'], "_"));
    plot_sweep(&out.join(&svg), text, &rows)?;
    use std::fmt::Write as _;
    let mut md = String::new();
    let (sink, recent) = (opts.sink, opts.recent);
    let rf = if opts.recent_q8 { "q8_0" } else { "f32" };
    let mut win =
        if sink + recent > 0 { format!(", windows: {sink} f32 sink + {recent} {rf} recent tokens (not in bits/value; in bytes/token)") } else { String::new() };
    if opts.center_keys {
        win += ", keys centered (--center-keys)";
    }
    if opts.delayed {
        win += ", recent tokens encoded when they leave the window (--delayed)";
    }
    if let Some(c) = &opts.calibration {
        win += &format!(", keys through transforms calibrated on {} (--calib; static per model, {} KiB, not in bits/value)", c.source, c.bytes() / 1024);
    }
    if seed != 0 {
        win += &format!(", rotation seed {seed}");
    }
    let _ = writeln!(
        md,
        "`tq kv{} sweep --text {text} --chars {chars} --ctx {ctx} --chunks {chunks}`: {}, llama.cpp's perplexity convention; KLD and top-1 \
         against the f32 cache on the same tokens{win}. Differences below about 1% ΔPPL are within the run-to-run \
         sensitivity of quantized caches (see docs/kv-cache.md).\n\n![KLD and ΔPPL vs bits per value]({svg})\n",
        if model.0 == ModelSpec::default() { String::new() } else { format!(" --model {}", model.0) },
        rt.name()
    );
    let _ = writeln!(md, "| KV precision | bits/value | bytes/token (measured) | ppl | ΔPPL | KLD | top-1 agree |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for r in &rows {
        let (ppl, f) = (r["ppl"].as_f64().unwrap_or(f64::NAN), r["ppl_f32"].as_f64().unwrap_or(f64::NAN));
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.0} | {:.3} | {:+.2}% | {:.4} | {:.3} |",
            r["kv"].as_str().unwrap_or(""),
            r["bits_per_value"].as_f64().unwrap_or(f64::NAN),
            r["kv_bytes_measured_per_token"].as_f64().unwrap_or(f64::NAN),
            ppl,
            100.0 * (ppl / f - 1.0),
            r["kld"].as_f64().unwrap_or(f64::NAN),
            r["top1_agree"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok((md, rows))
}

fn plot_sweep(path: &Path, text: &str, rows: &[serde_json::Value]) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    let err = |e: plotters::drawing::DrawingAreaErrorKind<_>| anyhow::anyhow!("plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(500);
    let pts: Vec<(f64, f64, f64, String)> = rows
        .iter()
        .filter(|r| r["kv"] != "f32")
        .map(|r| {
            let (ppl, f) = (r["ppl"].as_f64().unwrap_or(f64::NAN), r["ppl_f32"].as_f64().unwrap_or(f64::NAN));
            (
                r["bits_per_value"].as_f64().unwrap_or(0.0),
                r["kld"].as_f64().unwrap_or(0.0).max(1e-6),
                100.0 * (ppl / f - 1.0),
                r["kv"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let xmax = pts.iter().map(|p| p.0).fold(4.0f64, f64::max) * 1.1;
    let kmax = pts.iter().map(|p| p.1).fold(1e-3f64, f64::max) * 2.0;
    let mut c = ChartBuilder::on(&left)
        .caption(format!("{text}: KLD vs bits/value"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, (1e-6..kmax).log_scale())
        .map_err(err)?;
    c.configure_mesh().x_desc("bits per value").y_desc("KLD vs f32 cache (log)").draw().map_err(err)?;
    c.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, BLUE.filled()))).map_err(err)?;
    c.draw_series(pts.iter().map(|p| Text::new(p.3.clone(), (p.0 + 0.1, p.1), ("sans-serif", 11)))).map_err(err)?;
    let dmax = pts.iter().map(|p| p.2).filter(|v| v.is_finite()).fold(1.0f64, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&right)
        .caption(format!("{text}: ΔPPL vs bits/value"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, -1.0..dmax)
        .map_err(err)?;
    c.configure_mesh().x_desc("bits per value").y_desc("ΔPPL vs f32 cache (%)").draw().map_err(err)?;
    c.draw_series(pts.iter().map(|p| Circle::new((p.0, p.2), 4, RED.filled()))).map_err(err)?;
    c.draw_series(pts.iter().map(|p| Text::new(p.3.clone(), (p.0 + 0.1, p.2), ("sans-serif", 11)))).map_err(err)?;
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
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
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let n = d.head_dim;
    for (name, data) in [("k.npy", d.k), ("v.npy", d.v), ("q.npy", d.q)] {
        tq_data::vectors::write_npy(&out.join(name), &tq_data::Matrix { rows: data.len() / n, cols: n, data })?;
    }
    let meta = serde_json::to_string_pretty(&d.meta)?;
    tq_io::write_atomic(&out.join("meta.json"), meta.as_bytes()).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.join("meta.json").display()))?;
    eprintln!("dumped {} layers × {} KV heads × {tokens} tokens (d = {n}) to {}", layers.len(), d.meta["kv_heads"], out.display());
    Ok(())
}
