//! A llama forward pass of our own on candle's quantized matmuls (GGUF
//! weights), with a pluggable KV cache: the attention for every position goes
//! through [`KvCache`], so a compressed cache can score keys and accumulate
//! values from its codes. Logits for every position (perplexity) or the last
//! (generation). Checked against llama.cpp's perplexity on SmolLM2.
//!
//! RoPE is the interleaved ("normal", GGML) form: the GGUF converter permutes
//! the Q/K weights so that adjacent pairs `(2i, 2i+1)` rotate together.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{Device, Module, Tensor};
use tq_kv::{KvCache, KvGeometry};

/// The model's hyperparameters, read from the GGUF metadata (`llama.*`).
#[derive(Clone, Debug)]
pub struct Config {
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: usize,
    /// Dimension of one head (`embed / heads`).
    pub head_dim: usize,
    /// Width of the residual stream.
    pub embed: usize,
    /// Hidden width of the feed-forward (SwiGLU) block.
    pub ffn: usize,
    /// RoPE frequency base (10,000 when the GGUF has none).
    pub rope_base: f32,
    /// ε of the RMS norms.
    pub rms_eps: f32,
    /// Longest sequence the model runs (positions of the RoPE table).
    pub context: usize,
    /// Vocabulary size (rows of the token embedding).
    pub vocab: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Vec<f32>,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

impl Config {
    /// The KV cache geometry.
    pub fn kv_shape(&self) -> KvGeometry {
        KvGeometry { layers: self.layers, q_heads: self.heads, kv_heads: self.kv_heads, head_dim: self.head_dim }
    }
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
    /// Loads a GGUF model (the output matrix falls back to the token
    /// embedding when the file has none: tied embeddings).
    pub fn load(path: &Path) -> Result<Self> {
        let device = Device::Cpu;
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open model {}", path.display()))?;
        let ct = gguf_file::Content::read(&mut f).with_context(|| format!("{} is not a GGUF file", path.display()))?;
        let md = |k: &str| ct.metadata.get(k).ok_or_else(|| anyhow!("GGUF metadata has no {k}"));
        let u = |k: &str| -> Result<usize> { Ok(md(k)?.to_u32()? as usize) };
        let heads = u("llama.attention.head_count")?;
        let embed = u("llama.embedding_length")?;
        let config = Config {
            layers: u("llama.block_count")?,
            heads,
            kv_heads: u("llama.attention.head_count_kv")?,
            head_dim: embed / heads,
            embed,
            ffn: u("llama.feed_forward_length")?,
            rope_base: md("llama.rope.freq_base").and_then(|v| Ok(v.to_f32()?)).unwrap_or(10_000.0),
            rms_eps: md("llama.attention.layer_norm_rms_epsilon")?.to_f32()?,
            context: u("llama.context_length")?,
            vocab: 0,
        };
        let qt = |f: &mut std::fs::File, name: &str| ct.tensor(f, name, &device).with_context(|| format!("missing tensor {name}"));
        // Weights are dequantized once to f32 (exact values of the GGUF's blocks)
        // and multiplied with candle's f32 GEMM: much faster on CPU for prefill
        // than quantized dot products, and without requantized activations.
        let mm = |t: candle_core::quantized::QTensor| -> Result<QMatMul> { Ok(QMatMul::Tensor(t.dequantize(&device)?)) };
        let vec1 = |f: &mut std::fs::File, name: &str| -> Result<Vec<f32>> { Ok(qt(f, name)?.dequantize(&device)?.to_vec1::<f32>()?) };
        let emb_q = qt(&mut f, "token_embd.weight")?;
        let emb = emb_q.dequantize(&device)?;
        let vocab = emb.dims()[0];
        let embed_v = emb.flatten_all()?.to_vec1::<f32>()?;
        let output = match ct.tensor(&mut f, "output.weight", &device) {
            Ok(t) => mm(t)?,
            Err(_) => mm(emb_q)?, // tied embeddings
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: vec1(&mut f, &p("attn_norm"))?,
                wq: mm(qt(&mut f, &p("attn_q"))?)?,
                wk: mm(qt(&mut f, &p("attn_k"))?)?,
                wv: mm(qt(&mut f, &p("attn_v"))?)?,
                wo: mm(qt(&mut f, &p("attn_output"))?)?,
                ffn_norm: vec1(&mut f, &p("ffn_norm"))?,
                w_gate: mm(qt(&mut f, &p("ffn_gate"))?)?,
                w_up: mm(qt(&mut f, &p("ffn_up"))?)?,
                w_down: mm(qt(&mut f, &p("ffn_down"))?)?,
            });
        }
        let out_norm = vec1(&mut f, "output_norm.weight")?;
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
        for head in v.chunks_exact_mut(self.config.head_dim) {
            for i in 0..half {
                let (c, s) = (self.cos[pos * half + i], self.sin[pos * half + i]);
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c - b * s;
                head[2 * i + 1] = a * s + b * c;
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
            let v = self.matmul(&l.wv, &h, n, e)?;
            let (qd, kd) = (c.heads * d, c.kv_heads * d);
            let mut att = vec![0.0f32; n * qd];
            for i in 0..n {
                self.rope(&mut q[i * qd..(i + 1) * qd], start + i);
                self.rope(&mut k[i * kd..(i + 1) * kd], start + i);
            }
            let append = |cache: &mut dyn KvCache, i: usize| {
                for kh in 0..c.kv_heads {
                    cache.append(li, kh, &k[i * kd + kh * d..i * kd + (kh + 1) * d], &v[i * kd + kh * d..i * kd + (kh + 1) * d]);
                }
            };
            // one token at a time while the cache's state still depends on
            // what comes next (windows, training), then the rest as a batch
            let mut i0 = 0;
            while i0 < n && !(n - i0 > 1 && cache.prefix_stable(li)) {
                append(cache, i0);
                for kh in 0..c.kv_heads {
                    // the query heads kh·group .. (kh+1)·group share this KV head
                    let r = i0 * qd + kh * group * d..i0 * qd + (kh + 1) * group * d;
                    cache.attend_group(li, kh, &q[r.clone()], group, start + i0 + 1, &mut att[r]);
                }
                i0 += 1;
            }
            if i0 < n {
                for i in i0..n {
                    append(cache, i);
                }
                cache.attend_positions(li, &q[i0 * qd..], c.kv_heads, group, d, start + i0, &mut att[i0 * qd..]);
            }
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
