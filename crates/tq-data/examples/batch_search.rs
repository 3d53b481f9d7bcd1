//! One batched flat search on real vectors, timed (best of `reps`), for profiling:
//! `cargo run -p tq-data --release --example batch_search -- FILE.npy [codec] [reps] [queries]`.
//! Rows are scaled to unit norm; the first `queries` rows of a seeded permutation
//! are the queries, the rest the base (inner product, k = 10). Prints µs per
//! query and a checksum of every (id, score bits) of the results (equal
//! checksums: identical results). `FRONT=1` also times the front end
//! (rotation, float tables, quantized tables).

use std::time::Instant;

use tq_core::rng::Xoshiro256;
use tq_index::{FlatIndex, IndexSpec, Metric, SearchParams};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let path = a.get(1).expect("usage: batch_search FILE.npy [codec] [reps] [queries]");
    let codec = a.get(2).map(String::as_str).unwrap_or("tq-mse-4-nc");
    let reps: usize = a.get(3).map(|s| s.parse().expect("reps")).unwrap_or(3);
    let nq: usize = a.get(4).map(|s| s.parse().expect("queries")).unwrap_or(1000);
    let mut m = tq_data::vectors::read_vectors(std::path::Path::new(path)).expect("vectors");
    let d = m.cols;
    for r in m.data.chunks_exact_mut(d) {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= n);
    }
    let mut perm: Vec<usize> = (0..m.rows).collect();
    let mut rng = Xoshiro256::new(7);
    for i in (1..perm.len()).rev() {
        perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let rows = |ix: &[usize]| ix.iter().flat_map(|&i| m.data[i * d..(i + 1) * d].iter().copied()).collect::<Vec<f32>>();
    let (qs, base) = (rows(&perm[..nq]), rows(&perm[nq..]));
    let n = m.rows - nq;
    let mut idx = FlatIndex::new(IndexSpec::new(codec, d, Metric::Ip)).expect("index");
    let ids: Vec<u64> = (0..n as u64).collect();
    let t = Instant::now();
    idx.add(&ids, &base).expect("add");
    eprintln!("{codec}: {n} × {d}, built in {:.2} s, kernels {}", t.elapsed().as_secs_f64(), tq_core::kernels::kernels().name);
    if std::env::var("FRONT").is_ok() {
        front_end(&idx, &qs);
        front_end(&idx, &qs);
    }
    let p = SearchParams::default();
    let mut best = f64::INFINITY;
    let mut check = 0u64;
    for _ in 0..reps {
        let t = Instant::now();
        let res = idx.search_batch(&qs, 10, &p).expect("search");
        best = best.min(t.elapsed().as_secs_f64());
        check = res.iter().flatten().fold(0u64, |h, x| h.wrapping_mul(1_000_003).wrapping_add(x.id ^ x.score.to_bits() as u64));
    }
    println!("{codec} threads={} µs/query={:.1} checksum={check:016x}", rayon::current_num_threads(), best * 1e6 / nq as f64);
}

/// Per-query costs of the search's front end (µs/query, one thread): query
/// preparation (rotation), float tables, quantized tables; then the two table
/// builds for one query repeated (hot caches).
fn front_end(idx: &FlatIndex, qs: &[f32]) {
    let d = idx.dim();
    let nq = (qs.len() / d) as f64;
    let t = Instant::now();
    let pqs: Vec<_> = qs.chunks_exact(d).map(|q| idx.prepare(q).expect("query")).collect();
    let t1 = t.elapsed().as_secs_f64();
    let tabs: Vec<Vec<f32>> = pqs.iter().map(|pq| idx.codec().fastscan_tables(pq)).collect();
    let t2 = t.elapsed().as_secs_f64();
    let luts: Vec<_> = tabs.iter().map(|t| tq_core::fastscan::QuantizedLut::new(t)).collect();
    let t3 = t.elapsed().as_secs_f64();
    std::hint::black_box(luts);
    let t = Instant::now();
    for _ in 0..1000 {
        std::hint::black_box(idx.codec().fastscan_tables(std::hint::black_box(&pqs[0])));
    }
    let t4 = t.elapsed().as_secs_f64();
    for _ in 0..1000 {
        std::hint::black_box(tq_core::fastscan::QuantizedLut::new(std::hint::black_box(&tabs[0])));
    }
    let t5 = t.elapsed().as_secs_f64();
    eprintln!("hot, one query repeated: float tables {:.1}, quantized {:.1} µs", t4 * 1e3, (t5 - t4) * 1e3);
    eprintln!("front end µs/query: prepare {:.1}, float tables {:.1}, quantized tables {:.1}", t1 * 1e6 / nq, (t2 - t1) * 1e6 / nq, (t3 - t2) * 1e6 / nq);
}
