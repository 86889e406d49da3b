//! Following one request through the cluster: the id a client sends in `X-Request-Id` comes
//! back in the `x-request-id` header and shows up in the coordinator's log lines for the request
//! and in the log of every expert node that worked for it; without the header, the response's
//! own id plays that part; a malformed id is refused with a clear message.

use std::time::Instant;

use omnishard_tests::{PATIENCE, Server};
use serde_json::{Value, json};

const ID: &str = "test-trace-42";

/// Waits until the server's stderr satisfies `ok` (lines arrive through a pipe, after the
/// response may already be here); fails with the whole log otherwise.
async fn wait_for_log(server: &Server, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let log = server.log();
        if ok(&log) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never logged; log:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn has_line(log: &str, needles: &[&str]) -> bool {
    log.lines().any(|l| needles.iter().all(|n| l.contains(n)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_echoed_and_logged_by_the_coordinator_and_every_node() {
    let server = Server::start_logged(&["cluster", "--nodes", "2", "serve"], "info");
    let client = reqwest::Client::new();
    let body = json!({"prompt": "The lighthouse keeper", "max_tokens": 8, "temperature": 0, "ignore_eos": true});

    let resp = client
        .post(server.url("/v1/completions"))
        .header("X-Request-Id", ID)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], ID);
    let v: Value = resp.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8);

    // The coordinator: queued, then finished with token counts and duration, in the request's
    // span (which names the id).
    let request_field = format!("request_id={ID}");
    wait_for_log(&server, "the coordinator's lines for the request", |log| {
        has_line(
            log,
            &["omnishard_coordinator", &request_field, "request queued"],
        ) && has_line(
            log,
            &[
                "omnishard_coordinator",
                &request_field,
                "request finished",
                "prompt_tokens=3",
                "completion_tokens=8",
                "seconds=",
            ],
        )
    })
    .await;
    // Each node logs the id once, at info, when it first works for the request.
    for node in ["node=0/2", "node=1/2"] {
        wait_for_log(&server, &format!("{node}'s line for the request"), |log| {
            has_line(
                log,
                &[
                    "omnishard_expert",
                    "first expert call",
                    &request_field,
                    node,
                ],
            )
        })
        .await;
    }

    // No header: the response's own id is the request id, streamed or not.
    for stream in [false, true] {
        let mut body = body.clone();
        body["stream"] = json!(stream);
        let resp = client
            .post(server.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let echoed = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        assert!(echoed.starts_with("cmpl-"), "{echoed}");
        let text = resp.text().await.unwrap();
        let first = if stream {
            text.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap()
                .to_string()
        } else {
            text
        };
        let v: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["id"], echoed.as_str());
    }

    // An id that is not visible ASCII, or too long, is refused before anything else.
    let too_long = "x".repeat(129);
    for bad in ["two words", too_long.as_str()] {
        let resp = client
            .post(server.url("/v1/chat/completions"))
            .header("X-Request-Id", bad)
            .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad:?}");
        assert!(resp.headers().get("x-request-id").is_none());
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_request_id");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("X-Request-Id"),
            "{v}"
        );
    }
}
