//! `coordinator plan` end to end: statistics recorded by a running server become a placement
//! whose nodes serve the model with output identical to the in-process run.

use std::process::Command;

use omnishard_tests::{ExpertNode, Server, bin, coordinator_score, demo_model};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_statistics_become_a_working_balanced_placement() {
    let server = Server::start(&["serve"]);
    let client = reqwest::Client::new();
    for prompt in [
        "The lighthouse keeper",
        "When a storm broke",
        "Years later the islanders",
    ] {
        let resp = client
            .post(server.url("/v1/completions"))
            .json(&json!({"prompt": prompt, "max_tokens": 40, "temperature": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let stats = reqwest::get(server.url("/v1/stats"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    drop(server);
    let dir = tempfile::tempdir().unwrap();
    let stats_path = dir.path().join("stats.json");
    std::fs::write(&stats_path, stats).unwrap();
    let placement = dir.path().join("placement.toml");
    let out = Command::new(bin("coordinator"))
        .args(["plan", "--nodes", "3", "--replicas", "3", "--stats"])
        .arg(&stats_path)
        .arg("--out")
        .arg(&placement)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    eprintln!("{stderr}");
    let ratio: f64 = stderr
        .split("max/mean ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .expect("plan prints max/mean");
    assert!(ratio <= 1.10, "expected load max/mean {ratio}");

    let nodes: Vec<ExpertNode> = (0..3)
        .map(|i| {
            ExpertNode::start(
                &demo_model(),
                &[
                    "--placement",
                    placement.to_str().unwrap(),
                    "--node",
                    &format!("node-{i}"),
                ],
            )
        })
        .collect();
    let list = nodes
        .iter()
        .map(|n| n.address.clone())
        .collect::<Vec<_>>()
        .join(",");
    let score = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--token-ids".as_ref(), "10,20,30,40".as_ref()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        coordinator_score(&args)
    };
    assert_eq!(
        score(&["--nodes", &list]),
        score(&[]),
        "planned placement changed the logits"
    );
}
