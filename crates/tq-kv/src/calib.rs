//! Calibrated key transforms: one linear map per (layer, KV head), learned
//! offline from the f32 run of a calibration text, that makes a key codec's
//! error cost less attention.
//!
//! A rotation-based codec's error on `x` is (close to) isotropic in the
//! rotated domain with a variance ∝ ‖x‖², so a score's error `q·(k − k̂)` has
//! a variance ∝ E‖q‖²·E‖k − μ‖² (after centering). Encoding `k' = T(k − μ)`
//! and scoring with `q' = T⁻¹q` (T symmetric) leaves the exact score
//! `q'·k' = q·(k − μ)` unchanged but makes the error variance
//! ∝ tr(T⁻²Σq)·tr(T²Σk). Its minimum over T is at T² = Σk⁻¹ # Σq (the matrix
//! geometric mean), which balances the query and key energy in every
//! direction; with isotropic Σq and Σk it is the identity (plain TurboQuant).
//! The offset μ is subtracted as with `--center-keys` (exact for softmax).
//!
//! The statistics come from a different text than the one evaluated; the
//! transforms are static per model (like its weights): nothing is learned
//! from the tokens being cached, and every key is still encoded once, on
//! arrival.

use crate::KvGeometry;
use tq_core::{Result, TqError};

/// Magic and version of the calibration file format.
const MAGIC: &[u8; 8] = b"TQKVCAL\0";
const VERSION: u32 = 1;

/// The key transforms of one model.
#[derive(Clone, PartialEq)]
pub struct KeyCalibration {
    /// The model's KV geometry (layers, KV heads, head dimension).
    pub shape: KvGeometry,
    /// Shrinkage toward a scaled identity applied to both covariances.
    pub shrink: f32,
    /// Tokens of keys the statistics were taken from (per stream).
    pub tokens: u64,
    /// What the statistics came from (a text name), for reports.
    pub source: String,
    /// per stream: μ (d)
    mu: Vec<f32>,
    /// per stream: T (d×d, row-major, symmetric)
    t: Vec<f32>,
    /// per stream: T⁻¹
    t_inv: Vec<f32>,
}

impl std::fmt::Debug for KeyCalibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCalibration")
            .field("shape", &self.shape)
            .field("shrink", &self.shrink)
            .field("tokens", &self.tokens)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl KeyCalibration {
    /// Stream `i`'s key offset μ.
    pub fn mu(&self, i: usize) -> &[f32] {
        let d = self.shape.head_dim;
        &self.mu[i * d..(i + 1) * d]
    }
    /// Stream `i`'s transform T (row-major d×d).
    pub fn t(&self, i: usize) -> &[f32] {
        let d = self.shape.head_dim;
        &self.t[i * d * d..(i + 1) * d * d]
    }
    /// Stream `i`'s T⁻¹ (row-major d×d).
    pub fn t_inv(&self, i: usize) -> &[f32] {
        let d = self.shape.head_dim;
        &self.t_inv[i * d * d..(i + 1) * d * d]
    }
    /// The calibration of layer `layer` alone (a one-layer geometry), for a
    /// cache that holds one layer.
    pub fn layer(&self, layer: usize) -> Result<Self> {
        let (h, d) = (self.shape.kv_heads, self.shape.head_dim);
        if layer >= self.shape.layers {
            return Err(TqError::BadParams(format!("key calibration has {} layers, not layer {layer}", self.shape.layers)));
        }
        let (a, b) = (layer * h, (layer + 1) * h);
        Ok(Self {
            shape: KvGeometry { layers: 1, ..self.shape },
            shrink: self.shrink,
            tokens: self.tokens,
            source: self.source.clone(),
            mu: self.mu[a * d..b * d].to_vec(),
            t: self.t[a * d * d..b * d * d].to_vec(),
            t_inv: self.t_inv[a * d * d..b * d * d].to_vec(),
        })
    }
    /// Bytes of the transforms and offsets (static per model, like weights).
    pub fn bytes(&self) -> usize {
        4 * (self.mu.len() + self.t.len() + self.t_inv.len())
    }

    /// The file image: magic, version, geometry, shrink, tokens, source,
    /// the three arrays as f32 LE, then a CRC-32 of everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.bytes());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        for x in [self.shape.layers, self.shape.kv_heads, self.shape.head_dim] {
            b.extend_from_slice(&(x as u32).to_le_bytes());
        }
        b.extend_from_slice(&self.shrink.to_le_bytes());
        b.extend_from_slice(&self.tokens.to_le_bytes());
        b.extend_from_slice(&(self.source.len() as u32).to_le_bytes());
        b.extend_from_slice(self.source.as_bytes());
        for x in self.mu.iter().chain(&self.t).chain(&self.t_inv) {
            b.extend_from_slice(&x.to_le_bytes());
        }
        let crc = tq_io::crc32(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a file image (magic, version, sizes, checksum, finite values).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |m: String| TqError::BadParams(format!("key calibration: {m}"));
        if b.len() < MAGIC.len() + 4 || &b[..MAGIC.len()] != MAGIC {
            return Err(bad("not a calibration file (bad magic)".into()));
        }
        let mut r = tq_io::LeReader::new(&b[MAGIC.len()..]);
        let trunc = |e: tq_io::Truncated| bad(format!("truncated in {}", e.field));
        let version = r.u32("the version").map_err(trunc)?;
        if version != VERSION {
            return Err(bad(format!("unsupported version {version} (this build reads version {VERSION})")));
        }
        let layers = r.u32("the geometry").map_err(trunc)? as usize;
        let kv_heads = r.u32("the geometry").map_err(trunc)? as usize;
        let head_dim = r.u32("the geometry").map_err(trunc)? as usize;
        let shrink = r.f32("the shrink").map_err(trunc)?;
        let tokens = r.u64("the token count").map_err(trunc)?;
        let slen = r.u32("the source name").map_err(trunc)? as usize;
        let mut at = MAGIC.len() + r.position();
        if layers == 0 || kv_heads == 0 || head_dim == 0 || layers * kv_heads > 1 << 20 || head_dim > 4096 {
            return Err(bad(format!("implausible geometry {layers} layers × {kv_heads} KV heads × {head_dim}")));
        }
        let n = layers * kv_heads;
        let floats = n * head_dim * (1 + 2 * head_dim);
        let need = at + slen + 4 * floats + 4;
        if b.len() != need {
            return Err(bad(format!("{} bytes where the header implies {need} (truncated or trailing data)", b.len())));
        }
        let crc = u32::from_le_bytes(b[need - 4..].try_into().unwrap());
        if crc != tq_io::crc32(&b[..need - 4]) {
            return Err(bad("checksum mismatch (corrupt file)".into()));
        }
        let source = String::from_utf8(b[at..at + slen].to_vec()).map_err(|_| bad("source name is not UTF-8".into()))?;
        at += slen;
        let vals: Vec<f32> = b[at..need - 4].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        if !vals.iter().all(|x| x.is_finite()) || !shrink.is_finite() {
            return Err(bad("non-finite values".into()));
        }
        let (mu, rest) = vals.split_at(n * head_dim);
        let (t, t_inv) = rest.split_at(n * head_dim * head_dim);
        // T and T⁻¹ must be inverses (an all-zero or garbled transform with a
        // valid checksum would silently destroy every key)
        let d = head_dim;
        for (i, (ti, ui)) in t.chunks_exact(d * d).zip(t_inv.chunks_exact(d * d)).enumerate() {
            for r in 0..d {
                for c in 0..d {
                    let p: f64 = (0..d).map(|k| ti[r * d + k] as f64 * ui[k * d + c] as f64).sum();
                    let want = if r == c { 1.0 } else { 0.0 };
                    if (p - want).abs() > 1e-2 {
                        return Err(bad(format!(
                            "stream {i}: T·T⁻¹ differs from the identity at ({r}, {c}) by {:.3} (corrupt or not a calibration)",
                            p - want
                        )));
                    }
                }
            }
        }
        Ok(Self {
            shape: KvGeometry { layers, q_heads: kv_heads, kv_heads, head_dim },
            shrink,
            tokens,
            source,
            mu: mu.to_vec(),
            t: t.to_vec(),
            t_inv: t_inv.to_vec(),
        })
    }

    /// Checks that the calibration was made for `shape` (layers, KV heads and
    /// head_dim: a calibration is per KV stream, the file does not store the
    /// query heads).
    pub fn check_shape(&self, shape: KvGeometry) -> Result<()> {
        let key = |g: KvGeometry| (g.layers, g.kv_heads, g.head_dim);
        if key(self.shape) != key(shape) {
            return Err(TqError::BadParams(format!(
                "key calibration is for {} layers × {} KV heads × head_dim {}, the model has {} × {} × {}",
                self.shape.layers, self.shape.kv_heads, self.shape.head_dim, shape.layers, shape.kv_heads, shape.head_dim
            )));
        }
        Ok(())
    }
}

/// Accumulates key and query statistics per stream (f64 sums).
pub struct CalibrationStats {
    shape: KvGeometry,
    nk: Vec<u64>,
    sk: Vec<f64>,
    kk: Vec<f64>,
    nq: Vec<u64>,
    qq: Vec<f64>,
}

impl CalibrationStats {
    /// Empty statistics for every (layer, KV head) stream of `shape`.
    pub fn new(shape: KvGeometry) -> Self {
        let (n, d) = (shape.layers * shape.kv_heads, shape.head_dim);
        Self { shape, nk: vec![0; n], sk: vec![0.0; n * d], kk: vec![0.0; n * d * d], nq: vec![0; n], qq: vec![0.0; n * d * d] }
    }
    /// A key of stream `i` (non-finite keys are skipped).
    pub fn add_key(&mut self, i: usize, k: &[f32]) {
        let d = self.shape.head_dim;
        if k.len() != d || !k.iter().all(|x| x.is_finite()) {
            return;
        }
        self.nk[i] += 1;
        self.sk[i * d..(i + 1) * d].iter_mut().zip(k).for_each(|(s, &x)| *s += x as f64);
        outer_add(&mut self.kk[i * d * d..(i + 1) * d * d], k);
    }
    /// A query that attends stream `i` (non-finite queries are skipped).
    pub fn add_query(&mut self, i: usize, q: &[f32]) {
        let d = self.shape.head_dim;
        if q.len() != d || !q.iter().all(|x| x.is_finite()) {
            return;
        }
        self.nq[i] += 1;
        outer_add(&mut self.qq[i * d * d..(i + 1) * d * d], q);
    }

    /// The transforms (see the module docs), with both covariances shrunk
    /// toward tr(Σ)/d·I by `shrink` ∈ [0, 1). T is scaled to mean eigenvalue 1.
    pub fn finish(&self, shrink: f32, source: &str) -> Result<KeyCalibration> {
        if !(0.0..1.0).contains(&shrink) {
            return Err(TqError::BadParams(format!("shrink {shrink} is outside [0, 1)")));
        }
        let (n, d) = (self.shape.layers * self.shape.kv_heads, self.shape.head_dim);
        let min = (0..n).map(|i| self.nk[i].min(self.nq[i])).min().unwrap_or(0);
        if min < 2 {
            return Err(TqError::BadParams("key calibration needs at least 2 keys and 2 queries per stream".into()));
        }
        let mut mu = Vec::with_capacity(n * d);
        let mut t = Vec::with_capacity(n * d * d);
        let mut t_inv = Vec::with_capacity(n * d * d);
        for i in 0..n {
            let nk = self.nk[i] as f64;
            let m: Vec<f64> = self.sk[i * d..(i + 1) * d].iter().map(|s| s / nk).collect();
            let mut sk: Vec<f64> = self.kk[i * d * d..(i + 1) * d * d].iter().map(|s| s / nk).collect();
            for r in 0..d {
                for c in 0..d {
                    sk[r * d + c] -= m[r] * m[c];
                }
            }
            let sq: Vec<f64> = self.qq[i * d * d..(i + 1) * d * d].iter().map(|s| s / self.nq[i] as f64).collect();
            let (sk, sq) = (shrunk(&sk, d, shrink as f64), shrunk(&sq, d, shrink as f64));
            // T² = Σk^{-1/2} (Σk^{1/2} Σq Σk^{1/2})^{1/2} Σk^{-1/2}
            let (kh, kih) = (sym_pow(&sk, d, 0.5), sym_pow(&sk, d, -0.5));
            let mid = sym_pow(&symmetrize(&matmul(&matmul(&kh, &sq, d), &kh, d), d), d, 0.5);
            let t2 = symmetrize(&matmul(&matmul(&kih, &mid, d), &kih, d), d);
            let (vals, vecs) = jacobi_eigen(&t2, d);
            let mean = vals.iter().map(|l| l.max(0.0).sqrt()).sum::<f64>() / d as f64;
            if !(mean.is_finite() && mean > 0.0) || vals.iter().any(|l| l.is_nan() || *l <= 0.0) {
                return Err(TqError::BadParams(format!("key calibration: stream {i} has a singular covariance (raise the shrink)")));
            }
            let ti = from_eigen(&vals.iter().map(|l| l.sqrt() / mean).collect::<Vec<_>>(), &vecs, d);
            let tii = from_eigen(&vals.iter().map(|l| mean / l.sqrt()).collect::<Vec<_>>(), &vecs, d);
            mu.extend(m.iter().map(|&x| x as f32));
            t.extend(ti.iter().map(|&x| x as f32));
            t_inv.extend(tii.iter().map(|&x| x as f32));
        }
        let tokens = self.nk.iter().copied().min().unwrap_or(0);
        Ok(KeyCalibration { shape: self.shape, shrink, tokens, source: source.to_string(), mu, t, t_inv })
    }
}

fn outer_add(m: &mut [f64], x: &[f32]) {
    let d = x.len();
    for (r, &a) in x.iter().enumerate() {
        let a = a as f64;
        m[r * d..(r + 1) * d].iter_mut().zip(x).for_each(|(s, &b)| *s += a * b as f64);
    }
}

fn shrunk(s: &[f64], d: usize, a: f64) -> Vec<f64> {
    let tr = (0..d).map(|r| s[r * d + r]).sum::<f64>() / d as f64;
    let mut o: Vec<f64> = s.iter().map(|x| (1.0 - a) * x).collect();
    (0..d).for_each(|r| o[r * d + r] += a * tr);
    o
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut o = vec![0.0; d * d];
    for r in 0..d {
        for k in 0..d {
            let x = a[r * d + k];
            o[r * d..(r + 1) * d].iter_mut().zip(&b[k * d..(k + 1) * d]).for_each(|(s, &y)| *s += x * y);
        }
    }
    o
}

fn symmetrize(a: &[f64], d: usize) -> Vec<f64> {
    let mut o = a.to_vec();
    for r in 0..d {
        for c in 0..d {
            o[r * d + c] = 0.5 * (a[r * d + c] + a[c * d + r]);
        }
    }
    o
}

/// U·diag(vals)·Uᵀ from eigenvectors in the columns of `vecs`.
fn from_eigen(vals: &[f64], vecs: &[f64], d: usize) -> Vec<f64> {
    let mut o = vec![0.0; d * d];
    for r in 0..d {
        for c in 0..d {
            o[r * d + c] = (0..d).map(|k| vecs[r * d + k] * vals[k] * vecs[c * d + k]).sum();
        }
    }
    o
}

/// S^p of a symmetric positive definite matrix.
fn sym_pow(s: &[f64], d: usize, p: f64) -> Vec<f64> {
    let (vals, vecs) = jacobi_eigen(s, d);
    let floor = vals.iter().cloned().fold(0.0f64, f64::max) * 1e-12;
    from_eigen(&vals.iter().map(|&l| l.max(floor).powf(p)).collect::<Vec<_>>(), &vecs, d)
}

/// Eigenvalues and eigenvectors (columns) of a symmetric matrix, by cyclic
/// Jacobi rotations (deterministic, accurate to rounding for the small
/// matrices here).
pub fn jacobi_eigen(s: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = s.to_vec();
    let mut v = vec![0.0; d * d];
    (0..d).for_each(|r| v[r * d + r] = 1.0);
    for _sweep in 0..100 {
        let off: f64 = (0..d).flat_map(|r| (0..d).filter(move |&c| c != r).map(move |c| (r, c))).map(|(r, c)| a[r * d + c] * a[r * d + c]).sum();
        let diag: f64 = (0..d).map(|r| a[r * d + r] * a[r * d + r]).sum();
        if off <= 1e-30 * diag.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|r| a[r * d + r]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    #[test]
    fn jacobi_reconstructs_and_is_orthogonal() {
        let d = 24;
        let mut s = 7u64;
        let b: Vec<f64> = (0..d * d).map(|_| rng(&mut s)).collect();
        let m = symmetrize(&matmul(&b, &b, d), d);
        let (vals, vecs) = jacobi_eigen(&m, d);
        let r = from_eigen(&vals, &vecs, d);
        let err = r.iter().zip(&m).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-10, "reconstruction error {err}");
        let vtv = matmul(&(0..d * d).map(|k| vecs[(k % d) * d + k / d]).collect::<Vec<_>>(), &vecs, d);
        let orth = (0..d * d).map(|k| (vtv[k] - if k % (d + 1) == 0 { 1.0 } else { 0.0 }).abs()).fold(0.0, f64::max);
        assert!(orth < 1e-10, "orthogonality error {orth}");
    }

    /// The optimum balances query and key energy: with diagonal
    /// covariances, T² = diag(√(σq/σk)) up to scale, and T·T⁻¹ = I.
    #[test]
    fn diagonal_statistics_give_the_balancing_scale() {
        let shape = KvGeometry { layers: 1, q_heads: 1, kv_heads: 1, head_dim: 4 };
        let mut st = CalibrationStats::new(shape);
        let (sk, sq) = ([4.0f32, 1.0, 0.25, 1.0], [1.0f32, 1.0, 1.0, 16.0]);
        // ± each axis: means 0, covariances exactly diag(σ²)
        for j in 0..4 {
            for sign in [1.0f32, -1.0] {
                let mut k = [0.0f32; 4];
                k[j] = sign * sk[j].sqrt() * 2.0;
                st.add_key(0, &k);
                let mut q = [0.0f32; 4];
                q[j] = sign * sq[j].sqrt() * 2.0;
                st.add_query(0, &q);
            }
        }
        let c = st.finish(0.0, "test").unwrap();
        let t = c.t(0);
        let want: Vec<f64> = (0..4).map(|j| ((sq[j] / sk[j]) as f64).powf(0.25)).collect();
        let mean = want.iter().sum::<f64>() / 4.0;
        for j in 0..4 {
            assert!((t[j * 4 + j] as f64 - want[j] / mean).abs() < 1e-5, "T[{j}{j}] = {}", t[j * 4 + j]);
        }
        let prod = matmul(&c.t(0).iter().map(|&x| x as f64).collect::<Vec<_>>(), &c.t_inv(0).iter().map(|&x| x as f64).collect::<Vec<_>>(), 4);
        for (k, p) in prod.iter().enumerate() {
            assert!((p - if k % 5 == 0 { 1.0 } else { 0.0 }).abs() < 1e-5);
        }
        assert!(c.mu(0).iter().all(|&m| m.abs() < 1e-6));
    }

    #[test]
    fn file_round_trip_and_bad_files() {
        let shape = KvGeometry { layers: 2, q_heads: 1, kv_heads: 1, head_dim: 8 };
        let mut st = CalibrationStats::new(shape);
        let mut s = 3u64;
        for _ in 0..50 {
            for i in 0..2 {
                let k: Vec<f32> = (0..8).map(|_| rng(&mut s) as f32 + 0.3).collect();
                let q: Vec<f32> = (0..8).map(|j| rng(&mut s) as f32 * (j + 1) as f32).collect();
                st.add_key(i, &k);
                st.add_query(i, &q);
            }
        }
        let c = st.finish(0.1, "unit").unwrap();
        let b = c.to_bytes();
        assert_eq!(KeyCalibration::from_bytes(&b).unwrap(), c);
        let msg = |b: &[u8]| KeyCalibration::from_bytes(b).unwrap_err().to_string();
        assert!(msg(&b[..b.len() - 1]).contains("truncated"));
        assert!(msg(&b[..5]).contains("magic"));
        let mut x = b.clone();
        x[40] ^= 1;
        assert!(msg(&x).contains("checksum"));
        let mut x = b.clone();
        x[8] = 9;
        assert!(msg(&x).contains("version"));
        assert!(c.check_shape(KvGeometry { layers: 2, q_heads: 1, kv_heads: 1, head_dim: 16 }).unwrap_err().to_string().contains("head_dim"));
        assert!(CalibrationStats::new(shape).finish(0.1, "x").unwrap_err().to_string().contains("at least 2"));
    }
}
