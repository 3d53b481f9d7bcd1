//! Seeded, platform-independent random numbers.
//!
//! Everything that is baked into stored codes (rotation signs, Haar matrices,
//! QJL projections) draws from [`Xoshiro256`], seeded through SplitMix64, and
//! Gaussians come from a Box–Muller transform evaluated with the pure-Rust
//! `libm` crate, so the same seed gives the same bits on every machine.

/// SplitMix64 step; used to expand a `u64` seed into generator state and to
/// derive independent sub-seeds (`derive_seed`).
#[inline]
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives an independent seed for a named purpose (e.g. the QJL projection
/// of a codec whose rotation uses `seed`).
pub fn derive_seed(seed: u64, purpose: u64) -> u64 {
    let mut s = seed ^ purpose.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    splitmix64(&mut s)
}

/// The seed of the value side of a KV cache whose key side uses `seed`
/// (keys and values must not share a rotation). Every cache — CPU and GPU —
/// derives it here, so their codes agree.
pub fn kv_value_seed(seed: u64) -> u64 {
    derive_seed(seed, 0x56)
}

/// xoshiro256** by Blackman and Vigna.
#[derive(Clone, Debug)]
pub struct Xoshiro256 {
    s: [u64; 4],
    cached_gaussian: Option<f64>,
}

impl Xoshiro256 {
    /// A generator whose state is four SplitMix64 outputs from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)];
        Self { s, cached_gaussian: None }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n) (Lemire's multiply-shift, unbiased by rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        loop {
            let x = self.next_u64();
            let m = (x as u128) * (n as u128);
            let lo = m as u64;
            if lo >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Standard normal (Box–Muller, both outputs used).
    pub fn gaussian(&mut self) -> f64 {
        if let Some(g) = self.cached_gaussian.take() {
            return g;
        }
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        let r = libm::sqrt(-2.0 * libm::log(u1));
        let (s, c) = (libm::sin(2.0 * core::f64::consts::PI * u2), libm::cos(2.0 * core::f64::consts::PI * u2));
        self.cached_gaussian = Some(r * s);
        r * c
    }

    /// A uniformly random unit vector in `dim` dimensions (normalized Gaussian).
    pub fn unit_vector(&mut self, dim: usize) -> Vec<f32> {
        let g: Vec<f64> = (0..dim).map(|_| self.gaussian()).collect();
        let n = g.iter().map(|v| v * v).sum::<f64>().sqrt();
        g.iter().map(|v| (v / n) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_moments() {
        let mut r = Xoshiro256::new(7);
        let n = 200_000;
        let (mut s1, mut s2) = (0.0, 0.0);
        for _ in 0..n {
            let g = r.gaussian();
            s1 += g;
            s2 += g * g;
        }
        let mean = s1 / n as f64;
        let var = s2 / n as f64 - mean * mean;
        // stderr of the mean is 1/sqrt(n) ≈ 0.0022; of the variance sqrt(2/n) ≈ 0.0032
        assert!(mean.abs() < 5.0 / (n as f64).sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(), "var {var}");
    }

    #[test]
    fn below_is_in_range_and_covers() {
        let mut r = Xoshiro256::new(1);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let v = r.below(7) as usize;
            seen[v] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
