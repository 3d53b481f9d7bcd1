//! `tq kv eval`: perplexity of SmolLM2 on real text with a given KV cache,
//! llama.cpp's convention (chunks of `ctx` tokens, the second half of each
//! chunk scored).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tq_llm::llama::{F32Cache, KvCache, Llama};

pub struct EvalArgs<'a> {
    pub text: &'a str,
    pub chars: usize,
    pub ctx: usize,
    pub chunks: usize,
    pub kv: &'a str,
    /// Windows and key centering of the compressed caches.
    pub opts: tq_kv::CacheOptions,
    /// Seed of the codecs' random rotations (run-to-run spread: vary it).
    pub seed: u64,
    pub json: bool,
}

fn load_text(name: &str, quiet: bool) -> Result<String> {
    match name {
        "austen" => return crate::data::austen_text(quiet),
        "shakespeare" => return crate::data::shakespeare_text(quiet),
        _ => {}
    }
    let t = std::fs::read_to_string(name).with_context(|| format!("cannot read text file {name} (or use --text austen|shakespeare)"))?;
    Ok(t)
}

pub fn eval(a: &EvalArgs<'_>) -> Result<()> {
    let out = eval_run(a)?;
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// One `tq kv eval` run, as its JSON object (progress on stderr unless `json`).
pub fn eval_run(a: &EvalArgs<'_>) -> Result<serde_json::Value> {
    let mut rows = eval_many(a, &[a.kv.to_string()], &|_| {})?;
    Ok(rows.remove(0))
}

/// Per-precision sums of an evaluation.
#[derive(Default)]
struct Acc {
    nll: f64,
    kld: f64,
    agree: usize,
    kv_bytes: usize,
}

/// `tq kv eval` for several precisions over the same chunks: each chunk's f32
/// reference is computed once and compared with every precision (`a.kv` is
/// ignored; `done(k)` is called after each chunk with the chunks done).
fn eval_many(a: &EvalArgs<'_>, precisions: &[String], done: &dyn Fn(usize)) -> Result<Vec<serde_json::Value>> {
    let specs = precisions.iter().map(|p| tq_core::kv::KvSpec::parse(p)).collect::<tq_core::Result<Vec<_>>>()?;
    let text = load_text(a.text, a.json)?;
    let text: String = text.chars().take(a.chars).collect();
    if text.trim().is_empty() {
        bail!("the text is empty");
    }
    let path = crate::data::smollm_gguf(a.json)?;
    let model = Llama::load(&path)?;
    if a.ctx < 4 || a.ctx > model.config.context {
        bail!("--ctx {} is outside 4..={} (the model's context)", a.ctx, model.config.context);
    }
    let tok = tq_llm::tokenizer::from_gguf(&path)?;
    let ids = tq_llm::tokenizer::encode(&tok, &text)?;
    let chunks = a.chunks.min(ids.len() / a.ctx);
    if chunks == 0 {
        bail!("{} tokens of text are fewer than one chunk of {}", ids.len(), a.ctx);
    }
    let vocab = model.config.vocab;
    let shape = model.config.kv_shape();
    let (mut nll_ref, mut count) = (0.0f64, 0usize);
    let mut acc: Vec<Acc> = precisions.iter().map(|_| Acc::default()).collect();
    let t = Instant::now();
    let log_probs = |row: &[f32]| -> Vec<f64> {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        row.iter().map(|&v| v as f64 - lse).collect()
    };
    let am = |v: &[f64]| v.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
    for c in 0..chunks {
        let toks = &ids[c * a.ctx..(c + 1) * a.ctx];
        let mut f = F32Cache::new(shape);
        let ref_logits = model.forward(toks, &mut f as &mut dyn KvCache, false)?;
        let ref_lp: Vec<Vec<f64>> = (a.ctx / 2..a.ctx - 1).map(|j| log_probs(&ref_logits[j * vocab..(j + 1) * vocab])).collect();
        drop(ref_logits);
        for (j, lr) in (a.ctx / 2..a.ctx - 1).zip(&ref_lp) {
            nll_ref -= lr[toks[j + 1] as usize];
            count += 1;
        }
        for ((p, spec), s) in precisions.iter().zip(&specs).zip(acc.iter_mut()) {
            if spec.keys == tq_core::kv::Store::F32 && spec.values == tq_core::kv::Store::F32 {
                // the reference itself
                s.kv_bytes = f.bytes();
                for (j, lr) in (a.ctx / 2..a.ctx - 1).zip(&ref_lp) {
                    s.nll -= lr[toks[j + 1] as usize];
                    s.agree += 1;
                }
                continue;
            }
            let mut cache = tq_kv::cache_with(shape, p, a.seed, &a.opts)?;
            let logits = model.forward(toks, cache.as_mut(), false)?;
            s.kv_bytes = cache.bytes();
            for (j, lr) in (a.ctx / 2..a.ctx - 1).zip(&ref_lp) {
                let lp = log_probs(&logits[j * vocab..(j + 1) * vocab]);
                s.nll -= lp[toks[j + 1] as usize];
                s.kld += lr.iter().zip(&lp).map(|(&p, &q)| p.exp() * (p - q)).sum::<f64>();
                s.agree += (am(lr) == am(&lp)) as usize;
            }
        }
        if !a.json && precisions.len() == 1 {
            eprintln!("chunk {}/{chunks}: ppl so far {:.4}", c + 1, (acc[0].nll / count as f64).exp());
        }
        done(c + 1);
    }
    let n = count as f64;
    let mut rows = Vec::new();
    for ((p, spec), s) in precisions.iter().zip(&specs).zip(&acc) {
        let bits = spec.bits_per_value(shape.head_dim)?;
        let per_token = spec.bytes_per_token_per_layer(shape.kv_heads, shape.head_dim)?;
        rows.push(json!({"text": a.text, "chars": a.chars, "tokens": ids.len(), "ctx": a.ctx, "chunks": chunks, "kv": p,
            "seed": a.seed, "sink": a.opts.sink, "recent": a.opts.recent, "recent_q8": a.opts.recent_q8, "delayed": a.opts.delayed, "center_keys": a.opts.center_keys,
            "calib": a.opts.calibration.as_ref().map(|c| c.source.clone()),
            "ppl": (s.nll / n).exp(), "ppl_f32": (nll_ref / n).exp(), "kld": s.kld / n, "top1_agree": s.agree as f64 / n,
            "bits_per_value": bits, "kv_bytes_per_token": per_token * shape.layers as f64, "kv_bytes_measured_per_token": s.kv_bytes as f64 / a.ctx as f64,
            "scored_tokens": count, "seconds": t.elapsed().as_secs_f64()}));
    }
    Ok(rows)
}

/// Precisions of `tq kv sweep` by default (and of the report's KV section).
pub const SWEEP: &str = "f16,q8_0-rot,k8v4,k5v4,q4_0-rot,q4_0,kivi-4,tq-mse-4,tq-mse-4-nc,nvfp4,tq-prod-4,k5v3,k4v3,tq-mse-3.5,tq-mse-3,kivi-2,tq-mse-2.5,tq-mse-2";

/// `tq kv sweep`: `tq kv eval` for every precision (optionally with windows),
/// as a markdown Pareto table (sorted by bits per value) and an SVG of KLD and
/// ΔPPL against bits per value in `out`. Returns (markdown, rows).
#[allow(clippy::too_many_arguments)]
pub fn sweep(text: &str, chars: usize, ctx: usize, chunks: usize, precisions: &[String], opts: &tq_kv::CacheOptions, seed: u64, out: &std::path::Path) -> Result<(String, Vec<serde_json::Value>)> {
    let pb = indicatif::ProgressBar::new(chunks as u64);
    pb.set_style(indicatif::ProgressStyle::with_template("kv sweep [{bar:30}] {pos}/{len} chunks × {msg} ({eta})").unwrap().progress_chars("=> "));
    pb.set_message(format!("{} precisions", precisions.len()));
    let a = EvalArgs { text, chars, ctx, chunks, kv: "f32", opts: opts.clone(), seed, json: true };
    let mut rows = eval_many(&a, precisions, &|k| pb.set_position(k as u64))?;
    pb.finish_and_clear();
    rows.sort_by(|a, b| a["bits_per_value"].as_f64().unwrap_or(0.0).total_cmp(&b["bits_per_value"].as_f64().unwrap_or(0.0)));
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
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
    let svg = format!("kv_sweep_{}{tag}.svg", text.replace(['/', '.'], "_"));
    plot_sweep(&out.join(&svg), text, &rows)?;
    use std::fmt::Write as _;
    let mut md = String::new();
    let (sink, recent) = (opts.sink, opts.recent);
    let rf = if opts.recent_q8 { "q8_0" } else { "f32" };
    let mut win = if sink + recent > 0 { format!(", windows: {sink} f32 sink + {recent} {rf} recent tokens (not in bits/value; in bytes/token)") } else { String::new() };
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
        "`tq kv sweep --text {text} --chars {chars} --ctx {ctx} --chunks {chunks}`: SmolLM2-135M, llama.cpp's perplexity convention; KLD and top-1 \
         against the f32 cache on the same tokens{win}. Differences below about 1% ΔPPL are within the run-to-run \
         sensitivity of quantized caches (see README).\n\n![KLD and ΔPPL vs bits per value]({svg})\n"
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

fn plot_sweep(path: &std::path::Path, text: &str, rows: &[serde_json::Value]) -> Result<()> {
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
            (r["bits_per_value"].as_f64().unwrap_or(0.0), r["kld"].as_f64().unwrap_or(0.0).max(1e-6), 100.0 * (ppl / f - 1.0), r["kv"].as_str().unwrap_or("").to_string())
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

/// Records keys and values (every position) and the queries of the last
/// position for some layers, around the reference cache.
struct DumpCache {
    inner: F32Cache,
    layers: Vec<usize>,
    tokens: usize,
    /// per dumped layer, per KV head: appended rows
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
    /// per dumped layer: last-position queries in head order (every
    /// position's with `all_queries`)
    q: std::cell::RefCell<Vec<Vec<f32>>>,
    all_queries: bool,
}

impl KvCache for DumpCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        if let Some(i) = self.layers.iter().position(|&l| l == layer) {
            self.k[i][head].extend_from_slice(k);
            self.v[i][head].extend_from_slice(v);
        }
        self.inner.append(layer, head, k, v);
    }
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        if len == self.tokens || self.all_queries {
            if let Some(i) = self.layers.iter().position(|&l| l == layer) {
                self.q.borrow_mut()[i].extend_from_slice(q);
            }
        }
        self.inner.attend(layer, head, q, len, out);
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.inner.len(layer, head)
    }
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }
}

/// Default shrinkage of the calibration covariances (`tq kv calibrate`).
pub const CALIB_SHRINK: f32 = 0.2;
/// Default chunks (fresh contexts) of `tq kv calibrate` (`--calib-text` sizes its own).
pub const CALIB_CHUNKS: usize = 2;
/// Default tokens per calibration chunk: keys after RoPE depend on the position,
/// so the statistics must cover the positions the cache will hold.
pub const CALIB_CTX: usize = 4096;

/// Feeds the key and query statistics of an f32 run (token 0 of each chunk,
/// an attention sink with an atypical key, is left out of the key statistics).
struct CalibCache {
    inner: F32Cache,
    kv_heads: usize,
    stats: std::cell::RefCell<tq_kv::CalibrationStats>,
}

impl KvCache for CalibCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        if self.inner.len(layer, head) > 0 {
            self.stats.get_mut().add_key(layer * self.kv_heads + head, k);
        }
        self.inner.append(layer, head, k, v);
    }
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        self.stats.borrow_mut().add_query(layer * self.kv_heads + head, q);
        self.inner.attend(layer, head, q, len, out);
    }
    /// The f32 cache is exact: the model may prefill in batches (each
    /// position's queries are recorded, then attended in parallel).
    fn prefix_stable(&self, _layer: usize) -> bool {
        true
    }
    fn attend_positions(&self, layer: usize, qs: &[f32], kv_heads: usize, group: usize, d: usize, start: usize, out: &mut [f32]) {
        let mut st = self.stats.borrow_mut();
        for (h, q) in qs.chunks_exact(d).enumerate() {
            st.add_query(layer * kv_heads + (h / group) % kv_heads, q);
        }
        drop(st);
        self.inner.attend_positions(layer, qs, kv_heads, group, d, start, out);
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.inner.len(layer, head)
    }
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }
}

/// Key transforms calibrated on `chunks` chunks of `ctx` tokens of `text`
/// (`tq kv calibrate`, `--calib-text`).
pub fn calibrate(text: &str, chunks: usize, ctx: usize, shrink: f32, quiet: bool) -> Result<tq_kv::KeyCalibration> {
    let path = crate::data::smollm_gguf(quiet)?;
    let model = Llama::load(&path)?;
    if ctx < 4 || ctx > model.config.context {
        bail!("--ctx {ctx} is outside 4..={} (the model's context)", model.config.context);
    }
    if chunks == 0 {
        bail!("--chunks must be at least 1");
    }
    let body = load_text(text, quiet)?;
    if body.trim().is_empty() {
        bail!("the calibration text is empty");
    }
    let tok = tq_llm::tokenizer::from_gguf(&path)?;
    let ids = tq_llm::tokenizer::encode(&tok, &body)?;
    if ids.len() < chunks * ctx {
        bail!("the calibration text has {} tokens, fewer than {chunks} chunks of {ctx}", ids.len());
    }
    let shape = model.config.kv_shape();
    let t = Instant::now();
    let mut cache = CalibCache { inner: F32Cache::new(shape), kv_heads: shape.kv_heads, stats: std::cell::RefCell::new(tq_kv::CalibrationStats::new(shape)) };
    for toks in ids.chunks_exact(ctx).take(chunks) {
        cache.inner = F32Cache::new(shape);
        model.forward(toks, &mut cache as &mut dyn KvCache, true)?;
    }
    let c = cache.stats.into_inner().finish(shrink, text)?;
    if !quiet {
        eprintln!("calibrated key transforms on {chunks} × {ctx} tokens of {text} in {:.1} s", t.elapsed().as_secs_f64());
    }
    Ok(c)
}

/// Reads a `tq kv calibrate` file.
pub fn load_calibration(path: &std::path::Path) -> Result<tq_kv::KeyCalibration> {
    let b = std::fs::read(path).with_context(|| format!("cannot read key calibration {}", path.display()))?;
    tq_kv::KeyCalibration::from_bytes(&b).with_context(|| format!("in {}", path.display()))
}

/// `tq kv dump`: real SmolLM2 keys, values and last-position queries (f32
/// cache) of `layers` after `tokens` tokens of `text`, as npy files plus
/// meta.json in `out` (for the CUDA checks on real data).
pub fn dump(text: &str, tokens: usize, layers: &[usize], all_queries: bool, out: &std::path::Path) -> Result<()> {
    let path = crate::data::smollm_gguf(false)?;
    let model = Llama::load(&path)?;
    let c = &model.config;
    if tokens < 1 || tokens > c.context {
        bail!("--tokens {tokens} is outside 1..={} (the model's context)", c.context);
    }
    if let Some(&l) = layers.iter().find(|&&l| l >= c.layers) {
        bail!("layer {l} does not exist (the model has {})", c.layers);
    }
    let body = load_text(text, false)?;
    let tok = tq_llm::tokenizer::from_gguf(&path)?;
    let ids = tq_llm::tokenizer::encode(&tok, &body)?;
    if ids.len() < tokens {
        bail!("the text has {} tokens, fewer than {tokens}", ids.len());
    }
    let shape = c.kv_shape();
    let d = shape.head_dim;
    let n = layers.len();
    let mut cache = DumpCache {
        inner: F32Cache::new(shape),
        layers: layers.to_vec(),
        tokens,
        k: vec![vec![Vec::new(); shape.kv_heads]; n],
        v: vec![vec![Vec::new(); shape.kv_heads]; n],
        q: std::cell::RefCell::new(vec![Vec::new(); n]),
        all_queries,
    };
    // the attention calls of the last position carry the queries we keep
    model.forward(&ids[..tokens], &mut cache as &mut dyn KvCache, true)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let flat = |x: &Vec<Vec<Vec<f32>>>| x.iter().flatten().flatten().copied().collect::<Vec<f32>>();
    let (k, v) = (flat(&cache.k), flat(&cache.v));
    let q: Vec<f32> = cache.q.borrow().iter().flatten().copied().collect();
    let w = |name: &str, data: Vec<f32>| {
        let m = crate::files::Matrix { rows: data.len() / d, cols: d, data };
        crate::files::write_atomic(&out.join(name), &crate::files::npy_bytes(&m))
    };
    w("k.npy", k)?;
    w("v.npy", v)?;
    w("q.npy", q)?;
    let meta = json!({"model": "SmolLM2-135M-Instruct", "text": text, "layers": n, "layer_indices": layers, "kv_heads": shape.kv_heads,
        "q_heads": c.heads, "tokens": tokens, "head_dim": d,
        "all_queries": all_queries,
        "layout": if all_queries { "k/v: [layer][kv_head][token][head_dim]; q: [layer][position][q_head][head_dim]" } else { "k/v: [layer][kv_head][token][head_dim]; q: [layer][q_head][head_dim] at the last position" }});
    crate::files::write_atomic(&out.join("meta.json"), serde_json::to_string_pretty(&meta)?.as_bytes())?;
    eprintln!("dumped {n} layers × {} KV heads × {tokens} tokens (d = {d}) to {}", shape.kv_heads, out.display());
    Ok(())
}

/// Keeps every appended key and value (all layers) beside an f32 cache.
struct RecordingCache {
    inner: F32Cache,
    kv_heads: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache for RecordingCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        let i = layer * self.kv_heads + head;
        self.k[i].extend_from_slice(k);
        self.v[i].extend_from_slice(v);
        self.inner.append(layer, head, k, v);
    }
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        self.inner.attend(layer, head, q, len, out);
    }
    fn attend_group(&self, layer: usize, head: usize, qs: &[f32], group: usize, len: usize, out: &mut [f32]) {
        self.inner.attend_group(layer, head, qs, group, len, out);
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.inner.len(layer, head)
    }
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }
}

/// Adds up the time spent in `attend`.
struct TimedCache {
    inner: Box<dyn KvCache>,
    attend_ns: std::cell::Cell<u128>,
}

impl KvCache for TimedCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        self.inner.append(layer, head, k, v);
    }
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        let t = Instant::now();
        self.inner.attend(layer, head, q, len, out);
        self.attend_ns.set(self.attend_ns.get() + t.elapsed().as_nanos());
    }
    fn attend_group(&self, layer: usize, head: usize, qs: &[f32], group: usize, len: usize, out: &mut [f32]) {
        let t = Instant::now();
        self.inner.attend_group(layer, head, qs, group, len, out);
        self.attend_ns.set(self.attend_ns.get() + t.elapsed().as_nanos());
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.inner.len(layer, head)
    }
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }
}

/// `tq kv bench`: decode speed and attention time per token with a cache of
/// `ctx` tokens, for `kv` and for the f32 cache in the same run. The caches are
/// filled with the real keys and values of a SmolLM2 run over the first
/// `fill` tokens of Austen (tiled when `ctx` is longer), then `steps` tokens
/// are decoded one at a time.
/// The compressed cache takes `opts` (windows, calibration); the f32 cache is exact.
#[allow(clippy::too_many_arguments)]
pub fn bench(kv: &str, ctxs: &[usize], steps: usize, fill: usize, opts: &tq_kv::CacheOptions, seed: u64, json: bool) -> Result<()> {
    tq_core::kv::KvSpec::parse(kv)?;
    let path = crate::data::smollm_gguf(json)?;
    let model = Llama::load(&path)?;
    let c = &model.config;
    if let Some(&x) = ctxs.iter().find(|&&x| x <= steps || x > c.context) {
        bail!("context {x} is outside {}..={} (more than --steps {steps}, at most the model's context)", steps + 1, c.context);
    }
    if steps == 0 || fill == 0 {
        bail!("--steps and --fill must be positive");
    }
    let tok = tq_llm::tokenizer::from_gguf(&path)?;
    let ids = tq_llm::tokenizer::encode(&tok, &crate::data::austen_text(json)?)?;
    let max_ctx = *ctxs.iter().max().context("no context length given")?;
    let fill = fill.min(max_ctx);
    if ids.len() < fill + steps {
        bail!("the text has too few tokens");
    }
    let shape = c.kv_shape();
    let n = shape.layers * shape.kv_heads;
    if !json {
        eprintln!("running SmolLM2 over {fill} tokens of Austen to capture real keys and values");
    }
    let mut rec = RecordingCache { inner: F32Cache::new(shape), kv_heads: shape.kv_heads, k: vec![Vec::new(); n], v: vec![Vec::new(); n] };
    model.forward(&ids[..fill], &mut rec as &mut dyn KvCache, true)?;
    let d = shape.head_dim;
    let mut rows = Vec::new();
    for &ctx in ctxs {
        let mut res = Vec::new();
        for spec in ["f32", kv] {
            let mut cache = TimedCache { inner: tq_kv::cache_with(shape, spec, seed, opts)?, attend_ns: std::cell::Cell::new(0) };
            for t in 0..ctx - steps {
                let s = t % fill;
                for i in 0..n {
                    cache.append(i / shape.kv_heads, i % shape.kv_heads, &rec.k[i][s * d..(s + 1) * d], &rec.v[i][s * d..(s + 1) * d]);
                }
            }
            let t0 = Instant::now();
            for &tk in &ids[fill..fill + steps] {
                model.forward(&[tk], &mut cache as &mut dyn KvCache, true)?;
            }
            let secs = t0.elapsed().as_secs_f64();
            let attn = cache.attend_ns.get() as f64 * 1e-6 / steps as f64;
            // attention alone: one decode step's calls (every layer and KV head,
            // the group's queries taken from real keys), best of 3
            let len = cache.len(0, 0);
            let group = c.heads / c.kv_heads;
            let mut out = vec![0.0f32; group * d];
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let t = Instant::now();
                for i in 0..n {
                    let qs: Vec<f32> = rec.k[i][..group * d].to_vec();
                    cache.inner.attend_group(i / shape.kv_heads, i % shape.kv_heads, &qs, group, len, &mut out);
                }
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
            res.push((secs, attn, cache.bytes(), best));
        }
        let ((fs, fa, fb, fo), (ks, ka, kb, ko)) = (res[0], res[1]);
        let row = json!({"kv": kv, "ctx": ctx, "steps": steps, "sink": opts.sink, "recent": opts.recent, "recent_q8": opts.recent_q8, "delayed": opts.delayed,
            "calib": opts.calibration.as_ref().map(|c| c.source.clone()), "decode_tok_s": steps as f64 / ks, "attn_ms_per_token": ka,
            "f32_decode_tok_s": steps as f64 / fs, "f32_attn_ms_per_token": fa, "attn_speedup": fa / ka, "decode_speedup": fs / ks,
            "attn_only_ms": ko, "f32_attn_only_ms": fo, "attn_only_speedup": fo / ko,
            "kv_bytes": kb, "f32_kv_bytes": fb, "threads": rayon::current_num_threads()});
        if !json {
            eprintln!(
                "ctx {ctx:5}: {kv}: {:.2} tok/s, attention {ka:.2} ms/token ({ko:.2} alone) | f32: {:.2} tok/s, attention {fa:.2} ms/token ({fo:.2} alone) | attention {:.2}x ({:.2}x alone), decode {:.2}x",
                steps as f64 / ks,
                steps as f64 / fs,
                fa / ka,
                fo / ko,
                fs / ks
            );
        }
        rows.push(row);
    }
    for r in &rows {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}

/// `tq generate`: greedy decoding with a KV cache of the given precision,
/// tokens streamed to stdout as they are produced. The prompt is wrapped in
/// SmolLM2's chat template unless `raw`.
pub fn generate(kv: &str, prompt: &str, max_tokens: usize, raw: bool, opts: &tq_kv::CacheOptions, seed: u64) -> Result<()> {
    tq_core::kv::KvSpec::parse(kv)?;
    if prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let path = crate::data::smollm_gguf(false)?;
    let model = Llama::load(&path)?;
    let tok = tq_llm::tokenizer::from_gguf(&path)?;
    let (ids, mut stop) = if raw { (tq_llm::tokenizer::encode(&tok, prompt)?, Vec::new()) } else { chat_ids(&tok, prompt)? };
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
    let out_ids = greedy(&model, cache.as_mut(), &ids, max_tokens, &stop, &mut |so_far| {
        first.get_or_insert_with(Instant::now);
        // decode the whole answer each time: byte-level tokens may split characters
        let text = tok.decode(so_far, true).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
        if text.len() > printed && text.is_char_boundary(printed) {
            write!(stdout, "{}", &text[printed..])?;
            stdout.flush()?;
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

/// Greedy continuation of `ids` with `cache` (at most `max_new` tokens, stops at `stop`).
/// `on_token` sees the tokens produced so far after each new one.
fn greedy(model: &Llama, cache: &mut dyn KvCache, ids: &[u32], max_new: usize, stop: &[u32], on_token: &mut dyn FnMut(&[u32]) -> Result<()>) -> Result<Vec<u32>> {
    let argmax = |l: &[f32]| l.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32;
    let mut logits = model.forward(ids, cache, true)?;
    let mut out = Vec::new();
    for _ in 0..max_new {
        let next = argmax(&logits);
        if stop.contains(&next) {
            break;
        }
        out.push(next);
        on_token(&out)?;
        logits = model.forward(&[next], cache, true)?;
    }
    Ok(out)
}

/// SmolLM2's chat template around one user message: the token ids and the
/// end-of-turn token (which ends the answer).
fn chat_ids(tok: &tq_llm::tokenizer::Tokenizer, user: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let special = |name: &str| tok.token_to_id(name).with_context(|| format!("the GGUF vocabulary has no {name}"));
    let (start, end) = (special("<|im_start|>")?, special("<|im_end|>")?);
    let mut ids = vec![start];
    ids.extend(tq_llm::tokenizer::encode(tok, &format!("user\n{user}"))?);
    ids.push(end);
    ids.extend(tq_llm::tokenizer::encode(tok, "\n")?);
    ids.push(start);
    ids.extend(tq_llm::tokenizer::encode(tok, "assistant\n")?);
    Ok((ids, vec![end]))
}

/// How `tq kv needle` asks for the planted fact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NeedleFormat {
    /// Chat template: "The secret number is N." in the user's text, then a question.
    Chat,
    /// Plain completion in the style of the passkey-retrieval test (Mohtashami
    /// & Jaggi, 2023): "The pass key is N. Remember it. N is the pass key."
    /// in the filler, and the prompt ends with "What is the pass key? The pass key is".
    Passkey,
}

/// `tq kv needle`: plants a number at each depth of Austen filler text of
/// each length (tokens, template included), asks for it at the end and checks
/// the greedy answer, for `kv` and for the f32 cache as control. JSON lines
/// per trial, then a summary line.
#[allow(clippy::too_many_arguments)]
pub fn needle(kv: &str, lengths: &[usize], depths: &[f64], format: NeedleFormat, opts: &tq_kv::CacheOptions, seed: u64, json: bool) -> Result<()> {
    tq_core::kv::KvSpec::parse(kv)?;
    if let Some(d) = depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        bail!("depth {d} is outside 0..1");
    }
    let path = crate::data::smollm_gguf(json)?;
    let model = Llama::load(&path)?;
    let c = &model.config;
    if let Some(&l) = lengths.iter().find(|&&l| l < 64 || l + 32 > c.context) {
        bail!("length {l} is outside 64..={} (the model's context, less room for the answer)", c.context - 32);
    }
    let tok = tq_llm::tokenizer::from_gguf(&path)?;
    let filler = tq_llm::tokenizer::encode(&tok, &crate::data::austen_text(json)?)?;
    let dec = |ids: &[u32]| tok.decode(ids, true).map_err(|e| anyhow::anyhow!("decode: {e}"));
    let (intro, question) = match format {
        NeedleFormat::Chat => ("", "\n\nWhat is the secret number mentioned in the text above? Answer with the number only."),
        NeedleFormat::Passkey => (
            "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it.\n\n",
            "\n\nWhat is the pass key? The pass key is",
        ),
    };
    let mut rows = Vec::new();
    let (mut pass, mut pass_ref, mut trials) = (0usize, 0usize, 0usize);
    for &len in lengths {
        for (di, &depth) in depths.iter().enumerate() {
            let number = 10_000 + (len * 7919 + di * 104_729) % 90_000;
            let needle = match format {
                NeedleFormat::Chat => format!(" The secret number is {number}. "),
                NeedleFormat::Passkey => format!(" The pass key is {number}. Remember it. {number} is the pass key. "),
            };
            // filler tokens so that the whole prompt has about `len` tokens
            let fixed = tq_llm::tokenizer::encode(&tok, &format!("user\n{intro}{needle}{question}"))?.len() + 8;
            let nf = len.saturating_sub(fixed).min(filler.len());
            let cut = ((nf as f64) * depth).round() as usize;
            let body = format!("{intro}{}{needle}{}{question}", dec(&filler[..cut])?, dec(&filler[cut..nf])?);
            let (ids, stop) = match format {
                NeedleFormat::Chat => chat_ids(&tok, &body)?,
                NeedleFormat::Passkey => (tq_llm::tokenizer::encode(&tok, &body)?, Vec::new()),
            };
            if ids.len() + 24 > c.context {
                bail!("the prompt of {} tokens leaves no room for the answer", ids.len());
            }
            let mut res = Vec::new();
            for spec in [kv, "f32"] {
                let t0 = Instant::now();
                let mut cache = tq_kv::cache_with(c.kv_shape(), spec, seed, opts)?;
                let max_new = if format == NeedleFormat::Passkey { 8 } else { 24 };
                let out = greedy(&model, cache.as_mut(), &ids, max_new, &stop, &mut |_| Ok(()))?;
                let answer = dec(&out)?;
                let ok = answer.contains(&number.to_string());
                res.push((ok, answer, t0.elapsed().as_secs_f64()));
            }
            let ((ok, answer, secs), (ok_ref, answer_ref, _)) = (res[0].clone(), res[1].clone());
            trials += 1;
            pass += ok as usize;
            pass_ref += ok_ref as usize;
            let row = json!({"kv": kv, "format": format!("{format:?}").to_lowercase(), "tokens": ids.len(), "length": len, "depth": depth, "number": number, "passed": ok,
                "answer": answer.trim(), "f32_passed": ok_ref, "f32_answer": answer_ref.trim(), "seconds": secs});
            if !json {
                eprintln!(
                    "length {len:5} depth {depth:.2}: {kv} {} ({:?}) | f32 {} ({:?}) [{secs:.0} s]",
                    if ok { "pass" } else { "FAIL" },
                    answer.trim(),
                    if ok_ref { "pass" } else { "FAIL" },
                    answer_ref.trim()
                );
            }
            println!("{}", serde_json::to_string(&row)?);
            rows.push(row);
        }
    }
    let summary = json!({"kv": kv, "seed": seed, "format": format!("{format:?}").to_lowercase(), "sink": opts.sink, "recent": opts.recent, "recent_q8": opts.recent_q8, "delayed": opts.delayed, "center_keys": opts.center_keys, "calib": opts.calibration.as_ref().map(|c| c.source.clone()), "trials": trials, "pass_rate": pass as f64 / trials as f64,
        "f32_pass_rate": pass_ref as f64 / trials as f64, "lengths": lengths, "depths": depths});
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
