//! `/health` tells the truth about the scheduler: OK while it runs, 503 with the reason once
//! its thread has died, and new requests are refused with the same reason. The server runs in
//! this process (through `serve::start`, as the binary does) over experts that panic.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use omnishard_coordinator::metrics::Metrics;
use omnishard_coordinator::scheduler::SchedulerConfig;
use omnishard_coordinator::serve::{self, ServeSettings};
use omnishard_coordinator::{ComputeDtype, Engine};
use omnishard_model::{CallContext, Checkpoint, ExpertError, Experts, Routing};
use omnishard_proto::ModelConfig;
use omnishard_tests::{PATIENCE, demo_model};
use serde_json::{Value, json};

/// Experts whose first use panics, as a bug in the forward pass would.
struct Exploding;

impl Experts for Exploding {
    fn forward(
        &self,
        _layer: usize,
        _xs: &Tensor,
        _routing: &Routing,
        _ctx: &CallContext,
    ) -> Result<Tensor, ExpertError> {
        panic!("exploding experts (injected by the test)")
    }
}

async fn get(url: &str) -> (u16, Value) {
    let resp = reqwest::get(url).await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_with_the_reason_once_the_scheduler_dies() {
    let dir = demo_model();
    let cfg = ModelConfig::from_model_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let engine = Engine::with_experts(
        &ckpt,
        &cfg,
        ComputeDtype::F32,
        &Device::Cpu,
        Arc::new(Exploding),
        &[],
    )
    .unwrap();
    let service = serve::start(
        Arc::new(engine),
        Arc::new(Metrics::new()),
        ServeSettings {
            scheduler: SchedulerConfig {
                max_active: 4,
                max_batched_tokens: 64,
                queue_size: 4,
                ..ServeSettings::new(dir.clone()).scheduler
            },
            ..ServeSettings::new(dir)
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(service.serve(listener, std::future::pending()));

    let (status, v) = get(&format!("{base}/health")).await;
    assert_eq!((status, &v), (200, &json!({"status": "ok"})));

    // The request in flight when the thread dies gets a 503, not a hang.
    let client = reqwest::Client::new();
    let completion = || {
        client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "The lighthouse", "max_tokens": 4}))
            .send()
    };
    let resp = completion().await.unwrap();
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unavailable", "{v}");

    // The reason is recorded as the thread ends, just after the request saw its channel close.
    let deadline = Instant::now() + PATIENCE;
    let v = loop {
        let (status, v) = get(&format!("{base}/health")).await;
        if status == 503 {
            break v;
        }
        assert_eq!(status, 200, "{v}");
        assert!(
            Instant::now() < deadline,
            "/health stayed OK after the scheduler died"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("panicked") && message.contains("exploding experts"),
        "{message}"
    );

    // New requests are refused at once, with the same reason.
    let resp = completion().await.unwrap();
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exploding experts"),
        "{v}"
    );
}
