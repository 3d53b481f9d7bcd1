//! Random rotations: a seeded randomized Hadamard transform (fast, default) and
//! a dense Haar rotation (QR of a seeded Gaussian matrix; the paper-exact mode).
//!
//! ## Randomized Hadamard for any dimension
//! Let `p` be the largest power of two `<= dim`. One *round* multiplies by
//! random signs (one per coordinate), permutes the coordinates by a seeded
//! random permutation (only when `dim` is not a power of two), then applies the orthonormal Walsh–Hadamard
//! matrix `H_p/√p` to the block `[0, p)` and, when `dim` is not a power of two,
//! again to the overlapping block `[dim-p, dim)`. Every step is orthogonal, so
//! the composition is. Powers of two from 64 up use 2 rounds (`H D₂ H D₁`);
//! other dimensions 3 rounds, so that every output coordinate depends on every
//! input (and small powers of two rarely map a basis vector to a basis vector).
//! Cost: `rounds · (dim + 2·p·log₂ p)` flops. Below 8 dimensions the signed
//! Hadamard blocks form a small discrete group and mix poorly: use `haar` there.
//!
//! Kernels: a round of a non-power of two is one `Kernels::had_round` call
//! (the sign flips folded into the permutation: `x'[j] = x[perm[j]] ^
//! sign[perm[j]]`, one vector gather, then both scaled block FWHTs), the
//! rounds alternating between two buffers; [`Hadamard::rotate_ref`] and
//! [`Hadamard::unrotate_ref`] keep the construction step by step as the
//! oracle the kernels are tested against (bit for bit).
//!
//! Determinism: signs come from xoshiro256** seeded by the rotation seed; the
//! butterflies are exact IEEE adds/subtracts in a fixed order on every kernel
//! path, so the same seed gives bit-identical output on every machine and
//! thread count.
//!
//! WARNING: the rotation (kind, seed, and this construction) is baked into
//! stored codes. Changing it requires a new file-format version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Result, TqError};
use crate::kernels::{kernels, scalar, HadRound, Kernels};
use crate::rng::Xoshiro256;

/// Which random rotation a codec uses (stored in file headers by [`RotationKind::id`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RotationKind {
    /// Seeded randomized Hadamard transform (fast, the default).
    Hadamard,
    /// Dense Haar rotation (QR of a seeded Gaussian matrix; the paper-exact mode).
    Haar,
}

impl RotationKind {
    /// The name accepted by `from_str`: `hadamard` or `haar`.
    pub fn name(self) -> &'static str {
        match self {
            RotationKind::Hadamard => "hadamard",
            RotationKind::Haar => "haar",
        }
    }
    /// Stable numeric id (`hadamard` 0, `haar` 1).
    pub fn id(self) -> u8 {
        match self {
            RotationKind::Hadamard => 0,
            RotationKind::Haar => 1,
        }
    }
    /// The kind of a numeric id, `None` if unknown.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            0 => Some(RotationKind::Hadamard),
            1 => Some(RotationKind::Haar),
            _ => None,
        }
    }
}

impl std::str::FromStr for RotationKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "hadamard" => Ok(RotationKind::Hadamard),
            "haar" => Ok(RotationKind::Haar),
            _ => Err(format!("unknown rotation '{s}' (expected hadamard or haar)")),
        }
    }
}

/// Seeded randomized Hadamard transform for any `dim >= 2`.
#[derive(Clone, Debug)]
pub struct Hadamard {
    dim: usize,
    block: usize,
    /// Per round, a sign mask per coordinate (0 or 0x8000_0000, XORed into the f32 bits).
    signs: Vec<Vec<u32>>,
    /// Non-powers of two: per round, a permutation applied after the signs
    /// (`x'[j] = x[perm[j]]`), so that the two overlapping blocks mix well.
    perms: Vec<Vec<u32>>,
    scale: f32,
    /// Powers of two: the single final scale `block^(-rounds/2)`.
    total: f32,
    /// Non-powers of two: per round, the signs and permutation as one
    /// gather (`x'[j] = x[perm[j]] ^ sign[perm[j]]`) with the block transforms
    /// (`Kernels::had_round`).
    fwd: Vec<HadRound>,
    /// Non-powers of two: per round, the inverse gather (`x[i] = x'[perm⁻¹[i]] ^
    /// sign[i]`) after the transposed block transforms (`Kernels::had_round_t`).
    inv: Vec<HadRound>,
}

impl Hadamard {
    /// The transform for `dim` seeded by `seed` (2 rounds for powers of two `>= 64`, else 3).
    pub fn new(dim: usize, seed: u64) -> Self {
        let block = if dim.is_power_of_two() { dim } else { dim.next_power_of_two() / 2 };
        let rounds = if dim.is_power_of_two() && dim >= 64 { 2 } else { 3 };
        let mut rng = Xoshiro256::new(seed);
        let signs: Vec<Vec<u32>> = (0..rounds).map(|_| (0..dim).map(|_| if rng.next_u64() >> 63 == 1 { 0x8000_0000 } else { 0 }).collect()).collect();
        let perms = if dim == block {
            Vec::new()
        } else {
            (0..rounds)
                .map(|_| {
                    // Fisher–Yates with the same generator
                    let mut p: Vec<u32> = (0..dim as u32).collect();
                    for i in (1..dim).rev() {
                        p.swap(i, rng.below(i as u64 + 1) as usize);
                    }
                    p
                })
                .collect()
        };
        let total = (block as f64).powf(-(rounds as f64) / 2.0) as f32;
        let scale = (1.0 / (block as f64).sqrt()) as f32;
        let (mut fwd, mut inv) = (Vec::new(), Vec::new());
        for (s, p) in signs.iter().zip(&perms) {
            let masks = p.iter().map(|&j| s[j as usize]).collect();
            fwd.push(HadRound::new(p.clone(), masks, block, scale).expect("a permutation of 0..dim"));
            let mut q = vec![0u32; dim];
            for (j, &pj) in p.iter().enumerate() {
                q[pj as usize] = j as u32;
            }
            inv.push(HadRound::new(q, s.clone(), block, scale).expect("a permutation of 0..dim"));
        }
        Self { dim, block, signs, perms, scale, total, fwd, inv }
    }

    /// Number of rounds (2 or 3).
    pub fn rounds(&self) -> usize {
        self.signs.len()
    }

    fn apply_signs(x: &mut [f32], s: &[u32]) {
        for (v, &m) in x.iter_mut().zip(s) {
            *v = f32::from_bits(v.to_bits() ^ m);
        }
    }

    fn block_transform(&self, fwht: fn(&mut [f32]), x: &mut [f32]) {
        let p = self.block;
        fwht(&mut x[..p]);
        for v in &mut x[..p] {
            *v *= self.scale;
        }
        if self.dim != p {
            let off = self.dim - p;
            fwht(&mut x[off..]);
            for v in &mut x[off..] {
                *v *= self.scale;
            }
        }
    }

    fn block_transform_t(&self, fwht: fn(&mut [f32]), x: &mut [f32]) {
        let p = self.block;
        if self.dim != p {
            let off = self.dim - p;
            fwht(&mut x[off..]);
            for v in &mut x[off..] {
                *v *= self.scale;
            }
        }
        fwht(&mut x[..p]);
        for v in &mut x[..p] {
            *v *= self.scale;
        }
    }

    /// Powers of two: all rounds unscaled, then one multiply by `p^(-rounds/2)`
    /// (a power of two when `rounds` is even, so the result equals per-round scaling).
    fn pow2_rounds(&self, fwht: fn(&mut [f32]), x: &mut [f32], reverse: bool) {
        if reverse {
            for s in self.signs.iter().rev() {
                fwht(x);
                Self::apply_signs(x, s);
            }
        } else {
            for s in &self.signs {
                Self::apply_signs(x, s);
                fwht(x);
            }
        }
        let total = self.total;
        x.iter_mut().for_each(|v| *v *= total);
    }

    /// For a power of two with two rounds: the sign masks of both rounds and the
    /// final scale, for the fused encode kernel (`Kernels::had2_quantize`).
    pub fn two_round_pow2(&self) -> Option<(&[u32], &[u32], f32)> {
        (self.dim == self.block && self.signs.len() == 2 && self.dim >= 8).then(|| (&self.signs[0][..], &self.signs[1][..], self.total))
    }

    /// `x ← Π x`; `scratch` holds `dim` floats (used for the permutations).
    pub fn rotate_in_place(&self, x: &mut [f32], scratch: &mut [f32]) {
        self.rotate_with(kernels(), x, scratch)
    }

    /// `x ← Πᵀ x`.
    pub fn unrotate_in_place(&self, x: &mut [f32], scratch: &mut [f32]) {
        self.unrotate_with(kernels(), x, scratch)
    }

    /// [`Hadamard::rotate_in_place`] on the kernel table `k` (every table gives the same bits).
    pub fn rotate_with(&self, k: &Kernels, x: &mut [f32], scratch: &mut [f32]) {
        if self.dim == self.block && self.signs.len() == 2 {
            return self.pow2_rounds(k.fwht, x, false);
        }
        if self.fwd.is_empty() {
            return self.rotate_steps(k.fwht, x, scratch);
        }
        let (x, t) = (&mut x[..self.dim], &mut scratch[..self.dim]);
        // rounds alternate between the two buffers; the result lands in `x`
        for (r, round) in self.fwd.iter().enumerate() {
            if r.is_multiple_of(2) {
                (k.had_round)(x, round, t);
            } else {
                (k.had_round)(t, round, x);
            }
        }
        if !self.fwd.len().is_multiple_of(2) {
            x.copy_from_slice(t);
        }
    }

    /// `y ← Π x` (`x`, `y`, `scratch`: `dim` floats), on the kernel table `k`:
    /// [`Hadamard::rotate_with`] without the copies.
    pub fn rotate_into_with(&self, k: &Kernels, x: &[f32], y: &mut [f32], scratch: &mut [f32]) {
        if self.fwd.is_empty() || self.dim == self.block {
            y.copy_from_slice(x);
            return self.rotate_with(k, y, scratch);
        }
        let (y, t) = (&mut y[..self.dim], &mut scratch[..self.dim]);
        // round i writes `y` when an even number of rounds follows it
        let rounds = self.fwd.len();
        for (i, round) in self.fwd.iter().enumerate() {
            match (i == 0, (rounds - 1 - i).is_multiple_of(2)) {
                (true, true) => (k.had_round)(x, round, y),
                (true, false) => (k.had_round)(x, round, t),
                (false, true) => (k.had_round)(t, round, y),
                (false, false) => (k.had_round)(y, round, t),
            }
        }
    }

    /// [`Hadamard::unrotate_in_place`] on the kernel table `k` (every table gives the same bits).
    pub fn unrotate_with(&self, k: &Kernels, x: &mut [f32], scratch: &mut [f32]) {
        if self.dim == self.block && self.signs.len() == 2 {
            return self.pow2_rounds(k.fwht, x, true);
        }
        if self.inv.is_empty() {
            return self.unrotate_steps(k.fwht, x, scratch);
        }
        let (x, t) = (&mut x[..self.dim], &mut scratch[..self.dim]);
        for (r, round) in self.inv.iter().rev().enumerate() {
            if r.is_multiple_of(2) {
                (k.had_round_t)(x, round, t);
            } else {
                (k.had_round_t)(t, round, x);
            }
        }
        if !self.inv.len().is_multiple_of(2) {
            x.copy_from_slice(t);
        }
    }

    /// `x ← Π x` as the construction states it, one step at a time (signs,
    /// permutation, the two block transforms, on the scalar FWHT): the
    /// reference the round kernels are tested against.
    pub fn rotate_ref(&self, x: &mut [f32], scratch: &mut [f32]) {
        self.rotate_steps(scalar::fwht_ref, x, scratch)
    }

    fn rotate_steps(&self, fwht: fn(&mut [f32]), x: &mut [f32], scratch: &mut [f32]) {
        for (r, s) in self.signs.iter().enumerate() {
            Self::apply_signs(x, s);
            if let Some(p) = self.perms.get(r) {
                scratch[..self.dim].copy_from_slice(x);
                for (o, &j) in x.iter_mut().zip(p) {
                    *o = scratch[j as usize];
                }
            }
            self.block_transform(fwht, x);
        }
    }

    /// `x ← Πᵀ x` step by step (the reference of [`Hadamard::unrotate_in_place`]).
    pub fn unrotate_ref(&self, x: &mut [f32], scratch: &mut [f32]) {
        self.unrotate_steps(scalar::fwht_ref, x, scratch)
    }

    fn unrotate_steps(&self, fwht: fn(&mut [f32]), x: &mut [f32], scratch: &mut [f32]) {
        for (r, s) in self.signs.iter().enumerate().rev() {
            self.block_transform_t(fwht, x);
            if let Some(p) = self.perms.get(r) {
                scratch[..self.dim].copy_from_slice(x);
                for (&v, &j) in scratch.iter().zip(p) {
                    x[j as usize] = v;
                }
            }
            Self::apply_signs(x, s);
        }
    }
}

/// A dense seeded `dim × dim` matrix, stored row-major and transposed so that
/// both `M x` and `Mᵀ y` are column-axpy loops (element-wise mul/add in a fixed
/// order: deterministic and auto-vectorized). Cached per `(kind, dim, seed)`.
#[derive(Debug)]
pub struct DenseMatrix {
    dim: usize,
    m: Vec<f32>,
    mt: Vec<f32>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum DenseKind {
    Haar,
    Gaussian,
}

impl DenseMatrix {
    /// Haar-distributed rotation: Gram–Schmidt (twice, in f64) of a seeded
    /// Gaussian matrix, i.e. the Q of its QR decomposition with positive R
    /// diagonal, which is exactly Haar. `O(dim³)` to build; refused above
    /// [`crate::limits::MAX_DENSE_DIM`].
    pub fn haar(dim: usize, seed: u64) -> Result<Arc<DenseMatrix>> {
        crate::limits::check_dense("a Haar rotation", dim, "the Hadamard rotation (rotation = hadamard)")?;
        Ok(Self::cached(DenseKind::Haar, dim, seed))
    }

    /// Independent uniformly random unit rows (i.i.d. N(0,1) rows, normalized):
    /// the paper's QJL matrix with its row scale removed. Refused above
    /// [`crate::limits::MAX_DENSE_DIM`].
    pub fn random_directions(dim: usize, seed: u64) -> Result<Arc<DenseMatrix>> {
        crate::limits::check_dense("a Gaussian QJL projection", dim, "the orthogonal QJL projection (tq-prod-B-orth)")?;
        Ok(Self::cached(DenseKind::Gaussian, dim, seed))
    }

    fn cached(kind: DenseKind, dim: usize, seed: u64) -> Arc<DenseMatrix> {
        type Cache = Mutex<HashMap<(DenseKind, usize, u64), Arc<DenseMatrix>>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(h) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&(kind, dim, seed)) {
            return h.clone();
        }
        let rows = match kind {
            DenseKind::Haar => Self::haar_rows(dim, seed),
            DenseKind::Gaussian => {
                let mut rng = Xoshiro256::new(seed);
                (0..dim)
                    .map(|_| {
                        let g: Vec<f64> = (0..dim).map(|_| rng.gaussian()).collect();
                        let n = g.iter().map(|x| x * x).sum::<f64>().sqrt();
                        g.iter().map(|x| x / n).collect()
                    })
                    .collect()
            }
        };
        let mut m = vec![0.0f32; dim * dim];
        let mut mt = vec![0.0f32; dim * dim];
        for i in 0..dim {
            for j in 0..dim {
                m[i * dim + j] = rows[i][j] as f32;
                mt[j * dim + i] = rows[i][j] as f32;
            }
        }
        let h = Arc::new(DenseMatrix { dim, m, mt });
        cache.lock().unwrap_or_else(|e| e.into_inner()).insert((kind, dim, seed), h.clone());
        h
    }

    fn haar_rows(dim: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = Xoshiro256::new(seed);
        let mut rows: Vec<Vec<f64>> = Vec::with_capacity(dim);
        for _ in 0..dim {
            let mut v: Vec<f64> = (0..dim).map(|_| rng.gaussian()).collect();
            for _pass in 0..2 {
                for r in &rows {
                    let p: f64 = r.iter().zip(&v).map(|(a, b)| a * b).sum();
                    for (x, &y) in v.iter_mut().zip(r) {
                        *x -= p * y;
                    }
                }
            }
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter_mut().for_each(|x| *x /= n);
            rows.push(v);
        }
        rows
    }

    /// `out = Σ_j x_j · (column j of A)` where `cols` holds A's columns row-major.
    fn axpy_columns(cols: &[f32], dim: usize, x: &[f32], out: &mut [f32]) {
        out.iter_mut().for_each(|v| *v = 0.0);
        for (j, &xj) in x.iter().enumerate() {
            let col = &cols[j * dim..(j + 1) * dim];
            for (o, &c) in out.iter_mut().zip(col) {
                *o += xj * c;
            }
        }
    }

    /// `out = M x`.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        Self::axpy_columns(&self.mt, self.dim, x, out)
    }

    /// `out = Mᵀ y`.
    pub fn apply_t(&self, y: &[f32], out: &mut [f32]) {
        Self::axpy_columns(&self.m, self.dim, y, out)
    }
}

/// A rotation of `R^dim` (see the module docs).
#[derive(Clone, Debug)]
pub enum Rotation {
    /// Randomized Hadamard transform.
    Hadamard(Hadamard),
    /// Dense Haar rotation matrix (shared).
    Haar(Arc<DenseMatrix>),
}

impl Rotation {
    /// The rotation of `kind` for `dim` (`>= 2`, within `limits`) seeded by `seed`.
    pub fn new(kind: RotationKind, dim: usize, seed: u64) -> Result<Self> {
        if dim < 2 {
            return Err(TqError::BadDim(dim, 2));
        }
        crate::limits::check_dim("dim", dim)?;
        Ok(match kind {
            RotationKind::Hadamard => Rotation::Hadamard(Hadamard::new(dim, seed)),
            RotationKind::Haar => Rotation::Haar(DenseMatrix::haar(dim, seed)?),
        })
    }

    /// Which kind of rotation this is.
    pub fn kind(&self) -> RotationKind {
        match self {
            Rotation::Hadamard(_) => RotationKind::Hadamard,
            Rotation::Haar(_) => RotationKind::Haar,
        }
    }

    /// Dimension rotated.
    pub fn dim(&self) -> usize {
        match self {
            Rotation::Hadamard(h) => h.dim,
            Rotation::Haar(h) => h.dim,
        }
    }

    /// See `Hadamard::two_round_pow2`.
    pub fn two_round_pow2(&self) -> Option<(&[u32], &[u32], f32)> {
        match self {
            Rotation::Hadamard(h) => h.two_round_pow2(),
            Rotation::Haar(_) => None,
        }
    }

    /// `x ← Π x`; `scratch` must hold `dim` floats.
    pub fn rotate_in_place(&self, x: &mut [f32], scratch: &mut [f32]) {
        match self {
            Rotation::Hadamard(h) => h.rotate_in_place(x, scratch),
            Rotation::Haar(h) => {
                h.apply(x, scratch);
                x.copy_from_slice(&scratch[..x.len()]);
            }
        }
    }

    /// `y ← Π x` (the bits of `rotate_in_place` on a copy of `x`); `scratch` must hold `dim` floats.
    pub fn rotate_into(&self, x: &[f32], y: &mut [f32], scratch: &mut [f32]) {
        match self {
            Rotation::Hadamard(h) => h.rotate_into_with(kernels(), x, y, scratch),
            Rotation::Haar(h) => h.apply(x, y),
        }
    }

    /// `x ← Πᵀ x`.
    pub fn unrotate_in_place(&self, x: &mut [f32], scratch: &mut [f32]) {
        match self {
            Rotation::Hadamard(h) => h.unrotate_in_place(x, scratch),
            Rotation::Haar(h) => {
                h.apply_t(x, scratch);
                x.copy_from_slice(&scratch[..x.len()]);
            }
        }
    }

    /// Convenience: `Π x` into a new vector.
    pub fn rotate(&self, x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        let mut s = vec![0.0; x.len()];
        self.rotate_in_place(&mut y, &mut s);
        y
    }

    /// Convenience: `Πᵀ y` into a new vector.
    pub fn unrotate(&self, y: &[f32]) -> Vec<f32> {
        let mut x = y.to_vec();
        let mut s = vec![0.0; y.len()];
        self.unrotate_in_place(&mut x, &mut s);
        x
    }
}
