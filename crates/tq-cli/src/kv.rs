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
    if name == "austen" {
        return crate::data::austen_text(quiet);
    }
    let t = std::fs::read_to_string(name).with_context(|| format!("cannot read text file {name} (or use --text austen)"))?;
    Ok(t)
}

pub fn eval(a: &EvalArgs<'_>) -> Result<()> {
    if a.kv != "f32" {
        bail!("KV precision '{}' is not available yet in the runtime (only f32; the compressed cache is the next step)", a.kv);
    }
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
    let (mut nll, mut count) = (0.0f64, 0usize);
    let t = Instant::now();
    for c in 0..chunks {
        let toks = &ids[c * a.ctx..(c + 1) * a.ctx];
        let mut cache = F32Cache::new(&model.config);
        let logits = model.forward(toks, &mut cache as &mut dyn KvCache, false)?;
        for j in a.ctx / 2..a.ctx - 1 {
            let row = &logits[j * vocab..(j + 1) * vocab];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            nll += lse - row[toks[j + 1] as usize] as f64;
            count += 1;
        }
        if !a.json {
            eprintln!("chunk {}/{chunks}: ppl so far {:.4}", c + 1, (nll / count as f64).exp());
        }
    }
    let ppl = (nll / count as f64).exp();
    let out = json!({"text": a.text, "chars": a.chars, "tokens": ids.len(), "ctx": a.ctx, "chunks": chunks, "kv": a.kv,
        "ppl": ppl, "scored_tokens": count, "seconds": t.elapsed().as_secs_f64()});
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{} ({} chars, {} tokens), ctx {}, {} chunks, kv {}: ppl {:.4}", a.text, a.chars, ids.len(), a.ctx, chunks, a.kv, ppl);
    }
    Ok(())
}
