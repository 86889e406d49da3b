//! The server under abuse (issue 11): 200 concurrent clients for a bounded time against a real
//! `coordinator serve` process on the demo model — 20 ordinary streaming completions and 180
//! abusive ones (2 MB prompts, 60,000-message chats, over-long stop strings, NaN-inducing
//! penalties, malformed JSON, request heads that never finish, streams dropped after the first
//! token) — while one probe stream after another measures the inter-token latency an ordinary
//! user sees. Prints the probe's p50 / p99 inter-token gap unloaded, with only the clients whose
//! requests generate (the ordinary ones and those that drop their streams: their sequences
//! share the batch with the probe's), and under the whole load, the ratios, the coordinator's
//! peak resident memory, and what the abusive requests were answered. The clients' threads run at nice 10, standing in for
//! clients on other machines (here they share the server's two cores); the server and the probe
//! run at the normal priority.
//!
//! Run: `cargo build --release --bins && cargo bench -p omnishard-tests --bench abuse_load`
//! (the server is the release `coordinator` binary next to this bench's executable).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use omnishard_tests::Server;
use serde_json::{Value, json};

const CLIENTS: usize = 200;
const ORDINARY: usize = 20;
const LOAD_SECONDS: u64 = 30;
const ADMITTED_SECONDS: u64 = 15;
const PROBE_TOKENS: usize = 64;

/// Gaps between the text chunks of one greedy streamed completion; `Err` says why the probe got
/// no stream.
async fn probe(client: &reqwest::Client, url: &str) -> Result<Vec<Duration>, String> {
    let body = json!({"prompt": "The lighthouse keeper", "max_tokens": PROBE_TOKENS,
        "temperature": 0, "ignore_eos": true, "stream": true});
    let resp = client
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut stream = resp.bytes_stream();
    let (mut last, mut gaps, mut buf) = (None::<Instant>, Vec::new(), String::new());
    while let Some(bytes) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&bytes.map_err(|e| e.to_string())?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if event.contains("\"error\"") {
                return Err(event);
            }
            if event.contains("\"text\"") {
                let now = Instant::now();
                if let Some(prev) = last {
                    gaps.push(now - prev);
                }
                last = Some(now);
            }
        }
    }
    Ok(gaps)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Probe streams one after another until `until`, on a thread and runtime of their own (so the
/// load's client tasks do not delay the probe's reading); the gaps, the failures, and the
/// largest resident memory of `pid` sampled between probes.
fn probe_thread(
    url: String,
    until: Instant,
    pid: u32,
) -> std::thread::JoinHandle<(Vec<Duration>, Vec<String>, u64)> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("probe runtime");
        rt.block_on(async {
            let client = reqwest::Client::new();
            let (mut gaps, mut failures, mut peak) = (Vec::new(), Vec::new(), 0);
            loop {
                match probe(&client, &url).await {
                    Ok(g) => gaps.extend(g),
                    Err(e) => failures.push(e),
                }
                peak = peak.max(rss_kib(pid, "VmRSS:"));
                if Instant::now() >= until {
                    return (gaps, failures, peak);
                }
            }
        })
    })
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The large abusive bodies, serialized once so that the clients spend no time building them.
struct Bodies {
    huge_prompt: String,
    many_messages: String,
    long_stops: String,
}

impl Bodies {
    fn new() -> Self {
        let messages: Vec<Value> = (0..60_000)
            .map(|_| json!({"role": "user", "content": "x"}))
            .collect();
        Self {
            huge_prompt: json!({"prompt": "a ".repeat(1 << 20), "max_tokens": 4}).to_string(),
            many_messages: json!({"messages": messages, "max_tokens": 4}).to_string(),
            long_stops: json!({"prompt": "hi", "max_tokens": 8, "stream": true,
                "stop": vec!["z".repeat(450 << 10); 4]})
            .to_string(),
        }
    }
}

/// The kind of abusive request client `i` sends; the last, a stream dropped after its first
/// token, is the one that is admitted and generates.
fn abuse_kind(i: usize) -> usize {
    i % 7
}

const DROPPED_STREAM: usize = 6;

/// Whether client `i`'s requests are admitted and generate tokens (ordinary streams and
/// dropped streams), rather than being refused.
fn generates(i: usize) -> bool {
    i < ORDINARY || abuse_kind(i) == DROPPED_STREAM
}

/// One abusive request of kind `abuse_kind(i)` (each client keeps to one kind, so the mix is fixed);
/// returns its label and outcome.
async fn abuse(
    client: &reqwest::Client,
    bodies: &Bodies,
    base: &str,
    addr: &str,
    i: usize,
) -> (String, String) {
    let completions = format!("{base}/v1/completions");
    let chat = format!("{base}/v1/chat/completions");
    let post = |url: String, body: String| {
        let c = client.clone();
        async move {
            let sent = c
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            match sent {
                Ok(r) => r.status().as_u16().to_string(),
                Err(e) => format!("error {}", e.without_url()),
            }
        }
    };
    match abuse_kind(i) {
        0 => (
            "2 MB prompt".into(),
            post(completions, bodies.huge_prompt.clone()).await,
        ),
        1 => (
            "60,000 chat messages".into(),
            post(chat, bodies.many_messages.clone()).await,
        ),
        2 => (
            "4 x 450 KB stop strings".into(),
            post(completions, bodies.long_stops.clone()).await,
        ),
        3 => (
            "repetition_penalty 1e-45".into(),
            post(
                completions,
                json!({"prompt": "hi", "max_tokens": 4, "repetition_penalty": 1e-45}).to_string(),
            )
            .await,
        ),
        4 => {
            let r = client
                .post(completions)
                .header("content-type", "application/json")
                .body("{\"prompt\": [[[[[[[[[[[[[[[[[[[[")
                .send()
                .await;
            (
                "malformed JSON".into(),
                r.map_or_else(|e| e.to_string(), |r| r.status().as_u16().to_string()),
            )
        }
        5 => {
            // A request head that never finishes: the server's header timeout closes it.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                return ("unfinished request head".into(), "connect failed".into());
            };
            let _ = s
                .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                .await;
            let mut buf = [0u8; 512];
            let outcome =
                match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
                    Ok(Ok(_)) => "closed by the server".into(),
                    Ok(Err(e)) => format!("reset: {e}"),
                    Err(_) => "still open after 20 s".into(),
                };
            ("unfinished request head".into(), outcome)
        }
        DROPPED_STREAM => {
            // A stream dropped after its first chunk.
            let body =
                json!({"prompt": "Once", "max_tokens": 200, "ignore_eos": true, "stream": true});
            let outcome = match client.post(completions).json(&body).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let mut s = r.bytes_stream();
                    let _ = s.next().await;
                    format!("{status}, dropped")
                }
                Err(e) => e.to_string(),
            };
            ("stream dropped mid-way".into(), outcome)
        }
        kind => unreachable!("abuse kind {kind}"),
    }
}

/// One ordinary client's request: a short greedy streamed completion, read to its end.
async fn ordinary(client: &reqwest::Client, url: &str) -> String {
    let body = json!({"prompt": "The harbour", "max_tokens": 24, "temperature": 0, "stream": true});
    match client.post(url).json(&body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let mut s = r.bytes_stream();
            while s.next().await.is_some() {}
            status.to_string()
        }
        Err(e) => e.to_string(),
    }
}

/// Lowers the calling thread's CPU priority: the load's client threads stand in for clients on
/// other machines, so they should not take the CPU from the server and the probe, which share
/// this machine's cores with them.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

type Outcomes = BTreeMap<(String, String), usize>;

/// The clients `i` of `0..CLIENTS` that `which` picks (the first `ORDINARY` ordinary, the rest
/// abusive) for `seconds`, with the probe thread measuring meanwhile: the probe's gaps, its
/// failures, the peak RSS sampled, what the clients were answered and how many client tasks
/// were lost to a panic.
fn load(
    server: &Server,
    bodies: &Arc<Bodies>,
    which: fn(usize) -> bool,
    seconds: u64,
) -> (Vec<Duration>, Vec<String>, u64, Outcomes, usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(lower_priority)
        .enable_all()
        .build()
        .expect("runtime");
    let pid = server.child.id();
    let base = server.url("");
    let addr = base.trim_start_matches("http://").to_string();
    let completions = server.url("/v1/completions");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .expect("client");
    let outcomes: Arc<Mutex<Outcomes>> = Arc::default();
    let until = Instant::now() + Duration::from_secs(seconds);
    let prober = probe_thread(completions.clone(), until, pid);
    let lost = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in (0..CLIENTS).filter(|&i| which(i)) {
            let (client, bodies, base, addr, completions, outcomes) = (
                client.clone(),
                bodies.clone(),
                base.clone(),
                addr.clone(),
                completions.clone(),
                outcomes.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let key = if i < ORDINARY {
                        (
                            "ordinary 24-token stream".to_string(),
                            ordinary(&client, &completions).await,
                        )
                    } else {
                        abuse(&client, &bodies, &base, &addr, i).await
                    };
                    *outcomes.lock().unwrap().entry(key).or_default() += 1;
                }
            }));
        }
        let mut lost = 0;
        for t in tasks {
            if let Err(e) = t.await {
                eprintln!("a client task failed: {e}");
                lost += 1;
            }
        }
        lost
    });
    let (mut gaps, failures, peak) = prober.join().expect("the probes");
    gaps.sort();
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    (gaps, failures, peak, outcomes, lost)
}

fn report(what: &str, gaps: &[Duration], failures: &[String]) -> Duration {
    let (p50, p99) = (percentile(gaps, 0.5), percentile(gaps, 0.99));
    println!(
        "probe inter-token gap, {what} ({} gaps, {} failed probes): p50 {p50:?}, p99 {p99:?}",
        gaps.len(),
        failures.len()
    );
    for f in failures.iter().take(3) {
        println!("  a probe failed: {f}");
    }
    p99
}

fn main() {
    let server = Server::start(&["serve", "--http-idle-timeout-s", "5"]);
    let pid = server.child.id();
    let completions = server.url("/v1/completions");
    // Unloaded: probes for a few seconds, after one to warm up.
    let warm = Instant::now() + Duration::from_secs(1);
    let _ = probe_thread(completions.clone(), warm, pid).join();
    let (mut quiet, quiet_failures, _) = probe_thread(
        completions.clone(),
        Instant::now() + Duration::from_secs(5),
        pid,
    )
    .join()
    .expect("the unloaded probes");
    quiet.sort();
    let rss_before = rss_kib(pid, "VmRSS:");
    let bodies = Arc::new(Bodies::new());
    let admitted = (0..CLIENTS).filter(|&i| generates(i)).count();
    let (admitted_gaps, admitted_failures, _, admitted_outcomes, _) =
        load(&server, &bodies, generates, ADMITTED_SECONDS);
    let (loaded, loaded_failures, peak_rss, outcomes, lost) =
        load(&server, &bodies, |_| true, LOAD_SECONDS);
    let hwm = rss_kib(pid, "VmHWM:");
    let q99 = report("unloaded", &quiet, &quiet_failures);
    let a99 = report(
        &format!(
            "the {admitted} generating clients only ({ORDINARY} ordinary, the rest dropping their streams), {ADMITTED_SECONDS} s"
        ),
        &admitted_gaps,
        &admitted_failures,
    );
    for ((kind, outcome), n) in &admitted_outcomes {
        println!("  {kind}: {outcome} x {n}");
    }
    let l99 = report(
        &format!("all {CLIENTS} clients, {LOAD_SECONDS} s"),
        &loaded,
        &loaded_failures,
    );
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "p99, all clients / unloaded: {:.2}; all clients / generating clients only: {:.2} (goal <= 2)",
        ratio(l99, q99),
        ratio(l99, a99)
    );
    println!(
        "coordinator RSS: {} MiB before the load, peak sampled {} MiB, high-water mark {} MiB",
        rss_before >> 10,
        peak_rss >> 10,
        hwm >> 10
    );
    println!("client tasks lost to a panic: {lost}");
    for ((kind, outcome), n) in &outcomes {
        println!("  {kind}: {outcome} x {n}");
    }
}
