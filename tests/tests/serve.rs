//! The OpenAI-compatible server over a local two-node cluster, driven by a real HTTP client:
//! completions and chat, streamed and not, batching that does not change results, cancellation,
//! back-pressure, bad input and auth.

use std::time::{Duration, Instant};

use futures::StreamExt;
use omnishard_tests::{PATIENCE, Server};
use serde_json::{Value, json};

const CORPUS: &str = include_str!("../../coordinator/demo-model/corpus.txt");

fn cluster_server(extra: &[&str]) -> Server {
    let mut args = vec!["cluster", "--nodes", "2", "serve"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The concatenated text of an SSE stream, and whether it ended with [DONE].
async fn stream_text(server: &Server, path: &str, body: Value) -> (String, Vec<Value>) {
    let resp = reqwest::Client::new()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let raw = resp.text().await.unwrap();
    let mut text = String::new();
    let mut chunks = Vec::new();
    let data: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{raw}");
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        if let Some(choice) = v["choices"].get(0) {
            text.push_str(
                choice["delta"]["content"]
                    .as_str()
                    .or(choice["text"].as_str())
                    .unwrap_or(""),
            );
        }
        chunks.push(v);
    }
    (text, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_chat_streamed_and_not() {
    let server = cluster_server(&[]);
    let prompt = "The lighthouse keeper of Omnishard Island";
    let body = json!({"prompt": prompt, "max_tokens": 30, "temperature": 0});
    let (status, v) = post(&server, "/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(
        CORPUS.starts_with(&format!("{prompt}{text}")),
        "not the trained text: {text:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 30);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (stream_text_out, chunks) = stream_text(&server, "/v1/completions", streamed).await;
    assert_eq!(stream_text_out, text);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 30);

    let chat = json!({"model": "demo-model", "messages": [{"role": "user", "content": "Who keeps the ledger?"}], "temperature": 0});
    let (status, v) = post(&server, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "The lighthouse keeper of Omnishard Island keeps the ledger."
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (text, chunks) = stream_text(&server, "/v1/chat/completions", streamed).await;
    assert_eq!(
        text,
        "The lighthouse keeper of Omnishard Island keeps the ledger."
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    // A stop string ends the text before it.
    let (_, v) = post(
        &server,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 30, "temperature": 0, "stop": ["eight"]}),
    )
    .await;
    assert_eq!(
        v["choices"][0]["text"],
        " kept a ledger of every ship that passed. On calm nights she counted "
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let models: Value = reqwest::get(server.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "demo-model");
    assert_eq!(
        reqwest::get(server.url("/health")).await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_match_their_solo_runs() {
    let server = cluster_server(&[]);
    let words: Vec<&str> = CORPUS.split(' ').collect();
    let prompts: Vec<String> = (0..16)
        .map(|i| words[i * 9..i * 9 + 3 + i % 4].join(" "))
        .collect();
    let body =
        |p: &str| json!({"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let mut alone = Vec::new();
    for p in &prompts {
        let (status, v) = post(&server, "/v1/completions", body(p)).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let together = futures::future::join_all(
        prompts
            .iter()
            .map(|p| post(&server, "/v1/completions", body(p))),
    )
    .await;
    for (i, (status, v)) in together.into_iter().enumerate() {
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["text"].as_str().unwrap(),
            alone[i],
            "prompt {i}: {:?}",
            prompts[i]
        );
    }
}

async fn wait_for(server: &Server, metric: &str, want: f64) {
    let deadline = Instant::now() + PATIENCE;
    while server.metric(metric).await != want {
        assert!(Instant::now() < deadline, "{metric} never reached {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_frees_the_sequence_and_a_full_queue_gives_429() {
    let server = cluster_server(&["--max-active-seqs", "1", "--queue-size", "1"]);
    let long = json!({"prompt": "The", "max_tokens": 480, "temperature": 0, "ignore_eos": true, "stream": true});
    let client = reqwest::Client::new();
    let first = client
        .post(server.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut first_stream = first.bytes_stream();
    first_stream.next().await.unwrap().unwrap();
    wait_for(&server, "omnishard_active_sequences", 1.0).await;
    let second = client
        .post(server.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    wait_for(&server, "omnishard_queue_depth", 1.0).await;
    let (status, v) = post(
        &server,
        "/v1/completions",
        json!({"prompt": "The", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");

    // Both clients go away: their sequences are dropped long before 480 tokens each.
    drop(first_stream);
    drop(second);
    wait_for(&server, "omnishard_active_sequences", 0.0).await;
    wait_for(&server, "omnishard_queue_depth", 0.0).await;
    let generated = server.metric("omnishard_completion_tokens_total").await;
    assert!(
        generated < 480.0,
        "{generated} tokens generated: the disconnect did not cancel"
    );
    let (status, _) = post(
        &server,
        "/v1/completions",
        json!({"prompt": "The", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_and_the_server_keeps_serving() {
    let server = cluster_server(&[]);
    let client = reqwest::Client::new();
    let long_prompt = "the ".repeat(600);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{not json".into(), 400, "invalid JSON"),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": "ten"}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": -5}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": -1}).to_string(),
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "top_p": 0}).to_string(),
            400,
            "top_p",
        ),
        (
            "/v1/completions",
            json!({"max_tokens": 3}).to_string(),
            400,
            "`prompt` is required",
        ),
        (
            "/v1/completions",
            json!({"prompt": [99999]}).to_string(),
            400,
            "out of range",
        ),
        (
            "/v1/completions",
            json!({"prompt": long_prompt}).to_string(),
            400,
            "context",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 100000}).to_string(),
            400,
            "context",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "model": "gpt-4"}).to_string(),
            404,
            "does not exist",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "n": 99}).to_string(),
            400,
            "n must be 1 to 16",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string(),
            400,
            "must not be empty",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "robot", "content": "x"}]}).to_string(),
            400,
            "role",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": "hello"}).to_string(),
            400,
            "messages",
        ),
        ("/v1/nothing", "{}".into(), 404, "no such endpoint"),
    ];
    for (path, body, status, needle) in cases {
        let resp = client
            .post(server.url(path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path} {body}");
        let v: Value = resp.json().await.unwrap();
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {v}");
    }
    // Requests are counted by the route they matched; anything else under one label. Every
    // series names the model (vLLM's `model_name`).
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        r#"omnishard_requests_total{endpoint="/v1/completions",status="400",model_name="demo-model"} 10"#,
        r#"omnishard_requests_total{endpoint="/v1/completions",status="404",model_name="demo-model"} 1"#,
        r#"omnishard_requests_total{endpoint="/v1/chat/completions",status="400",model_name="demo-model"} 3"#,
        r#"omnishard_requests_total{endpoint="unmatched",status="404",model_name="demo-model"} 1"#,
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    let (status, _) = post(
        &server,
        "/v1/completions",
        json!({"prompt": "The", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_enforced_when_set() {
    let server = Server::start(&["serve", "--api-key", "s3cret"]);
    let client = reqwest::Client::new();
    let body = json!({"prompt": "The", "max_tokens": 2});
    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let mut req = client.post(server.url("/v1/completions")).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let resp = client
        .post(server.url("/v1/completions"))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        client
            .get(server.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        client
            .get(server.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "omnishard_requests_total",
        "omnishard_time_to_first_token_seconds",
        "omnishard_inter_token_latency_seconds",
        "omnishard_queue_depth",
        "omnishard_active_sequences",
        "omnishard_expert_tokens_total",
        "omnishard_prompt_tokens_total",
        "omnishard_completion_tokens_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}
