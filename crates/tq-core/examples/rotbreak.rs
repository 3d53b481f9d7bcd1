use std::time::Instant;
use tq_core::kernels::kernels;
use tq_core::rng::Xoshiro256;
use tq_core::rotation::{Rotation, RotationKind};
fn main() {
    let n = 4000;
    for &d in &[384usize, 512, 576, 768, 1536, 3072] {
        let mut rng = Xoshiro256::new(1);
        let xs: Vec<f32> = (0..n * d).map(|_| rng.gaussian() as f32).collect();
        let rot = Rotation::new(RotationKind::Hadamard, d, 7).unwrap();
        let mut y = vec![0.0f32; d];
        let mut t = vec![0.0f32; d];
        let mut best_rot = f64::MAX;
        let mut best_un = f64::MAX;
        let mut best_enc = f64::MAX;
        let mut best_chk = f64::MAX;
        let codec = tq_core::build("tq-mse-4-nc", d, 7, RotationKind::Hadamard).unwrap();
        let mut codes = vec![0u8; n * codec.code_size()];
        for _ in 0..7 {
            let s = Instant::now();
            for x in xs.chunks_exact(d) {
                rot.rotate_into(x, &mut y, &mut t);
                std::hint::black_box(&y);
            }
            best_rot = best_rot.min(s.elapsed().as_secs_f64() / n as f64 * 1e9);
            let s = Instant::now();
            for x in xs.chunks_exact(d) {
                y.copy_from_slice(x);
                rot.unrotate_in_place(&mut y, &mut t);
                std::hint::black_box(&y);
            }
            best_un = best_un.min(s.elapsed().as_secs_f64() / n as f64 * 1e9);
            let s = Instant::now();
            for (x, c) in xs.chunks_exact(d).zip(codes.chunks_exact_mut(codec.code_size())) {
                codec.encode_unchecked(x, c);
            }
            best_enc = best_enc.min(s.elapsed().as_secs_f64() / n as f64 * 1e9);
            let s = Instant::now();
            tq_core::codec::check_encodable(codec.as_ref(), &xs).unwrap();
            best_chk = best_chk.min(s.elapsed().as_secs_f64() / n as f64 * 1e9);
        }
        println!("d={d} {}: rotate {best_rot:.0} ns, unrotate {best_un:.0} ns, encode_unchecked {best_enc:.0} ns, check {best_chk:.0} ns", kernels().name);
    }
}
