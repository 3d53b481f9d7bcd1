//! Seeded k-means (L2, Lloyd iterations) for PQ codebooks and IVF partitions.
//!
//! Deterministic for a given input and seed on any thread count: the
//! assignment step runs in parallel but each point's assignment is independent,
//! and the centroid sums are accumulated in point order in f64.

use rayon::prelude::*;

use crate::kernels::kernels;
use crate::rng::Xoshiro256;

/// Squared L2 norms of the rows of `m` (`dim` columns).
pub fn row_norms(m: &[f32], dim: usize) -> Vec<f32> {
    let sum_sq = kernels().sum_sq;
    m.chunks_exact(dim).map(sum_sq).collect()
}

/// Index of the nearest centroid in L2 (ties to the lower index), computed as
/// the smallest `‖c‖² − 2⟨x, c⟩` (`norms[c] = ‖c‖²`).
pub fn nearest(cent: &[f32], norms: &[f32], dim: usize, x: &[f32]) -> usize {
    let mut best = (f32::INFINITY, 0);
    if dim <= 16 {
        // short sub-vectors (PQ): an inlined loop beats a kernel call per centroid
        for (c, row) in cent.chunks_exact(dim).enumerate() {
            let mut s = 0.0f32;
            for (a, b) in x.iter().zip(row) {
                s += a * b;
            }
            let d = norms[c] - 2.0 * s;
            if d < best.0 {
                best = (d, c);
            }
        }
        return best.1;
    }
    let dot = kernels().dot;
    for (c, row) in cent.chunks_exact(dim).enumerate() {
        let d = norms[c] - 2.0 * dot(x, row);
        if d < best.0 {
            best = (d, c);
        }
    }
    best.1
}

/// `k` centroids (`k × dim`, row-major) of the rows of `data`. Initial
/// centroids are distinct rows picked with `seed` (rows are repeated when
/// there are fewer rows than `k`); an empty cluster restarts at a seeded random row.
pub fn kmeans(data: &[f32], dim: usize, k: usize, iters: usize, seed: u64) -> Vec<f32> {
    let n = data.len() / dim;
    assert!(n > 0 && k > 0, "k-means needs data and k > 0");
    let mut rng = Xoshiro256::new(seed);
    let mut pick: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + rng.below((n - i) as u64) as usize;
        pick.swap(i, j);
    }
    let mut cent: Vec<f32> = (0..k).flat_map(|i| data[pick[i % n] * dim..(pick[i % n] + 1) * dim].to_vec()).collect();
    for _ in 0..iters {
        let norms = row_norms(&cent, dim);
        let assign: Vec<usize> = data.par_chunks(dim).map(|x| nearest(&cent, &norms, dim, x)).collect();
        let mut sum = vec![0.0f64; k * dim];
        let mut cnt = vec![0usize; k];
        for (x, &a) in data.chunks_exact(dim).zip(&assign) {
            cnt[a] += 1;
            for (s, &v) in sum[a * dim..(a + 1) * dim].iter_mut().zip(x) {
                *s += v as f64;
            }
        }
        for c in 0..k {
            let row = &mut cent[c * dim..(c + 1) * dim];
            if cnt[c] > 0 {
                for (o, s) in row.iter_mut().zip(&sum[c * dim..(c + 1) * dim]) {
                    *o = (*s / cnt[c] as f64) as f32;
                }
            } else {
                let r = rng.below(n as u64) as usize;
                row.copy_from_slice(&data[r * dim..(r + 1) * dim]);
            }
        }
    }
    cent
}
