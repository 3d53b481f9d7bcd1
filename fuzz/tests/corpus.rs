//! The committed corpus: `write_seeds` (ignored; run it by name) writes the
//! seed files with the libraries themselves from small seeded inputs, plus a
//! few truncated and bit-flipped variants; `replay_corpus` runs every target
//! over its corpus and over `fuzz/regressions/<target>/` (reproducers of fixed
//! findings) under plain `cargo test`, without libFuzzer or sanitizers.
//!
//! ```text
//! cd fuzz && cargo test --test corpus -- --ignored write_seeds   # rewrite the seeds
//! cd fuzz && cargo test --test corpus                            # replay
//! ```

use std::path::{Path, PathBuf};

use tq_core::rng::Xoshiro256;
use tq_core::RotationKind;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn gaussian(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut r = Xoshiro256::new(seed);
    (0..n * dim).map(|_| r.gaussian() as f32).collect()
}

/// The valid file and its variants: cut in half, cut by one byte, one bit flipped in the header.
fn variants(name: &str, b: &[u8], out: &mut Vec<(String, Vec<u8>)>) {
    out.push((format!("{name}"), b.to_vec()));
    out.push((format!("{name}.half"), b[..b.len() / 2].to_vec()));
    out.push((format!("{name}.short1"), b[..b.len() - 1].to_vec()));
    let mut f = b.to_vec();
    let at = 17.min(f.len() - 1);
    f[at] ^= 0x10;
    out.push((format!("{name}.flip"), f));
}

fn tqc_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let cases: &[(&str, usize, RotationKind)] = &[
        ("tq-mse-4", 16, RotationKind::Hadamard),
        ("tq-mse-1-nc", 12, RotationKind::Haar),
        ("tq-prod-3", 8, RotationKind::Hadamard),
        ("tq-prod-2-orth", 8, RotationKind::Haar),
        ("tq-mse-2.5", 16, RotationKind::Hadamard),
        ("rabitq-1", 16, RotationKind::Hadamard),
        ("rabitq-4", 10, RotationKind::Hadamard),
        ("pq-2", 16, RotationKind::Hadamard),
        ("q8_0", 32, RotationKind::Hadamard),
        ("q4_0-rot", 40, RotationKind::Hadamard),
        ("mxfp4", 32, RotationKind::Hadamard),
        ("nvfp4", 20, RotationKind::Hadamard),
        ("polar-3", 16, RotationKind::Hadamard),
    ];
    for (k, &(name, dim, rot)) in cases.iter().enumerate() {
        let mut codec = tq_core::build(name, dim, 7 + k as u64, rot).unwrap();
        let n = 3;
        if codec.wants_training() {
            codec.train(&gaussian(300, dim, 100 + k as u64)).unwrap();
        }
        let xs = gaussian(n, dim, k as u64);
        let mut codes = vec![0u8; n * codec.code_size()];
        codec.encode_batch(&xs, &mut codes).unwrap();
        let f = tq_data::tqc::CodeFile {
            codec_name: name.to_string(),
            rotation: rot,
            dim,
            count: n,
            seed: codec.seed(),
            code_size: codec.code_size(),
            params: codec.params(),
            codes,
        };
        let b = tq_data::tqc::tqc_bytes(&f).unwrap();
        assert_eq!(tq_data::tqc::parse_tqc(&b).unwrap(), f);
        if k < 3 {
            variants(name, &b, &mut out);
        } else {
            out.push((name.to_string(), b));
        }
    }
    out
}

fn npy_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let m = tq_data::vectors::Matrix { rows: 3, cols: 4, data: gaussian(3, 4, 1) };
    variants("f4-3x4", &tq_data::vectors::npy_bytes(&m), &mut out);
    // hand-written headers the writer does not produce: f8, Fortran order, 1-D, version 2
    let npy = |major: u8, header: &str, payload: &[u8]| {
        let mut h = header.to_string();
        let pre = if major == 1 { 10 } else { 12 };
        let total = pre + h.len() + 1;
        h.push_str(&" ".repeat((64 - total % 64) % 64));
        h.push('\n');
        let mut b = b"\x93NUMPY".to_vec();
        b.extend_from_slice(&[major, 0]);
        if major == 1 {
            b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        } else {
            b.extend_from_slice(&(h.len() as u32).to_le_bytes());
        }
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(payload);
        b
    };
    let f8: Vec<u8> = (0..6).flat_map(|i| (i as f64 * 0.5 - 1.0).to_le_bytes()).collect();
    let f4: Vec<u8> = (0..5).flat_map(|i| (i as f32 - 2.0).to_le_bytes()).collect();
    out.push(("f8-fortran-2x3".into(), npy(1, "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }", &f8)));
    out.push(("f4-1d-v2".into(), npy(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }", &f4)));
    out.push(("float32-v3".into(), npy(3, "{'descr': 'float32', 'fortran_order': False, 'shape': (1, 5), }", &f4)));
    out.push(("i4-unsupported".into(), npy(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (5,), }", &f4)));
    out
}

fn fvecs_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut b = Vec::new();
    for x in gaussian(3, 4, 2).chunks(4) {
        b.extend_from_slice(&4i32.to_le_bytes());
        x.iter().for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
    }
    variants("3x4", &b, &mut out);
    let mut one = 1i32.to_le_bytes().to_vec();
    one.extend_from_slice(&1.5f32.to_le_bytes());
    out.push(("1x1".into(), one));
    out
}

fn kv_calib_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (k, shape) in
        [tq_kv::KvGeometry { layers: 1, q_heads: 1, kv_heads: 1, head_dim: 4 }, tq_kv::KvGeometry { layers: 2, q_heads: 1, kv_heads: 1, head_dim: 6 }]
            .into_iter()
            .enumerate()
    {
        let mut st = tq_kv::CalibrationStats::new(shape);
        let d = shape.head_dim;
        let mut r = Xoshiro256::new(k as u64);
        for _ in 0..40 {
            for i in 0..shape.layers * shape.kv_heads {
                let key: Vec<f32> = (0..d).map(|_| r.gaussian() as f32 + 0.2).collect();
                let q: Vec<f32> = (0..d).map(|j| r.gaussian() as f32 * (j + 1) as f32).collect();
                st.add_key(i, &key);
                st.add_query(i, &q);
            }
        }
        let c = st.finish(0.1, "seed text").unwrap();
        let b = c.to_bytes();
        assert_eq!(tq_kv::KeyCalibration::from_bytes(&b).unwrap(), c);
        variants(&format!("{}x{}x{}", shape.layers, shape.kv_heads, d), &b, &mut out);
    }
    out
}

fn tqi_seeds() -> Vec<(String, Vec<u8>)> {
    use tq_index::file::{self, AnyIndex, Appender};
    use tq_index::{FlatIndex, IndexSpec, IvfIndex, Metric, RawVectors};
    let mut out = Vec::new();
    let dim = 16;
    let ids: Vec<u64> = (0..6).collect();
    let xs = gaussian(6, dim, 3);
    // flat, fast-scan codec
    let mut flat = AnyIndex::Flat(FlatIndex::new(IndexSpec::new("tq-mse-4", dim, Metric::Ip)).unwrap());
    flat.add(&ids, &xs).unwrap();
    variants("flat-mse4-ip", &file::to_bytes(&flat), &mut out);
    // flat, plain codec, raw f16 copies, cosine
    let mut spec = IndexSpec::new("tq-prod-2", dim, Metric::Cosine);
    spec.raw = RawVectors::F16;
    spec.rotation = RotationKind::Haar;
    let mut f2 = AnyIndex::Flat(FlatIndex::new(spec).unwrap());
    f2.add(&ids[..3], &xs[..3 * dim]).unwrap();
    out.push(("flat-prod2-cos-f16".into(), file::to_bytes(&f2)));
    // IVF with 2 lists, L2
    let ivf = IvfIndex::train(IndexSpec::new("tq-mse-2", dim, Metric::L2), 2, &gaussian(40, dim, 4), 5).unwrap();
    let mut ivf = AnyIndex::Ivf(ivf);
    ivf.add(&ids, &xs).unwrap();
    variants("ivf2-mse2-l2", &file::to_bytes(&ivf), &mut out);
    // a flat file with appended ADD and REMOVE records (both commit slots used)
    let dir = std::env::temp_dir().join(format!("tq-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("appended.tqi");
    let mut idx = AnyIndex::Flat(FlatIndex::new(IndexSpec::new("tq-mse-3", dim, Metric::Ip)).unwrap());
    idx.add(&ids[..2], &xs[..2 * dim]).unwrap();
    file::save(&idx, &path).unwrap();
    let (mut idx, commit) = file::load(&path).unwrap();
    let mut app = Appender::new(&path, commit);
    app.append_add(&idx.add(&ids[2..4], &xs[2 * dim..4 * dim]).unwrap()).unwrap();
    app.append_remove(&idx.remove(&[1]).unwrap()).unwrap();
    out.push(("flat-mse3-appended".into(), std::fs::read(&path).unwrap()));
    std::fs::remove_dir_all(&dir).unwrap();
    out
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "tqc" => tqc_seeds(),
        "npy" => npy_seeds(),
        "fvecs" => fvecs_seeds(),
        "kv_calib" => kv_calib_seeds(),
        "tqi" => tqi_seeds(),
        _ => unreachable!(),
    }
}

#[test]
#[ignore = "rewrites fuzz/corpus/; run by name"]
fn write_seeds() {
    for (target, _) in tq_fuzz::target::ALL {
        let dir = root().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds(target) {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
}

/// The valid seeds still parse (so a format change shows up here first).
#[test]
fn seeds_are_valid() {
    for (name, b) in tqc_seeds().iter().filter(|(n, _)| !n.contains('.')) {
        tq_data::tqc::parse_tqc(b).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, b) in tqi_seeds().iter().filter(|(n, _)| !n.contains('.')) {
        tq_index::file::from_bytes(b, Path::new(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn replay_corpus() {
    for (target, run) in tq_fuzz::target::ALL {
        let mut n = 0;
        for sub in ["corpus", "regressions"] {
            let Ok(dir) = std::fs::read_dir(root().join(sub).join(target)) else { continue };
            for e in dir {
                let p = e.unwrap().path();
                run(&std::fs::read(&p).unwrap());
                n += 1;
            }
        }
        assert!(n > 0, "no corpus for {target}");
    }
}
