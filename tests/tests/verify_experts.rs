//! Expert nodes' weights are checked, not trusted (`--verify-experts`): a node serving a copy of
//! the demo model with every `down_proj` negated — same config, shapes and routers, so the same
//! fingerprint — is refused at start-up with the expert named, where before it was believed and
//! the answers turned to garbage; the true copy is admitted with every expert probed.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use omnishard_tests::{ExpertNode, bin, demo_model};

/// `dir` copied into `to`, every expert `down_proj` weight negated.
fn negated_copy(dir: &Path, to: &Path) {
    for entry in std::fs::read_dir(dir).expect("the model dir") {
        let path = entry.expect("an entry").path();
        let name = path.file_name().expect("a name").to_owned();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("loads");
            let flipped: HashMap<String, Tensor> = tensors
                .into_iter()
                .map(|(k, t)| {
                    let t = if k.contains(".experts.") && k.ends_with("down_proj.weight") {
                        t.neg().expect("negates")
                    } else {
                        t
                    };
                    (k, t)
                })
                .collect();
            candle_core::safetensors::save(&flipped, to.join(&name)).expect("saves");
        } else if path.is_file() {
            std::fs::copy(&path, to.join(&name)).expect("copies");
        }
    }
}

fn serve_until_ready_or_exit(nodes: &str, verify: &str) -> (bool, String) {
    let out = Command::new(bin("coordinator"))
        .args(["score", "--token-ids", "1,2,3", "--nodes", nodes])
        .args(["--verify-experts", verify, "--startup-timeout-s", "30"])
        .arg("--model")
        .arg(demo_model())
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs the coordinator");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_node_serving_other_expert_weights_is_refused() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    negated_copy(&demo_model(), tmp.path());
    let bad = ExpertNode::start(tmp.path(), &["--shard", "0/1"]);
    let (ok, err) = serve_until_ready_or_exit(&bad.address, "4");
    assert!(!ok, "a node with negated experts was admitted");
    assert!(
        err.contains(&bad.address)
            && err.contains("answers unlike the checkpoint")
            && err.contains("of layer"),
        "{err}"
    );
    // Trusting the nodes is a choice, and then the node is taken as it is.
    let (ok, err) = serve_until_ready_or_exit(&bad.address, "off");
    assert!(ok, "{err}");

    let good = ExpertNode::start(&demo_model(), &["--shard", "0/1"]);
    let (ok, err) = serve_until_ready_or_exit(&good.address, "all");
    assert!(ok, "the true weights were refused: {err}");
}
