use tq_core::registry::lookup;
use tq_core::TqError;
use tq_kv::plan::{model, vram, Weights};
use tq_kv::{KvSpec, Store};

#[test]
fn kv_bytes_per_token_are_exact() {
    // SmolLM2: 30 layers, 3 KV heads of 64; f16 = 22.5 KiB per token (REFERENCE §3)
    let f16 = KvSpec::parse("f16").unwrap();
    assert_eq!(f16.bytes_per_token_per_layer(3, 64).unwrap() * 30.0, 23_040.0);
    let t4 = KvSpec::parse("tq-mse-4").unwrap();
    assert_eq!(t4.bytes_per_token_per_layer(3, 64).unwrap(), 3.0 * 2.0 * 34.0); // 32 B of indices + bf16 norm
    assert_eq!(t4.bits_per_value(64).unwrap(), 4.25);
    assert_eq!(t4.bits_per_value(128).unwrap(), 4.125);
    assert_eq!(KvSpec::parse("tq-mse-4-nc").unwrap().bits_per_value(64).unwrap(), 4.25);
    let k4v3 = KvSpec::parse("k4v3").unwrap();
    assert_eq!((k4v3.keys, k4v3.values), (Store::Codec(lookup("tq-mse-4").unwrap()), Store::Codec(lookup("tq-mse-3").unwrap())));
    assert_eq!(k4v3.bits_per_value(128).unwrap(), (66.0 + 50.0) * 8.0 / 256.0);
    let nc = KvSpec::parse("k5v3-nc").unwrap();
    assert_eq!((nc.keys, nc.values), (Store::Codec(lookup("tq-mse-5-nc").unwrap()), Store::Codec(lookup("tq-mse-3-nc").unwrap())));
    assert!(KvSpec::parse("k5v3-ncx").is_err() && KvSpec::parse("k9v3-nc").is_err());
    // tq-prod keeps its whole code (f32 norms and the QJL part)
    assert_eq!(
        KvSpec::parse("tq-prod-3").unwrap().keys.bytes_per_vector(128).unwrap(),
        tq_core::build("tq-prod-3", 128, 0, tq_core::RotationKind::Hadamard).unwrap().code_size() as f64
    );
    assert_eq!(KvSpec::parse("q4_0-rot").unwrap().bits_per_value(128).unwrap(), 4.5);
    assert_eq!(KvSpec::parse("q8_0").unwrap().bits_per_value(128).unwrap(), 8.5);
    assert_eq!(KvSpec::parse("kivi-2").unwrap().bits_per_value(128).unwrap(), 3.0);
    // 3.5 bits: 64 channels at 4 bits (32 B) + 64 at 3 bits (24 B) + two bf16 norms = 60 B per 128 values
    assert_eq!(KvSpec::parse("tq-mse-3.5").unwrap().bits_per_value(128).unwrap(), 3.75);
    assert_eq!(KvSpec::parse("tq-mse-2.5").unwrap().bits_per_value(64).unwrap(), (12.0 + 8.0 + 4.0) * 8.0 / 64.0);
    for s in ["nvfp4", "mxfp4", "tq-prod-3", "tq-mse-2-nc", "tq-mse-2.5"] {
        assert!(KvSpec::parse(s).unwrap().bits_per_value(128).unwrap() > 2.0, "{s}");
    }
}

#[test]
fn bad_precisions_name_the_valid_ones() {
    let e = KvSpec::parse("int3").unwrap_err().to_string();
    assert!(e.contains("kBvC") && e.contains("q4_0-rot"), "{e}");
    assert_eq!(KvSpec::parse("tq-mse-9").unwrap_err(), TqError::UnsupportedBits(9));
    assert_eq!(KvSpec::parse("k9v3").unwrap_err(), TqError::UnsupportedBits(9));
    assert!(KvSpec::parse("pq-4").is_err(), "trained codecs are not cache precisions");
}

#[test]
fn vram_plans_add_weights_and_cache() {
    let plan = |m: &str, w: &str, ctx: usize, kv: &str| -> tq_core::Result<tq_kv::plan::VramPlan> {
        vram(model(m)?, w.parse::<Weights>()?, ctx, &kv.parse::<KvSpec>()?)
    };
    let p = plan("llama-3.1-8b", "bf16", 100_000, "f16").unwrap();
    // 32 layers × 8 heads × 128 × 2 (K, V) × 2 bytes = 131,072 B per token
    assert!((p.kv_gb - 131_072.0 * 100_000.0 / 1e9).abs() < 1e-9);
    assert!((p.weights_gb - 16.06).abs() < 1e-9);
    assert_eq!(p.cards_24gb, ((16.06 + 13.1072) / 24.0f64).ceil() as usize);
    let q = plan("llama-3.1-8b", "bf16", 100_000, "tq-mse-3.5").unwrap();
    assert!(q.kv_gb < p.kv_gb / 3.5);
    assert!(plan("gpt-5", "bf16", 1000, "f16").is_err());
    assert!(plan("llama-3.1-8b", "fp3", 1000, "f16").is_err());
    assert!(plan("llama-3.1-8b", "bf16", 0, "f16").is_err());
}

/// A budget parses wherever a precision does; before it is planned for a
/// model it counts as its bound, and it is never the f32 reference.
#[test]
fn budgets_are_precisions() {
    let b = KvSpec::parse("3.5").unwrap();
    assert_eq!(b.budget, Some(tq_kv::Budget { bits: 3.5, ctx: None }));
    assert!(!b.is_f32() && b.plan.is_none());
    assert_eq!(b.bits_per_value(64).unwrap(), 3.5);
    assert_eq!(b.bytes_per_token_per_layer(3, 64).unwrap(), 3.5 * 2.0 * 3.0 * 64.0 / 8.0);
    let c: KvSpec = "budget:2.5:ctx=4096".parse().unwrap();
    assert_eq!((c.budget.unwrap().bits, c.budget.unwrap().ctx), (2.5, Some(4096)));
    assert_eq!(c.to_string(), "budget:2.5:ctx=4096");
    for s in ["0", "-3", "budget:", "budget:33", "budget:3.5:ctx=2000000"] {
        assert!(matches!(KvSpec::parse(s), Err(TqError::BadParams(_))), "{s}");
    }
    let p = vram(model("llama-3.1-8b").unwrap(), Weights::Bf16, 100_000, &b).unwrap();
    assert_eq!(p.kv_bits_per_value, 3.5);
}
