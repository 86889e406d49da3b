//! `coordinator cluster`: starts expert nodes, runs the command, and leaves no child process
//! behind — after success, after an error, and after Ctrl-C.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use omnishard_tests::{PATIENCE, bin, model_dir, process_alive};

/// The pids the cluster printed ("cluster: started expert-node i/N (pid P)").
fn child_pids(stderr: &str) -> Vec<u32> {
    stderr
        .lines()
        .filter_map(|l| l.split("(pid ").nth(1))
        .filter_map(|rest| rest.trim_end_matches(')').parse().ok())
        .collect()
}

fn cluster(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(["cluster", "--nodes", "2", "--model"])
        .arg(model_dir("omni-gqa-top4"))
        .args(args)
        .env_remove("RUST_BACKTRACE");
    cmd
}

fn assert_all_gone(pids: &[u32]) {
    let deadline = Instant::now() + PATIENCE;
    while pids.iter().any(|&p| process_alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in pids {
        assert!(
            !process_alive(pid),
            "expert-node pid {pid} outlived the cluster"
        );
    }
}

#[test]
fn success_matches_in_process_and_stops_children() {
    let out = cluster(&["score", "--token-ids", "5,17,42"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let pids = child_pids(&stderr);
    assert_eq!(pids.len(), 2, "{stderr}");
    assert_all_gone(&pids);
    let local = Command::new(bin("coordinator"))
        .args(["score", "--token-ids", "5,17,42", "--model"])
        .arg(model_dir("omni-gqa-top4"))
        .output()
        .unwrap();
    assert_eq!(
        out.stdout, local.stdout,
        "cluster and in-process logits differ"
    );
}

#[test]
fn node_devices_name_one_device_for_all_or_one_per_node() {
    let score = ["score", "--token-ids", "5,17,42"];
    let with_devices = |devices: &str| {
        let args: Vec<&str> = ["--node-devices", devices]
            .iter()
            .chain(&score)
            .copied()
            .collect();
        let out = cluster(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out, stderr)
    };
    let plain = cluster(&score).output().unwrap();
    let (out, stderr) = with_devices("cpu,cpu");
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        out.stdout, plain.stdout,
        "one device per node changed the logits"
    );
    assert_all_gone(&child_pids(&stderr));
    // Three devices for two nodes fits neither form: refused before any node starts.
    let (out, stderr) = with_devices("cpu,cpu,cpu");
    assert!(!out.status.success());
    assert!(stderr.contains("3 node devices for 2 nodes"), "{stderr}");
    assert!(child_pids(&stderr).is_empty(), "{stderr}");
}

#[test]
fn error_stops_children() {
    let out = cluster(&["score", "--token-ids", "5,99999"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("out of range"), "{stderr}");
    let pids = child_pids(&stderr);
    assert_eq!(pids.len(), 2, "{stderr}");
    assert_all_gone(&pids);
}

#[test]
fn ctrl_c_stops_children() {
    for signal in ["INT", "KILL"] {
        let mut child = cluster(&[
            "generate",
            "--prompt",
            "The coordinator",
            "--max-tokens",
            "400",
        ])
        .env("OMNISHARD_RPC_TIMEOUT_MS", "60000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        // Wait until both nodes have been started, then interrupt the coordinator alone.
        let mut seen = String::new();
        let mut buf = [0u8; 256];
        while child_pids(&seen).len() < 2 {
            let n = stderr.read(&mut buf).unwrap();
            assert!(n > 0, "coordinator exited early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let pids = child_pids(&seen);
        Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        child.wait().unwrap();
        assert_all_gone(&pids);
    }
}
