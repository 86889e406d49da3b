//! Start-up as an operator sees it: the HTTP port is bound before the model loads (a port in use
//! fails at once), and while loading `/health` answers 503 with the stage and elapsed time, and
//! other requests a 503 with `Retry-After`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use omnishard_tests::{PATIENCE, bin};
use serde_json::Value;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_port_in_use_fails_before_loading() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let started = Instant::now();
    let out = Command::new(bin("coordinator"))
        .args(["serve", "--listen", &addr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert!(started.elapsed() < PATIENCE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_loading_until_ready() {
    // A node address nobody answers: start-up waits for it (up to the startup timeout).
    let listen = format!("127.0.0.1:{}", free_port());
    let absent = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(bin("coordinator"))
        .args(["serve", "--listen", &listen, "--nodes", &absent])
        .args(["--startup-timeout-s", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    let health = loop {
        assert!(Instant::now() < deadline, "no answer from /health");
        if let Ok(resp) = client.get(format!("http://{listen}/health")).send().await {
            break resp;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health.status(), 503);
    let body: Value = health.json().await.unwrap();
    assert_eq!(body["status"], "loading", "{body}");
    assert!(
        body["stage"].as_str().unwrap().contains("expert nodes"),
        "{body}"
    );
    assert!(body["seconds"].as_f64().is_some(), "{body}");
    let resp = client
        .post(format!("http://{listen}/v1/completions"))
        .json(&serde_json::json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "5");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "loading", "{body}");
    let _ = child.kill();
    let _ = child.wait();
}
