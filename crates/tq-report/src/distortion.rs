//! The distortion part: every TurboQuant codec against its exact Lloyd–Max
//! theory and the paper's bounds, Hadamard against Haar.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde_json::json;
use tq_core::eval::{measure_distortion, mse_bounds, theory, DistortionStats, Theory, DEFAULT_RHO};
use tq_core::{registry, CodecEntry, CodecKind, RotationKind};

use crate::plot::perr;
use crate::{fin, sig, Progress, Result};

/// One measured (codec, dim, rotation).
pub(crate) struct Row {
    entry: &'static CodecEntry,
    dim: usize,
    rotation: RotationKind,
    bpv: f64,
    s: DistortionStats,
    t: Theory,
}

/// Vectors for a (codec, dim) task: the dense O(dim²) Gaussian QJL at 1536 is the slow case.
fn task_n(entry: &CodecEntry, dim: usize, n: usize) -> usize {
    match (dim, entry.kind) {
        (d, CodecKind::Prod { orth: false, .. }) if d >= 1024 => (n / 20).max(200),
        (d, _) if d >= 1024 => (n / 4).max(200),
        _ => n,
    }
}

/// Measures every TurboQuant codec at `dims` (Hadamard) and five at one dim with Haar.
pub(crate) fn measure(n: usize, dims: &[usize], quick: bool, progress: &dyn Progress) -> Result<Vec<Row>> {
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
    progress.stage("distortion", total as u64, "vectors");
    let mut rows = Vec::new();
    for (entry, dim, rotation, tn) in tasks {
        progress.message(&format!("{} d={} {}", entry.name, dim, rotation.name()));
        let codec = entry.build(dim, 42, rotation, &[])?;
        let s = measure_distortion(codec.as_ref(), tn, 7, DEFAULT_RHO, &|k| progress.inc(k as u64))?;
        rows.push(Row { entry, dim, rotation, bpv: codec.bits_per_value(), s, t: theory(entry, dim) });
    }
    progress.finish();
    Ok(rows)
}

/// The fields of one measurement as `results.json` and `tq distortion --json` have them.
fn stats_json(codec: &str, dim: usize, rotation: RotationKind, bpv: f64, s: &DistortionStats, t: &Theory) -> serde_json::Value {
    json!({
        "codec": codec, "dim": dim, "rotation": rotation.name(), "n": s.n,
        "bits_per_value": bpv, "d_mse": s.d_mse, "d_mse_stderr": s.d_mse_stderr,
        "d_mse_theory": fin(t.d_mse), "d_prod": s.d_prod, "d_prod_stderr": s.d_prod_stderr,
        "d_prod_theory": fin(t.d_prod), "ip_bias": s.ip_bias, "ip_bias_stderr": s.ip_bias_stderr,
        "ip_bias_rho": s.ip_bias_rho, "ip_bias_rho_stderr": s.ip_bias_rho_stderr,
        "ip_gain": s.ip_gain, "ip_gain_theory": t.ip_gain,
    })
}

/// The rows as `results.json` has them.
pub(crate) fn json_rows(rows: &[Row]) -> Vec<serde_json::Value> {
    rows.iter().map(|r| stats_json(&r.entry.name, r.dim, r.rotation, r.bpv, &r.s, &r.t)).collect()
}

/// `tq distortion`: one codec at one dim, `n` seeded random unit vectors (codecs
/// that learn from data train on independent ones), against its theory. The
/// result has the fields of the report's rows plus `seed` and `rho`.
pub fn distortion(name: &str, dim: usize, n: usize, seed: u64, rotation: RotationKind, progress: &dyn Progress) -> Result<serde_json::Value> {
    if n < 2 {
        return Err(crate::ReportError::Invalid(format!("--n must be at least 2 (got {n})")));
    }
    let entry = tq_core::lookup(name)?;
    let mut codec = entry.build(dim, seed, rotation, &[])?;
    tq_core::eval::train_on_unit_vectors(codec.as_mut(), n.min(20_000), seed)?;
    progress.stage(&format!("distortion {name} d={dim}"), n as u64, "vectors");
    let s = measure_distortion(codec.as_ref(), n, seed.wrapping_add(1), DEFAULT_RHO, &|k| progress.inc(k as u64));
    progress.finish();
    let s = s?;
    let mut v = stats_json(name, dim, rotation, codec.bits_per_value(), &s, &theory(entry, dim));
    v["seed"] = json!(seed);
    v["rho"] = json!(s.rho);
    Ok(v)
}

fn fmt_opt(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "—".into()
    }
}

pub(crate) fn markdown(dims: &[usize], rows: &[Row], n: usize) -> String {
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

pub(crate) fn plot(out: &Path, dim: usize, rows: &[Row]) -> Result<()> {
    let path = out.join(format!("distortion_d{dim}.svg"));
    let root = SVGBackend::new(&path, (900, 600)).into_drawing_area();
    let err = perr(&path);
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("MSE distortion of unit vectors vs bits, d = {dim}"), ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.8f64..8.2f64, (1e-6f64..3.0f64).log_scale())
        .map_err(&err)?;
    chart.configure_mesh().x_desc("bits per coordinate (nominal)").y_desc("E‖x − x̂‖² (log)").draw().map_err(&err)?;
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
    chart
        .draw_series(LineSeries::new(lower, BLACK.stroke_width(1)))
        .map_err(&err)?
        .label("lower bound 4^-b")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .draw_series(LineSeries::new(upper, RED.stroke_width(1)))
        .map_err(&err)?
        .label("upper bound (√3π/2)·4^-b")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(LineSeries::new(mse_theory, BLUE.stroke_width(2)))
        .map_err(&err)?
        .label("Lloyd–Max theory (this d)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(mse.iter().map(|r| Circle::new((r.entry.nominal_bits(), r.s.d_mse.max(1e-6)), 5, BLUE.filled())))
        .map_err(&err)?
        .label("tq-mse measured (incl. 2.5, 3.5)")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, BLUE.filled()));
    chart
        .draw_series(prod.iter().map(|r| TriangleMarker::new((r.entry.nominal_bits(), r.s.d_mse.max(1e-6)), 6, GREEN.filled())))
        .map_err(&err)?
        .label("tq-prod measured (decoded vector)")
        .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, GREEN.filled()));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::UpperRight).draw().map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}
