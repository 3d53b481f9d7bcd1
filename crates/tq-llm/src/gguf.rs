//! Reading GGUF files (candle's reader and dequantizers): the header with its
//! typed metadata look-ups, checked against the file's length, and tensors
//! dequantized to f32.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::error::{Context, LlmError, Result};

/// An open GGUF file: its header (metadata and tensor directory), checked to
/// be complete (every tensor's bytes lie inside the file).
pub struct Gguf {
    /// The file.
    pub path: PathBuf,
    file: std::fs::File,
    /// candle's parsed header.
    pub content: Content,
}

impl Gguf {
    /// Opens and parses `path`; a header that does not parse, or tensor data
    /// that runs past the end of the file, is an error naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let content = Content::read(&mut file).with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
        let mut need = content.tensor_data_offset;
        for info in content.tensor_infos.values() {
            let (elems, block) = (info.shape.elem_count() as u64, info.ggml_dtype.block_size() as u64);
            let bytes = elems.div_ceil(block).saturating_mul(info.ggml_dtype.type_size() as u64);
            need = need.max(content.tensor_data_offset.saturating_add(info.offset).saturating_add(bytes));
        }
        if need > len {
            return Err(LlmError::TruncatedGguf { path: path.display().to_string(), len, need });
        }
        Ok(Self { path: path.to_path_buf(), file, content })
    }

    fn meta_err(&self, key: &str, problem: impl std::fmt::Display) -> LlmError {
        LlmError::Metadata { path: self.path.display().to_string(), key: key.to_string(), problem: problem.to_string() }
    }

    /// Metadata value `key`, or None.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// Metadata value `key` (an error when missing).
    pub fn value(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.meta_err(key, "missing"))
    }

    /// An unsigned integer of the metadata.
    pub fn u32(&self, key: &str) -> Result<u32> {
        self.value(key)?.to_u32().map_err(|e| self.meta_err(key, e))
    }

    /// A float of the metadata.
    pub fn f32(&self, key: &str) -> Result<f32> {
        self.value(key)?.to_f32().map_err(|e| self.meta_err(key, e))
    }

    /// A boolean of the metadata, or None when missing.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.to_bool().map_err(|e| self.meta_err(key, e))).transpose()
    }

    /// A string of the metadata.
    pub fn string(&self, key: &str) -> Result<&str> {
        Ok(self.value(key)?.to_string().map_err(|e| self.meta_err(key, e))?.as_str())
    }

    /// An array of strings of the metadata.
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.value(key)? {
            Value::Array(a) => a.iter().map(|x| x.to_string().cloned().map_err(|_| self.meta_err(key, "an element is not a string"))).collect(),
            _ => Err(self.meta_err(key, "not an array")),
        }
    }

    /// Whether the file has tensor `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Tensor `name` as stored (quantized).
    pub fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(LlmError::Msg(format!("{}: no tensor '{name}'", self.path.display())));
        }
        self.content.tensor(&mut self.file, name, &Device::Cpu).with_context(|| format!("{}: tensor '{name}'", self.path.display()))
    }
}

/// Tensor `name` of a GGUF file, dequantized to f32, with its shape
/// (row-major, GGUF's dimension order reversed as candle reports it).
pub fn tensor_f32(path: &Path, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let q = Gguf::open(path)?.qtensor(name)?;
    let t = q.dequantize(&Device::Cpu)?;
    let shape = t.dims().to_vec();
    Ok((t.flatten_all()?.to_vec1::<f32>()?, shape))
}
