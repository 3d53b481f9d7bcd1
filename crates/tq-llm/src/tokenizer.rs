//! The GPT-2-style BPE tokenizer stored in a GGUF file, built the way
//! llama.cpp's "smollm" pre-tokenizer works: digits split one by one, then
//! byte-level splitting with the GPT-2 regex and no prefix space.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
pub use tokenizers::Tokenizer;

fn strings(v: &Value, what: &str) -> Result<Vec<String>> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                _ => Err(anyhow!("{what}: not a string")),
            })
            .collect(),
        _ => bail!("{what} is not an array"),
    }
}

/// The tokenizer of a llama-family GGUF (`tokenizer.ggml.model = gpt2`).
pub fn from_gguf(path: &Path) -> Result<Tokenizer> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let ct = gguf_file::Content::read(&mut f).with_context(|| format!("{} is not a GGUF file", path.display()))?;
    let md = |k: &str| ct.metadata.get(k).ok_or_else(|| anyhow!("GGUF metadata has no {k}"));
    let model = md("tokenizer.ggml.model")?.to_string()?.clone();
    if model != "gpt2" {
        bail!("tokenizer model '{model}' is not supported (need gpt2-style BPE)");
    }
    let tokens = strings(md("tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(md("tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| anyhow!("bad merge '{m}'")))
        .collect::<Result<_>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| anyhow!("BPE: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()])));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tok)
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(text, false).map_err(|e| anyhow!("tokenize: {e}"))?.get_ids().to_vec())
}
