use tq_core::baselines::fp::{e2m1_decode, e2m1_encode, e4m3_decode, e4m3_encode, e8m0_decode, e8m0_for};
use tq_core::baselines::ggml::{dequantize_block, quantize_block, GgmlType, QK};
use tq_core::{build, registry, CodecKind, RotationKind};

fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut r = tq_core::rng::Xoshiro256::new(seed);
    (0..n * dim).map(|_| r.gaussian() as f32).collect()
}

#[test]
fn e2m1_rounds_to_nearest_even_and_saturates() {
    // value → code (sign in bit 3); ties go to the even magnitude code
    for (x, c) in [
        (0.0f32, 0u8),
        (0.25, 0),
        (0.26, 1),
        (0.75, 2),
        (1.25, 2),
        (1.75, 4),
        (2.5, 4),
        (3.5, 6),
        (5.0, 6),
        (5.01, 7),
        (6.0, 7),
        (7.0, 7),
        (1e30, 7),
        (-0.75, 0xA),
        (-6.5, 0xF),
        (-0.1, 0),
        (1e-40, 0), // subnormal input
    ] {
        assert_eq!(e2m1_encode(x), c, "x = {x}");
    }
    assert_eq!(e2m1_decode(0xA), -1.0);
    assert_eq!(e2m1_decode(7), 6.0);
}

#[test]
fn e4m3_and_e8m0_scales_are_exact() {
    assert_eq!(e4m3_encode(448.0), 0x7E);
    assert_eq!(e4m3_encode(1e6), 0x7E); // saturates
    assert_eq!(e4m3_decode(0x7E), 448.0);
    assert_eq!(e4m3_encode(1.0), 0x38);
    assert_eq!(e4m3_encode(1.0625), 0x38); // tie between 1 and 1.125 → even code
    assert_eq!(e4m3_encode(1.1875), 0x3A); // tie between 1.125 (0x39) and 1.25 (0x3A) → even
    assert_eq!(e4m3_decode(1), 2f32.powi(-9)); // smallest subnormal
    assert_eq!(e4m3_encode(2f32.powi(-10)), 0); // tie with zero → even
    assert_eq!(e4m3_encode(3.0 * 2f32.powi(-10)), 2); // tie between codes 1 and 2
    assert_eq!(e4m3_decode(8), 2f32.powi(-6)); // smallest normal
    assert_eq!(e8m0_for(1.0), 125);
    assert_eq!(e8m0_decode(125), 0.25);
    assert_eq!(e8m0_for(6.0), 127);
    assert_eq!(e8m0_for(7.99), 127);
    assert_eq!(e8m0_for(8.0), 128);
    assert_eq!(e8m0_for(0.0), 0);
    assert_eq!(e8m0_for(2f32.powi(-149)), 0); // clamped at 2^-127
    assert_eq!(e8m0_for(2f32.powi(-120)), 5);
}

#[test]
fn mxfp4_and_nvfp4_encode_hand_computed_blocks() {
    let c = build("mxfp4", 32, 0, RotationKind::Hadamard).unwrap();
    let mut x = [0.0f32; 32];
    x[..5].copy_from_slice(&[6.0, 1.0, -0.75, 0.25, 7.9]);
    let mut code = vec![0u8; c.code_size()];
    c.encode(&x, &mut code).unwrap();
    assert_eq!(code.len(), 17);
    // amax 7.9 → scale 2^(2−2) = 1 (E8M0 127); 7.9 saturates to 6
    assert_eq!(code[..4], [127, 0x27, 0x0A, 0x07]);
    assert!(code[4..].iter().all(|&b| b == 0));
    let mut y = [0.0f32; 32];
    c.decode(&code, &mut y).unwrap();
    assert_eq!(y[..5], [6.0, 1.0, -1.0, 0.0, 6.0]);
    // zero block
    c.encode(&[0.0; 32], &mut code).unwrap();
    assert!(code.iter().all(|&b| b == 0));

    let c = build("nvfp4", 16, 0, RotationKind::Hadamard).unwrap();
    let mut x = [0.0f32; 16];
    x[..3].copy_from_slice(&[6.0, -3.0, 0.5]);
    let mut code = vec![0u8; c.code_size()];
    c.encode(&x, &mut code).unwrap();
    assert_eq!(code.len(), 9 + 4);
    let g = f32::from_le_bytes(code[9..13].try_into().unwrap());
    assert_eq!(g, 6.0 / 2688.0);
    assert_eq!(code[0], 0x7E); // block scale 448 (amax/6/g)
                               // elements relative to scale 448·g ≈ 1: 6 → 7, −3 → 0x8|5, 0.5 → 1
    assert_eq!(code[1..3], [0xD7, 0x01]);
    let mut y = [0.0f32; 16];
    c.decode(&code, &mut y).unwrap();
    for (a, b) in y[..3].iter().zip([6.0f32, -3.0, 0.5]) {
        assert!((a - b).abs() < 1e-5, "{y:?}");
    }
}

#[test]
fn q8_0_and_q4_0_match_the_ggml_reference_by_hand() {
    let mut x = [0.0f32; QK];
    x[..3].copy_from_slice(&[1.0, -2.0, 0.5]);
    let mut b = vec![0u8; GgmlType::Q8_0.block_bytes()];
    quantize_block(GgmlType::Q8_0, &x, &mut b);
    // d = 2/127, q = round(x·63.5) with halves away from zero
    assert_eq!(half::f16::from_le_bytes([b[0], b[1]]), half::f16::from_f32(2.0 / 127.0));
    assert_eq!(b[2..5], [64, (-127i8) as u8, 32]);
    assert!(b[5..].iter().all(|&v| v == 0));

    let mut b = vec![0u8; GgmlType::Q4_0.block_bytes()];
    quantize_block(GgmlType::Q4_0, &x, &mut b);
    // max-magnitude value −2 → d = 0.25; q = trunc(4x + 8.5); zeros → 8
    assert_eq!(half::f16::from_le_bytes([b[0], b[1]]).to_f32(), 0.25);
    assert_eq!(b[2..5], [0x8C, 0x80, 0x8A]);
    assert!(b[5..].iter().all(|&v| v == 0x88));
    let mut y = [0.0f32; QK];
    dequantize_block(GgmlType::Q4_0, &b, &mut y);
    assert_eq!(y[..3], [1.0, -2.0, 0.5]);
    // positive extreme first: −2 then lands on q = min(15, 16) = 15 → −1.75 (ggml's asymmetry)
    let mut x = [0.0f32; QK];
    x[..2].copy_from_slice(&[2.0, -2.0]);
    quantize_block(GgmlType::Q4_0, &x, &mut b);
    dequantize_block(GgmlType::Q4_0, &b, &mut y);
    assert_eq!(y[..2], [2.0, -1.75]);
    // zero block: d = 0, every q = 0 (q8_0) or 8 (q4_0), decodes to zeros
    let mut z = [0xFFu8; 34];
    quantize_block(GgmlType::Q8_0, &[0.0; QK], &mut z);
    assert!(z.iter().all(|&v| v == 0));
    quantize_block(GgmlType::Q4_0, &[0.0; QK], &mut b);
    // (d = 0/−8 = −0.0, stored as f16 −0 exactly as ggml does)
    assert!(half::f16::from_le_bytes([b[0], b[1]]).to_f32() == 0.0 && b[2..].iter().all(|&v| v == 0x88));
    let c = build("q4_0", 40, 0, RotationKind::Hadamard).unwrap();
    assert_eq!(c.code_size(), 2 * 18); // 40 values: one full and one padded block
    assert_eq!(build("q8_0", 64, 0, RotationKind::Hadamard).unwrap().bits_per_value(), 8.5);
    assert_eq!(build("q4_0", 64, 0, RotationKind::Hadamard).unwrap().bits_per_value(), 4.5);
    assert_eq!(build("mxfp4", 64, 0, RotationKind::Hadamard).unwrap().bits_per_value(), 4.25);
    assert_eq!(build("nvfp4", 64, 0, RotationKind::Hadamard).unwrap().bits_per_value(), 4.5 + 0.5);
}

/// More bits never give a worse reconstruction within a family.
#[test]
fn more_bits_never_worse_within_a_family() {
    let dim = 64;
    let xs = data(1500, dim, 3);
    let rel = |name: &str| {
        let mut c = build(name, dim, 5, RotationKind::Hadamard).unwrap();
        if c.wants_training() {
            c.train(&xs).unwrap();
        }
        let mut codes = vec![0u8; 1500 * c.code_size()];
        c.encode_batch(&xs, &mut codes).unwrap();
        let mut y = vec![0.0f32; xs.len()];
        c.decode_batch(&codes, &mut y).unwrap();
        let e: f64 = xs.iter().zip(&y).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        e / xs.iter().map(|a| (*a as f64).powi(2)).sum::<f64>()
    };
    for family in ["tq-mse-", "rabitq-", "pq-"] {
        let v: Vec<f64> = (1..=8).map(|b| rel(&format!("{family}{b}"))).collect();
        for b in 1..8 {
            assert!(v[b] <= v[b - 1] * 1.001, "{family}: {v:?}");
        }
    }
    let polar: Vec<f64> = (2..=8).map(|b| rel(&format!("polar-{b}"))).collect();
    for b in 1..polar.len() {
        assert!(polar[b] <= polar[b - 1] * 1.001, "polar: {polar:?}");
    }
    assert!(rel("q8_0") < rel("q4_0"));
    assert!(rel("q8_0-rot") < rel("q4_0-rot"));
    // every baseline is a registry entry with a true size
    let n = registry().iter().filter(|e| !e.kind.is_turboquant()).count();
    assert_eq!(n, 8 + 8 + 4 + 2 + 7);
    assert!(registry().iter().any(|e| matches!(e.kind, CodecKind::Pq { bits: 4 })));
}

/// RaBitQ's estimator is unbiased over random rotations (fixed x and q,
/// independent Haar rotations).
#[test]
fn rabitq_estimator_is_unbiased_over_rotations() {
    let dim = 64;
    let x = data(1, dim, 1000);
    let q = data(1, dim, 5000);
    let (mut sum, mut sq, mut n) = (0.0f64, 0.0f64, 0.0f64);
    for seed in 0..200u64 {
        let c = build("rabitq-2", dim, seed, RotationKind::Haar).unwrap();
        let mut code = vec![0u8; c.code_size()];
        c.encode(&x, &mut code).unwrap();
        let est = c.score_ip(&c.prepare(&q).unwrap(), &code) as f64;
        let exact: f64 = x.iter().zip(&q).map(|(a, b)| *a as f64 * *b as f64).sum();
        let e = est - exact;
        sum += e;
        sq += e * e;
        n += 1.0;
    }
    let mean = sum / n;
    let se = ((sq / n - mean * mean) / n).sqrt();
    assert!(mean.abs() < 4.0 * se, "bias {mean} ± {se}");
}

#[test]
fn kivi_groups_keys_per_channel_and_values_per_token() {
    use tq_core::matrix::{build_matrix, Axis};
    // 2 tokens × 2 channels, group 32 (one group per channel for keys, per token for values)
    let m = [0.0f32, 10.0, 3.0, 40.0];
    let k = build_matrix("kivi-2", 2, Axis::PerChannel, 0).unwrap();
    let mut code = vec![0u8; k.encoded_size(2)];
    assert_eq!(code.len(), 2 * 4 + 1); // 2 groups (channels) of f16 scale+zero, 4 two-bit indices
    k.encode(&m, &mut code).unwrap();
    // channel 0: min 0, max 3 → scale 1, indices 0, 3; channel 1: min 10, max 40 → scale 10, indices 0, 3
    assert_eq!(half::f16::from_le_bytes([code[0], code[1]]).to_f32(), 1.0);
    assert_eq!(half::f16::from_le_bytes([code[6], code[7]]).to_f32(), 10.0);
    assert_eq!(code[8], 0b11_11_00_00);
    let mut y = [0.0f32; 4];
    k.decode(&code, 2, &mut y).unwrap();
    assert_eq!(y, m);
    // values: per token. token 0: 0..10 → scale 10/3; token 1: 3..40
    let v = build_matrix("kivi-2", 2, Axis::PerToken, 0).unwrap();
    let mut code = vec![0u8; v.encoded_size(2)];
    v.encode(&m, &mut code).unwrap();
    v.decode(&code, 2, &mut y).unwrap();
    assert_eq!((y[0], y[2]), (0.0, 3.0)); // each token's minimum is exact
    assert!((y[1] - 10.0).abs() < 0.01 && (y[3] - 40.0).abs() < 0.05, "{y:?}");
    // bits per value on a long block: B + 32 bits per group of 32
    let k = build_matrix("kivi-2", 64, Axis::PerChannel, 0).unwrap();
    assert_eq!(k.bits_per_value(1024), 3.0);
}

#[test]
fn matrix_codecs_round_trip_and_more_bits_help() {
    use tq_core::matrix::{build_matrix, matrix_registry, Axis};
    let ids: std::collections::HashSet<u16> = registry().iter().map(|e| e.id).chain(matrix_registry().iter().map(|e| e.id)).collect();
    assert_eq!(ids.len(), registry().len() + matrix_registry().len(), "ids are unique across both shapes");
    let (t, c) = (400usize, 32usize);
    let m = data(t, c, 9);
    let rel = |name: &str, axis| {
        let mut codec = build_matrix(name, c, axis, 1).unwrap();
        codec.train(&m).unwrap();
        let mut code = vec![0u8; codec.encoded_size(t)];
        codec.encode(&m, &mut code).unwrap();
        let mut y = vec![0.0f32; m.len()];
        codec.decode(&code, t, &mut y).unwrap();
        let e: f64 = m.iter().zip(&y).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        e / m.iter().map(|a| (*a as f64).powi(2)).sum::<f64>()
    };
    for axis in [Axis::PerChannel, Axis::PerToken] {
        assert!(rel("kivi-4", axis) < rel("kivi-2", axis));
    }
    assert!(rel("qet-4", Axis::PerChannel) < rel("qet-2", Axis::PerChannel));
    assert!(rel("qet-4", Axis::PerChannel) < 0.5);
    assert!(rel("tq-mse-4", Axis::PerChannel) < 0.02);
    // untrained QET refuses to encode; bad names are errors
    let q = build_matrix("qet-4", c, Axis::PerChannel, 0).unwrap();
    assert!(q.encode(&m, &mut vec![0u8; q.encoded_size(t)]).is_err());
    assert!(build_matrix("kivi-9", c, Axis::PerChannel, 0).is_err());
    assert!(build_matrix("qet-x", c, Axis::PerChannel, 0).is_err());
}
