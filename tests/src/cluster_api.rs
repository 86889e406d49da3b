//! Talking to a coordinator serving over real expert nodes, for the failover, shutdown and
//! rolling-restart tests: start it over given nodes, stream a greedy completion while something
//! happens to the cluster, and read what it says about its nodes.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::{ExpertNode, PATIENCE, Server};

pub fn serve_on(nodes: &[&ExpertNode], extra: &[&str]) -> Server {
    let list = nodes
        .iter()
        .map(|n| n.address.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec![
        "serve",
        "--nodes",
        &list,
        "--health-interval-ms",
        "100",
        "--rpc-timeout-ms",
        "3000",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Streams a greedy completion; calls `at(n)` after the n-th text chunk. Returns the text, the
/// longest gap between chunks, and the error event if the stream ended with one.
pub async fn stream(
    server: &Server,
    max_tokens: usize,
    mut at: impl FnMut(usize),
) -> (String, Duration, Option<Value>) {
    let body = json!({"prompt": "The lighthouse keeper", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true});
    let resp = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut bytes = resp.bytes_stream();
    let (mut buf, mut text, mut chunks, mut error) = (String::new(), String::new(), 0, None);
    let mut last = Instant::now();
    let mut max_gap = Duration::ZERO;
    while let Some(b) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&b.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if v.get("error").is_some() {
                error = Some(v);
                continue;
            }
            if let Some(t) = v["choices"][0]["text"].as_str().filter(|t| !t.is_empty()) {
                max_gap = max_gap.max(last.elapsed());
                last = Instant::now();
                text.push_str(t);
                chunks += 1;
                at(chunks);
            }
        }
    }
    (text, max_gap, error)
}

pub async fn stats(server: &Server) -> Value {
    reqwest::get(server.url("/v1/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn node_field(server: &Server, address: &str, field: &str) -> Value {
    let s = stats(server).await;
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["address"] == address)
        .unwrap()[field]
        .clone()
}

pub async fn wait_until_up(server: &Server, address: &str) {
    let deadline = Instant::now() + PATIENCE;
    while node_field(server, address, "up").await != json!(true) {
        assert!(Instant::now() < deadline, "{address} was never re-admitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A whole chat completion's content and prompt tokens; fails the test unless it is a 200.
pub async fn chat_answer(server: &Server, body: &Value) -> (String, u64) {
    let (status, v) = server.post_json("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_string(),
        v["usage"]["prompt_tokens"].as_u64().expect("usage"),
    )
}

/// Posts a chat completion that must be refused: a 400 whose message contains `expected`.
pub async fn assert_refused(server: &Server, body: &Value, expected: &str) {
    let (status, v) = server.post_json("/v1/chat/completions", body).await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(expected), "wanted {expected:?}: {message}");
}
