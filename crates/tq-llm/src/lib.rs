//! Real models on candle.
pub mod gguf;
pub mod llama;
pub mod tokenizer;
pub mod minilm;
