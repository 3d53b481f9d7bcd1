use std::time::Instant;
use tq_core::kernels::{available, HadRound};
use tq_core::rng::Xoshiro256;
fn t(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let s = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(s.elapsed().as_secs_f64() / reps as f64 * 1e9);
    }
    best
}
fn main() {
    let d = 576;
    let p = 512;
    let mut rng = Xoshiro256::new(1);
    let x: Vec<f32> = (0..d).map(|_| rng.gaussian() as f32).collect();
    let mut perm: Vec<u32> = (0..d as u32).collect();
    for i in (1..d).rev() {
        perm.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let ident: Vec<u32> = (0..d as u32).collect();
    let masks = vec![0u32; d];
    let r = HadRound::new(perm, masks.clone(), p, 0.5).unwrap();
    let r_id = HadRound::new(ident, masks, p, 0.5).unwrap();
    let mut y = vec![0.0f32; d];
    let mut z = x.clone();
    for k in available() {
        let a = t(20000, || {
            (k.had_round)(std::hint::black_box(&x), &r, &mut y);
            std::hint::black_box(&y);
        });
        let b = t(20000, || {
            (k.had_round)(std::hint::black_box(&x), &r_id, &mut y);
            std::hint::black_box(&y);
        });
        let c = t(20000, || {
            (k.fwht)(std::hint::black_box(&mut z[..512]));
            std::hint::black_box(&z);
        });
        println!("{}: round {a:.0} ns, round with identity gather {b:.0} ns, fwht512 {c:.0} ns", k.name);
    }
}
