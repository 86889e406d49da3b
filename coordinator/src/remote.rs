//! Experts on expert nodes: the coordinator's side of `omnishard.v1.ExpertService`.
//!
//! At start-up every node is asked for `Info`; its fingerprint and dtype must match ours, and the
//! routing table is built from what the nodes say they hold. Per MoE layer the tokens are grouped
//! by node, all nodes are called concurrently over one long-lived bidirectional stream each
//! (requests tagged with ids, so a decode step opens no new HTTP/2 stream), and the per-assignment
//! outputs are summed in ascending expert order by [`omnishard_expert::experts::combine`] —
//! the same code as the in-process path, hence the same bits whatever the placement.
//! Every call has a deadline; a failure names the node and the layer.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use futures::future::join_all;
use omnishard_expert::experts::combine;
use omnishard_expert::wire::{self, assignments_to_wire};
use omnishard_expert::{Assignment, ExpertError, Experts, Routing};
use omnishard_proto::ModelConfig;
use omnishard_proto::v1::{
    self, ForwardRequest, ForwardResponse, InfoRequest, expert_service_client::ExpertServiceClient,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
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
            rpc_timeout: Duration::from_secs(10),
            startup_timeout: Duration::from_secs(60),
            max_message_bytes: 512 << 20,
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
    stream: tokio::sync::Mutex<Option<StreamConn>>,
    next_id: AtomicU64,
    /// Set when the coordinator shuts down, so the end of the stream is not reported as a fault.
    closing: Arc<AtomicBool>,
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
    ) -> Result<v1::Tensor, String> {
        let deadline = Instant::now() + timeout;
        let call = async {
            let (tx, pending) = self.stream().await?;
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
                return Err("the forward stream is closed".to_string());
            }
            let resp = match wrx.await {
                Ok(Ok(resp)) => resp,
                Ok(Err(status)) => {
                    return Err(format!("{:?}: {}", status.code(), status.message()));
                }
                Err(_) => return Err("the forward stream ended".to_string()),
            };
            if let Some(e) = resp.error {
                return Err(format!("{:?}: {}", tonic::Code::from(e.code), e.message));
            }
            resp.output
                .ok_or_else(|| "the response has no output".to_string())
        };
        match tokio::time::timeout_at(deadline.into(), call).await {
            Ok(result) => result,
            Err(_) => {
                // Whatever is in flight on this stream is now suspect: start afresh next time.
                if let Some(conn) = self.stream.lock().await.take() {
                    conn.alive.store(false, Ordering::Release);
                }
                Err(format!(
                    "no answer within the {} ms deadline",
                    timeout.as_millis()
                ))
            }
        }
    }
}

/// The routed experts of a model, served by expert nodes.
pub struct RemoteExperts {
    nodes: Vec<Arc<NodeClient>>,
    /// `[layer][expert]` → indices into `nodes` of the nodes holding it.
    table: Vec<Vec<Vec<usize>>>,
    fingerprint: String,
    dtype: DType,
    opts: RemoteOptions,
    runtime: Runtime,
}

impl Drop for RemoteExperts {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.closing.store(true, Ordering::Release);
        }
    }
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
    let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(l, e) in pairs {
        by_layer.entry(l).or_default().push(e);
    }
    by_layer
        .into_iter()
        .map(|(l, experts)| {
            let mut ranges: Vec<String> = Vec::new();
            let mut i = 0;
            while i < experts.len() {
                let start = experts[i];
                while i + 1 < experts.len() && experts[i + 1] == experts[i] + 1 {
                    i += 1;
                }
                ranges.push(if experts[i] == start {
                    start.to_string()
                } else {
                    format!("{start}-{}", experts[i])
                });
                i += 1;
            }
            let noun = if experts.len() == 1 {
                "expert"
            } else {
                "experts"
            };
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
        let mut table: Vec<Vec<Vec<usize>>> =
            vec![vec![Vec::new(); cfg.num_experts]; cfg.num_hidden_layers];
        for (i, result) in results.into_iter().enumerate() {
            let (client, held) = result?;
            for (l, e) in held {
                table[l][e].push(i);
            }
            nodes.push(Arc::new(client));
        }
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
        Ok((
            Self {
                nodes,
                table,
                fingerprint: fingerprint.to_string(),
                dtype,
                opts,
                runtime,
            },
            missing,
        ))
    }

    /// Names and addresses of the nodes, in the order given.
    pub fn nodes(&self) -> Vec<(String, String)> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.address.clone()))
            .collect()
    }

    /// The node that computes (layer, expert) in this call. All tokens of one expert go to one
    /// node, so each expert sees the same batch wherever it lives.
    fn pick(&self, layer: usize, expert: usize) -> Option<usize> {
        let replicas = self.table.get(layer)?.get(expert)?;
        (!replicas.is_empty()).then(|| replicas[(layer + expert) % replicas.len()])
    }
}

async fn connect_node(
    address: String,
    cfg: &ModelConfig,
    fingerprint: &str,
    dtype: DType,
    opts: &RemoteOptions,
) -> Result<(NodeClient, Vec<(usize, usize)>), ClusterError> {
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
            let mut client = ExpertServiceClient::new(channel)
                .max_decoding_message_size(opts.max_message_bytes)
                .max_encoding_message_size(opts.max_message_bytes);
            let mut req = tonic::Request::new(InfoRequest {});
            req.set_timeout(opts.rpc_timeout);
            match client.info(req).await {
                Ok(info) => Ok((client, info.into_inner())),
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
    let (client, info) = info;
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
        if !cfg.is_moe_layer(l) || l >= cfg.num_hidden_layers {
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
    tracing::info!(%address, node = %info.node_name, experts = held.len(), memory_bytes = info.memory_bytes, "expert node ready");
    let name = if info.node_name.is_empty() {
        address.clone()
    } else {
        info.node_name
    };
    Ok((
        NodeClient {
            name,
            address,
            client,
            stream: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(0),
            closing: Arc::new(AtomicBool::new(false)),
        },
        held,
    ))
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

impl Experts for RemoteExperts {
    fn forward(&self, layer: usize, xs: &Tensor, routing: &Routing) -> Result<Tensor, ExpertError> {
        let node_error = |node: &NodeClient, reason: String| ExpertError::Node {
            node: node.label(),
            layer,
            reason,
        };
        let mut shares: Vec<Option<NodeShare>> = (0..self.nodes.len()).map(|_| None).collect();
        let mut local_index: Vec<HashMap<u32, u32>> = vec![HashMap::new(); self.nodes.len()];
        for a in routing.assignments() {
            let node = self
                .pick(layer, a.expert as usize)
                .ok_or(ExpertError::NotHeld {
                    layer,
                    expert: a.expert as usize,
                })?;
            let share = shares[node].get_or_insert_with(|| NodeShare {
                node,
                tokens: Vec::new(),
                global: Vec::new(),
                local: Vec::new(),
            });
            let next = share.tokens.len() as u32;
            let local = *local_index[node].entry(a.token).or_insert_with(|| {
                share.tokens.push(a.token);
                next
            });
            share.global.push(a);
            share.local.push(Assignment { token: local, ..a });
        }
        let shares: Vec<NodeShare> = shares.into_iter().flatten().collect();
        let mut requests = Vec::with_capacity(shares.len());
        for share in &shares {
            let node = &self.nodes[share.node];
            let idx = Tensor::from_vec(share.tokens.clone(), share.tokens.len(), xs.device())?;
            let hidden = wire::encode(&xs.index_select(&idx, 0)?)?;
            if hidden.data.len() > self.opts.max_message_bytes {
                return Err(node_error(
                    node,
                    format!(
                        "the request would be {} MiB, over the {} MiB message limit; raise --max-message-mib on the coordinator and the nodes",
                        hidden.data.len() >> 20,
                        self.opts.max_message_bytes >> 20
                    ),
                ));
            }
            let (token_index, expert_id, weight) = assignments_to_wire(&share.local);
            requests.push(ForwardRequest {
                request_id: 0,
                layer: layer as u32,
                hidden: Some(hidden),
                token_index,
                expert_id,
                weight,
                fingerprint: self.fingerprint.clone(),
            });
        }
        let timeout = self.opts.rpc_timeout;
        let observer = self.opts.observer.clone();
        let calls = shares.iter().zip(requests).map(|(share, req)| {
            let node = self.nodes[share.node].clone();
            let observer = observer.clone();
            async move {
                let started = Instant::now();
                let result = node.forward(req, timeout).await;
                if let Some(o) = &observer {
                    o.observe(&node.name, started.elapsed().as_secs_f64(), result.is_ok());
                }
                result
            }
        });
        let handle = self.runtime.handle();
        let replies = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(|| handle.block_on(join_all(calls))),
            Err(_) => handle.block_on(join_all(calls)),
        };
        let mut outputs = Vec::with_capacity(shares.len());
        let mut assignments = Vec::with_capacity(routing.ids.len());
        for (share, reply) in shares.iter().zip(replies) {
            let node = &self.nodes[share.node];
            let output = reply.map_err(|reason| node_error(node, reason))?;
            let ys = wire::decode(Some(&output), "output", xs.device())
                .map_err(|e| node_error(node, e.to_string()))?;
            if ys.dims() != [share.global.len(), xs.dim(1)?] || ys.dtype() != self.dtype {
                return Err(node_error(
                    node,
                    format!(
                        "answered a {:?} {:?} tensor for {} assignments",
                        ys.dtype(),
                        ys.dims(),
                        share.global.len()
                    ),
                ));
            }
            outputs.push(ys);
            assignments.extend_from_slice(&share.global);
        }
        if outputs.is_empty() {
            return Ok(xs.zeros_like()?);
        }
        combine(routing.n_tokens(), &assignments, &Tensor::cat(&outputs, 0)?)
    }
}
