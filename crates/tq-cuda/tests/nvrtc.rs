//! Build check of every kernel configuration with NVRTC: needs libnvrtc
//! (scripts/test.sh fetches NVIDIA's wheel), not a GPU.
#![cfg(feature = "cuda")]

#[test]
fn every_kernel_configuration_compiles_without_local_memory() {
    let ptx = tq_cuda::compile_all("compute_90").expect("NVRTC compiles every kernel configuration");
    assert_eq!(ptx.len(), 2 * (1 + 4 * 6));
    for (defs, src) in ptx {
        assert!(src.contains(".entry"), "{defs}: no kernel entry in the PTX");
        // register arrays indexed at run time would spill to local memory
        let tq = defs.contains("KMODE 0") && defs.contains("VMODE 0") && !defs.contains("G 16");
        if defs.contains("ATTENTION") && tq {
            assert!(src.contains("tq_attend_mma") && src.contains("mma.sync.aligned.m16n8k16"), "{defs}: no tensor-core kernel");
        }
        if defs.contains("ATTENTION") {
            assert!(!src.contains("ld.local") && !src.contains("st.local"), "{defs}: local memory in the attention kernel");
        }
    }
}
