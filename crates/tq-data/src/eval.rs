//! The vector evaluations shared by `tq eval`, `tq bench search`, the report
//! and the tests: seeded base/query splits, exact ground truth, every codec on
//! the same vectors side by side (each measured by its own estimator on the
//! codes: recall from a brute-force scan that scores every code exactly with
//! the codec's scorer, no fast-scan pre-ranking, no decoding to f32), the
//! matrix codecs on one matrix, and the search benchmark.
//!
//! Nothing here prints: long loops report progress through a [`Progress`]
//! callback (the CLI draws bars with it).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;
use tq_core::RotationKind;
use tq_index::file::AnyIndex;
use tq_index::{FlatIndex, IndexSpec, IvfIndex, Metric, RawVectors, SearchParams};

use crate::error::{bail, Context, Result};
use crate::vectors::Matrix;

/// Progress of a long loop: called with the number of items just finished,
/// from any thread.
pub type Progress<'a> = &'a (dyn Fn(usize) + Sync);

/// A [`Progress`] that reports nothing.
pub fn no_progress(_: usize) {}

/// Rows a codec that learns from data is trained on (at most).
pub const TRAIN_ROWS: usize = 100_000;
/// Base vectors and queries used for the inner-product error statistics.
const IP_BASE: usize = 1000;
const IP_QUERIES: usize = 100;
/// Vectors encoded per `add` call when building an index.
const ADD_CHUNK: usize = 16_384;

/// One codec's results on one split ([`eval_codec`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalRow {
    /// Codec name.
    pub codec: String,
    /// Dataset name.
    pub data: String,
    /// Vector dimension.
    pub dim: usize,
    /// Base vectors encoded.
    pub n_base: usize,
    /// Queries searched.
    pub n_queries: usize,
    /// Metric name (`Metric::name`).
    pub metric: &'static str,
    /// The codec's storage bits per value.
    pub bits_per_value: f64,
    /// Codebook / centre bytes per collection (PQ codebooks, RaBitQ centre).
    pub model_bytes: usize,
    /// Seconds spent training (codecs that learn from data; else about 0).
    pub train_seconds: f64,
    /// Seconds to encode the base.
    pub encode_seconds: f64,
    /// Reconstruction error of the decoded base: Σ‖x − x̂‖² / Σ‖x‖².
    pub rel_mse: f64,
    /// RMS error of the codes' inner-product estimates (first 100 queries × first 1000 base vectors).
    pub ip_rmse: f64,
    /// Mean error (estimate − exact) of the same inner-product estimates.
    pub ip_bias: f64,
    /// Fraction of queries whose exact nearest neighbour is in the top 10.
    pub recall_1_at_10: f64,
    /// Mean fraction of the exact top 10 found in the top 10.
    pub recall_10_at_10: f64,
    /// Milliseconds per query of the exact brute-force scan over the codes (one thread).
    pub query_ms: f64,
}

/// The cache file of the exact ground truth of one split (in the data cache).
pub fn truth_cache_path(data: &str, n_base: usize, n_queries: usize, seed: u64, metric: Metric) -> PathBuf {
    crate::datasets::cache_dir().join(format!("truth-{data}-{n_base}-{n_queries}-{seed}-{}.bin", metric.name()))
}

/// Exact top-10 ids per query (`exact_topk`, all threads), from
/// the cache file when given and present (and written there when absent).
pub fn ground_truth(base: &Matrix, queries: &Matrix, metric: Metric, cache: Option<&PathBuf>, progress: Progress<'_>) -> Result<Vec<Vec<u64>>> {
    if let Some(p) = cache {
        if let Ok(b) = std::fs::read(p) {
            if b.len() == queries.rows * 80 {
                return Ok(b.chunks_exact(80).map(|r| r.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))).collect()).collect());
            }
        }
    }
    let truth: Vec<Vec<u64>> = queries
        .data
        .par_chunks(queries.cols)
        .map(|q| {
            let r = exact_topk(base, q, 10, metric);
            progress(1);
            r
        })
        .collect();
    if let Some(p) = cache {
        if truth.iter().all(|t| t.len() == 10) {
            let bytes: Vec<u8> = truth.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
            // a cache: failing to write it is not an error
            let _ = tq_io::write_atomic(p, &bytes);
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
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("cannot start a thread pool")?;
    let p = SearchParams { exact: true, ..Default::default() };
    let t = Instant::now();
    let res = one.install(|| -> Result<Vec<_>> { queries.data.chunks_exact(dim).map(|q| idx.search(q, 10, &p).map_err(crate::DataError::from)).collect() })?;
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

/// One matrix codec's results on one matrix ([`matrix_rows`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MatrixRow {
    /// Codec name.
    pub codec: String,
    /// How the codec groups the matrix (`rows`, or KIVI's per-channel / per-token axis).
    pub axis: &'static str,
    /// Dataset name.
    pub data: String,
    /// Rows (tokens) of the matrix.
    pub rows: usize,
    /// Columns (channels) of the matrix.
    pub channels: usize,
    /// Storage bits per value for all the rows, learned parameters excluded.
    pub bits_per_value: f64,
    /// Learned parameters stored once per matrix (codebooks).
    pub model_bytes: usize,
    /// Seconds spent training.
    pub train_seconds: f64,
    /// Seconds to encode the matrix.
    pub encode_seconds: f64,
    /// Reconstruction error: ‖M − M̂‖² / ‖M‖².
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

/// What [`build_index`] builds.
pub struct BuildArgs<'a> {
    /// Codec name.
    pub codec: &'a str,
    /// Search metric.
    pub metric: Metric,
    /// Seed of the codec (rotation, training).
    pub seed: u64,
    /// Rotation applied before encoding.
    pub rotation: RotationKind,
    /// `Some(lists)`: an IVF index with that many lists; `None`: a flat index.
    pub ivf: Option<usize>,
    /// Full-precision copies stored beside the codes, if any.
    pub raw: RawVectors,
}

/// Builds an index over `m` with ids `0..n` (training only where needed).
pub fn build_index(m: &Matrix, a: &BuildArgs<'_>, progress: Progress<'_>) -> Result<AnyIndex> {
    let spec = IndexSpec { codec: a.codec.to_string(), dim: m.cols, seed: a.seed, rotation: a.rotation, metric: a.metric, params: Vec::new(), raw: a.raw };
    let train = &m.data[..m.cols * m.rows.min(TRAIN_ROWS)];
    // codecs that learn from data (fractional split, PQ codebooks, RaBitQ centre)
    let mut f = FlatIndex::new(spec)?;
    if f.codec().wants_training() {
        f.train(train)?;
    }
    let mut idx = match a.ivf {
        None => AnyIndex::Flat(f),
        Some(lists) => AnyIndex::Ivf(IvfIndex::train(f.spec().clone(), lists, train, 10)?),
    };
    for (c, chunk) in m.data.chunks(ADD_CHUNK * m.cols).enumerate() {
        let start = (c * ADD_CHUNK) as u64;
        let ids: Vec<u64> = (start..start + (chunk.len() / m.cols) as u64).collect();
        idx.add(&ids, chunk)?;
        progress(ids.len());
    }
    Ok(idx)
}

/// What [`run_search_bench`] builds and measures.
pub struct BenchArgs<'a> {
    /// Codec name.
    pub codec: &'a str,
    /// Results per query (at least 10 are asked for, for recall 10@10).
    pub k: usize,
    /// `Some(lists)`: an IVF index with that many lists; `None`: a flat index.
    pub ivf: Option<usize>,
    /// IVF: lists probed per query.
    pub nprobe: usize,
    /// Fast-scan stores: candidates re-scored exactly per wanted result.
    pub rerank: usize,
    /// Full-precision copies stored beside the codes; when set, the re-ranked
    /// search is measured too ([`SearchBench::raw_rerank`]).
    pub raw: RawVectors,
    /// Seed of the codec.
    pub seed: u64,
}

/// Splits a dataset into a base and disjoint queries (seeded), unit-normalized.
pub fn split(m: &Matrix, queries: usize, base: Option<usize>, seed: u64) -> Result<(Matrix, Matrix)> {
    let d = m.cols;
    let mut order: Vec<usize> = (0..m.rows).collect();
    let mut rng = tq_core::rng::Xoshiro256::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let nb = base.unwrap_or(m.rows - queries.min(m.rows)).min(m.rows.saturating_sub(queries));
    if queries == 0 || nb == 0 {
        bail!("need at least one query and one base vector ({} rows)", m.rows);
    }
    let take = |rows: &[usize]| {
        let mut data = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            let v = &m.data[r * d..(r + 1) * d];
            let n = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            data.extend(v.iter().map(|&x| if n > 0.0 { (x as f64 / n) as f32 } else { 0.0 }));
        }
        Matrix { rows: rows.len(), cols: d, data }
    };
    Ok((take(&order[queries..queries + nb]), take(&order[..queries])))
}

/// Exact top-`k` ids by f32 brute force: largest inner product, or smallest
/// squared distance for `Metric::L2`; ties go to the lower id.
pub fn exact_topk(base: &Matrix, q: &[f32], k: usize, metric: Metric) -> Vec<u64> {
    let dot = tq_core::kernels::kernels().dot;
    let score = |x: &[f32]| match metric {
        Metric::L2 => -q.iter().zip(x).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(),
        _ => dot(q, x),
    };
    let mut s: Vec<(f32, u64)> = base.data.chunks_exact(base.cols).enumerate().map(|(i, x)| (score(x), i as u64)).collect();
    let k = k.min(s.len());
    let order = |a: &(f32, u64), b: &(f32, u64)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    s.select_nth_unstable_by(k - 1, order);
    s.truncate(k);
    s.sort_by(order);
    s.into_iter().map(|p| p.1).collect()
}

/// The measurements of one search benchmark ([`run_search_bench`]).
pub struct SearchBench {
    /// Seconds to build the index (one thread).
    pub build_seconds: f64,
    /// Milliseconds per query, one thread, one query at a time.
    pub query_ms: f64,
    /// Queries per second of a batch search on all threads.
    pub qps: f64,
    /// Queries per second of the same batch search on one thread.
    pub qps_one_thread: f64,
    /// Milliseconds per query of exact f32 brute force (one thread, up to 100 queries).
    pub exact_query_ms: f64,
    /// Mean fraction of the exact top 10 found in the top 10.
    pub recall_10_at_10: f64,
    /// Fraction of queries whose exact nearest neighbour is in the top 10.
    pub recall_1_at_10: f64,
    /// Code bytes per vector (raw copies and index overhead excluded).
    pub bytes_per_vector: f64,
    /// With raw vectors: (query ms, recall 10@10, recall 1@10) after re-ranking by them.
    pub raw_rerank: Option<(f64, f64, f64)>,
}

/// Runs one search benchmark on a prepared split (shared with the report).
pub fn run_search_bench(base: &Matrix, queries: &Matrix, truth: &[Vec<u64>], a: &BenchArgs<'_>, progress: Progress<'_>) -> Result<SearchBench> {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("cannot start a thread pool")?;
    let bargs = BuildArgs { codec: a.codec, metric: Metric::Ip, seed: a.seed, rotation: RotationKind::Hadamard, ivf: a.ivf, raw: a.raw };
    let t = Instant::now();
    let idx = one.install(|| build_index(base, &bargs, progress))?;
    let build_seconds = t.elapsed().as_secs_f64();
    let p = SearchParams { allow: None, rerank: a.rerank, exact: false, nprobe: a.nprobe, raw_rerank: false };
    let k = a.k.max(10);
    // single thread, one query at a time
    let timed = |p: &SearchParams<'_>| -> Result<(f64, Vec<Vec<tq_index::Hit>>)> {
        let t = Instant::now();
        let mut results = Vec::with_capacity(queries.rows);
        for q in queries.data.chunks_exact(queries.cols) {
            results.push(idx.search(q, k, p)?);
        }
        Ok((t.elapsed().as_secs_f64() * 1e3 / queries.rows as f64, results))
    };
    let recall = |results: &[Vec<tq_index::Hit>]| {
        let (mut r10, mut r1) = (0.0, 0.0);
        for (hits, tr) in results.iter().zip(truth) {
            let got: HashSet<u64> = hits.iter().take(10).map(|h| h.id).collect();
            r10 += tr.iter().take(10).filter(|id| got.contains(id)).count() as f64 / 10.0;
            r1 += got.contains(&tr[0]) as u8 as f64;
        }
        (r10 / queries.rows as f64, r1 / queries.rows as f64)
    };
    let (query_ms, results) = one.install(|| timed(&p))?;
    let raw_rerank = if a.raw != RawVectors::None {
        let (ms, res) = one.install(|| timed(&SearchParams { raw_rerank: true, ..p }))?;
        let (r10, r1) = recall(&res);
        Some((ms, r10, r1))
    } else {
        None
    };
    // all threads, batch
    let t = Instant::now();
    let batch = idx.search_batch(&queries.data, k, &p)?;
    let qps = queries.rows as f64 / t.elapsed().as_secs_f64();
    assert_eq!(batch.len(), results.len());
    let t = Instant::now();
    std::hint::black_box(one.install(|| idx.search_batch(&queries.data, k, &p))?);
    let qps_one_thread = queries.rows as f64 / t.elapsed().as_secs_f64();
    // exact f32 search, single thread, same process (a subset of the queries)
    let ne = queries.rows.min(100);
    let t = Instant::now();
    for q in queries.data.chunks_exact(queries.cols).take(ne) {
        std::hint::black_box(exact_topk(base, q, 10, Metric::Ip));
    }
    let exact_query_ms = t.elapsed().as_secs_f64() * 1e3 / ne as f64;
    let (r10, r1) = recall(&results);
    Ok(SearchBench {
        build_seconds,
        query_ms,
        qps,
        qps_one_thread,
        exact_query_ms,
        recall_10_at_10: r10,
        recall_1_at_10: r1,
        bytes_per_vector: tq_core::lookup(a.codec)?.code_size(base.cols) as f64,
        raw_rerank,
    })
}
