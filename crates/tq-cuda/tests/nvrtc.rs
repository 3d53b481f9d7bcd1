//! Build check of every kernel configuration with NVRTC: needs libnvrtc
//! (scripts/test.sh fetches NVIDIA's wheel), not a GPU.
#![cfg(feature = "cuda")]

#[test]
fn every_kernel_configuration_compiles_without_local_memory() {
    let ptx = tq_cuda::compile_all("compute_90").expect("NVRTC compiles every kernel configuration");
    // per head_dim: the encoder, 5 one-token group sizes × 6 precisions, and
    // the multi-token TurboQuant configurations, 4 precisions each (d = 64:
    // 3 × 4 rows; d = 128: 4 × 2, 4 × 8, 6 × 2 rows), two row-block sizes
    // where the SIMT kernel takes fewer rows than the tensor-core one
    assert_eq!(ptx.len(), 2 * (1 + 5 * 6) + 4 * 2 + 4 * (1 + 2 + 2));
    let mut multi = 0;
    for (defs, src) in ptx {
        assert!(src.contains(".entry"), "{defs}: no kernel entry in the PTX");
        let tq = defs.contains("KMODE 0") && defs.contains("VMODE 0");
        if defs.contains("ATTENTION") {
            let rb: usize = defs.split("#define RB ").nth(1).and_then(|x| x.split('\n').next()).and_then(|x| x.parse().ok()).expect("RB defined");
            assert!(rb <= 16, "{defs}: more rows per block than one MMA holds");
            if tq {
                // the pipelined tensor-core kernel: bulk copies into shared memory, mbarriers, mma.sync
                for needle in ["tq_attend_mma", "mma.sync.aligned.m16n8k16", "cp.async.bulk.shared::cluster.global", "mbarrier.try_wait.parity"] {
                    assert!(src.contains(needle), "{defs}: no {needle} in the PTX");
                }
            }
            // register arrays indexed at run time would spill to local memory
            assert!(!src.contains("ld.local") && !src.contains("st.local"), "{defs}: local memory in the attention kernel");
            multi += !defs.contains("#define NQ 1\n") as usize;
        }
    }
    assert_eq!(multi, 4 * 2 + 4 * (1 + 2 + 2), "multi-token configurations");
}
