//! The `expert-node` binary's argument handling: bad partitions are refused with a message.

use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/omni-gqa-top4")
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_expert-node"))
        .arg("--model")
        .arg(fixture())
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn needs_a_partition() {
    let (ok, stderr) = run(&[]);
    assert!(!ok);
    assert!(
        stderr.contains("--shard") && stderr.contains("--placement"),
        "{stderr}"
    );
}

#[test]
fn rejects_bad_shards() {
    for shard in ["2/2", "x/2", "1"] {
        let (ok, stderr) = run(&["--shard", shard]);
        assert!(!ok);
        assert!(stderr.contains("invalid --shard"), "{shard}: {stderr}");
    }
}

#[test]
fn rejects_unknown_placement_node() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "[[node]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nexperts = [\"*:*\"]\n",
    )
    .unwrap();
    let (ok, stderr) = run(&["--placement", path.to_str().unwrap(), "--node", "b"]);
    assert!(!ok);
    assert!(
        stderr.contains("\"b\" is not in") && stderr.contains("\"a\""),
        "{stderr}"
    );
}
