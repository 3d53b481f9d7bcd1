//! Rendering: the markdown-to-HTML page and the SVG plots.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::{ReportError, Result};

/// A plotting error as a [`ReportError`] naming the file.
pub(crate) fn perr<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> ReportError + '_ {
    move |e| ReportError::Plot { path: path.display().to_string(), msg: e.to_string() }
}

/// A minimal markdown-table-to-HTML rendering (headings, paragraphs, tables, images).
pub(crate) fn html(md: &str) -> String {
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

pub(crate) fn plot_search(out: &Path, data: &str, rows: &[serde_json::Value]) -> Result<()> {
    let path = out.join(format!("search_{data}.svg"));
    let root = SVGBackend::new(&path, (900, 600)).into_drawing_area();
    let err = perr(&path);
    root.fill(&WHITE).map_err(&err)?;
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
        .map_err(&err)?;
    chart.configure_mesh().x_desc("ms per query (log)").y_desc("recall 10@10").draw().map_err(&err)?;
    chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 5, BLUE.filled()))).map_err(&err)?;
    chart.draw_series(pts.iter().map(|p| Text::new(p.2.clone(), (p.0 * 1.05, p.1 + 0.015), ("sans-serif", 12)))).map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

/// A labelled scatter plot of (bits per value, y).
pub(crate) fn scatter(path: &Path, title: &str, ylabel: &str, pts: &[(f64, f64, String)], log_y: bool) -> Result<()> {
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    let err = perr(path);
    root.fill(&WHITE).map_err(&err)?;
    let xmax = pts.iter().fold(1.0f64, |m, p| m.max(p.0)) * 1.1;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 20)).margin(15).x_label_area_size(45).y_label_area_size(70);
    let color = |c: &str| if c.starts_with("tq-") { BLUE } else { RED };
    let label = |p: &(f64, f64, String)| Text::new(p.2.clone(), (p.0 * 1.01, p.1), ("sans-serif", 11));
    if log_y {
        let lo = pts.iter().map(|p| p.1).filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min).max(1e-6);
        let hi = pts.iter().fold(0.0f64, |m, p| m.max(p.1)).max(lo * 10.0);
        let mut chart = b.build_cartesian_2d(0.0..xmax, (lo * 0.5..hi * 2.0).log_scale()).map_err(&err)?;
        chart.configure_mesh().x_desc("bits per value (all overheads)").y_desc(ylabel).draw().map_err(&err)?;
        chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1.max(lo)), 4, color(&p.2).filled()))).map_err(&err)?;
        chart.draw_series(pts.iter().map(label)).map_err(&err)?;
    } else {
        let mut chart = b.build_cartesian_2d(0.0..xmax, 0.0f64..1.0f64).map_err(&err)?;
        chart.configure_mesh().x_desc("bits per value (all overheads)").y_desc(ylabel).draw().map_err(&err)?;
        chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, color(&p.2).filled()))).map_err(&err)?;
        chart.draw_series(pts.iter().map(label)).map_err(&err)?;
    }
    root.present().map_err(&err)?;
    Ok(())
}

/// KLD and ΔPPL against bits per value of a KV sweep.
pub(crate) fn plot_sweep(path: &Path, text: &str, rows: &[serde_json::Value]) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    let err = perr(path);
    root.fill(&WHITE).map_err(&err)?;
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
        .map_err(&err)?;
    c.configure_mesh().x_desc("bits per value").y_desc("KLD vs f32 cache (log)").draw().map_err(&err)?;
    c.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, BLUE.filled()))).map_err(&err)?;
    c.draw_series(pts.iter().map(|p| Text::new(p.3.clone(), (p.0 + 0.1, p.1), ("sans-serif", 11)))).map_err(&err)?;
    let dmax = pts.iter().map(|p| p.2).filter(|v| v.is_finite()).fold(1.0f64, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&right)
        .caption(format!("{text}: ΔPPL vs bits/value"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, -1.0..dmax)
        .map_err(&err)?;
    c.configure_mesh().x_desc("bits per value").y_desc("ΔPPL vs f32 cache (%)").draw().map_err(&err)?;
    c.draw_series(pts.iter().map(|p| Circle::new((p.0, p.2), 4, RED.filled()))).map_err(&err)?;
    c.draw_series(pts.iter().map(|p| Text::new(p.3.clone(), (p.0 + 0.1, p.2), ("sans-serif", 11)))).map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}
