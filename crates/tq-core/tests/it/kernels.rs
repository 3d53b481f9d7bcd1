use proptest::prelude::*;
use tq_core::bitpack::{pack, packed_len, unpack};
use tq_core::kernels::{available, scalar, Had2, SCALAR};
use tq_core::rng::Xoshiro256;
use tq_core::rotation::{Rotation, RotationKind};

fn randv(rng: &mut Xoshiro256, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gaussian() as f32).collect()
}

#[test]
fn fwht_simd_is_bit_identical_to_scalar() {
    let mut rng = Xoshiro256::new(3);
    for k in 0..=11 {
        let n = 1usize << k;
        // and signed zeros, subnormals and ties (a + b and a - b of equal values)
        let edge: Vec<f32> = (0..n).map(|j| [0.0, -0.0, 1e-40, -1e-42, 1.0, 1.0, -1.0, 1e30, -3e29][(j * 5) % 9]).collect();
        for x in [randv(&mut rng, n), edge] {
            let mut want = x.clone();
            scalar::fwht_ref(&mut want);
            for k in available() {
                let mut got = x.clone();
                (k.fwht)(&mut got);
                assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{} n={n}", k.name);
            }
        }
    }
}

#[test]
fn fwht_twice_is_n_times_identity() {
    let mut rng = Xoshiro256::new(4);
    let x = randv(&mut rng, 64);
    let mut y = x.clone();
    scalar::fwht_ref(&mut y);
    scalar::fwht_ref(&mut y);
    for (a, b) in x.iter().zip(&y) {
        assert!((a * 64.0 - b).abs() < 1e-4);
    }
}

#[test]
fn quantize_sum_dot_simd_are_bit_identical_to_scalar() {
    let mut rng = Xoshiro256::new(5);
    for bits in 1..=8u32 {
        let cb = tq_core::codebook::LloydMax::get(64, bits).unwrap();
        for n in [1usize, 7, 8, 9, 31, 64, 67, 130] {
            let y: Vec<f32> = randv(&mut rng, n).iter().map(|v| v / 8.0).collect();
            let mut want = vec![0u8; n];
            (SCALAR.quantize)(&y, &cb.boundaries, bits, &mut want);
            // the reference is the count of boundaries below each value
            for (j, &v) in y.iter().enumerate() {
                assert_eq!(want[j] as usize, cb.boundaries.iter().filter(|&&b| b < v).count());
            }
            for k in available() {
                let mut got = vec![0u8; n];
                (k.quantize)(&y, &cb.boundaries, bits, &mut got);
                assert_eq!(got, want, "{} bits={bits} n={n}", k.name);
                let z = randv(&mut rng, n);
                assert_eq!((k.sum_sq)(&y).to_bits(), (SCALAR.sum_sq)(&y).to_bits());
                assert_eq!((k.dot)(&y, &z).to_bits(), (SCALAR.dot)(&y, &z).to_bits());
            }
        }
    }
}

#[test]
fn dot_codes_simd_matches_scalar() {
    let mut rng = Xoshiro256::new(6);
    for bits in 1..=8u32 {
        let table = randv(&mut rng, 1 << bits);
        for n in [1usize, 5, 8, 9, 16, 50, 64, 127, 128, 384, 1536] {
            let q = randv(&mut rng, n);
            let idx: Vec<u8> = (0..n).map(|_| rng.below(1 << bits) as u8).collect();
            let mut packed = vec![0u8; packed_len(n, bits)];
            pack(&idx, bits, &mut packed);
            let want = scalar::dot_codes_ref(&q, &packed, bits, &table);
            let exact: f64 = q.iter().zip(&idx).map(|(&a, &i)| a as f64 * table[i as usize] as f64).sum();
            let mag: f64 = q.iter().zip(&idx).map(|(&a, &i)| (a as f64 * table[i as usize] as f64).abs()).sum();
            for k in available() {
                let got = (k.dot_codes)(&q, &packed, bits, &table) as f64;
                // float reassociation only: bounded by n·eps·Σ|terms|
                let tol = 4.0 * n as f64 * f32::EPSILON as f64 * mag + 1e-30;
                assert!((got - exact).abs() <= tol, "{} bits={bits} n={n}: {got} vs {exact}", k.name);
                assert!((want as f64 - exact).abs() <= tol);
            }
        }
    }
}

#[test]
fn axpy_and_lookup_codes_simd_match_scalar() {
    let mut rng = Xoshiro256::new(7);
    for bits in 1..=8u32 {
        let table = randv(&mut rng, 1 << bits);
        for n in [1usize, 5, 8, 9, 16, 50, 64, 127, 128, 384] {
            let idx: Vec<u8> = (0..n).map(|_| rng.below(1 << bits) as u8).collect();
            let mut packed = vec![0u8; packed_len(n, bits)];
            pack(&idx, bits, &mut packed);
            let start = randv(&mut rng, n);
            let w = 0.37f32;
            let mut want = start.clone();
            scalar::axpy_codes_ref(&packed, bits, &table, w, &mut want);
            for k in available() {
                let mut looked = vec![f32::NAN; n];
                (k.lookup_codes)(&packed, bits, &table, &mut looked);
                assert!(looked.iter().zip(&idx).all(|(&v, &i)| v == table[i as usize]), "{} bits={bits} n={n}", k.name);
                let mut got = start.clone();
                (k.axpy_codes)(&packed, bits, &table, w, &mut got);
                for j in 0..n {
                    let exact = start[j] as f64 + w as f64 * table[idx[j] as usize] as f64;
                    // one rounding (FMA) or two (mul, add)
                    let tol = 2.0 * f32::EPSILON as f64 * (start[j].abs() as f64 + (w * table[idx[j] as usize]).abs() as f64);
                    assert!((got[j] as f64 - exact).abs() <= tol, "{} bits={bits} n={n} j={j}", k.name);
                    assert!((want[j] as f64 - exact).abs() <= tol);
                }
            }
        }
    }
}

#[test]
fn group_attention_kernels_match_scalar() {
    let mut rng = Xoshiro256::new(8);
    for bits in 1..=8u32 {
        let table = randv(&mut rng, 1 << bits);
        // codes end with an f32 scale (4 bytes) or a bf16 one (2 bytes)
        for ((d, g, n), sb) in [(64usize, 3usize, 50usize), (128, 4, 9), (64, 1, 1), (16, 9, 5), (24, 2, 3), (64, 8, 7), (256, 5, 300), (32, 2, 129)]
            .into_iter()
            .flat_map(|c| [(c, 4usize), (c, 2)])
        {
            let packed = packed_len(d, bits);
            let cs = packed + sb;
            let mut codes = vec![0u8; n * cs];
            for c in codes.chunks_exact_mut(cs) {
                let idx: Vec<u8> = (0..d).map(|_| rng.below(1 << bits) as u8).collect();
                pack(&idx, bits, &mut c[..packed]);
                let s = (0.5 + rng.next_f64() as f32).to_le_bytes();
                c[packed..].copy_from_slice(&s[4 - sb..]);
            }
            let qs = randv(&mut rng, g * d);
            let w = randv(&mut rng, g * n);
            let mut want_s = vec![0.0f32; g * n];
            scalar::group_scores_ref(&codes, cs, bits, &table, &qs, d, 0.3, &mut want_s);
            let start = randv(&mut rng, g * d);
            let mut want_v = start.clone();
            scalar::group_values_ref(&codes, cs, bits, &table, &w, d, &mut want_v);
            for k in available() {
                let mut got = vec![f32::NAN; g * n];
                (k.group_scores)(&codes, cs, bits, &table, &qs, d, 0.3, &mut got);
                for (a, b) in got.iter().zip(&want_s) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()) * d as f32, "{} scores bits={bits} d={d} g={g} scale bytes {sb}: {a} vs {b}", k.name);
                }
                let mut acc = start.clone();
                (k.group_values)(&codes, cs, bits, &table, &w, d, &mut acc);
                for (a, b) in acc.iter().zip(&want_v) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()) * n as f32, "{} values bits={bits} d={d} g={g} scale bytes {sb}: {a} vs {b}", k.name);
                }
            }
            // longer rows (ld = n + 5, the first n tokens of each scored): the same
            // values in the first n of every row, the rest untouched / unread
            let ld = n + 5;
            for k in available() {
                let mut got = vec![f32::NAN; g * ld];
                (k.group_scores)(&codes, cs, bits, &table, &qs, d, 0.3, &mut got);
                for h in 0..g {
                    for t in 0..ld {
                        let a = got[h * ld + t];
                        if t < n {
                            let b = want_s[h * n + t];
                            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()) * d as f32, "{} strided scores bits={bits} d={d} g={g}: {a} vs {b}", k.name);
                        } else {
                            assert!(a.is_nan(), "{} wrote past the first n of a row", k.name);
                        }
                    }
                }
                let wl: Vec<f32> = (0..g * ld).map(|i| if i % ld < n { w[i / ld * n + i % ld] } else { f32::NAN }).collect();
                let mut acc = start.clone();
                (k.group_values)(&codes, cs, bits, &table, &wl, d, &mut acc);
                for (a, b) in acc.iter().zip(&want_v) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()) * n as f32, "{} strided values bits={bits} d={d} g={g}: {a} vs {b}", k.name);
                }
            }
        }
    }
}

proptest! {
    #[test]
    fn roundtrip_bitpack(bits in 1u32..=8, vals in proptest::collection::vec(any::<u8>(), 0..300)) {
        let idx: Vec<u8> = vals.iter().map(|v| (*v as u32 & ((1 << bits) - 1)) as u8).collect();
        let mut packed = vec![0u8; packed_len(idx.len(), bits)];
        pack(&idx, bits, &mut packed);
        let mut back = vec![0u8; idx.len()];
        unpack(&packed, bits, &mut back);
        prop_assert_eq!(&back, &idx);
        for (j, &v) in idx.iter().enumerate() {
            prop_assert_eq!(scalar::get_field(&packed, bits, j), v as usize);
        }
    }

    #[test]
    fn rotation_preserves_norm_and_inverts(dim in 2usize..300, seed in any::<u64>(), haar in any::<bool>()) {
        let kind = if haar && dim <= 96 { RotationKind::Haar } else { RotationKind::Hadamard };
        let r = Rotation::new(kind, dim, seed).unwrap();
        let mut rng = Xoshiro256::new(seed ^ 1);
        let x = randv(&mut rng, dim);
        let y = r.rotate(&x);
        let nx: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum();
        let ny: f64 = y.iter().map(|v| (*v as f64).powi(2)).sum();
        prop_assert!((nx - ny).abs() <= 1e-5 * nx);
        let z = r.unrotate(&y);
        for (a, b) in x.iter().zip(&z) {
            prop_assert!((a - b).abs() <= 1e-5 * (nx.sqrt() as f32));
        }
    }
}

#[test]
fn hadamard_spreads_a_basis_vector_in_any_dimension() {
    // no output coordinate keeps a large share of a basis vector's energy
    // (a uniformly random rotation gives max_j y_j² ≈ 2 ln(d)/d)
    // (below 8 dimensions the signed Hadamard blocks form a small discrete group: use haar there)
    for dim in [8usize, 12, 50, 96, 100, 128, 200, 384, 1536] {
        let r = Rotation::new(RotationKind::Hadamard, dim, 9).unwrap();
        let bound = if dim < 50 { 0.6 } else { 8.0 * (dim as f32).ln() / dim as f32 };
        for i in [0, dim / 2, dim - 1] {
            let mut e = vec![0.0f32; dim];
            e[i] = 1.0;
            let y = r.rotate(&e);
            let m = y.iter().map(|v| v * v).fold(0.0f32, f32::max);
            assert!(m <= bound, "dim {dim} basis {i}: max share {m} > {bound}");
        }
    }
}

#[test]
fn rotation_is_deterministic_per_seed() {
    let x: Vec<f32> = (0..100).map(|i| (i as f32).sin()).collect();
    for kind in [RotationKind::Hadamard, RotationKind::Haar] {
        let a = Rotation::new(kind, 100, 11).unwrap().rotate(&x);
        let b = Rotation::new(kind, 100, 11).unwrap().rotate(&x);
        let c = Rotation::new(kind, 100, 12).unwrap().rotate(&x);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}

/// The fused power-of-two encode kernel gives the same bits on every path, and
/// the same bits as the unfused sequence (rotation, norm, normalize, quantize)
/// that non-power-of-two dimensions and the Haar rotation use.
#[test]
fn fused_hadamard_quantize_matches_the_unfused_path_bit_for_bit() {
    let mut rng = Xoshiro256::new(11);
    for k in 3..=10 {
        let n = 1usize << k;
        let rot = Rotation::new(RotationKind::Hadamard, n, 5).unwrap();
        let Some((s1, s2, total)) = rot.two_round_pow2() else {
            assert!(n < 64, "dims >= 64 that are powers of two use two rounds");
            continue;
        };
        for bits in 1..=8u32 {
            let cb = tq_core::codebook::LloydMax::get(n, bits).unwrap();
            let p = Had2 { s1, s2, total, boundaries: &cb.boundaries, bits };
            for scale in [1.0f32, 1e-3, 3e4, 1e-30, 1e30, 0.0] {
                let x: Vec<f32> = randv(&mut rng, n).iter().map(|v| v * scale).collect();
                // unfused sequence, as TurboQuantMse does it for other dims
                let mut yu = x.clone();
                let mut tmp = vec![0.0; n];
                rot.rotate_in_place(&mut yu, &mut tmp);
                let s = (SCALAR.sum_sq)(&yu);
                let want = s.is_normal().then(|| {
                    let norm = s.sqrt();
                    yu.iter_mut().for_each(|v| *v *= 1.0 / norm);
                    let mut idx = vec![0u8; n];
                    (SCALAR.quantize)(&yu, &cb.boundaries, bits, &mut idx);
                    (norm.to_bits(), yu.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), idx)
                });
                assert_eq!(want.is_some(), scale != 0.0 && scale > 1e-20 && scale < 1e20, "n={n} scale={scale}");
                for kt in available() {
                    let mut y = vec![0.0; n];
                    let mut idx = vec![0u8; n];
                    let got = (kt.had2_quantize)(&x, &p, &mut y, &mut idx).map(|norm| (norm.to_bits(), y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), idx));
                    assert_eq!(got, want, "{} n={n} bits={bits} scale={scale}", kt.name);
                }
            }
        }
    }
}

#[test]
fn softmax_is_bit_identical_on_every_path() {
    let mut rng = Xoshiro256::new(11);
    for len in (1..40).chain([1000, 8193]) {
        // scores spread over ±60 (weights down to underflow) plus ties at the max
        let mut s: Vec<f32> = randv(&mut rng, len).iter().map(|x| x * 30.0).collect();
        if len > 3 {
            s[len / 2] = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        }
        let mut want = s.clone();
        scalar::softmax_ref(&mut want);
        let z: f64 = want.iter().map(|&x| x as f64).sum();
        assert!((z - 1.0).abs() < 1e-5, "len {len}: weights sum to {z}");
        assert!(want.iter().all(|&x| (0.0..=1.0).contains(&x)));
        for k in available() {
            let mut got = s.clone();
            (k.softmax)(&mut got);
            assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{} len {len}", k.name);
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The Hadamard rotation of dimensions that are not powers of two (and small
/// powers of two, three rounds) on every kernel path gives the bits of the
/// step-by-step reference (signs, permutation, the two scaled block FWHTs,
/// scalar), forward and back, at block sizes 2 to 2048 and dimensions just
/// above and below powers of two.
#[test]
fn hadamard_rounds_match_the_step_by_step_reference() {
    use tq_core::rotation::Hadamard;
    let mut rng = Xoshiro256::new(21);
    let dims =
        [2usize, 3, 5, 6, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 48, 50, 63, 65, 96, 100, 127, 129, 200, 255, 257, 384, 576, 768, 1000, 1536, 3072, 4095];
    for dim in dims {
        for seed in [0u64, 77] {
            let h = Hadamard::new(dim, seed);
            let x: Vec<f32> = randv(&mut rng, dim).iter().map(|v| v * 3.0).collect();
            // signed zeros, subnormals, ties and huge values (sums stay finite)
            let edge: Vec<f32> = (0..dim).map(|j| [0.0, -0.0, 1e-40, -1e-42, 1.0, 1.0, -1.0, 1e30, -3e29][(j * 7 + seed as usize) % 9]).collect();
            check_rounds(&h, &x, dim, seed);
            check_rounds(&h, &edge, dim, seed);
        }
    }
}

fn check_rounds(h: &tq_core::rotation::Hadamard, x: &[f32], dim: usize, seed: u64) {
    {
        {
            let mut s = vec![0.0; dim];
            let mut want = x.to_vec();
            h.rotate_ref(&mut want, &mut s);
            let mut back = want.clone();
            h.unrotate_ref(&mut back, &mut s);
            let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err <= 1e-5 * scale, "dim {dim}: the reference is not orthogonal ({err})");
            let mut into = vec![0.0; dim];
            for k in available() {
                h.rotate_into_with(k, x, &mut into, &mut s);
                assert_eq!(bits(&into), bits(&want), "{} dim={dim} seed={seed} rotate_into", k.name);
                let mut got = x.to_vec();
                h.rotate_with(k, &mut got, &mut s);
                assert_eq!(bits(&got), bits(&want), "{} dim={dim} seed={seed} rotate", k.name);
                h.unrotate_with(k, &mut got, &mut s);
                assert_eq!(bits(&got), bits(&back), "{} dim={dim} seed={seed} unrotate", k.name);
            }
        }
    }
}

/// The fused norm + scaling + quantizer of rotated vectors gives, on every
/// path, the bits of the three kernels in sequence, and `None` with `y`
/// untouched exactly when `Σy²` is not a normal f32.
#[test]
fn norm_quantize_matches_the_unfused_kernels_bit_for_bit() {
    let mut rng = Xoshiro256::new(23);
    for bits in 1..=8u32 {
        let cb = tq_core::codebook::LloydMax::get(576, bits).unwrap();
        for n in [2usize, 7, 8, 50, 64, 100, 384, 576, 1000] {
            for scale in [1.0f32, 1e-3, 3e4, 1e-30, 1e30, 0.0] {
                let y: Vec<f32> = randv(&mut rng, n).iter().map(|v| v * scale / (n as f32).sqrt()).collect();
                let s = (SCALAR.sum_sq)(&y);
                let want = s.is_normal().then(|| {
                    let norm = s.sqrt();
                    let u: Vec<f32> = y.iter().map(|v| v * (1.0 / norm)).collect();
                    let mut idx = vec![0u8; n];
                    (SCALAR.quantize)(&u, &cb.boundaries, bits, &mut idx);
                    (norm.to_bits(), bits_of(&u), idx)
                });
                assert_eq!(want.is_some(), scale > 1e-20 && scale < 1e20, "n={n} scale={scale}");
                for k in available() {
                    let mut got_y = y.clone();
                    let mut idx = vec![0u8; n];
                    let got = (k.norm_quantize)(&mut got_y, &cb.boundaries, bits, &mut idx).map(|norm| (norm.to_bits(), bits_of(&got_y), idx));
                    if got.is_none() {
                        assert_eq!(bits_of(&got_y), bits_of(&y), "{} n={n}: y changed", k.name);
                    }
                    assert_eq!(got, want, "{} n={n} bits={bits} scale={scale}", k.name);
                }
            }
        }
    }
}

fn bits_of(v: &[f32]) -> Vec<u32> {
    bits(v)
}

/// The input check's largest-|x| scan is the same integer on every path,
/// with ±inf and NaN (any payload, either sign) above every finite value.
#[test]
fn max_abs_bits_is_exact_on_every_path() {
    let mut rng = Xoshiro256::new(29);
    let special = [0.0f32, -0.0, 1e-42, -3e38, f32::MAX, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::from_bits(0xFFC0_0001)];
    for n in (0..40).chain([100, 576, 1000]) {
        for s in 0..=special.len() {
            let mut x: Vec<f32> = randv(&mut rng, n);
            if s < special.len() && n > 0 {
                x[(s * 7) % n] = special[s];
            }
            let want = scalar::max_abs_bits_ref(&x);
            assert_eq!(want, x.iter().map(|v| v.to_bits() & 0x7FFF_FFFF).max().unwrap_or(0));
            if s < special.len() && n > 0 && !special[s].is_finite() {
                assert!(want >= 0x7F80_0000, "n={n}: a non-finite value must sort above the finite ones");
            }
            for k in available() {
                assert_eq!((k.max_abs_bits)(&x), want, "{} n={n} special={s}", k.name);
            }
        }
    }
}
