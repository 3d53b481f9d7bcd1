#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tq_fuzz::target::fvecs(data));
