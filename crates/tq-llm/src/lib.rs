//! The LLM runtime of turboquant's KV-cache evaluations, on candle: a
//! llama-family forward pass over GGUF weights whose attention runs through a
//! pluggable [`tq_kv::KvCache`] ([`llama`]), the GGUF's tokenizer
//! ([`tokenizer`]), MiniLM sentence embeddings ([`minilm`]), the evaluations
//! (perplexity and KL divergence, calibration, needle, decode timing:
//! [`eval`]), budget plans fitted on the model ([`budget`]) and the datasets derived with these models ([`datasets`]).

#![warn(missing_docs)]

pub mod budget;
pub mod datasets;
pub mod error;
pub mod eval;
pub mod gguf;
pub mod llama;
pub mod minilm;
pub mod model;
pub mod tokenizer;

pub use error::{LlmError, Result};
pub use model::ModelSpec;
