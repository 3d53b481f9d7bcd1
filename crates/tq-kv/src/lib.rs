//! KV caches for the LLM runtime (`tq-models`): every key and value is stored
//! once, when its token is appended, and attention runs through the cache.
//!
//! - [`F32Cache`]: the reference, f32 keys and values.
//! - [`CodecCache`]: keys and values as codes of any registered vector codec
//!   (TurboQuant, q8_0/q4_0 with or without rotation, FP4, ...), chosen by a
//!   precision string (`tq_core::kv::KvSpec`: `tq-mse-4`, `k4v3`, `q4_0-rot`,
//!   `f16`, ...). Attention is computed on the codes: the query is prepared
//!   once per head (rotated, tables built), keys are scored straight from their
//!   packed codes, and values are accumulated from their codes in the codec's
//!   rotated domain and rotated back once (`Codec::accumulate`), so no
//!   dequantized cache is ever materialized.

use tq_core::kv::{KvSpec, Store};
use tq_core::{Codec, Result, RotationKind, TqError};

/// Where keys and values live. `append` stores one position's K and V for a
/// (layer, KV head); `attend` writes softmax(q·Kᵀ/√d)·V over the first `len`
/// positions of that head into `out`.
pub trait KvCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]);
    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]);
    fn len(&self, layer: usize, head: usize) -> usize;
    fn is_empty(&self) -> bool {
        self.len(0, 0) == 0
    }
    /// Bytes held for keys and values (all layers and heads).
    fn bytes(&self) -> usize;
}

/// Geometry of a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Softmax of `scores` (in place, max-subtracted) then `out = Σ p_t v_t`.
pub fn softmax_weights(scores: &mut [f32]) {
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - m).exp();
        z += *s;
    }
    let inv = 1.0 / z;
    scores.iter_mut().for_each(|s| *s *= inv);
}

/// The reference cache: f32 keys and values.
pub struct F32Cache {
    shape: Shape,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl F32Cache {
    pub fn new(shape: Shape) -> Self {
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
}

impl Side {
    fn new(store: &Store, head_dim: usize, seed: u64) -> Result<Self> {
        match store {
            Store::F16 => Ok(Side::F16),
            Store::Codec(name) => {
                let c = tq_core::build(name, head_dim, seed, RotationKind::Hadamard)?;
                if c.wants_training() && !matches!(name.as_str(), n if n.starts_with("rabitq-")) {
                    return Err(TqError::BadParams(format!("{name} learns from data and cannot encode online")));
                }
                Ok(Side::Codec(c))
            }
            Store::F32 => Err(TqError::BadParams("use F32Cache for f32".into())),
            Store::Kivi(_) => Err(TqError::BadParams("KIVI groups 32 tokens before quantizing; not available online yet".into())),
        }
    }
    fn size(&self, d: usize) -> usize {
        match self {
            Side::F16 => 2 * d,
            Side::Codec(c) => c.code_size(),
        }
    }
    fn encode(&self, x: &[f32], out: &mut Vec<u8>) {
        match self {
            Side::F16 => x.iter().for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
            Side::Codec(c) => {
                let n = out.len();
                out.resize(n + c.code_size(), 0);
                c.encode_unchecked(x, &mut out[n..]);
            }
        }
    }
}

/// A compressed cache: keys and values as codes (see the crate docs).
pub struct CodecCache {
    shape: Shape,
    keys: Side,
    values: Side,
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    len: Vec<usize>,
}

impl CodecCache {
    /// A cache for a precision string (not `f32`: use [`F32Cache`]). Codecs
    /// are seeded per cache (`seed`), the same for every layer and head.
    pub fn new(shape: Shape, spec: &KvSpec, seed: u64) -> Result<Self> {
        let n = shape.layers * shape.kv_heads;
        Ok(Self {
            shape,
            keys: Side::new(&spec.keys, shape.head_dim, seed)?,
            values: Side::new(&spec.values, shape.head_dim, tq_core::rng::derive_seed(seed, 0x56))?,
            k: vec![Vec::new(); n],
            v: vec![Vec::new(); n],
            len: vec![0; n],
        })
    }
}

impl KvCache for CodecCache {
    fn append(&mut self, layer: usize, head: usize, k: &[f32], v: &[f32]) {
        let i = layer * self.shape.kv_heads + head;
        self.keys.encode(k, &mut self.k[i]);
        self.values.encode(v, &mut self.v[i]);
        self.len[i] += 1;
    }

    fn attend(&self, layer: usize, head: usize, q: &[f32], len: usize, out: &mut [f32]) {
        let d = self.shape.head_dim;
        let i = layer * self.shape.kv_heads + head;
        let scale = 1.0 / (d as f32).sqrt();
        let mut p = vec![0.0f32; len];
        match &self.keys {
            Side::F16 => {
                for (t, o) in p.iter_mut().enumerate() {
                    let kb = &self.k[i][t * 2 * d..(t + 1) * 2 * d];
                    *o = q.iter().zip(kb.chunks_exact(2)).map(|(a, b)| a * half::f16::from_le_bytes([b[0], b[1]]).to_f32()).sum();
                }
            }
            Side::Codec(c) => {
                let pq = c.prepare_unchecked(q);
                c.score_ip_many(&pq, &self.k[i][..len * c.code_size()], &mut p);
            }
        }
        p.iter_mut().for_each(|s| *s *= scale);
        softmax_weights(&mut p);
        out.iter_mut().for_each(|o| *o = 0.0);
        match &self.values {
            Side::F16 => {
                for (t, &w) in p.iter().enumerate() {
                    let vb = &self.v[i][t * 2 * d..(t + 1) * 2 * d];
                    for (o, b) in out.iter_mut().zip(vb.chunks_exact(2)) {
                        *o += w * half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
            }
            Side::Codec(c) => {
                let cs = c.code_size();
                for (t, &w) in p.iter().enumerate() {
                    c.accumulate(&self.v[i][t * cs..(t + 1) * cs], w, out);
                }
                c.finish_accumulated(out);
            }
        }
    }

    fn len(&self, layer: usize, head: usize) -> usize {
        self.len[layer * self.shape.kv_heads + head]
    }

    fn bytes(&self) -> usize {
        let d = self.shape.head_dim;
        self.len.iter().sum::<usize>() * (self.keys.size(d) + self.values.size(d))
    }
}

/// A cache for a precision string: `f32` gives the reference cache.
pub fn cache_for(shape: Shape, spec: &str, seed: u64) -> Result<Box<dyn KvCache>> {
    let s = KvSpec::parse(spec)?;
    if s.keys == Store::F32 && s.values == Store::F32 {
        return Ok(Box::new(F32Cache::new(shape)));
    }
    Ok(Box::new(CodecCache::new(shape, &s, seed)?))
}
