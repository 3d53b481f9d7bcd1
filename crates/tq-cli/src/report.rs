//! `tq report`: the main job. Measures the distortion of every registered codec
//! at dim 64, 128 and 1536 on seeded random unit vectors (the embedded default
//! data: the theorems give the expected answer), compares with the exact
//! Lloyd–Max theory and the paper's bounds, checks Hadamard against Haar, and
//! writes `index.md`, `index.html`, `results.json` and SVG plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::json;
use tq_core::eval::{measure_distortion, mse_bounds, theory, DistortionStats, DEFAULT_RHO};
use tq_core::{registry, CodecEntry, CodecKind, RotationKind};
use tq_data::Matrix;
use tq_kv::KvSpec;

struct Row {
    entry: &'static CodecEntry,
    dim: usize,
    rotation: RotationKind,
    bpv: f64,
    s: DistortionStats,
    t: tq_core::eval::Theory,
}

/// Vectors for a (codec, dim) task: the dense O(dim²) Gaussian QJL at 1536 is the slow case.
fn task_n(entry: &CodecEntry, dim: usize, n: usize) -> usize {
    match (dim, entry.kind) {
        (d, CodecKind::Prod { orth: false, .. }) if d >= 1024 => (n / 20).max(200),
        (d, _) if d >= 1024 => (n / 4).max(200),
        _ => n,
    }
}

/// How large a report is: `tq report` runs every section at a smaller size
/// (minutes on 2 cores), `--full` at the sizes of the published tables,
/// `--quick` the distortion part only.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    /// Distortion part only, small.
    pub quick: bool,
    /// The full tables.
    pub full: bool,
}

impl Size {
    /// Base vectors of the search and side-by-side sections.
    fn base(self) -> usize {
        if self.full {
            100_000
        } else {
            20_000
        }
    }
    /// Queries of the search section.
    fn search_queries(self) -> usize {
        if self.full {
            1000
        } else {
            200
        }
    }
    /// Queries of the side-by-side section.
    fn eval_queries(self) -> usize {
        if self.full {
            EVAL_QUERIES
        } else {
            100
        }
    }
    /// Chunks of 512 tokens per KV sweep.
    fn kv_chunks(self) -> usize {
        if self.full {
            4
        } else {
            1
        }
    }
    /// Chunks of 512 tokens of Shakespeare for the key calibration.
    fn calib_chunks(self) -> usize {
        if self.full {
            16
        } else {
            4
        }
    }
    /// Rows of the embedding matrix for the matrix codecs.
    fn matrix_rows(self) -> usize {
        if self.full {
            16_384
        } else {
            4096
        }
    }
}

pub fn run(out: &Path, n: Option<usize>, size: Size) -> Result<()> {
    let quick = size.quick;
    let n = n.unwrap_or(if size.full { 20_000 } else { 4000 });
    let n = if quick { n.min(400) } else { n };
    let dims: &[usize] = if quick { &[64] } else { &[64, 128, 1536] };
    let mut tasks: Vec<(&'static CodecEntry, usize, RotationKind, usize)> = Vec::new();
    for &dim in dims {
        // the TurboQuant codecs against their theory (baselines: the data sections)
        for e in registry().iter().filter(|e| e.kind.is_turboquant()) {
            tasks.push((e, dim, RotationKind::Hadamard, task_n(e, dim, n)));
        }
    }
    let haar_dim = if quick { 64 } else { 128 };
    for name in ["tq-mse-1", "tq-mse-2", "tq-mse-3", "tq-mse-4", "tq-prod-3"] {
        tasks.push((tq_core::lookup(name)?, haar_dim, RotationKind::Haar, n));
    }
    let total: usize = tasks.iter().map(|t| t.3).sum();
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(indicatif::ProgressStyle::with_template("distortion {msg:28} [{bar:40}] {pos}/{len} vectors ({eta})").unwrap().progress_chars("=> "));
    let mut rows = Vec::new();
    for (entry, dim, rotation, tn) in tasks {
        pb.set_message(format!("{} d={} {}", entry.name, dim, rotation.name()));
        let codec = entry.build(dim, 42, rotation, &[])?;
        let s = measure_distortion(codec.as_ref(), tn, 7, DEFAULT_RHO, &|k| pb.inc(k as u64))?;
        rows.push(Row { entry, dim, rotation, bpv: codec.bits_per_value(), s, t: theory(entry, dim) });
    }
    pb.finish_and_clear();

    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for &dim in dims {
        plot(out, dim, &rows)?;
    }
    let mut md = markdown(dims, &rows, n);
    let mut search = Vec::new();
    let mut evals = Vec::new();
    let mut matrix = serde_json::Value::Null;
    let mut kv = serde_json::Value::Null;
    let mut kv_calibrated = serde_json::Value::Null;
    let mut kv_window = serde_json::Value::Null;
    if !quick {
        for data in ["glove50", "minilm"] {
            let (text, rows) = search_section(out, data, size)?;
            md.push_str(&text);
            search.push(json!({"data": data, "rows": rows}));
        }
        for data in ["glove50", "minilm", "smollm-embed"] {
            let (text, rows) = eval_section(out, data, size)?;
            md.push_str(&text);
            evals.push(json!({"data": data, "rows": rows}));
        }
        let (text, rows) = matrix_section(size)?;
        md.push_str(&text);
        matrix = rows;
        md.push_str("\n## KV-cache precisions in SmolLM2 (Austen)\n\n");
        // SmolLM2, loaded by the first sweep and shared by the calibration and the others
        let model = crate::kv::Model::default();
        let specs = |list: &str| list.split(',').map(KvSpec::parse).collect::<tq_core::Result<Vec<_>>>();
        let chunks = size.kv_chunks();
        match crate::kv::sweep(&model, "austen", 200_000, 512, chunks, &specs(crate::kv::SWEEP)?, &tq_kv::CacheOptions::default(), 0, out) {
            Ok((text, rows)) => {
                md.push_str(&text);
                kv = json!(rows);
                // around 4.5 bits with key transforms calibrated on another text (exact for attention)
                let calibrated = || -> Result<(String, serde_json::Value, serde_json::Value)> {
                    let cal = tq_llm::eval::calibrate(
                        model.get(true)?,
                        "shakespeare",
                        size.calib_chunks(),
                        512,
                        tq_llm::eval::CALIB_SHRINK,
                        true,
                        &tq_llm::eval::quiet,
                    )?;
                    let opts = tq_kv::CacheOptions { calibration: Some(std::sync::Arc::new(cal)), ..Default::default() };
                    let (ctext, crows) = crate::kv::sweep(&model, "austen", 200_000, 512, chunks, &specs(CALIBRATED)?, &opts, 0, out)?;
                    let mut md = format!("\n### Keys through transforms calibrated on Shakespeare (`--calib-text shakespeare`)\n\n{ctext}");
                    // and with the first token in f32 and a recent window of q8_0 codes that fit
                    // 4.5 and 3.5 bits per value at ctx 512 (every byte counted)
                    let mut wrows = Vec::new();
                    for (list, recent, bits) in [(WINDOWED_45, 22, "4.5"), (WINDOWED_35, 18, "3.5")] {
                        let wopts = tq_kv::CacheOptions { sink: 1, recent, recent_q8: true, delayed: true, ..opts.clone() };
                        let (wtext, rows) = crate::kv::sweep(&model, "austen", 200_000, 512, chunks, &specs(list)?, &wopts, 0, out)?;
                        md += &format!(
                            "\n### Calibrated keys, token 0 in f32 and {recent} recent tokens as q8_0 (`--sink 1 --recent {recent} --recent-q8 --delayed`: {bits} bits per value at ctx 512)\n\n{wtext}"
                        );
                        wrows.extend(rows);
                    }
                    Ok((md, json!(crows), json!(wrows)))
                };
                match calibrated() {
                    Ok((text, c, w)) => {
                        md.push_str(&text);
                        (kv_calibrated, kv_window) = (c, w);
                    }
                    Err(e) => md.push_str(&format!("\nCalibrated sweeps skipped: {e:#}.\n")),
                }
            }
            // like the other real-data sections: say why, keep the report
            Err(e) => md.push_str(&format!("Skipped: {e:#}.\n")),
        }
    }
    let write = |name: &str, bytes: &[u8]| tq_io::write_atomic(&out.join(name), bytes).with_context(|| format!("cannot write {}", out.join(name).display()));
    write("index.md", md.as_bytes())?;
    write("index.html", html(&md).as_bytes())?;
    let js: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "codec": r.entry.name, "dim": r.dim, "rotation": r.rotation.name(), "n": r.s.n,
                "bits_per_value": r.bpv, "d_mse": r.s.d_mse, "d_mse_stderr": r.s.d_mse_stderr,
                "d_mse_theory": fin(r.t.d_mse), "d_prod": r.s.d_prod, "d_prod_stderr": r.s.d_prod_stderr,
                "d_prod_theory": fin(r.t.d_prod), "ip_bias": r.s.ip_bias, "ip_bias_stderr": r.s.ip_bias_stderr,
                "ip_bias_rho": r.s.ip_bias_rho, "ip_bias_rho_stderr": r.s.ip_bias_rho_stderr,
                "ip_gain": r.s.ip_gain, "ip_gain_theory": r.t.ip_gain,
            })
        })
        .collect();
    let results = json!({"distortion": js, "search": search, "eval": evals, "matrix": matrix, "kv": kv, "kv_calibrated": kv_calibrated, "kv_calibrated_window": kv_window});
    write("results.json", serde_json::to_string_pretty(&results)?.as_bytes())?;
    eprintln!("report written to {}/index.md (and index.html, results.json, *.svg)", out.display());
    Ok(())
}

/// Precisions of the report's second KV sweep, with calibrated key transforms.
const CALIBRATED: &str = "q4_0-rot,tq-mse-4-nc,k5v3-nc,k4v3-nc";
/// Precisions of the report's windowed KV sweeps (calibrated keys, an f32 sink
/// and a q8_0 recent window) at 4.5 and 3.5 bits per value.
const WINDOWED_45: &str = "tq-mse-4-nc,k5v3-nc";
const WINDOWED_35: &str = "k4v2-nc,tq-mse-3-nc";

/// A finite number as JSON, NaN/∞ (no theory) as null.
pub fn fin(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else {
        serde_json::Value::Null
    }
}

fn fmt_opt(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "—".into()
    }
}

/// Four significant digits (scientific below 0.01).
fn sig(v: f64) -> String {
    if !v.is_finite() {
        "—".into()
    } else if v.abs() < 0.01 && v != 0.0 {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn markdown(dims: &[usize], rows: &[Row], n: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# turboquant report\n");
    let _ = writeln!(
        s,
        "Distortion of every registered codec on seeded uniformly random unit vectors x, with independent \
         random unit queries q and planted queries q = ρx + √(1−ρ²)w (ρ = {DEFAULT_RHO}), n = {n} per row \
         (fewer at d = 1536: see the n column). `d_mse` = mean ‖x − x̂‖²; `d_prod·d` = d · mean (⟨q,x⟩ − est)²; \
         bias = mean(est − ⟨q,x⟩) on planted queries ± 1 standard error; gain = mean est / ρ (1 = unbiased). \
         Theory: exact Lloyd–Max distortion of the sphere's coordinate law at this d; bounds 4^−b (lower) and \
         (√3π/2)·4^−b (upper) at the nominal bits b. Rotation: randomized Hadamard unless stated.\n"
    );
    let _ = writeln!(s, "Regenerate with `cargo run --release -p tq-cli -- report`.\n");
    for &dim in dims {
        let _ = writeln!(s, "## d = {dim}\n\n![distortion vs bits, d = {dim}](distortion_d{dim}.svg)\n");
        let _ = writeln!(s, "| codec | bits/value | n | d_mse | theory | Δ% | lower 4^−b | upper | d_prod·d | theory | planted bias | gain | theory |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in rows.iter().filter(|r| r.dim == dim && r.rotation == RotationKind::Hadamard) {
            let (lo, hi) = mse_bounds(r.entry.nominal_bits());
            let d = dim as f64;
            let rel = if r.t.d_mse.is_finite() { fmt_opt(100.0 * (r.s.d_mse / r.t.d_mse - 1.0), 2) } else { "—".into() };
            let _ = writeln!(
                s,
                "| {} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} | {:+.5} ± {:.5} | {:.4} | {:.4} |",
                r.entry.name,
                r.bpv,
                r.s.n,
                sig(r.s.d_mse),
                sig(r.t.d_mse),
                rel,
                sig(lo),
                sig(hi),
                sig(r.s.d_prod * d),
                sig(r.t.d_prod * d),
                r.s.ip_bias_rho,
                r.s.ip_bias_rho_stderr,
                r.s.ip_gain,
                r.t.ip_gain
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Hadamard vs Haar rotation\n");
    let _ = writeln!(s, "| codec | d | d_mse Hadamard | d_mse Haar | difference / stderr | d_prod·d Hadamard | d_prod·d Haar |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for h in rows.iter().filter(|r| r.rotation == RotationKind::Haar) {
        if let Some(a) = rows.iter().find(|r| r.rotation == RotationKind::Hadamard && r.dim == h.dim && r.entry.id == h.entry.id) {
            let se = (a.s.d_mse_stderr.powi(2) + h.s.d_mse_stderr.powi(2)).sqrt();
            let d = h.dim as f64;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:+.2} | {} | {} |",
                h.entry.name,
                h.dim,
                sig(a.s.d_mse),
                sig(h.s.d_mse),
                (a.s.d_mse - h.s.d_mse) / se,
                sig(a.s.d_prod * d),
                sig(h.s.d_prod * d)
            );
        }
    }
    s
}

/// A minimal markdown-table-to-HTML rendering (headings, paragraphs, tables, images).
fn html(md: &str) -> String {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>turboquant report</title>\
         <style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:13px}\
         td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}</style></head><body>\n",
    );
    let mut in_table = false;
    for line in md.lines() {
        let esc = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        if line.starts_with('|') {
            if line.starts_with("|---") {
                continue;
            }
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let tag = if in_table { "td" } else { "th" };
            if !in_table {
                h.push_str("<table>\n");
                in_table = true;
            }
            h.push_str("<tr>");
            for c in cells {
                let _ = write!(h, "<{tag}>{}</{tag}>", esc(c));
            }
            h.push_str("</tr>\n");
            continue;
        }
        if in_table {
            h.push_str("</table>\n");
            in_table = false;
        }
        if let Some(t) = line.strip_prefix("## ") {
            let _ = writeln!(h, "<h2>{}</h2>", esc(t));
        } else if let Some(t) = line.strip_prefix("# ") {
            let _ = writeln!(h, "<h1>{}</h1>", esc(t));
        } else if let Some(rest) = line.strip_prefix("![") {
            if let Some((alt, src)) = rest.split_once("](") {
                let _ = writeln!(h, "<img alt=\"{}\" src=\"{}\">", esc(alt), esc(src.trim_end_matches(')')));
            }
        } else if !line.is_empty() {
            let _ = writeln!(h, "<p>{}</p>", esc(line));
        }
    }
    if in_table {
        h.push_str("</table>\n");
    }
    h.push_str("</body></html>\n");
    h
}

fn plot(out: &Path, dim: usize, rows: &[Row]) -> Result<()> {
    let path = out.join(format!("distortion_d{dim}.svg"));
    let root = SVGBackend::new(&path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("MSE distortion of unit vectors vs bits, d = {dim}"), ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.8f64..8.2f64, (1e-6f64..3.0f64).log_scale())
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart.configure_mesh().x_desc("bits per coordinate (nominal)").y_desc("E‖x − x̂‖² (log)").draw().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let bits: Vec<f64> = (1..=8).map(|b| b as f64).collect();
    let lower: Vec<(f64, f64)> = bits.iter().map(|&b| (b, mse_bounds(b).0)).collect();
    let upper: Vec<(f64, f64)> = bits.iter().map(|&b| (b, mse_bounds(b).1)).collect();
    let sel = |f: &dyn Fn(&CodecKind) -> bool| -> Vec<&Row> {
        rows.iter().filter(|r| r.dim == dim && r.rotation == RotationKind::Hadamard && f(&r.entry.kind)).collect()
    };
    let mse = sel(&|k| matches!(k, CodecKind::Mse { nc: false, .. } | CodecKind::Fractional { .. }));
    let prod = sel(&|k| matches!(k, CodecKind::Prod { orth: false, .. }));
    let mut mse_theory: Vec<(f64, f64)> = mse.iter().map(|r| (r.entry.nominal_bits(), r.t.d_mse)).collect();
    mse_theory.sort_by(|a, b| a.0.total_cmp(&b.0));
    let err = |e: plotters::drawing::DrawingAreaErrorKind<_>| anyhow::anyhow!("plot: {e}");
    chart
        .draw_series(LineSeries::new(lower, BLACK.stroke_width(1)))
        .map_err(err)?
        .label("lower bound 4^-b")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .draw_series(LineSeries::new(upper, RED.stroke_width(1)))
        .map_err(err)?
        .label("upper bound (√3π/2)·4^-b")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(LineSeries::new(mse_theory, BLUE.stroke_width(2)))
        .map_err(err)?
        .label("Lloyd–Max theory (this d)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(mse.iter().map(|r| Circle::new((r.entry.nominal_bits(), r.s.d_mse.max(1e-6)), 5, BLUE.filled())))
        .map_err(err)?
        .label("tq-mse measured (incl. 2.5, 3.5)")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, BLUE.filled()));
    chart
        .draw_series(prod.iter().map(|r| TriangleMarker::new((r.entry.nominal_bits(), r.s.d_mse.max(1e-6)), 6, GREEN.filled())))
        .map_err(err)?
        .label("tq-prod measured (decoded vector)")
        .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, GREEN.filled()));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::UpperRight).draw().map_err(err)?;
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}

/// A dataset for a report section, or `None` with the reason written to `s`:
/// datasets are fetched when possible, but MiniLM is only used once cached
/// (computing it takes about 20 minutes on 2 cores).
fn report_data(data: &str, s: &mut String) -> Result<Option<Matrix>> {
    use tq_data::datasets::{cache_dir, find};
    if data == "minilm" && !cache_dir().join(find(data)?.file).exists() {
        let _ = writeln!(
            s,
            "Skipped: the MiniLM embeddings are not cached. `tq data fetch minilm` computes them once \
             (about 20 minutes on 2 cores), after which this section runs.\n"
        );
        return Ok(None);
    }
    match crate::load_dataset(data, false) {
        Ok(m) => Ok(Some(m)),
        Err(e) => {
            let _ = writeln!(s, "Skipped: the dataset could not be loaded ({e:#}). Run `tq data fetch {data}` where the package index is reachable.\n");
            Ok(None)
        }
    }
}

/// Search configurations of the report: (label, codec, IVF lists, nprobe, queries used).
const SEARCH_CONFIGS: &[(&str, &str, Option<usize>, usize, usize)] = &[
    ("flat tq-mse-4", "tq-mse-4", None, 0, 1000),
    ("flat tq-mse-4-nc", "tq-mse-4-nc", None, 0, 1000),
    ("flat tq-mse-2-nc", "tq-mse-2-nc", None, 0, 1000),
    ("flat tq-mse-1-nc", "tq-mse-1-nc", None, 0, 1000),
    ("flat rabitq-4", "rabitq-4", None, 0, 1000),
    ("flat tq-prod-4", "tq-prod-4", None, 0, 200),
    ("flat pq-4", "pq-4", None, 0, 200),
    ("ivf256 p4 tq-mse-4-nc", "tq-mse-4-nc", Some(256), 4, 1000),
    ("ivf256 p16 tq-mse-4-nc", "tq-mse-4-nc", Some(256), 16, 1000),
    ("ivf256 p64 tq-mse-4-nc", "tq-mse-4-nc", Some(256), 64, 1000),
];

/// Recall vs query time on one dataset (fetched when possible; MiniLM only
/// when its embeddings are cached): markdown and JSON rows.
fn search_section(out: &Path, data: &str, size: Size) -> Result<(String, serde_json::Value)> {
    use tq_data::eval::{ground_truth, no_progress, run_search_bench, split, BenchArgs};
    let mut s = format!("\n## Vector search: recall vs query time ({data})\n\n");
    let Some(m) = report_data(data, &mut s)? else { return Ok((s, serde_json::Value::Null)) };
    let nq_all = size.search_queries();
    let (base, queries) = split(&m, nq_all, Some(size.base()), 0)?;
    let truth = ground_truth(&base, &queries, tq_index::Metric::Ip, None, &no_progress)?;
    let _ = writeln!(
        s,
        "Base: {} random rows × {}, {nq_all} disjoint random queries, all unit-normalized; inner product; \
         exact top-10 by f32 brute force. Query time is one thread, one query at a time; exact f32 search is timed \
         in the same run. Fast-scan codecs (tq-mse 1/2/4 bits, rabitq 1/2/4) re-score 10 candidates per result \
         exactly; tq-prod and PQ are scored exactly from their codes (fewer queries). Single runs on a shared \
         2-core VM: timings vary by about ±30%.\n",
        base.rows, base.cols
    );
    let _ = writeln!(s, "![recall vs query time](search_{data}.svg)\n");
    let _ = writeln!(s, "| index | bytes/vector | build s (1 thread) | query ms | exact f32 ms | speed-up | recall 10@10 | recall 1@10 |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    let pb = section_bar(SEARCH_CONFIGS.len(), &format!("search {data}"));
    for &(label, codec, ivf, nprobe, nq) in SEARCH_CONFIGS {
        pb.set_message(label);
        let nq = nq.min(nq_all);
        let q = Matrix { rows: nq, cols: queries.cols, data: queries.data[..nq * queries.cols].to_vec() };
        let a = BenchArgs { codec, k: 10, ivf, nprobe, rerank: 10, raw: tq_index::RawVectors::None, seed: 0 };
        let r = run_search_bench(&base, &q, &truth[..nq], &a, &no_progress)?;
        let _ = writeln!(
            s,
            "| {label} | {} | {:.3} | {:.4} | {:.3} | {:.1}× | {:.4} | {:.4} |",
            r.bytes_per_vector,
            r.build_seconds,
            r.query_ms,
            r.exact_query_ms,
            r.exact_query_ms / r.query_ms,
            r.recall_10_at_10,
            r.recall_1_at_10
        );
        rows.push(json!({"index": label, "codec": codec, "ivf_lists": ivf, "nprobe": ivf.map(|_| nprobe), "queries": nq,
            "bytes_per_vector": r.bytes_per_vector, "build_seconds": r.build_seconds, "query_ms": r.query_ms,
            "exact_query_ms": r.exact_query_ms, "qps": r.qps, "recall_10_at_10": r.recall_10_at_10, "recall_1_at_10": r.recall_1_at_10}));
        pb.inc(1);
    }
    pb.finish_and_clear();
    plot_search(out, data, &rows)?;
    Ok((s, json!(rows)))
}

/// QET, KIVI and PQ on SmolLM2's embedding matrix (a K/V-like real matrix).
fn matrix_section(size: Size) -> Result<(String, serde_json::Value)> {
    let mut s = String::from("\n## Matrix codecs on SmolLM2's token-embedding matrix\n\n");
    let Some(m) = report_data("smollm-embed", &mut s)? else { return Ok((s, serde_json::Value::Null)) };
    let rows = size.matrix_rows().min(m.rows);
    let sub = Matrix { rows, cols: m.cols, data: m.data[..rows * m.cols].to_vec() };
    let codecs: Vec<String> = ["pq-4", "qet-4", "qet-4-nores", "kivi-4", "tq-mse-4", "q4_0-rot", "pq-2", "qet-2", "qet-2-nores", "kivi-2", "tq-mse-2"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    let out = tq_data::eval::matrix_rows("smollm-embed", &sub, &codecs, 0)?;
    let _ = writeln!(
        s,
        "The first {rows} rows × {} (not normalized; `tq eval matrix --data smollm-embed --rows {rows}`). PQ and QET \
         learn their codebooks on the same rows (model bytes per collection, not in bits/value).\n",
        m.cols
    );
    let _ = writeln!(s, "| codec | groups | bits/value | model bytes | train s | rel MSE |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in &out {
        let _ = writeln!(s, "| {} | {} | {:.3} | {} | {:.2} | {} |", r.codec, r.axis, r.bits_per_value, r.model_bytes, r.train_seconds, sig(r.rel_mse));
    }
    Ok((s, json!(out)))
}

fn plot_search(out: &Path, data: &str, rows: &[serde_json::Value]) -> Result<()> {
    let path = out.join(format!("search_{data}.svg"));
    let root = SVGBackend::new(&path, (900, 600)).into_drawing_area();
    let err = |e: plotters::drawing::DrawingAreaErrorKind<_>| anyhow::anyhow!("plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let pts: Vec<(f64, f64, String)> = rows
        .iter()
        .map(|r| (r["query_ms"].as_f64().unwrap_or(1.0), r["recall_10_at_10"].as_f64().unwrap_or(0.0), r["index"].as_str().unwrap_or("").to_string()))
        .collect();
    let (lo, hi) = pts.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{data}: recall 10@10 vs query time (one thread)"), ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((lo * 0.5..hi * 2.0).log_scale(), 0.0f64..1.0f64)
        .map_err(err)?;
    chart.configure_mesh().x_desc("ms per query (log)").y_desc("recall 10@10").draw().map_err(err)?;
    chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 5, BLUE.filled()))).map_err(err)?;
    chart.draw_series(pts.iter().map(|p| Text::new(p.2.clone(), (p.0 * 1.05, p.1 + 0.015), ("sans-serif", 12)))).map_err(err)?;
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}

/// A progress bar for one report section ("what is running, how long is left").
fn section_bar(n: usize, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(n as u64);
    let style = format!("{what} {{msg:24}} [{{bar:30}}] {{pos}}/{{len}} ({{eta}})");
    pb.set_style(indicatif::ProgressStyle::with_template(&style).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()).progress_chars("=> "));
    pb
}

/// Codecs of the report's side-by-side evaluation, grouped by bit class.
const EVAL_CODECS: &[&str] = &[
    "tq-mse-1",
    "tq-mse-1-nc",
    "rabitq-1",
    "pq-1",
    "tq-mse-2",
    "tq-mse-2-nc",
    "rabitq-2",
    "pq-2",
    "tq-mse-3",
    "tq-mse-3-nc",
    "tq-mse-3.5",
    "rabitq-3",
    "tq-mse-4",
    "tq-mse-4-nc",
    "tq-prod-4",
    "rabitq-4",
    "pq-4",
    "q4_0",
    "q4_0-rot",
    "mxfp4",
    "nvfp4",
    "polar-4",
    "q8_0-rot",
];
const EVAL_QUERIES: usize = 300;

/// Every codec on one dataset: recall and relative MSE against bits per value.
fn eval_section(out: &Path, data: &str, size: Size) -> Result<(String, serde_json::Value)> {
    use tq_data::eval::{eval_codec, ground_truth, no_progress, split};
    let mut s = format!("\n## Codecs side by side on {data}\n\n");
    let Some(m) = report_data(data, &mut s)? else { return Ok((s, serde_json::Value::Null)) };
    let nq = size.eval_queries();
    let nb = size.base().min(m.rows.saturating_sub(nq));
    let (base, queries) = split(&m, nq, Some(nb), 0)?;
    let truth = ground_truth(&base, &queries, tq_index::Metric::Ip, None, &no_progress)?;
    let _ = writeln!(
        s,
        "{} base vectors × {}, {} disjoint queries, unit-normalized, inner product (`tq eval vectors`). Recall ranks \
         by each codec's own estimator over all codes (exact scorer, no fast-scan); rel MSE = mean ‖x − x̂‖²/‖x‖² of \
         `decode` (for tq-prod and RaBitQ the decoded vector is the estimator's, not the MSE-optimal one). \
         bits/value include every per-vector overhead; PQ's codebooks (1 KiB per dimension) are per collection.\n",
        base.rows, base.cols, queries.rows
    );
    let _ = writeln!(s, "![recall vs bits](eval_{data}_recall.svg) ![rel MSE vs bits](eval_{data}_mse.svg)\n");
    let _ = writeln!(s, "| codec | bits/value | train s | encode s | rel MSE | ip rmse | ip bias | recall 1@10 | recall 10@10 | scan ms |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    let pb = section_bar(EVAL_CODECS.len(), &format!("codecs on {data}"));
    let mut rows = Vec::new();
    for c in EVAL_CODECS {
        pb.set_message(*c);
        let r = eval_codec(c, data, &base, &queries, &truth, tq_index::Metric::Ip, 0)?;
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.2} | {:.2} | {} | {} | {:+.5} | {:.4} | {:.4} | {:.2} |",
            r.codec,
            r.bits_per_value,
            r.train_seconds,
            r.encode_seconds,
            sig(r.rel_mse),
            sig(r.ip_rmse),
            r.ip_bias,
            r.recall_1_at_10,
            r.recall_10_at_10,
            r.query_ms
        );
        rows.push(json!(r));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let pts = |key: &str| -> Vec<(f64, f64, String)> {
        rows.iter()
            .map(|r| (r["bits_per_value"].as_f64().unwrap_or(0.0), r[key].as_f64().unwrap_or(0.0), r["codec"].as_str().unwrap_or("").to_string()))
            .collect()
    };
    scatter(&out.join(format!("eval_{data}_recall.svg")), &format!("{data}: recall 10@10 vs bits per value"), "recall 10@10", &pts("recall_10_at_10"), false)?;
    scatter(&out.join(format!("eval_{data}_mse.svg")), &format!("{data}: relative MSE vs bits per value"), "rel MSE (log)", &pts("rel_mse"), true)?;
    Ok((s, json!(rows)))
}

/// A labelled scatter plot of (bits per value, y).
fn scatter(path: &Path, title: &str, ylabel: &str, pts: &[(f64, f64, String)], log_y: bool) -> Result<()> {
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    let err = |e: plotters::drawing::DrawingAreaErrorKind<_>| anyhow::anyhow!("plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let xmax = pts.iter().fold(1.0f64, |m, p| m.max(p.0)) * 1.1;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 20)).margin(15).x_label_area_size(45).y_label_area_size(70);
    let color = |c: &str| if c.starts_with("tq-") { BLUE } else { RED };
    let label = |p: &(f64, f64, String)| Text::new(p.2.clone(), (p.0 * 1.01, p.1), ("sans-serif", 11));
    if log_y {
        let lo = pts.iter().map(|p| p.1).filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min).max(1e-6);
        let hi = pts.iter().fold(0.0f64, |m, p| m.max(p.1)).max(lo * 10.0);
        let mut chart = b.build_cartesian_2d(0.0..xmax, (lo * 0.5..hi * 2.0).log_scale()).map_err(err)?;
        chart.configure_mesh().x_desc("bits per value (all overheads)").y_desc(ylabel).draw().map_err(err)?;
        chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1.max(lo)), 4, color(&p.2).filled()))).map_err(err)?;
        chart.draw_series(pts.iter().map(label)).map_err(err)?;
    } else {
        let mut chart = b.build_cartesian_2d(0.0..xmax, 0.0f64..1.0f64).map_err(err)?;
        chart.configure_mesh().x_desc("bits per value (all overheads)").y_desc(ylabel).draw().map_err(err)?;
        chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, color(&p.2).filled()))).map_err(err)?;
        chart.draw_series(pts.iter().map(label)).map_err(err)?;
    }
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}
