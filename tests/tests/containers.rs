//! The cluster across hosts: deploy/compose.yaml brought up on a private Docker network (a
//! coordinator and four expert nodes, each of two shards on two nodes, each container with its own
//! address), from an image built by deploy/Dockerfile out of this build's binaries on a base made
//! from the host's libraries (no registry needed). Checks that greedy output through the
//! containers equals the in-process output; that a replica cut off mid-stream by `docker network
//! disconnect` (packets dropped, no reset) costs no request and no token and is re-admitted once
//! reconnected; that a rolling restart of all four nodes under load fails no request; and, with
//! deploy/compose.tls.yaml, that mutual TLS serves and refuses clients of another CA.
//!
//! Skipped, saying why, where no Docker daemon answers. Measured figures are printed on lines
//! starting with `MEASURED` (for BENCHMARKS.md). Everything it makes (images, containers,
//! networks) is removed at the end, also on failure.

#[path = "containers/certs.rs"]
mod certs;
#[path = "containers/docker.rs"]
mod docker;
#[path = "containers/load.rs"]
mod load;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use docker::{Compose, Images, repo_root};
use load::{Api, Load, Summary};
use omnishard_tests::Server;

/// The longest stall between tokens allowed while a replica is partitioned (hedging).
const STALL_GOAL: Duration = Duration::from_millis(500);
/// The coordinator's default `--health-interval-ms`: a healed node must be back within two.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
const READMISSION_SLACK: Duration = Duration::from_secs(1);
const NODES: [&str; 4] = ["expert-0a", "expert-0b", "expert-1a", "expert-1b"];
const API_KEY: &str = "containers-test-key";
const PROMPTS: [&str; 3] = [
    "The lighthouse keeper of Omnishard Island",
    "On calm nights",
    "When a storm broke the cable",
];
const GREEDY_TOKENS: usize = 48;

#[test]
fn cluster_in_containers() {
    if let Some(why) = docker::unavailable() {
        eprintln!("containers: skipped: {why}");
        return;
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The in-process reference first, alone on the CPU.
    let reference = rt.block_on(reference_outputs());
    let images = Images::build();
    let tmp = tempfile::tempdir().expect("temp dir");
    let env_file = tmp.path().join("test.env");
    std::fs::write(&env_file, format!("OMNISHARD_API_KEY={API_KEY}\n")).expect("env file");
    docker::share_with_containers(tmp.path());
    let files = vec![repo_root().join("deploy/compose.yaml")];
    let env = vec![
        ("OMNISHARD_IMAGE".into(), images.image.clone()),
        (
            "OMNISHARD_ENV_FILE".into(),
            env_file.to_string_lossy().into_owned(),
        ),
        ("OMNISHARD_PUBLISH".into(), "127.0.0.1:".into()),
        ("OMNISHARD_HEALTHCHECK_INTERVAL".into(), "1s".into()),
        (
            "OMNISHARD_MODEL_DIR".into(),
            repo_root()
                .join("coordinator/demo-model")
                .to_string_lossy()
                .into_owned(),
        ),
    ];
    {
        let cluster = Compose::up(files.clone(), env.clone(), Duration::from_secs(240));
        let api = Api::new(&cluster.api_address(), API_KEY);
        rt.block_on(async {
            wait_ready(&api).await;
            let status = api.status_without_key("/v1/models").await.expect("request");
            assert_eq!(
                status, 401,
                "the API key from the env file must be required"
            );
            greedy_matches(&api, &reference, PROMPTS.len()).await;
        });
        partition(&rt, &cluster, &api);
        rolling_restart(&rt, &cluster, &api);
    }
    mutual_tls(&rt, &images, tmp.path(), files, env, &reference);
    eprintln!(
        "containers: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Greedy completions of [`PROMPTS`] from a coordinator with its experts in process.
async fn reference_outputs() -> Vec<String> {
    let server = Server::start(&["serve"]);
    let address = server.url.trim_start_matches("http://").to_string();
    let api = Api::new(&address, "unused");
    let mut out = Vec::new();
    for prompt in PROMPTS {
        out.push(
            api.complete(prompt, GREEDY_TOKENS)
                .await
                .expect("reference"),
        );
    }
    out
}

async fn greedy_matches(api: &Api, reference: &[String], n: usize) {
    for (prompt, expected) in PROMPTS.iter().zip(reference).take(n) {
        let text = api
            .complete(prompt, GREEDY_TOKENS)
            .await
            .expect("completion");
        assert_eq!(
            &text, expected,
            "greedy output through the containers for {prompt:?}"
        );
    }
    eprintln!("containers: greedy output of {n} prompts equals the in-process output");
}

/// Waits for `GET /health` to answer 200 (every expert covered by a live node).
async fn wait_ready(api: &Api) {
    let started = Instant::now();
    loop {
        let nodes = api.nodes().await;
        if nodes
            .as_ref()
            .is_ok_and(|n| n.len() == 4 && n.iter().all(|n| n["up"] == true))
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the cluster did not come up: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_load(what: &str, s: &Summary, since: Option<Instant>) {
    let at = match (s.max_gap_at, since) {
        (Some(at), Some(since)) if at >= since => {
            format!(" (ended {:.2} s after the cut)", (at - since).as_secs_f64())
        }
        _ => String::new(),
    };
    eprintln!(
        "MEASURED {what}: {} requests, {} failed, {} short; longest stall between tokens {:.3} s{at}; \
         longest time to first token {:.3} s",
        s.requests,
        s.failed.len(),
        s.short,
        s.max_gap.as_secs_f64(),
        s.max_ttft.as_secs_f64()
    );
}

/// (2) One replica cut off by `docker network disconnect` under concurrent streams, then
/// reconnected.
fn partition(rt: &tokio::runtime::Runtime, cluster: &Compose, api: &Api) {
    let victim = "expert-0a";
    let container = cluster.container(victim);
    let network = cluster.network("experts");
    rt.block_on(async {
        let load = Load::start(api, 4, 160);
        tokio::time::sleep(Duration::from_secs(2)).await;
        docker_async(&["network", "disconnect", &network, &container]).await;
        let cut = Instant::now();
        let detected = api.wait_node(victim, false, Duration::from_secs(60)).await;
        let detected = detected.expect("the coordinator never marked the partitioned node down");
        // Streams keep going on the replica for a while.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let summary = load.finish(Duration::from_secs(120)).await;
        eprintln!(
            "MEASURED partition: node marked down {:.2} s after the cut",
            detected.as_secs_f64()
        );
        print_load("partition", &summary, Some(cut));
        assert!(
            summary.failed.is_empty(),
            "failed requests: {:?}",
            summary.failed
        );
        assert_eq!(summary.short, 0, "requests that lost tokens");
        assert!(summary.max_gap <= STALL_GOAL, "stall {:?}", summary.max_gap);

        let before_heal = api.node(victim).await.expect("node status");
        docker_async(&[
            "network", "connect", "--alias", victim, &network, &container,
        ])
        .await;
        let back = api.wait_node(victim, true, Duration::from_secs(30)).await;
        let back = back.expect("the reconnected node was not re-admitted");
        let goal = if back <= 2 * HEALTH_INTERVAL {
            "met"
        } else {
            "MISSED"
        };
        eprintln!(
            "MEASURED partition: re-admitted {:.2} s after reconnecting (goal: within 2 health \
             intervals of {:.1} s: {goal}; last error while cut off: {})",
            back.as_secs_f64(),
            HEALTH_INTERVAL.as_secs_f64(),
            before_heal["last_error"]
        );
        // The goal above, with a second of slack for Docker re-registering the node's name in
        // its DNS after `network connect` (seen once at 2.4 s in some tens of runs).
        assert!(
            back <= 2 * HEALTH_INTERVAL + READMISSION_SLACK,
            "re-admission took {back:?}"
        );
        // It takes its share of the work again.
        let before = assignments(api, victim).await;
        let load = Load::start(api, 2, 32);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let summary = load.finish(Duration::from_secs(60)).await;
        assert!(
            summary.failed.is_empty(),
            "after healing: {:?}",
            summary.failed
        );
        let after = assignments(api, victim).await;
        assert!(
            after > before,
            "the re-admitted node gets no work ({before} -> {after})"
        );
    });
}

async fn assignments(api: &Api, host: &str) -> u64 {
    let node = api.node(host).await.expect("node status");
    node["assignments"].as_u64().expect("assignments")
}

/// `docker ARGS...` from async code, bounded; fails the test unless it succeeds.
async fn docker_async(args: &[&str]) {
    let mut cmd = tokio::process::Command::new("docker");
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("docker {args:?} timed out"))
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"));
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (3) `docker restart` of every node, one at a time, under a steady stream of requests: each
/// waits for the restarted node to be healthy and answering the coordinator's calls again.
fn rolling_restart(rt: &tokio::runtime::Runtime, cluster: &Compose, api: &Api) {
    let containers: Vec<String> = NODES.iter().map(|n| cluster.container(n)).collect();
    rt.block_on(async {
        let load = Load::start(api, 2, 64);
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (node, container) in NODES.iter().zip(&containers) {
            let started = Instant::now();
            docker_async(&["restart", "-t", "30", container]).await;
            let restarted = started.elapsed();
            let deadline = Instant::now() + Duration::from_secs(120);
            while health(container).await != "healthy" {
                assert!(
                    Instant::now() < deadline,
                    "{node} not healthy after restart"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let healthy = started.elapsed();
            // Serving the coordinator again: up, and answering calls from the new process.
            let base = assignments(api, node).await;
            while !(api.node(node).await.is_ok_and(|n| n["up"] == true)
                && assignments(api, node).await > base)
            {
                assert!(
                    Instant::now() < deadline,
                    "{node} not re-admitted after restart"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            eprintln!(
                "MEASURED rolling restart: {node} restarted in {:.2} s, healthy after {:.2} s, \
                 serving again after {:.2} s",
                restarted.as_secs_f64(),
                healthy.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let summary = load.finish(Duration::from_secs(120)).await;
        print_load("rolling restart", &summary, None);
        assert!(
            summary.failed.is_empty(),
            "failed requests: {:?}",
            summary.failed
        );
        assert_eq!(summary.short, 0, "requests that lost tokens");
    });
}

async fn health(container: &str) -> String {
    let mut cmd = tokio::process::Command::new("docker");
    cmd.args(["inspect", "-f", "{{.State.Health.Status}}", container])
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(30), cmd.output()).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        other => format!("{other:?}"),
    }
}

/// (4) The same cluster with deploy/compose.tls.yaml: it serves, and refuses a plaintext client,
/// a client whose certificate another CA signed, and a client that trusts another CA.
fn mutual_tls(
    rt: &tokio::runtime::Runtime,
    images: &Images,
    tmp: &std::path::Path,
    mut files: Vec<PathBuf>,
    mut env: Vec<(String, String)>,
    reference: &[String],
) {
    let tls = tmp.join("tls");
    std::fs::create_dir_all(&tls).expect("tls dir");
    certs::make(&tls);
    docker::share_with_containers(&tls);
    files.insert(1, repo_root().join("deploy/compose.tls.yaml"));
    env.push((
        "OMNISHARD_TLS_DIR".into(),
        tls.to_string_lossy().into_owned(),
    ));
    let cluster = Compose::up(files, env, Duration::from_secs(240));
    let api = Api::new(&cluster.api_address(), API_KEY);
    rt.block_on(async {
        wait_ready(&api).await;
        greedy_matches(&api, reference, 1).await;
    });
    let dir = "/etc/omnishard/tls";
    let probe = |cert: &str, ca: &str, scheme: &str| -> (bool, String) {
        let volume = format!("{}:{dir}:ro", tls.display());
        let (crt, key, ca) = (
            format!("{dir}/{cert}.crt"),
            format!("{dir}/{cert}.key"),
            format!("{dir}/{ca}.crt"),
        );
        let node = format!("{scheme}expert-0a:50051");
        let mut args = vec!["-v", &volume, &images.image, "probe", "--node", &node];
        if !scheme.is_empty() {
            args.extend(["--tls-cert", &crt, "--tls-key", &key, "--tls-ca", &ca]);
        }
        let out = cluster.run_beside("experts", &args, Duration::from_secs(60));
        (out.ok, out.text().trim().to_string())
    };
    // Another container on the nodes' network, first with the cluster's own client certificate.
    let (ok, text) = probe("coordinator", "ca", "https://");
    assert!(
        ok,
        "a client with the cluster's certificate is refused: {text}"
    );
    for (cert, ca, scheme, what) in [
        (
            "rogue",
            "ca",
            "https://",
            "with a certificate from another CA",
        ),
        (
            "coordinator",
            "rogue-ca",
            "https://",
            "that trusts another CA",
        ),
        ("coordinator", "ca", "", "in plaintext"),
    ] {
        let (ok, text) = probe(cert, ca, scheme);
        assert!(!ok, "a client {what} was let in");
        eprintln!("containers: mTLS: a client {what} is refused: {text}");
    }
    // A whole coordinator with another CA's certificate does not start.
    let volume = format!("{}:{dir}:ro", tls.display());
    let (ca, crt, key) = (
        format!("{dir}/ca.crt"),
        format!("{dir}/rogue.crt"),
        format!("{dir}/rogue.key"),
    );
    let nodes = "https://expert-0a:50051,https://expert-1a:50051";
    let args = [
        "-v",
        &volume,
        &images.image,
        "serve",
        "--nodes",
        nodes,
        "--startup-timeout-s",
        "5",
        "--tls-ca",
        &ca,
        "--tls-cert",
        &crt,
        "--tls-key",
        &key,
    ];
    let out = cluster.run_beside("experts", &args, Duration::from_secs(90));
    assert!(
        !out.ok,
        "a coordinator with another CA's certificate started"
    );
    let last = out.text().trim().lines().last().unwrap_or("").to_string();
    eprintln!("containers: mTLS: a coordinator with another CA's certificate stops: {last}");
}
