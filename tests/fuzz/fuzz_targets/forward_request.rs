//! Arbitrary bytes as a `Forward` request, through the expert node's decoder, validator and compute.
//! See `omnishard_tests::fuzz::forward_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| omnishard_tests::fuzz::forward_request(data));
