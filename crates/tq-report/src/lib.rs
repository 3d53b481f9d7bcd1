//! `tq report`, the main job, as a library: the distortion of every
//! TurboQuant codec at dim 64, 128 and 1536 on seeded random unit vectors
//! against the exact Lloyd–Max theory and the paper's bounds (the embedded
//! default: the theorems give the expected answer), Hadamard against Haar,
//! then vector search and every codec side by side on real embeddings, the
//! matrix codecs on a real embedding matrix and KV-cache sweeps in SmolLM2,
//! written as `index.md`, `index.html`, `results.json` and SVG plots.
//!
//! Progress is reported through [`Progress`] (the CLI draws bars); nothing
//! here prints.
#![warn(missing_docs)]

mod distortion;
mod kv;
mod plot;
mod sections;

use std::path::Path;

use serde_json::json;
use tq_llm::eval::Runtime;

pub use distortion::distortion;
pub use kv::{sweep, SWEEP};

/// What went wrong while writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// An argument out of range; the message names it.
    #[error("{0}")]
    Invalid(String),
    /// A codec rejected its parameters.
    #[error(transparent)]
    Codec(#[from] tq_core::TqError),
    /// A dataset or evaluation failed.
    #[error(transparent)]
    Data(#[from] tq_data::DataError),
    /// The model runtime failed (loading, tokenizing, a forward pass).
    #[error(transparent)]
    Llm(#[from] tq_llm::LlmError),
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("plot {path}: {msg}")]
    Plot {
        /// The SVG file.
        path: String,
        /// Why.
        msg: String,
    },
}

/// Result of tq-report.
pub type Result<T> = std::result::Result<T, ReportError>;

/// Progress of a long job: stages, each with a total of units; the CLI draws
/// them as bars. Every method has a silent default.
pub trait Progress: Sync {
    /// A stage starts: `what` runs over `total` units named `unit`.
    fn stage(&self, what: &str, total: u64, unit: &str) {
        let _ = (what, total, unit);
    }
    /// What the current stage works on now.
    fn message(&self, msg: &str) {
        let _ = msg;
    }
    /// `k` more units done.
    fn inc(&self, k: u64) {
        let _ = k;
    }
    /// `done` units done in all.
    fn set(&self, done: u64) {
        let _ = done;
    }
    /// The stage is over.
    fn finish(&self) {}
}

/// No progress reporting.
pub struct Silent;
impl Progress for Silent {}

/// How large a report is: by default every section at a smaller size
/// (minutes on 2 cores), `full` at the sizes of the published tables,
/// `quick` the distortion part only.
#[derive(Clone, Copy, Debug, Default)]
pub struct Size {
    /// Distortion part only, small.
    pub quick: bool,
    /// The full tables.
    pub full: bool,
}

impl Size {
    fn pick<T>(self, small: T, full: T) -> T {
        if self.full {
            full
        } else {
            small
        }
    }
    /// Base vectors of the search and side-by-side sections.
    fn base(self) -> usize {
        self.pick(20_000, 100_000)
    }
    /// Queries of the search section.
    fn search_queries(self) -> usize {
        self.pick(200, 1000)
    }
    /// Queries of the side-by-side section.
    fn eval_queries(self) -> usize {
        self.pick(100, 300)
    }
    /// Chunks of 512 tokens per KV sweep.
    fn kv_chunks(self) -> usize {
        self.pick(1, 4)
    }
    /// Chunks of 512 tokens of Shakespeare for the key calibration.
    fn calib_chunks(self) -> usize {
        self.pick(4, 16)
    }
    /// Rows of the embedding matrix for the matrix codecs.
    fn matrix_rows(self) -> usize {
        self.pick(4096, 16_384)
    }
}

/// The model the KV sections evaluate, loaded on first use (the report may
/// skip those sections, with the reason, when it cannot be loaded).
pub type ModelSource<'a> = &'a dyn Fn() -> std::result::Result<&'a Runtime, tq_llm::LlmError>;

/// Writes the report into `out`: `n` vectors per (codec, dim) of the
/// distortion part (default 4,000, or 20,000 when `size.full`). Real-data
/// sections whose data or model cannot be had say why in the report and are
/// otherwise skipped.
pub fn run(out: &Path, n: Option<usize>, size: Size, model: ModelSource<'_>, progress: &dyn Progress) -> Result<()> {
    let n = n.unwrap_or(size.pick(4000, 20_000));
    let n = if size.quick { n.min(400) } else { n };
    let dims: &[usize] = if size.quick { &[64] } else { &[64, 128, 1536] };
    let rows = distortion::measure(n, dims, size.quick, progress)?;
    create_dir(out)?;
    for &dim in dims {
        distortion::plot(out, dim, &rows)?;
    }
    let mut md = distortion::markdown(dims, &rows, n);
    let mut results = json!({"distortion": distortion::json_rows(&rows), "search": [], "eval": [], "matrix": null, "kv": null, "kv_calibrated": null, "kv_calibrated_window": null});
    if !size.quick {
        for data in ["glove50", "minilm"] {
            let (text, rows) = sections::search(out, data, size, progress)?;
            md.push_str(&text);
            push(&mut results["search"], json!({"data": data, "rows": rows}));
        }
        for data in ["glove50", "minilm", "smollm-embed"] {
            let (text, rows) = sections::codecs(out, data, size, progress)?;
            md.push_str(&text);
            push(&mut results["eval"], json!({"data": data, "rows": rows}));
        }
        let (text, rows) = sections::matrix(size, progress)?;
        md.push_str(&text);
        results["matrix"] = rows;
        let (text, kv) = kv::report_section(out, size, model, progress)?;
        md.push_str(&text);
        for (key, v) in kv {
            results[key] = v;
        }
    }
    write(out, "index.md", md.as_bytes())?;
    write(out, "index.html", plot::html(&md).as_bytes())?;
    let js =
        serde_json::to_string_pretty(&results).map_err(|e| ReportError::Write { path: out.join("results.json").display().to_string(), source: e.into() })?;
    write(out, "results.json", js.as_bytes())
}

fn push(arr: &mut serde_json::Value, v: serde_json::Value) {
    if let Some(a) = arr.as_array_mut() {
        a.push(v);
    }
}

fn create_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|source| ReportError::Write { path: out.display().to_string(), source })
}

fn write(out: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = out.join(name);
    tq_io::write_atomic(&path, bytes).map_err(|source| ReportError::Write { path: path.display().to_string(), source })
}

/// A finite number as JSON, NaN/∞ (no theory) as null.
fn fin(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else {
        serde_json::Value::Null
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
