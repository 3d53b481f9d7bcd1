//! `tq bench cuda`: correctness of the CUDA kernels against the CPU (encode
//! bytes, decode attention vs an f64 reference on random and real SmolLM2
//! keys/values) and timings of fused decode attention over packed caches,
//! merged with PyTorch SDPA (bf16) timings taken on the same card in the
//! same device call (`scripts/sdpa_bench.py`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tq_core::rng::Xoshiro256;
use tq_core::KvGeometry;
use tq_cuda::{kv_sides, AttnShape, Gpu, SideSpec};

/// Precisions the benchmark and checks run (keys/values as `tq_kv` names them).
pub const PRECISIONS: [&str; 6] = ["tq-mse-4", "tq-mse-3", "tq-mse-2", "k4v3", "q8_0", "q4_0"];
/// (name, q_heads, kv_heads, head_dim)
pub const GEOMETRIES: [(&str, &str); 3] = [("llama3-8b", "llama-3.1-8b"), ("smollm2-135m", "smollm2-135m"), ("qwen2.5-1.5b", "qwen2.5-1.5b")];

/// (label, query heads, KV heads, head_dim) of the benchmark geometries, from the model table.
fn geometries() -> Result<Vec<(&'static str, usize, usize, usize)>> {
    GEOMETRIES
        .iter()
        .map(|&(label, model)| {
            let g = tq_kv::plan::model(model)?.geometry;
            Ok((label, g.q_heads, g.kv_heads, g.head_dim))
        })
        .collect()
}

/// The GPU sides of a KV precision (parsed once; both sides must be codecs the kernels take).
fn sides(precision: &str, head_dim: usize, seed: u64) -> Result<(SideSpec, SideSpec)> {
    let spec: tq_kv::KvSpec = precision.parse()?;
    let (Some(k), Some(v)) = (spec.keys.codec(), spec.values.codec()) else {
        bail!("KV precision '{precision}': the GPU kernels take tq-mse-B, tq-mse-B-nc, kBvC, q8_0 and q4_0");
    };
    Ok(kv_sides(k, v, head_dim, seed)?)
}

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Xoshiro256::new(seed);
    (0..n).map(|_| r.gaussian() as f32).collect()
}

/// CPU codes and their decoded values for `n` vectors.
fn cpu_codes(side: &SideSpec, xs: &[f32]) -> Result<(Vec<u8>, Vec<f32>)> {
    let c = side.codec();
    let mut codes = vec![0u8; xs.len() / side.head_dim * c.code_size()];
    c.encode_batch(xs, &mut codes)?;
    let mut dec = vec![0.0f32; xs.len()];
    c.decode_batch(&codes, &mut dec)?;
    Ok((codes, dec))
}

/// Runs one attention check: CPU-encoded caches → GPU attention vs f64 reference.
/// Returns (kernel, relative error) for each attention kernel that applies.
fn attention_case(gpu: &Gpu, precision: &str, shape: &AttnShape, k: &[f32], v: &[f32], q: &[f32]) -> Result<Vec<(String, f64)>> {
    let (ks, vs) = sides(precision, shape.heads.head_dim, 0)?;
    let (kc, kd) = cpu_codes(&ks, k)?;
    let (vc, vd) = cpu_codes(&vs, v)?;
    let reference = tq_cuda::reference_attention(shape, q, &kd, &vd);
    let mut res: Vec<(String, f64)> = Vec::new();
    // both kernels, with the automatic split count and with one split per
    // sequence (every tile of a sequence in one block: the multi-tile loops)
    for (simt, splits) in [(false, None), (false, Some(1)), (true, None), (true, Some(1))] {
        gpu.force_simt(simt);
        gpu.force_splits(splits);
        let mut kv = gpu.upload_kv(shape, &ks, &vs, &kc, &vc)?;
        let name = format!("{}{}", kv.kernel, if splits.is_some() { ", 1 split" } else { "" });
        if res.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let out = gpu.attend(&mut kv, q)?;
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            bail!("{precision} ({name}): output element {i} is {} (unwritten or overflowed)", out[i]);
        }
        res.push((name, tq_cuda::rel_error(&out, &reference)));
    }
    gpu.force_simt(false);
    gpu.force_splits(None);
    Ok(res)
}

/// Real keys/values/queries dumped by `tq kv dump` (npy files in `dir`).
struct Dump {
    layers: usize,
    kv_heads: usize,
    q_heads: usize,
    tokens: usize,
    d: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

fn read_dump(dir: &Path) -> Result<Dump> {
    let meta: Value = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).with_context(|| format!("{}/meta.json", dir.display()))?)?;
    let get = |k: &str| meta[k].as_u64().map(|x| x as usize).with_context(|| format!("meta.json lacks {k}"));
    let (layers, kv_heads, q_heads, tokens, d) = (get("layers")?, get("kv_heads")?, get("q_heads")?, get("tokens")?, get("head_dim")?);
    let m = |name: &str| tq_data::vectors::read_vectors(&dir.join(name));
    let (k, v, q) = (m("k.npy")?, m("v.npy")?, m("q.npy")?);
    if k.cols != d || k.data.len() != layers * kv_heads * tokens * d || v.data.len() != k.data.len() || q.data.len() != layers * q_heads * d {
        bail!("the dump in {} does not match its meta.json", dir.display());
    }
    Ok(Dump { layers, kv_heads, q_heads, tokens, d, k: k.data, v: v.data, q: q.data })
}

/// `tq bench cuda --check`: every check, an error if any fails.
// `!(e <= bound)` on purpose: a NaN error must fail the check
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn check(real: Option<&Path>) -> Result<Value> {
    let gpu = Gpu::new(0)?;
    let card = gpu.name()?;
    eprintln!("card: {card} ({} SMs)", gpu.sm_count());
    let mut results = Vec::new();
    let mut failures = Vec::new();
    // 1. encode: bytes identical to the CPU encoder, including edge cases
    for d in [64usize, 128] {
        for name in ["tq-mse-2", "tq-mse-3", "tq-mse-4", "tq-mse-4-nc", "tq-mse-3-nc"] {
            let side = SideSpec::new(tq_core::lookup(name)?, d, 42)?;
            let n = 4096;
            let mut xs = gaussian(n * d, 7 + d as u64);
            xs[..d].iter_mut().for_each(|x| *x = 0.0); // zero vector
            xs[d..2 * d].iter_mut().for_each(|x| *x *= 1e-30); // Σx² underflows f32
            xs[2 * d..3 * d].iter_mut().for_each(|x| *x *= 1e17); // Σx² overflows f32
            xs[3 * d..4 * d].iter_mut().enumerate().for_each(|(i, x)| *x = (i == 0) as u8 as f32); // one-hot
            let gpu_codes = gpu.encode(&side, &xs)?;
            let (cpu, _) = cpu_codes(&side, &xs)?;
            let cs = side.codec().code_size();
            let bad = gpu_codes.chunks_exact(cs).zip(cpu.chunks_exact(cs)).filter(|(a, b)| a != b).count();
            eprintln!("encode {name} d={d}: {bad} of {n} codes differ from the CPU");
            results.push(json!({"check": "encode", "codec": name, "head_dim": d, "vectors": n, "mismatched_codes": bad}));
            if bad > 0 {
                failures.push(format!("encode {name} d={d}: {bad} codes differ"));
            }
        }
    }
    // 2. attention on random data, ragged batch
    for &(geo, hq, hkv, d) in &geometries()? {
        let shape = AttnShape::decode(KvGeometry { layers: 1, q_heads: hq, kv_heads: hkv, head_dim: d }, vec![1, 129, 700, 2085]);
        let t = shape.max_len();
        let rows = shape.batch() * hkv * t;
        let (k, v, q) = (gaussian(rows * d, 1), gaussian(rows * d, 2), gaussian(shape.batch() * hq * d, 3));
        for p in PRECISIONS.iter().chain(&["tq-mse-4-nc"]) {
            for (kernel, e) in attention_case(&gpu, p, &shape, &k, &v, &q)? {
                eprintln!("attention {p} {geo} [{kernel}] random lens {:?}: rel error {e:.2e}", shape.lens);
                results.push(json!({"check": "attention", "data": "random", "kv": p, "kernel": kernel, "geometry": geo, "lens": shape.lens, "rel_error": e}));
                if !(e <= 1e-3) {
                    failures.push(format!("attention {p} {geo} [{kernel}] random: rel error {e:.2e}"));
                }
            }
        }
    }
    // 2b. several query tokens per sequence (a step verifying drafted tokens):
    // each token sees the cache up to itself; the shortest sequence holds
    // only the step's tokens, so its first query token sees one cached token
    for &(geo, hq, hkv, d) in &geometries()? {
        // Llama-3: 8 and 32 rows per KV head; SmolLM2: 12; Qwen2.5: 12 (groups of 6)
        for nq in if d == 64 || hq / hkv == 6 { vec![if d == 64 { 4 } else { 2 }] } else { vec![2, 8] } {
            let heads = KvGeometry { layers: 1, q_heads: hq, kv_heads: hkv, head_dim: d };
            let shape = AttnShape { heads, lens: vec![nq, 129, 700, 2085], q_tokens: nq };
            let rows = shape.batch() * hkv * shape.max_len();
            let (k, v, q) = (gaussian(rows * d, 11), gaussian(rows * d, 12), gaussian(shape.batch() * nq * hq * d, 13));
            for p in ["tq-mse-4", "tq-mse-3", "k4v3", "q8_0"] {
                for (kernel, e) in attention_case(&gpu, p, &shape, &k, &v, &q)? {
                    eprintln!("attention {p} {geo} [{kernel}] {nq} query tokens, random lens {:?}: rel error {e:.2e}", shape.lens);
                    results.push(json!({"check": "attention", "data": "random", "kv": p, "kernel": kernel, "geometry": geo, "lens": shape.lens, "q_tokens": nq, "rel_error": e}));
                    if !(e <= 1e-3) {
                        failures.push(format!("attention {p} {geo} [{kernel}] {nq} query tokens, random: rel error {e:.2e}"));
                    }
                }
            }
        }
    }
    // 3. attention on real SmolLM2 keys, values and queries
    if let Some(dir) = real {
        let dump = read_dump(dir)?;
        let d = dump.d;
        for layer in 0..dump.layers {
            let shape = AttnShape::decode(KvGeometry { layers: 1, q_heads: dump.q_heads, kv_heads: dump.kv_heads, head_dim: d }, vec![dump.tokens]);
            let n = dump.kv_heads * dump.tokens * d;
            let (k, v) = (&dump.k[layer * n..(layer + 1) * n], &dump.v[layer * n..(layer + 1) * n]);
            let q = &dump.q[layer * dump.q_heads * d..(layer + 1) * dump.q_heads * d];
            for p in PRECISIONS.iter().chain(&["tq-mse-4-nc"]) {
                for (kernel, e) in attention_case(&gpu, p, &shape, k, v, q)? {
                    eprintln!("attention {p} [{kernel}] smollm2 real layer #{layer} ({} tokens): rel error {e:.2e}", dump.tokens);
                    results.push(json!({"check": "attention", "data": "smollm2-real", "kv": p, "kernel": kernel, "layer_index": layer, "tokens": dump.tokens, "rel_error": e}));
                    if !(e <= 1e-3) {
                        failures.push(format!("attention {p} [{kernel}] real layer #{layer}: rel error {e:.2e}"));
                    }
                }
            }
        }
    }
    // 4. bad input gives errors, not crashes
    let (ks, vs) = sides("tq-mse-4", 128, 0)?;
    let shape = AttnShape::decode(KvGeometry { layers: 1, q_heads: 8, kv_heads: 2, head_dim: 128 }, vec![5]);
    let wrong = gpu.upload_kv(&shape, &ks, &vs, &[0u8; 10], &[0u8; 10]);
    if wrong.is_ok() {
        failures.push("mismatched code buffer accepted".into());
    }
    let summary = json!({"card": card, "checks": results, "failures": failures});
    if !failures.is_empty() {
        println!("{}", serde_json::to_string(&summary)?);
        bail!("{} CUDA checks failed: {}", failures.len(), failures.join("; "));
    }
    Ok(summary)
}

/// What `tq bench cuda` times.
pub struct Grid {
    batches: Vec<usize>,
    contexts: Vec<usize>,
    q_tokens: Vec<usize>,
    precisions: Vec<String>,
    geometries: Vec<(&'static str, usize, usize, usize)>,
    simt: bool,
}

impl Grid {
    /// The grid from the command's lists (an empty list takes the default).
    pub fn new(
        quick: bool,
        batches: Vec<usize>,
        contexts: Vec<usize>,
        q_tokens: Vec<usize>,
        kv: Vec<String>,
        geos: Vec<String>,
        no_simt: bool,
    ) -> Result<Self> {
        let or = |v: Vec<usize>, d: &[usize]| if v.is_empty() { d.to_vec() } else { v };
        let all = geometries()?;
        let geometries = if geos.is_empty() {
            all
        } else {
            geos.iter()
                .map(|g| {
                    all.iter().find(|x| x.0 == g).copied().with_context(|| format!("unknown geometry '{g}' (known: {})", GEOMETRIES.map(|x| x.0).join(", ")))
                })
                .collect::<Result<_>>()?
        };
        let precisions = if kv.is_empty() { PRECISIONS.map(String::from).to_vec() } else { kv };
        for p in &precisions {
            sides(p, 128, 0)?; // every precision parses and runs on the GPU
        }
        let q_tokens = or(q_tokens, &[1]);
        if let Some(n) = q_tokens.iter().find(|&&n| n == 0 || n > tq_cuda::MAX_Q_TOKENS) {
            bail!("--q-tokens {n}: 1 to {} query tokens per sequence", tq_cuda::MAX_Q_TOKENS);
        }
        Ok(Self {
            batches: or(batches, if quick { &[8] } else { &[1, 8, 32] }),
            contexts: or(contexts, if quick { &[32768] } else { &[8192, 32768, 131072] }),
            q_tokens,
            precisions,
            geometries,
            simt: !no_simt,
        })
    }
}

/// `tq bench cuda`: decode-attention timings (JSON lines) merged with SDPA's.
pub fn bench(sdpa: Option<&Path>, grid: &Grid) -> Result<Vec<Value>> {
    let gpu = Gpu::new(0)?;
    let card = gpu.name()?;
    let copy = gpu.copy_gbps(2 << 30)?;
    eprintln!("card: {card}; device copy {copy:.0} GB/s (read + write)");
    let mut base: HashMap<(usize, usize, usize, usize, usize, usize), f64> = HashMap::new();
    if let Some(p) = sdpa {
        for line in std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.lines() {
            let v: Value = serde_json::from_str(line)?;
            let g = |k: &str| v[k].as_u64().unwrap_or(0) as usize;
            if let Some(ms) = v["sdpa_bf16_ms"].as_f64() {
                base.insert((g("batch"), g("context"), g("q_heads"), g("kv_heads"), g("head_dim"), g("q_tokens").max(1)), ms);
            }
        }
    }
    let mut rows = Vec::new();
    for &(geo, hq, hkv, d) in &grid.geometries {
        for &b in &grid.batches {
            for &t in &grid.contexts {
                for &nq in &grid.q_tokens {
                    for (p, simt) in grid.precisions.iter().flat_map(|p| [(p.as_str(), false), (p.as_str(), true)]) {
                        let (ks, vs) = sides(p, d, 0)?;
                        if simt && !(grid.simt && ks.rotated() && vs.rotated()) {
                            continue; // ggml formats have the SIMT kernel only
                        }
                        gpu.force_simt(simt);
                        let heads = KvGeometry { layers: 1, q_heads: hq, kv_heads: hkv, head_dim: d };
                        let shape = AttnShape { heads, lens: vec![t; b], q_tokens: nq };
                        let bytes = b * hkv * t * (ks.kind.bytes_per_vector(d) + vs.kind.bytes_per_vector(d));
                        let copies = (1usize << 28).div_ceil(bytes).clamp(1, 16);
                        let mut kv = gpu.random_kv(&shape, &ks, &vs, copies, 1)?;
                        let q = gaussian(b * nq * hq * d, 4);
                        let ms = gpu.time_attend(&mut kv, &q, 3, 20)?;
                        let gbps = kv.bytes_read() as f64 / (ms * 1e-3) / 1e9;
                        let sd = base.get(&(b, t, hq, hkv, d, nq)).copied();
                        let (regs, local_bytes, blocks_per_sm) = kv.occupancy()?;
                        let row = json!({"card": card, "codec": p, "kernel": kv.kernel, "geometry": geo, "batch": b, "context": t, "q_tokens": nq,
                            "q_heads": hq, "kv_heads": hkv, "head_dim": d, "kernel_ms": ms, "sdpa_bf16_ms": sd, "speedup": sd.map(|s| s / ms),
                            "gbps": gbps, "copy_gbps": copy, "bandwidth_fraction": gbps / copy, "cache_bytes": kv.bytes_read(), "splits": kv.splits(),
                            "registers": regs, "local_bytes": local_bytes, "blocks_per_sm": blocks_per_sm});
                        eprintln!(
                            "{geo:13} B={b:2} T={t:6} nq={nq} {p:8} {:8}: {ms:8.4} ms  {gbps:6.0} GB/s ({:3.0}% of copy)  SDPA {}  [{regs} regs, {local_bytes} B local, {blocks_per_sm} blocks/SM, {} splits]",
                            kv.kernel,
                            100.0 * gbps / copy,
                            sd.map(|s| format!("{s:.4} ms, {:.2}x", s / ms)).unwrap_or_else(|| "-".into()),
                            kv.splits()
                        );
                        rows.push(row);
                    }
                }
            }
        }
    }
    gpu.force_simt(false);
    Ok(rows)
}
