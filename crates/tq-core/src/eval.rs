//! Distortion measurement on random unit vectors, and the theory it is held to.
//! Pure computation (no I/O); the CLI prints it and the tests assert on it.

use rayon::prelude::*;

use crate::codebook::{LloydMax, SphereCoordinate};
use crate::codec::Codec;
use crate::registry::{CodecEntry, CodecKind};
use crate::rng::{derive_seed, Xoshiro256};

/// Correlation of the planted query used for the bias/shrinkage measurement.
pub const DEFAULT_RHO: f64 = 0.5;

/// Measured distortion of a codec (see [`measure_distortion`]); `*_stderr` are standard errors of the means.
#[derive(Clone, Debug, Default)]
pub struct DistortionStats {
    /// Number of test vectors.
    pub n: usize,
    /// mean ‖x − x̂‖² over unit x
    pub d_mse: f64,
    /// Standard error of `d_mse`.
    pub d_mse_stderr: f64,
    /// mean (⟨q,x⟩ − est)² over independent unit q
    pub d_prod: f64,
    /// Standard error of `d_prod`.
    pub d_prod_stderr: f64,
    /// mean (est − ⟨q,x⟩) over independent unit q
    pub ip_bias: f64,
    /// Standard error of `ip_bias`.
    pub ip_bias_stderr: f64,
    /// correlation ρ of the planted queries q = ρu + √(1−ρ²)w (w ⊥ u random)
    pub rho: f64,
    /// mean (est − ⟨q,x⟩) on the planted queries (⟨q,x⟩ = ρ)
    pub ip_bias_rho: f64,
    /// Standard error of `ip_bias_rho`.
    pub ip_bias_rho_stderr: f64,
    /// mean est / ρ on planted queries (1 = unbiased; 1 − D_mse for tq-mse)
    pub ip_gain: f64,
}

fn mean_stderr(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, (var / n).sqrt())
}

/// The i-th test triple (x, independent q, planted q), independent of the codec.
pub fn test_vectors(dim: usize, seed: u64, i: usize, rho: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = Xoshiro256::new(derive_seed(seed, i as u64));
    let x = rng.unit_vector(dim);
    let q = rng.unit_vector(dim);
    // w: random unit vector orthogonal to x
    let g: Vec<f64> = (0..dim).map(|_| rng.gaussian()).collect();
    let p: f64 = g.iter().zip(&x).map(|(a, &b)| a * b as f64).sum();
    let w: Vec<f64> = g.iter().zip(&x).map(|(a, &b)| a - p * b as f64).collect();
    let wn = w.iter().map(|v| v * v).sum::<f64>().sqrt();
    let s = (1.0 - rho * rho).sqrt();
    let qp = x.iter().zip(&w).map(|(&a, b)| (rho * a as f64 + s * b / wn) as f32).collect();
    (x, q, qp)
}

/// Trains a codec that wants training (PQ, RaBitQ, fractional) on `n` seeded
/// random unit vectors drawn independently of the test vectors.
pub fn train_on_unit_vectors(codec: &mut dyn Codec, n: usize, seed: u64) -> crate::Result<()> {
    if !codec.wants_training() {
        return Ok(());
    }
    let mut rng = Xoshiro256::new(derive_seed(seed, 0x7EA1_0000));
    let sample: Vec<f32> = (0..n).flat_map(|_| rng.unit_vector(codec.dim())).collect();
    codec.train(&sample)
}

/// Measures distortion of `codec` on `n` random unit vectors (seeded, deterministic).
/// `progress` is called with the number of vectors done so far (from worker threads).
pub fn measure_distortion(codec: &dyn Codec, n: usize, seed: u64, rho: f64, progress: &(dyn Fn(usize) + Sync)) -> crate::Result<DistortionStats> {
    codec.check_trained()?;
    let dim = codec.dim();
    let rows: Vec<[f64; 4]> = (0..n)
        .into_par_iter()
        .map(|i| {
            let (x, q, qp) = test_vectors(dim, seed, i, rho);
            let mut code = vec![0u8; codec.code_size()];
            codec.encode_unchecked(&x, &mut code);
            let mut xh = vec![0.0f32; dim];
            codec.decode_unchecked(&code, &mut xh);
            let err: f64 = x.iter().zip(&xh).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
            let true_ip: f64 = q.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let est = codec.score_ip(&codec.prepare_unchecked(&q), &code) as f64;
            let true_p: f64 = qp.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let est_p = codec.score_ip(&codec.prepare_unchecked(&qp), &code) as f64;
            if i % 1024 == 1023 {
                progress(1024);
            }
            [err, est - true_ip, est_p - true_p, est_p]
        })
        .collect();
    progress(n % 1024);
    let col = |k: usize| rows.iter().map(|r| r[k]).collect::<Vec<f64>>();
    let (d_mse, d_mse_stderr) = mean_stderr(&col(0));
    let diffs = col(1);
    let (ip_bias, ip_bias_stderr) = mean_stderr(&diffs);
    let sq: Vec<f64> = diffs.iter().map(|d| d * d).collect();
    let (d_prod, d_prod_stderr) = mean_stderr(&sq);
    let (ip_bias_rho, ip_bias_rho_stderr) = mean_stderr(&col(2));
    let (mean_est_p, _) = mean_stderr(&col(3));
    Ok(DistortionStats {
        n,
        d_mse,
        d_mse_stderr,
        d_prod,
        d_prod_stderr,
        ip_bias,
        ip_bias_stderr,
        rho,
        ip_bias_rho,
        ip_bias_rho_stderr,
        ip_gain: mean_est_p / rho,
    })
}

/// Theoretical values for a registered codec at `dim` (random unit x, independent unit q).
#[derive(Clone, Debug, PartialEq)]
pub struct Theory {
    /// E‖u − û‖²
    pub d_mse: f64,
    /// E(⟨q,u⟩ − est)²
    pub d_prod: f64,
    /// E[est]/⟨q,u⟩ on planted queries
    pub ip_gain: f64,
}

/// Exact Lloyd–Max distortion `E‖u − û‖²` of `tq-mse-bits` at `dim`.
pub fn mse_theory(dim: usize, bits: u32) -> f64 {
    LloydMax::get(dim, bits).map(|c| c.mse_distortion).unwrap_or(f64::NAN)
}

/// Paper bounds: information-theoretic lower bound `4^-b` and upper bound `(√3π/2)·4^-b`.
pub fn mse_bounds(bits: f64) -> (f64, f64) {
    let l = 4f64.powf(-bits);
    (l, 3f64.sqrt() * std::f64::consts::PI / 2.0 * l)
}

/// Theoretical values of `entry` at `dim`; NaN where there is no closed form
/// (norm-corrected `tq-mse`, the baselines).
pub fn theory(entry: &CodecEntry, dim: usize) -> Theory {
    let d = dim as f64;
    match entry.kind {
        CodecKind::Mse { bits, nc } => {
            let dm = mse_theory(dim, bits);
            // ⟨q, x̂⟩ − ⟨q, u⟩ = ⟨q, c − y⟩ in the rotated domain; for independent q
            // E⟨q, e⟩² = E‖e‖²/d, and the norm-corrected scale adds the factor's spread
            // (no closed form: measured only).
            Theory { d_mse: if nc { f64::NAN } else { dm }, d_prod: if nc { f64::NAN } else { dm / d }, ip_gain: if nc { 1.0 } else { 1.0 - dm } }
        }
        CodecKind::Prod { bits, orth } => {
            // est = ⟨Πq, c⟩ + γκ⟨Sq, s⟩ with κ = 1/(d m1), rows of S unit vectors.
            // Independent rows: E est_qjl² = γ²κ²(1 + d(d−1)m1²⟨q,r̂⟩²); orthogonal rows:
            // γ²κ²·‖Sᵀs‖²/d = γ²κ². With E⟨q,r⟩² = Eγ²/d:
            let g2 = if bits >= 2 { mse_theory(dim, bits - 1) } else { 1.0 };
            let m1 = SphereCoordinate::new(dim).mean_abs();
            let a = 1.0 / (d * d * m1 * m1);
            let (d_prod, d_mse) = if orth { (g2 * (a - 1.0 / d), g2 * (d * a - 1.0)) } else { (g2 * (a - 1.0 / (d * d)), g2 * (d * a - 1.0 / d)) };
            Theory { d_mse, d_prod, ip_gain: 1.0 }
        }
        CodecKind::Fractional { hi, lo } => {
            let (a, b) = (dim / 2, dim - dim / 2);
            // Split of a random unit vector: each part's norm² has mean part/d.
            let dm = (a as f64 * mse_theory(a, hi) + b as f64 * mse_theory(b, lo)) / d;
            Theory { d_mse: dm, d_prod: dm / d, ip_gain: 1.0 - dm }
        }
        _ => Theory { d_mse: f64::NAN, d_prod: f64::NAN, ip_gain: f64::NAN },
    }
}
