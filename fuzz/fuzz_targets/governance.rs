#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| brain_ops::fuzzing::governance(data));
