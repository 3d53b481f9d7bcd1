//! tq-index integration tests. Vectors here are seeded Gaussians: these tests
//! check index mechanics against brute force over the same codes (an exact
//! answer), not recall quality (that is `tq bench search` on real data).

mod durability;
mod hostile;
mod search;
mod writers;

use std::sync::{Mutex, MutexGuard};

use tq_core::rng::Xoshiro256;

/// Held by every test that runs child processes, so they do not run at the
/// same time: `killed_writers_leave_old_or_new_content` times its kills from
/// an undisturbed child's lifetime, which another test's children would skew.
pub fn processes_alone() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut r = Xoshiro256::new(seed);
    (0..n * dim).map(|_| r.gaussian() as f32).collect()
}
