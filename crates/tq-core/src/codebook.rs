//! Exact Lloyd–Max codebooks for one coordinate of a uniformly random unit vector.
//!
//! After a random rotation every coordinate `t` of a unit vector in `R^dim` has
//! the density `f(t) = C_d (1 - t²)^((d-3)/2)` on `[-1, 1]` with
//! `C_d = Γ(d/2) / (√π Γ((d-1)/2))` (a rescaled Beta(½(d-1), ½(d-1)) law, → N(0, 1/d)).
//! The b-bit Lloyd–Max quantizer of `f` is computed here in closed form per cell:
//! - the cell mass uses the survival function `P(T > t) = ½ I_{1-t²}((d-1)/2, ½)`
//!   (regularized incomplete beta, evaluated by a continued fraction),
//! - the first moment is exact: `∫_a^b t f(t) dt = C_d/(d-1) [(1-a²)^((d-1)/2) - (1-b²)^((d-1)/2)]`.
//!
//! Lloyd iterations (centroid = conditional mean, boundary = midpoint) start
//! from the Panter–Dite companding point density `∝ f^{1/3}`, then Newton's
//! method on the same optimality conditions (tridiagonal Jacobian) converges
//! to `|t_k - (c_{k-1}+c_k)/2| < 1e-11 / √d` (f64 round-off in the cell masses
//! keeps the residual from going much lower). Codebooks are cached per
//! `(dim, bits)` for the life of the process and never re-derived per vector.
//!
//! WARNING: the codebook is baked into stored codes; changing this computation
//! changes the meaning of existing files (the file format version guards it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Result, TqError};

/// A symmetric scalar quantizer with `2^bits` levels.
#[derive(Clone, Debug)]
pub struct LloydMax {
    /// Dimension of the sphere whose coordinate law the codebook quantizes.
    pub dim: usize,
    /// Bits per coordinate (1..=8).
    pub bits: u32,
    /// All `2^bits` centroids, ascending (`centroids[L-1-k] == -centroids[k]`).
    pub centroids: Vec<f32>,
    /// The `2^bits - 1` decision boundaries, ascending (midpoints of centroids).
    pub boundaries: Vec<f32>,
    /// Centroids in f64 (for theory and tests).
    pub centroids_f64: Vec<f64>,
    /// `E‖u - û‖²` for a uniformly random unit vector `u` in `R^dim` (the exact MSE distortion).
    pub mse_distortion: f64,
    /// Lloyd iterations used.
    pub iterations: usize,
}

/// ln Γ(x) for x > 0.
fn ln_gamma(x: f64) -> f64 {
    libm::lgamma(x)
}

/// Continued fraction for the incomplete beta function (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    const EPS: f64 = 1e-16;
    let qab = a + b;
    let qap = a + 1.0;
    let qam = a - 1.0;
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..100_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < EPS {
            break;
        }
    }
    h
}

/// Regularized incomplete beta `I_x(a, b)`.
pub fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_bt = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let bt = ln_bt.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        bt * beta_cf(a, b, x) / a
    } else {
        1.0 - bt * beta_cf(b, a, 1.0 - x) / b
    }
}

/// The coordinate law of a uniformly random unit vector in `R^dim`.
#[derive(Clone, Copy, Debug)]
pub struct SphereCoordinate {
    /// Dimension `d` of the sphere.
    pub dim: usize,
    /// Normalizing constant `C_d`.
    pub c_d: f64,
}

impl SphereCoordinate {
    /// The coordinate law at `dim` (computes `C_d`).
    pub fn new(dim: usize) -> Self {
        let d = dim as f64;
        let c_d = (ln_gamma(d / 2.0) - ln_gamma((d - 1.0) / 2.0)).exp() / std::f64::consts::PI.sqrt();
        Self { dim, c_d }
    }

    /// Density at t ∈ (-1, 1).
    pub fn density(&self, t: f64) -> f64 {
        let d = self.dim as f64;
        self.c_d * (1.0 - t * t).powf((d - 3.0) / 2.0)
    }

    /// `P(T > t)` for `t ≥ 0`.
    pub fn survival(&self, t: f64) -> f64 {
        debug_assert!(t >= 0.0);
        if t >= 1.0 {
            return 0.0;
        }
        let d = self.dim as f64;
        0.5 * inc_beta((d - 1.0) / 2.0, 0.5, 1.0 - t * t)
    }

    /// `∫_t^1 s f(s) ds` for `t ≥ 0`.
    pub fn upper_first_moment(&self, t: f64) -> f64 {
        let d = self.dim as f64;
        if t >= 1.0 {
            return 0.0;
        }
        self.c_d / (d - 1.0) * (1.0 - t * t).powf((d - 1.0) / 2.0)
    }

    /// `E|T|`: the 1-bit centroid, and the constant of the QJL estimator on the sphere.
    pub fn mean_abs(&self) -> f64 {
        2.0 * self.upper_first_moment(0.0)
    }
}

#[allow(clippy::needless_range_loop)] // index loops mirror the tridiagonal system
fn compute(dim: usize, bits: u32) -> LloydMax {
    let law = SphereCoordinate::new(dim);
    let d = dim as f64;
    let half = 1usize << (bits - 1); // cells on the positive side
    let sigma = 1.0 / d.sqrt();

    // Panter–Dite initialization: boundaries at equal-mass points of f^{1/3}.
    let grid = 20_000usize;
    let t_max = (12.0 * sigma).min(1.0);
    let mut cum = vec![0.0f64; grid + 1];
    let g = |t: f64| (1.0 - t * t).max(0.0).powf((d - 3.0) / 6.0);
    for i in 1..=grid {
        // midpoint rule: finite even where f is singular at t = 1 (d = 2)
        let mid = (i as f64 - 0.5) * t_max / grid as f64;
        cum[i] = cum[i - 1] + g(mid) * t_max / grid as f64;
    }
    let total = cum[grid];
    // bnd[0] = 0, bnd[half] = 1, interior bnd[1..half]
    let mut bnd = vec![0.0f64; half + 1];
    bnd[half] = 1.0;
    let mut gi = 0;
    for k in 1..half {
        let target = total * k as f64 / half as f64;
        while gi < grid && cum[gi + 1] < target {
            gi += 1;
        }
        let frac = (target - cum[gi]) / (cum[gi + 1] - cum[gi]).max(f64::MIN_POSITIVE);
        bnd[k] = (gi as f64 + frac) * t_max / grid as f64;
    }

    let mut cent = vec![0.0f64; half];
    let mut iterations = 0;
    let tol = 1e-13 * sigma;
    let mut surv: Vec<f64> = bnd.iter().map(|&t| law.survival(t)).collect();
    let mut mom: Vec<f64> = bnd.iter().map(|&t| law.upper_first_moment(t)).collect();
    let centroid = |i: usize, bnd: &[f64], surv: &[f64], mom: &[f64]| {
        let mass = surv[i] - surv[i + 1];
        if mass > 1e-300 {
            (mom[i] - mom[i + 1]) / mass
        } else {
            0.5 * (bnd[i] + bnd[i + 1].min(bnd[i] + sigma))
        }
    };
    // A few Lloyd steps (centroid = conditional mean, boundary = midpoint) ...
    for _ in 0..50 {
        iterations += 1;
        let mut max_move = 0.0f64;
        for i in 0..half {
            let c = centroid(i, &bnd, &surv, &mom);
            max_move = max_move.max((c - cent[i]).abs());
            cent[i] = c;
        }
        for k in 1..half {
            bnd[k] = 0.5 * (cent[k - 1] + cent[k]);
            surv[k] = law.survival(bnd[k]);
            mom[k] = law.upper_first_moment(bnd[k]);
        }
        if max_move < tol {
            break;
        }
    }
    // ... then Newton on the optimality conditions F_k(t) = t_k - (c_{k-1} + c_k)/2 = 0
    // (k = 1..half-1), whose Jacobian is tridiagonal: with cell i = [a, b], mass P_i,
    // ∂c_i/∂a = f(a)(c_i - a)/P_i and ∂c_i/∂b = f(b)(b - c_i)/P_i. Lloyd alone needs
    // O(L²) iterations at 7-8 bits; Newton converges in a handful.
    let m = half.saturating_sub(1);
    for _ in 0..200 {
        if m == 0 {
            break;
        }
        iterations += 1;
        for i in 0..half {
            cent[i] = centroid(i, &bnd, &surv, &mom);
        }
        let mass: Vec<f64> = (0..half).map(|i| (surv[i] - surv[i + 1]).max(1e-300)).collect();
        let (mut lo, mut di, mut up, mut rhs) = (vec![0.0; m], vec![0.0; m], vec![0.0; m], vec![0.0; m]);
        let mut resid = 0.0f64;
        for r in 0..m {
            let k = r + 1;
            let tk = bnd[k];
            let fk = law.density(tk);
            let dcprev_db = fk * (tk - cent[k - 1]) / mass[k - 1];
            let dc_da = fk * (cent[k] - tk) / mass[k];
            di[r] = 1.0 - 0.5 * (dcprev_db + dc_da);
            if k >= 2 {
                let a = bnd[k - 1];
                lo[r] = -0.5 * law.density(a) * (cent[k - 1] - a) / mass[k - 1];
            }
            if k + 1 < half {
                let b = bnd[k + 1];
                up[r] = -0.5 * law.density(b) * (b - cent[k]) / mass[k];
            }
            rhs[r] = -(tk - 0.5 * (cent[k - 1] + cent[k]));
            resid = resid.max(rhs[r].abs());
        }
        if resid < 100.0 * tol {
            break;
        }
        // Thomas algorithm
        for r in 1..m {
            let w = lo[r] / di[r - 1];
            di[r] -= w * up[r - 1];
            rhs[r] -= w * rhs[r - 1];
        }
        let mut step = vec![0.0; m];
        step[m - 1] = rhs[m - 1] / di[m - 1];
        for r in (0..m - 1).rev() {
            step[r] = (rhs[r] - up[r] * step[r + 1]) / di[r];
        }
        // Damped so boundaries stay strictly increasing inside (0, 1).
        let mut scale = 1.0;
        loop {
            let ok = (0..m).all(|r| {
                let t = bnd[r + 1] + scale * step[r];
                let prev = if r == 0 { 0.0 } else { bnd[r] + scale * step[r - 1] };
                t > prev && t < 1.0 && t.is_finite()
            });
            if ok || scale < 1e-6 {
                break;
            }
            scale *= 0.5;
        }
        for r in 0..m {
            bnd[r + 1] += scale * step[r];
            surv[r + 1] = law.survival(bnd[r + 1]);
            mom[r + 1] = law.upper_first_moment(bnd[r + 1]);
        }
    }
    // Final centroids for the final boundaries, and the distortion.
    let mut sum_pc2 = 0.0;
    for i in 0..half {
        cent[i] = centroid(i, &bnd, &surv, &mom);
        sum_pc2 += (surv[i] - surv[i + 1]) * cent[i] * cent[i];
    }
    // Per coordinate: E t² - Σ p c² (both halves); E t² = 1/d.
    let mse_distortion = (1.0 - d * 2.0 * sum_pc2).max(0.0);

    let mut centroids_f64: Vec<f64> = cent.iter().rev().map(|c| -c).collect();
    centroids_f64.extend(cent.iter().copied());
    let centroids: Vec<f32> = centroids_f64.iter().map(|&c| c as f32).collect();
    let mut boundaries: Vec<f32> = bnd[1..half].iter().rev().map(|&b| -b as f32).collect();
    boundaries.push(0.0);
    boundaries.extend(bnd[1..half].iter().map(|&b| b as f32));
    LloydMax { dim, bits, centroids, boundaries, centroids_f64, mse_distortion, iterations }
}

type Cache = Mutex<HashMap<(usize, u32), Arc<LloydMax>>>;

impl LloydMax {
    /// The cached codebook for `(dim, bits)`, computing it on first use.
    pub fn get(dim: usize, bits: u32) -> Result<Arc<LloydMax>> {
        if !(1..=8).contains(&bits) {
            return Err(TqError::UnsupportedBits(bits));
        }
        if dim < 2 {
            return Err(TqError::BadDim(dim, 2));
        }
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(cb) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&(dim, bits)) {
            return Ok(cb.clone());
        }
        let cb = Arc::new(compute(dim, bits));
        cache.lock().unwrap_or_else(|e| e.into_inner()).insert((dim, bits), cb.clone());
        Ok(cb)
    }

    /// Number of quantization levels, `2^bits`.
    pub fn levels(&self) -> usize {
        1 << self.bits
    }

    /// Index of the cell containing `t`: the number of boundaries strictly below `t`.
    #[inline]
    pub fn quantize_ref(&self, t: f32) -> u8 {
        self.boundaries.partition_point(|&b| b < t) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inc_beta_known_values() {
        // I_x(1,1) = x; I_x(a,1) = x^a; I_{0.5}(a,a) = 0.5
        assert!((inc_beta(1.0, 1.0, 0.3) - 0.3).abs() < 1e-14);
        assert!((inc_beta(3.0, 1.0, 0.4) - 0.064).abs() < 1e-14);
        assert!((inc_beta(7.5, 7.5, 0.5) - 0.5).abs() < 1e-13);
        // arcsine law: I_x(1/2,1/2) = (2/π) asin(√x)
        let x: f64 = 0.2;
        let want = 2.0 / std::f64::consts::PI * x.sqrt().asin();
        assert!((inc_beta(0.5, 0.5, x) - want).abs() < 1e-13);
    }

    #[test]
    fn density_integrates_to_one_and_variance_is_one_over_d() {
        for dim in [2usize, 3, 5, 64, 1536] {
            let law = SphereCoordinate::new(dim);
            assert!((2.0 * law.survival(0.0) - 1.0).abs() < 1e-12, "dim {dim}");
            // E t² = 1/d by symmetry of the sphere; integrate with the substitution t = sin θ
            let n = 200_000;
            let mut s = 0.0;
            for i in 0..n {
                let th = -std::f64::consts::FRAC_PI_2 + (i as f64 + 0.5) * std::f64::consts::PI / n as f64;
                let t = th.sin();
                s += t * t * law.c_d * th.cos().powf(dim as f64 - 2.0) * std::f64::consts::PI / n as f64;
            }
            assert!((s * dim as f64 - 1.0).abs() < 1e-6, "dim {dim}: {s}");
        }
    }

    #[test]
    fn one_bit_centroid_is_mean_abs() {
        for dim in [2usize, 10, 128, 1536] {
            let cb = LloydMax::get(dim, 1).unwrap();
            let law = SphereCoordinate::new(dim);
            assert!((cb.centroids_f64[1] - law.mean_abs()).abs() < 1e-12);
            assert!((cb.mse_distortion - (1.0 - dim as f64 * law.mean_abs().powi(2))).abs() < 1e-12);
        }
    }

    #[test]
    fn large_d_matches_gaussian_lloyd_max() {
        // Known Gaussian Lloyd–Max centroids (× √d) and distortions, reached as d → ∞.
        let cb = LloydMax::get(100_000, 2).unwrap();
        let s = (100_000f64).sqrt();
        assert!((cb.centroids_f64[3] * s - 1.5104).abs() < 2e-3);
        assert!((cb.centroids_f64[2] * s - 0.4528).abs() < 2e-3);
        for (bits, want) in [(1u32, 0.3634), (2, 0.1175), (3, 0.03454), (4, 0.009497)] {
            let cb = LloydMax::get(100_000, bits).unwrap();
            assert!((cb.mse_distortion - want).abs() / want < 2e-3, "b={bits}: {}", cb.mse_distortion);
        }
    }

    #[test]
    fn centroids_are_conditional_means_and_boundaries_midpoints() {
        let cb = LloydMax::get(64, 3).unwrap();
        let l = cb.levels();
        for k in 0..l - 1 {
            let mid = 0.5 * (cb.centroids_f64[k] + cb.centroids_f64[k + 1]);
            assert!((cb.boundaries[k] as f64 - mid).abs() < 1e-7);
        }
        for k in 0..l {
            assert!((cb.centroids_f64[k] + cb.centroids_f64[l - 1 - k]).abs() < 1e-15);
        }
    }
}
