//! Arbitrary bytes as a checkpoint directory, through the safetensors header and index reader.
//! See `omnishard_tests::fuzz::checkpoint`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| omnishard_tests::fuzz::checkpoint(data));
