//! Arbitrary bytes as a `Forward` request, through the expert node's decoder, validator and
//! compute (`omnishard_expert::server::process`) on a real fixture partition. Any panic is a bug:
//! malformed requests must come back as errors.
#![no_main]

use std::sync::{Arc, LazyLock, OnceLock};

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use omnishard_expert::server::{NodeState, process};
use omnishard_expert::{Checkpoint, LocalExperts};
use omnishard_proto::ModelConfig;
use omnishard_proto::placement::shard_pairs;
use omnishard_proto::v1::ForwardRequest;
use prost::Message;

static STATE: LazyLock<NodeState> = LazyLock::new(|| {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/omni-gqa-top4");
    let cfg = ModelConfig::from_model_dir(&dir).expect("fixture config");
    let ckpt = Checkpoint::open(&dir).expect("fixture checkpoint");
    let experts = LocalExperts::load(&ckpt, &cfg, &shard_pairs(&cfg, 0, 2), DType::F32, &Device::Cpu, |_, _| {})
        .expect("fixture experts");
    let state = NodeState {
        name: "fuzz".into(),
        fingerprint: "fuzz".into(),
        dtype: DType::F32,
        device: Device::Cpu,
        experts: OnceLock::new(),
    };
    let _ = state.experts.set(Arc::new(experts));
    state
});

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = ForwardRequest::decode(data) {
        let _ = process(&STATE, req);
    }
});
