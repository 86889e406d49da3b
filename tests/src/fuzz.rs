//! What each fuzz target does with its input, shared by the cargo-fuzz targets in
//! `tests/fuzz/` and the regression test that replays every crash they found
//! (`tests/fixtures/fuzz-regressions/<target>/`).

use std::sync::{Arc, LazyLock};

use candle_core::{DType, Device};
use omnishard_coordinator::TextTokenizer;
use omnishard_coordinator::chat::{ChatPrompter, ChatTemplate};
use omnishard_coordinator::grammar::Grammars;
use omnishard_coordinator::server::{RequestLimits, validate_body};
use omnishard_expert::server::{NodeState, process};
use omnishard_model::{Checkpoint, LocalExperts};
use omnishard_proto::ModelConfig;
use omnishard_proto::placement::shard_pairs;
use omnishard_proto::v1::ForwardRequest;
use prost::Message;

static NODE: LazyLock<NodeState> = LazyLock::new(|| {
    let dir = crate::model_dir("omni-gqa-top4");
    let cfg = ModelConfig::from_model_dir(&dir).expect("fixture config");
    let ckpt = Checkpoint::open(&dir).expect("fixture checkpoint");
    let pairs = shard_pairs(&cfg, 0, 2);
    let experts = LocalExperts::load(&ckpt, &cfg, &pairs, DType::F32, &Device::Cpu, |_, _| {})
        .expect("fixture experts");
    let state = NodeState::new("fuzz".into(), "fuzz".into(), DType::F32, Device::Cpu);
    state.install(experts);
    state
});

/// Arbitrary bytes as a `Forward` request, through the node's decoder, validator and compute
/// on a real fixture partition. Malformed requests must come back as errors.
pub fn forward_request(data: &[u8]) {
    if let Ok(req) = ForwardRequest::decode(data) {
        let _ = process(&NODE, req);
    }
}

/// The demo model's tokenizer, chat template and grammar engine, as a server holds them.
struct Demo {
    tok: Arc<TextTokenizer>,
    chat: ChatPrompter,
    grammars: Grammars,
}

static DEMO: LazyLock<Demo> = LazyLock::new(|| {
    let dir = crate::demo_model();
    let cfg = ModelConfig::from_model_dir(&dir).expect("demo config");
    let tok = Arc::new(TextTokenizer::load(&dir, &cfg).expect("demo tokenizer"));
    let template = ChatTemplate::load(&dir, None).expect("demo chat template");
    let chat = ChatPrompter::new(template, &tok, Default::default(), Default::default());
    let stops = tok.stop_tokens().to_vec();
    let grammars = Grammars::load(tok.clone(), cfg.vocab_size, &stops).expect("grammars");
    Demo {
        tok,
        chat,
        grammars,
    }
});

/// The server's default media limits (no media runs here: the demo's towers are not loaded).
static MEDIA: std::sync::LazyLock<omnishard_coordinator::server::media::MediaLimits> =
    std::sync::LazyLock::new(Default::default);

/// Arbitrary bytes as the body of `/v1/completions` or `/v1/chat/completions` (the first byte
/// picks), through the server's parser and validator with the demo model's tokenizer.
pub fn http_body(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let limits = RequestLimits {
        model_name: "demo-model",
        max_context: 512,
        vocab_size: 512,
        tokenizer: &DEMO.tok,
        chat: &DEMO.chat,
        grammars: Ok(&DEMO.grammars),
        kv_capacity: 4096,
        max_sequences: 64,
        special_tokens_in_text: first & 2 == 2,
        audio: None,
        vision: None,
        media: &MEDIA,
    };
    if let Ok((prompt, max_tokens)) = validate_body(&limits, body, first & 1 == 1) {
        assert!(prompt > 0 && max_tokens >= 1 && prompt + max_tokens <= 512);
    }
}

/// Arbitrary bytes as a checkpoint directory: a single `model.safetensors`, or (first byte
/// odd) a `model.safetensors.index.json` and one shard split at the first 0xFF byte. The reader
/// must read every tensor it lists or fail with an error.
pub fn checkpoint(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let written = if mode & 1 == 0 {
        std::fs::write(dir.path().join("model.safetensors"), rest)
    } else {
        let split = rest.iter().position(|&b| b == 0xFF).unwrap_or(rest.len());
        let (index, shard) = rest.split_at(split);
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).and_then(|_| {
            std::fs::write(
                dir.path().join("shard.safetensors"),
                shard.get(1..).unwrap_or_default(),
            )
        })
    };
    if written.is_err() {
        return;
    }
    let Ok(ckpt) = Checkpoint::open(dir.path()) else {
        return;
    };
    let names: Vec<String> = ckpt.tensor_names().map(str::to_string).collect();
    for name in names {
        if let Ok((shape, _)) = ckpt.describe(&name) {
            let _ = ckpt.tensor(&name, &shape, DType::F32, &Device::Cpu);
            let _ = ckpt.leading_bytes(&name, 64);
        }
    }
}
