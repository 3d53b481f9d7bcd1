//! `tq eval vectors`: every codec on the same real vectors, side by side.
//!
//! The dataset is split (seeded) into a base and disjoint held-out queries,
//! all unit-normalized. Exact ground truth (top 10 by the metric, f32 brute
//! force) is cached in the data directory. Each codec is trained where it
//! learns from data (on at most 100,000 base rows), encodes the base, and is
//! measured by its own estimator on the codes: recall comes from a brute-force
//! scan that scores every code exactly with the codec's scorer (no fast-scan
//! pre-ranking, no decoding to f32).

use anyhow::{bail, Context, Result};
use serde_json::json;
use tq_data::eval::{eval_codec, ground_truth, matrix_rows, split, truth_cache_path};
use tq_index::Metric;

pub struct EvalArgs<'a> {
    pub data: &'a str,
    pub codecs: Vec<String>,
    pub n_base: usize,
    pub n_queries: usize,
    pub metric: Metric,
    pub seed: u64,
    pub json: bool,
}

pub fn vectors(a: &EvalArgs<'_>) -> Result<()> {
    if a.codecs.is_empty() {
        bail!("--codecs is empty");
    }
    for c in &a.codecs {
        tq_core::lookup(c)?;
    }
    let m = crate::load_dataset(a.data, a.json)?;
    let (base, queries) = split(&m, a.n_queries, Some(a.n_base), a.seed)?;
    let pb = crate::index::bar(queries.rows, "exact ground truth", a.json);
    let cache = truth_cache_path(a.data, a.n_base, a.n_queries, a.seed, a.metric);
    let truth = ground_truth(&base, &queries, a.metric, Some(&cache), &|k| pb.inc(k as u64)).context("ground truth")?;
    pb.finish_and_clear();
    if !a.json {
        println!("{} base {} × {}, {} queries, unit vectors, metric {}", a.data, base.rows, base.cols, queries.rows, a.metric.name());
        println!(
            "{:<14} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9}",
            "codec", "bits/val", "train s", "encode s", "rel_mse", "ip_rmse", "ip_bias", "R1@10", "R10@10", "query ms"
        );
    }
    for c in &a.codecs {
        let r = eval_codec(c, a.data, &base, &queries, &truth, a.metric, a.seed)?;
        if a.json {
            println!("{}", serde_json::to_string(&json!(r))?);
        } else {
            println!(
                "{:<14} {:>8.3} {:>9.3} {:>9.3} {:>9.5} {:>9.5} {:>+9.5} {:>8.4} {:>8.4} {:>9.3}",
                r.codec, r.bits_per_value, r.train_seconds, r.encode_seconds, r.rel_mse, r.ip_rmse, r.ip_bias, r.recall_1_at_10, r.recall_10_at_10, r.query_ms
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// tq eval matrix
// ---------------------------------------------------------------------------

pub fn matrix(data: &str, codecs: Vec<String>, rows: Option<usize>, seed: u64, json: bool) -> Result<()> {
    if codecs.is_empty() {
        bail!("--codecs is empty");
    }
    let mut m = crate::load_dataset(data, json)?;
    if let Some(r) = rows {
        let r = r.min(m.rows);
        m.data.truncate(r * m.cols);
        m.rows = r;
    }
    let out = matrix_rows(data, &m, &codecs, seed)?;
    if json {
        for r in &out {
            println!("{}", serde_json::to_string(&json!(r))?);
        }
    } else {
        println!("{data}: {} rows × {} channels (not normalized); rel MSE = ‖M − M̂‖²/‖M‖²", m.rows, m.cols);
        println!("{:<16} {:<20} {:>9} {:>12} {:>9} {:>10}", "codec", "groups", "bits/val", "model bytes", "train s", "rel MSE");
        for r in &out {
            println!("{:<16} {:<20} {:>9.3} {:>12} {:>9.2} {:>10.5}", r.codec, r.axis, r.bits_per_value, r.model_bytes, r.train_seconds, r.rel_mse);
        }
    }
    Ok(())
}
