//! KV caches for the LLM runtime (`tq-llm`): every key and value is stored
//! once, when its token is appended, and attention runs through the cache.
//!
//! - [`F32Cache`]: the reference, f32 keys and values.
//! - [`CodecCache`]: keys and values as codes of any registered vector codec
//!   (TurboQuant, q8_0/q4_0 with or without rotation, FP4, ...), chosen by a
//!   precision ([`KvSpec`], parsed once from a string: `tq-mse-4`, `k4v3`, `q4_0-rot`,
//!   `f16`, ...). Attention is computed on the codes: the query is prepared
//!   once per head (rotated, tables built), keys are scored straight from their
//!   packed codes, and values are accumulated from their codes in the codec's
//!   rotated domain and rotated back once (`Codec::accumulate`), so no
//!   dequantized cache is ever materialized.

#![warn(missing_docs)]

pub mod budget;
pub mod calib;
pub mod plan;
pub mod spec;

pub use budget::{Budget, KvPlan, LayerChoice, LayeredCache, ResolvedPlan};
pub use calib::{CalibrationStats, KeyCalibration};
pub use spec::{KvSpec, Store, PRECISIONS};
use std::borrow::Cow;
use std::sync::Arc;
pub use tq_core::kv_layout::{KvLayout, KV_SCALE_BYTES};
pub use tq_core::KvGeometry;
use tq_core::{Codec, Result, RotationKind, TqError};

/// Where keys and values live. `append` stores one position's K and V for a
/// (layer, KV head); `attend` writes softmax(q·Kᵀ/√d)·V over the first `len`
/// positions of that head into `out`.
pub trait KvCache: Send {
    /// Stores the next position's key `k` and value `v` of (`layer`, `head`).
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]);
    /// Writes softmax(q·Kᵀ/√d)·V of query `q` over the first `len` positions
    /// of (`layer`, `head`) into `out`.
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]);
    /// Attention of the `group` query heads that share KV head `head` (GQA):
    /// `qs` and `out` hold `group` rows each. Default: one `attend` per row;
    /// caches override it to read each key and value once per group.
    fn attend_group(&self, layer: usize, head: usize, qs: &[f32], group: usize, len: usize, out: &mut [f32]) {
        let d = qs.len() / group;
        for (q, o) in qs.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            self.attend(layer, head, q, len, o);
        }
    }
    /// True when attention over the first `len` tokens of `layer`'s streams no
    /// longer depends on tokens appended after them (no recent f32 window, no
    /// stream still collecting training tokens, no group still open): a model
    /// may then append a whole batch and attend its positions in any order,
    /// with the results of one-token-at-a-time appends.
    fn prefix_stable(&self, _layer: usize) -> bool {
        false
    }
    /// Attention of positions `start .. start + n` of `layer` after their
    /// tokens were appended (only when [`prefix_stable`](Self::prefix_stable) for `layer`):
    /// `qs` and `out` hold `n` rows of `kv_heads · group` query heads of `d`.
    /// Default: one `attend_group` after another; caches override it to run
    /// positions in parallel (each output depends only on its own inputs, so
    /// the results do not depend on the thread count).
    #[allow(clippy::too_many_arguments)]
    fn attend_positions(&self, layer: usize, qs: &[f32], kv_heads: usize, group: usize, d: usize, start: usize, out: &mut [f32]) {
        let qd = kv_heads * group * d;
        for (i, (q, o)) in qs.chunks_exact(qd).zip(out.chunks_exact_mut(qd)).enumerate() {
            for kh in 0..kv_heads {
                let r = kh * group * d..(kh + 1) * group * d;
                self.attend_group(layer, kh, &q[r.clone()], group, start + i + 1, &mut o[r]);
            }
        }
    }
    /// Positions stored for (`layer`, `head`).
    fn len(&self, layer: usize, head: usize) -> usize;
    /// True when nothing is stored yet (layer 0, head 0 holds no position).
    fn is_empty(&self) -> bool {
        self.len(0, 0) == 0
    }
    /// Bytes held for keys and values (all layers and heads).
    fn bytes(&self) -> usize;
}

/// One layer's step of a model through a cache: appends `n` tokens' keys and
/// values (`k`, `v`: `n` rows of `kv_heads · d`, token-major) to `layer` and
/// writes the attention of their `n` queries (`q`: `n` rows of
/// `kv_heads · group · d`, the query heads of KV head `kh` at
/// `kh·group .. (kh+1)·group`) into `out` (same shape as `q`). Query `i`
/// attends to the cached tokens up to and including its own, through the
/// codes. Tokens go one at a time while the cache's state still depends on
/// what comes next (windows, streams still training), then the rest as one
/// batch ([`KvCache::attend_positions`]): the results equal one token at a
/// time. The one implementation of a step, for the CPU runtime (`tq-llm`) and
/// the Python wheel's transformers cache alike.
#[allow(clippy::too_many_arguments)]
pub fn append_attend(
    cache: &mut dyn KvCache,
    layer: usize,
    k: &[f32],
    v: &[f32],
    q: &[f32],
    kv_heads: usize,
    group: usize,
    d: usize,
    out: &mut [f32],
) -> Result<()> {
    let (kd, qd) = (kv_heads * d, kv_heads * group * d);
    if kd == 0 || qd == 0 || !k.len().is_multiple_of(kd) {
        return Err(TqError::BadParams(format!("keys of {} floats are not whole rows of {kv_heads} heads × {d}", k.len())));
    }
    let n = k.len() / kd;
    if v.len() != k.len() || q.len() != n * qd || out.len() != q.len() {
        return Err(TqError::BadParams(format!(
            "{n} tokens need values of {} floats and queries/output of {} (got {}, {}, {})",
            n * kd,
            n * qd,
            v.len(),
            q.len(),
            out.len()
        )));
    }
    let start = cache.len(layer, 0);
    let append = |cache: &mut dyn KvCache, i: usize| {
        for kh in 0..kv_heads {
            cache.append(layer, kh, &k[i * kd + kh * d..i * kd + (kh + 1) * d], &v[i * kd + kh * d..i * kd + (kh + 1) * d]);
        }
    };
    let mut i0 = 0;
    while i0 < n && !(n - i0 > 1 && cache.prefix_stable(layer)) {
        append(cache, i0);
        for kh in 0..kv_heads {
            // the query heads kh·group .. (kh+1)·group share this KV head
            let r = i0 * qd + kh * group * d..i0 * qd + (kh + 1) * group * d;
            cache.attend_group(layer, kh, &q[r.clone()], group, start + i0 + 1, &mut out[r]);
        }
        i0 += 1;
    }
    if i0 < n {
        for i in i0..n {
            append(cache, i);
        }
        cache.attend_positions(layer, &q[i0 * qd..], kv_heads, group, d, start + i0, &mut out[i0 * qd..]);
    }
    Ok(())
}

/// Softmax of `scores` in place (max-subtracted), through the kernel table
/// (`tq_core::kernels::Kernels::softmax`: the same bits on every path).
pub fn softmax_weights(scores: &mut [f32]) {
    (tq_core::kernels::kernels().softmax)(scores)
}

pub use tq_core::kernels::scalar::exp_neg;

thread_local! {
    /// Attention scratch (weights, rotated queries): no allocation per call.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with two scratch buffers of `a` and `b` floats (contents unspecified).
fn with_scratch<R>(a: usize, b: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (x, y) = &mut *s;
        if x.len() < a {
            x.resize(a, 0.0);
        }
        if y.len() < b {
            y.resize(b, 0.0);
        }
        f(&mut x[..a], &mut y[..b])
    })
}

/// `attend_positions` in parallel over positions (rayon): `attend(kh, q, len, out)`.
#[allow(clippy::too_many_arguments)]
fn par_positions(qs: &[f32], kv_heads: usize, group: usize, d: usize, start: usize, out: &mut [f32], attend: impl Fn(usize, &[f32], usize, &mut [f32]) + Sync) {
    use rayon::prelude::*;
    let qd = kv_heads * group * d;
    out.par_chunks_exact_mut(qd).zip(qs.par_chunks_exact(qd)).enumerate().for_each(|(i, (o, q))| {
        for kh in 0..kv_heads {
            let r = kh * group * d..(kh + 1) * group * d;
            attend(kh, &q[r.clone()], start + i + 1, &mut o[r]);
        }
    });
}

/// The reference cache: f32 keys and values.
pub struct F32Cache {
    shape: KvGeometry,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl F32Cache {
    /// An empty cache for `shape`.
    pub fn new(shape: KvGeometry) -> Self {
        let n = shape.layers * shape.kv_heads;
        Self { shape, k: vec![Vec::new(); n], v: vec![Vec::new(); n] }
    }
}

impl KvCache for F32Cache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        let i = layer * self.shape.kv_heads + head;
        self.k[i].extend_from_slice(k);
        self.v[i].extend_from_slice(v);
    }
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        let d = self.shape.head_dim;
        let i = layer * self.shape.kv_heads + head;
        let scale = 1.0 / (d as f32).sqrt();
        let (ks, vs) = (&self.k[i], &self.v[i]);
        let dot = tq_core::kernels::kernels().dot;
        let mut p: Vec<f32> = (0..len).map(|t| dot(q, &ks[t * d..(t + 1) * d]) * scale).collect();
        softmax_weights(&mut p);
        out.iter_mut().for_each(|o| *o = 0.0);
        for (t, &w) in p.iter().enumerate() {
            for (o, &x) in out.iter_mut().zip(&vs[t * d..(t + 1) * d]) {
                *o += w * x;
            }
        }
    }
    /// Each key and value row is read once for the whole group.
    fn attend_group(&self, layer: usize, head: usize, qs: &[f32], group: usize, len: usize, out: &mut [f32]) {
        let i = layer * self.shape.kv_heads + head;
        exact_group(&self.k[i], &self.v[i], qs, group, len, self.shape.head_dim, out);
    }
    fn prefix_stable(&self, _layer: usize) -> bool {
        true
    }
    fn attend_positions(&self, layer: usize, qs: &[f32], kv_heads: usize, group: usize, d: usize, start: usize, out: &mut [f32]) {
        par_positions(qs, kv_heads, group, d, start, out, |kh, q, len, o| self.attend_group(layer, kh, q, group, len, o));
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.k[layer * self.shape.kv_heads + head].len() / self.shape.head_dim
    }
    fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|v| 4 * v.len()).sum()
    }
}

/// How one side (K or V) is stored in a [`CodecCache`].
enum Side {
    F16,
    Codec(Box<dyn Codec>),
    /// A codec that learns from data (fractional TurboQuant: its outlier
    /// channels): one instance per (layer, head) stream, trained on the
    /// stream's first [`TRAIN_TOKENS`] vectors.
    PerStream {
        entry: &'static tq_core::CodecEntry,
        seed: u64,
        dim: usize,
        code_size: usize,
        codecs: Vec<Option<Box<dyn Codec>>>,
    },
}

/// Tokens a stream keeps in f32 (attended exactly) before codecs that learn
/// from data are trained on them and they are encoded.
pub const TRAIN_TOKENS: usize = 32;

/// A side of one stream, resolved.
enum SideRef<'a> {
    F16,
    Codec(&'a dyn Codec),
}

impl<'a> SideRef<'a> {
    /// The codebook view of a codebook codec (its codes are stored as
    /// `[packed][bf16 scale]` and attended through the group kernels).
    fn codebook_view(&self) -> Option<tq_core::codec::CodebookView<'a>> {
        match self {
            SideRef::Codec(c) => c.codebook_view(),
            SideRef::F16 => None,
        }
    }
}

impl Side {
    fn new(store: &Store, head_dim: usize, seed: u64, streams: usize) -> Result<Self> {
        match store {
            Store::F16 => Ok(Side::F16),
            Store::Codec(entry) => {
                let c = entry.build(head_dim, seed, RotationKind::Hadamard, &[])?;
                if c.wants_training() {
                    // the fractional TurboQuant codecs pick their outlier channels per stream
                    if !matches!(entry.kind, tq_core::CodecKind::Fractional { .. }) {
                        return Err(TqError::BadParams(format!("{} learns its codebooks from data and cannot encode online", entry.name)));
                    }
                    return Ok(Side::PerStream {
                        entry,
                        seed,
                        dim: head_dim,
                        code_size: KvLayout::of(c.as_ref()).bytes(),
                        codecs: (0..streams).map(|_| None).collect(),
                    });
                }
                Ok(Side::Codec(c))
            }
            Store::F32 => Err(TqError::BadParams("use F32Cache for f32".into())),
            Store::Kivi(_) => Err(TqError::BadParams("KIVI is a cache of its own (KiviCache): it cannot be one side of another precision".into())),
        }
    }
    fn size(&self, d: usize) -> usize {
        match self {
            Side::F16 => 2 * d,
            Side::Codec(c) => KvLayout::of(c.as_ref()).bytes(),
            Side::PerStream { code_size, .. } => *code_size,
        }
    }
    /// The side for stream `i`; `None` while its codec is untrained.
    fn get(&self, i: usize) -> Option<SideRef<'_>> {
        match self {
            Side::F16 => Some(SideRef::F16),
            Side::Codec(c) => Some(SideRef::Codec(c.as_ref())),
            Side::PerStream { codecs, .. } => codecs[i].as_deref().map(SideRef::Codec),
        }
    }
    /// Trains stream `i`'s codec on row-major `rows` (per-stream sides only).
    fn train(&mut self, i: usize, rows: &[f32]) -> Result<()> {
        if let Side::PerStream { entry, seed, dim, codecs, .. } = self {
            let mut c = entry.build(*dim, *seed, RotationKind::Hadamard, &[])?;
            c.train(rows)?;
            codecs[i] = Some(c);
        }
        Ok(())
    }
    /// `encode` of `x − mu` when an offset is given, of `T·(x − mu)` with a
    /// transform too (`scratch` holds what is encoded).
    fn encode_minus(&self, i: usize, x: &[f32], mu: Option<&[f32]>, t: Option<&[f32]>, scratch: &mut Vec<f32>, out: &mut Vec<u8>) {
        match mu {
            Some(mu) => {
                scratch.clear();
                key_input(x, mu, t, scratch);
                self.encode(i, scratch, out);
            }
            None => self.encode(i, x, out),
        }
    }
    fn encode(&self, i: usize, x: &[f32], out: &mut Vec<u8>) {
        match self.get(i) {
            Some(SideRef::F16) => x.iter().for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
            Some(SideRef::Codec(c)) => {
                let n = out.len();
                out.resize(n + c.code_size(), 0);
                c.encode_unchecked(x, &mut out[n..]);
                // [packed][f32 scale] -> [packed][bf16 scale] for codebook codes
                KvLayout::of(c).narrow_in_place(out, n);
            }
            None => unreachable!("encode before training"),
        }
    }
}

/// A compressed cache: keys and values as codes (see the crate docs), with
/// optional full-precision windows: the first `sink` tokens (attention sinks)
/// and the `recent` most recent ones are also kept in f32 and attended
/// exactly while they are in their window (every token is still encoded once,
/// on arrival, and its code is used once it leaves the recent window).
pub struct CodecCache {
    shape: KvGeometry,
    keys: Side,
    values: Side,
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    len: Vec<usize>,
    sink: usize,
    recent: usize,
    /// per stream: f32 keys/values of the first `sink` tokens
    sink_k: Vec<Vec<f32>>,
    sink_v: Vec<Vec<f32>>,
    /// per stream: ring of the last `recent` tokens (slot = position mod recent)
    ring_k: Vec<Vec<f32>>,
    ring_v: Vec<Vec<f32>>,
    /// with `recent_q8`: the ring as q8_0 codes (then `ring_k/ring_v` are empty)
    ring_q8: Option<Box<dyn Codec>>,
    ring_kq: Vec<Vec<u8>>,
    ring_vq: Vec<Vec<u8>>,
    /// per stream: f32 keys/values not encoded yet (a side still training)
    pending_k: Vec<Vec<f32>>,
    pending_v: Vec<Vec<f32>>,
    center_keys: bool,
    /// per stream: the key offset μ subtracted before encoding (empty until
    /// learned with `center_keys`; from the calibration with `calibration`)
    kmu: Vec<Vec<f32>>,
    /// calibrated key transforms (keys encoded as T·(k − μ), queries as T⁻¹q)
    calib: Option<Arc<KeyCalibration>>,
    /// recent tokens are encoded when they leave the window ([`CacheOptions::delayed`])
    delayed: bool,
    /// per stream: tokens with codes (all of them unless `delayed`)
    coded: Vec<usize>,
}

/// `T·(x − mu)` (or `x − mu` without a transform) appended to `out`.
fn key_input(x: &[f32], mu: &[f32], t: Option<&[f32]>, out: &mut Vec<f32>) {
    let diff = x.iter().zip(mu).map(|(a, m)| a - m);
    match t {
        Some(t) => mat_vec(t, &diff.collect::<Vec<f32>>(), out),
        None => out.extend(diff),
    }
}

/// The first `n` stored codes of a stream as the codec's own codes: borrowed
/// when the cache stores them whole, widened (bf16 scales back to f32) when
/// it narrows them ([`KvLayout::narrows`]; codecs without a codebook view).
fn codec_codes<'a>(c: &dyn Codec, stored: &'a [u8], n: usize) -> Cow<'a, [u8]> {
    let l = KvLayout::of(c);
    if !l.narrows() {
        return Cow::Borrowed(&stored[..n * c.code_size()]);
    }
    let mut out = Vec::with_capacity(n * c.code_size());
    stored[..n * l.bytes()].chunks_exact(l.bytes()).for_each(|s| l.widen(s, &mut out));
    Cow::Owned(out)
}

/// `m·x` (row-major `m` with `x.len()` columns) appended to `out`.
fn mat_vec(m: &[f32], x: &[f32], out: &mut Vec<f32>) {
    let dot = tq_core::kernels::kernels().dot;
    out.extend(m.chunks_exact(x.len()).map(|row| dot(row, x)));
}

/// A window token's key and value (borrowed f32, or decoded q8_0).
type KeyValue<'a> = (Cow<'a, [f32]>, Cow<'a, [f32]>);

/// Options of a compressed cache beyond its precision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheOptions {
    /// Also keep the first `sink` tokens (attention sinks) in f32.
    pub sink: usize,
    /// Also keep the `recent` most recent tokens in f32.
    pub recent: usize,
    /// Encode keys minus a per-stream offset μ (the mean of the stream's keys
    /// 1..[`TRAIN_TOKENS`], learned online like the fractional codecs' split).
    /// Exact for attention: q·(k − μ) differs from q·k by q·μ, the same for
    /// every token of a query, and softmax ignores it; but the codes see the
    /// smaller ‖k − μ‖, so the error of every score shrinks with it.
    pub center_keys: bool,
    /// Hold the recent window as q8_0 codes (8.5 bits per value) instead of
    /// f32 (sinks stay f32).
    pub recent_q8: bool,
    /// Encode a recent-window token only when it leaves the window (from its
    /// window copy: f32, or q8_0 with `recent_q8`), so the window costs its own
    /// bytes and no codes beside them. Needs `recent`; not with `center_keys`
    /// or fractional precisions (their streams train before encoding).
    pub delayed: bool,
    /// Calibrated key transforms ([`calib`]): keys are encoded as T·(k − μ)
    /// with the calibration's μ and T, queries scored as T⁻¹q. Exclusive with
    /// `center_keys` (it brings its own offset).
    pub calibration: Option<Arc<KeyCalibration>>,
}

impl CodecCache {
    /// A cache for a precision string (not `f32`: use [`F32Cache`]). Codecs
    /// are seeded per cache (`seed`), the same for every layer and head.
    pub fn new(shape: KvGeometry, spec: &KvSpec, seed: u64) -> Result<Self> {
        Self::with_options(shape, spec, seed, &CacheOptions::default())
    }

    /// With f32 windows and/or key centering (see [`CacheOptions`]).
    pub fn with_options(shape: KvGeometry, spec: &KvSpec, seed: u64, o: &CacheOptions) -> Result<Self> {
        let (sink, recent) = (o.sink, o.recent);
        for (field, v) in [("sink", sink), ("recent", recent)] {
            if v > tq_core::limits::MAX_WINDOW_TOKENS {
                return Err(TqError::BadParams(format!(
                    "--{field} {v} exceeds the largest window of {} tokens (tq_core::limits::MAX_WINDOW_TOKENS)",
                    tq_core::limits::MAX_WINDOW_TOKENS
                )));
            }
        }
        let n = shape.layers * shape.kv_heads;
        if let Some(c) = &o.calibration {
            c.check_shape(shape)?;
            if o.center_keys {
                return Err(TqError::BadParams("--center-keys and a key calibration both set the key offset: choose one".into()));
            }
        }
        let keys = Side::new(&spec.keys, shape.head_dim, seed, n)?;
        let values = Side::new(&spec.values, shape.head_dim, tq_core::rng::kv_value_seed(seed), n)?;
        if o.delayed {
            if recent == 0 {
                return Err(TqError::BadParams("delayed encoding needs a recent window (--recent N)".into()));
            }
            let trains = |s: &Side| matches!(s, Side::PerStream { .. });
            if o.center_keys || trains(&keys) || trains(&values) {
                return Err(TqError::BadParams(
                    "delayed encoding does not combine with --center-keys or fractional precisions (their streams train on their first tokens before encoding)"
                        .into(),
                ));
            }
        }
        let kmu = match &o.calibration {
            Some(c) => (0..n).map(|i| c.mu(i).to_vec()).collect(),
            None => vec![Vec::new(); n],
        };
        let ring_q8 = if o.recent_q8 && recent > 0 { Some(tq_core::build("q8_0", shape.head_dim, 0, RotationKind::Hadamard)?) } else { None };
        Ok(Self {
            shape,
            keys,
            values,
            k: vec![Vec::new(); n],
            v: vec![Vec::new(); n],
            len: vec![0; n],
            sink,
            recent,
            sink_k: vec![Vec::new(); n],
            sink_v: vec![Vec::new(); n],
            ring_k: vec![vec![0.0; if ring_q8.is_some() { 0 } else { recent * shape.head_dim }]; n],
            ring_v: vec![vec![0.0; if ring_q8.is_some() { 0 } else { recent * shape.head_dim }]; n],
            ring_kq: vec![vec![0; recent * ring_q8.as_ref().map_or(0, |c| c.code_size())]; n],
            ring_vq: vec![vec![0; recent * ring_q8.as_ref().map_or(0, |c| c.code_size())]; n],
            ring_q8,
            pending_k: vec![Vec::new(); n],
            pending_v: vec![Vec::new(); n],
            center_keys: o.center_keys,
            kmu,
            calib: o.calibration.clone(),
            delayed: o.delayed,
            coded: vec![0; n],
        })
    }

    /// Appends the codes of the next uncoded token of stream `i`.
    fn encode_token(&mut self, i: usize, k: &[f32], v: &[f32], scratch: &mut Vec<f32>) {
        let mu = (!self.kmu[i].is_empty()).then_some(&self.kmu[i][..]);
        let t = self.calib.as_ref().map(|c| c.t(i));
        self.keys.encode_minus(i, k, mu, t, scratch, &mut self.k[i]);
        self.values.encode(i, v, &mut self.v[i]);
        self.coded[i] += 1;
    }

    /// Whether stream `i` still holds its tokens in f32 (a side or the key
    /// offset has not learned from them yet).
    fn collecting(&self, i: usize) -> bool {
        self.keys.get(i).is_none() || self.values.get(i).is_none() || (self.center_keys && self.kmu[i].is_empty())
    }

    /// The key and value of token `t` of stream `i` if it is in a window
    /// (with `total` tokens appended): f32, or decoded from the q8_0 ring.
    fn window(&self, i: usize, t: usize, total: usize) -> Option<KeyValue<'_>> {
        let d = self.shape.head_dim;
        if t < self.sink {
            return Some((Cow::Borrowed(&self.sink_k[i][t * d..(t + 1) * d]), Cow::Borrowed(&self.sink_v[i][t * d..(t + 1) * d])));
        }
        if self.recent > 0 && t + self.recent >= total && t < total {
            let slot = t % self.recent;
            if let Some(c) = &self.ring_q8 {
                let cs = c.code_size();
                let dec = |codes: &[u8]| {
                    let mut x = vec![0.0f32; d];
                    c.decode_unchecked(&codes[slot * cs..(slot + 1) * cs], &mut x);
                    Cow::Owned(x)
                };
                return Some((dec(&self.ring_kq[i]), dec(&self.ring_vq[i])));
            }
            let s = slot * d;
            return Some((Cow::Borrowed(&self.ring_k[i][s..s + d]), Cow::Borrowed(&self.ring_v[i][s..s + d])));
        }
        None
    }

    /// Learns stream `i`'s key offset and trains its sides on the pending
    /// tokens. On non-finite input nothing is learned and the stream stays in
    /// f32 (exact).
    fn learn(&mut self, i: usize, d: usize) {
        let pk = &self.pending_k[i];
        if !pk.iter().chain(&self.pending_v[i]).all(|x| x.is_finite()) {
            return;
        }
        let mu: Vec<f32> = if self.calib.is_some() {
            self.kmu[i].clone()
        } else if self.center_keys {
            // tokens 1.. (token 0 is often an attention sink with an atypical key)
            let rows: Vec<&[f32]> = pk.chunks_exact(d).skip(1).collect();
            let mut m = vec![0.0f64; d];
            for r in &rows {
                m.iter_mut().zip(*r).for_each(|(a, &x)| *a += x as f64);
            }
            m.iter().map(|a| (a / rows.len() as f64) as f32).collect()
        } else {
            Vec::new()
        };
        let t = self.calib.as_ref().map(|c| c.t(i));
        let centered: Vec<f32> = if mu.is_empty() {
            pk.clone()
        } else {
            let mut rows = Vec::with_capacity(pk.len());
            pk.chunks_exact(d).for_each(|r| key_input(r, &mu, t, &mut rows));
            rows
        };
        if self.keys.train(i, &centered).is_ok() && self.values.train(i, &self.pending_v[i]).is_ok() {
            self.kmu[i] = mu;
        }
    }

    /// Attention of `group` query heads (rows of `qs`) over the first `len`
    /// tokens of stream `i`: scores from the codes (group kernels for codebook
    /// codecs, the codec's scorer otherwise), window tokens exactly, softmax,
    /// values from the codes in the codec's domain, window values in f32.
    fn attend_core(&self, i: usize, qs: &[f32], group: usize, len: usize, out: &mut [f32]) {
        let d = self.shape.head_dim;
        let scale = 1.0 / (d as f32).sqrt();
        let k = tq_core::kernels::kernels();
        let total = self.len[i];
        if self.collecting(i) {
            // still collecting training tokens: all of them are in f32
            return exact_group(&self.pending_k[i], &self.pending_v[i], qs, group, len, d, out);
        }
        let (Some(keys), Some(values)) = (self.keys.get(i), self.values.get(i)) else { unreachable!("trained above") };
        // codebook codes (stored as [packed][bf16 scale]) go through the group kernels
        let (kview, vview) = (keys.codebook_view(), values.codebook_view());
        // with calibrated transforms the codes hold T·(k − μ): score them with T⁻¹q
        let qt: Cow<[f32]> = match &self.calib {
            Some(c) => {
                let mut t = Vec::with_capacity(qs.len());
                qs.chunks_exact(d).for_each(|q| mat_vec(c.t_inv(i), q, &mut t));
                Cow::Owned(t)
            }
            None => Cow::Borrowed(qs),
        };
        let qk: &[f32] = &qt;
        // tokens with codes; the rest (delayed encoding) are all in the recent window
        let nc = self.coded[i].min(len);
        with_scratch(group * len, group * d, |p, qr| {
            // ---- scores ----
            match (&keys, kview) {
                (SideRef::Codec(kc), Some(kv)) => {
                    for (r, q) in qr.chunks_exact_mut(d).zip(qk.chunks_exact(d)) {
                        r.copy_from_slice(kc.prepare_unchecked(q).rotated());
                    }
                    let kcs = KvLayout::of(*kc).bytes();
                    // rows of `len`: the kernel fills the first `nc` of each
                    (k.group_scores)(&self.k[i][..nc * kcs], kcs, kv.bits, kv.table, qr, d, scale, p);
                }
                (SideRef::Codec(kc), None) => {
                    let codes = codec_codes(*kc, &self.k[i], nc);
                    for (g, q) in qk.chunks_exact(d).enumerate() {
                        let pq = kc.prepare_unchecked(q);
                        let row = &mut p[g * len..g * len + nc];
                        kc.score_ip_many(&pq, &codes, row);
                        row.iter_mut().for_each(|s| *s *= scale);
                    }
                }
                (SideRef::F16, _) => {
                    for (g, q) in qk.chunks_exact(d).enumerate() {
                        for t in 0..nc {
                            let kb = &self.k[i][t * 2 * d..(t + 1) * 2 * d];
                            p[g * len + t] =
                                q.iter().zip(kb.chunks_exact(2)).map(|(a, b)| a * half::f16::from_le_bytes([b[0], b[1]]).to_f32()).sum::<f32>() * scale;
                        }
                    }
                }
            }
            // the tokens `window` serves: the sinks, then the recent ones (two ranges, not a scan)
            let recent_from = if self.recent > 0 { self.sink.max(total.saturating_sub(self.recent)) } else { usize::MAX };
            let windowed: Vec<usize> = (0..self.sink.min(len)).chain(recent_from..total.min(len)).collect();
            // the codes score q·(k − μ) when centering: window scores drop q·μ too
            let qmu: Vec<f32> = qs.chunks_exact(d).map(|q| if self.kmu[i].is_empty() { 0.0 } else { (k.dot)(q, &self.kmu[i]) }).collect();
            let wins: Vec<_> = windowed.iter().map(|&t| self.window(i, t, total).expect("a window token")).collect();
            for (&t, (kt, _)) in windowed.iter().zip(&wins) {
                for (g, q) in qs.chunks_exact(d).enumerate() {
                    p[g * len + t] = ((k.dot)(q, kt) - qmu[g]) * scale;
                }
            }
            p.chunks_exact_mut(len).for_each(softmax_weights);
            // window weights are applied in f32 after the codes' pass
            let wwin: Vec<f32> =
                windowed.iter().flat_map(|&t| (0..group).map(move |g| (g, t))).map(|(g, t)| std::mem::replace(&mut p[g * len + t], 0.0)).collect();
            // ---- values ----
            out.iter_mut().for_each(|o| *o = 0.0);
            match (&values, vview) {
                (SideRef::Codec(vc), Some(vv)) => {
                    let vcs = KvLayout::of(*vc).bytes();
                    // the first `nc` weights of each row (window weights are already taken out)
                    (k.group_values)(&self.v[i][..nc * vcs], vcs, vv.bits, vv.table, p, d, out);
                    out.chunks_exact_mut(d).for_each(|o| vc.finish_accumulated(o));
                }
                (SideRef::Codec(vc), None) => {
                    let cs = vc.code_size();
                    let codes = codec_codes(*vc, &self.v[i], nc);
                    for (g, o) in out.chunks_exact_mut(d).enumerate() {
                        for t in 0..nc {
                            vc.accumulate(&codes[t * cs..(t + 1) * cs], p[g * len + t], o);
                        }
                        vc.finish_accumulated(o);
                    }
                }
                (SideRef::F16, _) => {
                    for (g, o) in out.chunks_exact_mut(d).enumerate() {
                        for t in 0..nc {
                            let w = p[g * len + t];
                            let vb = &self.v[i][t * 2 * d..(t + 1) * 2 * d];
                            for (x, b) in o.iter_mut().zip(vb.chunks_exact(2)) {
                                *x += w * half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                            }
                        }
                    }
                }
            }
            for (j, (_, vt)) in wins.iter().enumerate() {
                for (g, o) in out.chunks_exact_mut(d).enumerate() {
                    let w = wwin[j * group + g];
                    o.iter_mut().zip(vt.iter()).for_each(|(a, &x)| *a += w * x);
                }
            }
        });
    }
}

impl KvCache for CodecCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        let i = layer * self.shape.kv_heads + head;
        let t = self.len[i];
        let mut centered = Vec::new();
        if self.collecting(i) {
            // sides and the key offset learn from this stream's first tokens: hold them in f32
            self.pending_k[i].extend_from_slice(k);
            self.pending_v[i].extend_from_slice(v);
            if t + 1 == TRAIN_TOKENS {
                self.learn(i, k.len());
                if !self.collecting(i) {
                    let (pk, pv) = (std::mem::take(&mut self.pending_k[i]), std::mem::take(&mut self.pending_v[i]));
                    for (kr, vr) in pk.chunks_exact(k.len()).zip(pv.chunks_exact(v.len())) {
                        self.encode_token(i, kr, vr, &mut centered);
                    }
                }
            }
        } else if self.delayed && t >= self.sink {
            // the token leaving the recent window (unless it is a sink) gets its codes now, from its window copy
            if t >= self.recent && t - self.recent >= self.sink {
                let (kw, vw) = self.window(i, t - self.recent, t).map(|(a, b)| (a.into_owned(), b.into_owned())).expect("the oldest window token");
                self.encode_token(i, &kw, &vw, &mut centered);
            }
        } else {
            self.encode_token(i, k, v, &mut centered);
        }
        if t < self.sink {
            self.sink_k[i].extend_from_slice(k);
            self.sink_v[i].extend_from_slice(v);
        }
        if self.recent > 0 {
            let slot = t % self.recent;
            if let Some(c) = &self.ring_q8 {
                let cs = c.code_size();
                c.encode_unchecked(k, &mut self.ring_kq[i][slot * cs..(slot + 1) * cs]);
                c.encode_unchecked(v, &mut self.ring_vq[i][slot * cs..(slot + 1) * cs]);
            } else {
                let s = slot * self.shape.head_dim;
                self.ring_k[i][s..s + k.len()].copy_from_slice(k);
                self.ring_v[i][s..s + v.len()].copy_from_slice(v);
            }
        }
        self.len[i] += 1;
    }

    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        self.attend_core(layer * self.shape.kv_heads + head, q, 1, len, out);
    }

    /// Each key and value code is read (decoded, for codebook codecs) once
    /// and shared by the group's query heads.
    fn attend_group(&self, layer: usize, head: usize, qs: &[f32], group: usize, len: usize, out: &mut [f32]) {
        self.attend_core(layer * self.shape.kv_heads + head, qs, group, len, out);
    }

    /// Codes never change once written; only the recent window and the
    /// training phase depend on what comes later.
    fn prefix_stable(&self, layer: usize) -> bool {
        let h = self.shape.kv_heads;
        self.recent == 0 && (layer * h..(layer + 1) * h).all(|i| !self.collecting(i))
    }
    fn attend_positions(&self, layer: usize, qs: &[f32], kv_heads: usize, group: usize, d: usize, start: usize, out: &mut [f32]) {
        par_positions(qs, kv_heads, group, d, start, out, |kh, q, len, o| self.attend_core(layer * kv_heads + kh, q, group, len, o));
    }
    fn len(&self, layer: usize, head: usize) -> usize {
        self.len[layer * self.shape.kv_heads + head]
    }

    /// Codes of every coded token plus the windows (and tokens awaiting training).
    fn bytes(&self) -> usize {
        let d = self.shape.head_dim;
        let pending: usize = self.pending_k.iter().chain(&self.pending_v).map(|p| 4 * p.len()).sum();
        let codes = self.coded.iter().sum::<usize>() * (self.keys.size(d) + self.values.size(d)) + pending;
        let sinks: usize = self.len.iter().map(|&l| l.min(self.sink)).sum();
        let recents: usize = self.len.iter().map(|&l| l.saturating_sub(self.sink).min(self.recent)).sum();
        let recent_bytes = self.ring_q8.as_ref().map_or(4 * d, |c| c.code_size());
        // learned offsets are per sequence; a calibration's are static per model (like its transforms)
        let offsets: usize = if self.calib.is_some() { 0 } else { self.kmu.iter().map(|m| 4 * m.len()).sum() };
        codes + sinks * 2 * 4 * d + recents * 2 * recent_bytes + offsets
    }
}

/// Exact attention of `group` query heads over f32 rows.
fn exact_group(ks: &[f32], vs: &[f32], qs: &[f32], group: usize, len: usize, d: usize, out: &mut [f32]) {
    let scale = 1.0 / (d as f32).sqrt();
    let dot = tq_core::kernels::kernels().dot;
    with_scratch(group * len, 0, |p, _| {
        for (t, kt) in ks[..len * d].chunks_exact(d).enumerate() {
            for (g, q) in qs.chunks_exact(d).enumerate() {
                p[g * len + t] = dot(q, kt) * scale;
            }
        }
        p.chunks_exact_mut(len).for_each(softmax_weights);
        out.iter_mut().for_each(|o| *o = 0.0);
        for (t, vt) in vs[..len * d].chunks_exact(d).enumerate() {
            for (g, o) in out.chunks_exact_mut(d).enumerate() {
                let w = p[g * len + t];
                o.iter_mut().zip(vt).for_each(|(a, &x)| *a += w * x);
            }
        }
    })
}

/// KIVI (`kivi-B`): keys quantized per channel and values per token, both in
/// groups of 32 (min/max integer codes with f16 scale and zero), as soon as a
/// stream completes a group of [`KIVI_GROUP`] tokens; the incomplete group (the
/// residual, fewer than 32 tokens) stays in f32. Attention decodes one group
/// (32 tokens) at a time into scratch, so no dequantized cache is kept.
pub struct KiviCache {
    shape: KvGeometry,
    keys: tq_core::baselines::kivi::Kivi,
    values: tq_core::baselines::kivi::Kivi,
    /// per stream: encoded groups (keys, values), `group_bytes` each
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    /// per stream: the residual tokens in f32
    res_k: Vec<Vec<f32>>,
    res_v: Vec<Vec<f32>>,
    len: Vec<usize>,
}

/// The rows of the group of tokens starting at `g0`: decoded into `block` when
/// the group is complete (`g0 < coded`), else the f32 residual.
fn kivi_rows<'a>(codec: &tq_core::baselines::kivi::Kivi, codes: &[u8], residual: &'a [f32], g0: usize, coded: usize, block: &'a mut [f32]) -> &'a [f32] {
    use tq_core::matrix::MatrixCodec;
    if g0 < coded {
        let gb = codec.encoded_size(KIVI_GROUP);
        codec.decode_unchecked(&codes[g0 / KIVI_GROUP * gb..(g0 / KIVI_GROUP + 1) * gb], KIVI_GROUP, block);
        block
    } else {
        residual
    }
}

/// Tokens per KIVI group (keys per channel, values per token over 32 channels).
pub const KIVI_GROUP: usize = tq_core::baselines::kivi::DEFAULT_GROUP;

impl KiviCache {
    /// An empty cache for `shape` with `bits`-bit keys and values (`bits` in
    /// 1..=8, else an error).
    pub fn new(shape: KvGeometry, bits: u32) -> Result<Self> {
        use tq_core::baselines::kivi::Kivi;
        use tq_core::matrix::Axis;
        let n = shape.layers * shape.kv_heads;
        Ok(Self {
            shape,
            keys: Kivi::new(shape.head_dim, bits, KIVI_GROUP, Axis::PerChannel)?,
            values: Kivi::new(shape.head_dim, bits, KIVI_GROUP, Axis::PerToken)?,
            k: vec![Vec::new(); n],
            v: vec![Vec::new(); n],
            res_k: vec![Vec::new(); n],
            res_v: vec![Vec::new(); n],
            len: vec![0; n],
        })
    }
}

impl KvCache for KiviCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        use tq_core::matrix::MatrixCodec;
        let i = layer * self.shape.kv_heads + head;
        self.res_k[i].extend_from_slice(k);
        self.res_v[i].extend_from_slice(v);
        self.len[i] += 1;
        if self.res_k[i].len() == KIVI_GROUP * self.shape.head_dim {
            for (codec, res, out) in [(&self.keys, &mut self.res_k[i], &mut self.k[i]), (&self.values, &mut self.res_v[i], &mut self.v[i])] {
                let at = out.len();
                out.resize(at + codec.encoded_size(KIVI_GROUP), 0);
                codec.encode_unchecked(res, KIVI_GROUP, &mut out[at..]);
                res.clear();
            }
        }
    }

    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        self.attend_group(layer, head, q, 1, len, out);
    }

    fn attend_group(&self, layer: usize, head: usize, qs: &[f32], group: usize, len: usize, out: &mut [f32]) {
        use tq_core::matrix::MatrixCodec;
        let d = self.shape.head_dim;
        let i = layer * self.shape.kv_heads + head;
        let scale = 1.0 / (d as f32).sqrt();
        let dot = tq_core::kernels::kernels().dot;
        let coded = self.k[i].len() / self.keys.encoded_size(KIVI_GROUP) * KIVI_GROUP;
        // rows of token t: decoded from its group, or from the residual
        let mut block = vec![0.0f32; KIVI_GROUP * d];
        with_scratch(group * len, 0, |p, _| {
            for g0 in (0..len).step_by(KIVI_GROUP) {
                let rows = kivi_rows(&self.keys, &self.k[i], &self.res_k[i], g0, coded, &mut block);
                for t in g0..len.min(g0 + KIVI_GROUP) {
                    let kt = &rows[(t - g0) * d..(t - g0 + 1) * d];
                    for (g, q) in qs.chunks_exact(d).enumerate() {
                        p[g * len + t] = dot(q, kt) * scale;
                    }
                }
            }
            p.chunks_exact_mut(len).for_each(softmax_weights);
            out.iter_mut().for_each(|o| *o = 0.0);
            for g0 in (0..len).step_by(KIVI_GROUP) {
                let rows = kivi_rows(&self.values, &self.v[i], &self.res_v[i], g0, coded, &mut block);
                for t in g0..len.min(g0 + KIVI_GROUP) {
                    let vt = &rows[(t - g0) * d..(t - g0 + 1) * d];
                    for (g, o) in out.chunks_exact_mut(d).enumerate() {
                        let w = p[g * len + t];
                        o.iter_mut().zip(vt).for_each(|(a, &x)| *a += w * x);
                    }
                }
            }
        });
    }

    fn len(&self, layer: usize, head: usize) -> usize {
        self.len[layer * self.shape.kv_heads + head]
    }

    /// Encoded groups plus the f32 residuals.
    fn bytes(&self) -> usize {
        let codes: usize = self.k.iter().chain(&self.v).map(Vec::len).sum();
        codes + self.res_k.iter().chain(&self.res_v).map(|r| 4 * r.len()).sum::<usize>()
    }
}

/// A cache for a precision: `f32` gives the reference cache.
pub fn cache_for(shape: KvGeometry, spec: &KvSpec, seed: u64) -> Result<Box<dyn KvCache>> {
    cache_with(shape, spec, seed, &CacheOptions::default())
}

/// A cache with options (see [`CacheOptions`]; the f32 cache is exact and
/// ignores them).
pub fn cache_with(shape: KvGeometry, s: &KvSpec, seed: u64, o: &CacheOptions) -> Result<Box<dyn KvCache>> {
    if s.budget.is_some() {
        let Some(plan) = &s.plan else {
            return Err(TqError::BadParams(format!(
                "the budget precision '{}' has no plan yet: plan it for the model first (tq kv plan, or tq_llm::budget::resolve)",
                s.name
            )));
        };
        if *o != CacheOptions::default() {
            return Err(TqError::BadParams(
                "a budget plan chooses its own windows and key transforms: drop --sink/--recent/--center-keys/--calib with a budget precision".into(),
            ));
        }
        return Ok(Box::new(LayeredCache::new(shape, plan, seed)?));
    }
    if s.is_f32() {
        return Ok(Box::new(F32Cache::new(shape)));
    }
    if let (Store::Kivi(bits), Store::Kivi(_)) = (&s.keys, &s.values) {
        if *o != CacheOptions::default() {
            return Err(TqError::BadParams(
                "KIVI keeps its own f32 residual (the incomplete group of 32 tokens) and per-channel key scales; --sink/--recent/--center-keys apply to the other caches".into(),
            ));
        }
        return Ok(Box::new(KiviCache::new(shape, *bits)?));
    }
    Ok(Box::new(CodecCache::with_options(shape, s, seed, o)?))
}
