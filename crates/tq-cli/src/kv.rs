//! `tq kv eval`: perplexity of SmolLM2 on real text with a given KV cache,
//! llama.cpp's convention (chunks of `ctx` tokens, the second half of each
//! chunk scored).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tq_models::llama::{F32Cache, KvCache, Llama};

pub struct EvalArgs<'a> {
    pub text: &'a str,
    pub chars: usize,
    pub ctx: usize,
    pub chunks: usize,
    pub kv: &'a str,
    pub json: bool,
}

fn load_text(name: &str, quiet: bool) -> Result<String> {
    match name {
        "austen" => return crate::data::austen_text(quiet),
        "shakespeare" => return crate::data::shakespeare_text(quiet),
        _ => {}
    }
    let t = std::fs::read_to_string(name).with_context(|| format!("cannot read text file {name} (or use --text austen|shakespeare)"))?;
    Ok(t)
}

pub fn eval(a: &EvalArgs<'_>) -> Result<()> {
    let spec = tq_core::kv::KvSpec::parse(a.kv)?;
    let text = load_text(a.text, a.json)?;
    let text: String = text.chars().take(a.chars).collect();
    if text.trim().is_empty() {
        bail!("the text is empty");
    }
    let path = crate::data::smollm_gguf(a.json)?;
    let model = Llama::load(&path)?;
    if a.ctx < 4 || a.ctx > model.config.context {
        bail!("--ctx {} is outside 4..={} (the model's context)", a.ctx, model.config.context);
    }
    let tok = tq_models::tokenizer::from_gguf(&path)?;
    let ids = tq_models::tokenizer::encode(&tok, &text)?;
    let chunks = a.chunks.min(ids.len() / a.ctx);
    if chunks == 0 {
        bail!("{} tokens of text are fewer than one chunk of {}", ids.len(), a.ctx);
    }
    let vocab = model.config.vocab;
    let shape = model.config.kv_shape();
    let reference = spec.name != "f32";
    let (mut nll, mut nll_ref, mut kld, mut agree, mut count) = (0.0f64, 0.0f64, 0.0f64, 0usize, 0usize);
    let mut kv_bytes = 0usize;
    let t = Instant::now();
    let log_probs = |row: &[f32]| -> Vec<f64> {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        row.iter().map(|&v| v as f64 - lse).collect()
    };
    for c in 0..chunks {
        let toks = &ids[c * a.ctx..(c + 1) * a.ctx];
        let mut cache = tq_kv::cache_for(shape, a.kv, 0)?;
        let logits = model.forward(toks, cache.as_mut(), false)?;
        kv_bytes = cache.bytes();
        let ref_logits = if reference {
            let mut f = F32Cache::new(shape);
            Some(model.forward(toks, &mut f as &mut dyn KvCache, false)?)
        } else {
            None
        };
        for j in a.ctx / 2..a.ctx - 1 {
            let lp = log_probs(&logits[j * vocab..(j + 1) * vocab]);
            nll -= lp[toks[j + 1] as usize];
            if let Some(r) = &ref_logits {
                let lr = log_probs(&r[j * vocab..(j + 1) * vocab]);
                nll_ref -= lr[toks[j + 1] as usize];
                kld += lr.iter().zip(&lp).map(|(&p, &q)| p.exp() * (p - q)).sum::<f64>();
                let am = |v: &[f64]| v.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
                agree += (am(&lr) == am(&lp)) as usize;
            }
            count += 1;
        }
        if !a.json {
            eprintln!("chunk {}/{chunks}: ppl so far {:.4}", c + 1, (nll / count as f64).exp());
        }
    }
    let n = count as f64;
    let ppl = (nll / n).exp();
    let bits = spec.bits_per_value(shape.head_dim)?;
    let per_token = spec.bytes_per_token_per_layer(shape.kv_heads, shape.head_dim)?;
    let out = json!({"text": a.text, "chars": a.chars, "tokens": ids.len(), "ctx": a.ctx, "chunks": chunks, "kv": a.kv,
        "ppl": ppl, "ppl_f32": if reference { json!((nll_ref / n).exp()) } else { json!(ppl) },
        "kld": if reference { json!(kld / n) } else { json!(0.0) },
        "top1_agree": if reference { json!(agree as f64 / n) } else { json!(1.0) },
        "bits_per_value": bits, "kv_bytes_per_token": per_token * shape.layers as f64, "kv_bytes_measured_per_token": kv_bytes as f64 / a.ctx as f64,
        "scored_tokens": count, "seconds": t.elapsed().as_secs_f64()});
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
