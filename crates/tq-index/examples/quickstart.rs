//! Encode, decode and search with TurboQuant codes (the README's Rust example).
//!
//! `cargo run --release -p tq-index --example quickstart`

use tq_core::rng::Xoshiro256;
use tq_core::{build, Codec, RotationKind};
use tq_index::{FlatIndex, IndexSpec, Metric, SearchParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dim, n) = (128, 10_000);
    let mut rng = Xoshiro256::new(42);
    let data: Vec<f32> = (0..n).flat_map(|_| rng.unit_vector(dim)).collect();

    // A codec: no training, fixed-size codes (68 bytes at d = 128, 4.25 bits per value).
    let codec: Box<dyn Codec> = build("tq-mse-4", dim, 0, RotationKind::Hadamard)?;
    let mut code = vec![0u8; codec.code_size()];
    let mut back = vec![0f32; dim];
    codec.encode(&data[..dim], &mut code)?;
    codec.decode(&code, &mut back)?;
    let err: f32 = data[..dim].iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum();
    println!("{}: {} bytes per vector, ‖x − x̂‖² = {err:.4}", codec.name(), codec.code_size());

    // A flat index over the same kind of codes, searched by inner product.
    let mut index = FlatIndex::new(IndexSpec::new("tq-mse-4-nc", dim, Metric::Ip))?;
    let ids: Vec<u64> = (0..n as u64).collect();
    index.add(&ids, &data)?;
    let hits = index.search(&data[7 * dim..8 * dim], 5, &SearchParams::default())?;
    for h in &hits {
        println!("id {:>5}  score {:.3}", h.id, h.score);
    }
    assert_eq!(hits[0].id, 7);
    Ok(())
}
