//! The Hadamard rotation of dimensions that are not powers of two on real
//! embeddings (GloVe-50, d = 50; SmolLM2-135M token embeddings, d = 576):
//! every kernel path gives the bits of the step-by-step reference, and
//! `tq encode` writes the files the construction has always written (FNV-1a
//! of the `.tqc` bytes recorded from the encoder before its round kernels).

use super::{tmpdir, tq, write_npy};
use tq_core::kernels::available;
use tq_core::rotation::Hadamard;

/// Every `step`-th row of a dataset, at most 2,000.
fn rows(name: &str, step: usize) -> (usize, Vec<f32>) {
    let m = tq_llm::datasets::load(name, true, &|_, _| {}).unwrap_or_else(|e| panic!("cannot load {name}: {e}"));
    let d = m.cols;
    let data: Vec<f32> = m.data.chunks_exact(d).step_by(step).take(2000).flatten().copied().collect();
    (d, data)
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
}

#[test]
fn real_embeddings_rotate_and_encode_as_recorded() {
    let recorded = [
        ("glove50", 200, [("tq-mse-4-nc", 0x1ae0_8a83_87cc_5e30u64), ("tq-mse-2", 0xbb25_e805_71ba_db2f), ("rabitq-4", 0xaecb_d627_0e12_5bfa)]),
        ("smollm-embed", 24, [("tq-mse-4-nc", 0xbde0_e848_38d2_e0d8), ("tq-mse-2", 0xe7db_0447_4538_2097), ("rabitq-4", 0xeb6a_b944_2e05_a0e8)]),
    ];
    let dir = tmpdir("rotation-real");
    for (name, step, codecs) in recorded {
        let (d, data) = rows(name, step);
        assert!(!d.is_power_of_two() && data.len() == 2000 * d, "{name}: {} values of dimension {d}", data.len());
        for seed in [0u64, 7] {
            let h = Hadamard::new(d, seed);
            let mut s = vec![0.0f32; d];
            let mut y = vec![0.0f32; d];
            for x in data.chunks_exact(d).step_by(4) {
                let mut want = x.to_vec();
                h.rotate_ref(&mut want, &mut s);
                let mut back = want.clone();
                h.unrotate_ref(&mut back, &mut s);
                for k in available() {
                    h.rotate_into_with(k, x, &mut y, &mut s);
                    assert!(y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} {}: rotation differs", k.name);
                    h.unrotate_with(k, &mut y, &mut s);
                    assert!(y.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} {}: inverse rotation differs", k.name);
                }
            }
        }
        let input = dir.join(format!("{name}.npy"));
        write_npy(&input, 2000, d, &data);
        for (codec, want) in codecs {
            let out = dir.join(format!("{name}-{codec}.tqc"));
            let o = tq(&["encode", "--codec", codec, "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap()]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert_eq!(fnv(&std::fs::read(&out).unwrap()), want, "{name} {codec}: the encoded file changed");
        }
    }
}
