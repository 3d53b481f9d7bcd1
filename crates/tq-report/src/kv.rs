//! KV-cache sweeps: perplexity and KLD of many precisions in one pass over a
//! text, as a Pareto table and a plot; the report's KV section.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use tq_kv::{CacheOptions, KvSpec};
use tq_llm::eval::{self, PplConfig, Runtime};

use crate::plot::plot_sweep;
use crate::{create_dir, ModelSource, Progress, Result, Size};

/// Precisions of `tq kv sweep` by default (and of the report's KV section).
pub const SWEEP: &str =
    "f16,q8_0-rot,k8v4,k5v4,q4_0-rot,q4_0,kivi-4,tq-mse-4,tq-mse-4-nc,nvfp4,tq-prod-4,k5v3,k4v3,tq-mse-3.5,tq-mse-3,kivi-2,tq-mse-2.5,tq-mse-2";

/// Perplexity and KLD of every precision on `cfg`'s text in one pass, as a
/// markdown Pareto table (sorted by bits per value) and an SVG of KLD and
/// ΔPPL against bits per value in `out`. Returns (markdown, rows).
pub fn sweep(rt: &Runtime, cfg: &PplConfig<'_>, precisions: &[KvSpec], out: &Path, progress: &dyn Progress) -> Result<(String, Vec<serde_json::Value>)> {
    let (text, chars, ctx, chunks, opts, seed) = (cfg.text, cfg.chars, cfg.ctx, cfg.chunks, &cfg.opts, cfg.seed);
    let body = eval::ppl_text(cfg, true)?;
    progress.stage(&format!("kv sweep, {} precisions", precisions.len()), chunks as u64, "chunks");
    let rows = eval::perplexity(rt, cfg, &body, precisions, &|k| progress.set(k as u64), &eval::quiet);
    progress.finish();
    let mut rows = rows?;
    rows.sort_by(|a, b| a["bits_per_value"].as_f64().unwrap_or(0.0).total_cmp(&b["bits_per_value"].as_f64().unwrap_or(0.0)));
    create_dir(out)?;
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
        "`tq kv sweep --text {text} --chars {chars} --ctx {ctx} --chunks {chunks}`: SmolLM2-135M, llama.cpp's perplexity convention; KLD and top-1 \
         against the f32 cache on the same tokens{win}. Differences below about 1% ΔPPL are within the run-to-run \
         sensitivity of quantized caches (see docs/kv-cache.md).\n\n![KLD and ΔPPL vs bits per value]({svg})\n"
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

/// Precisions of the report's second KV sweep, with calibrated key transforms.
const CALIBRATED: &str = "q4_0-rot,tq-mse-4-nc,k5v3-nc,k4v3-nc";
/// Precisions of the report's windowed KV sweeps (calibrated keys, an f32 sink
/// and a q8_0 recent window) at 4.5 and 3.5 bits per value.
const WINDOWED_45: &str = "tq-mse-4-nc,k5v3-nc";
const WINDOWED_35: &str = "k4v2-nc,tq-mse-3-nc";

fn specs(list: &str) -> Result<Vec<KvSpec>> {
    Ok(list.split(',').map(str::parse).collect::<tq_core::Result<Vec<KvSpec>>>()?)
}

/// The report's KV section: the sweep on Austen, then around 4.5 and 3.5
/// bits with key transforms calibrated on Shakespeare, with and without
/// windows. Returns the markdown and the `results.json` entries.
pub(crate) fn report_section(
    out: &Path,
    size: Size,
    model: ModelSource<'_>,
    progress: &dyn Progress,
) -> Result<(String, Vec<(&'static str, serde_json::Value)>)> {
    let mut md = String::from("\n## KV-cache precisions in SmolLM2 (Austen)\n\n");
    let chunks = size.kv_chunks();
    let cfg = |opts: CacheOptions| PplConfig { text: "austen", chars: 200_000, ctx: 512, chunks, opts, seed: 0 };
    let first = model().map_err(Into::into).and_then(|rt| sweep(rt, &cfg(CacheOptions::default()), &specs(SWEEP)?, out, progress).map(|r| (rt, r)));
    let (rt, (text, rows)) = match first {
        Ok(v) => v,
        // like the other real-data sections: say why, keep the report
        Err(e) => {
            md.push_str(&format!("Skipped: {e:#}.\n"));
            return Ok((md, Vec::new()));
        }
    };
    md.push_str(&text);
    let mut results = vec![("kv", json!(rows))];
    // around 4.5 bits with key transforms calibrated on another text (exact for attention)
    let calibrated = || -> Result<(String, serde_json::Value, serde_json::Value)> {
        progress.stage("calibrating keys on shakespeare", 0, "");
        let cal = eval::calibrate(rt, "shakespeare", size.calib_chunks(), 512, eval::CALIB_SHRINK, true, &eval::quiet);
        progress.finish();
        let opts = CacheOptions { calibration: Some(Arc::new(cal?)), ..Default::default() };
        let (ctext, crows) = sweep(rt, &cfg(opts.clone()), &specs(CALIBRATED)?, out, progress)?;
        let mut md = format!("\n### Keys through transforms calibrated on Shakespeare (`--calib-text shakespeare`)\n\n{ctext}");
        // and with the first token in f32 and a recent window of q8_0 codes that fit
        // 4.5 and 3.5 bits per value at ctx 512 (every byte counted)
        let mut wrows = Vec::new();
        for (list, recent, bits) in [(WINDOWED_45, 22, "4.5"), (WINDOWED_35, 18, "3.5")] {
            let wopts = CacheOptions { sink: 1, recent, recent_q8: true, delayed: true, ..opts.clone() };
            let (wtext, rows) = sweep(rt, &cfg(wopts), &specs(list)?, out, progress)?;
            let _ = write!(
                md,
                "\n### Calibrated keys, token 0 in f32 and {recent} recent tokens as q8_0 (`--sink 1 --recent {recent} --recent-q8 --delayed`: {bits} bits per value at ctx 512)\n\n{wtext}"
            );
            wrows.extend(rows);
        }
        Ok((md, json!(crows), json!(wrows)))
    };
    match calibrated() {
        Ok((text, c, w)) => {
            md.push_str(&text);
            results.push(("kv_calibrated", c));
            results.push(("kv_calibrated_window", w));
        }
        Err(e) => md.push_str(&format!("\nCalibrated sweeps skipped: {e:#}.\n")),
    }
    Ok((md, results))
}
