//! `tq index …` and `tq bench search`.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tq_core::RotationKind;
use tq_index::file::{self, AnyIndex, LoadOptions, LockWait};
use tq_index::{FlatIndex, IndexSpec, IvfIndex, Metric, RawVectors, SearchParams};

use crate::data;
use crate::files::{self, Matrix};

/// Rows used to train codec parameters and IVF centroids.
const TRAIN_ROWS: usize = 100_000;
const ADD_CHUNK: usize = 16_384;

pub(crate) fn bar(n: usize, msg: &'static str, quiet: bool) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    if quiet {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    } else {
        pb.set_style(ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({eta})").expect("template"));
        pb.set_message(msg);
    }
    pb
}

pub struct BuildArgs<'a> {
    pub codec: &'a str,
    pub metric: Metric,
    pub seed: u64,
    pub rotation: RotationKind,
    pub ivf: Option<usize>,
    pub raw: RawVectors,
    pub quiet: bool,
}

/// Builds an index over `m` with ids `0..n` (training only where needed).
pub fn build_index(m: &Matrix, a: &BuildArgs<'_>) -> Result<AnyIndex> {
    let spec = IndexSpec {
        codec: a.codec.to_string(),
        dim: m.cols,
        seed: a.seed,
        rotation: a.rotation,
        metric: a.metric,
        params: Vec::new(),
        raw: a.raw,
    };
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
    let pb = bar(m.rows, "encoding", a.quiet);
    for (c, chunk) in m.data.chunks(ADD_CHUNK * m.cols).enumerate() {
        let start = (c * ADD_CHUNK) as u64;
        let ids: Vec<u64> = (start..start + (chunk.len() / m.cols) as u64).collect();
        idx.add(&ids, chunk)?;
        pb.inc(ids.len() as u64);
    }
    pb.finish_and_clear();
    Ok(idx)
}

fn input_matrix(data_name: Option<&str>, input: Option<&Path>, quiet: bool) -> Result<Matrix> {
    match (data_name, input) {
        (Some(d), None) => data::load(d, quiet),
        (None, Some(p)) => files::read_vectors(p),
        _ => bail!("give exactly one of --data NAME or --input FILE"),
    }
}

pub fn build(data_name: Option<&str>, input: Option<&Path>, a: &BuildArgs<'_>, out: &Path, json: bool) -> Result<()> {
    let m = input_matrix(data_name, input, a.quiet || json)?;
    let t = Instant::now();
    let idx = build_index(&m, a)?;
    let secs = t.elapsed().as_secs_f64();
    file::save_over(&idx, out, None, lock_wait())?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    let info = json!({"out": out.display().to_string(), "count": idx.len(), "dim": m.cols, "codec": a.codec,
        "metric": a.metric.name(), "ivf_lists": a.ivf, "build_seconds": secs, "file_bytes": bytes});
    if json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        eprintln!("built {} vectors ({} × {}) in {secs:.3} s → {} ({bytes} bytes)", idx.len(), m.rows, m.cols, out.display());
    }
    Ok(())
}

pub fn add(index: &Path, input: &Path, start_id: Option<u64>) -> Result<()> {
    // loaded and committed under the index's write lock (no other writer in between)
    let (mut idx, mut app) = file::open_for_write_with(index, lock_wait(), load_options())?;
    let m = files::read_vectors(input)?;
    if m.cols != idx.spec().dim {
        bail!("{} has dimension {}, the index {}", input.display(), m.cols, idx.spec().dim);
    }
    let start = match start_id {
        Some(s) => s,
        None => max_id(&idx).map_or(0, |v| v + 1),
    };
    let ids: Vec<u64> = (start..start + m.rows as u64).collect();
    let payload = idx.add(&ids, &m.data)?;
    app.append_add(&payload)?;
    eprintln!("added {} vectors (ids {start}..{}) to {}; {} in total", m.rows, start + m.rows as u64, index.display(), idx.len());
    Ok(())
}

fn all_ids(idx: &AnyIndex) -> Vec<u64> {
    match idx {
        AnyIndex::Flat(f) => f.ids().to_vec(),
        AnyIndex::Ivf(i) => (0..i.nlist()).flat_map(|l| i.list(l).ids().to_vec()).collect(),
    }
}

fn max_id(idx: &AnyIndex) -> Option<u64> {
    all_ids(idx).into_iter().max()
}

pub fn parse_ids(s: &str) -> Result<Vec<u64>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u64>().with_context(|| format!("'{t}' is not an id (unsigned integer)")))
        .collect()
}

pub fn remove(index: &Path, ids: &[u64]) -> Result<()> {
    if ids.is_empty() {
        bail!("no ids given");
    }
    let (mut idx, mut app) = file::open_for_write_with(index, lock_wait(), load_options())?;
    let payload = idx.remove(ids)?;
    app.append_remove(&payload)?;
    eprintln!("removed {} ids from {}; {} left", ids.len(), index.display(), idx.len());
    Ok(())
}

pub struct SearchArgs<'a> {
    pub raw_rerank: bool,
    pub k: usize,
    pub nprobe: usize,
    pub rerank: usize,
    pub exact: bool,
    pub allow: Option<&'a str>,
    pub json: bool,
}

pub fn search(index: &Path, queries: &Path, a: &SearchArgs<'_>) -> Result<()> {
    let (idx, _) = file::load_with(index, load_options())?;
    let q = files::read_vectors(queries)?;
    if q.cols != idx.spec().dim {
        bail!("{} has dimension {}, the index {}", queries.display(), q.cols, idx.spec().dim);
    }
    let allow: Option<HashSet<u64>> = a.allow.map(parse_ids).transpose()?.map(|v| v.into_iter().collect());
    if a.raw_rerank && idx.spec().raw == RawVectors::None {
        bail!("--raw-rerank needs an index built with --raw f16 or --raw f32");
    }
    let p = SearchParams { allow: allow.as_ref(), rerank: a.rerank, exact: a.exact, nprobe: a.nprobe, raw_rerank: a.raw_rerank };
    let t = Instant::now();
    // batches of 256 queries (parallel inside), with a progress bar on long runs
    let pb = bar(q.rows, "searching", a.json || q.rows < 2048);
    let mut res = Vec::with_capacity(q.rows);
    for chunk in q.data.chunks(256 * q.cols) {
        res.extend(idx.search_batch(chunk, a.k, &p)?);
        pb.inc((chunk.len() / q.cols) as u64);
    }
    pb.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        let rows: Vec<_> = res
            .iter()
            .map(|hits| json!({"ids": hits.iter().map(|h| h.id).collect::<Vec<_>>(), "scores": hits.iter().map(|h| h.score).collect::<Vec<_>>()}))
            .collect();
        println!("{}", serde_json::to_string(&json!({"k": a.k, "metric": idx.spec().metric.name(), "seconds": secs, "results": rows}))?);
    } else {
        for (i, hits) in res.iter().enumerate() {
            let s: Vec<String> = hits.iter().map(|h| format!("{}:{:.4}", h.id, h.score)).collect();
            println!("{i}\t{}", s.join(" "));
        }
        eprintln!("{} queries in {secs:.3} s", q.rows);
    }
    Ok(())
}

pub fn info(index: &Path, json: bool) -> Result<()> {
    let (idx, commit) = file::load_with(index, load_options())?;
    let spec = idx.spec();
    let (kind, lists) = match &idx {
        AnyIndex::Flat(f) => (if f.is_fast_scan() { "flat (fast-scan)" } else { "flat" }, None),
        AnyIndex::Ivf(i) => ("ivf", Some(i.nlist())),
    };
    let bytes = std::fs::metadata(index)?.len();
    let codec = tq_core::lookup(&spec.codec)?;
    let out = json!({"path": index.display().to_string(), "kind": kind, "ivf_lists": lists, "count": idx.len(),
        "codec": spec.codec, "dim": spec.dim, "seed": spec.seed, "rotation": spec.rotation.name(), "metric": spec.metric.name(),
        "bits_per_value": codec.bits_per_value(spec.dim), "code_size": codec.code_size(spec.dim),
        "format_version": file::VERSION, "commit_seq": commit.seq, "committed_bytes": commit.end, "file_bytes": bytes});
    if json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

static RECOVER_PREVIOUS_COMMIT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `tq index --recover-previous-commit`: set once, before the subcommand runs.
pub fn set_recover_previous_commit(on: bool) {
    RECOVER_PREVIOUS_COMMIT.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn load_options() -> LoadOptions {
    LoadOptions { recover_previous_commit: RECOVER_PREVIOUS_COMMIT.load(std::sync::atomic::Ordering::Relaxed) }
}

/// How long a writer waits for another's lock on the index: `$TQ_LOCK_TIMEOUT_MS`, else 10 s.
fn lock_wait() -> LockWait {
    match std::env::var("TQ_LOCK_TIMEOUT_MS").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(ms) => LockWait::new(std::time::Duration::from_millis(ms)),
        None => LockWait::default(),
    }
}

/// `tq index check`: what the file holds and what is recoverable; an error
/// (exit status 1) after the report when it does not load as is.
pub fn check(index: &Path, json: bool) -> Result<()> {
    let r = file::check(index)?;
    let slot = |s: &file::SlotReport| {
        let (state, seq, end) = match s.state {
            file::SlotState::Empty => ("empty", None, None),
            file::SlotState::Valid { seq, end } => ("valid", Some(seq), Some(end)),
            file::SlotState::Corrupt { seq, end } => ("corrupt", Some(seq), Some(end)),
        };
        json!({"slot": s.name.to_string(), "offset": s.offset, "state": state, "seq": seq, "end": end})
    };
    let out = json!({"path": index.display().to_string(), "file_bytes": r.file_bytes, "header_error": r.header_error,
        "slots": r.slots.iter().map(slot).collect::<Vec<_>>(), "commit_seq": r.commit.map(|c| c.seq), "committed_bytes": r.commit.map(|c| c.end),
        "records_verified": r.records_verified, "count": r.count, "records_error": r.records_error, "bytes_after_end": r.bytes_after_end,
        "records_after_end": r.records_after_end, "records_after_end_to": r.records_after_end_to, "loads": r.loads, "load_error": r.load_error,
        "previous_commit_intact": r.previous_commit_intact, "verdict": r.verdict()});
    if json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    if !r.loads {
        bail!("{}: {}", index.display(), r.verdict());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// tq bench search
// ---------------------------------------------------------------------------

pub struct BenchArgs<'a> {
    pub data: &'a str,
    pub codec: &'a str,
    pub queries: usize,
    pub base: Option<usize>,
    pub k: usize,
    pub ivf: Option<usize>,
    pub nprobe: usize,
    pub rerank: usize,
    pub raw: RawVectors,
    pub seed: u64,
    pub json: bool,
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

pub struct SearchBench {
    pub build_seconds: f64,
    pub query_ms: f64,
    pub qps: f64,
    pub exact_query_ms: f64,
    pub recall_10_at_10: f64,
    pub recall_1_at_10: f64,
    pub bytes_per_vector: f64,
    /// With raw vectors: (query ms, recall 10@10, recall 1@10) after re-ranking by them.
    pub raw_rerank: Option<(f64, f64, f64)>,
}

/// Runs one search benchmark on a prepared split (shared with the report).
pub fn run_search_bench(base: &Matrix, queries: &Matrix, truth: &[Vec<u64>], a: &BenchArgs<'_>, quiet: bool) -> Result<SearchBench> {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let bargs = BuildArgs { codec: a.codec, metric: Metric::Ip, seed: a.seed, rotation: RotationKind::Hadamard, ivf: a.ivf, raw: a.raw, quiet };
    let t = Instant::now();
    let idx = one.install(|| build_index(base, &bargs))?;
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
    let (query_ms, results) = timed(&p)?;
    let raw_rerank = if a.raw != RawVectors::None {
        let (ms, res) = timed(&SearchParams { raw_rerank: true, ..p })?;
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
        exact_query_ms,
        recall_10_at_10: r10,
        recall_1_at_10: r1,
        bytes_per_vector: tq_core::lookup(a.codec)?.code_size(base.cols) as f64,
        raw_rerank,
    })
}

pub fn bench_search(a: &BenchArgs<'_>) -> Result<()> {
    let m = data::load(a.data, a.json)?;
    let (base, queries) = split(&m, a.queries, a.base, a.seed)?;
    let truth = crate::eval::ground_truth(&base, &queries, Metric::Ip, None, a.json)?;
    let r = run_search_bench(&base, &queries, &truth, a, a.json)?;
    let out = json!({
        "data": a.data, "codec": a.codec, "n": base.rows, "queries": queries.rows, "dim": base.cols, "metric": "ip (unit vectors)",
        "ivf_lists": a.ivf, "nprobe": a.ivf.map(|_| a.nprobe), "rerank": a.rerank,
        "build_seconds": r.build_seconds, "bytes_per_vector": r.bytes_per_vector,
        "query_ms": r.query_ms, "qps": r.qps, "threads": rayon::current_num_threads(),
        "recall_10_at_10": r.recall_10_at_10, "recall_1_at_10": r.recall_1_at_10,
        "exact_query_ms": r.exact_query_ms, "speedup_vs_exact": r.exact_query_ms / r.query_ms,
        "raw_vectors": format!("{:?}", a.raw).to_lowercase(),
        "raw_rerank_query_ms": r.raw_rerank.map(|x| x.0), "raw_rerank_recall_10_at_10": r.raw_rerank.map(|x| x.1),
        "raw_rerank_recall_1_at_10": r.raw_rerank.map(|x| x.2),
    });
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{} on {} ({} × {}, {} queries, unit vectors, inner product)", a.codec, a.data, base.rows, base.cols, queries.rows);
        println!("  build            {:.3} s (one thread)", r.build_seconds);
        println!("  bytes/vector     {}", r.bytes_per_vector);
        println!("  query            {:.4} ms (one thread)   exact f32 {:.4} ms ({:.1}× faster)", r.query_ms, r.exact_query_ms, r.exact_query_ms / r.query_ms);
        println!("  qps              {:.0} ({} threads)", r.qps, rayon::current_num_threads());
        println!("  recall 10@10     {:.4}", r.recall_10_at_10);
        println!("  recall 1@10      {:.4}", r.recall_1_at_10);
        if let Some((ms, r10, r1)) = r.raw_rerank {
            println!("  re-ranked by stored {:?} vectors: {ms:.4} ms, recall 10@10 {r10:.4}, 1@10 {r1:.4}", a.raw);
        }
    }
    Ok(())
}
