//! Reading tensors out of GGUF files (candle's reader and dequantizers).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::Device;

/// Tensor `name` of a GGUF file, dequantized to f32, with its shape
/// (row-major, GGUF's dimension order reversed as candle reports it).
pub fn tensor_f32(path: &Path, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content = gguf_file::Content::read(&mut f).with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    let q = content.tensor(&mut f, name, &Device::Cpu).with_context(|| format!("no tensor '{name}' in {}", path.display()))?;
    let t = q.dequantize(&Device::Cpu)?;
    let shape = t.dims().to_vec();
    Ok((t.flatten_all()?.to_vec1::<f32>()?, shape))
}
