//! Resource limits and unrepresentable inputs: oversized dimensions and dense
//! transforms are refused with a one-line error before anything is allocated;
//! a finite vector either encodes to a code that decodes finite or is refused.

use proptest::prelude::*;
use tq_core::limits::{MAX_DENSE_DIM, MAX_DIM};
use tq_core::matrix::{build_matrix, matrix_registry, Axis, MatrixCodec};
use tq_core::rng::Xoshiro256;
use tq_core::{build, registry, Codec, RotationKind, TqError};

fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut r = Xoshiro256::new(seed);
    (0..n * dim).map(|_| (r.gaussian() * 3.0) as f32).collect()
}

#[test]
fn dimensions_above_max_dim_are_refused_naming_the_field() {
    for name in ["tq-mse-4", "tq-prod-2-orth", "q8_0", "pq-4", "polar-4"] {
        let e = build(name, MAX_DIM + 1, 0, RotationKind::Hadamard).err().expect("refused");
        assert!(matches!(e, TqError::LimitExceeded { field: "dim", limit: MAX_DIM, .. }), "{name}: {e}");
        assert!(!e.to_string().contains('\n'));
    }
    for name in ["kivi-2", "qet-4", "tq-mse-4"] {
        let e = build_matrix(name, MAX_DIM + 1, Axis::PerToken, 0).err().expect("refused");
        assert!(matches!(e, TqError::LimitExceeded { field: "channels", .. }), "{name}: {e}");
    }
    assert!(build("tq-mse-4", MAX_DIM, 0, RotationKind::Hadamard).is_ok());
}

#[test]
fn dense_transforms_are_refused_above_their_limit_with_the_structured_alternative() {
    const { assert!(MAX_DENSE_DIM >= 1536, "the report runs dense QJL at d = 1536") };
    let d = MAX_DENSE_DIM + 1;
    for name in ["tq-prod-1", "tq-prod-3"] {
        let e = build(name, d, 0, RotationKind::Hadamard).err().expect("refused");
        assert!(matches!(e, TqError::LimitExceeded { limit: MAX_DENSE_DIM, .. }), "{e}");
        let m = e.to_string();
        assert!(m.contains("-orth") && m.contains("2048") && m.contains("GiB"), "{m}");
    }
    // tq-prod at 100,000 (once a 40 GB matrix): refused by MAX_DIM, at once
    assert!(matches!(build("tq-prod-2", 100_000, 0, RotationKind::Hadamard), Err(TqError::LimitExceeded { .. })));
    for name in ["tq-mse-4", "rabitq-1", "q8_0-rot", "polar-3", "tq-prod-2-orth"] {
        let e = build(name, d, 0, RotationKind::Haar).err().expect("refused");
        assert!(e.to_string().contains("hadamard"), "{name}: {e}");
    }
    // the structured variants are fine far above it
    assert!(build("tq-prod-2-orth", 8192, 0, RotationKind::Hadamard).is_ok());
    assert!(build("tq-mse-4", 8192, 0, RotationKind::Hadamard).is_ok());
}

/// Every registry codec at `dim`, trained on ordinary data where it learns.
fn codecs(dim: usize) -> Vec<Box<dyn Codec>> {
    registry()
        .iter()
        .filter(|e| dim >= e.min_dim())
        .map(|e| {
            let mut c = e.build(dim, 3, RotationKind::Hadamard, &[]).unwrap();
            if c.wants_training() {
                c.train(&data(300, dim, 5)).unwrap();
            }
            c
        })
        .collect()
}

fn matrix_codecs(channels: usize) -> Vec<Box<dyn MatrixCodec>> {
    matrix_registry()
        .iter()
        .map(|e| {
            let mut c = build_matrix(&e.name, channels, Axis::PerChannel, 3).unwrap();
            c.train(&data(300, channels, 5)).unwrap();
            c
        })
        .collect()
}

/// Encode either refuses (with an error that names the vector) or gives a
/// code that decodes to finite values.
fn encode_refuses_or_decodes_finite(c: &dyn Codec, x: &[f32]) -> std::result::Result<(), String> {
    let mut code = vec![0u8; c.code_size()];
    match c.encode(x, &mut code) {
        Err(TqError::Unencodable { vector: 0, .. }) => Ok(()),
        Err(TqError::BadParams(m)) if m.contains("overflows f32") => Ok(()),
        Err(e) => Err(format!("{}: unexpected error {e}", c.name())),
        Ok(()) => {
            let mut out = vec![0.0f32; c.dim()];
            c.decode(&code, &mut out).unwrap();
            match out.iter().position(|v| !v.is_finite()) {
                None => Ok(()),
                Some(j) => Err(format!("{}: accepted, decodes to {} at {j}", c.name(), out[j])),
            }
        }
    }
}

#[test]
fn extreme_norms_are_refused_or_represented_by_every_codec() {
    for dim in [64usize, 100] {
        let cs = codecs(dim);
        let dir = data(1, dim, 9);
        for scale in [1e30f32, 1e35, 1e36, 3e36, 1e37, 3e37, 1e38, 3e38] {
            let n = dir.iter().map(|v| v * v).sum::<f32>().sqrt();
            let x: Vec<f32> = dir.iter().map(|v| v / n * scale).collect();
            let mut spike = vec![0.0f32; dim];
            spike[dim / 3] = scale;
            let mut flat = vec![scale / (dim as f32).sqrt(); dim];
            flat[0] = -flat[0];
            for c in &cs {
                for v in [&x, &spike, &flat] {
                    encode_refuses_or_decodes_finite(c.as_ref(), v).unwrap();
                }
                // the batch path refuses the same vectors, naming the right one
                let mut batch = data(3, dim, 4);
                batch.extend_from_slice(&x);
                let mut codes = vec![0u8; 4 * c.code_size()];
                match c.encode_batch(&batch, &mut codes) {
                    Ok(()) => {
                        let mut out = vec![0.0f32; batch.len()];
                        c.decode_batch(&codes, &mut out).unwrap();
                        assert!(out.iter().all(|v| v.is_finite()), "{} at scale {scale:e}", c.name());
                    }
                    Err(TqError::Unencodable { vector, .. }) => {
                        assert_eq!(vector, 3, "{}", c.name())
                    }
                    Err(TqError::BadParams(m)) => assert!(m.contains("vector 3"), "{m}"),
                    Err(e) => panic!("{}: {e}", c.name()),
                }
            }
        }
    }
}

#[test]
fn f16_scaled_formats_refuse_what_their_scale_cannot_hold() {
    // q8_0: the f16 scale amax/127 overflows above 65504·127 ≈ 8.3e6
    let c = build("q8_0", 64, 0, RotationKind::Hadamard).unwrap();
    let mut code = vec![0u8; c.code_size()];
    let mut x = vec![1.0f32; 64];
    x[5] = 1e7;
    let e = c.encode(&x, &mut code).unwrap_err();
    assert!(matches!(e, TqError::Unencodable { vector: 0, .. }), "{e}");
    assert!(e.to_string().contains("q8_0"), "{e}");
    x[5] = 8e6;
    c.encode(&x, &mut code).unwrap();
    // KIVI's f16 zero point and scale
    let k = build_matrix("kivi-2", 64, Axis::PerToken, 0).unwrap();
    let mut m = data(4, 64, 1);
    let mut out = vec![0u8; k.encoded_size(4)];
    k.encode(&m, &mut out).unwrap();
    m[64 * 2 + 1] = 1e6;
    assert!(matches!(k.encode(&m, &mut out), Err(TqError::Unencodable { vector: 2, .. })));
}

#[test]
fn matrix_codecs_refuse_or_represent_extreme_values() {
    for c in matrix_codecs(64) {
        for scale in [1e5f32, 1e20, 1e36, 3e38] {
            let mut m = data(40, 64, 2);
            m[64 * 7 + 3] = scale;
            let mut out = vec![0u8; c.encoded_size(40)];
            match c.encode(&m, &mut out) {
                Ok(_) => {
                    let mut dec = vec![0.0f32; m.len()];
                    c.decode(&out, 40, &mut dec).unwrap();
                    assert!(dec.iter().all(|v| v.is_finite()), "{} at {scale:e}", c.name());
                }
                Err(TqError::Unencodable { vector: 7, .. }) => {}
                Err(e) => panic!("{}: {e}", c.name()),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// Norms from 1e-30 up to f32::MAX, every registry codec: encode returns
    /// Err, or the code decodes to finite values.
    #[test]
    fn any_norm_up_to_f32_max_is_refused_or_decodes_finite(
        seed in 0u64..1_000_000,
        log10 in -30.0f64..38.53,
        spike in proptest::option::of(0usize..48),
    ) {
        thread_local! { static CS: Vec<Box<dyn Codec>> = codecs(48); }
        let dim = 48;
        let mut x = data(1, dim, seed);
        if let Some(j) = spike {
            x[j] *= 1e6;
        }
        let n = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        let target = 10f64.powf(log10).min(f32::MAX as f64);
        let x: Vec<f32> = x.iter().map(|&v| (v as f64 / n * target) as f32).collect();
        CS.with(|cs| -> std::result::Result<(), TestCaseError> {
            for c in cs {
                encode_refuses_or_decodes_finite(c.as_ref(), &x).map_err(TestCaseError::fail)?;
            }
            Ok(())
        })?;
    }
}

/// The capability flags of every registry entry agree with the built codec.
#[test]
fn registry_capabilities_match_the_codecs() {
    use tq_core::registry::{Family, KvScale};
    for e in registry() {
        let c = e.build(64, 1, RotationKind::Hadamard, &[]).unwrap();
        assert_eq!(e.caps.trainable, c.wants_training(), "{}", e.name);
        assert_eq!(e.caps.needs_training, !c.is_trained(), "{}", e.name);
        assert_eq!(e.caps.fastscan, c.fastscan().is_some(), "{}", e.name);
        assert_eq!(e.caps.codebook, c.codebook_view().is_some(), "{}", e.name);
        assert_eq!(e.caps.kv == Some(KvScale::Bf16), e.caps.codebook || c.two_scaled_parts().is_some(), "{}", e.name);
        assert_eq!(e.family, e.kind.family());
        assert_eq!(e.caps.online, !e.caps.trainable || e.family == Family::RaBitQ, "{}", e.name);
        let gpu = matches!(e.name.as_str(), "q8_0" | "q4_0" | "tq-mse-2" | "tq-mse-3" | "tq-mse-4" | "tq-mse-2-nc" | "tq-mse-3-nc" | "tq-mse-4-nc");
        assert_eq!(e.caps.gpu, gpu, "{}", e.name);
        assert_eq!(e.norm_correction, e.name.ends_with("-nc"));
        if let Some(b) = e.bits {
            assert!(e.name.contains(&b.to_string()), "{}", e.name);
        }
    }
}
