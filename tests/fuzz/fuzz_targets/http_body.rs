//! Arbitrary bytes as the body of `/v1/completions` or `/v1/chat/completions` (first byte
//! picks), through the server's parser and validator with the demo model's tokenizer.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use omnishard_coordinator::TextTokenizer;
use omnishard_coordinator::server::{RequestLimits, validate_body};
use omnishard_proto::ModelConfig;

static TOKENIZER: LazyLock<TextTokenizer> = LazyLock::new(|| {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../coordinator/demo-model");
    let cfg = ModelConfig::from_model_dir(&dir).expect("demo config");
    TextTokenizer::load(&dir, &cfg).expect("demo tokenizer")
});

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else { return };
    let limits = RequestLimits {
        model_name: "demo-model",
        max_context: 512,
        vocab_size: 512,
        tokenizer: &TOKENIZER,
    };
    if let Ok((prompt, max_tokens)) = validate_body(&limits, body, first & 1 == 1) {
        assert!(prompt > 0 && prompt < 512 && max_tokens >= 1 && prompt + max_tokens <= 512);
    }
});
