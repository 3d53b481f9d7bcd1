//! `tq bench cuda`: the precisions, geometries, real data and SDPA timings of
//! `tq_cuda::suite` (the checks of the kernels against the CPU and the
//! decode-attention benchmark), parsed and read here; results are JSON lines.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tq_cuda::suite::{self, Geometry, Precision, RealKv, SdpaTimes};
use tq_cuda::Gpu;

/// Precisions the benchmark and checks run (keys/values as `tq_kv` names them).
const PRECISIONS: [&str; 6] = ["tq-mse-4", "tq-mse-3", "tq-mse-2", "k4v3", "q8_0", "q4_0"];
/// Precisions of the several-query-token checks.
const MULTI_TOKEN: [&str; 4] = ["tq-mse-4", "tq-mse-3", "k4v3", "q8_0"];
/// (label, model of the planner's table)
const GEOMETRIES: [(&str, &str); 3] = [("llama3-8b", "llama-3.1-8b"), ("smollm2-135m", "smollm2-135m"), ("qwen2.5-1.5b", "qwen2.5-1.5b")];

fn log(m: &str) {
    eprintln!("{m}");
}

fn geometries() -> Result<Vec<Geometry>> {
    GEOMETRIES.iter().map(|&(label, model)| Ok(Geometry { label: label.into(), heads: tq_kv::plan::model(model)?.geometry })).collect()
}

/// A KV precision the GPU kernels take (parsed once; both sides codecs).
fn precision(name: &str) -> Result<Precision> {
    let spec: tq_kv::KvSpec = name.parse()?;
    let (Some(keys), Some(values)) = (spec.keys.codec(), spec.values.codec()) else {
        bail!("KV precision '{name}': the GPU kernels take tq-mse-B, tq-mse-B-nc, kBvC, q8_0 and q4_0");
    };
    let p = Precision { name: name.to_string(), keys, values };
    p.sides(128, 0)?; // the kernels take both sides
    Ok(p)
}

fn precisions<S: AsRef<str>>(names: &[S]) -> Result<Vec<Precision>> {
    names.iter().map(|n| precision(n.as_ref())).collect()
}

/// Real keys/values/queries dumped by `tq kv dump` (last-position queries).
fn read_dump(dir: &Path) -> Result<RealKv> {
    let d = tq_llm::eval::KvDump::load(dir)?;
    let get = |k: &str| d.meta[k].as_u64().map(|x| x as usize).with_context(|| format!("{}/meta.json lacks {k}", dir.display()));
    let (layers, kv_heads, q_heads, tokens) = (get("layers")?, get("kv_heads")?, get("q_heads")?, get("tokens")?);
    if d.k.len() != layers * kv_heads * tokens * d.head_dim || d.v.len() != d.k.len() || d.q.len() != layers * q_heads * d.head_dim {
        bail!("the dump in {} does not match its meta.json", dir.display());
    }
    Ok(RealKv { layers, kv_heads, q_heads, tokens, head_dim: d.head_dim, k: d.k, v: d.v, q: d.q })
}

/// `tq bench cuda --check`: every check, an error if any fails.
pub fn check(real: Option<&Path>) -> Result<Value> {
    let gpu = Gpu::new(0)?;
    let real = real.map(read_dump).transpose()?;
    let mut one = precisions(&PRECISIONS)?;
    one.push(precision("tq-mse-4-nc")?);
    let c = suite::Checks { precisions: &one, multi_token: &precisions(&MULTI_TOKEN)?, geometries: &geometries()?, real: real.as_ref() };
    let summary = suite::check(&gpu, &c, &log)?;
    let failures: Vec<&str> = summary["failures"].as_array().map(|a| a.iter().filter_map(|f| f.as_str()).collect()).unwrap_or_default();
    if !failures.is_empty() {
        println!("{}", serde_json::to_string(&summary)?);
        bail!("{} CUDA checks failed: {}", failures.len(), failures.join("; "));
    }
    Ok(summary)
}

/// What `tq bench cuda` times, from the command's lists (an empty list takes the default).
pub struct GridArgs {
    pub quick: bool,
    pub batches: Vec<usize>,
    pub contexts: Vec<usize>,
    pub q_tokens: Vec<usize>,
    pub kv: Vec<String>,
    pub geometries: Vec<String>,
    pub no_simt: bool,
}

/// `tq bench cuda`: decode-attention timings (JSON lines) merged with SDPA's.
pub fn bench(sdpa: Option<&Path>, a: GridArgs) -> Result<Vec<Value>> {
    let or = |v: Vec<usize>, d: &[usize]| if v.is_empty() { d.to_vec() } else { v };
    let all = geometries()?;
    let geometries = if a.geometries.is_empty() {
        all
    } else {
        let known = || GEOMETRIES.map(|x| x.0).join(", ");
        a.geometries
            .iter()
            .map(|g| all.iter().find(|x| x.label == *g).cloned().with_context(|| format!("unknown geometry '{g}' (known: {})", known())))
            .collect::<Result<_>>()?
    };
    let grid = suite::Grid {
        batches: or(a.batches, if a.quick { &[8] } else { &[1, 8, 32] }),
        contexts: or(a.contexts, if a.quick { &[32768] } else { &[8192, 32768, 131072] }),
        q_tokens: or(a.q_tokens, &[1]),
        precisions: if a.kv.is_empty() { precisions(&PRECISIONS)? } else { precisions(&a.kv)? },
        geometries,
        simt: !a.no_simt,
    };
    grid.check()?;
    let mut base = SdpaTimes::new();
    if let Some(p) = sdpa {
        for line in std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.lines() {
            let v: Value = serde_json::from_str(line)?;
            let g = |k: &str| v[k].as_u64().unwrap_or(0) as usize;
            if let Some(ms) = v["sdpa_bf16_ms"].as_f64() {
                base.insert((g("batch"), g("context"), g("q_heads"), g("kv_heads"), g("head_dim"), g("q_tokens").max(1)), ms);
            }
        }
    }
    Ok(suite::bench(&Gpu::new(0)?, &grid, &base, &log)?)
}
