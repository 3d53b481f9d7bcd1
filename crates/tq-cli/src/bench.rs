//! `tq bench encode`: printing around `tq_data::bench::encode_bench` and `encode_dims_bench`.

use anyhow::Result;
use tq_core::RotationKind;

pub fn encode(name: &str, dim: usize, n: usize, rot: RotationKind, json: bool) -> Result<()> {
    let b = tq_data::bench::encode_bench(name, dim, n, rot)?;
    if json {
        // through a JSON value: keys sorted, as before
        println!("{}", serde_json::to_string(&serde_json::to_value(&b)?)?);
        return Ok(());
    }
    println!("{name} dim={dim} n={n}, one core, kernels={}", b.kernels);
    println!("  encode  {:>12.0} vectors/s", b.encode_vectors_per_s);
    println!("  decode  {:>12.0} vectors/s", b.decode_vectors_per_s);
    println!("  score   {:>12.0} vectors/s from {}-byte codes", b.score_vectors_per_s, b.code_bytes);
    println!("  f32 dot {:>12.0} vectors/s over {}-byte vectors (baseline, same process)", b.f32_dot_vectors_per_s, b.f32_bytes);
    println!("  score speed-up vs f32: {:.2}×; relative MSE {:.5}", b.score_speedup_vs_f32, b.relative_mse);
    if let (Some(v), Some(s), Some(e)) = (b.fastscan_vectors_per_s, b.fastscan_speedup_vs_f32, b.fastscan_relative_rms_error) {
        println!("  fast-scan {v:>10.0} vectors/s ({s:.2}× f32; u8 tables, rms error {e:.4} of the exact scores; re-score the top candidates)");
    }
    Ok(())
}

pub fn encode_dims(name: &str, dims: &[usize], coords: usize, rot: RotationKind, repeats: usize, json: bool) -> Result<()> {
    let b = tq_data::bench::encode_dims_bench(name, dims, coords, rot, repeats)?;
    if json {
        println!("{}", serde_json::to_string(&serde_json::to_value(&b)?)?);
        return Ok(());
    }
    println!("{name} encode, one core, kernels={}, rotation={}, {coords} coordinates per pass, median of {repeats} interleaved passes", b.kernels, b.rotation);
    println!("{:>6} {:>9} {:>12} {:>10} {:>13} {:>13}", "dim", "vectors", "ns/vector", "ns/coord", "÷ pow2 below", "÷ pow2 above");
    let ratio = |r: Option<f64>| r.map_or_else(|| "-".to_string(), |r| format!("{r:.2}×"));
    for d in &b.dims {
        println!(
            "{:>6} {:>9} {:>12.1} {:>10.3} {:>13} {:>13}",
            d.dim,
            d.vectors,
            d.ns_per_vector,
            d.ns_per_coord,
            ratio(d.per_coord_vs_pow2_below),
            ratio(d.per_coord_vs_pow2_above)
        );
    }
    Ok(())
}
