//! Experts on expert nodes: the coordinator's side of `omnishard.v1.ExpertService`.
//!
//! At start-up every node is asked for `Info`; its fingerprint and dtype must match ours, and the
//! routing table is built from what the nodes say they hold. Per MoE layer the tokens are grouped
//! by node, all nodes are called concurrently over one long-lived bidirectional stream each
//! (requests tagged with ids, so a decode step opens no new HTTP/2 stream), and the per-assignment
//! outputs are summed in ascending expert order by [`omnishard_model::experts::combine`] —
//! the same code as the in-process path, hence the same bits whatever the placement.
//! Every call has a deadline; a failure names the node and the layer.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use futures::future::join_all;
use omnishard_model::experts::combine;
use omnishard_model::wire::{self, assignments_to_wire};
use omnishard_model::{Assignment, CallContext, ExpertError, Experts, Routing};
use omnishard_proto::placement::ranges_by_layer;
use omnishard_proto::v1::{
    self, ForwardRequest, ForwardResponse, InfoRequest, expert_service_client::ExpertServiceClient,
};
use omnishard_proto::{ModelConfig, defaults};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tracing::instrument;

/// Receives the outcome of every per-layer call to a node (for metrics).
pub trait RpcObserver: Send + Sync {
    fn observe(&self, node: &str, seconds: f64, ok: bool);
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
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("rpc_timeout", &self.rpc_timeout)
            .field("startup_timeout", &self.startup_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
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

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<ForwardResponse, tonic::Status>>>>>;

/// The open `ForwardStream` of one node.
struct StreamConn {
    tx: mpsc::Sender<ForwardRequest>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// One expert node: its unary client and its long-lived stream (opened on first use, reopened
/// after a failure).
struct NodeClient {
    name: String,
    address: String,
    client: ExpertServiceClient<Channel>,
    channel: Channel,
    stream: tokio::sync::Mutex<Option<StreamConn>>,
    next_id: AtomicU64,
    /// Set when the coordinator shuts down, so the end of the stream is not reported as a fault.
    closing: Arc<AtomicBool>,
    /// Routed to; cleared when a call fails, set again by the health checker.
    up: AtomicBool,
    /// Removed from the cluster (placement reload); never routed to again.
    retired: AtomicBool,
    /// Assignments sent and not yet answered: the "outstanding work" replicas are chosen by.
    outstanding: AtomicU64,
    /// Assignments this node has answered, and calls that failed.
    served: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    held: Mutex<Vec<(usize, usize)>>,
}

impl NodeClient {
    fn label(&self) -> String {
        format!("{} ({})", self.name, self.address)
    }

    async fn stream(&self) -> Result<(mpsc::Sender<ForwardRequest>, Pending), String> {
        let mut guard = self.stream.lock().await;
        if let Some(conn) = guard.as_ref().filter(|c| c.alive.load(Ordering::Acquire)) {
            return Ok((conn.tx.clone(), conn.pending.clone()));
        }
        let (tx, rx) = mpsc::channel::<ForwardRequest>(64);
        let mut client = self.client.clone();
        let response = client
            .forward_stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("cannot open the forward stream: {}", s.message()))?;
        let mut inbound = response.into_inner();
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (reader_pending, reader_alive) = (pending.clone(), alive.clone());
        let label = self.label();
        let closing = self.closing.clone();
        tokio::spawn(async move {
            let end = loop {
                match inbound.message().await {
                    Ok(Some(resp)) => {
                        let waiter = reader_pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&resp.request_id);
                        if let Some(w) = waiter {
                            let _ = w.send(Ok(resp));
                        }
                    }
                    Ok(None) => break tonic::Status::unavailable("the node closed the stream"),
                    Err(status) => break status,
                }
            };
            if closing.load(Ordering::Acquire) {
                tracing::debug!(node = %label, "forward stream closed");
            } else {
                tracing::warn!(node = %label, status = %end, "forward stream ended");
            }
            reader_alive.store(false, Ordering::Release);
            for (_, w) in reader_pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
            {
                let _ = w.send(Err(end.clone()));
            }
        });
        *guard = Some(StreamConn {
            tx: tx.clone(),
            pending: pending.clone(),
            alive,
        });
        Ok((tx, pending))
    }

    /// One request over the stream, with `timeout` as its deadline.
    #[instrument(skip_all, fields(node = %self.name, layer = req.layer, n_assignments = req.token_index.len()))]
    async fn forward(
        &self,
        mut req: ForwardRequest,
        timeout: Duration,
    ) -> Result<v1::Tensor, CallError> {
        let deadline = Instant::now() + timeout;
        let call = async {
            let (tx, pending) = self.stream().await.map_err(CallError::Transport)?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            req.request_id = id;
            let (wtx, wrx) = oneshot::channel();
            pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, wtx);
            if tx.send(req).await.is_err() {
                pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                return Err(CallError::Transport("the forward stream is closed".into()));
            }
            let resp = match wrx.await {
                Ok(Ok(resp)) => resp,
                Ok(Err(status)) => return Err(CallError::status(status.code(), status.message())),
                Err(_) => return Err(CallError::Transport("the forward stream ended".into())),
            };
            if let Some(e) = resp.error {
                return Err(CallError::status(tonic::Code::from(e.code), &e.message));
            }
            resp.output
                .ok_or_else(|| CallError::BadAnswer("the response has no output".into()))
        };
        match tokio::time::timeout_at(deadline.into(), call).await {
            Ok(result) => result,
            Err(_) => {
                // Whatever is in flight on this stream is now suspect: start afresh next time.
                if let Some(conn) = self.stream.lock().await.take() {
                    conn.alive.store(false, Ordering::Release);
                }
                Err(CallError::Timeout(timeout))
            }
        }
    }
}

/// Why one call to a node failed.
#[derive(Debug, Clone)]
enum CallError {
    /// The connection or the stream broke.
    Transport(String),
    /// No answer before the deadline.
    Timeout(Duration),
    /// The node answered with an error status.
    Status { code: tonic::Code, message: String },
    /// The node answered something that does not fit the request.
    BadAnswer(String),
}

impl CallError {
    fn status(code: tonic::Code, message: &str) -> Self {
        CallError::Status {
            code,
            message: message.to_string(),
        }
    }

    /// Whether the node is at fault — it is then marked down and the work goes to a replica —
    /// rather than the request, which no replica would accept either.
    fn node_fault(&self) -> bool {
        use tonic::Code;
        match self {
            CallError::Transport(_) | CallError::Timeout(_) | CallError::BadAnswer(_) => true,
            CallError::Status { code, .. } => match code {
                Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted => false,
                Code::Ok
                | Code::Cancelled
                | Code::Unknown
                | Code::DeadlineExceeded
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::Aborted
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
                | Code::Unauthenticated => true,
            },
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Transport(m) | CallError::BadAnswer(m) => f.write_str(m),
            CallError::Timeout(t) => {
                write!(f, "no answer within the {} ms deadline", t.as_millis())
            }
            CallError::Status { code, message } => write!(f, "{code:?}: {message}"),
        }
    }
}

/// The routed experts of a model, served by expert nodes, with replicas, failover and
/// background health checks.
pub struct RemoteExperts {
    shared: Arc<Shared>,
    runtime: Runtime,
}

struct Shared {
    cfg: ModelConfig,
    fingerprint: String,
    dtype: DType,
    opts: RemoteOptions,
    nodes: RwLock<Vec<Arc<NodeClient>>>,
    /// `[layer][expert]` → indices into `nodes` of the nodes holding it (up or down).
    table: RwLock<Arc<Vec<Vec<Vec<usize>>>>>,
}

impl Drop for RemoteExperts {
    fn drop(&mut self) {
        for node in self.shared.nodes() {
            node.closing.store(true, Ordering::Release);
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

fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

impl RemoteExperts {
    /// Connects to every node, checks it, and builds the routing table. Returns the experts and
    /// the (layer, expert) pairs no node serves (empty unless `allow_missing`).
    pub fn connect(
        addresses: &[String],
        cfg: &ModelConfig,
        fingerprint: &str,
        dtype: DType,
        opts: RemoteOptions,
        allow_missing: bool,
    ) -> Result<(Self, Vec<(usize, usize)>), ClusterError> {
        if addresses.is_empty() {
            return Err(ClusterError::NoNodes);
        }
        let runtime = Runtime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("omnishard-rpc")
                .enable_all()
                .build()
                .map_err(ClusterError::Runtime)?,
        ));
        let connects = addresses
            .iter()
            .map(|a| connect_node(a.clone(), cfg, fingerprint, dtype, &opts));
        let results = runtime.handle().block_on(join_all(connects));
        let mut nodes = Vec::with_capacity(results.len());
        for result in results {
            nodes.push(Arc::new(result?));
        }
        let table = build_table(cfg, &nodes);
        let missing: Vec<(usize, usize)> = cfg
            .expert_pairs()
            .into_iter()
            .filter(|&(l, e)| table[l][e].is_empty())
            .collect();
        if !missing.is_empty() {
            let list = describe_pairs(&missing);
            if !allow_missing {
                return Err(ClusterError::MissingExperts {
                    count: missing.len(),
                    total: cfg.expert_pairs().len(),
                    list,
                });
            }
            tracing::warn!(
                count = missing.len(),
                "--allow-missing-experts: these experts are served by no node and are MASKED OUT of the router; output differs from the full model: {list}"
            );
        }
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            fingerprint: fingerprint.to_string(),
            dtype,
            opts,
            nodes: RwLock::new(nodes),
            table: RwLock::new(Arc::new(table)),
        });
        runtime.handle().spawn(health_loop(Arc::downgrade(&shared)));
        Ok((Self { shared, runtime }, missing))
    }

    /// Every node with its state, in the order added.
    pub fn status(&self) -> Vec<NodeStatus> {
        self.shared.nodes().iter().map(|n| n.status()).collect()
    }

    /// Adds a node to the running cluster (or brings a retired one back): it is connected to,
    /// its fingerprint and dtype checked, and it takes its share of traffic from the next call.
    pub fn add_node(&self, address: &str) -> Result<NodeStatus, ClusterError> {
        let existing = self.shared.find(address);
        if let Some(node) = existing {
            let (cfg, fp, dtype, opts) = (
                &self.shared.cfg,
                &self.shared.fingerprint,
                self.shared.dtype,
                &self.shared.opts,
            );
            let readmitted = self.block_on(readmit(&node, cfg, fp, dtype, opts));
            if let Err(reason) = readmitted {
                return Err(ClusterError::Unreachable {
                    address: address.to_string(),
                    reason,
                });
            }
            node.retired.store(false, Ordering::Release);
            self.shared.rebuild_table();
            return Ok(node.status());
        }
        let opts = RemoteOptions {
            startup_timeout: self.shared.opts.rpc_timeout,
            ..self.shared.opts.clone()
        };
        let node = self.block_on(connect_node(
            address.to_string(),
            &self.shared.cfg,
            &self.shared.fingerprint,
            self.shared.dtype,
            &opts,
        ))?;
        let node = Arc::new(node);
        self.shared
            .nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(node.clone());
        self.shared.rebuild_table();
        tracing::info!(node = %node.label(), experts = node.held_count(), "expert node joined");
        Ok(node.status())
    }

    /// Makes the cluster's membership `addresses`: new ones join, absent ones are retired.
    /// Returns the addresses that could not join, with the reason.
    pub fn sync_addresses(&self, addresses: &[String]) -> Vec<(String, String)> {
        let mut failures = Vec::new();
        for address in addresses {
            let known = self.shared.find(address);
            if known
                .as_ref()
                .is_some_and(|n| !n.retired.load(Ordering::Acquire))
            {
                continue;
            }
            if let Err(e) = self.add_node(address) {
                failures.push((address.clone(), e.to_string()));
            }
        }
        for node in self.shared.nodes() {
            if !addresses.contains(&node.address) && !node.retired.swap(true, Ordering::AcqRel) {
                tracing::warn!(node = %node.label(), "expert node retired (not in the reloaded placement)");
            }
        }
        self.shared.rebuild_table();
        failures
    }

    fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        let handle = self.runtime.handle();
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(|| handle.block_on(fut)),
            Err(_) => handle.block_on(fut),
        }
    }
}

impl Shared {
    /// The nodes as of now (joining nodes are appended; none is ever removed).
    fn nodes(&self) -> Vec<Arc<NodeClient>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn find(&self, address: &str) -> Option<Arc<NodeClient>> {
        self.nodes().into_iter().find(|n| n.address == address)
    }

    fn rebuild_table(&self) {
        let table = build_table(&self.cfg, &self.nodes());
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }
}

fn build_table(cfg: &ModelConfig, nodes: &[Arc<NodeClient>]) -> Vec<Vec<Vec<usize>>> {
    let mut table = vec![vec![Vec::new(); cfg.num_experts]; cfg.num_hidden_layers];
    for (i, node) in nodes.iter().enumerate() {
        if node.retired.load(Ordering::Acquire) {
            continue;
        }
        for &(l, e) in node.held.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            table[l][e].push(i);
        }
    }
    table
}

impl NodeClient {
    fn held_count(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn status(&self) -> NodeStatus {
        NodeStatus {
            name: self.name.clone(),
            address: self.address.clone(),
            up: self.up.load(Ordering::Acquire),
            retired: self.retired.load(Ordering::Acquire),
            experts: self.held_count(),
            assignments: self.served.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            outstanding: self.outstanding.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn routable(&self) -> bool {
        self.up.load(Ordering::Acquire) && !self.retired.load(Ordering::Acquire)
    }

    fn mark_down(&self, reason: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(node = %self.label(), %reason, "expert node marked down; its experts go to replicas");
        }
    }
}

/// Brings a down node back if it answers Info with our fingerprint and dtype.
async fn readmit(
    node: &NodeClient,
    cfg: &ModelConfig,
    fingerprint: &str,
    dtype: DType,
    opts: &RemoteOptions,
) -> Result<(), String> {
    let mut client = node.client.clone();
    let mut req = tonic::Request::new(InfoRequest {});
    req.set_timeout(opts.rpc_timeout);
    let info = client
        .info(req)
        .await
        .map_err(|s| format!("Info failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let held =
        check_info(&node.address, info, cfg, fingerprint, dtype).map_err(|e| e.to_string())?;
    *node.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
    // A fresh stream: the old one died with the node.
    if let Some(conn) = node.stream.lock().await.take() {
        conn.alive.store(false, Ordering::Release);
    }
    if !node.up.swap(true, Ordering::AcqRel) {
        tracing::info!(node = %node.label(), "expert node re-admitted");
    }
    Ok(())
}

/// Every `health_interval`: gRPC health of the nodes that are up (a failure marks them down
/// before a request has to find out), Info of those that are down (re-admitted when their
/// fingerprint matches). Ends when the experts are dropped.
async fn health_loop(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let interval = s.opts.health_interval;
        let nodes = s.nodes();
        let mut changed = false;
        for node in nodes.iter().filter(|n| !n.retired.load(Ordering::Acquire)) {
            if node.up.load(Ordering::Acquire) {
                let mut health = HealthClient::new(node.channel.clone());
                let mut req = tonic::Request::new(HealthCheckRequest {
                    service: "omnishard.v1.ExpertService".into(),
                });
                req.set_timeout(s.opts.rpc_timeout);
                let serving = matches!(
                    health.check(req).await,
                    Ok(r) if r.get_ref().status() == ServingStatus::Serving
                );
                if !serving {
                    node.mark_down("health check failed");
                }
            } else if readmit(node, &s.cfg, &s.fingerprint, s.dtype, &s.opts)
                .await
                .is_ok()
            {
                changed = true;
            }
        }
        if changed {
            s.rebuild_table();
        }
        drop(s);
        tokio::time::sleep(interval).await;
    }
}

async fn connect_node(
    address: String,
    cfg: &ModelConfig,
    fingerprint: &str,
    dtype: DType,
    opts: &RemoteOptions,
) -> Result<NodeClient, ClusterError> {
    let unreachable = |reason: String| ClusterError::Unreachable {
        address: address.clone(),
        reason,
    };
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| unreachable(format!("not a valid host:port ({e})")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    let deadline = Instant::now() + opts.startup_timeout;
    // Retry while the node is starting (refused) or loading (UNAVAILABLE), up to the deadline.
    let info = loop {
        let attempt = async {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("cannot connect: {}", error_chain(&e)))?;
            let mut client = ExpertServiceClient::new(channel.clone())
                .max_decoding_message_size(opts.max_message_bytes)
                .max_encoding_message_size(opts.max_message_bytes);
            let mut req = tonic::Request::new(InfoRequest {});
            req.set_timeout(opts.rpc_timeout);
            match client.info(req).await {
                Ok(info) => Ok((client, channel, info.into_inner())),
                Err(s) => Err(format!("Info failed: {:?}: {}", s.code(), s.message())),
            }
        };
        match attempt.await {
            Ok(ok) => break ok,
            Err(reason) if Instant::now() >= deadline => {
                return Err(unreachable(format!(
                    "{reason} (gave up after {} s)",
                    opts.startup_timeout.as_secs()
                )));
            }
            Err(reason) => {
                tracing::debug!(%address, %reason, "expert node not ready yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let (client, channel, info) = info;
    let name = if info.node_name.is_empty() {
        address.clone()
    } else {
        info.node_name.clone()
    };
    let memory_bytes = info.memory_bytes;
    let held = check_info(&address, info, cfg, fingerprint, dtype)?;
    tracing::info!(%address, node = %name, experts = held.len(), memory_bytes, "expert node ready");
    Ok(NodeClient {
        name,
        address,
        channel,
        client,
        stream: tokio::sync::Mutex::new(None),
        next_id: AtomicU64::new(0),
        closing: Arc::new(AtomicBool::new(false)),
        up: AtomicBool::new(true),
        retired: AtomicBool::new(false),
        outstanding: AtomicU64::new(0),
        served: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        last_error: Mutex::new(None),
        held: Mutex::new(held),
    })
}

/// Checks a node's Info against this model; returns the (layer, expert) pairs it holds.
fn check_info(
    address: &str,
    info: v1::InfoResponse,
    cfg: &ModelConfig,
    fingerprint: &str,
    dtype: DType,
) -> Result<Vec<(usize, usize)>, ClusterError> {
    let address = address.to_string();
    if info.fingerprint != fingerprint {
        return Err(ClusterError::Fingerprint {
            address,
            theirs: info.fingerprint,
            ours: fingerprint.to_string(),
        });
    }
    let theirs = v1::Dtype::try_from(info.dtype)
        .ok()
        .and_then(wire::candle_dtype);
    if theirs != Some(dtype) {
        return Err(ClusterError::Dtype {
            address,
            theirs: theirs
                .map(dtype_name)
                .unwrap_or_else(|| format!("dtype {}", info.dtype)),
            ours: dtype_name(dtype),
        });
    }
    let mut held = Vec::new();
    for layer in &info.layers {
        let l = layer.layer as usize;
        if l >= cfg.num_hidden_layers || !cfg.is_moe_layer(l) {
            return Err(ClusterError::BadInfo {
                address,
                reason: format!("layer {l} is not an MoE layer of this model"),
            });
        }
        for &e in &layer.experts {
            if e as usize >= cfg.num_experts {
                return Err(ClusterError::BadInfo {
                    address,
                    reason: format!("layer {l} expert {e} (the model has {})", cfg.num_experts),
                });
            }
            held.push((l, e as usize));
        }
    }
    Ok(held)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The share of one layer's work that goes to one node.
struct NodeShare {
    node: usize,
    /// Global token indices of the hidden rows sent, in order.
    tokens: Vec<u32>,
    /// Assignments with global token indices, in request order.
    global: Vec<Assignment>,
    /// The same with indices into `tokens`.
    local: Vec<Assignment>,
}

impl RemoteExperts {
    /// Chooses, for every expert in `pending`, the live replica with the least outstanding work
    /// (assignments in flight, counting those planned in this call; ties to the node that has
    /// served least). All tokens of one expert go to one node, so each expert sees the same
    /// batch wherever it lives.
    fn plan(
        &self,
        layer: usize,
        pending: &[Assignment],
        table: &[Vec<Vec<usize>>],
        nodes: &[Arc<NodeClient>],
        failures: &[(String, String)],
    ) -> Result<Vec<NodeShare>, ExpertError> {
        let mut by_expert: BTreeMap<u32, Vec<Assignment>> = BTreeMap::new();
        for a in pending {
            by_expert.entry(a.expert).or_default().push(*a);
        }
        let mut planned = vec![0u64; nodes.len()];
        let mut shares: Vec<Option<NodeShare>> = (0..nodes.len()).map(|_| None).collect();
        let mut local_index: Vec<HashMap<u32, u32>> = vec![HashMap::new(); nodes.len()];
        for (expert, group) in by_expert {
            let holders = table
                .get(layer)
                .and_then(|row| row.get(expert as usize))
                .ok_or(ExpertError::NotHeld {
                    layer,
                    expert: expert as usize,
                })?;
            if holders.is_empty() {
                // Possible after nodes were retired by a placement reload.
                return Err(ExpertError::Node {
                    node: "none".into(),
                    layer,
                    reason: format!(
                        "no node in the cluster holds expert {expert}; add one that does (POST /admin/nodes or the placement file)"
                    ),
                });
            }
            let best = holders
                .iter()
                .copied()
                .filter(|&i| nodes[i].routable())
                .min_by_key(|&i| {
                    let n = &nodes[i];
                    (
                        n.outstanding.load(Ordering::Relaxed) + planned[i],
                        n.served.load(Ordering::Relaxed),
                        i,
                    )
                });
            let Some(node) = best else {
                return Err(no_replica(layer, expert, holders, nodes, failures));
            };
            planned[node] += group.len() as u64;
            let share = shares[node].get_or_insert_with(|| NodeShare {
                node,
                tokens: Vec::new(),
                global: Vec::new(),
                local: Vec::new(),
            });
            for a in group {
                let next = share.tokens.len() as u32;
                let local = *local_index[node].entry(a.token).or_insert_with(|| {
                    share.tokens.push(a.token);
                    next
                });
                share.global.push(a);
                share.local.push(Assignment { token: local, ..a });
            }
        }
        Ok(shares.into_iter().flatten().collect())
    }
}

/// The error for an expert none of whose holders is up, naming them and why they are down.
fn no_replica(
    layer: usize,
    expert: u32,
    holders: &[usize],
    nodes: &[Arc<NodeClient>],
    failures: &[(String, String)],
) -> ExpertError {
    if !failures.is_empty() {
        return ExpertError::Node {
            node: failures
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            layer,
            reason: format!(
                "{}; no live replica holds expert {expert}",
                failures
                    .iter()
                    .map(|(_, r)| r.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
    }
    let down: Vec<String> = holders
        .iter()
        .map(|&i| {
            let n = &nodes[i];
            let why = n
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            format!(
                "{} is down ({})",
                n.label(),
                why.unwrap_or_else(|| "retired".into())
            )
        })
        .collect();
    ExpertError::Node {
        node: holders
            .iter()
            .map(|&i| nodes[i].label())
            .collect::<Vec<_>>()
            .join(", "),
        layer,
        reason: format!("no live replica holds expert {expert}: {}", down.join("; ")),
    }
}

impl Experts for RemoteExperts {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
        ctx: &CallContext,
    ) -> Result<Tensor, ExpertError> {
        // The table first: nodes are only ever appended, so every index it holds is valid in the
        // node list read after it.
        let table = self
            .shared
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let nodes = self.shared.nodes();
        let opts = &self.shared.opts;
        let mut pending: Vec<Assignment> = routing.assignments().collect();
        let mut outputs = Vec::new();
        let mut assignments = Vec::with_capacity(pending.len());
        let mut failures: Vec<(String, String)> = Vec::new();
        // Each round sends what is left to live replicas; a node that fails is marked down and
        // its share goes to the next round, within this same call.
        while !pending.is_empty() {
            let shares = self.plan(layer, &pending, &table, &nodes, &failures)?;
            pending.clear();
            let mut requests = Vec::with_capacity(shares.len());
            for share in &shares {
                let idx = Tensor::from_vec(share.tokens.clone(), share.tokens.len(), xs.device())?;
                let hidden = wire::encode(&xs.index_select(&idx, 0)?)?;
                // The answer has one row per assignment: bound both directions.
                let answer = share.global.len() * hidden.data.len() / share.tokens.len().max(1);
                let largest = hidden.data.len().max(answer);
                if largest > opts.max_message_bytes {
                    return Err(ExpertError::Rejected {
                        node: nodes[share.node].label(),
                        layer,
                        reason: format!(
                            "a {} MiB message would exceed the {} MiB limit; raise --max-message-mib on the coordinator and the nodes, or lower --max-batched-tokens",
                            largest >> 20,
                            opts.max_message_bytes >> 20
                        ),
                    });
                }
                let (token_index, expert_id, weight) = assignments_to_wire(&share.local);
                requests.push(ForwardRequest {
                    request_id: 0,
                    layer: layer as u32,
                    hidden: Some(hidden),
                    token_index,
                    expert_id,
                    weight,
                    fingerprint: self.shared.fingerprint.clone(),
                    trace_ids: ctx.request_ids.to_vec(),
                });
            }
            let calls = shares.iter().zip(requests).map(|(share, req)| {
                let node = nodes[share.node].clone();
                let observer = opts.observer.clone();
                let work = share.global.len() as u64;
                let timeout = opts.rpc_timeout;
                async move {
                    node.outstanding.fetch_add(work, Ordering::Relaxed);
                    let started = Instant::now();
                    let result = node.forward(req, timeout).await;
                    node.outstanding.fetch_sub(work, Ordering::Relaxed);
                    if let Some(o) = &observer {
                        o.observe(&node.name, started.elapsed().as_secs_f64(), result.is_ok());
                    }
                    result
                }
            });
            let replies = self.block_on(join_all(calls));
            for (share, reply) in shares.into_iter().zip(replies) {
                let node = &nodes[share.node];
                let checked = reply.and_then(|output| {
                    let ys = wire::decode(Some(&output), "output", xs.device())
                        .map_err(|e| CallError::BadAnswer(e.to_string()))?;
                    if ys.dims() != [share.global.len(), xs.dims2().map(|d| d.1).unwrap_or(0)]
                        || ys.dtype() != self.shared.dtype
                    {
                        return Err(CallError::BadAnswer(format!(
                            "answered a {:?} {:?} tensor for {} assignments",
                            ys.dtype(),
                            ys.dims(),
                            share.global.len()
                        )));
                    }
                    Ok(ys)
                });
                match checked {
                    Ok(ys) => {
                        node.served
                            .fetch_add(share.global.len() as u64, Ordering::Relaxed);
                        outputs.push(ys);
                        assignments.extend_from_slice(&share.global);
                    }
                    Err(e) if e.node_fault() => {
                        let reason = e.to_string();
                        node.mark_down(&reason);
                        failures.push((node.label(), reason));
                        pending.extend_from_slice(&share.global);
                    }
                    // The node refused the request itself: no replica would take it either.
                    Err(e) => {
                        return Err(ExpertError::Rejected {
                            node: node.label(),
                            layer,
                            reason: e.to_string(),
                        });
                    }
                }
            }
        }
        if outputs.is_empty() {
            return Ok(xs.zeros_like()?);
        }
        combine(routing.n_tokens(), &assignments, &Tensor::cat(&outputs, 0)?)
    }
}
