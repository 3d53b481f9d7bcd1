fn main() {
    for d in [2usize, 3, 64, 128, 1536] {
        for b in 1..=8 {
            let t = std::time::Instant::now();
            let cb = tq_core::codebook::LloydMax::get(d, b).unwrap();
            println!("d={d} b={b} D={:.5} it={} t={:?} cmax*sqrt(d)={:.4}", cb.mse_distortion, cb.iterations, t.elapsed(), cb.centroids_f64.last().unwrap() * (d as f64).sqrt());
        }
    }
}
