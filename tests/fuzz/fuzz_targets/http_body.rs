//! Arbitrary bytes as an HTTP request body, through the server's parser and validator.
//! See `omnishard_tests::fuzz::http_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| omnishard_tests::fuzz::http_body(data));
