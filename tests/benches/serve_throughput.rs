//! Serving throughput with continuous batching: 1, 8 and 32 concurrent streaming clients against
//! the OpenAI-compatible server (real HTTP on loopback) over two expert nodes (real gRPC on
//! loopback), on the demo model, f32. Each client asks for 128 tokens with ignore_eos, so every
//! run generates the same number of tokens. Five interleaved rounds; prints the median aggregate
//! tokens/s and time to first token per level, and the 32-over-1 ratio of the medians. The
//! server and nodes run in this process.
//!
//! Run: `cargo bench -p omnishard-tests --bench serve_throughput`

use candle_core::Device;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use omnishard_coordinator::metrics::Metrics;
use omnishard_coordinator::remote::RemoteOptions;
use omnishard_coordinator::serve::{self, ServeSettings};
use omnishard_coordinator::{ComputeDtype, Engine};
use omnishard_proto::ModelConfig;
use omnishard_proto::placement::shard_pairs;
use omnishard_tests::{demo_model, in_process_node};

const TOKENS: usize = 128;
const ROUNDS: usize = 5;

/// One streaming request; returns (time to first text, tokens generated per its usage).
async fn one_stream(client: &reqwest::Client, url: &str, prompt: &str) -> (Duration, usize) {
    let body = serde_json::json!({"prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let started = Instant::now();
    let resp = client.post(url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut first = None;
    let mut tokens = 0;
    let mut buf = String::new();
    while let Some(bytes) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&bytes.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            assert!(!event.contains("\"error\""), "the server failed: {event}");
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            if v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                first.get_or_insert_with(|| started.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
    }
    assert_eq!(tokens, TOKENS, "a stream ended early");
    (first.unwrap_or_default(), tokens)
}

fn main() {
    let model = demo_model();
    let cfg = ModelConfig::from_model_dir(&model).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let nodes: Vec<String> = (0..2)
        .map(|i| in_process_node(&rt, &model, &shard_pairs(&cfg, i, 2)))
        .collect();
    let metrics = Arc::new(Metrics::new());
    let engine = Arc::new(
        Engine::load_remote(
            &model,
            ComputeDtype::F32,
            &Device::Cpu,
            &nodes,
            RemoteOptions::default(),
            false,
        )
        .unwrap(),
    );
    let service = serve::start(
        engine,
        metrics,
        ServeSettings {
            served_model_name: Some("demo-model".into()),
            max_context: Some(512),
            ..ServeSettings::new(model.clone())
        },
    )
    .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/v1/completions", listener.local_addr().unwrap());
    rt.spawn(service.serve(listener, std::future::pending()));

    let corpus = std::fs::read_to_string(model.join("corpus.txt")).unwrap();
    let words: Vec<&str> = corpus.split(' ').collect();
    let client = reqwest::Client::new();
    println!("demo model, 2 expert nodes, f32; {TOKENS} tokens per stream");
    println!(
        "{:>8} {:>12} {:>16}   (medians of {ROUNDS} interleaved rounds)",
        "streams", "tokens/s", "TTFT"
    );
    let levels = [1usize, 8, 32];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); levels.len()];
    let mut ttfts: Vec<Vec<Duration>> = vec![Vec::new(); levels.len()];
    // Rounds interleave the concurrency levels so drift on this shared machine hits all alike.
    for _ in 0..ROUNDS {
        for (li, &n) in levels.iter().enumerate() {
            rt.block_on(one_stream(&client, &url, "The lighthouse"));
            let started = Instant::now();
            let results = rt.block_on(futures::future::join_all((0..n).map(|i| {
                let at = (i * 7) % (words.len() - 4);
                let prompt = words[at..at + 4].join(" ");
                let client = client.clone();
                let url = url.clone();
                async move { one_stream(&client, &url, &prompt).await }
            })));
            let wall = started.elapsed();
            let tokens: usize = results.iter().map(|r| r.1).sum();
            rates[li].push(tokens as f64 / wall.as_secs_f64());
            ttfts[li].extend(results.iter().map(|r| r.0));
        }
    }
    let mut medians = Vec::new();
    for (li, &n) in levels.iter().enumerate() {
        rates[li].sort_by(f64::total_cmp);
        let rate = rates[li][rates[li].len() / 2];
        medians.push(rate);
        ttfts[li].sort();
        let ttft = ttfts[li][ttfts[li].len() / 2];
        println!("{n:>8} {rate:>12.1} {:>13.1} ms", ttft.as_secs_f64() * 1e3);
    }
    let rates = medians;
    println!(
        "throughput ratio 32 streams / 1 stream: {:.1}x",
        rates[2] / rates[0]
    );
}
