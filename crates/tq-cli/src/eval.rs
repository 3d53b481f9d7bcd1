//! `tq eval vectors`: every codec on the same real vectors, side by side.
//!
//! The dataset is split (seeded) into a base and disjoint held-out queries,
//! all unit-normalized. Exact ground truth (top 10 by the metric, f32 brute
//! force) is cached in the data directory. Each codec is trained where it
//! learns from data (on at most 100,000 base rows), encodes the base, and is
//! measured by its own estimator on the codes: recall comes from a brute-force
//! scan that scores every code exactly with the codec's scorer (no fast-scan
//! pre-ranking, no decoding to f32).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::json;
use tq_core::RotationKind;
use tq_index::{FlatIndex, IndexSpec, Metric, SearchParams};

use crate::files::Matrix;
use crate::index::split;

const TRAIN_ROWS: usize = 100_000;
/// Base vectors and queries used for the inner-product error statistics.
const IP_BASE: usize = 1000;
const IP_QUERIES: usize = 100;

pub struct EvalArgs<'a> {
    pub data: &'a str,
    pub codecs: Vec<String>,
    pub n_base: usize,
    pub n_queries: usize,
    pub metric: Metric,
    pub seed: u64,
    pub json: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalRow {
    pub codec: String,
    pub data: String,
    pub dim: usize,
    pub n_base: usize,
    pub n_queries: usize,
    pub metric: &'static str,
    pub bits_per_value: f64,
    /// Codebook / centre bytes per collection (PQ codebooks, RaBitQ centre).
    pub model_bytes: usize,
    pub train_seconds: f64,
    pub encode_seconds: f64,
    pub rel_mse: f64,
    pub ip_rmse: f64,
    pub ip_bias: f64,
    pub recall_1_at_10: f64,
    pub recall_10_at_10: f64,
    pub query_ms: f64,
}

fn truth_path(a: &EvalArgs<'_>) -> PathBuf {
    crate::data::cache_dir().join(format!(
        "truth-{}-{}-{}-{}-{}.bin",
        a.data,
        a.n_base,
        a.n_queries,
        a.seed,
        a.metric.name()
    ))
}

/// Exact top-10 ids per query (`crate::index::exact_topk`, all threads), from
/// the cache file when given and present; a progress bar unless `quiet`.
pub fn ground_truth(base: &Matrix, queries: &Matrix, metric: Metric, cache: Option<&PathBuf>, quiet: bool) -> Result<Vec<Vec<u64>>> {
    if let Some(p) = cache {
        if let Ok(b) = std::fs::read(p) {
            if b.len() == queries.rows * 80 {
                return Ok(b
                    .chunks_exact(80)
                    .map(|r| r.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))).collect())
                    .collect());
            }
        }
    }
    let pb = crate::index::bar(queries.rows, "exact ground truth", quiet);
    let truth: Vec<Vec<u64>> = queries
        .data
        .par_chunks(queries.cols)
        .map(|q| {
            let r = crate::index::exact_topk(base, q, 10, metric);
            pb.inc(1);
            r
        })
        .collect();
    pb.finish_and_clear();
    if let Some(p) = cache {
        if truth.iter().all(|t| t.len() == 10) {
            let bytes: Vec<u8> = truth.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
            // a cache: failing to write it is not an error
            let _ = crate::files::write_atomic(p, &bytes);
        }
    }
    Ok(truth)
}

/// Evaluates one codec on a prepared split.
pub fn eval_codec(name: &str, data: &str, base: &Matrix, queries: &Matrix, truth: &[Vec<u64>], metric: Metric, seed: u64) -> Result<EvalRow> {
    let dim = base.cols;
    let spec = IndexSpec { codec: name.to_string(), dim, seed, rotation: RotationKind::Hadamard, metric, params: Vec::new(), raw: tq_index::RawVectors::None };
    let mut idx = FlatIndex::new(spec)?;
    let t = Instant::now();
    if idx.codec().wants_training() {
        idx.train(&base.data[..dim * base.rows.min(TRAIN_ROWS)])?;
    }
    let train_seconds = t.elapsed().as_secs_f64();
    let ids: Vec<u64> = (0..base.rows as u64).collect();
    let t = Instant::now();
    let codes = idx.encode(&ids, &base.data)?;
    let encode_seconds = t.elapsed().as_secs_f64();
    idx.add_codes(&ids, &codes)?;
    let c = idx.codec();
    let cs = c.code_size();
    // reconstruction
    let mut dec = vec![0.0f32; base.data.len()];
    c.decode_batch(&codes, &mut dec)?;
    let (mut err, mut nrm) = (0.0f64, 0.0f64);
    for (a, b) in base.data.iter().zip(&dec) {
        err += (*a as f64 - *b as f64).powi(2);
        nrm += (*a as f64).powi(2);
    }
    // inner-product estimator on (query, base) pairs
    let (mut e1, mut e2, mut ne) = (0.0f64, 0.0f64, 0.0f64);
    for q in queries.data.chunks_exact(dim).take(IP_QUERIES) {
        let pq = c.prepare(q)?;
        for (x, code) in base.data.chunks_exact(dim).zip(codes.chunks_exact(cs)).take(IP_BASE) {
            let e = c.score_ip(&pq, code) as f64 - (tq_core::kernels::kernels().dot)(q, x) as f64;
            e1 += e;
            e2 += e * e;
            ne += 1.0;
        }
    }
    // recall by brute force over the codes with the codec's scorer, one thread
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let p = SearchParams { exact: true, ..Default::default() };
    let t = Instant::now();
    let res = one.install(|| -> Result<Vec<_>> {
        queries.data.chunks_exact(dim).map(|q| idx.search(q, 10, &p).map_err(anyhow::Error::from)).collect()
    })?;
    let query_ms = t.elapsed().as_secs_f64() * 1e3 / queries.rows as f64;
    let (mut r1, mut r10) = (0.0, 0.0);
    for (hits, tr) in res.iter().zip(truth) {
        let got: HashSet<u64> = hits.iter().map(|h| h.id).collect();
        r10 += tr.iter().filter(|i| got.contains(i)).count() as f64 / tr.len() as f64;
        r1 += got.contains(&tr[0]) as u8 as f64;
    }
    let nq = queries.rows as f64;
    Ok(EvalRow {
        codec: name.to_string(),
        data: data.to_string(),
        dim,
        n_base: base.rows,
        n_queries: queries.rows,
        metric: metric.name(),
        bits_per_value: c.bits_per_value(),
        model_bytes: c.params().len(),
        train_seconds,
        encode_seconds,
        rel_mse: err / nrm,
        ip_rmse: (e2 / ne).sqrt(),
        ip_bias: e1 / ne,
        recall_1_at_10: r1 / nq,
        recall_10_at_10: r10 / nq,
        query_ms,
    })
}

pub fn vectors(a: &EvalArgs<'_>) -> Result<()> {
    if a.codecs.is_empty() {
        bail!("--codecs is empty");
    }
    for c in &a.codecs {
        tq_core::lookup(c)?;
    }
    let m = crate::data::load(a.data, a.json)?;
    let (base, queries) = split(&m, a.n_queries, Some(a.n_base), a.seed)?;
    let truth = ground_truth(&base, &queries, a.metric, Some(&truth_path(a)), a.json).context("ground truth")?;
    if !a.json {
        println!(
            "{} base {} × {}, {} queries, unit vectors, metric {}",
            a.data,
            base.rows,
            base.cols,
            queries.rows,
            a.metric.name()
        );
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
                r.codec,
                r.bits_per_value,
                r.train_seconds,
                r.encode_seconds,
                r.rel_mse,
                r.ip_rmse,
                r.ip_bias,
                r.recall_1_at_10,
                r.recall_10_at_10,
                r.query_ms
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// tq eval matrix
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, serde::Serialize)]
pub struct MatrixRow {
    pub codec: String,
    pub axis: &'static str,
    pub data: String,
    pub rows: usize,
    pub channels: usize,
    pub bits_per_value: f64,
    pub model_bytes: usize,
    pub train_seconds: f64,
    pub encode_seconds: f64,
    pub rel_mse: f64,
}

/// Every codec on one real matrix (rows = tokens), by relative MSE.
pub fn matrix_rows(data: &str, m: &Matrix, codecs: &[String], seed: u64) -> Result<Vec<MatrixRow>> {
    use tq_core::matrix::{build_matrix, Axis};
    let mut out = Vec::new();
    let nrm: f64 = m.data.iter().map(|&x| x as f64 * x as f64).sum();
    for name in codecs {
        let axes: &[(Axis, &'static str)] = if name.starts_with("kivi-") {
            &[(Axis::PerChannel, "per channel (keys)"), (Axis::PerToken, "per token (values)")]
        } else {
            &[(Axis::PerChannel, "rows")]
        };
        for &(axis, label) in axes {
            let mut c = build_matrix(name, m.cols, axis, seed)?;
            let t = Instant::now();
            c.train(&m.data)?;
            let train_seconds = t.elapsed().as_secs_f64();
            let mut code = vec![0u8; c.encoded_size(m.rows)];
            let t = Instant::now();
            c.encode(&m.data, &mut code)?;
            let encode_seconds = t.elapsed().as_secs_f64();
            let mut dec = vec![0.0f32; m.data.len()];
            c.decode(&code, m.rows, &mut dec)?;
            let err: f64 = m.data.iter().zip(&dec).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
            out.push(MatrixRow {
                codec: name.clone(),
                axis: label,
                data: data.to_string(),
                rows: m.rows,
                channels: m.cols,
                bits_per_value: c.bits_per_value(m.rows),
                model_bytes: c.model_bytes(),
                train_seconds,
                encode_seconds,
                rel_mse: err / nrm,
            });
        }
    }
    Ok(out)
}

pub fn matrix(data: &str, codecs: Vec<String>, rows: Option<usize>, seed: u64, json: bool) -> Result<()> {
    if codecs.is_empty() {
        bail!("--codecs is empty");
    }
    let mut m = crate::data::load(data, json)?;
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
