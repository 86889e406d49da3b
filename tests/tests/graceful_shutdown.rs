//! Graceful shutdown with real processes: a coordinator given SIGTERM refuses new requests
//! (503 with `Retry-After`, `/health` failing) while the streams in flight run to their end, and
//! once its grace is over ends what is left with a clear last event; an expert node given
//! SIGTERM finishes its calls and hands the rest to replicas, so a rolling restart of every node
//! under a steady stream of requests fails none and changes no token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use omnishard_tests::cluster_api::{serve_on, stream, wait_until_up};
use omnishard_tests::{ExpertNode, PATIENCE, Server, demo_model};
use serde_json::json;

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits (bounded) for the server process to exit.
fn wait_exit(server: &mut Server) {
    let deadline = Instant::now() + PATIENCE;
    while server.child.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_coordinator_finishes_streams_and_refuses_new_ones() {
    let node = ExpertNode::start(&demo_model(), &["--shard", "0/1"]);
    let mut server = serve_on(&[&node], &["--shutdown-grace-s", "60"]);
    let (undisturbed, _, err) = stream(&server, 300, |_| {}).await;
    assert!(err.is_none(), "{err:?}");

    let pid = server.child.id();
    let signalled = Arc::new(AtomicBool::new(false));
    let probe = {
        let (url, signalled) = (server.url.clone(), signalled.clone());
        tokio::spawn(async move {
            while !signalled.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Give the signal a moment to land, then ask as a new client and a load balancer would.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let client = reqwest::Client::new();
            let refused = client
                .post(format!("{url}/v1/completions"))
                .json(&json!({"prompt": "hi", "max_tokens": 2}))
                .send()
                .await
                .expect("the server still answers while draining");
            let retry_after = refused.headers().get("retry-after").cloned();
            let status = refused.status().as_u16();
            let body: serde_json::Value = refused.json().await.unwrap_or_default();
            let health = client
                .get(format!("{url}/health"))
                .send()
                .await
                .expect("health while draining")
                .status()
                .as_u16();
            (status, retry_after, body, health)
        })
    };
    let (text, _, err) = stream(&server, 300, |n| {
        if n == 5 {
            signal(pid, "TERM");
            signalled.store(true, Ordering::Release);
        }
    })
    .await;
    assert!(err.is_none(), "the stream in flight failed: {err:?}");
    assert_eq!(text, undisturbed, "the stream in flight was cut short");
    let (status, retry_after, body, health) = probe.await.expect("probe");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "shutting_down", "{body}");
    assert!(retry_after.is_some(), "no Retry-After on the 503");
    assert_eq!(health, 503);
    wait_exit(&mut server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_what_is_left_ends_with_an_error_event() {
    let node = ExpertNode::start(&demo_model(), &["--shard", "0/1"]);
    let mut server = serve_on(&[&node], &["--shutdown-grace-s", "0"]);
    let pid = server.child.id();
    let (text, _, err) = stream(&server, 450, |n| {
        if n == 5 {
            signal(pid, "TERM");
        }
    })
    .await;
    let err = err.expect("the stream ends with an error event");
    assert_eq!(err["error"]["code"], "shutting_down", "{err}");
    assert!(!text.is_empty());
    wait_exit(&mut server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_fails_no_request() {
    let model = demo_model();
    let shards = ["0/2", "1/2", "0/2", "1/2"];
    let mut nodes: Vec<ExpertNode> = shards
        .iter()
        .map(|s| ExpertNode::start(&model, &["--shard", s]))
        .collect();
    let server = serve_on(&nodes.iter().collect::<Vec<_>>(), &[]);
    let (undisturbed, _, err) = stream(&server, 60, |_| {}).await;
    assert!(err.is_none(), "{err:?}");

    // Two clients streaming back to back for as long as the restarts last.
    let done = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicUsize::new(0));
    let server = Arc::new(server);
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (server, done, want) = (server.clone(), done.clone(), undisturbed.clone());
            let completed = completed.clone();
            tokio::spawn(async move {
                while !done.load(Ordering::Acquire) {
                    let (text, _, err) = stream(&server, 60, |_| {}).await;
                    let n = completed.fetch_add(1, Ordering::AcqRel);
                    assert!(err.is_none(), "request {n} failed: {err:?}");
                    assert_eq!(text, want, "request {n} changed");
                }
            })
        })
        .collect();
    for (i, shard) in shards.iter().enumerate() {
        // Every restart happens under load: requests finish between two restarts.
        let before = completed.load(Ordering::Acquire);
        let deadline = Instant::now() + PATIENCE;
        while completed.load(Ordering::Acquire) < before + 2 {
            assert!(Instant::now() < deadline, "no request finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let address = nodes[i].address.clone();
        nodes[i].signal("TERM");
        let deadline = Instant::now() + PATIENCE;
        while nodes[i].child.try_wait().expect("try_wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "node {i} did not exit on SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nodes[i] = ExpertNode::start_at(&model, &address, &["--shard", shard]);
        wait_until_up(&server, &address).await;
    }
    done.store(true, Ordering::Release);
    for c in clients {
        c.await.expect("a client failed");
    }
    let total = completed.load(Ordering::Acquire);
    eprintln!("rolling restart of 4 nodes: {total} requests, none failed");
}
