//! The measured distortion equals the theory (statistical tests; seeds fixed).

use tq_core::codebook::LloydMax;
use tq_core::eval::{measure_distortion, theory, DistortionStats, DEFAULT_RHO};
use tq_core::{build, lookup, RotationKind};

/// Standard errors allowed between a measured mean and its exact expectation.
const Z: f64 = 4.0;
const N: usize = 20_000;

fn measure(name: &str, dim: usize, rot: RotationKind, n: usize) -> DistortionStats {
    let c = build(name, dim, 1234, rot).unwrap();
    measure_distortion(c.as_ref(), n, 99, DEFAULT_RHO, &|_| {}).unwrap()
}

#[test]
fn exact_lloyd_max_distortion_matches_the_issue_table() {
    // issue 2: d=128: 0.3609, 0.1160, 0.0340, 0.0093; d=1536: 0.3633, 0.1172, 0.0345, 0.0095
    let want = [(128usize, [0.3609, 0.1160, 0.0340, 0.0093]), (1536, [0.3633, 0.1172, 0.0345, 0.0095])];
    for (dim, vals) in want {
        for (b, v) in vals.iter().enumerate() {
            let got = LloydMax::get(dim, b as u32 + 1).unwrap().mse_distortion;
            assert!((got - v).abs() < 0.0006 * (1.0 + 10.0 * v), "d={dim} b={}: {got} vs {v}", b + 1);
        }
    }
}

#[test]
fn uniform_law_in_three_dimensions_gives_four_to_the_minus_b() {
    // Archimedes: a coordinate of a uniform point on S² is uniform on [-1, 1],
    // whose b-bit Lloyd–Max quantizer is uniform with MSE (2/2^b)²/12 per coordinate.
    for b in 1..=8u32 {
        let got = LloydMax::get(3, b).unwrap().mse_distortion;
        let want = 3.0 * (2.0 / (1u64 << b) as f64).powi(2) / 12.0;
        assert!((got - want).abs() < 1e-9 * want.max(1e-6), "b={b}: {got} vs {want}");
    }
}

#[test]
fn mse_matches_theory() {
    for dim in [128usize, 1536] {
        for bits in 1..=4u32 {
            let name = format!("tq-mse-{bits}");
            let s = measure(&name, dim, RotationKind::Hadamard, N);
            let t = theory(lookup(&name).unwrap(), dim);
            let rel = (s.d_mse - t.d_mse).abs() / t.d_mse;
            assert!(rel < 0.02, "{name} d={dim}: measured {} theory {} ({rel})", s.d_mse, t.d_mse);
            assert!((s.d_mse - t.d_mse).abs() < Z * s.d_mse_stderr + 1e-5 * t.d_mse, "{name} d={dim}: {s:?}");
            // independent queries: E(⟨q,x⟩ − est)² = D_mse / dim, and no bias
            assert!((s.d_prod - t.d_prod).abs() < Z * s.d_prod_stderr, "{name} d={dim}: {s:?}");
            assert!(s.ip_bias.abs() < Z * s.ip_bias_stderr, "{name} d={dim}: {s:?}");
            // planted queries: shrinkage by exactly 1 − D_mse (2/π at one bit)
            assert!((s.ip_gain - t.ip_gain).abs() * s.rho < Z * s.ip_bias_rho_stderr, "{name} d={dim}: {s:?}");
        }
    }
}

#[test]
fn one_bit_mse_shrinks_inner_products_by_two_over_pi() {
    let s = measure("tq-mse-1", 1536, RotationKind::Hadamard, N);
    assert!((s.ip_gain - 2.0 / std::f64::consts::PI).abs() < 0.005, "{s:?}");
}

#[test]
fn higher_bits_divide_mse_by_about_four() {
    let mut prev = measure("tq-mse-4", 128, RotationKind::Hadamard, 5000).d_mse;
    for bits in 5..=8u32 {
        let name = format!("tq-mse-{bits}");
        let s = measure(&name, 128, RotationKind::Hadamard, 5000);
        let t = theory(lookup(&name).unwrap(), 128);
        let ratio = prev / s.d_mse;
        assert!((3.6..4.4).contains(&ratio), "{name}: ratio {ratio}");
        assert!((s.d_mse - t.d_mse).abs() < Z * s.d_mse_stderr + 1e-3 * t.d_mse, "{name}: {s:?} vs {t:?}");
        prev = s.d_mse;
    }
}

#[test]
fn prod_estimator_is_unbiased_and_matches_paper_variance() {
    // issue 2: d_prod·dim within 5% of 1.57, 0.56, 0.18, 0.054 (the paper's Gaussian S)
    let dim = 128;
    for (bits, paper) in [(1u32, 1.57), (2, 0.56), (3, 0.18), (4, 0.054)] {
        let name = format!("tq-prod-{bits}");
        let s = measure(&name, dim, RotationKind::Hadamard, N);
        let t = theory(lookup(&name).unwrap(), dim);
        let dd = s.d_prod * dim as f64;
        assert!((dd - paper).abs() / paper < 0.05, "{name}: d_prod·dim {dd} vs paper {paper}");
        assert!((s.d_prod - t.d_prod).abs() < Z * s.d_prod_stderr, "{name}: {s:?} vs {t:?}");
        assert!(s.ip_bias.abs() < 3.0 * s.ip_bias_stderr, "{name}: {s:?}");
        assert!(s.ip_bias_rho.abs() < 3.0 * s.ip_bias_rho_stderr, "{name} planted: {s:?}");
        // D_mse of the decoded vector depends on the one fixed S through Σ_{i≠j}⟨s_i,s_j⟩E[z_i z_j],
        // whose spread over draws of S is ≈ √2·E γ²/dim: allow 3 of those on top of sampling noise.
        let g2 = if bits >= 2 { LloydMax::get(dim, bits - 1).unwrap().mse_distortion } else { 1.0 };
        let s_spread = 3.0 * 2f64.sqrt() * g2 / dim as f64;
        assert!((s.d_mse - t.d_mse).abs() < Z * s.d_mse_stderr + s_spread, "{name} mse: {s:?} vs {t:?}");
    }
}

#[test]
fn orthogonal_qjl_is_unbiased_with_lower_variance() {
    let dim = 128;
    for bits in 1..=4u32 {
        let name = format!("tq-prod-{bits}-orth");
        let s = measure(&name, dim, RotationKind::Haar, N);
        let t = theory(lookup(&name).unwrap(), dim);
        assert!((s.d_prod - t.d_prod).abs() < Z * s.d_prod_stderr, "{name}: {s:?} vs {t:?}");
        assert!(s.ip_bias_rho.abs() < 3.0 * s.ip_bias_rho_stderr, "{name} planted: {s:?}");
        let g = theory(lookup(&format!("tq-prod-{bits}")).unwrap(), dim);
        assert!(t.d_prod < 0.5 * g.d_prod);
    }
}

#[test]
fn norm_correction_cuts_inner_product_bias_tenfold() {
    for bits in [1u32, 2] {
        let plain = measure(&format!("tq-mse-{bits}"), 128, RotationKind::Hadamard, N);
        let nc = measure(&format!("tq-mse-{bits}-nc"), 128, RotationKind::Hadamard, N);
        assert!(plain.ip_bias_rho.abs() > 10.0 * nc.ip_bias_rho.abs(), "b={bits}: {plain:?} vs {nc:?}");
        assert!(nc.ip_bias_rho.abs() < Z * nc.ip_bias_rho_stderr, "b={bits}: {nc:?}");
    }
}

#[test]
fn hadamard_and_haar_give_the_same_distortion() {
    for name in ["tq-mse-1", "tq-mse-2", "tq-mse-4", "tq-prod-3"] {
        let a = measure(name, 128, RotationKind::Hadamard, N);
        let b = measure(name, 128, RotationKind::Haar, N);
        let se = (a.d_mse_stderr.powi(2) + b.d_mse_stderr.powi(2)).sqrt();
        assert!((a.d_mse - b.d_mse).abs() < Z * se, "{name}: {} vs {}", a.d_mse, b.d_mse);
        let se = (a.d_prod_stderr.powi(2) + b.d_prod_stderr.powi(2)).sqrt();
        assert!((a.d_prod - b.d_prod).abs() < Z * se, "{name}: {} vs {}", a.d_prod, b.d_prod);
    }
}

#[test]
fn fractional_rates_match_their_split_theory() {
    for name in ["tq-mse-2.5", "tq-mse-3.5"] {
        let s = measure(name, 128, RotationKind::Hadamard, N);
        let t = theory(lookup(name).unwrap(), 128);
        assert!((s.d_mse - t.d_mse).abs() < Z * s.d_mse_stderr + 1e-3 * t.d_mse, "{name}: {s:?} vs {t:?}");
    }
}
