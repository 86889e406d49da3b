//! The `coordinator` binary as users run it, on the fixture models.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

fn coordinator() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LOG");
    cmd
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let out = coordinator()
        .args([
            "generate",
            "--prompt",
            "The coordinator sends",
            "--max-tokens",
            "16",
        ])
        .arg("--model")
        .arg(fixture("omni-gqa-top4"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!out.stdout.is_empty());
    assert!(stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn generate_reads_flags_from_environment() {
    let out = coordinator()
        .arg("generate")
        .env("OMNISHARD_MODEL", fixture("qwen3moe-flat"))
        .env("OMNISHARD_PROMPT", "hello")
        .env("OMNISHARD_MAX_TOKENS", "4")
        .env("OMNISHARD_CHAT", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn score_prints_one_row_per_token() {
    let out = coordinator()
        .args(["score", "--token-ids", "1,2,3", "--dtype", "bf16"])
        .arg("--model")
        .arg(fixture("omni-mqa-step2"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.as_array().unwrap().len() == 320));
}

#[test]
fn score_rejects_bad_input_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let two_rows = dir.path().join("pos.json");
    std::fs::write(&two_rows, "[[0,1],[0,1]]").unwrap();
    let short_rows = dir.path().join("short.json");
    std::fs::write(&short_rows, "[[0,1],[0,1],[0]]").unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--token-ids", "1,99999"], "out of range"),
        (&["--token-ids", "1,x"], "invalid value"),
        (
            &[
                "--token-ids",
                "1,2",
                "--position-ids",
                two_rows.to_str().unwrap(),
            ],
            "exactly three rows",
        ),
        (
            &[
                "--token-ids",
                "1,2",
                "--position-ids",
                short_rows.to_str().unwrap(),
            ],
            "three rows of 2",
        ),
    ];
    for (args, expected) in cases {
        let out = coordinator()
            .arg("score")
            .args(args)
            .arg("--model")
            .arg(fixture("omni-gqa-top4"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn malformed_addresses_fail_at_once_naming_the_fix() {
    for args in [
        &["generate", "--prompt", "x", "--nodes", "10.0.0.2:1,foo"][..],
        &["serve", "--listen", "localhost"],
    ] {
        let started = std::time::Instant::now();
        let out = coordinator().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains("HOST:PORT"), "{args:?}: {stderr}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }
}
