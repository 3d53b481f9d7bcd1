use tq_core::rng::Xoshiro256;
use tq_core::{build, lookup, registry, RotationKind, TqError};

fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut r = Xoshiro256::new(seed);
    (0..n * dim).map(|_| (r.gaussian() * 3.0) as f32).collect()
}

#[test]
fn registry_names_and_ids_are_unique_and_code_sizes_match() {
    let reg = registry();
    for (i, a) in reg.iter().enumerate() {
        for b in &reg[i + 1..] {
            assert_ne!(a.id, b.id);
            assert_ne!(a.name, b.name);
        }
        for dim in [4usize, 50, 128, 130] {
            let c = a.build(dim, 1, RotationKind::Hadamard, &[]).unwrap();
            assert_eq!(c.code_size(), a.code_size(dim), "{} dim {dim}", a.name);
            assert_eq!(c.name(), a.name);
            assert!((c.bits_per_value() - a.bits_per_value(dim)).abs() < 1e-12);
            if matches!(a.kind, tq_core::CodecKind::Pq { .. }) {
                // M = round(dim·B/8) bytes: no per-vector overhead, rounding only
                assert!((a.bits_per_value(dim) - a.nominal_bits()).abs() <= 4.0 / dim as f64 + 1e-12, "{}", a.name);
            } else {
                assert!(a.bits_per_value(dim) > a.nominal_bits(), "{} at {dim}", a.name);
            }
        }
    }
    assert_eq!(lookup("tq-mse-4").unwrap().code_size(128), 68);
    assert_eq!(lookup("tq-prod-1").unwrap().code_size(128), 20);
    assert_eq!(lookup("tq-mse-2.5").unwrap().code_size(128), 24 + 16 + 8);
}

#[test]
fn bad_names_and_bits_are_named() {
    assert_eq!(lookup("tq-mse-9").unwrap_err(), TqError::UnsupportedBits(9));
    assert_eq!(lookup("tq-prod-0").unwrap_err(), TqError::UnsupportedBits(0));
    let e = lookup("nope").unwrap_err();
    assert!(matches!(e, TqError::UnknownCodec { .. }));
    assert!(e.to_string().contains("rabitq-4") && e.to_string().contains("tq-mse-4"), "the error lists the valid names: {e}");
    assert!(matches!(build("tq-mse-4", 1, 0, RotationKind::Hadamard), Err(TqError::BadDim(1, 2))));
}

#[test]
fn every_codec_roundtrips_and_scores_match_decoded() {
    for e in registry() {
        for dim in [4usize, 9, 64, 100] {
            let mut c = e.build(dim, 7, RotationKind::Hadamard, &[]).unwrap();
            let xs = data(20, dim, 1);
            if c.wants_training() {
                c.train(&xs).unwrap();
            }
            let mut codes = vec![0u8; 20 * c.code_size()];
            c.encode_batch(&xs, &mut codes).unwrap();
            let mut dec = vec![0.0f32; xs.len()];
            c.decode_batch(&codes, &mut dec).unwrap();
            let q = data(1, dim, 2);
            let pq = c.prepare(&q).unwrap();
            for i in 0..20 {
                let code = &codes[i * c.code_size()..(i + 1) * c.code_size()];
                let xh = &dec[i * dim..(i + 1) * dim];
                let ip: f64 = q.iter().zip(xh).map(|(&a, &b)| a as f64 * b as f64).sum();
                let s = c.score_ip(&pq, code) as f64;
                let scale: f64 = q.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() * xh.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
                assert!((s - ip).abs() <= 1e-4 * scale + 1e-6, "{} dim {dim}: {s} vs {ip}", e.name);
                if !matches!(e.kind, tq_core::CodecKind::Prod { .. } | tq_core::CodecKind::RaBitQ { .. }) {
                    // L2 is the distance to the decoded vector (the unbiased
                    // estimators of prod and RaBitQ estimate ‖q − x‖ instead)
                    let l2: f64 = q.iter().zip(xh).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
                    let got = c.score_l2(&pq, code) as f64;
                    assert!((got - l2).abs() <= 1e-3 * (l2 + 1.0), "{} l2 {got} vs {l2}", e.name);
                }
            }
            // relative reconstruction error is bounded for >= 3 bits
            if e.nominal_bits() >= 3.0 && !matches!(e.kind, tq_core::CodecKind::Prod { .. } | tq_core::CodecKind::RaBitQ { .. } | tq_core::CodecKind::Pq { .. })
            {
                let err: f64 = xs.iter().zip(&dec).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
                let nrm: f64 = xs.iter().map(|&a| (a as f64).powi(2)).sum();
                assert!(err / nrm < 0.2, "{} dim {dim}: rel err {}", e.name, err / nrm);
            }
        }
    }
}

#[test]
fn zero_vector_encodes_and_decodes_to_zero() {
    // (PQ is left out: it reconstructs the nearest trained centroid)
    for e in registry().iter().filter(|e| !matches!(e.kind, tq_core::CodecKind::Pq { .. })) {
        let c = e.build(32, 3, RotationKind::Hadamard, &[]).unwrap();
        let mut code = vec![0u8; c.code_size()];
        c.encode(&[0.0; 32], &mut code).unwrap();
        let mut out = vec![1.0f32; 32];
        c.decode(&code, &mut out).unwrap();
        assert!(out.iter().all(|&v| v == 0.0), "{}: {out:?}", e.name);
        let pq = c.prepare(&[1.0; 32]).unwrap();
        assert_eq!(c.score_ip(&pq, &code), 0.0, "{}", e.name);
    }
}

#[test]
fn bad_input_is_refused() {
    let c = build("tq-mse-4", 8, 0, RotationKind::Hadamard).unwrap();
    let mut code = vec![0u8; c.code_size()];
    let mut x = [1.0f32; 8];
    x[3] = f32::NAN;
    assert!(matches!(c.encode(&x, &mut code), Err(TqError::NonFinite { vector: 0, coord: 3, .. })));
    x[3] = f32::INFINITY;
    assert!(matches!(c.encode(&x, &mut code), Err(TqError::NonFinite { .. })));
    assert!(matches!(c.encode(&[1.0; 7], &mut code), Err(TqError::DimMismatch { .. })));
    assert!(matches!(c.encode(&[1.0; 16], &mut code), Err(TqError::DimMismatch { expected: 8, got: 16 })));
    let mut out = [0.0f32; 8];
    assert!(c.decode_batch(&[0u8; 7], &mut out).is_err());
    assert!(matches!(c.encode(&[1.0; 8], &mut code[..3]), Err(TqError::CodeSizeMismatch { .. })));
    assert!(matches!(c.encode_batch(&[], &mut []), Err(TqError::DimMismatch { .. })));
    assert!(matches!(c.prepare(&[1.0; 9]), Err(TqError::DimMismatch { .. })));
    // huge but finite values still encode (no overflow to inf/NaN)
    let big = [3.0e37f32; 8];
    c.encode(&big, &mut code).unwrap();
    let mut out = [0.0f32; 8];
    c.decode(&code, &mut out).unwrap();
    assert!(out.iter().all(|v| v.is_finite() && *v > 1e37));
    let tiny = [1.0e-42f32; 8];
    c.encode(&tiny, &mut code).unwrap();
    c.decode(&code, &mut out).unwrap();
    assert!(out.iter().all(|v| v.is_finite() && *v > 0.0));
}

#[test]
fn encoding_is_identical_on_one_and_many_threads() {
    for (dim, name) in [
        (130, "tq-mse-4"),
        (130, "tq-mse-3-nc"),
        (130, "tq-prod-3"),
        (130, "tq-prod-2-orth"),
        (130, "tq-mse-2.5"),
        (128, "tq-mse-4"),
        (128, "tq-mse-2-nc"),
        (50, "rabitq-4"),
        (50, "pq-4"),
        (50, "q4_0-rot"),
        (50, "nvfp4"),
    ] {
        let xs = data(3000, dim, 9);
        let mut c = build(name, dim, 42, RotationKind::Hadamard).unwrap();
        if c.wants_training() {
            c.train(&xs[..1000 * dim]).unwrap();
        }
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut codes = vec![0u8; 3000 * c.code_size()];
            pool.install(|| c.encode_batch(&xs, &mut codes).unwrap());
            codes
        };
        let one = run(1);
        assert_eq!(one, run(4), "{name}");
        assert_eq!(one, run(3), "{name}");
    }
}

#[test]
fn fractional_codec_picks_the_highest_energy_channels() {
    let dim = 16;
    let mut xs = data(500, dim, 4);
    for v in xs.chunks_exact_mut(dim) {
        for c in [1usize, 4, 5, 9, 11, 12, 14, 15] {
            v[c] *= 10.0;
        }
    }
    let e = lookup("tq-mse-3.5").unwrap();
    let mut c = e.build(dim, 1, RotationKind::Hadamard, &[]).unwrap();
    c.train(&xs).unwrap();
    let params = c.params();
    let ids: Vec<u32> = params.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(ids, vec![1, 4, 5, 9, 11, 12, 14, 15]);
    // the stored parameters rebuild the same codec
    let c2 = e.build(dim, 1, RotationKind::Hadamard, &params).unwrap();
    let (mut a, mut b) = (vec![0u8; c.code_size()], vec![0u8; c.code_size()]);
    c.encode(&xs[..dim], &mut a).unwrap();
    c2.encode(&xs[..dim], &mut b).unwrap();
    assert_eq!(a, b);
    // corrupt parameters are refused
    assert!(e.build(dim, 1, RotationKind::Hadamard, &params[..8]).is_err());
    let mut bad = params.clone();
    bad[0] = 200;
    assert!(e.build(dim, 1, RotationKind::Hadamard, &bad).is_err());
}

#[test]
fn batch_scoring_matches_single_scoring() {
    for name in ["tq-mse-1", "tq-mse-2", "tq-mse-3", "tq-mse-4", "tq-mse-4-nc", "tq-mse-8", "tq-prod-3", "tq-mse-2.5"] {
        for dim in [50usize, 128, 131] {
            let c = build(name, dim, 5, RotationKind::Hadamard).unwrap();
            let n = 300;
            let xs = data(n, dim, 11);
            let mut codes = vec![0u8; n * c.code_size()];
            c.encode_batch(&xs, &mut codes).unwrap();
            let q = data(1, dim, 12);
            let pq = c.prepare(&q).unwrap();
            let mut many = vec![0.0f32; n];
            c.score_ip_many(&pq, &codes, &mut many);
            let qn: f32 = q.iter().map(|v| v * v).sum::<f32>().sqrt();
            for (i, code) in codes.chunks_exact(c.code_size()).enumerate() {
                let one = c.score_ip(&pq, code);
                let xn: f32 = xs[i * dim..(i + 1) * dim].iter().map(|v| v * v).sum::<f32>().sqrt();
                assert!((one - many[i]).abs() <= 1e-5 * qn * xn * 2.0, "{name} dim {dim} #{i}: {one} vs {}", many[i]);
            }
        }
    }
}
