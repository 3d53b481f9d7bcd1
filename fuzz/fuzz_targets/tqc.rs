#![no_main]
libfuzzer_sys::fuzz_target!(init: tq_fuzz::warm_up(), |data: &[u8]| tq_fuzz::target::tqc(data));
