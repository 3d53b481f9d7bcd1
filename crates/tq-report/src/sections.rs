//! The real-data vector sections: recall against query time, every codec
//! side by side, the matrix codecs on an embedding matrix.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;
use tq_data::eval::{eval_codec, ground_truth, no_progress, run_search_bench, split, BenchArgs};
use tq_data::Matrix;

use crate::plot::{plot_search, scatter};
use crate::{sig, Progress, Result, Size};

/// A dataset for a report section, or `None` with the reason written to `s`:
/// datasets are fetched when possible, but MiniLM is only used once cached
/// (computing it takes about 20 minutes on 2 cores).
fn report_data(data: &str, s: &mut String, progress: &dyn Progress) -> Result<Option<Matrix>> {
    use tq_data::datasets::{cache_dir, find};
    if data == "minilm" && !cache_dir().join(find(data)?.file).exists() {
        let _ = writeln!(
            s,
            "Skipped: the MiniLM embeddings are not cached. `tq data fetch minilm` computes them once \
             (about 20 minutes on 2 cores), after which this section runs.\n"
        );
        return Ok(None);
    }
    progress.stage(&format!("loading {data}"), 0, "rows");
    let loaded = tq_llm::datasets::load(data, true, &|done, total| {
        progress.set(done as u64);
        let _ = total;
    });
    progress.finish();
    match loaded {
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
pub(crate) fn search(out: &Path, data: &str, size: Size, progress: &dyn Progress) -> Result<(String, serde_json::Value)> {
    let mut s = format!("\n## Vector search: recall vs query time ({data})\n\n");
    let Some(m) = report_data(data, &mut s, progress)? else { return Ok((s, serde_json::Value::Null)) };
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
    progress.stage(&format!("search {data}"), SEARCH_CONFIGS.len() as u64, "configurations");
    for &(label, codec, ivf, nprobe, nq) in SEARCH_CONFIGS {
        progress.message(label);
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
        progress.inc(1);
    }
    progress.finish();
    plot_search(out, data, &rows)?;
    Ok((s, json!(rows)))
}

/// QET, KIVI and PQ on SmolLM2's embedding matrix (a K/V-like real matrix).
pub(crate) fn matrix(size: Size, progress: &dyn Progress) -> Result<(String, serde_json::Value)> {
    let mut s = String::from("\n## Matrix codecs on SmolLM2's token-embedding matrix\n\n");
    let Some(m) = report_data("smollm-embed", &mut s, progress)? else { return Ok((s, serde_json::Value::Null)) };
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

/// Every codec on one dataset: recall and relative MSE against bits per value.
pub(crate) fn codecs(out: &Path, data: &str, size: Size, progress: &dyn Progress) -> Result<(String, serde_json::Value)> {
    let mut s = format!("\n## Codecs side by side on {data}\n\n");
    let Some(m) = report_data(data, &mut s, progress)? else { return Ok((s, serde_json::Value::Null)) };
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
    progress.stage(&format!("codecs on {data}"), EVAL_CODECS.len() as u64, "codecs");
    let mut rows = Vec::new();
    for c in EVAL_CODECS {
        progress.message(c);
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
        progress.inc(1);
    }
    progress.finish();
    let pts = |key: &str| -> Vec<(f64, f64, String)> {
        rows.iter()
            .map(|r| (r["bits_per_value"].as_f64().unwrap_or(0.0), r[key].as_f64().unwrap_or(0.0), r["codec"].as_str().unwrap_or("").to_string()))
            .collect()
    };
    scatter(&out.join(format!("eval_{data}_recall.svg")), &format!("{data}: recall 10@10 vs bits per value"), "recall 10@10", &pts("recall_10_at_10"), false)?;
    scatter(&out.join(format!("eval_{data}_mse.svg")), &format!("{data}: relative MSE vs bits per value"), "rel MSE (log)", &pts("rel_mse"), true)?;
    Ok((s, json!(rows)))
}
