use proptest::prelude::*;
use tq_core::fastscan::{FastScanCodes, QuantizedLut, BLOCK};
use tq_core::kernels::{available, scalar};
use tq_core::rng::Xoshiro256;
use tq_core::{build, RotationKind};

/// Table sum of one code computed from its nibbles, the plainest way.
fn naive_sum(nibbles: &[u8], tables: &[u8]) -> u32 {
    let mut s = 0u32;
    for (k, &b) in nibbles.iter().enumerate() {
        s += tables[32 * k + (b & 15) as usize] as u32 + tables[32 * k + 16 + (b >> 4) as usize] as u32;
    }
    s
}

#[derive(Debug, Clone)]
enum Op {
    Push(Vec<u8>),
    Set(usize, Vec<u8>),
    Pop,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// push / set / pop keep the store equal to a plain list of codes, and the
    /// raw bytes rebuild the same store.
    #[test]
    fn store_behaves_like_a_list(half_m in 1usize..6, ops in proptest::collection::vec(
        prop_oneof![
            3 => proptest::collection::vec(any::<u8>(), 5).prop_map(Op::Push),
            1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 5)).prop_map(|(i, v)| Op::Set(i, v)),
            1 => Just(Op::Pop),
        ], 0..120)) {
        let m = 2 * half_m;
        let mut st = FastScanCodes::new(m).unwrap();
        let mut model: Vec<Vec<u8>> = Vec::new();
        for op in ops {
            match op {
                Op::Push(v) => { st.push(&v[..half_m]); model.push(v[..half_m].to_vec()); }
                Op::Set(i, v) => if !model.is_empty() {
                    let i = i % model.len();
                    st.set(i, &v[..half_m]);
                    model[i] = v[..half_m].to_vec();
                },
                Op::Pop => if !model.is_empty() { st.pop(); model.pop(); },
            }
        }
        prop_assert_eq!(st.len(), model.len());
        let mut got = vec![0u8; half_m];
        for (i, want) in model.iter().enumerate() {
            st.get(i, &mut got);
            prop_assert_eq!(&got, want);
        }
        let mut fresh = FastScanCodes::new(m).unwrap();
        for c in &model { fresh.push(c); }
        prop_assert_eq!(&fresh, &st, "unused slots must be zero after pop");
        let raw = FastScanCodes::from_raw(m, st.len(), st.data().to_vec()).unwrap();
        prop_assert_eq!(raw, st);
    }
}

#[test]
fn bad_shapes_are_refused() {
    assert!(FastScanCodes::new(0).is_err());
    assert!(FastScanCodes::new(3).is_err());
    assert!(FastScanCodes::from_raw(4, 33, vec![0u8; 64]).is_err());
    assert!(FastScanCodes::from_raw(4, 33, vec![0u8; 128]).is_ok());
}

/// Every kernel path gives the exact integer sums of the naive definition,
/// including at the largest entries the quantizer allows (no 16-bit overflow).
#[test]
fn block_kernels_are_exact_on_every_path() {
    let mut rng = Xoshiro256::new(21);
    for m in [2usize, 8, 64, 128, 510, 768, 1536] {
        let qmax = (65535 / (m / 2)).min(255) as u64;
        for fill in [false, true] {
            let tables: Vec<u8> = (0..16 * m).map(|_| if fill { qmax as u8 } else { rng.below(qmax + 1) as u8 }).collect();
            let mut st = FastScanCodes::new(m).unwrap();
            let n = 45; // one full block and a partial one
            let codes: Vec<Vec<u8>> = (0..n).map(|_| (0..m / 2).map(|_| rng.below(256) as u8).collect()).collect();
            for c in &codes {
                st.push(c);
            }
            for b in 0..st.blocks() {
                let blk = &st.data()[b * st.block_bytes()..(b + 1) * st.block_bytes()];
                let mut want = [0u32; BLOCK];
                scalar::fastscan_block_ref(blk, &tables, &mut want);
                for (i, w) in want.iter().enumerate() {
                    let v = b * BLOCK + i;
                    let expect = if v < n { naive_sum(&codes[v], &tables) } else { naive_sum(&vec![0u8; m / 2], &tables) };
                    assert_eq!(*w, expect, "m={m} vector {v}");
                }
                for k in available() {
                    let mut got = [0u32; BLOCK];
                    (k.fastscan_block)(blk, &tables, &mut got);
                    assert_eq!(got, want, "{} m={m} fill={fill}", k.name);
                }
            }
        }
    }
}

/// The plain definition of the quantized tables (the fold of `f32::min`
/// per table, the largest spread, `round` and `clamp` per entry): the
/// oracle of `QuantizedLut::new`.
fn quantize_plain(lut: &[f32]) -> (Vec<u8>, f32, f32) {
    let m = lut.len() / 16;
    let qmax = (65535 / (m / 2)).min(255) as f32;
    let mins: Vec<f32> = lut.chunks_exact(16).map(|t| t.iter().copied().fold(f32::INFINITY, f32::min)).collect();
    let range = lut.chunks_exact(16).zip(&mins).map(|(t, &lo)| t.iter().map(|&v| v - lo).fold(0.0f32, f32::max)).fold(0.0f32, f32::max);
    let delta = if range > 0.0 { range / qmax } else { 1.0 };
    let mut tables = vec![0u8; lut.len()];
    for ((o, t), &lo) in tables.chunks_exact_mut(16).zip(lut.chunks_exact(16)).zip(&mins) {
        for (o, &v) in o.iter_mut().zip(t) {
            *o = ((v - lo) / delta).round().clamp(0.0, qmax) as u8;
        }
    }
    (tables, delta, mins.iter().map(|&v| v as f64).sum::<f64>() as f32)
}

/// `QuantizedLut::new` gives the plain definition's bytes, step and bias
/// bits: Gaussian tables of every size class, all-zero and ±0 tables (the
/// sign of a zero bias), tables whose entries fall exactly on half steps
/// (rounding ties) and tables with repeated minima.
#[test]
fn quantized_tables_equal_the_plain_definition() {
    let mut rng = Xoshiro256::new(27);
    let mut cases: Vec<Vec<f32>> = Vec::new();
    for m in [2usize, 6, 8, 10, 50, 64, 576, 1536] {
        cases.push((0..16 * m).map(|_| rng.gaussian() as f32).collect());
        // ±0 everywhere, in a random pattern
        cases.push((0..16 * m).map(|_| if rng.below(2) == 0 { 0.0 } else { -0.0 }).collect());
        // half steps: integers and halves with a spread of exactly qmax (Δ = 1)
        let qmax = (65535 / (m / 2)).min(255) as u64;
        let mut half: Vec<f32> = (0..16 * m).map(|_| rng.below(2 * qmax + 1) as f32 * 0.5).collect();
        half[0] = 0.0;
        half[1] = qmax as f32;
        cases.push(half);
        // few distinct values: repeated minima, zero tables beside others
        cases.push((0..16 * m).map(|i| if (i / 16) % 3 == 0 { 0.0 } else { (rng.below(5) as f32 - 2.0) * 0.125 }).collect());
    }
    for lut in cases {
        let (tables, delta, bias) = quantize_plain(&lut);
        let q = QuantizedLut::new(&lut);
        assert_eq!(q.tables(), &tables[..], "m={}", lut.len() / 16);
        assert_eq!((q.delta.to_bits(), q.bias.to_bits()), (delta.to_bits(), bias.to_bits()), "m={}", lut.len() / 16);
    }
}

/// The quantized tables stay within their stated error bound.
#[test]
fn quantized_table_sums_are_within_the_bound() {
    let mut rng = Xoshiro256::new(22);
    for m in [2usize, 64, 1536] {
        let lut: Vec<f32> = (0..16 * m).map(|_| rng.gaussian() as f32).collect();
        let q = QuantizedLut::new(&lut);
        for _ in 0..50 {
            let nib: Vec<u8> = (0..m / 2).map(|_| rng.below(256) as u8).collect();
            let exact: f64 = nib.iter().enumerate().map(|(k, &b)| lut[32 * k + (b & 15) as usize] as f64 + lut[32 * k + 16 + (b >> 4) as usize] as f64).sum();
            let approx = q.value(naive_sum(&nib, q.tables())) as f64;
            assert!((approx - exact).abs() <= q.max_error() as f64 * 1.0001 + 1e-4, "m={m}: {approx} vs {exact}");
        }
    }
}

/// Fast-scan scores of the TurboQuant codecs approximate their exact
/// inner-product estimator within the table-quantization bound, and the store
/// returns the exact codes for re-scoring.
#[test]
fn tq_fastscan_scores_match_the_exact_estimator() {
    let mut rng = Xoshiro256::new(23);
    for name in ["tq-mse-1", "tq-mse-2", "tq-mse-4", "tq-mse-4-nc", "tq-mse-2-nc"] {
        for dim in [50usize, 128, 384] {
            let c = build(name, dim, 3, RotationKind::Hadamard).unwrap();
            let m = c.fastscan_m().expect("fast-scan support");
            assert_eq!(c.code_size(), m / 2 + 4);
            let n = 100;
            let xs: Vec<f32> = (0..n * dim).map(|_| rng.gaussian() as f32).collect();
            let q: Vec<f32> = (0..dim).map(|_| rng.gaussian() as f32).collect();
            let cs = c.code_size();
            let mut codes = vec![0u8; n * cs];
            c.encode_batch(&xs, &mut codes).unwrap();
            let pq = c.prepare(&q).unwrap();
            let lut = QuantizedLut::new(&c.fastscan_tables(&pq));
            let mut st = FastScanCodes::new(m).unwrap();
            for code in codes.chunks_exact(cs) {
                st.push(&code[..m / 2]);
            }
            let mut sums = vec![0.0f32; n];
            st.scan(&lut, &mut sums);
            let mut back = vec![0u8; m / 2];
            for (i, code) in codes.chunks_exact(cs).enumerate() {
                let f = c.fastscan_factor(code);
                let exact = c.score_ip(&pq, code);
                let fast = f * sums[i];
                let tol = f.abs() * (lut.max_error() + 1e-4 * lut.delta * m as f32) + 1e-4 * exact.abs() + 1e-5;
                assert!((fast - exact).abs() <= tol, "{name} dim {dim} #{i}: {fast} vs {exact} (tol {tol})");
                st.get(i, &mut back);
                assert_eq!(&back[..], &code[..m / 2]);
            }
        }
    }
    for name in ["tq-mse-3", "tq-prod-4", "tq-mse-2.5"] {
        assert!(build(name, 64, 1, RotationKind::Hadamard).unwrap().fastscan_m().is_none(), "{name}");
    }
}

/// The multi-query kernels give, on every path and for every query count
/// (groups of any size and a remainder), exactly the single-block sums.
#[test]
fn multi_query_kernels_equal_the_block_kernel_on_every_path() {
    let mut rng = Xoshiro256::new(24);
    for m in [2usize, 4, 62, 576, 1536] {
        let qmax = (65535 / (m / 2)).min(255) as u64;
        let mut st = FastScanCodes::new(m).unwrap();
        for _ in 0..(3 * BLOCK + 7) {
            let c: Vec<u8> = (0..m / 2).map(|_| rng.below(256) as u8).collect();
            st.push(&c);
        }
        let bb = st.block_bytes();
        for nq in [1usize, 2, 3, 5, 7, 13] {
            let tables: Vec<u8> = (0..nq * bb).map(|i| if i % 7 == 0 { qmax as u8 } else { rng.below(qmax + 1) as u8 }).collect();
            let nb = st.blocks();
            let mut want = vec![0u32; nq * nb * 32];
            for q in 0..nq {
                for b in 0..nb {
                    let mut o = [0u32; BLOCK];
                    scalar::fastscan_block_ref(&st.data()[b * bb..(b + 1) * bb], &tables[q * bb..(q + 1) * bb], &mut o);
                    want[(q * nb + b) * 32..(q * nb + b + 1) * 32].copy_from_slice(&o);
                }
            }
            for k in available() {
                let mut got = vec![0u32; nq * nb * 32];
                (k.fastscan_multi)(st.data(), &tables, bb, &mut got);
                assert!(got == want, "{} m={m} nq={nq}", k.name);
                // a sub-range of blocks, as a tile of a larger store
                let mut part = vec![0u32; nq * 2 * 32];
                (k.fastscan_multi)(&st.data()[bb..3 * bb], &tables, bb, &mut part);
                for q in 0..nq {
                    assert_eq!(part[q * 64..(q + 1) * 64], want[(q * nb + 1) * 32..(q * nb + 3) * 32], "{} m={m} nq={nq} tile", k.name);
                }
            }
        }
    }
}

/// The estimate kernels give the reference's bits on every path, for lengths
/// that leave partial vectors and for sums up to the 16-bit lane limit and beyond.
#[test]
fn value_kernels_give_the_reference_bits_on_every_path() {
    let mut rng = Xoshiro256::new(25);
    for n in [0usize, 1, 7, 8, 15, 16, 31, 32, 33, 100] {
        let sums: Vec<u32> = (0..n + 3).map(|i| if i % 5 == 0 { (1 << 30) + rng.below(1 << 20) as u32 } else { rng.below(65536) as u32 }).collect();
        let factors: Vec<f32> = (0..n).map(|_| rng.gaussian() as f32).collect();
        let (bias, delta) = (rng.gaussian() as f32, 1e-3 * (1.0 + rng.below(100) as f32));
        let mut want = vec![0.0f32; n];
        let mut want_max = vec![0.0f32; n.div_ceil(32)];
        scalar::fastscan_values_ref(&sums, &factors, bias, delta, &mut want, &mut want_max);
        for (i, w) in want.iter().enumerate() {
            assert_eq!(w.to_bits(), (factors[i] * (bias + delta * sums[i] as f32)).to_bits());
        }
        for (j, m) in want_max.iter().enumerate() {
            assert_eq!(*m, want[32 * j..(32 * j + 32).min(n)].iter().copied().fold(f32::NEG_INFINITY, f32::max));
        }
        for k in available() {
            let mut got = vec![f32::NAN; n];
            let mut got_max = vec![f32::NAN; n.div_ceil(32)];
            (k.fastscan_values)(&sums, &factors, bias, delta, &mut got, &mut got_max);
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{} n={n}", k.name);
            assert_eq!(got_max, want_max, "{} n={n} maxima", k.name);
        }
    }
}

/// The selection kernels pick the reference's values (same bits, same
/// positions, same order) on every path: for lengths that leave partial
/// vectors, with and without the L2 transform, thresholds that take none,
/// some or all, ties with the threshold, ±0 and NaN estimates.
#[test]
fn select_kernels_give_the_reference_selection_on_every_path() {
    let mut rng = Xoshiro256::new(26);
    for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 1000] {
        let sums: Vec<u32> = (0..n + 3).map(|i| if i % 7 == 0 { (1 << 30) + rng.below(1 << 20) as u32 } else { rng.below(65536) as u32 }).collect();
        let mut factors: Vec<f32> = (0..n).map(|_| rng.gaussian() as f32).collect();
        // zero factors give ±0 estimates; a NaN factor a NaN estimate
        for (i, f) in factors.iter_mut().enumerate() {
            match i % 11 {
                3 => *f = 0.0,
                5 => *f = -0.0,
                9 if i % 3 == 0 => *f = f32::NAN,
                _ => {}
            }
        }
        let sq: Vec<f32> = (0..n).map(|_| rng.gaussian().abs() as f32).collect();
        let bd = (rng.gaussian() as f32, 1e-3 * (1.0 + rng.below(100) as f32));
        for sqn in [None, Some(&sq[..])] {
            let plain: Vec<f32> = (0..n)
                .map(|i| {
                    let v = factors[i] * (bd.0 + bd.1 * sums[i] as f32);
                    sqn.map_or(v, |q| 2.0 * v - q[i])
                })
                .collect();
            let mut sorted: Vec<f32> = plain.iter().copied().filter(|v| !v.is_nan()).collect();
            sorted.sort_by(f32::total_cmp);
            let mut thrs = vec![f32::NEG_INFINITY, f32::INFINITY, 0.0, -0.0];
            if !sorted.is_empty() {
                // an exact tie with an estimate, and the median
                thrs.extend([sorted[sorted.len() / 2], sorted[sorted.len() * 9 / 10]]);
            }
            for &thr in &thrs {
                let (mut want, mut want_idx) = (vec![0.0f32; n], vec![0u32; n]);
                let c = scalar::fastscan_select_ref(&sums, &factors, sqn, bd, thr, &mut want, &mut want_idx);
                let expect: Vec<u32> = (0..n as u32).filter(|&i| plain[i as usize] >= thr || plain[i as usize].is_nan()).collect();
                assert_eq!(want_idx[..c], expect[..], "reference n={n} thr={thr}");
                assert!(want[..c].iter().zip(&expect).all(|(v, &i)| v.to_bits() == plain[i as usize].to_bits()), "reference values n={n}");
                for k in available() {
                    let (mut got, mut got_idx) = (vec![f32::NAN; n], vec![u32::MAX; n]);
                    let g = (k.fastscan_select)(&sums, &factors, sqn, bd, thr, &mut got, &mut got_idx);
                    assert_eq!(g, c, "{} n={n} thr={thr} l2={}", k.name, sqn.is_some());
                    assert_eq!(got_idx[..g], want_idx[..c], "{} n={n} thr={thr}", k.name);
                    assert_eq!(
                        got[..g].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want[..c].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{} n={n} thr={thr}",
                        k.name
                    );
                }
            }
        }
    }
}
