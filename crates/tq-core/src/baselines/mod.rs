//! The methods TurboQuant is compared with, behind the same `Codec` interface:
//! RaBitQ (1-bit and extended), product quantization, llama.cpp's q8_0/q4_0
//! (optionally Hadamard-rotated), and the FP4 formats MXFP4 and NVFP4.

pub mod fp;
pub mod ggml;
pub mod kivi;
pub mod polar;
pub mod pq;
pub mod qet;
pub mod rabitq;

pub(crate) fn read_f32(code: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([code[at], code[at + 1], code[at + 2], code[at + 3]])
}

pub(crate) fn f32s_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(crate) fn bytes_to_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
