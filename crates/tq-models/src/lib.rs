//! Real models on candle.
pub mod gguf;
pub mod minilm;
