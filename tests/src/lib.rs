//! Shared helpers of the end-to-end tests: where the fixtures are, their golden outputs (made by
//! `tests/fixtures/make_fixtures.py` with transformers 4.57.3), and logit comparison.

pub mod cluster_api;
pub mod fuzz;
pub mod omni;
pub mod pki;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omnishard_coordinator::Positions;
use serde::Deserialize;

/// How long a test waits for something that must happen (a metric to settle, a node to be
/// re-admitted, a process to exit) before failing. Generous on purpose: these waits end as soon
/// as the condition holds, and this bound only turns a hang into a failure; it is not a
/// performance goal, so a loaded machine must not trip it.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Every fixture model, as named under `tests/fixtures/models/`.
pub const FIXTURES: [&str; 4] = [
    "omni-gqa-top4",
    "omni-tied-dense-top1",
    "omni-mqa-step2",
    "qwen3moe-flat",
];

/// This crate's directory: where it was built, or `OMNISHARD_TESTS_DIR` for test binaries run
/// from another checkout (the GPU checks run prebuilt binaries on the device machine).
pub fn tests_dir() -> PathBuf {
    std::env::var_os("OMNISHARD_TESTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixtures_dir() -> PathBuf {
    tests_dir().join("fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures_dir().join("models").join(name)
}

/// Golden outputs of one fixture.
#[derive(Debug, Deserialize)]
pub struct Golden {
    pub token_ids: Vec<u32>,
    pub logits_f32: Vec<Vec<f32>>,
    pub greedy_f32: Vec<u32>,
    pub position_ids: Option<[Vec<u32>; 3]>,
    pub logits_mrope_f32: Option<Vec<Vec<f32>>>,
    pub missing_experts: Vec<(usize, usize)>,
    pub logits_masked_f32: Vec<Vec<f32>>,
    pub logits_bf16: Vec<Vec<f32>>,
}

impl Golden {
    pub fn load(name: &str) -> Self {
        let path = fixtures_dir().join("golden").join(format!("{name}.json"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    pub fn positions(&self) -> Option<Positions> {
        self.position_ids.clone().map(|rows| Positions { rows })
    }
}

/// How two logit matrices compare.
#[derive(Debug, Clone, Copy)]
pub struct Diff {
    /// max |a - b| over all entries.
    pub max_abs: f32,
    /// max |reference| over all entries.
    pub max_ref: f32,
    /// Fraction of rows whose argmax agrees.
    pub argmax_agree: f64,
}

impl Diff {
    /// max |a - b| relative to max(1, max |reference|).
    pub fn relative(&self) -> f32 {
        self.max_abs / self.max_ref.max(1.0)
    }
}

pub fn compare(ours: &[Vec<f32>], reference: &[Vec<f32>]) -> Diff {
    assert_eq!(ours.len(), reference.len(), "row count differs");
    let mut max_abs = 0f32;
    let mut max_ref = 0f32;
    let mut agree = 0;
    for (a, b) in ours.iter().zip(reference) {
        assert_eq!(a.len(), b.len(), "row width differs");
        for (x, y) in a.iter().zip(b) {
            assert!(x.is_finite(), "non-finite logit {x}");
            max_abs = max_abs.max((x - y).abs());
            max_ref = max_ref.max(y.abs());
        }
        if omnishard_coordinator::sampling::argmax(a) == omnishard_coordinator::sampling::argmax(b)
        {
            agree += 1;
        }
    }
    Diff {
        max_abs,
        max_ref,
        argmax_agree: agree as f64 / ours.len().max(1) as f64,
    }
}

/// bf16 bound per row: max |difference| <= BF16_TOL * max(1, max |logit|). bf16 keeps 8 bits of
/// mantissa; we round at the same points as the reference but sum in other orders inside
/// matmuls, so rows differ by a few 2^-8 relative.
pub const BF16_TOL: f32 = 0.05;
/// Share of rows that must be within BF16_TOL. A router near-tie (second and third expert within
/// ~2% probability) can pick another expert in either bf16 implementation and move that one row
/// by O(1); seen once in 22 rows on qwen3moe-flat, where f32 agrees with both.
pub const BF16_ROWS_WITHIN: f64 = 0.9;

/// Asserts that bf16 logits `ours` agree with `reference` as the bf16 fidelity tests require
/// (rows within [`BF16_TOL`], argmax agreement), printing the error distribution.
pub fn assert_bf16_close(label: &str, ours: &[Vec<f32>], reference: &[Vec<f32>]) {
    let diff = compare(ours, reference);
    let rows: Vec<f32> = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| {
            compare(std::slice::from_ref(a), std::slice::from_ref(b)).max_abs
                / diff.max_ref.max(1.0)
        })
        .collect();
    let within = rows.iter().filter(|&&r| r <= BF16_TOL).count() as f64 / rows.len() as f64;
    let mut sorted = rows.clone();
    sorted.sort_by(f32::total_cmp);
    eprintln!(
        "{label} bf16: relative row error median {:.3e}, max {:.3e}; rows within {BF16_TOL}: {:.1}%; argmax agreement {:.1}%",
        sorted[sorted.len() / 2],
        diff.relative(),
        100.0 * within,
        100.0 * diff.argmax_agree
    );
    assert!(within >= BF16_ROWS_WITHIN, "{label}: rows {rows:?}");
    assert!(diff.argmax_agree >= 0.95, "{label}: {diff:?}");
}

/// Every node of a cluster took calls through its shared-memory lane (`used`), or none did.
pub fn assert_lanes(status: &[omnishard_coordinator::remote::NodeStatus], used: bool, how: &str) {
    for node in status {
        assert_eq!(
            node.lane_calls > 0,
            used,
            "{how}: {} took {} calls through its lane",
            node.name,
            node.lane_calls
        );
    }
}

/// Bit-for-bit equality of two logit matrices.
pub fn assert_bits_equal(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (ra, rb)) in a.iter().zip(b).enumerate() {
        let same = ra.iter().zip(rb).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "{what}: row {i} differs (max |diff| {})",
            compare(std::slice::from_ref(ra), std::slice::from_ref(rb)).max_abs
        );
    }
}

/// Runs each prompt through `model` alone (text positions from 0) and returns their caches.
pub fn prefill_each(
    model: &omnishard_coordinator::Model,
    prompts: &[Vec<u32>],
) -> Vec<omnishard_coordinator::KvCache> {
    use omnishard_coordinator::{KvCache, LogitsFor, SequenceInput};
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
    for (p, cache) in prompts.iter().zip(caches.iter_mut()) {
        let mut batch = [SequenceInput {
            tokens: p,
            positions: Positions::text(0, p.len()),
            cache,
        }];
        model.forward(&mut batch, LogitsFor::Last).expect("prefill");
    }
    caches
}

/// Copies a fixture model into a fresh temporary directory, for tests that damage it.
pub fn scratch_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(model_dir(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

/// A binary of this workspace, built next to the test executable by `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .expect("target dir");
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// Runs `coordinator score ARGS...` and returns its stdout (the logits JSON); fails the test
/// with the coordinator's stderr if it does not succeed.
pub fn coordinator_score(args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let out = std::process::Command::new(bin("coordinator"))
        .arg("score")
        .args(args)
        .output()
        .expect("run coordinator");
    assert!(
        out.status.success(),
        "coordinator score failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A real `expert-node` process; killed when dropped.
pub struct ExpertNode {
    pub child: std::process::Child,
    pub address: String,
}

impl ExpertNode {
    /// Starts `expert-node --model DIR --listen 127.0.0.1:0 ARGS...` and waits for its
    /// "listening on" line (it may still be loading: the coordinator waits for that).
    pub fn start(model: &std::path::Path, args: &[&str]) -> Self {
        Self::start_at(model, "127.0.0.1:0", args)
    }

    /// Like [`ExpertNode::start`], listening on `listen` (e.g. to restart on the same port).
    pub fn start_at(model: &std::path::Path, listen: &str, args: &[&str]) -> Self {
        let mut cmd = std::process::Command::new(bin("expert-node"));
        cmd.arg("--model")
            .arg(model)
            .args(["--listen", listen])
            .args(args);
        let (child, address) = spawn_listening(cmd);
        Self { child, address }
    }

    /// Starts shard i of n for every i.
    pub fn shards(model: &std::path::Path, n: usize, dtype: &str) -> Vec<Self> {
        (0..n)
            .map(|i| Self::start(model, &["--shard", &format!("{i}/{n}"), "--dtype", dtype]))
            .collect()
    }

    /// Kills the node and starts `model` with `args` on the same address.
    pub fn restart(&mut self, model: &std::path::Path, args: &[&str]) {
        self.signal("KILL");
        let _ = self.child.wait();
        *self = Self::start_at(model, &self.address.clone(), args);
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

/// Spawns a server process with `RUST_LOG=warn` and returns it with the address of its first
/// stdout line, "listening on ADDR"; the rest of its stdout is drained.
fn spawn_listening(cmd: std::process::Command) -> (std::process::Child, String) {
    spawn_listening_logged(cmd, "warn", false).0
}

/// Like [`spawn_listening`] with `RUST_LOG=filter`; with `capture`, stderr is collected into the
/// returned buffer (by a thread, as it comes) instead of going to the test's stderr.
fn spawn_listening_logged(
    mut cmd: std::process::Command,
    filter: &str,
    capture: bool,
) -> ((std::process::Child, String), Arc<Mutex<String>>) {
    use std::io::BufRead;
    cmd.env("RUST_LOG", filter)
        .stdout(std::process::Stdio::piped());
    if capture {
        cmd.stderr(std::process::Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn");
    let log = Arc::new(Mutex::new(String::new()));
    if let Some(stderr) = child.stderr.take() {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
    }
    let mut reader = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("read stdout");
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            panic!(
                "unexpected first line {line:?}; stderr: {}",
                log.lock().unwrap_or_else(|e| e.into_inner())
            )
        })
        .to_string();
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    ((child, address), log)
}

impl Drop for ExpertNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn addresses(nodes: &[ExpertNode]) -> Vec<String> {
    nodes.iter().map(|n| n.address.clone()).collect()
}

/// Whether a process still exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}

/// A real `coordinator ... serve` process on a free port; interrupted (Ctrl-C) when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub url: String,
    /// Its stderr (and, under `cluster`, its expert nodes'), when started with
    /// [`Server::start_logged`].
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Runs `coordinator ARGS... --listen 127.0.0.1:0` (ARGS must end with the `serve` command
    /// and its flags) and waits for its "listening on" line.
    pub fn start(args: &[&str]) -> Self {
        let mut cmd = std::process::Command::new(bin("coordinator"));
        cmd.args(args).args(["--listen", "127.0.0.1:0"]);
        let (child, url) = spawn_listening(cmd);
        Self {
            child,
            url,
            log: Arc::default(),
        }
    }

    /// Like [`Server::start`] with `RUST_LOG=filter`, collecting stderr for [`Server::log`]. The
    /// nodes that `coordinator cluster` starts inherit both, so their lines are there too.
    pub fn start_logged(args: &[&str], filter: &str) -> Self {
        let mut cmd = std::process::Command::new(bin("coordinator"));
        cmd.args(args).args(["--listen", "127.0.0.1:0"]);
        let ((child, url), log) = spawn_listening_logged(cmd, filter, true);
        Self { child, url, log }
    }

    /// What the server has written to stderr so far (empty unless started with
    /// [`Server::start_logged`]).
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// POSTs `body` as JSON to `path`: the status and the JSON answer (null if it is not JSON).
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// POSTs a streamed request and returns its server-sent `data:` payloads as JSON, `[DONE]`
    /// left out; fails the test unless the answer is 200.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Vec<serde_json::Value> {
        let resp = reqwest::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    /// The text of /metrics.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Value of a metric with no labels but the served model's `model_name` from /metrics.
    /// Panics, naming it, if /metrics does not have it: a renamed or removed metric must fail
    /// the tests that read it, not read as 0.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text().await;
        let value = text
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?;
                let rest = match rest.strip_prefix("{model_name=\"") {
                    Some(labelled) => labelled.split_once("\"} ")?.1,
                    None => rest.strip_prefix(' ')?,
                };
                Some(rest)
            })
            .unwrap_or_else(|| panic!("metric {name} is not in /metrics"));
        value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("metric {name} has value {value:?}, not a number: {e}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        // Not an assertion: a server still running after this is killed.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The demo model shipped with the coordinator.
pub fn demo_model() -> PathBuf {
    tests_dir().join("../coordinator/demo-model")
}

/// An expert node served from this process on a loopback port (the real tonic service, for
/// benchmarks that cannot rely on release binaries being built). Returns its address.
pub fn in_process_node(
    rt: &tokio::runtime::Runtime,
    model: &std::path::Path,
    pairs: &[(usize, usize)],
) -> String {
    use std::sync::Arc;
    let cfg = omnishard_proto::ModelConfig::from_model_dir(model).expect("config");
    let ckpt = omnishard_model::Checkpoint::open(model).expect("checkpoint");
    let experts = omnishard_model::LocalExperts::load(
        &ckpt,
        &cfg,
        pairs,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        |_, _| {},
    )
    .expect("experts");
    let state = Arc::new(omnishard_expert::NodeState::new(
        format!("in-process-{}", pairs.len()),
        omnishard_model::fingerprint::fingerprint(&cfg, &ckpt).expect("fingerprint"),
        candle_core::DType::F32,
        candle_core::Device::Cpu,
    ));
    state.install(experts);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    rt.spawn(omnishard_expert::serve(
        listener,
        state,
        omnishard_expert::ServeOptions::default(),
        std::future::pending(),
    ));
    address
}
