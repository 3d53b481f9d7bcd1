//! Attention on the codes equals dequantize-then-attend (attention is linear in
//! the values and the scores are the codec's inner-product estimates), for
//! every cache precision that encodes online.

use tq_core::rng::Xoshiro256;
use tq_core::{build, Codec, RotationKind};
use tq_kv::{softmax_weights, KvGeometry};

/// The library takes parsed precisions; the tests name them as strings.
fn cache_for(shape: KvGeometry, spec: &str, seed: u64) -> tq_core::Result<Box<dyn tq_kv::KvCache>> {
    tq_kv::cache_for(shape, &spec.parse::<tq_kv::KvSpec>()?, seed)
}
fn cache_with(shape: KvGeometry, spec: &str, seed: u64, o: &tq_kv::CacheOptions) -> tq_core::Result<Box<dyn tq_kv::KvCache>> {
    tq_kv::cache_with(shape, &spec.parse::<tq_kv::KvSpec>()?, seed, o)
}

fn randv(r: &mut Xoshiro256, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.gaussian() as f32).collect()
}

/// Encode then decode as the cache stores codes: codebook codes (and both
/// parts of a fractional code) keep their scales as bf16 (`tq_kv::KvLayout`),
/// so the reference rounds them too.
fn cache_roundtrip(c: &dyn Codec, x: &[f32]) -> Vec<f32> {
    let mut code = vec![0u8; c.code_size()];
    c.encode(x, &mut code).unwrap();
    let mut scales: Vec<usize> = c.codebook_view().map(|v| vec![v.packed]).unwrap_or_default();
    if let Some((a, b)) = c.two_scaled_parts() {
        scales = vec![a, a + 4 + b];
    }
    for p in scales {
        let s = f32::from_le_bytes([code[p], code[p + 1], code[p + 2], code[p + 3]]);
        code[p..p + 4].copy_from_slice(&half::bf16::from_f32(s).to_f32().to_le_bytes());
    }
    let mut y = vec![0.0f32; x.len()];
    c.decode(&code, &mut y).unwrap();
    y
}

/// Exact softmax(q·Kᵀ/√d)·V in f64 over the given (decoded) keys and values.
fn attend_f64(kd: &[Vec<f32>], vd: &[Vec<f32>], q: &[f32]) -> Vec<f64> {
    let d = q.len();
    let s: Vec<f64> = kd.iter().map(|k| k.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (d as f64).sqrt()).collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    (0..d).map(|j| e.iter().zip(vd).map(|(w, v)| w / z * v[j] as f64).sum()).collect()
}

/// Reference: decode every key and value, then exact softmax attention in f64.
fn reference(kc: &dyn Codec, vc: &dyn Codec, ks: &[Vec<f32>], vs: &[Vec<f32>], q: &[f32]) -> Vec<f64> {
    let kd: Vec<Vec<f32>> = ks.iter().map(|k| cache_roundtrip(kc, k)).collect();
    let vd: Vec<Vec<f32>> = vs.iter().map(|v| cache_roundtrip(vc, v)).collect();
    attend_f64(&kd, &vd, q)
}

#[test]
fn attention_on_codes_matches_dequantize_then_attend() {
    let mut r = Xoshiro256::new(1);
    for d in [64usize, 128] {
        let shape = KvGeometry { layers: 2, q_heads: 2, kv_heads: 2, head_dim: d };
        for (spec, kname, vname) in [
            ("tq-mse-4", "tq-mse-4", "tq-mse-4"),
            ("tq-mse-2-nc", "tq-mse-2-nc", "tq-mse-2-nc"),
            ("k4v3", "tq-mse-4", "tq-mse-3"),
            ("tq-prod-3", "tq-prod-3", "tq-prod-3"),
            ("q4_0-rot", "q4_0-rot", "q4_0-rot"),
            ("q8_0", "q8_0", "q8_0"),
            ("nvfp4", "nvfp4", "nvfp4"),
        ] {
            let mut cache = cache_for(shape, spec, 0).unwrap();
            // the cache seeds keys with 0 and values with kv_value_seed(0)
            let kc = build(kname, d, 0, RotationKind::Hadamard).unwrap();
            let vc = build(vname, d, tq_core::rng::kv_value_seed(0), RotationKind::Hadamard).unwrap();
            let n = 300;
            let ks: Vec<Vec<f32>> = (0..n).map(|_| randv(&mut r, d)).collect();
            let vs: Vec<Vec<f32>> = (0..n).map(|_| randv(&mut r, d)).collect();
            for (k, v) in ks.iter().zip(&vs) {
                cache.append(1, 1, k, v);
            }
            assert_eq!(cache.len(1, 1), n);
            let q: Vec<f32> = randv(&mut r, d).iter().map(|x| x * 3.0).collect();
            // a GQA group of 3 query heads: the grouped path must give each head's own attention
            let group = 3;
            let qs: Vec<f32> = randv(&mut r, group * d).iter().map(|x| x * 3.0).collect();
            for len in [1usize, 17, n] {
                let mut out = vec![f32::NAN; d];
                cache.attend(1, 1, &q, len, &mut out);
                let want = reference(kc.as_ref(), vc.as_ref(), &ks[..len], &vs[..len], &q);
                let scale = want.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
                for (a, b) in out.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() <= 2e-4 * scale + 1e-5, "{spec} d={d} len={len}: {a} vs {b}");
                }
                let mut outs = vec![f32::NAN; group * d];
                cache.attend_group(1, 1, &qs, group, len, &mut outs);
                for (g, o) in outs.chunks_exact(d).enumerate() {
                    let want = reference(kc.as_ref(), vc.as_ref(), &ks[..len], &vs[..len], &qs[g * d..(g + 1) * d]);
                    let scale = want.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
                    for (a, b) in o.iter().zip(&want) {
                        assert!((*a as f64 - b).abs() <= 2e-4 * scale + 1e-5, "{spec} d={d} len={len} group head {g}: {a} vs {b}");
                    }
                }
            }
            assert_eq!(cache.bytes(), n * (tq_kv::KvLayout::of(kc.as_ref()).bytes() + tq_kv::KvLayout::of(vc.as_ref()).bytes()));
            // the accounting of the precision string is the cache's own
            let per_token = tq_kv::KvSpec::parse(spec).unwrap().bytes_per_token_per_layer(1, d).unwrap();
            assert_eq!(cache.bytes() as f64, n as f64 * per_token, "{spec}");
        }
    }
}

/// Full-precision windows: tokens in the sink or recent window attend with
/// their f32 keys/values, the others through their codes. With centered keys
/// the codes hold k − μ (μ: the mean of keys 1..32) and attention equals
/// attention over μ + decode(k − μ), window tokens exact.
#[test]
fn sink_and_recent_windows_and_centered_keys_are_exact() {
    let mut r = Xoshiro256::new(3);
    let d = 64;
    let shape = KvGeometry { layers: 1, q_heads: 1, kv_heads: 1, head_dim: d };
    // keys share a large offset (as real keys do), which centering removes
    let offset: Vec<f32> = randv(&mut r, d).iter().map(|x| 3.0 * x).collect();
    for (spec, center_keys, recent_q8) in [
        ("tq-mse-3", false, false),
        ("q4_0-rot", false, false),
        ("f16", false, false),
        ("tq-mse-3", true, false),
        ("q4_0-rot", true, false),
        ("tq-mse-3.5", true, false),
        ("tq-mse-4", false, true),
        ("k5v3", true, true),
    ] {
        let (sink, recent, n) = (2usize, 5usize, 40usize);
        let mut cache = cache_with(shape, spec, 0, &tq_kv::CacheOptions { sink, recent, center_keys, recent_q8, ..Default::default() }).unwrap();
        let ks: Vec<Vec<f32>> = (0..n).map(|_| randv(&mut r, d).iter().zip(&offset).map(|(a, b)| a + b).collect()).collect();
        let vs: Vec<Vec<f32>> = (0..n).map(|_| randv(&mut r, d)).collect();
        for (k, v) in ks.iter().zip(&vs) {
            cache.append(0, 0, k, v);
        }
        let qs = randv(&mut r, 2 * d);
        let mut out = vec![f32::NAN; 2 * d];
        cache.attend_group(0, 0, &qs, 2, n, &mut out);
        // reference: decoded keys/values except in the windows
        let st = tq_kv::KvSpec::parse(spec).unwrap();
        let mu: Vec<f32> = if center_keys {
            (0..d).map(|j| (ks[1..tq_kv::TRAIN_TOKENS].iter().map(|k| k[j] as f64).sum::<f64>() / (tq_kv::TRAIN_TOKENS - 1) as f64) as f32).collect()
        } else {
            vec![0.0; d]
        };
        let trained = |name: &str, seed: u64, rows: &[Vec<f32>]| {
            let mut c = build(name, d, seed, RotationKind::Hadamard).unwrap();
            if c.wants_training() {
                c.train(&rows[..tq_kv::TRAIN_TOKENS].concat()).unwrap();
            }
            c
        };
        let centered: Vec<Vec<f32>> = ks.iter().map(|k| k.iter().zip(&mu).map(|(a, m)| a - m).collect()).collect();
        let dec = |store: &tq_kv::Store, seed: u64, x: &[f32]| -> Vec<f32> {
            match store {
                tq_kv::Store::Codec(e) => {
                    let c = trained(&e.name, seed, if seed == 0 { &centered } else { &vs });
                    cache_roundtrip(c.as_ref(), x)
                }
                _ => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            }
        };
        // recent tokens exact, or through q8_0 with `recent_q8`; sinks exact
        let q8 = build("q8_0", d, 0, RotationKind::Hadamard).unwrap();
        let win = |t: usize, x: &Vec<f32>| if recent_q8 && t >= sink { cache_roundtrip(q8.as_ref(), x) } else { x.clone() };
        let in_window = |t: usize| t < sink || t + recent >= n;
        let kd: Vec<Vec<f32>> = ks
            .iter()
            .zip(&centered)
            .enumerate()
            .map(|(t, (k, kc))| if in_window(t) { win(t, k) } else { dec(&st.keys, 0, kc).iter().zip(&mu).map(|(a, m)| a + m).collect() })
            .collect();
        let vd: Vec<Vec<f32>> =
            vs.iter().enumerate().map(|(t, v)| if in_window(t) { win(t, v) } else { dec(&st.values, tq_core::rng::kv_value_seed(0), v) }).collect();
        for (g, o) in out.chunks_exact(d).enumerate() {
            let want = attend_f64(&kd, &vd, &qs[g * d..(g + 1) * d]);
            let scale = want.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
            for (a, b) in o.iter().zip(&want) {
                assert!((*a as f64 - b).abs() <= 2e-4 * scale + 1e-5, "{spec} center {center_keys} head {g}: {a} vs {b}");
            }
        }
        // windows and the key offset are counted in the bytes
        let per_token = tq_kv::KvSpec::parse(spec).unwrap().bytes_per_token_per_layer(1, d).unwrap() as usize;
        let mu_bytes = if center_keys { 4 * d } else { 0 };
        let recent_bytes = if recent_q8 { q8.code_size() } else { 4 * d };
        assert_eq!(cache.bytes(), n * per_token + sink * 2 * 4 * d + recent * 2 * recent_bytes + mu_bytes, "{spec}");
    }
}

/// Calibrated key transforms: the codes hold T·(k − μ) and queries are
/// scored as T⁻¹q, so attention equals attention over μ + T⁻¹·decode(T·(k − μ))
/// (window tokens exact), for codebook, generic, f16 and fractional key sides.
#[test]
fn calibrated_keys_are_exact() {
    let mut r = Xoshiro256::new(5);
    let d = 64;
    let shape = KvGeometry { layers: 1, q_heads: 1, kv_heads: 1, head_dim: d };
    // anisotropic keys with an offset and queries with other channel scales
    let kscale: Vec<f32> = (0..d).map(|j| 0.2 + (j % 9) as f32).collect();
    let offset: Vec<f32> = randv(&mut r, d).iter().map(|x| 3.0 * x).collect();
    let key = |r: &mut Xoshiro256| -> Vec<f32> { randv(r, d).iter().zip(&kscale).zip(&offset).map(|((x, s), o)| x * s + o).collect() };
    let query = |r: &mut Xoshiro256| -> Vec<f32> { randv(r, d).iter().enumerate().map(|(j, x)| x * (1.0 + (j % 5) as f32) * 0.3).collect() };
    let mut st = tq_kv::CalibrationStats::new(shape);
    for _ in 0..400 {
        st.add_key(0, &key(&mut r));
        st.add_query(0, &query(&mut r));
    }
    let cal = std::sync::Arc::new(st.finish(0.1, "test").unwrap());
    let (mu, t, ti) = (cal.mu(0).to_vec(), cal.t(0).to_vec(), cal.t_inv(0).to_vec());
    let matvec =
        |m: &[f32], x: &[f32]| -> Vec<f32> { m.chunks_exact(d).map(|row| row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32).collect() };
    for (spec, sink, recent, recent_q8) in
        [("tq-mse-3", 0usize, 0usize, false), ("k5v3", 2, 5, true), ("q4_0-rot", 1, 3, false), ("f16", 0, 0, false), ("tq-mse-3.5", 0, 4, false)]
    {
        let o = tq_kv::CacheOptions { sink, recent, recent_q8, calibration: Some(cal.clone()), ..Default::default() };
        let mut cache = cache_with(shape, spec, 0, &o).unwrap();
        let n = 60;
        let ks: Vec<Vec<f32>> = (0..n).map(|_| key(&mut r)).collect();
        let vs: Vec<Vec<f32>> = (0..n).map(|_| randv(&mut r, d)).collect();
        for (k, v) in ks.iter().zip(&vs) {
            cache.append(0, 0, k, v);
        }
        let qs: Vec<f32> = (0..3).flat_map(|_| query(&mut r)).collect();
        let mut out = vec![f32::NAN; 3 * d];
        cache.attend_group(0, 0, &qs, 3, n, &mut out);
        let st = tq_kv::KvSpec::parse(spec).unwrap();
        let tk: Vec<Vec<f32>> = ks.iter().map(|k| matvec(&t, &k.iter().zip(&mu).map(|(a, m)| a - m).collect::<Vec<_>>())).collect();
        let trained = |name: &str, seed: u64, rows: &[Vec<f32>]| {
            let mut c = build(name, d, seed, RotationKind::Hadamard).unwrap();
            if c.wants_training() {
                c.train(&rows[..tq_kv::TRAIN_TOKENS].concat()).unwrap();
            }
            c
        };
        let dec = |store: &tq_kv::Store, seed: u64, rows: &[Vec<f32>], x: &[f32]| -> Vec<f32> {
            match store {
                tq_kv::Store::Codec(e) => cache_roundtrip(trained(&e.name, seed, rows).as_ref(), x),
                _ => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            }
        };
        let q8 = build("q8_0", d, 0, RotationKind::Hadamard).unwrap();
        let win = |t: usize, x: &Vec<f32>| if recent_q8 && t >= sink { cache_roundtrip(q8.as_ref(), x) } else { x.clone() };
        let in_window = |t: usize| t < sink || t + recent >= n;
        let kd: Vec<Vec<f32>> = (0..n)
            .map(|t| if in_window(t) { win(t, &ks[t]) } else { matvec(&ti, &dec(&st.keys, 0, &tk, &tk[t])).iter().zip(&mu).map(|(a, m)| a + m).collect() })
            .collect();
        let vseed = tq_core::rng::kv_value_seed(0);
        let vd: Vec<Vec<f32>> = (0..n).map(|t| if in_window(t) { win(t, &vs[t]) } else { dec(&st.values, vseed, &vs, &vs[t]) }).collect();
        for (g, o) in out.chunks_exact(d).enumerate() {
            let want = attend_f64(&kd, &vd, &qs[g * d..(g + 1) * d]);
            let scale = want.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
            for (a, b) in o.iter().zip(&want) {
                assert!((*a as f64 - b).abs() <= 5e-4 * scale + 1e-5, "{spec} calibrated head {g}: {a} vs {b}");
            }
        }
    }
    // the calibration's geometry must match; it excludes --center-keys; KIVI refuses it
    let other = KvGeometry { layers: 2, q_heads: 1, kv_heads: 1, head_dim: d };
    let o = tq_kv::CacheOptions { calibration: Some(cal.clone()), ..Default::default() };
    assert!(cache_with(other, "tq-mse-4", 0, &o).err().unwrap().to_string().contains("layers"));
    let both = tq_kv::CacheOptions { center_keys: true, ..o.clone() };
    assert!(cache_with(shape, "tq-mse-4", 0, &both).err().unwrap().to_string().contains("choose one"));
    assert!(cache_with(shape, "kivi-4", 0, &o).is_err());
}

/// Delayed encoding: a recent-window token gets its codes only when it leaves
/// the window, from its window copy. With an f32 window the codes are those of
/// immediate encoding, so attention is the same (to rounding) and only the bytes shrink
/// (by the window's codes); with a q8_0 window a token's codes are those of its
/// decoded q8_0 copy.
#[test]
fn delayed_encoding_matches_immediate_and_saves_the_window_codes() {
    let mut r = Xoshiro256::new(6);
    let d = 64;
    let shape = KvGeometry { layers: 1, q_heads: 1, kv_heads: 1, head_dim: d };
    let (sink, recent, n) = (2usize, 6usize, 50usize);
    let ks: Vec<Vec<f32>> = (0..n).map(|_| randv(&mut r, d)).collect();
    let vs: Vec<Vec<f32>> = (0..n).map(|_| randv(&mut r, d)).collect();
    let qs = randv(&mut r, 3 * d);
    for spec in ["k5v3-nc", "q4_0-rot", "f16", "tq-prod-3"] {
        let base = tq_kv::CacheOptions { sink, recent, ..Default::default() };
        let mut now = cache_with(shape, spec, 0, &base).unwrap();
        let mut later = cache_with(shape, spec, 0, &tq_kv::CacheOptions { delayed: true, ..base.clone() }).unwrap();
        for t in 0..n {
            now.append(0, 0, &ks[t], &vs[t]);
            later.append(0, 0, &ks[t], &vs[t]);
            // every length, including those where the window still holds everything
            let (mut a, mut b) = (vec![f32::NAN; 3 * d], vec![f32::NAN; 3 * d]);
            now.attend_group(0, 0, &qs, 3, t + 1, &mut a);
            later.attend_group(0, 0, &qs, 3, t + 1, &mut b);
            // the same codes and windows; kernels may round a token's sums differently with the count
            let scale = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
            let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(err <= 2e-6 * scale, "{spec} after {} tokens: {err}", t + 1);
        }
        let per_token = tq_kv::KvSpec::parse(spec).unwrap().bytes_per_token_per_layer(1, d).unwrap() as usize;
        assert_eq!(now.bytes() - later.bytes(), recent * per_token, "{spec}");
    }
    // q8_0 window: out-of-window codes come from the decoded q8_0 copy
    let o = tq_kv::CacheOptions { sink, recent, recent_q8: true, delayed: true, ..Default::default() };
    let mut c = cache_with(shape, "k4v3-nc", 0, &o).unwrap();
    for t in 0..n {
        c.append(0, 0, &ks[t], &vs[t]);
    }
    let mut out = vec![f32::NAN; d];
    c.attend(0, 0, &qs[..d], n, &mut out);
    let q8 = build("q8_0", d, 0, RotationKind::Hadamard).unwrap();
    let kc = build("tq-mse-4-nc", d, 0, RotationKind::Hadamard).unwrap();
    let vc = build("tq-mse-3-nc", d, tq_core::rng::kv_value_seed(0), RotationKind::Hadamard).unwrap();
    let side = |c: &dyn Codec, t: usize, x: &Vec<f32>| -> Vec<f32> {
        if t < sink {
            x.clone()
        } else if t + recent >= n {
            cache_roundtrip(q8.as_ref(), x)
        } else {
            cache_roundtrip(c, &cache_roundtrip(q8.as_ref(), x))
        }
    };
    let kd: Vec<Vec<f32>> = ks.iter().enumerate().map(|(t, k)| side(kc.as_ref(), t, k)).collect();
    let vd: Vec<Vec<f32>> = vs.iter().enumerate().map(|(t, v)| side(vc.as_ref(), t, v)).collect();
    let want = attend_f64(&kd, &vd, &qs[..d]);
    let scale = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    for (a, b) in out.iter().zip(&want) {
        assert!((*a as f64 - b).abs() <= 2e-4 * scale + 1e-5, "q8 window: {a} vs {b}");
    }
    // needs a window; refuses what trains before encoding
    assert!(cache_with(shape, "tq-mse-4", 0, &tq_kv::CacheOptions { delayed: true, ..Default::default() }).is_err());
    assert!(cache_with(shape, "tq-mse-3.5", 0, &tq_kv::CacheOptions { recent: 4, delayed: true, ..Default::default() }).is_err());
    assert!(cache_with(shape, "tq-mse-4", 0, &tq_kv::CacheOptions { recent: 4, delayed: true, center_keys: true, ..Default::default() }).is_err());
}

/// Fractional rates online: each stream keeps its first TRAIN_TOKENS tokens in
/// f32 (exact attention), then trains its own outlier split on them, encodes
/// them and continues online.
#[test]
fn fractional_caches_train_per_stream_then_encode() {
    let mut r = Xoshiro256::new(4);
    let d = 64;
    let shape = KvGeometry { layers: 1, q_heads: 2, kv_heads: 2, head_dim: d };
    let mut cache = cache_for(shape, "tq-mse-3.5", 0).unwrap();
    // channel-dependent scales, so the outlier split matters
    let scaled = |r: &mut Xoshiro256| -> Vec<f32> { randv(r, d).iter().enumerate().map(|(j, x)| x * (1.0 + (j % 7) as f32)).collect() };
    let n = 80;
    let ks: Vec<Vec<f32>> = (0..n).map(|_| scaled(&mut r)).collect();
    let vs: Vec<Vec<f32>> = (0..n).map(|_| scaled(&mut r)).collect();
    let q = randv(&mut r, d);
    let t = tq_kv::TRAIN_TOKENS;
    for (j, (k, v)) in ks.iter().zip(&vs).enumerate() {
        cache.append(0, 1, k, v);
        if j + 1 == t - 1 {
            // still collecting: exact attention over f32 rows
            let mut out = vec![f32::NAN; d];
            cache.attend(0, 1, &q, j + 1, &mut out);
            let mut f = cache_for(shape, "f32", 0).unwrap();
            for (k2, v2) in ks[..=j].iter().zip(&vs[..=j]) {
                f.append(0, 1, k2, v2);
            }
            let mut want = vec![0.0f32; d];
            f.attend(0, 1, &q, j + 1, &mut want);
            assert_eq!(out, want);
        }
    }
    // trained on the first TRAIN_TOKENS rows of this stream
    let train = |name: &str, seed: u64, rows: &[Vec<f32>]| {
        let mut c = build(name, d, seed, RotationKind::Hadamard).unwrap();
        let sample: Vec<f32> = rows[..t].iter().flatten().copied().collect();
        c.train(&sample).unwrap();
        c
    };
    let kc = train("tq-mse-3.5", 0, &ks);
    let vc = train("tq-mse-3.5", tq_core::rng::kv_value_seed(0), &vs);
    let mut out = vec![f32::NAN; d];
    cache.attend(0, 1, &q, n, &mut out);
    let want = reference(kc.as_ref(), vc.as_ref(), &ks, &vs, &q);
    let scale = want.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
    for (a, b) in out.iter().zip(&want) {
        assert!((*a as f64 - b).abs() <= 2e-4 * scale + 1e-5, "{a} vs {b}");
    }
    // two bf16 norms per code instead of two f32 ones
    assert_eq!(cache.bytes(), n * 2 * (kc.code_size() - 4));
    assert!(cache_for(shape, "pq-4", 0).is_err(), "trained codebooks cannot encode online");
}

/// KIVI online: complete groups of 32 tokens are quantized (keys per
/// channel, values per token), the residual stays in f32.
#[test]
fn kivi_cache_matches_its_matrix_codec() {
    use tq_core::baselines::kivi::Kivi;
    use tq_core::matrix::{Axis, MatrixCodec};
    let mut r = Xoshiro256::new(5);
    let d = 64;
    let shape = KvGeometry { layers: 1, q_heads: 1, kv_heads: 1, head_dim: d };
    let mut cache = cache_for(shape, "kivi-2", 0).unwrap();
    let n = 3 * tq_kv::KIVI_GROUP + 7;
    let ks = randv(&mut r, n * d);
    let vs = randv(&mut r, n * d);
    for t in 0..n {
        cache.append(0, 0, &ks[t * d..(t + 1) * d], &vs[t * d..(t + 1) * d]);
    }
    let full = 3 * tq_kv::KIVI_GROUP;
    let (kc, vc) = (Kivi::new(d, 2, 32, Axis::PerChannel).unwrap(), Kivi::new(d, 2, 32, Axis::PerToken).unwrap());
    let dec = |c: &Kivi, x: &[f32]| {
        let mut out = x.to_vec();
        for g in 0..full / 32 {
            let blk = &x[g * 32 * d..(g + 1) * 32 * d];
            let mut code = vec![0u8; c.encoded_size(32)];
            c.encode(blk, &mut code).unwrap();
            c.decode(&code, 32, &mut out[g * 32 * d..(g + 1) * 32 * d]).unwrap();
        }
        out
    };
    let (kd, vd) = (dec(&kc, &ks), dec(&vc, &vs));
    let qs = randv(&mut r, 2 * d);
    let mut out = vec![f32::NAN; 2 * d];
    cache.attend_group(0, 0, &qs, 2, n, &mut out);
    let mut f = cache_for(shape, "f32", 0).unwrap();
    for t in 0..n {
        f.append(0, 0, &kd[t * d..(t + 1) * d], &vd[t * d..(t + 1) * d]);
    }
    let mut want = vec![0.0f32; 2 * d];
    f.attend_group(0, 0, &qs, 2, n, &mut want);
    for (a, b) in out.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
    assert_eq!(cache.bytes(), 2 * 3 * kc.encoded_size(32) + 2 * 7 * d * 4);
    assert!(cache_with(shape, "kivi-2", 0, &tq_kv::CacheOptions { sink: 4, ..Default::default() }).is_err());
}

#[test]
fn exp_neg_is_within_two_ulp() {
    let mut worst = 0.0f64;
    let mut x = 0.0f32;
    while x > -87.0 {
        let (got, want) = (tq_kv::exp_neg(x) as f64, (x as f64).exp());
        worst = worst.max((got - want).abs() / want);
        x -= 0.000_731;
    }
    assert!(worst <= 2.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
    assert_eq!(tq_kv::exp_neg(-100.0), 0.0);
    assert_eq!(tq_kv::exp_neg(f32::NEG_INFINITY), 0.0);
    assert_eq!(tq_kv::exp_neg(0.0), 1.0);
}

#[test]
fn f16_and_f32_caches_and_bad_specs() {
    let shape = KvGeometry { layers: 1, q_heads: 1, kv_heads: 1, head_dim: 8 };
    let mut f = cache_for(shape, "f32", 0).unwrap();
    let mut h = cache_for(shape, "f16", 0).unwrap();
    let (k, v) = ([1.0f32, 0.5, 0.25, 0.0, -1.0, 2.0, 0.125, 3.0], [0.5f32; 8]);
    f.append(0, 0, &k, &v);
    h.append(0, 0, &k, &v);
    let (mut a, mut b) = ([0.0f32; 8], [0.0f32; 8]);
    f.attend(0, 0, &k, 1, &mut a);
    h.attend(0, 0, &k, 1, &mut b);
    assert_eq!(a, b, "one position: softmax weight 1, f16-exact values");
    // the f32 cache's grouped path equals its per-head path
    f.append(0, 0, &v, &k);
    let qs: Vec<f32> = k.iter().chain(&v).copied().collect();
    let mut g = [f32::NAN; 16];
    f.attend_group(0, 0, &qs, 2, 2, &mut g);
    for (row, q) in g.chunks_exact(8).zip(qs.chunks_exact(8)) {
        let mut one = [0.0f32; 8];
        f.attend(0, 0, q, 2, &mut one);
        for (x, y) in row.iter().zip(&one) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }
    assert_eq!(f.bytes(), 128, "two positions of 8 f32 keys and values");
    assert_eq!(h.bytes(), 32);
    let mut s = [3.0f32, 1.0, 0.0];
    softmax_weights(&mut s);
    assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6 && s[0] > s[1]);
    assert!(cache_for(shape, "int3", 0).is_err());
    assert!(cache_for(shape, "kivi-9", 0).is_err(), "KIVI takes 1..8 bits");
    assert!(cache_for(shape, "pq-4", 0).is_err());
}

/// A batch appended first and attended position by position in parallel
/// (`attend_positions`, when `prefix_stable`) gives the bits of appending and
/// attending one token at a time; caches whose state depends on later tokens
/// say so.
#[test]
fn batched_positions_equal_one_token_at_a_time() {
    let mut r = Xoshiro256::new(9);
    let (d, group, n) = (64usize, 3usize, 70usize);
    let shape = KvGeometry { layers: 2, q_heads: 2, kv_heads: 2, head_dim: d };
    let ks: Vec<f32> = randv(&mut r, n * 2 * d);
    let vs: Vec<f32> = randv(&mut r, n * 2 * d);
    let qs: Vec<f32> = randv(&mut r, n * 2 * group * d);
    let qd = 2 * group * d;
    for (spec, o) in [
        ("f32", tq_kv::CacheOptions::default()),
        ("tq-mse-4", Default::default()),
        ("k4v3", tq_kv::CacheOptions { sink: 3, ..Default::default() }),
        ("q4_0-rot", Default::default()),
    ] {
        let mut one = cache_with(shape, spec, 0, &o).unwrap();
        let mut want = vec![0.0f32; n * qd];
        for i in 0..n {
            for kh in 0..2 {
                one.append(1, kh, &ks[(i * 2 + kh) * d..(i * 2 + kh + 1) * d], &vs[(i * 2 + kh) * d..(i * 2 + kh + 1) * d]);
            }
            for kh in 0..2 {
                let rg = i * qd + kh * group * d..i * qd + (kh + 1) * group * d;
                one.attend_group(1, kh, &qs[rg.clone()], group, i + 1, &mut want[rg]);
            }
        }
        let mut batch = cache_with(shape, spec, 0, &o).unwrap();
        assert!(batch.prefix_stable(1), "{spec}");
        for i in 0..n {
            for kh in 0..2 {
                batch.append(1, kh, &ks[(i * 2 + kh) * d..(i * 2 + kh + 1) * d], &vs[(i * 2 + kh) * d..(i * 2 + kh + 1) * d]);
            }
        }
        let mut got = vec![f32::NAN; n * qd];
        batch.attend_positions(1, &qs, 2, group, d, 0, &mut got);
        assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{spec}");
    }
    // a recent window, a training phase or an open KIVI group depend on later tokens
    let shape1 = KvGeometry { layers: 1, q_heads: 1, kv_heads: 1, head_dim: d };
    assert!(!cache_with(shape1, "tq-mse-4", 0, &tq_kv::CacheOptions { recent: 8, ..Default::default() }).unwrap().prefix_stable(0));
    let mut c = cache_with(shape1, "tq-mse-4", 0, &tq_kv::CacheOptions { center_keys: true, ..Default::default() }).unwrap();
    assert!(!c.prefix_stable(0), "collecting its first tokens");
    for t in 0..tq_kv::TRAIN_TOKENS {
        c.append(0, 0, &ks[t * d..(t + 1) * d], &vs[t * d..(t + 1) * d]);
    }
    assert!(c.prefix_stable(0), "trained");
    assert!(!cache_for(shape1, "kivi-4", 0).unwrap().prefix_stable(0));
}

/// Windows are bounded before anything is allocated: an absurd `--recent`
/// is a one-line error naming the field, not a capacity-overflow panic.
#[test]
fn absurd_windows_are_refused_by_name() {
    let shape = KvGeometry { layers: 1, q_heads: 1, kv_heads: 1, head_dim: 8 };
    for (sink, recent, field) in [(0, usize::MAX, "--recent"), (usize::MAX, 0, "--sink")] {
        let e = cache_with(shape, "tq-mse-4", 0, &tq_kv::CacheOptions { sink, recent, ..Default::default() }).err().expect("refused");
        assert!(e.to_string().contains(field), "{e}");
    }
}

/// A per-layer plan: each layer of a [`tq_kv::LayeredCache`] attends exactly
/// as a one-layer cache of that layer's choice (bit for bit: the same codes,
/// windows and calibration slice; those caches are checked against
/// dequantize-then-attend above), a plain layer matches dequantize-then-attend
/// directly, the bytes held are the plan's predicted bytes at every length,
/// and a plan that makes the same choice everywhere is the one-precision cache.
#[test]
fn layered_plan_attends_as_each_layer_stores() {
    use std::sync::Arc;
    use tq_kv::{LayerChoice, Store};
    let mut r = Xoshiro256::new(17);
    let d = 64;
    let shape = KvGeometry { layers: 4, q_heads: 6, kv_heads: 2, head_dim: d };
    let codec = |n: &str| Store::Codec(tq_core::registry::lookup(n).unwrap());
    let mut st = tq_kv::CalibrationStats::new(shape);
    for _ in 0..200 {
        for i in 0..shape.layers * shape.kv_heads {
            st.add_key(i, &randv(&mut r, d).iter().enumerate().map(|(j, x)| x * (1.0 + (j % 7) as f32) + 0.5).collect::<Vec<_>>());
            st.add_query(i, &randv(&mut r, d));
        }
    }
    let cal = Arc::new(st.finish(0.2, "test").unwrap());
    let lc = |k: &str, v: &str, sink, recent, recent_q8, delayed, calibrated| LayerChoice {
        keys: codec(k),
        values: codec(v),
        sink,
        recent,
        recent_q8,
        delayed,
        calibrated,
    };
    let layers = vec![
        lc("tq-mse-4-nc", "tq-mse-2-nc", 0, 0, false, false, false),
        LayerChoice::exact(),
        lc("tq-mse-5-nc", "tq-mse-3-nc", 1, 6, true, true, true),
        LayerChoice { keys: codec("q8_0"), values: Store::F16, sink: 2, recent: 3, recent_q8: false, delayed: false, calibrated: false },
    ];
    let plan = tq_kv::KvPlan {
        shape,
        ctx: 40,
        budget_bits: 8.0,
        source: "test".into(),
        seed: 0,
        probe_bits: 3,
        sensitivity: vec![[0.0; 2]; 4],
        layers: layers.clone(),
    };
    let rp = Arc::new(tq_kv::ResolvedPlan { plan: plan.clone(), calibration: Some(cal.clone()) });
    let spec = "3.5".parse::<tq_kv::KvSpec>().unwrap();
    // a budget without a plan, or with options of its own, is refused
    assert!(tq_kv::cache_for(shape, &spec, 3).err().unwrap().to_string().contains("no plan"));
    let spec = spec.with_plan(rp.clone());
    let o = tq_kv::CacheOptions { sink: 1, ..Default::default() };
    assert!(tq_kv::cache_with(shape, &spec, 3, &o).err().unwrap().to_string().contains("its own windows"));
    let mut cache = tq_kv::cache_for(shape, &spec, 3).unwrap();
    let mut alone: Vec<Box<dyn tq_kv::KvCache>> = layers
        .iter()
        .enumerate()
        .map(|(l, c)| {
            let one = KvGeometry { layers: 1, ..shape };
            if c.is_exact() {
                return Box::new(tq_kv::F32Cache::new(one)) as Box<dyn tq_kv::KvCache>;
            }
            let s = tq_kv::KvSpec { name: "x".into(), keys: c.keys, values: c.values, budget: None, plan: None };
            let o = tq_kv::CacheOptions {
                sink: c.sink,
                recent: c.recent,
                recent_q8: c.recent_q8,
                delayed: c.delayed,
                calibration: c.calibrated.then(|| Arc::new(cal.layer(l).unwrap())),
                ..Default::default()
            };
            tq_kv::cache_with(one, &s, 3, &o).unwrap()
        })
        .collect();
    let n = 40;
    let (mut ks, mut vs) = (vec![Vec::new(); 4], vec![Vec::new(); 4]);
    for t in 0..n {
        for l in 0..4 {
            for h in 0..2 {
                let (k, v) = (randv(&mut r, d), randv(&mut r, d));
                cache.append(l, h, &k, &v);
                alone[l].append(0, h, &k, &v);
                if h == 1 {
                    ks[l].push(k);
                    vs[l].push(v);
                }
            }
        }
        assert_eq!(cache.bytes(), plan.bytes_at(t + 1).unwrap(), "bytes after {} tokens", t + 1);
        assert_eq!(cache.bytes(), alone.iter().map(|c| c.bytes()).sum::<usize>());
    }
    let qs = randv(&mut r, 3 * d);
    for (l, one) in alone.iter().enumerate() {
        let (mut a, mut b) = (vec![f32::NAN; 3 * d], vec![f32::NAN; 3 * d]);
        cache.attend_group(l, 1, &qs, 3, n, &mut a);
        one.attend_group(0, 1, &qs, 3, n, &mut b);
        assert_eq!(a, b, "layer {l}");
        assert_eq!(cache.prefix_stable(l), one.prefix_stable(0));
    }
    // layer 0 (no windows, no calibration) against dequantize-then-attend
    let kc = build("tq-mse-4-nc", d, 3, RotationKind::Hadamard).unwrap();
    let vc = build("tq-mse-2-nc", d, tq_core::rng::kv_value_seed(3), RotationKind::Hadamard).unwrap();
    let mut out = vec![0.0f32; d];
    cache.attend(0, 1, &qs[..d], n, &mut out);
    let want = reference(kc.as_ref(), vc.as_ref(), &ks[0], &vs[0], &qs[..d]);
    let scale = want.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
    for (a, b) in out.iter().zip(&want) {
        assert!((*a as f64 - b).abs() <= 5e-4 * scale + 1e-5, "layer 0: {a} vs {b}");
    }
    // the exact layer is exact
    cache.attend(1, 1, &qs[..d], n, &mut out);
    for (a, b) in out.iter().zip(attend_f64(&ks[1], &vs[1], &qs[..d])) {
        assert!((*a as f64 - b).abs() < 1e-4, "exact layer: {a} vs {b}");
    }
    // the same choice everywhere is the one-precision cache, bit for bit
    let c = lc("tq-mse-4-nc", "tq-mse-3-nc", 1, 5, true, true, true);
    let uniform = tq_kv::KvPlan { layers: vec![c; 4], ..plan.clone() };
    let spec = "2.5".parse::<tq_kv::KvSpec>().unwrap().with_plan(Arc::new(tq_kv::ResolvedPlan { plan: uniform, calibration: Some(cal.clone()) }));
    let mut a = tq_kv::cache_for(shape, &spec, 9).unwrap();
    let o = tq_kv::CacheOptions { sink: 1, recent: 5, recent_q8: true, delayed: true, calibration: Some(cal.clone()), ..Default::default() };
    let mut b = cache_with(shape, "k4v3-nc", 9, &o).unwrap();
    for _ in 0..30 {
        for l in 0..4 {
            for h in 0..2 {
                let (k, v) = (randv(&mut r, d), randv(&mut r, d));
                a.append(l, h, &k, &v);
                b.append(l, h, &k, &v);
            }
        }
    }
    assert_eq!(a.bytes(), b.bytes());
    for l in 0..4 {
        let (mut x, mut y) = (vec![0.0f32; 3 * d], vec![0.0f32; 3 * d]);
        a.attend_group(l, 0, &qs, 3, 30, &mut x);
        b.attend_group(l, 0, &qs, 3, 30, &mut y);
        assert_eq!(x, y, "uniform plan, layer {l}");
    }
}
