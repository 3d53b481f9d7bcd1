//! The datasets computed with a model: MiniLM sentence embeddings of the
//! Austen text and tensors of the SmolLM2 GGUF. Everything else comes from
//! `tq_data::datasets` as it is; [`load`] serves both.

use crate::error::{bail, Result};
use tq_data::datasets::{self, Dataset, Source};
use tq_data::Matrix;

/// Loads any dataset by name, computing a derived one on its first use
/// (`progress(done, total)` is called while MiniLM embeds).
pub fn load(name: &str, quiet: bool, progress: &dyn Fn(usize, usize)) -> Result<Matrix> {
    Ok(datasets::load_with(name, quiet, &|d, q| derive_for_data(d, q, progress))?)
}

/// Path of a dataset's cached file, computing it first when needed.
pub fn ensure(name: &str, quiet: bool, progress: &dyn Fn(usize, usize)) -> Result<std::path::PathBuf> {
    Ok(datasets::ensure_with(datasets::find(name)?, quiet, &|d, q| derive_for_data(d, q, progress))?)
}

/// [`derive`] as the `tq_data::datasets::Derive` callback wants it.
fn derive_for_data(d: &Dataset, quiet: bool, progress: &dyn Fn(usize, usize)) -> tq_data::Result<Matrix> {
    derive(d, quiet, progress).map_err(|e| match e {
        crate::LlmError::Data(e) => e,
        e => tq_data::DataError::Msg(e.to_string()),
    })
}

fn derive(d: &Dataset, quiet: bool, progress: &dyn Fn(usize, usize)) -> Result<Matrix> {
    match &d.source {
        Source::MiniLm => minilm_embeddings(quiet, progress),
        Source::SmolTensor { tensor } => {
            let (data, shape) = crate::gguf::tensor_f32(&datasets::smollm_gguf(quiet)?, tensor)?;
            let [rows, cols] = shape[..] else { bail!("{tensor} is not a matrix: shape {shape:?}") };
            Ok(Matrix { rows, cols, data })
        }
        Source::Npy { .. } => bail!("dataset {} is fetched, not derived", d.name),
    }
}

/// Embeds the Austen segments with MiniLM (batches of similar length).
fn minilm_embeddings(quiet: bool, progress: &dyn Fn(usize, usize)) -> Result<Matrix> {
    let text = datasets::austen_text(quiet)?;
    let segs = datasets::austen_segments(&text);
    let model = crate::minilm::MiniLm::load(&datasets::minilm_model(quiet)?)?;
    let dim = crate::minilm::DIM;
    let mut order: Vec<usize> = (0..segs.len()).collect();
    order.sort_by_key(|&i| (segs[i].len(), i));
    let mut data = vec![0.0f32; segs.len() * dim];
    let mut done = 0;
    for batch in order.chunks(64) {
        let texts: Vec<&str> = batch.iter().map(|&i| segs[i].as_str()).collect();
        let e = model.embed(&texts)?;
        for (k, &i) in batch.iter().enumerate() {
            data[i * dim..(i + 1) * dim].copy_from_slice(&e[k * dim..(k + 1) * dim]);
        }
        done += batch.len();
        progress(done, segs.len());
    }
    Ok(Matrix { rows: segs.len(), cols: dim, data })
}
