//! all-MiniLM-L6-v2 sentence embeddings with candle's BERT: token embeddings
//! of the last layer, mean-pooled over the attention mask, L2-normalized (the
//! sentence-transformers recipe of this model). Batches are padded to their
//! longest member (not to the tokenizer file's fixed 128) and texts are
//! truncated at 256 tokens (the model's `max_seq_length`).

use std::path::Path;

use crate::error::{err, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Embedding dimension.
pub const DIM: usize = 384;
const MAX_TOKENS: usize = 256;

/// The all-MiniLM-L6-v2 model and its tokenizer (CPU).
pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl MiniLm {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let device = Device::Cpu;
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).with_context(|| format!("no config.json in {}", dir.display()))?)
                .context("bad BERT config.json")?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the weights file is a read-only cache entry written atomically.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }.with_context(|| format!("cannot map {}", weights.display()))?;
        let model = BertModel::load(vb, &config).context("cannot build the BERT model from its weights")?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| err!("tokenizer.json: {e}"))?;
        tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..Default::default() }));
        tokenizer.with_truncation(Some(TruncationParams { max_length: MAX_TOKENS, ..Default::default() })).map_err(|e| err!("tokenizer truncation: {e}"))?;
        Ok(Self { model, tokenizer, device })
    }

    /// Unit-norm embeddings of `texts`, row-major `texts.len() × 384`.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<f32>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| err!("tokenize: {e}"))?;
        let n = enc.len();
        let len = enc[0].get_ids().len();
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let types: Vec<u32> = enc.iter().flat_map(|e| e.get_type_ids().to_vec()).collect();
        let mask: Vec<u32> = enc.iter().flat_map(|e| e.get_attention_mask().to_vec()).collect();
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let types = Tensor::from_vec(types, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (n, len, 384)
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let summed = hidden.broadcast_mul(&m)?.sum(1)?; // (n, 384)
        let count = m.sum(1)?; // (n, 1)
        let mean = summed.broadcast_div(&count)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        let unit = mean.broadcast_div(&norm)?;
        Ok(unit.flatten_all()?.to_vec1::<f32>()?)
    }
}
