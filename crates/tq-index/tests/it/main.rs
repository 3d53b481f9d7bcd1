//! tq-index integration tests. Vectors here are seeded Gaussians: these tests
//! check index mechanics against brute force over the same codes (an exact
//! answer), not recall quality (that is `tq bench search` on real data).

mod durability;
mod hostile;
mod search;
mod writers;

use tq_core::rng::Xoshiro256;

pub fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut r = Xoshiro256::new(seed);
    (0..n * dim).map(|_| r.gaussian() as f32).collect()
}
