//! Defaults that the coordinator and the expert nodes must agree on, and where each binary finds
//! the demo model, defined once.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest gRPC message either side sends or accepts, unless `--max-message-mib` says otherwise.
pub const MAX_MESSAGE_MIB: usize = 512;

/// How long the coordinator waits for its expert nodes to accept connections and finish loading.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Deadline of one layer's call to one node.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the coordinator checks every node's health in the background.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// The least time a call to a replicated expert set waits before it is hedged to replicas
/// (the threshold itself adapts to each node's latency).
pub const HEDGE_FLOOR: Duration = Duration::from_millis(100);

/// Sequences a step needs before the coordinator splits it into two overlapped micro-batches
/// (expert nodes only). Below this the split costs more than it hides: each micro-batch's call
/// reads nearly every expert a node holds again: on GPU nodes batch 32 ran slower split in 9
/// of 10 measured pairs (up to 45%), batch 128 with one node 11-28% faster (BENCHMARKS.md,
/// issue 15).
pub const OVERLAP_MIN_SEQUENCES: usize = 64;

/// HTTP/2 flow-control windows of the expert-call connections, both ways: a layer's answer
/// (one row per assignment) is megabytes at batch 128 and tens of MiB at prefill, and with the
/// protocol's default 64 KiB windows each such message crossed loopback in dozens of
/// window-update round trips.
pub const HTTP2_STREAM_WINDOW: u32 = 32 << 20;
pub const HTTP2_CONNECTION_WINDOW: u32 = 128 << 20;

/// How long the coordinator's HTTP server waits for a connection to send a request head
/// (including idle keep-alive time) before closing it.
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Log filter of both binaries when `RUST_LOG` is not set.
pub const LOG_FILTER: &str = "info";

/// Environment variable naming the demo model directory explicitly.
pub const DEMO_MODEL_ENV: &str = "OMNISHARD_DEMO_MODEL";

/// The demo model's directory name: next to the executable in an installation, or
/// `coordinator/demo-model` in a source checkout.
const DEMO_MODEL_DIR: &str = "demo-model";

/// The demo model shipped with omnishard, found at run time (not compiled in, so a binary copied
/// elsewhere or into a container still finds it or says where it looked): `$OMNISHARD_DEMO_MODEL`,
/// then `demo-model/` next to the executable, then `coordinator/demo-model/` in a source checkout
/// above the executable (`target/<profile>/` of a build), then in the source tree it was built
/// from.
pub fn demo_model_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(DEMO_MODEL_ENV) {
        let dir = PathBuf::from(dir);
        return if dir.join("config.json").is_file() {
            Ok(dir)
        } else {
            Err(format!(
                "{DEMO_MODEL_ENV}={} holds no config.json; point it at the demo model directory or pass --model DIR",
                dir.display()
            ))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this executable: {e}"))?;
    let candidates = demo_model_candidates(&exe);
    candidates
        .iter()
        .find(|dir| dir.join("config.json").is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "no --model given and the demo model is not installed (looked in {}); pass --model DIR or set {DEMO_MODEL_ENV}",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn demo_model_candidates(exe: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Some(bin_dir) = exe.parent() else {
        return out;
    };
    out.push(bin_dir.join(DEMO_MODEL_DIR));
    out.extend(
        bin_dir
            .ancestors()
            .skip(1)
            .map(|dir| dir.join("coordinator").join(DEMO_MODEL_DIR)),
    );
    // Last, the source tree this binary was built from, for builds whose target directory lies
    // outside the checkout (CARGO_TARGET_DIR). A binary copied to another machine does not find
    // it and gets the error listing every place tried.
    out.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../coordinator")
            .join(DEMO_MODEL_DIR),
    );
    out
}

/// Hidden rows for one expert node from which a coordinator on a GPU sends them in its GPU
/// memory (CUDA IPC) rather than as bytes: 16 rows of Qwen3-30B-A3B's 2048 bf16. Below this,
/// gathering and staging them costs more than it saves.
pub const IPC_INPUT_MIN_BYTES: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_cover_installs_and_build_trees() {
        let c = demo_model_candidates(Path::new("/repo/target/release/coordinator"));
        assert_eq!(c[0], Path::new("/repo/target/release/demo-model"));
        assert!(c.contains(&PathBuf::from("/repo/coordinator/demo-model")));
    }
}
