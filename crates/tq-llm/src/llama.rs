//! A llama-family forward pass of our own on candle's matmuls (GGUF weights),
//! with a pluggable KV cache: the attention for every position goes through
//! [`KvCache`], so a compressed cache can score keys and accumulate values
//! from its codes. Logits for every position (perplexity) or the last
//! (generation). Checked against llama.cpp's perplexity on SmolLM2.
//!
//! One code path serves the GGUF architectures of [`ARCHITECTURES`]; what
//! differs between them is read from the file: the metadata prefix, head
//! counts and widths, norm ε, RoPE base, biases on the Q/K/V projections
//! (present as tensors or not), a separate output matrix or the tied token
//! embedding. The RoPE pairing is the architecture's (llama.cpp's rope type):
//! `llama` uses the interleaved ("normal", GGML) form, for which the GGUF
//! converter permutes the Q/K weights so that adjacent pairs `(2i, 2i+1)`
//! rotate together; `qwen2` uses the NeoX form, pairs `(i, i + d/2)`.

use std::path::Path;

use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Tensor};
use tq_kv::{KvCache, KvGeometry};

use crate::error::{bail, LlmError, Result};
use crate::gguf::Gguf;

/// The GGUF architectures (`general.architecture`) the forward pass runs.
pub const ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// Largest context a GGUF may declare (the RoPE tables hold `context × head_dim`
/// floats).
pub const MAX_CONTEXT: usize = 1 << 20;
/// Largest layer count a GGUF may declare.
pub const MAX_LAYERS: usize = 1024;

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rope {
    /// Adjacent pairs `(2i, 2i+1)` (llama.cpp's "normal" rope type).
    Interleaved,
    /// Halves: pairs `(i, i + d/2)` (llama.cpp's NeoX rope type).
    NeoX,
}

/// The model's hyperparameters, read from the GGUF metadata (`{arch}.*`).
#[derive(Clone, Debug)]
pub struct Config {
    /// `general.architecture` (one of [`ARCHITECTURES`]).
    pub arch: String,
    /// `general.name`, else the file name.
    pub name: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: usize,
    /// Dimension of one head (`{arch}.attention.key_length`, else `embed / heads`).
    pub head_dim: usize,
    /// Width of the residual stream.
    pub embed: usize,
    /// Hidden width of the feed-forward (SwiGLU) block.
    pub ffn: usize,
    /// RoPE frequency base (10,000 when the GGUF has none).
    pub rope_base: f32,
    /// RoPE pairing of the architecture.
    pub rope: Rope,
    /// ε of the RMS norms.
    pub rms_eps: f32,
    /// Longest sequence the model runs (positions of the RoPE table).
    pub context: usize,
    /// Vocabulary size (rows of the token embedding).
    pub vocab: usize,
    /// Whether the Q/K/V projections have biases.
    pub qkv_bias: bool,
    /// Whether the output matrix is the token embedding (no `output.weight`).
    pub tied_output: bool,
}

impl Config {
    /// The hyperparameters in the metadata of `g` (no tensors are read;
    /// `vocab` is the row count of `token_embd.weight`).
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let path = g.path.display().to_string();
        let arch = g.string("general.architecture")?.to_string();
        let rope = match arch.as_str() {
            "llama" => Rope::Interleaved,
            "qwen2" => Rope::NeoX,
            _ => return Err(LlmError::UnsupportedArchitecture { path, arch }),
        };
        let k = |key: &str| format!("{arch}.{key}");
        let u = |key: &str| -> Result<usize> { Ok(g.u32(&k(key))? as usize) };
        let heads = u("attention.head_count")?;
        let embed = u("embedding_length")?;
        let kv_heads = u("attention.head_count_kv")?;
        let bad = |what: String| LlmError::Metadata { path: path.clone(), key: k("attention"), problem: what };
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || embed % heads != 0 {
            return Err(bad(format!("{heads} query heads, {kv_heads} KV heads and width {embed} do not fit together")));
        }
        let head_dim = if g.get(&k("attention.key_length")).is_some() { u("attention.key_length")? } else { embed / heads };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(format!("head dimension {head_dim} is not a positive even number")));
        }
        if let Some(v) = g.get(&k("attention.value_length")) {
            if v.to_u32().ok().map(|v| v as usize) != Some(head_dim) {
                return Err(bad("keys and values of different lengths are not supported".into()));
            }
        }
        if let Some(r) = g.get(&k("rope.dimension_count")) {
            if r.to_u32().ok().map(|v| v as usize) != Some(head_dim) {
                return Err(bad(format!("RoPE over part of the head ({:?} of {head_dim} dimensions) is not supported", r.to_u32().ok())));
            }
        }
        let vocab = g.content.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims()[0]).unwrap_or(0);
        let name = match g.get("general.name").and_then(|v| v.to_string().ok()) {
            Some(n) => n.clone(),
            None => g.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let config = Config {
            name,
            layers: u("block_count")?,
            heads,
            kv_heads,
            head_dim,
            embed,
            ffn: u("feed_forward_length")?,
            rope_base: if g.get(&k("rope.freq_base")).is_some() { g.f32(&k("rope.freq_base"))? } else { 10_000.0 },
            rope,
            rms_eps: g.f32(&k("attention.layer_norm_rms_epsilon"))?,
            context: u("context_length")?,
            vocab,
            qkv_bias: g.has_tensor("blk.0.attn_q.bias"),
            tied_output: !g.has_tensor("output.weight"),
            arch: arch.clone(),
        };
        if config.layers == 0 || config.context == 0 || config.layers > MAX_LAYERS || config.context > MAX_CONTEXT {
            return Err(LlmError::Metadata {
                path,
                key: k("context_length"),
                problem: format!("{} layers and a context of {} tokens are outside what we run", config.layers, config.context),
            });
        }
        Ok(config)
    }

    /// The KV cache geometry.
    pub fn kv_shape(&self) -> KvGeometry {
        KvGeometry { layers: self.layers, q_heads: self.heads, kv_heads: self.kv_heads, head_dim: self.head_dim }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    /// Q/K/V biases (architectures with `attn_q.bias` ...).
    bias: Option<[Vec<f32>; 3]>,
    wo: QMatMul,
    ffn_norm: Vec<f32>,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

/// A loaded llama-family model: weights dequantized to f32 on the CPU.
pub struct Llama {
    /// The hyperparameters.
    pub config: Config,
    embed: Vec<f32>,
    output: QMatMul,
    out_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// RoPE cos/sin per position and pair (`context × head_dim/2`).
    cos: Vec<f32>,
    sin: Vec<f32>,
    device: Device,
}

fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for (v, g) in x.iter_mut().zip(w) {
        *v *= inv * g;
    }
}

impl Llama {
    /// Loads a GGUF model of one of the [`ARCHITECTURES`] (the output matrix
    /// is the token embedding when the file has none: tied embeddings).
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_gguf(Gguf::open(path)?)
    }

    /// The model of an open GGUF file.
    pub fn from_gguf(mut g: Gguf) -> Result<Self> {
        let device = Device::Cpu;
        let config = Config::from_gguf(&g)?;
        // Weights are dequantized once to f32 (exact values of the GGUF's blocks)
        // and multiplied with candle's f32 GEMM: much faster on CPU for prefill
        // than quantized dot products, and without requantized activations.
        let mm = |t: candle_core::quantized::QTensor| -> Result<QMatMul> { Ok(QMatMul::Tensor(t.dequantize(&device)?)) };
        let vec1 = |g: &mut Gguf, name: &str| -> Result<Vec<f32>> { Ok(g.qtensor(name)?.dequantize(&device)?.flatten_all()?.to_vec1::<f32>()?) };
        let emb_q = g.qtensor("token_embd.weight")?;
        let emb = emb_q.dequantize(&device)?;
        let vocab = emb.dims()[0];
        if emb.dims() != [vocab, config.embed] {
            bail!("{}: token_embd.weight has shape {:?}, expected [vocab, {}]", g.path.display(), emb.dims(), config.embed);
        }
        let embed_v = emb.flatten_all()?.to_vec1::<f32>()?;
        drop(emb);
        let output = if config.tied_output { mm(emb_q)? } else { mm(g.qtensor("output.weight")?)? };
        let (qd, kd) = (config.heads * config.head_dim, config.kv_heads * config.head_dim);
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            let bias = if config.qkv_bias {
                let mut b = Vec::with_capacity(3);
                for (n, len) in [("attn_q", qd), ("attn_k", kd), ("attn_v", kd)] {
                    let v = vec1(&mut g, &format!("blk.{i}.{n}.bias"))?;
                    if v.len() != len {
                        bail!("{}: blk.{i}.{n}.bias has {} values, expected {len}", g.path.display(), v.len());
                    }
                    b.push(v);
                }
                let [q, k, v]: [Vec<f32>; 3] = b.try_into().expect("three biases");
                Some([q, k, v])
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vec1(&mut g, &p("attn_norm"))?,
                wq: mm(g.qtensor(&p("attn_q"))?)?,
                wk: mm(g.qtensor(&p("attn_k"))?)?,
                wv: mm(g.qtensor(&p("attn_v"))?)?,
                bias,
                wo: mm(g.qtensor(&p("attn_output"))?)?,
                ffn_norm: vec1(&mut g, &p("ffn_norm"))?,
                w_gate: mm(g.qtensor(&p("ffn_gate"))?)?,
                w_up: mm(g.qtensor(&p("ffn_up"))?)?,
                w_down: mm(g.qtensor(&p("ffn_down"))?)?,
            });
        }
        let out_norm = vec1(&mut g, "output_norm.weight")?;
        let config = Config { vocab, ..config };
        let half = config.head_dim / 2;
        let (mut cos, mut sin) = (vec![0.0f32; config.context * half], vec![0.0f32; config.context * half]);
        for pos in 0..config.context {
            for i in 0..half {
                let theta = pos as f64 * (config.rope_base as f64).powf(-2.0 * i as f64 / config.head_dim as f64);
                cos[pos * half + i] = theta.cos() as f32;
                sin[pos * half + i] = theta.sin() as f32;
            }
        }
        Ok(Self { config, embed: embed_v, output, out_norm, layers, cos, sin, device })
    }

    fn matmul(&self, w: &QMatMul, x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(x, (rows, cols), &self.device)?;
        Ok(w.forward(&t)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn rope(&self, v: &mut [f32], pos: usize) {
        let half = self.config.head_dim / 2;
        let (cos, sin) = (&self.cos[pos * half..(pos + 1) * half], &self.sin[pos * half..(pos + 1) * half]);
        for head in v.chunks_exact_mut(self.config.head_dim) {
            match self.config.rope {
                Rope::Interleaved => {
                    for i in 0..half {
                        let (c, s) = (cos[i], sin[i]);
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * c - b * s;
                        head[2 * i + 1] = a * s + b * c;
                    }
                }
                Rope::NeoX => {
                    let (lo, hi) = head.split_at_mut(half);
                    for i in 0..half {
                        let (c, s) = (cos[i], sin[i]);
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * c - b * s;
                        hi[i] = a * s + b * c;
                    }
                }
            }
        }
    }

    /// Runs `tokens` (positions `start..start+len`, after what the cache holds)
    /// and returns the logits of every position (`len × vocab`), or of the last
    /// position only when `last_only`.
    pub fn forward(&self, tokens: &[u32], cache: &mut dyn KvCache, last_only: bool) -> Result<Vec<f32>> {
        let c = &self.config;
        let (n, e, d) = (tokens.len(), c.embed, c.head_dim);
        if n == 0 {
            bail!("no tokens to run");
        }
        let start = cache.len(0, 0);
        if start + n > c.context {
            bail!("{} tokens exceed the model's context of {}", start + n, c.context);
        }
        let mut x = vec![0.0f32; n * e];
        for (row, &t) in x.chunks_exact_mut(e).zip(tokens) {
            let t = t as usize;
            if t >= c.vocab {
                bail!("token id {t} is outside the vocabulary of {}", c.vocab);
            }
            row.copy_from_slice(&self.embed[t * e..(t + 1) * e]);
        }
        let group = c.heads / c.kv_heads;
        for (li, l) in self.layers.iter().enumerate() {
            let mut h = x.clone();
            h.chunks_exact_mut(e).for_each(|r| rms_norm(r, &l.attn_norm, c.rms_eps));
            let mut q = self.matmul(&l.wq, &h, n, e)?;
            let mut k = self.matmul(&l.wk, &h, n, e)?;
            let mut v = self.matmul(&l.wv, &h, n, e)?;
            let (qd, kd) = (c.heads * d, c.kv_heads * d);
            if let Some([bq, bk, bv]) = &l.bias {
                for (x, b) in [(&mut q, bq), (&mut k, bk), (&mut v, bv)] {
                    x.chunks_exact_mut(b.len()).for_each(|r| r.iter_mut().zip(b).for_each(|(a, b)| *a += b));
                }
            }
            let mut att = vec![0.0f32; n * qd];
            for i in 0..n {
                self.rope(&mut q[i * qd..(i + 1) * qd], start + i);
                self.rope(&mut k[i * kd..(i + 1) * kd], start + i);
            }
            tq_kv::append_attend(cache, li, &k, &v, &q, c.kv_heads, group, d, &mut att)?;
            let o = self.matmul(&l.wo, &att, n, qd)?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let mut h = x.clone();
            h.chunks_exact_mut(e).for_each(|r| rms_norm(r, &l.ffn_norm, c.rms_eps));
            let g = self.matmul(&l.w_gate, &h, n, e)?;
            let u = self.matmul(&l.w_up, &h, n, e)?;
            let act: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
            let dn = self.matmul(&l.w_down, &act, n, c.ffn)?;
            x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        }
        let rows: Vec<f32> = if last_only { x[(n - 1) * e..].to_vec() } else { x };
        let m = rows.len() / e;
        let mut h = rows;
        h.chunks_exact_mut(e).for_each(|r| rms_norm(r, &self.out_norm, c.rms_eps));
        self.matmul(&self.output, &h, m, e)
    }
}
