//! `tq bench encode`: single-core throughput of encode, decode and scoring
//! from codes on seeded Gaussian vectors, with f32 dot products over the
//! uncompressed vectors timed in the same process as the baseline, and the
//! distortion beside the speed.

use std::time::Instant;

use tq_core::fastscan::{FastScanCodes, QuantizedLut};
use tq_core::kernels::kernels;
use tq_core::rng::Xoshiro256;
use tq_core::{Codec, PreparedQuery, RotationKind};

use crate::error::{bail, Context, Result};

/// One `tq bench encode` run (field names as `--json` prints them).
#[derive(Clone, Debug, serde::Serialize)]
pub struct EncodeBench {
    /// Registry name.
    pub codec: String,
    /// Vector dimension.
    pub dim: usize,
    /// Vectors per timed pass.
    pub n: usize,
    /// Threads used (always 1).
    pub threads: usize,
    /// The kernel table that ran (`scalar`, `avx2`, `avx512`).
    pub kernels: &'static str,
    /// Rotation of the codec.
    pub rotation: &'static str,
    /// Bits per value, every per-vector overhead included.
    pub bits_per_value: f64,
    /// Vectors encoded per second.
    pub encode_vectors_per_s: f64,
    /// Vectors decoded per second.
    pub decode_vectors_per_s: f64,
    /// Codes scored per second (exact estimator).
    pub score_vectors_per_s: f64,
    /// f32 dot products per second over the uncompressed vectors (the baseline).
    pub f32_dot_vectors_per_s: f64,
    /// Scoring throughput over the f32 baseline's.
    pub score_speedup_vs_f32: f64,
    /// Microseconds to prepare one query.
    pub prepare_query_us: f64,
    /// Bytes per code.
    pub code_bytes: usize,
    /// Bytes per f32 vector.
    pub f32_bytes: usize,
    /// Σ‖x − x̂‖² / Σ‖x‖² of the decoded vectors.
    pub relative_mse: f64,
    /// Fast-scan (u8 tables) codes scored per second, for fast-scan codecs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fastscan_vectors_per_s: Option<f64>,
    /// Fast-scan throughput over the f32 baseline's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fastscan_speedup_vs_f32: Option<f64>,
    /// RMS error of the fast-scan scores relative to the exact ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fastscan_relative_rms_error: Option<f64>,
    /// Vectors per second put into the blocked fast-scan layout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fastscan_layout_vectors_per_s: Option<f64>,
}

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

/// Times `name` at `dim` on `n` seeded Gaussian vectors, one core, best of 5.
pub fn encode_bench(name: &str, dim: usize, n: usize, rotation: RotationKind) -> Result<EncodeBench> {
    let codec = tq_core::build(name, dim, 7, rotation)?;
    let mut rng = Xoshiro256::new(1);
    let xs: Vec<f32> = (0..n * dim).map(|_| rng.gaussian() as f32).collect();
    let q: Vec<f32> = (0..dim).map(|_| rng.gaussian() as f32).collect();
    let cs = codec.code_size();
    let mut codes = vec![0u8; n * cs];
    let mut dec = vec![0.0f32; n * dim];
    // checked once; the timed passes repeat the same calls
    codec.encode_batch(&xs, &mut codes)?;
    codec.decode_batch(&codes, &mut dec)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("cannot start a thread pool")?;
    let reps = 5;
    let (t_enc, t_dec) = pool.install(|| {
        let te = best_of(reps, || {
            let _ = codec.encode_batch(&xs, &mut codes);
        });
        let td = best_of(reps, || {
            let _ = codec.decode_batch(&codes, &mut dec);
        });
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
    // quality beside speed: relative MSE of the decoded vectors
    let (mut err, mut nrm) = (0.0f64, 0.0f64);
    for (a, b) in xs.iter().zip(&dec) {
        err += (*a as f64 - *b as f64).powi(2);
        nrm += (*a as f64).powi(2);
    }
    let per_s = |t: f64| n as f64 / t;
    Ok(EncodeBench {
        codec: name.to_string(),
        dim,
        n,
        threads: 1,
        kernels: kernels().name,
        rotation: rotation.name(),
        bits_per_value: codec.bits_per_value(),
        encode_vectors_per_s: per_s(t_enc),
        decode_vectors_per_s: per_s(t_dec),
        score_vectors_per_s: per_s(t_score),
        f32_dot_vectors_per_s: per_s(t_f32),
        score_speedup_vs_f32: t_f32 / t_score,
        prepare_query_us: t_prep * 1e6,
        code_bytes: cs,
        f32_bytes: 4 * dim,
        relative_mse: err / nrm,
        fastscan_vectors_per_s: fast.as_ref().map(|f| per_s(f.t_scan)),
        fastscan_speedup_vs_f32: fast.as_ref().map(|f| t_f32 / f.t_scan),
        fastscan_relative_rms_error: fast.as_ref().map(|f| f.rel_err),
        fastscan_layout_vectors_per_s: fast.as_ref().map(|f| per_s(f.t_layout)),
    })
}

/// One dimension of [`encode_dims_bench`]: medians over interleaved repeats.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EncodeDim {
    /// Vector dimension.
    pub dim: usize,
    /// Vectors encoded per timed pass.
    pub vectors: usize,
    /// Median nanoseconds to encode one vector.
    pub ns_per_vector: f64,
    /// Median nanoseconds per coordinate (`ns_per_vector / dim`).
    pub ns_per_coord: f64,
    /// `ns_per_coord` over that of the largest power of two below `dim` (`None` for powers of two).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_coord_vs_pow2_below: Option<f64>,
    /// `ns_per_coord` over that of the smallest power of two above `dim`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_coord_vs_pow2_above: Option<f64>,
}

/// `tq bench encode --dims`: encode time of one codec at several dimensions,
/// timed in one process (field names as `--json` prints them).
#[derive(Clone, Debug, serde::Serialize)]
pub struct EncodeDims {
    /// Registry name.
    pub codec: String,
    /// The kernel table that ran.
    pub kernels: &'static str,
    /// Rotation of the codec.
    pub rotation: &'static str,
    /// Threads used (always 1).
    pub threads: usize,
    /// Timed passes per dimension (the reported values are their medians).
    pub repeats: usize,
    /// Coordinates encoded per pass at every dimension.
    pub coords: usize,
    /// Ascending by dimension; the powers of two around each requested one are added.
    pub dims: Vec<EncodeDim>,
}

/// Encode time per vector and per coordinate of `name` at each of `dims` and
/// at the powers of two around them, on one core: every pass encodes the same
/// `coords` seeded Gaussian floats (`coords / dim` vectors), and the passes
/// run interleaved (every dimension once, `repeats` times over), so that load
/// on a shared machine hits all dimensions alike; the medians are reported.
pub fn encode_dims_bench(name: &str, dims: &[usize], coords: usize, rotation: RotationKind, repeats: usize) -> Result<EncodeDims> {
    let mut all: Vec<usize> = Vec::new();
    for &d in dims {
        all.push(d);
        if d >= 2 && !d.is_power_of_two() {
            all.extend([d.next_power_of_two() / 2, d.next_power_of_two()]);
        }
    }
    all.sort_unstable();
    all.dedup();
    let Some(&hi) = all.last() else { bail!("no dimension to time") };
    if coords < hi {
        bail!("{coords} coordinates per pass do not hold one vector of dimension {hi}");
    }
    if repeats == 0 {
        bail!("at least one timed pass per dimension is needed");
    }
    let codecs = all.iter().map(|&d| tq_core::build(name, d, 7, rotation)).collect::<std::result::Result<Vec<_>, _>>()?;
    let mut rng = Xoshiro256::new(1);
    let xs: Vec<f32> = (0..coords).map(|_| rng.gaussian() as f32).collect();
    let mut codes: Vec<Vec<u8>> = codecs.iter().zip(&all).map(|(c, &d)| vec![0u8; coords / d * c.code_size()]).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("cannot start a thread pool")?;
    let mut samples = vec![Vec::with_capacity(repeats); all.len()];
    pool.install(|| -> Result<()> {
        // one untimed pass each (tables, caches, page faults)
        for ((c, &d), out) in codecs.iter().zip(&all).zip(codes.iter_mut()) {
            c.encode_batch(&xs[..coords / d * d], out)?;
        }
        for _ in 0..repeats {
            for (((c, &d), out), s) in codecs.iter().zip(&all).zip(codes.iter_mut()).zip(samples.iter_mut()) {
                let t = Instant::now();
                c.encode_batch(&xs[..coords / d * d], out)?;
                s.push(t.elapsed().as_secs_f64() * 1e9 / (coords / d) as f64);
            }
        }
        Ok(())
    })?;
    let median = |s: &mut Vec<f64>| {
        s.sort_by(f64::total_cmp);
        let m = s.len() / 2;
        if s.len() % 2 == 1 {
            s[m]
        } else {
            0.5 * (s[m - 1] + s[m])
        }
    };
    let per_vec: Vec<f64> = samples.iter_mut().map(median).collect();
    let per_coord = |d: usize| all.iter().position(|&a| a == d).map(|i| per_vec[i] / d as f64);
    let out = all
        .iter()
        .zip(&per_vec)
        .map(|(&d, &ns)| {
            let pc = ns / d as f64;
            let (below, above) = if d.is_power_of_two() { (None, None) } else { (per_coord(d.next_power_of_two() / 2), per_coord(d.next_power_of_two())) };
            EncodeDim {
                dim: d,
                vectors: coords / d,
                ns_per_vector: ns,
                ns_per_coord: pc,
                per_coord_vs_pow2_below: below.map(|b| pc / b),
                per_coord_vs_pow2_above: above.map(|a| pc / a),
            }
        })
        .collect();
    Ok(EncodeDims { codec: name.to_string(), kernels: kernels().name, rotation: rotation.name(), threads: 1, repeats, coords, dims: out })
}

struct FastTimes {
    t_layout: f64,
    t_scan: f64,
    rel_err: f64,
}

/// Fast-scan scoring (8-bit tables, blocked layout) of the same codes for the
/// same query, with its error against the exact scores `exact`.
fn fastscan(codec: &dyn Codec, pq: &PreparedQuery, codes: &[u8], exact: &[f32], reps: usize) -> Result<Option<FastTimes>> {
    let Some(m) = codec.fastscan_m() else { return Ok(None) };
    let cs = codec.code_size();
    let layout = || -> Result<FastScanCodes> {
        let mut st = FastScanCodes::new(m)?;
        for c in codes.chunks_exact(cs) {
            st.push(&c[..m / 2]);
        }
        Ok(st)
    };
    let t = Instant::now();
    let st = layout()?;
    let t_layout = t.elapsed().as_secs_f64();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Speeds are not asserted (no timing in tests); what the benchmark
    /// reports beside them must be right: sizes, the distortion of the
    /// decoded vectors against the codec's own decode, fast-scan only where
    /// the codec has it and close to the exact scores.
    #[test]
    fn reports_sizes_distortion_and_fastscan_error() {
        let b = encode_bench("tq-mse-4-nc", 128, 512, RotationKind::Hadamard).unwrap();
        assert_eq!((b.code_bytes, b.f32_bytes, b.threads), (68, 512, 1));
        assert!(b.encode_vectors_per_s > 0.0 && b.score_speedup_vs_f32.is_finite());
        // 4-bit Lloyd–Max at d = 128: D_mse ≈ 0.0093 per unit vector
        assert!((0.007..0.012).contains(&b.relative_mse), "{}", b.relative_mse);
        let e = b.fastscan_relative_rms_error.expect("4-bit codes have fast-scan");
        assert!(e > 0.0 && e < 0.05, "fast-scan rms error {e}");
        let b = encode_bench("tq-mse-3", 64, 256, RotationKind::Hadamard).unwrap();
        assert!(b.fastscan_vectors_per_s.is_none());
        assert!(encode_bench("tq-mse-9", 64, 16, RotationKind::Hadamard).is_err());
    }

    /// `--dims` times the requested dimensions and the powers of two around
    /// them, the same coordinates at each, and its ratios are those of the
    /// reported per-coordinate times; nonsense is refused.
    #[test]
    fn dims_bench_adds_the_powers_of_two_and_reports_consistent_ratios() {
        let b = encode_dims_bench("tq-mse-2", &[96, 50, 64], 4096, RotationKind::Hadamard, 3).unwrap();
        let dims: Vec<usize> = b.dims.iter().map(|d| d.dim).collect();
        assert_eq!(dims, [32, 50, 64, 96, 128]);
        assert_eq!((b.repeats, b.coords, b.threads), (3, 4096, 1));
        let pc = |d: usize| b.dims.iter().find(|e| e.dim == d).unwrap().ns_per_coord;
        for e in &b.dims {
            assert_eq!(e.vectors, 4096 / e.dim);
            assert!(e.ns_per_vector > 0.0 && (e.ns_per_coord - e.ns_per_vector / e.dim as f64).abs() < 1e-9);
            if e.dim.is_power_of_two() {
                assert!(e.per_coord_vs_pow2_below.is_none() && e.per_coord_vs_pow2_above.is_none());
            } else {
                let (lo, hi) = (e.dim.next_power_of_two() / 2, e.dim.next_power_of_two());
                assert!((e.per_coord_vs_pow2_below.unwrap() - e.ns_per_coord / pc(lo)).abs() < 1e-9);
                assert!((e.per_coord_vs_pow2_above.unwrap() - e.ns_per_coord / pc(hi)).abs() < 1e-9);
            }
        }
        let err = |r: Result<EncodeDims>| r.unwrap_err().to_string();
        assert!(err(encode_dims_bench("tq-mse-2", &[], 4096, RotationKind::Hadamard, 3)).contains("no dimension"));
        assert!(err(encode_dims_bench("tq-mse-2", &[576], 1000, RotationKind::Hadamard, 3)).contains("do not hold one vector"));
        assert!(err(encode_dims_bench("tq-mse-2", &[64], 4096, RotationKind::Hadamard, 0)).contains("at least one timed pass"));
        assert!(encode_dims_bench("tq-mse-2", &[1], 4096, RotationKind::Hadamard, 1).is_err());
    }
}
