//! Real models on candle.
pub mod minilm;
