//! Byte-exact fingerprints of every registry codec (codes, decodes, scores,
//! fast-scan tables, attention accumulation) and matrix codec, compared with
//! the recorded `fingerprints.txt`: a refactoring must not change a bit.
//! `TQ_BLESS=1` rewrites the file (only for an intended format change).

use tq_core::matrix::{build_matrix, matrix_registry, Axis};
use tq_core::rng::Xoshiro256;
use tq_core::{registry, Codec, RotationKind};

fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut r = Xoshiro256::new(seed);
    (0..n * dim).map(|_| (r.gaussian() * 3.0) as f32).collect()
}

struct Fnv(u64);
impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ x as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn f32s(&mut self, v: &[f32]) {
        for x in v {
            self.bytes(&x.to_bits().to_le_bytes());
        }
    }
}

fn fingerprint(c: &dyn Codec, n: usize) -> u64 {
    let d = c.dim();
    let xs = data(n, d, 11);
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    let mut codes = vec![0u8; n * c.code_size()];
    c.encode_batch(&xs, &mut codes).unwrap();
    h.bytes(&codes);
    let mut dec = vec![0.0f32; xs.len()];
    c.decode_batch(&codes, &mut dec).unwrap();
    h.f32s(&dec);
    for qi in 0..2 {
        let q = c.prepare(&data(1, d, 100 + qi)).unwrap();
        let s: Vec<f32> = codes.chunks_exact(c.code_size()).flat_map(|k| [c.score_ip(&q, k), c.score_l2(&q, k)]).collect();
        h.f32s(&s);
        let mut many = vec![0.0f32; n];
        c.score_ip_many(&q, &codes, &mut many);
        h.f32s(&many);
        if c.fastscan_m().is_some() {
            h.f32s(&c.fastscan_tables(&q));
            let f: Vec<f32> = codes.chunks_exact(c.code_size()).map(|k| c.fastscan_factor(k)).collect();
            h.f32s(&f);
        }
    }
    let mut acc = vec![0.0f32; d];
    for (i, k) in codes.chunks_exact(c.code_size()).enumerate() {
        c.accumulate(k, 0.5 + i as f32 * 0.01, &mut acc);
    }
    c.finish_accumulated(&mut acc);
    h.f32s(&acc);
    if let Some(v) = c.codebook_view() {
        h.bytes(&[v.bits as u8]);
        h.f32s(v.table);
        h.bytes(&v.packed.to_le_bytes());
    }
    h.0
}

/// Every registry entry's id, name, kind, sizes and texts, as recorded.
#[test]
fn registry_entries_match_the_recorded_list() {
    let mut got = String::new();
    for e in registry() {
        let sizes: Vec<usize> = [2usize, 4, 9, 48, 64, 100, 128, 130, 1536].iter().map(|&d| e.code_size(d)).collect();
        got += &format!("{} {} {:?} {sizes:?} {} {} | {} | {}\n", e.id, e.name, e.kind, e.nominal_bits(), e.min_dim(), e.code_size_formula(), e.description());
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/registry.txt");
    if std::env::var_os("TQ_BLESS").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    assert_eq!(got, std::fs::read_to_string(path).expect("recorded registry"));
}

#[test]
fn codes_and_scores_match_the_recorded_fingerprints() {
    let mut lines = Vec::new();
    for e in registry() {
        for (dim, rot) in [(64usize, RotationKind::Hadamard), (100, RotationKind::Hadamard), (48, RotationKind::Haar)] {
            let mut c = e.build(dim, 7, rot, &[]).unwrap();
            if c.wants_training() {
                c.train(&data(300, dim, 5)).unwrap();
            }
            lines.push(format!("{} {dim} {} {:016x}", e.name, rot.name(), fingerprint(c.as_ref(), 80)));
        }
    }
    for e in matrix_registry() {
        for axis in [Axis::PerChannel, Axis::PerToken] {
            let mut c = build_matrix(&e.name, 64, axis, 7).unwrap();
            c.train(&data(300, 64, 5)).unwrap();
            let m = data(70, 64, 11);
            let mut out = vec![0u8; c.encoded_size(70)];
            c.encode(&m, &mut out).unwrap();
            let mut dec = vec![0.0f32; m.len()];
            c.decode(&out, 70, &mut dec).unwrap();
            let mut h = Fnv(0xcbf2_9ce4_8422_2325);
            h.bytes(&out);
            h.f32s(&dec);
            lines.push(format!("{} 64 {axis:?} {:016x}", e.name, h.0));
        }
    }
    check_recorded(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/fingerprints.txt"), &lines);
}

/// Dimensions that are not powers of two (three Hadamard rounds over two
/// overlapping blocks with permutations; their rotation has its own kernels)
/// and a power of two beside them: codes, decodes and scores as recorded in
/// `fingerprints-dims.txt`, for codecs that rotate forward (encode, queries)
/// and back (decode, attention).
#[test]
fn non_power_of_two_dims_match_the_recorded_fingerprints() {
    let mut lines = Vec::new();
    for name in ["tq-mse-4-nc", "tq-mse-2", "tq-mse-8", "tq-mse-3.5", "tq-prod-3-orth", "rabitq-4"] {
        for dim in [50usize, 100, 384, 512, 576, 768, 1536, 3072] {
            let c = tq_core::build(name, dim, 7, RotationKind::Hadamard).unwrap();
            lines.push(format!("{name} {dim} {:016x}", fingerprint(c.as_ref(), 24)));
        }
    }
    check_recorded(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/fingerprints-dims.txt"), &lines);
}

/// Compares fingerprint `lines` with the ones recorded in `path`, line by
/// line (`TQ_BLESS=1` records them first).
fn check_recorded(path: &str, lines: &[String]) {
    let got = lines.join("\n") + "\n";
    if std::env::var_os("TQ_BLESS").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path).expect("recorded fingerprints");
    for (g, w) in got.lines().zip(want.lines()) {
        assert_eq!(g, w, "a codec's bytes or scores changed");
    }
    assert_eq!(got.lines().count(), want.lines().count());
}
