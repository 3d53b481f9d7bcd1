//! Which model a KV command runs (`--model`): a model of the data cache by
//! name (`tq_data::datasets::MODELS`, fetched on first use) or a GGUF file.

use std::path::PathBuf;

use crate::error::{bail, err, LlmError, Result};

/// A model named on the command line, parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// A model of the data cache (`smollm2`, `qwen2.5-1.5b`).
    Named(&'static str),
    /// A GGUF file.
    Path(PathBuf),
}

impl Default for ModelSpec {
    /// SmolLM2-135M-Instruct.
    fn default() -> Self {
        ModelSpec::Named("smollm2")
    }
}

impl std::str::FromStr for ModelSpec {
    type Err = LlmError;
    /// A name of `tq_data::datasets::MODELS`, or a path ending in `.gguf`.
    fn from_str(s: &str) -> Result<Self> {
        if let Some(m) = tq_data::datasets::MODELS.iter().find(|m| m.name == s) {
            return Ok(ModelSpec::Named(m.name));
        }
        if s.to_ascii_lowercase().ends_with(".gguf") {
            return Ok(ModelSpec::Path(PathBuf::from(s)));
        }
        let names: Vec<&str> = tq_data::datasets::MODELS.iter().map(|m| m.name).collect();
        bail!("unknown model '{s}' (known: {}, or a path to a .gguf file)", names.join(", "))
    }
}

impl std::fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSpec::Named(n) => f.write_str(n),
            ModelSpec::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl ModelSpec {
    /// The model's name in tables and records: the label of a named model,
    /// else None (the GGUF's `general.name` serves).
    pub fn label(&self) -> Option<&'static str> {
        match self {
            ModelSpec::Named(n) => tq_data::datasets::MODELS.iter().find(|m| m.name == *n).map(|m| m.label),
            ModelSpec::Path(_) => None,
        }
    }

    /// The GGUF file (a named model is fetched into the data cache when it is
    /// not there; `quiet` silences the notice).
    pub fn gguf(&self, quiet: bool) -> Result<PathBuf> {
        match self {
            ModelSpec::Named(n) => Ok(tq_data::datasets::model_gguf(n, quiet)?),
            ModelSpec::Path(p) => {
                if !p.is_file() {
                    bail!("model file {} does not exist", p.display());
                }
                Ok(p.clone())
            }
        }
    }

    /// The hyperparameters (KV geometry included) of the model, read from its GGUF header only (no
    /// weights are loaded; a named model is fetched first).
    pub fn config(&self, quiet: bool) -> Result<crate::llama::Config> {
        crate::llama::Config::from_gguf(&crate::gguf::Gguf::open(&self.gguf(quiet)?)?)
    }
}

/// The memory-planning model `name`: a built-in geometry of
/// `tq_kv::plan::MODELS`, else a GGUF model ([`ModelSpec`]: a named one is
/// fetched first) whose geometry, context and parameter count (every tensor's
/// elements) are read from its header.
pub fn plan_model(name: &str) -> Result<tq_kv::plan::ModelInfo> {
    if let Some(m) = tq_kv::plan::MODELS.iter().find(|m| m.name == name) {
        return Ok(m.clone());
    }
    let spec: ModelSpec = name.parse().map_err(|_| {
        let builtin: Vec<&str> = tq_kv::plan::MODELS.iter().map(|m| m.name.as_ref()).collect();
        let gguf: Vec<&str> = tq_data::datasets::MODELS.iter().map(|m| m.name).collect();
        err!("unknown model '{name}' (known: {}; GGUF models: {}, or a path to a .gguf file)", builtin.join(", "), gguf.join(", "))
    })?;
    let g = crate::gguf::Gguf::open(&spec.gguf(false)?)?;
    let c = crate::llama::Config::from_gguf(&g)?;
    let params: usize = g.content.tensor_infos.values().map(|t| t.shape.elem_count()).sum();
    Ok(tq_kv::plan::ModelInfo {
        name: spec.label().map(std::borrow::Cow::Borrowed).unwrap_or_else(|| c.name.clone().into()),
        params_b: params as f64 / 1e9,
        geometry: c.kv_shape(),
        max_context: c.context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_parse_and_the_rest_is_refused() {
        assert_eq!("smollm2".parse::<ModelSpec>().unwrap(), ModelSpec::Named("smollm2"));
        assert_eq!("qwen2.5-1.5b".parse::<ModelSpec>().unwrap(), ModelSpec::Named("qwen2.5-1.5b"));
        assert_eq!("dir/m.GGUF".parse::<ModelSpec>().unwrap(), ModelSpec::Path("dir/m.GGUF".into()));
        let e = "llama-3".parse::<ModelSpec>().unwrap_err().to_string();
        assert_eq!(e, "unknown model 'llama-3' (known: smollm2, qwen2.5-1.5b, or a path to a .gguf file)");
        let e = ModelSpec::Path("/nonexistent/x.gguf".into()).gguf(true).unwrap_err().to_string();
        assert_eq!(e, "model file /nonexistent/x.gguf does not exist");
    }
}
