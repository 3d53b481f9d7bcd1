//! `tq bench encode`: single-core throughput of encode, decode and scoring
//! from codes, with f32 dot products over the uncompressed vectors timed in the
//! same process as the baseline, and the distortion printed beside the speed.

use std::time::Instant;

use anyhow::Result;
use serde_json::json;
use tq_core::kernels::kernels;
use tq_core::rng::Xoshiro256;
use tq_core::RotationKind;

/// Best of `reps` timings of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

pub fn encode(name: &str, dim: usize, n: usize, rot: RotationKind, json: bool) -> Result<()> {
    let codec = tq_core::build(name, dim, 7, rot)?;
    let mut rng = Xoshiro256::new(1);
    let xs: Vec<f32> = (0..n * dim).map(|_| rng.gaussian() as f32).collect();
    let q: Vec<f32> = (0..dim).map(|_| rng.gaussian() as f32).collect();
    let cs = codec.code_size();
    let mut codes = vec![0u8; n * cs];
    let mut dec = vec![0.0f32; n * dim];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let reps = 5;
    let (t_enc, t_dec) = pool.install(|| {
        let te = best_of(reps, || codec.encode_batch(&xs, &mut codes).expect("encode"));
        let td = best_of(reps, || codec.decode_batch(&codes, &mut dec).expect("decode"));
        (te, td)
    });
    let pq = codec.prepare(&q)?;
    let mut scores = vec![0.0f32; n];
    let t_score = best_of(reps, || codec.score_ip_many(&pq, &codes, &mut scores));
    let t_prep = best_of(reps, || {
        std::hint::black_box(codec.prepare_unchecked(&q));
    });
    let dot = kernels().dot;
    let mut exact = vec![0.0f32; n];
    let t_f32 = best_of(reps, || {
        for (o, x) in exact.iter_mut().zip(xs.chunks_exact(dim)) {
            *o = dot(&q, x);
        }
    });
    std::hint::black_box((&scores, &exact));
    let fast = fastscan(codec.as_ref(), &pq, &codes, &scores, reps)?;
    // quality beside speed: relative MSE of the decoded vectors, score correlation
    let (mut err, mut nrm) = (0.0f64, 0.0f64);
    for (a, b) in xs.iter().zip(&dec) {
        err += (*a as f64 - *b as f64).powi(2);
        nrm += (*a as f64).powi(2);
    }
    let out = json!({
        "codec": name, "dim": dim, "n": n, "threads": 1, "kernels": kernels().name, "rotation": rot.name(),
        "bits_per_value": codec.bits_per_value(),
        "encode_vectors_per_s": n as f64 / t_enc,
        "decode_vectors_per_s": n as f64 / t_dec,
        "score_vectors_per_s": n as f64 / t_score,
        "f32_dot_vectors_per_s": n as f64 / t_f32,
        "score_speedup_vs_f32": t_f32 / t_score,
        "prepare_query_us": t_prep * 1e6,
        "code_bytes": cs, "f32_bytes": 4 * dim,
        "relative_mse": err / nrm,
    });
    let mut out = out;
    if let Some(f) = &fast {
        out["fastscan_vectors_per_s"] = json!(n as f64 / f.t_scan);
        out["fastscan_speedup_vs_f32"] = json!(t_f32 / f.t_scan);
        out["fastscan_relative_rms_error"] = json!(f.rel_err);
        out["fastscan_layout_vectors_per_s"] = json!(n as f64 / f.t_layout);
    }
    if json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{name} dim={dim} n={n}, one core, kernels={}", kernels().name);
        println!("  encode  {:>12.0} vectors/s", n as f64 / t_enc);
        println!("  decode  {:>12.0} vectors/s", n as f64 / t_dec);
        println!("  score   {:>12.0} vectors/s from {cs}-byte codes", n as f64 / t_score);
        println!("  f32 dot {:>12.0} vectors/s over {}-byte vectors (baseline, same process)", n as f64 / t_f32, 4 * dim);
        println!("  score speed-up vs f32: {:.2}×; relative MSE {:.5}", t_f32 / t_score, err / nrm);
        if let Some(f) = &fast {
            println!(
                "  fast-scan {:>10.0} vectors/s ({:.2}× f32; u8 tables, rms error {:.4} of the exact scores; re-score the top candidates)",
                n as f64 / f.t_scan,
                t_f32 / f.t_scan,
                f.rel_err
            );
        }
    }
    Ok(())
}

struct FastTimes {
    t_layout: f64,
    t_scan: f64,
    rel_err: f64,
}

/// Fast-scan scoring (8-bit tables, blocked layout) of the same codes for the
/// same query, with its error against the exact scores `exact`.
fn fastscan(codec: &dyn tq_core::Codec, pq: &tq_core::PreparedQuery, codes: &[u8], exact: &[f32], reps: usize) -> Result<Option<FastTimes>> {
    use tq_core::fastscan::{FastScanCodes, QuantizedLut};
    let Some(m) = codec.fastscan_m() else { return Ok(None) };
    let cs = codec.code_size();
    let mut st = FastScanCodes::new(m)?;
    let t_layout = best_of(1, || {
        st = FastScanCodes::new(m).expect("m");
        for c in codes.chunks_exact(cs) {
            st.push(&c[..m / 2]);
        }
    });
    let factors: Vec<f32> = codes.chunks_exact(cs).map(|c| codec.fastscan_factor(c)).collect();
    let mut out = vec![0.0f32; factors.len()];
    let t_scan = best_of(reps, || {
        let lut = QuantizedLut::new(&codec.fastscan_tables(pq));
        st.scan(&lut, &mut out);
        for (o, f) in out.iter_mut().zip(&factors) {
            *o *= f;
        }
    });
    let (mut e, mut s) = (0.0f64, 0.0f64);
    for (a, b) in out.iter().zip(exact) {
        e += (*a as f64 - *b as f64).powi(2);
        s += (*b as f64).powi(2);
    }
    Ok(Some(FastTimes { t_layout, t_scan, rel_err: (e / s).sqrt() }))
}
