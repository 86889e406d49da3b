//! Arbitrary bytes as a checkpoint directory: either a single `model.safetensors`, or a
//! `model.safetensors.index.json` plus one shard (split at the first 0xFF byte). The reader must
//! open it and read every tensor it lists, or fail with an error, never panic.
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use omnishard_expert::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(dir) = tempfile::tempdir() else { return };
    let written = if mode & 1 == 0 {
        std::fs::write(dir.path().join("model.safetensors"), rest)
    } else {
        let split = rest.iter().position(|&b| b == 0xFF).unwrap_or(rest.len());
        let (index, shard) = rest.split_at(split);
        std::fs::write(dir.path().join("model.safetensors.index.json"), index)
            .and_then(|_| std::fs::write(dir.path().join("shard.safetensors"), shard.get(1..).unwrap_or_default()))
    };
    if written.is_err() {
        return;
    }
    let Ok(ckpt) = Checkpoint::open(dir.path()) else { return };
    let names: Vec<String> = ckpt.tensor_names().map(str::to_string).collect();
    for name in names {
        if let Ok((shape, _)) = ckpt.describe(&name) {
            let _ = ckpt.tensor(&name, &shape, DType::F32, &Device::Cpu);
            let _ = ckpt.leading_bytes(&name, 64);
        }
    }
});
