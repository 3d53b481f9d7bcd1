//! `tq index …` and `tq bench search`.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use tq_index::file::{self, AnyIndex, LoadOptions, LockWait};
use tq_index::{Metric, RawVectors, SearchParams};

use tq_data::eval::{build_index, split, BuildArgs};
use tq_data::vectors::read_vectors;
use tq_data::Matrix;

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

fn input_matrix(data_name: Option<&str>, input: Option<&Path>, quiet: bool) -> Result<Matrix> {
    match (data_name, input) {
        (Some(d), None) => crate::load_dataset(d, quiet),
        (None, Some(p)) => Ok(read_vectors(p)?),
        _ => bail!("give exactly one of --data NAME or --input FILE"),
    }
}

pub fn build(data_name: Option<&str>, input: Option<&Path>, a: &BuildArgs<'_>, out: &Path, json: bool) -> Result<()> {
    let m = input_matrix(data_name, input, json)?;
    let t = Instant::now();
    let pb = bar(m.rows, "encoding", json);
    let idx = build_index(&m, a, &|k| pb.inc(k as u64))?;
    pb.finish_and_clear();
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

pub fn add(index: &Path, input: &Path, start_id: Option<u64>, load: LoadOptions) -> Result<()> {
    // loaded and committed under the index's write lock (no other writer in between)
    let (mut idx, mut app) = file::open_for_write_with(index, lock_wait(), load)?;
    let m = read_vectors(input)?;
    if m.cols != idx.spec().dim {
        bail!("{} has dimension {}, the index {}", input.display(), m.cols, idx.spec().dim);
    }
    let start = match start_id {
        Some(s) => s,
        None => max_id(&idx).map_or(0, |v| v + 1),
    };
    let end =
        start.checked_add(m.rows as u64).ok_or_else(|| anyhow::anyhow!("ids {start}.. for {} vectors overflow u64 (choose a smaller --start-id)", m.rows))?;
    let ids: Vec<u64> = (start..end).collect();
    let payload = idx.add(&ids, &m.data)?;
    app.append_add(&payload)?;
    eprintln!("added {} vectors (ids {start}..{}) to {}; {} in total", m.rows, start + m.rows as u64, index.display(), idx.len());
    Ok(())
}

fn max_id(idx: &AnyIndex) -> Option<u64> {
    idx.ids().into_iter().max()
}

pub fn parse_ids(s: &str) -> Result<Vec<u64>> {
    s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(|t| t.parse::<u64>().with_context(|| format!("'{t}' is not an id (unsigned integer)"))).collect()
}

pub fn remove(index: &Path, ids: &[u64], load: LoadOptions) -> Result<()> {
    if ids.is_empty() {
        bail!("no ids given");
    }
    let (mut idx, mut app) = file::open_for_write_with(index, lock_wait(), load)?;
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

pub fn search(index: &Path, queries: &Path, a: &SearchArgs<'_>, load: LoadOptions) -> Result<()> {
    let (idx, _) = file::load_with(index, load)?;
    let q = read_vectors(queries)?;
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

pub fn info(index: &Path, json: bool, load: LoadOptions) -> Result<()> {
    let (idx, commit) = file::load_with(index, load)?;
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

/// `tq bench search` arguments.
pub struct BenchSearch<'a> {
    pub data: &'a str,
    pub args: tq_data::eval::BenchArgs<'a>,
    pub queries: usize,
    pub base: Option<usize>,
    pub json: bool,
}

pub fn bench_search(b: &BenchSearch<'_>) -> Result<()> {
    let a = &b.args;
    let m = crate::load_dataset(b.data, b.json)?;
    let (base, queries) = split(&m, b.queries, b.base, a.seed)?;
    let pb = bar(queries.rows, "exact ground truth", b.json);
    let truth = tq_data::eval::ground_truth(&base, &queries, Metric::Ip, None, &|k| pb.inc(k as u64))?;
    pb.finish_and_clear();
    let pb = bar(base.rows, "encoding", b.json);
    let r = tq_data::eval::run_search_bench(&base, &queries, &truth, a, &|k| pb.inc(k as u64))?;
    pb.finish_and_clear();
    let out = json!({
        "data": b.data, "codec": a.codec, "n": base.rows, "queries": queries.rows, "dim": base.cols, "metric": "ip (unit vectors)",
        "ivf_lists": a.ivf, "nprobe": a.ivf.map(|_| a.nprobe), "rerank": a.rerank,
        "build_seconds": r.build_seconds, "bytes_per_vector": r.bytes_per_vector,
        "query_ms": r.query_ms, "qps": r.qps, "qps_one_thread": r.qps_one_thread, "threads": rayon::current_num_threads(),
        "recall_10_at_10": r.recall_10_at_10, "recall_1_at_10": r.recall_1_at_10,
        "exact_query_ms": r.exact_query_ms, "speedup_vs_exact": r.exact_query_ms / r.query_ms,
        "raw_vectors": format!("{:?}", a.raw).to_lowercase(),
        "raw_rerank_query_ms": r.raw_rerank.map(|x| x.0), "raw_rerank_recall_10_at_10": r.raw_rerank.map(|x| x.1),
        "raw_rerank_recall_1_at_10": r.raw_rerank.map(|x| x.2),
    });
    if b.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{} on {} ({} × {}, {} queries, unit vectors, inner product)", a.codec, b.data, base.rows, base.cols, queries.rows);
        println!("  build            {:.3} s (one thread)", r.build_seconds);
        println!("  bytes/vector     {}", r.bytes_per_vector);
        println!("  query            {:.4} ms (one thread)   exact f32 {:.4} ms ({:.1}× faster)", r.query_ms, r.exact_query_ms, r.exact_query_ms / r.query_ms);
        println!("  qps              {:.0} ({} threads), {:.0} (one thread), one batch of all queries", r.qps, rayon::current_num_threads(), r.qps_one_thread);
        println!("  recall 10@10     {:.4}", r.recall_10_at_10);
        println!("  recall 1@10      {:.4}", r.recall_1_at_10);
        if let Some((ms, r10, r1)) = r.raw_rerank {
            println!("  re-ranked by stored {:?} vectors: {ms:.4} ms, recall 10@10 {r10:.4}, 1@10 {r1:.4}", a.raw);
        }
    }
    Ok(())
}
