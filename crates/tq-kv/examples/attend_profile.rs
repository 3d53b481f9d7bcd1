//! Profiling driver (for `perf`): decode attention of one SmolLM2-shaped step
//! over a cache filled with random rows, repeated; prints the best time.
//! Real-model timings are `tq kv bench`.
//! `cargo run --release -p tq-kv --example attend_profile -- tq-mse-4 8192 20`
use tq_kv::{cache_for, KvGeometry};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let spec = a.get(1).map(String::as_str).unwrap_or("tq-mse-4");
    let ctx: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(8192);
    let reps: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(20);
    let shape = KvGeometry { layers: 30, q_heads: 3, kv_heads: 3, head_dim: 64 };
    let d = 64;
    let mut c = cache_for(shape, &spec.parse::<tq_kv::KvSpec>().unwrap(), 0).unwrap();
    let mut s = 1u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for _ in 0..ctx {
        for l in 0..30 {
            for h in 0..3 {
                let k: Vec<f32> = (0..d).map(|_| rnd()).collect();
                let v: Vec<f32> = (0..d).map(|_| rnd()).collect();
                c.append(l, h, &k, &v);
            }
        }
    }
    let qs: Vec<f32> = (0..3 * d).map(|_| rnd() * 4.0).collect();
    let mut out = vec![0.0f32; 3 * d];
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = std::time::Instant::now();
        for l in 0..30 {
            for h in 0..3 {
                c.attend_group(l, h, &qs, 3, ctx, &mut out);
            }
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("{spec} ctx {ctx}: best {best:.2} ms per decode step ({})", out[0]);
}
