//! Bad GGUF input gives one-line errors naming the problem, never a panic:
//! an unsupported architecture, a truncated file (cut in the tensor data, cut
//! in the header), a tokenizer we do not build, and metadata that does not fit
//! together. The truncated files are prefixes of the real SmolLM2 GGUF
//! (fetched like the golden tests' model); the others are small GGUF headers
//! written here in the format's layout (version 3, little-endian).

use std::path::{Path, PathBuf};

use tq_llm::{llama::Llama, LlmError};

/// A GGUF metadata value.
enum V {
    U32(u32),
    F32(f32),
    Str(&'static str),
    Strs(Vec<&'static str>),
    Bool(bool),
}

/// A GGUF v3 file: the metadata, then tensor infos (name, dims, ggml type, offset),
/// then the tensor data (aligned to 32 bytes).
fn gguf(meta: &[(&str, V)], tensors: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    let s = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    for (k, v) in meta {
        s(&mut b, k);
        match v {
            V::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            V::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            V::Bool(x) => {
                b.extend(7u32.to_le_bytes());
                b.push(*x as u8);
            }
            V::Str(x) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, x);
            }
            V::Strs(xs) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    s(&mut b, x);
                }
            }
        }
    }
    for (name, dims, ty, off) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(std::iter::repeat_n(0u8, data));
    b
}

/// The metadata of a small llama-style model with a GPT-2 tokenizer (`pre` chosen).
fn meta(arch: &'static str, pre: &'static str) -> Vec<(&'static str, V)> {
    vec![
        ("general.architecture", V::Str(arch)),
        ("general.name", V::Str("tiny")),
        ("llama.block_count", V::U32(1)),
        ("llama.context_length", V::U32(64)),
        ("llama.embedding_length", V::U32(8)),
        ("llama.feed_forward_length", V::U32(16)),
        ("llama.attention.head_count", V::U32(2)),
        ("llama.attention.head_count_kv", V::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("tokenizer.ggml.model", V::Str("gpt2")),
        ("tokenizer.ggml.pre", V::Str(pre)),
        ("tokenizer.ggml.tokens", V::Strs(vec!["a", "b", "ab"])),
        ("tokenizer.ggml.merges", V::Strs(vec!["a b"])),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The error's message, checked to be one line.
fn one_line(e: LlmError) -> String {
    let m = e.to_string();
    assert!(!m.contains('\n'), "not one line: {m}");
    m
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "gemma.gguf", &gguf(&meta("gemma3", "smollm"), &[], 0));
    let e = Llama::load(&p).err().expect("gemma3 is refused");
    assert!(matches!(e, LlmError::UnsupportedArchitecture { .. }), "{e:?}");
    assert_eq!(one_line(e), format!("{}: GGUF architecture 'gemma3' is not supported (supported: llama, qwen2)", p.display()));
    // the runtime (model and tokenizer) refuses it too
    assert!(matches!(tq_llm::eval::Runtime::from_gguf(&p), Err(LlmError::UnsupportedArchitecture { .. })));
}

#[test]
fn unhandled_tokenizers_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bpe.gguf", &gguf(&meta("llama", "llama-bpe"), &[], 0));
    let e = tq_llm::tokenizer::from_gguf(&p).expect_err("llama-bpe is refused");
    assert_eq!(one_line(e), format!("{}: tokenizer tokenizer.ggml.pre = 'llama-bpe' is not supported (supported: smollm, qwen2)", p.display()));
    let mut m = meta("llama", "smollm");
    m[9] = ("tokenizer.ggml.model", V::Str("llama"));
    let p = write(dir.path(), "spm.gguf", &gguf(&m, &[], 0));
    let e = tq_llm::tokenizer::from_gguf(&p).expect_err("a sentencepiece tokenizer is refused");
    assert_eq!(one_line(e), format!("{}: tokenizer tokenizer.ggml.model = 'llama' is not supported (supported: gpt2)", p.display()));
    // both pre-tokenizers we build load from a header
    for pre in ["smollm", "qwen2"] {
        let p = write(dir.path(), "ok.gguf", &gguf(&meta("llama", pre), &[], 0));
        let tok = tq_llm::tokenizer::from_gguf(&p).unwrap();
        assert_eq!(tq_llm::tokenizer::encode(&tok, "ab").unwrap(), [2], "{pre}: the merge applies");
    }
}

#[test]
fn metadata_that_does_not_fit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meta("llama", "smollm");
    m[6] = ("llama.attention.head_count", V::U32(3)); // 8 is not a multiple of 3
    let p = write(dir.path(), "heads.gguf", &gguf(&m, &[], 0));
    let e = one_line(Llama::load(&p).err().expect("3 heads of width 8 are refused"));
    assert!(e.contains("do not fit together"), "{e}");
    let mut m = meta("llama", "smollm");
    m.remove(2); // no block count
    let p = write(dir.path(), "blocks.gguf", &gguf(&m, &[], 0));
    let e = one_line(Llama::load(&p).err().expect("a missing block count is refused"));
    assert_eq!(e, format!("{}: GGUF metadata llama.block_count: missing", p.display()));
    let mut m = meta("llama", "smollm");
    m[3] = ("llama.context_length", V::U32(u32::MAX)); // absurd: no RoPE table of 4G positions
    let p = write(dir.path(), "ctx.gguf", &gguf(&m, &[], 0));
    let e = one_line(Llama::load(&p).err().expect("an absurd context is refused"));
    assert!(e.contains("outside what we run"), "{e}");
}

#[test]
fn truncated_files_are_refused_before_any_tensor_is_read() {
    let dir = tempfile::tempdir().unwrap();
    // a tensor directory pointing past the end of the data
    let t: &[(&str, &[u64], u32, u64)] = &[("token_embd.weight", &[8, 3], 0, 0)];
    let p = write(dir.path(), "short.gguf", &gguf(&meta("llama", "smollm"), t, 50));
    let e = Llama::load(&p).err().expect("a short file is refused");
    assert!(matches!(e, LlmError::TruncatedGguf { need, .. } if need > 0), "{e:?}");
    let len = std::fs::metadata(&p).unwrap().len();
    assert_eq!(one_line(e), format!("{} is a truncated GGUF: {len} bytes, its tensors need {}", p.display(), len + 46));
    // the real SmolLM2 file cut in its tensor data, and cut in its header
    let real = std::fs::read(tq_data::datasets::smollm_gguf(true).unwrap_or_else(|e| panic!("cannot fetch the SmolLM2 GGUF: {e}"))).unwrap();
    let p = write(dir.path(), "cut-data.gguf", &real[..real.len() - 1000]);
    let e = one_line(Llama::load(&p).err().expect("a cut file is refused"));
    assert_eq!(e, format!("{} is a truncated GGUF: {} bytes, its tensors need {}", p.display(), real.len() - 1000, real.len()));
    let p = write(dir.path(), "cut-header.gguf", &real[..100_000]);
    let e = one_line(Llama::load(&p).err().expect("a cut header is refused"));
    assert!(e.starts_with(&format!("{} is not a readable GGUF file: ", p.display())), "{e}");
    let p = write(dir.path(), "empty.gguf", &[]);
    let e = one_line(Llama::load(&p).err().expect("an empty file is refused"));
    assert!(e.starts_with(&format!("{} is not a readable GGUF file: ", p.display())), "{e}");
}
