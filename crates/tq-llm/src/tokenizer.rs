//! The GPT-2-style byte-level BPE tokenizer stored in a GGUF file
//! (`tokenizer.ggml.model = gpt2`), built the way llama.cpp's pre-tokenizer
//! of the file (`tokenizer.ggml.pre`) splits text:
//! - `smollm`: digits split one by one, then byte-level splitting with the
//!   GPT-2 regex and no prefix space;
//! - `qwen2`: one regex ([`QWEN2_PATTERN`]): case-insensitive contractions,
//!   letter runs with one leading non-letter, single digits, punctuation runs,
//!   newlines, `\s+(?!\S)`; then byte-level mapping without a regex.
//!
//! Special tokens are not parsed out of text (none of the texts we score
//! contain them); the chat template inserts them by id.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;
pub use tokenizers::Tokenizer;

use crate::error::{err, Context, LlmError, Result};
use crate::gguf::Gguf;

/// The split regex of llama.cpp's `qwen2` pre-tokenizer (as in the model's
/// Hugging Face tokenizer).
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizers (`tokenizer.ggml.pre`) we build.
pub const PRE_TOKENIZERS: &str = "smollm, qwen2";

/// How text is split before BPE (`tokenizer.ggml.pre`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// llama.cpp's `smollm`.
    Smollm,
    /// llama.cpp's `qwen2`.
    Qwen2,
}

impl PreTokenizer {
    fn build(self) -> Result<PreTokenizerWrapper> {
        Ok(match self {
            PreTokenizer::Smollm => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
            PreTokenizer::Qwen2 => {
                let split = Split::new(SplitPattern::Regex(QWEN2_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| err!("qwen2 pre-tokenizer regex: {e}"))?;
                Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()]).into()
            }
        })
    }
}

/// The tokenizer of a GGUF file and what the file says about using it.
pub struct GgufTokenizer {
    /// The tokenizer.
    pub tok: Tokenizer,
    /// Its pre-tokenizer.
    pub pre: PreTokenizer,
    /// The BOS token to put before a text, when the file asks for one
    /// (`tokenizer.ggml.add_bos_token`).
    pub bos: Option<u32>,
}

/// The tokenizer of a GGUF (`tokenizer.ggml.model = gpt2`, pre-tokenizer one
/// of [`PRE_TOKENIZERS`]).
pub fn from_gguf(path: &Path) -> Result<Tokenizer> {
    Ok(read(&Gguf::open(path)?)?.tok)
}

/// The tokenizer of an open GGUF, with its pre-tokenizer and BOS.
pub fn read(g: &Gguf) -> Result<GgufTokenizer> {
    let path = || g.path.display().to_string();
    let model = g.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(LlmError::UnsupportedTokenizer { path: path(), key: "tokenizer.ggml.model", value: model.into(), supported: "gpt2" });
    }
    let pre_name = g.string("tokenizer.ggml.pre")?;
    let pre = match pre_name {
        "smollm" => PreTokenizer::Smollm,
        "qwen2" => PreTokenizer::Qwen2,
        _ => return Err(LlmError::UnsupportedTokenizer { path: path(), key: "tokenizer.ggml.pre", value: pre_name.into(), supported: PRE_TOKENIZERS }),
    };
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = g
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).with_context(|| format!("{}: bad merge '{m}'", path())))
        .collect::<Result<_>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| err!("{}: BPE: {e}", path()))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre.build()?));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let bos = match g.bool_opt("tokenizer.ggml.add_bos_token")? {
        Some(true) => Some(g.u32("tokenizer.ggml.bos_token_id")?),
        _ => None,
    };
    Ok(GgufTokenizer { tok, pre, bos })
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(text, false).map_err(|e| err!("tokenize: {e}"))?.get_ids().to_vec())
}
