//! The KV cache budget and prefix caching over a real cluster (demo model, two expert-node
//! processes): a prompt that starts like an earlier one reuses its cached blocks and answers the
//! same as without the cache; under a budget too small for every request at once, sequences are
//! preempted and recomputed, and each still answers exactly as it does alone.

use omnishard_coordinator::kv_budget::bytes_per_token;
use omnishard_proto::ModelConfig;
use omnishard_tests::{Server, demo_model};
use serde_json::{Value, json};

const PROMPT: &str = "The lighthouse keeper of Omnishard Island kept a ledger of every ship, every storm and every cable that broke, and each night he read the last page aloud";

async fn text(server: &Server, body: &Value) -> String {
    let (status, answer) = server.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    answer["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_prefixes_are_reused_with_the_same_answers() {
    let cached = Server::start(&["cluster", "--nodes", "2", "serve"]);
    let uncached = Server::start(&["cluster", "--nodes", "2", "serve", "--no-prefix-caching"]);
    let hits = "omnishard_prefix_cache_hit_tokens_total";
    for suffix in ["", " to the gulls", " to the keeper"] {
        let body =
            json!({"prompt": format!("{PROMPT}{suffix}"), "max_tokens": 24, "temperature": 0});
        let reference = text(&uncached, &body).await;
        assert_eq!(text(&cached, &body).await, reference, "{suffix:?}");
        assert_eq!(text(&cached, &body).await, reference, "{suffix:?} again");
    }
    // The second run of each prompt, and the later prompts' shared start, came from the cache.
    assert!(
        cached.metric(hits).await >= 3.0 * 16.0,
        "{}",
        cached.metrics_text().await
    );
    assert_eq!(uncached.metric(hits).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_sequences_answer_as_they_do_alone() {
    let dir = demo_model();
    let cfg = ModelConfig::from_model_dir(&dir).unwrap();
    // Room for one sequence of the full context (512 tokens), not for four of ~190.
    let budget = 512 * bytes_per_token(&cfg, 4);
    let server = Server::start(&[
        "cluster",
        "--nodes",
        "2",
        "serve",
        "--kv-cache-memory",
        &budget.to_string(),
        "--no-prefix-caching",
    ]);
    let bodies: Vec<Value> = (0..4)
        .map(|i| {
            json!({"prompt": format!("{PROMPT} {i}"), "max_tokens": 150, "temperature": 0, "ignore_eos": true})
        })
        .collect();
    let together = futures::future::join_all(bodies.iter().map(|b| text(&server, b))).await;
    assert!(server.metric("omnishard_preemptions_total").await > 0.0);
    for (body, answer) in bodies.iter().zip(&together) {
        assert_eq!(&text(&server, body).await, answer);
    }
    // Choices that together cannot fit the budget are refused up front.
    let (status, answer) = server
        .post_json(
            "/v1/completions",
            &json!({"prompt": PROMPT, "n": 16, "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("KV cache positions"),
        "{answer}"
    );
    // A budget below one full context is refused at start-up, saying what to give.
    let out = std::process::Command::new(omnishard_tests::bin("coordinator"))
        .args([
            "serve",
            "--kv-cache-memory",
            "1KiB",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--kv-cache-memory at least"), "{stderr}");
}
