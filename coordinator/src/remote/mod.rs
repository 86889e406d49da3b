//! Experts on expert nodes: the coordinator's side of `omnishard.v1.ExpertService`, for the
//! routed experts of Qwen3-Omni-30B-A3B's thinker and of Qwen3-MoE checkpoints.
//!
//! At start-up every node is asked for `Info`; its fingerprint and dtype must match ours, and the
//! routing table is built from what the nodes say they hold. Per MoE layer the tokens are grouped
//! by node (all tokens of an expert go to its live replica with the least outstanding work), all
//! nodes are called concurrently over one long-lived bidirectional stream each (requests tagged
//! with ids, so a decode step opens no new HTTP/2 stream), and the per-assignment outputs are
//! summed in ascending expert order, from zero, by [`omnishard_model::experts::combine`] — the
//! same code as the in-process path, in the order of the reference's loop over experts
//! (`Qwen3OmniMoeThinkerTextSparseMoeBlock`, transformers 4.57.3). Because that order
//! depends only on expert ids, the result is the same bits whatever the placement, whichever
//! replica answered and however often a call failed over.
//! Every call has a deadline; a failure names the node and the layer. A node that fails or stays
//! silent is marked down and its share of the call is re-sent to replicas within the same call.
//!
//! - `client.rs`: one node's stream, request ids, deadlines and the leases on what a node lent.
//! - `lane.rs`: the shared-memory lane to a node on this host, which carries the same calls.
//! - `call_error.rs`: why a call failed and whom it is blamed on.
//! - `membership.rs`: who is in the cluster, joining and retiring, the routing table.
//! - `admission.rs`: dialling one node and checking its identity and experts.
//! - `health.rs`: the background health checks and re-admission.
//! - `fanout.rs`: planning a layer's call over the nodes, failover, [`Experts`] for
//!   [`RemoteExperts`].
//! - `layer_call.rs`: sending a round of a layer's call, hedged to replicas past
//!   `hedge.rs`'s per-node latency threshold.
//! - `routed.rs`: a layer's call with its routing left on the coordinator's GPU.
//! - `pass.rs`: a batch-1 step's routed layers ordered at once, for the CUDA graph.
//! - `verify.rs`: probing a sample of an admitted node's experts against the checkpoint.
//!
//! [`Experts`]: omnishard_model::Experts

mod admission;
mod call_error;
mod client;
mod fanout;
mod health;
mod hedge;
mod lane;
mod layer_call;
mod membership;
mod pass;
mod plan;
mod profile;
mod routed;
mod verify;

pub use profile::ProfileSummary;
pub use verify::{Verifier, VerifyExperts};

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use omnishard_proto::defaults;
use omnishard_proto::placement::ranges_by_layer;

use membership::Shared;

/// Receives the outcome of every per-layer call to a node (for metrics).
pub trait RpcObserver: Send + Sync {
    fn observe(&self, node: &str, seconds: f64, ok: bool);
}

/// `--cuda-ipc`: whether expert nodes on GPUs of this host may answer in GPU memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CudaIpc {
    Auto,
    Off,
}

/// `--gpu-routing`: whether layers go to expert nodes on GPUs with their routing left on the
/// coordinator's GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuRouting {
    Auto,
    Off,
}

/// `--shm-lane`: whether expert nodes on this host are called through shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShmLane {
    Auto,
    Off,
}

/// Deadlines and limits of the coordinator's calls to expert nodes.
#[derive(Clone)]
pub struct RemoteOptions {
    /// Deadline of one layer's call to one node.
    pub rpc_timeout: Duration,
    /// How long start-up waits for a node to accept connections and finish loading.
    pub startup_timeout: Duration,
    /// Largest gRPC message sent or accepted.
    pub max_message_bytes: usize,
    /// How often the health of every node is checked in the background.
    pub health_interval: Duration,
    pub observer: Option<Arc<dyn RpcObserver>>,
    /// What `https://` nodes are verified with and shown.
    pub tls: Option<omnishard_proto::tls::ClientTls>,
    /// Hedging: a call running well past its node's usual latency (never less than this) is
    /// re-sent to replicas. `None`: only the deadline.
    pub hedge_floor: Option<Duration>,
    /// What admitted nodes' experts are probed against. `None`: their weights are trusted.
    pub verify: Option<Verifier>,
    /// With the coordinator on a GPU, nodes on GPUs of the same host are asked to leave their
    /// answers in GPU memory for it to copy (CUDA IPC) instead of sending the bytes.
    pub cuda_ipc: bool,
    /// With `cuda_ipc`: hidden rows for a node that has answered in GPU memory go in the
    /// coordinator's GPU memory too from this many bytes (below, staging them costs more than
    /// the bytes on the wire).
    pub ipc_input_min_bytes: usize,
    /// Nodes on this host take their calls through a shared-memory lane (the same messages as
    /// over gRPC, without the network stack and the thread wake-ups), where they can map it
    /// and the answer fits a slot; the rest go over gRPC.
    pub shm_lane: bool,
    /// With `cuda_ipc`: a layer whose every expert has one live holder, each a node on another
    /// GPU of this host that has answered in GPU memory, is called with its routing and hidden states left in
    /// the coordinator's GPU memory and the nodes' rows written back there, ordered by events
    /// between the GPUs rather than by either host waiting for its GPU (`routed.rs`).
    pub gpu_routing: bool,
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("rpc_timeout", &self.rpc_timeout)
            .field("startup_timeout", &self.startup_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("health_interval", &self.health_interval)
            .field("hedge_floor", &self.hedge_floor)
            .field("verify", &self.verify)
            .field("cuda_ipc", &self.cuda_ipc)
            .field("ipc_input_min_bytes", &self.ipc_input_min_bytes)
            .field("shm_lane", &self.shm_lane)
            .field("gpu_routing", &self.gpu_routing)
            .finish_non_exhaustive()
    }
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            rpc_timeout: defaults::RPC_TIMEOUT,
            startup_timeout: defaults::STARTUP_TIMEOUT,
            max_message_bytes: defaults::MAX_MESSAGE_MIB << 20,
            health_interval: defaults::HEALTH_INTERVAL,
            observer: None,
            tls: None,
            hedge_floor: Some(defaults::HEDGE_FLOOR),
            verify: None,
            cuda_ipc: true,
            ipc_input_min_bytes: defaults::IPC_INPUT_MIN_BYTES,
            shm_lane: true,
            gpu_routing: true,
        }
    }
}

/// Start-up failures of a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("expert node {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error(
        "expert node {address} serves another model (fingerprint {theirs}, ours {ours}); start it with the same checkpoint"
    )]
    Fingerprint {
        address: String,
        theirs: String,
        ours: String,
    },
    #[error(
        "expert node {address} computes in {theirs}, the coordinator in {ours}; start both with the same --dtype"
    )]
    Dtype {
        address: String,
        theirs: String,
        ours: String,
    },
    #[error("expert node {address} reports an impossible expert set: {reason}")]
    BadInfo { address: String, reason: String },
    #[error("expert node {address} was refused: {reason}")]
    Verification { address: String, reason: String },
    #[error(
        "{count} of {total} (layer, expert) pairs are served by no node: {list}. Start nodes that hold them, or pass --allow-missing-experts to mask them out of the router"
    )]
    MissingExperts {
        count: usize,
        total: usize,
        list: String,
    },
    #[error("no expert nodes given")]
    NoNodes,
    #[error("cannot start the RPC runtime: {0}")]
    Runtime(std::io::Error),
}

/// The routed experts of a model, served by expert nodes, with replicas, failover and
/// background health checks.
pub struct RemoteExperts {
    shared: Arc<Shared>,
    runtime: Runtime,
}

impl Drop for RemoteExperts {
    fn drop(&mut self) {
        for node in self.shared.nodes() {
            node.rpc.close();
        }
    }
}

impl RemoteExperts {
    fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        let handle = self.runtime.handle();
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(|| handle.block_on(fut)),
            Err(_) => handle.block_on(fut),
        }
    }
}

/// What the coordinator knows about one node (for `/v1/stats` and `/admin/nodes`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub address: String,
    pub up: bool,
    pub retired: bool,
    pub experts: usize,
    /// Assignments (token × expert) answered.
    pub assignments: u64,
    /// Answers copied out of the node's GPU memory (CUDA IPC) rather than sent as bytes.
    pub gpu_memory_answers: u64,
    /// Requests whose hidden states the node read from the coordinator's GPU memory.
    pub gpu_memory_requests: u64,
    /// Layer calls with the routing left on the coordinator's GPU (`--gpu-routing`).
    pub gpu_routed_calls: u64,
    /// Calls that went through the shared-memory lane rather than gRPC.
    pub lane_calls: u64,
    pub errors: u64,
    pub outstanding: u64,
    pub last_error: Option<String>,
}

/// A private tokio runtime for the RPCs, so the model code can stay synchronous and run on any
/// thread that is not itself an async worker.
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn handle(&self) -> &tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle(),
            None => unreachable!("the runtime lives until drop"),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Dropping a runtime blocks; inside another runtime that would panic.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// "layer 3: experts 0, 5-7; layer 9: expert 2" for a sorted list of pairs.
pub fn describe_pairs(pairs: &[(usize, usize)]) -> String {
    ranges_by_layer(pairs)
        .into_iter()
        .map(|(l, count, ranges)| {
            let noun = if count == 1 { "expert" } else { "experts" };
            format!("layer {l}: {noun} {}", ranges.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}
