//! The quick report end to end: files written, every TurboQuant codec's
//! measured distortion beside its exact theory, and an argument error.

use std::sync::atomic::{AtomicU64, Ordering};

struct Count(AtomicU64, AtomicU64);
impl tq_report::Progress for Count {
    fn stage(&self, _: &str, total: u64, _: &str) {
        self.0.fetch_add(total, Ordering::Relaxed);
    }
    fn inc(&self, k: u64) {
        self.1.fetch_add(k, Ordering::Relaxed);
    }
}

#[test]
fn quick_report_matches_theory_and_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let progress = Count(AtomicU64::new(0), AtomicU64::new(0));
    // the quick report never needs the model
    let model = || -> Result<&tq_llm::eval::Runtime, tq_llm::LlmError> { Err(tq_llm::LlmError::Msg("no model in this test".into())) };
    tq_report::run(&out, Some(300), tq_report::Size { quick: true, full: false }, &model, &progress).unwrap();
    for f in ["index.md", "index.html", "results.json", "distortion_d64.svg"] {
        assert!(out.join(f).metadata().unwrap().len() > 100, "{f}");
    }
    let (total, done) = (progress.0.load(Ordering::Relaxed), progress.1.load(Ordering::Relaxed));
    assert!(total > 0 && done == total, "progress: {done} of {total} vectors");
    let md = std::fs::read_to_string(out.join("index.md")).unwrap();
    assert!(md.contains("## d = 64") && md.contains("## Hadamard vs Haar rotation"), "{md}");
    let js: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let rows = js["distortion"].as_array().unwrap();
    let mse: Vec<_> = rows.iter().filter(|r| r["codec"].as_str().unwrap().starts_with("tq-mse-") && r["rotation"] == "hadamard").collect();
    assert!(mse.len() >= 8, "{} tq-mse rows", mse.len());
    for r in mse {
        let (m, se, t) = (r["d_mse"].as_f64().unwrap(), r["d_mse_stderr"].as_f64().unwrap(), r["d_mse_theory"].as_f64());
        // fractional widths have no closed-form theory (null)
        if let Some(t) = t {
            assert!((m - t).abs() < 5.0 * se + 0.02 * t, "{}: measured {m} ± {se}, theory {t}", r["codec"]);
        }
    }
}

#[test]
fn distortion_refuses_too_few_vectors() {
    let e = tq_report::distortion("tq-mse-4", 64, 1, 0, tq_core::RotationKind::Hadamard, &tq_report::Silent).unwrap_err();
    assert!(e.to_string().contains("at least 2"), "{e}");
    let e = tq_report::distortion("tq-nope-4", 64, 10, 0, tq_core::RotationKind::Hadamard, &tq_report::Silent).unwrap_err();
    assert!(e.to_string().contains("unknown codec"), "{e}");
}
