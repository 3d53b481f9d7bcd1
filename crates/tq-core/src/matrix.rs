//! Matrix codecs: methods that quantize a whole `tokens × channels` block
//! (row = token) rather than one vector at a time — KIVI groups keys along
//! tokens, QET reorders and product-quantizes rows with learned codebooks.
//! Vector codecs also act on matrices, row by row (`RowWise`), so every
//! codec can be compared on the same matrix.

use crate::codec::{Codec, SAFE_ABS};
use crate::error::{Result, TqError};

/// Which axis a matrix codec's groups run along (KIVI's key/value recipes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// Statistics per channel over groups of tokens (KIVI keys).
    PerChannel,
    /// Statistics per token over groups of channels (KIVI values).
    PerToken,
}

/// A codec of whole row-major `tokens × channels` matrices (see the module docs).
pub trait MatrixCodec: Send + Sync {
    /// Registry name, e.g. `kivi-4`.
    fn name(&self) -> &str;
    /// Columns of the matrices this codec takes.
    fn channels(&self) -> usize;
    /// Bytes of the code of a `tokens × channels` matrix.
    fn encoded_size(&self, tokens: usize) -> usize;
    /// Storage bits per value for `tokens` rows, every overhead included
    /// (codebooks and other learned parameters excluded: see `model_bytes`).
    fn bits_per_value(&self, tokens: usize) -> f64 {
        (self.encoded_size(tokens) * 8) as f64 / (tokens * self.channels()) as f64
    }
    /// Learned parameters stored once per collection (codebooks).
    fn model_bytes(&self) -> usize {
        0
    }
    /// Fits learned parameters (only codecs that have any).
    fn train(&mut self, _m: &[f32]) -> Result<()> {
        Ok(())
    }
    /// Largest `|x|` below which every finite matrix is represented (decodes
    /// finite); above it, the checked encoder verifies and may refuse.
    fn safe_abs(&self) -> f32 {
        SAFE_ABS
    }
    /// Encodes a finite `tokens × channels` matrix into `out` (`encoded_size(tokens)` bytes).
    fn encode_unchecked(&self, m: &[f32], tokens: usize, out: &mut [u8]);
    /// Decodes a code of `tokens` rows into `out` (`tokens × channels` values).
    fn decode_unchecked(&self, code: &[u8], tokens: usize, out: &mut [f32]);

    /// Checked encode of a row-major `tokens × channels` matrix.
    fn encode(&self, m: &[f32], out: &mut [u8]) -> Result<usize> {
        check_matrix_encodable(self, m)?;
        let t = m.len() / self.channels();
        if out.len() != self.encoded_size(t) {
            return Err(TqError::CodeSizeMismatch { expected: self.encoded_size(t), got: out.len() });
        }
        self.encode_unchecked(m, t, out);
        Ok(t)
    }

    /// Checked decode into `tokens × channels` values.
    fn decode(&self, code: &[u8], tokens: usize, out: &mut [f32]) -> Result<()> {
        if code.len() != self.encoded_size(tokens) {
            return Err(TqError::CodeSizeMismatch { expected: self.encoded_size(tokens), got: code.len() });
        }
        if out.len() != tokens * self.channels() {
            return Err(TqError::DimMismatch { expected: tokens * self.channels(), got: out.len() });
        }
        self.decode_unchecked(code, tokens, out);
        Ok(())
    }
}

/// `check_vectors` of the rows of `m`; when a value exceeds `c.safe_abs()`,
/// the matrix is encoded and decoded once and refused if the code would
/// decode to inf/NaN (naming the first row with a value above it).
pub fn check_matrix_encodable<C: MatrixCodec + ?Sized>(c: &C, m: &[f32]) -> Result<()> {
    crate::codec::check_vectors(m, c.channels())?;
    let safe = c.safe_abs();
    if !m.iter().any(|x| x.abs() > safe) {
        return Ok(());
    }
    let t = m.len() / c.channels();
    let mut code = vec![0u8; c.encoded_size(t)];
    c.encode_unchecked(m, t, &mut code);
    let mut out = vec![0.0f32; m.len()];
    c.decode_unchecked(&code, t, &mut out);
    if out.iter().all(|x| x.is_finite()) {
        return Ok(());
    }
    let row = m.chunks_exact(c.channels()).position(|r| r.iter().any(|x| x.abs() > safe)).unwrap_or(0);
    Err(TqError::Unencodable {
        vector: row,
        reason: format!(
            "{} cannot represent the magnitudes of this matrix (the code would decode to inf/NaN; |x| <= {safe:e} is always representable)",
            c.name()
        ),
    })
}

/// A vector codec applied to every row.
pub struct RowWise(pub Box<dyn Codec>);

impl MatrixCodec for RowWise {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn channels(&self) -> usize {
        self.0.dim()
    }
    fn encoded_size(&self, tokens: usize) -> usize {
        tokens * self.0.code_size()
    }
    fn model_bytes(&self) -> usize {
        self.0.params().len()
    }
    fn train(&mut self, m: &[f32]) -> Result<()> {
        if self.0.wants_training() {
            self.0.train(m)?;
        }
        Ok(())
    }
    fn encode(&self, m: &[f32], out: &mut [u8]) -> Result<usize> {
        self.0.encode_batch(m, out)?;
        Ok(m.len() / self.0.dim())
    }
    fn encode_unchecked(&self, m: &[f32], _tokens: usize, out: &mut [u8]) {
        self.0.encode_batch(m, out).expect("finite input and a trained codec");
    }
    fn decode_unchecked(&self, code: &[u8], _tokens: usize, out: &mut [f32]) {
        self.0.decode_batch(code, out).expect("checked input");
    }
}

/// A matrix codec of the registry (the matrix shape beside the vector one).
#[derive(Clone, Debug)]
pub struct MatrixEntry {
    /// Stable id (shared id space with the vector registry).
    pub id: u16,
    /// Registry name, e.g. `kivi-4`.
    pub name: String,
    /// One-line description.
    pub description: &'static str,
}

/// The matrix codecs: `kivi-1..8`, `qet-2..8`, `qet-2..8-nores`. Every vector
/// codec of `crate::registry()` also acts on matrices row by row.
pub fn matrix_registry() -> &'static [MatrixEntry] {
    static R: std::sync::OnceLock<Vec<MatrixEntry>> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        let mut v = Vec::new();
        for b in 1..=8u16 {
            v.push(MatrixEntry {
                id: 56 + b,
                name: format!("kivi-{b}"),
                description: "baseline KIVI: min/max per channel over 32 tokens (keys) or per token over 32 channels (values), f16 scale+zero",
            });
        }
        for b in 2..=8u16 {
            v.push(MatrixEntry {
                id: 63 + b,
                name: format!("qet-{b}"),
                description: "baseline QET: 3-layer pair reordering (1.5 bits) + PQ + residual PQ (70/30)",
            });
        }
        for b in 2..=8u16 {
            v.push(MatrixEntry { id: 70 + b, name: format!("qet-{b}-nores"), description: "QET without the residual stage" });
        }
        v
    })
}

/// Builds a matrix codec by name for `channels` columns: a matrix codec of
/// `matrix_registry()` (KIVI groups along `axis`), or any vector codec row by row.
pub fn build_matrix(name: &str, channels: usize, axis: Axis, seed: u64) -> Result<Box<dyn MatrixCodec>> {
    crate::limits::check_dim("channels", channels)?;
    if let Some(rest) = name.strip_prefix("kivi-") {
        let bits: u32 = rest.parse().map_err(|_| TqError::UnknownCodec { name: name.into(), known: "kivi-1..8".into() })?;
        return Ok(Box::new(crate::baselines::kivi::Kivi::new(channels, bits, crate::baselines::kivi::DEFAULT_GROUP, axis)?));
    }
    if let Some(rest) = name.strip_prefix("qet-") {
        let (num, residual) = match rest.strip_suffix("-nores") {
            Some(n) => (n, false),
            None => (rest, true),
        };
        let bits: u32 = num.parse().map_err(|_| TqError::UnknownCodec { name: name.into(), known: "qet-2..8, qet-2..8-nores".into() })?;
        return Ok(Box::new(crate::baselines::qet::Qet::new(channels, bits, residual, seed)?));
    }
    Ok(Box::new(RowWise(crate::registry::build(name, channels, seed, crate::rotation::RotationKind::Hadamard)?)))
}
