//! Damaged checkpoints and unsupported configs give clear errors naming the file and tensor (or
//! the config field), never a panic.

use candle_core::Device;
use std::path::Path;

use omnishard_coordinator::{ComputeDtype, Engine};
use omnishard_tests::scratch_copy;

const MODEL: &str = "omni-gqa-top4";
const TENSOR: &str = "thinker.model.layers.0.self_attn.q_proj.weight";

fn load_err(dir: &Path) -> String {
    match Engine::load_local(dir, ComputeDtype::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn index(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn shard_of(dir: &Path, tensor: &str) -> String {
    index(dir)["weight_map"][tensor]
        .as_str()
        .unwrap()
        .to_string()
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn truncated_shard_names_file_and_tensor() {
    let dir = scratch_copy(MODEL);
    let shard = shard_of(dir.path(), TENSOR);
    let path = dir.path().join(&shard);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains(&shard) && err.contains("truncated or corrupt"),
        "{err}"
    );
    assert!(err.contains("thinker.model."), "{err}");
}

#[test]
fn corrupt_header_is_reported() {
    let dir = scratch_copy(MODEL);
    let shard = shard_of(dir.path(), TENSOR);
    let path = dir.path().join(&shard);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&path, bytes).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains(&shard) && err.contains("corrupt"), "{err}");
}

#[test]
fn missing_shard_names_file_and_tensor() {
    let dir = scratch_copy(MODEL);
    let shard = shard_of(dir.path(), TENSOR);
    std::fs::remove_file(dir.path().join(&shard)).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains(&shard) && err.contains("is missing"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch_copy(MODEL);
    edit_json(&dir.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"].as_object_mut().unwrap().remove(TENSOR);
    });
    let err = load_err(dir.path());
    assert!(err.contains(TENSOR) && err.contains("not listed"), "{err}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let dir = scratch_copy(MODEL);
    edit_json(&dir.path().join("config.json"), |v| {
        v["thinker_config"]["text_config"]["moe_intermediate_size"] = 16.into();
    });
    let err = load_err(dir.path());
    assert!(err.contains("mlp.experts.0.gate_proj.weight"), "{err}");
    assert!(
        err.contains("[32, 64]") && err.contains("[16, 64]"),
        "{err}"
    );
}

#[test]
fn unsupported_config_value_names_the_field() {
    let dir = scratch_copy(MODEL);
    edit_json(&dir.path().join("config.json"), |v| {
        v["thinker_config"]["text_config"]["rope_scaling"]["mrope_interleaved"] = false.into();
    });
    let err = load_err(dir.path());
    assert!(err.contains("rope_scaling.mrope_interleaved"), "{err}");
}

#[test]
fn not_a_checkpoint_directory() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");
}
