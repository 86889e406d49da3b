//! `--device`: a binary built without the `cuda` feature (as CI builds) refuses a GPU with a
//! message that says how to get one, and rejects a malformed device name, from both binaries.
#![cfg(not(feature = "cuda"))]

use omnishard_tests::{bin, model_dir};

fn fails_with(name: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(bin(name))
        .args(args)
        .output()
        .expect("run the binary");
    assert!(!out.status.success(), "{name} {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cuda_without_the_feature_is_refused_with_the_remedy() {
    let model = model_dir("omni-gqa-top4");
    let model = model.to_str().expect("utf-8 path");
    let err = fails_with(
        "coordinator",
        &[
            "score",
            "--model",
            model,
            "--token-ids",
            "1,2",
            "--device",
            "cuda",
        ],
    );
    assert!(err.contains("--features cuda"), "{err}");
    let err = fails_with(
        "expert-node",
        &[
            "--model",
            model,
            "--shard",
            "0/1",
            "--listen",
            "127.0.0.1:0",
            "--device",
            "cuda:1",
        ],
    );
    assert!(
        err.contains("--features cuda") && err.contains("cuda:1"),
        "{err}"
    );
}

#[test]
fn a_malformed_device_is_a_usage_error() {
    let err = fails_with(
        "coordinator",
        &["score", "--token-ids", "1", "--device", "tpu"],
    );
    assert!(err.contains("use cpu, cuda or cuda:N"), "{err}");
    let err = fails_with("expert-node", &["--shard", "0/1", "--device", "cuda:x"]);
    assert!(err.contains("cuda:N"), "{err}");
}
