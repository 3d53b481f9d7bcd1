//! What `tq bench cuda` runs, as a library: the correctness checks of the
//! kernels against the CPU (encode bytes; decode attention against an f64
//! reference on random and real keys/values, one and several query tokens)
//! and the decode-attention timings over packed caches. Precisions and
//! geometries come in as values (the caller parses strings and reads files);
//! progress lines go to a `log` callback; nothing here prints.

use std::collections::HashMap;

use serde_json::{json, Value};
use tq_core::registry::CodecEntry;
use tq_core::rng::Xoshiro256;
use tq_core::KvGeometry;

use crate::{kv_sides, AttnShape, Error, Gpu, Result, SideSpec};

/// A KV precision the kernels take: its name and the two sides' codecs.
#[derive(Clone, Debug)]
pub struct Precision {
    /// The precision string (`tq-mse-4`, `k4v3`, ...).
    pub name: String,
    /// Codec of the keys.
    pub keys: &'static CodecEntry,
    /// Codec of the values.
    pub values: &'static CodecEntry,
}

impl Precision {
    /// The GPU sides at `head_dim` (values seeded by `kv_value_seed`).
    pub fn sides(&self, head_dim: usize, seed: u64) -> Result<(SideSpec, SideSpec)> {
        kv_sides(self.keys, self.values, head_dim, seed)
    }
}

/// A model geometry of the grid, with its label.
#[derive(Clone, Debug)]
pub struct Geometry {
    /// Label in the results (`llama3-8b`, ...).
    pub label: String,
    /// Query heads, KV heads and head_dim (`layers` is ignored).
    pub heads: KvGeometry,
}

/// Real keys, values and queries of a model (`tq kv dump`), one layer after another.
#[derive(Clone, Debug)]
pub struct RealKv {
    /// Layers dumped.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Query heads per layer.
    pub q_heads: usize,
    /// Tokens per head.
    pub tokens: usize,
    /// head_dim.
    pub head_dim: usize,
    /// `[layer][kv_head][token][d]`.
    pub k: Vec<f32>,
    /// Like `k`.
    pub v: Vec<f32>,
    /// The last token's queries, `[layer][q_head][d]`.
    pub q: Vec<f32>,
}

/// What the checks run.
pub struct Checks<'a> {
    /// Precisions of the one-token and real-data attention checks.
    pub precisions: &'a [Precision],
    /// Precisions of the several-query-token checks.
    pub multi_token: &'a [Precision],
    /// Geometries of the random-data checks.
    pub geometries: &'a [Geometry],
    /// Real data for the last check, if any.
    pub real: Option<&'a RealKv>,
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
fn attention_case(gpu: &Gpu, p: &Precision, shape: &AttnShape, k: &[f32], v: &[f32], q: &[f32]) -> Result<Vec<(String, f64)>> {
    let (ks, vs) = p.sides(shape.heads.head_dim, 0)?;
    let (kc, kd) = cpu_codes(&ks, k)?;
    let (vc, vd) = cpu_codes(&vs, v)?;
    let reference = crate::reference_attention(shape, q, &kd, &vd);
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
            return Err(Error::Cuda(format!("{} ({name}): output element {i} is {} (unwritten or overflowed)", p.name, out[i])));
        }
        res.push((name, crate::rel_error(&out, &reference)));
    }
    gpu.force_simt(false);
    gpu.force_splits(None);
    Ok(res)
}

/// Every check: `{"card", "checks": [...], "failures": [...]}`; the caller
/// decides what a non-empty `failures` means (an error, for `--check`).
// `!(e <= bound)` on purpose: a NaN error must fail the check
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn check(gpu: &Gpu, c: &Checks<'_>, log: &dyn Fn(&str)) -> Result<Value> {
    let card = gpu.name()?;
    log(&format!("card: {card} ({} SMs)", gpu.sm_count()));
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
            log(&format!("encode {name} d={d}: {bad} of {n} codes differ from the CPU"));
            results.push(json!({"check": "encode", "codec": name, "head_dim": d, "vectors": n, "mismatched_codes": bad}));
            if bad > 0 {
                failures.push(format!("encode {name} d={d}: {bad} codes differ"));
            }
        }
    }
    let mut record = |p: &Precision, kernel: &str, e: f64, what: String, row: Value| {
        log(&format!("attention {} [{kernel}] {what}: rel error {e:.2e}", p.name));
        results.push(row);
        if !(e <= 1e-3) {
            failures.push(format!("attention {} [{kernel}] {what}: rel error {e:.2e}", p.name));
        }
    };
    // 2. attention on random data, ragged batch
    for g in c.geometries {
        let (hq, hkv, d) = (g.heads.q_heads, g.heads.kv_heads, g.heads.head_dim);
        let shape = AttnShape::decode(KvGeometry { layers: 1, ..g.heads }, vec![1, 129, 700, 2085]);
        let rows = shape.batch() * hkv * shape.max_len();
        let (k, v, q) = (gaussian(rows * d, 1), gaussian(rows * d, 2), gaussian(shape.batch() * hq * d, 3));
        for p in c.precisions {
            for (kernel, e) in attention_case(gpu, p, &shape, &k, &v, &q)? {
                let row =
                    json!({"check": "attention", "data": "random", "kv": p.name, "kernel": kernel, "geometry": g.label, "lens": shape.lens, "rel_error": e});
                record(p, &kernel, e, format!("{} random lens {:?}", g.label, shape.lens), row);
            }
        }
    }
    // 2b. several query tokens per sequence (a step verifying drafted tokens):
    // each token sees the cache up to itself; the shortest sequence holds
    // only the step's tokens, so its first query token sees one cached token
    for g in c.geometries {
        let (hq, hkv, d) = (g.heads.q_heads, g.heads.kv_heads, g.heads.head_dim);
        // Llama-3: 8 and 32 rows per KV head; SmolLM2: 12; Qwen2.5: 12 (groups of 6)
        for nq in if d == 64 || hq / hkv == 6 { vec![if d == 64 { 4 } else { 2 }] } else { vec![2, 8] } {
            let shape = AttnShape { heads: KvGeometry { layers: 1, ..g.heads }, lens: vec![nq, 129, 700, 2085], q_tokens: nq };
            let rows = shape.batch() * hkv * shape.max_len();
            let (k, v, q) = (gaussian(rows * d, 11), gaussian(rows * d, 12), gaussian(shape.batch() * nq * hq * d, 13));
            for p in c.multi_token {
                for (kernel, e) in attention_case(gpu, p, &shape, &k, &v, &q)? {
                    let row = json!({"check": "attention", "data": "random", "kv": p.name, "kernel": kernel, "geometry": g.label, "lens": shape.lens, "q_tokens": nq, "rel_error": e});
                    record(p, &kernel, e, format!("{} {nq} query tokens, random lens {:?}", g.label, shape.lens), row);
                }
            }
        }
    }
    // 3. attention on real keys, values and queries
    if let Some(r) = c.real {
        let d = r.head_dim;
        for layer in 0..r.layers {
            let shape = AttnShape::decode(KvGeometry { layers: 1, q_heads: r.q_heads, kv_heads: r.kv_heads, head_dim: d }, vec![r.tokens]);
            let n = r.kv_heads * r.tokens * d;
            let (k, v) = (&r.k[layer * n..(layer + 1) * n], &r.v[layer * n..(layer + 1) * n]);
            let q = &r.q[layer * r.q_heads * d..(layer + 1) * r.q_heads * d];
            for p in c.precisions {
                for (kernel, e) in attention_case(gpu, p, &shape, k, v, q)? {
                    let row = json!({"check": "attention", "data": "smollm2-real", "kv": p.name, "kernel": kernel, "layer_index": layer, "tokens": r.tokens, "rel_error": e});
                    record(p, &kernel, e, format!("smollm2 real layer #{layer} ({} tokens)", r.tokens), row);
                }
            }
        }
    }
    // 4. bad input gives errors, not crashes
    let (ks, vs) = kv_sides(tq_core::lookup("tq-mse-4")?, tq_core::lookup("tq-mse-4")?, 128, 0)?;
    let shape = AttnShape::decode(KvGeometry { layers: 1, q_heads: 8, kv_heads: 2, head_dim: 128 }, vec![5]);
    if gpu.upload_kv(&shape, &ks, &vs, &[0u8; 10], &[0u8; 10]).is_ok() {
        failures.push("mismatched code buffer accepted".into());
    }
    Ok(json!({"card": card, "checks": results, "failures": failures}))
}

/// What the benchmark times.
#[derive(Clone, Debug)]
pub struct Grid {
    /// Sequences per batch.
    pub batches: Vec<usize>,
    /// Cached tokens per sequence.
    pub contexts: Vec<usize>,
    /// Query tokens per sequence and step (1 ..= `MAX_Q_TOKENS`).
    pub q_tokens: Vec<usize>,
    /// KV precisions.
    pub precisions: Vec<Precision>,
    /// Model geometries.
    pub geometries: Vec<Geometry>,
    /// Also time the fp32 SIMT kernel where the tensor-core one applies.
    pub simt: bool,
}

impl Grid {
    /// Refuses what the kernels cannot run (before a device is opened).
    pub fn check(&self) -> Result<()> {
        if let Some(n) = self.q_tokens.iter().find(|&&n| n == 0 || n > crate::MAX_Q_TOKENS) {
            return Err(Error::Unsupported(format!("{n} query tokens per sequence: the kernels take 1 to {}", crate::MAX_Q_TOKENS)));
        }
        Ok(())
    }
}

/// SDPA timings to compare with: (batch, context, q_heads, kv_heads, head_dim, q_tokens) → ms.
pub type SdpaTimes = HashMap<(usize, usize, usize, usize, usize, usize), f64>;

/// Decode-attention timings, one JSON row per (geometry, batch, context,
/// query tokens, precision, kernel), with `sdpa`'s time beside where known.
pub fn bench(gpu: &Gpu, grid: &Grid, sdpa: &SdpaTimes, log: &dyn Fn(&str)) -> Result<Vec<Value>> {
    grid.check()?;
    let card = gpu.name()?;
    let copy = gpu.copy_gbps(2 << 30)?;
    log(&format!("card: {card}; device copy {copy:.0} GB/s (read + write)"));
    let mut rows = Vec::new();
    for g in &grid.geometries {
        let (geo, hq, hkv, d) = (g.label.as_str(), g.heads.q_heads, g.heads.kv_heads, g.heads.head_dim);
        for &b in &grid.batches {
            for &t in &grid.contexts {
                for &nq in &grid.q_tokens {
                    for (p, simt) in grid.precisions.iter().flat_map(|p| [(p, false), (p, true)]) {
                        let (ks, vs) = p.sides(d, 0)?;
                        if simt && !(grid.simt && ks.rotated() && vs.rotated()) {
                            continue; // ggml formats have the SIMT kernel only
                        }
                        gpu.force_simt(simt);
                        let shape = AttnShape { heads: KvGeometry { layers: 1, ..g.heads }, lens: vec![t; b], q_tokens: nq };
                        let bytes = b * hkv * t * (ks.kind.bytes_per_vector(d) + vs.kind.bytes_per_vector(d));
                        let copies = (1usize << 28).div_ceil(bytes).clamp(1, 16);
                        let mut kv = gpu.random_kv(&shape, &ks, &vs, copies, 1)?;
                        let q = gaussian(b * nq * hq * d, 4);
                        let ms = gpu.time_attend(&mut kv, &q, 3, 20)?;
                        // the same step replayed as a CUDA graph (no launch gaps); a failed capture is reported, not fatal
                        let graph_ms =
                            gpu.time_attend_graph(&mut kv, &q, 3, 20).map_err(|e| log(&format!("graph capture of {} B={b} T={t}: {e}", p.name))).ok();
                        let gbps = kv.bytes_read() as f64 / (ms * 1e-3) / 1e9;
                        let sd = sdpa.get(&(b, t, hq, hkv, d, nq)).copied();
                        let (regs, local_bytes, blocks_per_sm) = kv.occupancy()?;
                        let pn = p.name.as_str();
                        let row = json!({"card": card, "codec": pn, "kernel": kv.kernel, "geometry": geo, "batch": b, "context": t, "q_tokens": nq,
                            "q_heads": hq, "kv_heads": hkv, "head_dim": d, "kernel_ms": ms, "graph_ms": graph_ms, "sdpa_bf16_ms": sd, "speedup": sd.map(|s| s / ms),
                            "graph_speedup": sd.zip(graph_ms).map(|(s, g)| s / g),
                            "gbps": gbps, "copy_gbps": copy, "bandwidth_fraction": gbps / copy, "cache_bytes": kv.bytes_read(), "splits": kv.splits(),
                            "registers": regs, "local_bytes": local_bytes, "blocks_per_sm": blocks_per_sm});
                        log(&format!(
                            "{geo:13} B={b:2} T={t:6} nq={nq} {pn:8} {:8}: {ms:8.4} ms (graph {})  {gbps:6.0} GB/s ({:3.0}% of copy)  SDPA {}  [{regs} regs, {local_bytes} B local, {blocks_per_sm} blocks/SM, {} splits]",
                            kv.kernel,
                            graph_ms.map(|g| format!("{g:.4} ms")).unwrap_or_else(|| "-".into()),
                            100.0 * gbps / copy,
                            sd.map(|s| format!("{s:.4} ms, {:.2}x", s / ms)).unwrap_or_else(|| "-".into()),
                            kv.splits()
                        ));
                        rows.push(row);
                    }
                }
            }
        }
    }
    gpu.force_simt(false);
    Ok(rows)
}
