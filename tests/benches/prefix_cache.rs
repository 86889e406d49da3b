//! Time to first token with automatic prefix caching on and off, in one run: 32 concurrent
//! streaming requests that share a 1,000-token system prompt (each with its own 16-token tail),
//! after one request has seen that prompt. The demo model's weights with its context raised to
//! 2,048 positions (its config only: the weights are the same), f32, experts in process, real
//! HTTP on loopback; three interleaved rounds, medians printed.
//!
//! Run: `cargo bench -p omnishard-tests --bench prefix_cache`

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use futures::StreamExt;
use omnishard_coordinator::metrics::Metrics;
use omnishard_coordinator::scheduler::SchedulerConfig;
use omnishard_coordinator::serve::{self, ServeSettings};
use omnishard_coordinator::{ComputeDtype, Engine, TextTokenizer};
use omnishard_proto::ModelConfig;
use omnishard_tests::demo_model;

const SHARED: usize = 1000;
const TAIL: usize = 16;
const CLIENTS: usize = 32;
const ROUNDS: usize = 3;

/// The demo model's files with `max_position_embeddings` raised to 2,048.
fn long_context_model() -> tempfile::TempDir {
    let src = demo_model();
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name == "config.json" {
            let mut cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            cfg["thinker_config"]["text_config"]["max_position_embeddings"] = 2048.into();
            std::fs::write(dir.path().join(name), cfg.to_string()).unwrap();
        } else {
            std::os::unix::fs::symlink(&path, dir.path().join(name)).unwrap();
        }
    }
    dir
}

/// Starts a server on `dir`; returns its completions URL.
fn start(rt: &tokio::runtime::Runtime, dir: &std::path::Path, prefix_caching: bool) -> String {
    let engine = Arc::new(Engine::load_local(dir, ComputeDtype::F32, &Device::Cpu).unwrap());
    let service = serve::start(
        engine,
        Arc::new(Metrics::new()),
        ServeSettings {
            served_model_name: Some("demo-model".into()),
            max_context: Some(2048),
            scheduler: SchedulerConfig {
                kv_cache_bytes: 1 << 30,
                prefix_caching,
                ..ServeSettings::new(dir.to_path_buf()).scheduler
            },
            ..ServeSettings::new(dir.to_path_buf())
        },
    )
    .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/v1/completions", listener.local_addr().unwrap());
    rt.spawn(service.serve(listener, std::future::pending()));
    url
}

/// Time from sending to the first streamed text.
async fn ttft(client: &reqwest::Client, url: &str, prompt: &[u32]) -> Duration {
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": true, "stream": true});
    let started = Instant::now();
    let resp = client.post(url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut first = None;
    while let Some(bytes) = stream.next().await {
        let text = String::from_utf8_lossy(&bytes.unwrap()).into_owned();
        assert!(!text.contains("\"error\""), "the server failed: {text}");
        if text.contains("\"text\":\"") && !text.contains("\"text\":\"\"") {
            first.get_or_insert_with(|| started.elapsed());
        }
    }
    first.unwrap_or_else(|| started.elapsed())
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = long_context_model();
    let cfg = ModelConfig::from_model_dir(dir.path()).unwrap();
    let tok = TextTokenizer::load(dir.path(), &cfg).unwrap();
    let corpus = std::fs::read_to_string(demo_model().join("corpus.txt")).unwrap();
    let ids = tok.encode(&corpus).unwrap();
    let shared: Vec<u32> = ids.iter().copied().cycle().take(SHARED).collect();
    let prompt = |i: usize| -> Vec<u32> {
        let mut p = shared.clone();
        p.extend((0..TAIL).map(|j| ids[(i * 31 + j * 7) % ids.len()]));
        p
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let urls = [start(&rt, dir.path(), true), start(&rt, dir.path(), false)];
    let client = reqwest::Client::new();
    let mut medians: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut walls: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for (k, url) in urls.iter().enumerate() {
            // The system prompt has been seen once (round 0: the first time on this server).
            rt.block_on(ttft(&client, url, &prompt(1000 + round)));
            let started = Instant::now();
            let prompts: Vec<Vec<u32>> =
                (0..CLIENTS).map(|i| prompt(round * CLIENTS + i)).collect();
            let mut times = rt.block_on(futures::future::join_all(
                prompts.iter().map(|p| ttft(&client, url, p)),
            ));
            walls[k].push(started.elapsed());
            medians[k].push(median(&mut times));
        }
    }
    let on = (median(&mut medians[0]), median(&mut walls[0]));
    let off = (median(&mut medians[1]), median(&mut walls[1]));
    println!(
        "demo model (context 2048), f32, in process; {CLIENTS} concurrent requests sharing a {SHARED}-token prompt"
    );
    println!(
        "{:>16} {:>14} {:>22}",
        "prefix caching", "median TTFT", "all first tokens by"
    );
    println!("{:>16} {:>14.3?} {:>22.3?}", "on", on.0, on.1);
    println!("{:>16} {:>14.3?} {:>22.3?}", "off", off.0, off.1);
    println!(
        "speed-up of the median TTFT: {:.2}x; of the wave: {:.2}x",
        off.0.as_secs_f64() / on.0.as_secs_f64(),
        off.1.as_secs_f64() / on.1.as_secs_f64()
    );
}
