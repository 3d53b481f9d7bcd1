//! Fast-scan kernel throughput: one query per block call (`fastscan_block`)
//! against many queries per pass (`fastscan_multi`), on every kernel path this
//! CPU has, over a tile of codes that fits L2; prints ns per (query, vector)
//! and the ratio, best of 20 interleaved runs.
//!
//! `cargo run -p tq-core --release --example fastscan_multi [dim] [blocks] [queries]`
//! (timings of code bytes do not depend on their values: the codes are random).
use std::time::Instant;
use tq_core::kernels::available;
use tq_core::rng::Xoshiro256;

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).map_or(d, |s| s.parse().expect("a number"));
    let (dim, nb, nq) = (arg(1, 576), arg(2, 28), arg(3, 12));
    let bb = 16 * dim; // tq-mse-4: one 4-bit sub-code per coordinate
    let mut rng = Xoshiro256::new(1);
    let blocks: Vec<u8> = (0..nb * bb).map(|_| rng.below(256) as u8).collect();
    let qmax = (65535 / (dim / 2)).min(255) as u64;
    let tables: Vec<u8> = (0..nq * bb).map(|_| rng.below(qmax + 1) as u8).collect();
    let mut out = vec![0u32; nq * nb * 32];
    println!("d = {dim}, {nb} blocks of 32 codes, {nq} queries");
    for k in available() {
        let (mut one, mut multi) = (f64::MAX, f64::MAX);
        for _ in 0..20 {
            let t = Instant::now();
            for q in 0..nq {
                for b in 0..nb {
                    let mut o = [0u32; 32];
                    (k.fastscan_block)(&blocks[b * bb..(b + 1) * bb], &tables[q * bb..(q + 1) * bb], &mut o);
                    std::hint::black_box(o);
                }
            }
            one = one.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            (k.fastscan_multi)(&blocks, &tables, bb, &mut out);
            std::hint::black_box(&out);
            multi = multi.min(t.elapsed().as_secs_f64());
        }
        let per = 1e9 / (nq * nb * 32) as f64;
        println!("{:>7}: block {:.2} ns, multi {:.2} ns per (query, vector): {:.2}× faster", k.name, one * per, multi * per, one / multi);
    }
}
