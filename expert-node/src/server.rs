//! The expert node's gRPC service (`omnishard.v1.ExpertService`): `Info`, unary `Forward`, the
//! bidirectional `ForwardStream` the coordinator keeps open and `OpenLane` (the same calls through
//! shared memory, for a coordinator on this host: `lane.rs`), plus standard gRPC health
//! (NOT_SERVING while the weights load, SERVING once they are in memory).
//!
//! Every request is validated before any compute; a bad request gets INVALID_ARGUMENT or
//! FAILED_PRECONDITION and the node goes on serving everyone else. Compute runs on the blocking
//! pool, never on the async runtime.
//!
//! Shutting down ([`NodeState::drain`]) the node finishes the calls it has started, refuses new
//! ones with UNAVAILABLE (the coordinator re-sends them to a replica) and ends its forward
//! streams once their calls are answered, so a rolling restart loses no work.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use futures::StreamExt;
use omnishard_proto::ServiceError;
use omnishard_proto::v1::{
    self, ForwardRequest, ForwardResponse, InfoRequest, InfoResponse, LaneEvent, LayerExperts,
    OpenLaneRequest,
    expert_service_server::{ExpertService, ExpertServiceServer},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use omnishard_model::LocalExperts;
use omnishard_model::lending::{IpcAsk, host_id};
use omnishard_model::ops::cuda::{IpcExporter, IpcImporter, PassMappings, SharedEvent};
use omnishard_model::wire;

pub use crate::error::NodeError;

/// Coordinators whose GPU memory stays mapped here (the least recently used is forgotten past
/// this; closing its mappings waits for copies still queued).
const IPC_CLIENTS: usize = 4;

/// What the node is and holds; the experts are installed once loading finishes.
pub struct NodeState {
    pub name: String,
    /// Random per process start (`Info.instance_id`).
    pub instance_id: String,
    pub fingerprint: String,
    pub dtype: DType,
    pub device: Device,
    experts: OnceLock<Arc<LocalExperts>>,
    loaded: watch::Sender<bool>,
    seen: Mutex<RecentIds>,
    /// Set once shutdown begins: new calls are refused, streams end.
    draining: watch::Sender<bool>,
    /// Calls being computed, and a wake-up when the count changes.
    in_flight: AtomicUsize,
    idle: tokio::sync::Notify,
    /// Lends GPU memory for answers a coordinator on the same host copies itself (CUDA IPC).
    ipc: Option<IpcExporter>,
    /// Coordinators' GPU memory mapped here, per client (the most recent few).
    ipc_in: Mutex<VecDeque<(u64, Arc<IpcImporter>)>>,
    /// The event routed calls answer with, made on the first one (`routed.rs`).
    pub(crate) done_event: Mutex<Option<Arc<SharedEvent>>>,
    /// Coordinators' pass buffers mapped here (`routed.rs`).
    pub(crate) pass_mappings: PassMappings,
    /// Shared-memory lanes being served (`lane.rs`).
    pub(crate) lanes: AtomicUsize,
}

impl NodeState {
    pub fn new(name: String, fingerprint: String, dtype: DType, device: Device) -> Self {
        Self {
            name,
            instance_id: format!("{:016x}", rand::random::<u64>()),
            fingerprint,
            dtype,
            experts: OnceLock::new(),
            loaded: watch::Sender::new(false),
            seen: Mutex::new(RecentIds::default()),
            draining: watch::Sender::new(false),
            in_flight: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            ipc: IpcExporter::new(&device),
            ipc_in: Mutex::default(),
            done_event: Mutex::default(),
            pass_mappings: PassMappings::default(),
            lanes: AtomicUsize::new(0),
            device,
        }
    }

    /// Begins shutdown: new calls are refused with UNAVAILABLE and forward streams end once their
    /// calls are answered. Returns when no call is in flight, or after `grace`.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.draining.send_replace(true);
        let idle = async {
            loop {
                let notified = self.idle.notified();
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(grace, idle).await.is_ok()
    }

    pub(crate) fn draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Counts a call in flight until the guard drops; `None` once shutdown has begun.
    pub(crate) fn start_call(self: &Arc<Self>) -> Option<CallGuard> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = CallGuard(self.clone());
        (!self.draining()).then_some(guard)
    }

    /// Makes the loaded experts available; health turns SERVING. Returns false if experts were
    /// installed already (they are kept).
    pub fn install(&self, experts: LocalExperts) -> bool {
        let fresh = self.experts.set(Arc::new(experts)).is_ok();
        self.loaded.send_replace(true);
        fresh
    }

    /// The installed experts, once loading has finished.
    pub fn experts(&self) -> Option<&Arc<LocalExperts>> {
        self.experts.get()
    }

    /// Copies a request's hidden states out of its coordinator's GPU memory onto this node's
    /// device (ordered before the experts on the device's stream).
    fn import_hidden(
        &self,
        req: &ForwardRequest,
        t: &v1::DeviceTensor,
    ) -> Result<candle_core::Tensor, NodeError> {
        self.importer(req)?
            .copy(&self.device, t, ())
            .map_err(|e| NodeError::Ipc(e.to_string()))
    }

    /// What the request's coordinator has of its GPU memory mapped here.
    pub(crate) fn importer(&self, req: &ForwardRequest) -> Result<Arc<IpcImporter>, NodeError> {
        if req.ipc_client == 0 || req.ipc_host.is_empty() || req.ipc_host != host_id() {
            return Err(NodeError::Ipc(
                "they are on another host (or the request names no client)".into(),
            ));
        }
        let importer = {
            let mut clients = self.ipc_in.lock().unwrap_or_else(|e| e.into_inner());
            let known = clients
                .iter()
                .position(|(c, _)| *c == req.ipc_client)
                .and_then(|i| clients.remove(i));
            let importer = match known {
                Some((_, importer)) => importer,
                None => {
                    if clients.len() >= IPC_CLIENTS {
                        clients.pop_front();
                    }
                    Arc::new(IpcImporter::new())
                }
            };
            // The most recently used last: the front is forgotten first.
            clients.push_back((req.ipc_client, importer.clone()));
            importer
        };
        Ok(importer)
    }

    /// Watches whether the experts are installed.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    /// Logs, once per client request, that this node works for it: the request id then appears in
    /// every node's log at the info level without a line per layer call.
    fn note_trace_ids(&self, ids: &[String], layer: u32) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if seen.insert(id) {
                tracing::info!(request_id = %id, node = %self.name, layer, "first expert call for request");
            }
        }
    }
}

pub(crate) struct CallGuard(Arc<NodeState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The last few thousand request ids this node has seen, oldest forgotten first.
#[derive(Default)]
struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    const CAPACITY: usize = 4096;

    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == Self::CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

#[derive(Clone)]
pub struct ExpertNodeService {
    state: Arc<NodeState>,
}

impl ExpertNodeService {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    /// The tonic service with message size limits applied in both directions.
    pub fn into_server(self, max_message_bytes: usize) -> ExpertServiceServer<Self> {
        ExpertServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }

    #[instrument(skip_all, fields(node = %self.state.name, layer = req.layer, call = req.request_id, requests = ?req.trace_ids, n_assignments = req.token_index.len()))]
    /// `received`: when the request arrived (its wait for a compute thread is reported).
    async fn handle(
        &self,
        req: ForwardRequest,
        received: Instant,
    ) -> Result<ForwardResponse, NodeError> {
        // Counted in flight from here: a drain waits for calls queued for a compute thread too.
        let Some(call) = self.state.start_call() else {
            return Err(NodeError::ShuttingDown);
        };
        let state = self.state.clone();
        let result = tokio::task::spawn_blocking(move || serve_one(&state, req, received, call))
            .await
            .map_err(|e| NodeError::Join(e.to_string()))
            .and_then(|r| r);
        if let Err(e) = &result {
            tracing::warn!(error = %e, "forward request failed");
        }
        result
    }
}

/// One Forward call, whichever way it came (stream, unary or lane), counted in flight by `_call`
/// ([`NodeState::start_call`]): logged once per client request, computed. `received`: when it
/// arrived (its wait for a compute thread is reported). Synchronous: run it off the async
/// runtime.
pub(crate) fn serve_one(
    state: &NodeState,
    req: ForwardRequest,
    received: Instant,
    _call: CallGuard,
) -> Result<ForwardResponse, NodeError> {
    state.note_trace_ids(&req.trace_ids, req.layer);
    let waited = received.elapsed();
    process(state, req).map(|mut resp| {
        if let Some(t) = resp.timing.as_mut() {
            t.wait_us = micros(waited);
        }
        resp
    })
}

/// The answer on a stream (or lane) to a call that failed: the error in place of the output.
pub(crate) fn failed(request_id: u64, e: &NodeError) -> ForwardResponse {
    ForwardResponse {
        request_id,
        output: None,
        error: Some(v1::Error {
            code: e.status_code() as i32,
            message: e.to_string(),
        }),
        timing: None,
        device_output: None,
        done_event: Vec::new(),
    }
}

/// Validates one Forward request and computes it: the whole of the node's work, synchronous
/// (run it off the async runtime). The fuzz target for the request decoder drives this.
pub fn process(state: &NodeState, req: ForwardRequest) -> Result<ForwardResponse, NodeError> {
    let experts = state.experts().cloned().ok_or(NodeError::Loading)?;
    if !req.fingerprint.is_empty() && req.fingerprint != state.fingerprint {
        return Err(NodeError::Fingerprint {
            expected: state.fingerprint.clone(),
            got: req.fingerprint,
        });
    }
    if let Some(pass) = &req.device_pass {
        return crate::routed::process_pass(state, &experts, &req, pass);
    }
    if let Some(routed) = &req.device_routed {
        return crate::routed::process(state, &experts, &req, routed);
    }
    let assignments = wire::assignments_from_wire(&req).ok_or(NodeError::Lengths {
        tokens: req.token_index.len(),
        experts: req.expert_id.len(),
        weights: req.weight.len(),
    })?;
    let started = Instant::now();
    let xs = match (&req.device_hidden, &req.hidden) {
        (None, _) => wire::decode(req.hidden.as_ref(), "hidden", &state.device)?,
        (Some(_), Some(_)) => return Err(NodeError::TwoHiddens),
        (Some(t), None) => state.import_hidden(&req, t)?,
    };
    let uploaded = Instant::now();
    let mut planned = uploaded;
    let ys = experts.expert_outputs_timed(req.layer as usize, &xs, &assignments, &mut || {
        planned = Instant::now()
    })?;
    let queued = Instant::now();
    let ask = IpcAsk {
        client: req.ipc_client,
        host: &req.ipc_host,
        keep_from: req.ipc_keep_from,
        request: req.request_id,
    };
    let device_output = match &state.ipc {
        Some(ipc) if ask.client != 0 => {
            ipc.release(ask.client, ask.keep_from);
            // No GPU memory to lend (it may have run out) is no reason to fail the call.
            ipc.export(&ask, &ys).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot lend GPU memory for the answer: sending the bytes");
                None
            })
        }
        _ => None,
    };
    // An answer lent on the GPU must be complete before its handle leaves; a copy to the host
    // waits for the device anyway, and waiting here first times the two apart.
    state
        .device
        .synchronize()
        .map_err(|e| NodeError::Encode(e.to_string()))?;
    let computed = Instant::now();
    let output = match device_output {
        Some(_) => None,
        None => Some(wire::encode(&ys).map_err(|e| NodeError::Encode(e.to_string()))?),
    };
    Ok(ForwardResponse {
        request_id: req.request_id,
        output,
        error: None,
        timing: Some(v1::NodeTiming {
            wait_us: 0,
            upload_us: micros(uploaded - started),
            compute_us: micros(computed - uploaded),
            download_us: micros(computed.elapsed()),
            launch_us: micros(queued - uploaded),
            plan_us: micros(planned - uploaded),
        }),
        device_output,
        done_event: Vec::new(),
    })
}

pub(crate) fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl ExpertService for ExpertNodeService {
    async fn info(&self, _req: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let experts = self
            .state
            .experts()
            .ok_or_else(|| NodeError::Loading.to_status())?;
        let mut layers: Vec<LayerExperts> = Vec::new();
        for (layer, expert) in experts.held() {
            match layers.last_mut() {
                Some(l) if l.layer == layer as u32 => l.experts.push(expert as u32),
                _ => layers.push(LayerExperts {
                    layer: layer as u32,
                    experts: vec![expert as u32],
                }),
            }
        }
        Ok(Response::new(InfoResponse {
            fingerprint: self.state.fingerprint.clone(),
            layers,
            dtype: wire::wire_dtype(self.state.dtype).unwrap_or(v1::Dtype::Unspecified) as i32,
            memory_bytes: experts.size_in_bytes() as u64,
            node_name: self.state.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            instance_id: self.state.instance_id.clone(),
            host_id: host_id().to_string(),
            gpu_uuid: omnishard_model::ops::cuda::gpu_uuid(&self.state.device)
                .map(Vec::from)
                .unwrap_or_default(),
        }))
    }

    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        self.handle(req.into_inner(), Instant::now())
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    type ForwardStreamStream = ReceiverStream<Result<ForwardResponse, Status>>;

    async fn forward_stream(
        &self,
        req: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let svc = self.clone();
        let mut draining = self.state.draining.subscribe();
        tokio::spawn(async move {
            loop {
                // Shutting down: read no more; the stream ends once the calls already taken are
                // answered (each holds a sender), and the coordinator re-sends the rest.
                let msg = tokio::select! {
                    msg = inbound.next() => msg,
                    _ = draining.wait_for(|d| *d) => None,
                };
                let Some(msg) = msg else { break };
                let received = Instant::now();
                let req = match msg {
                    Ok(req) => req,
                    Err(status) => {
                        // A frame we cannot decode (e.g. over the size limit) ends the stream;
                        // a coordinator that went away shows up here as a transport error.
                        match status.code() {
                            tonic::Code::Unknown | tonic::Code::Cancelled => {
                                tracing::debug!(%status, "coordinator closed the forward stream")
                            }
                            _ => tracing::warn!(%status, "forward stream closed by a bad frame"),
                        }
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let svc = svc.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let id = req.request_id;
                    let resp = svc
                        .handle(req, received)
                        .await
                        .unwrap_or_else(|e| failed(id, &e));
                    let _ = tx.send(Ok(resp)).await;
                });
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type OpenLaneStream = ReceiverStream<Result<LaneEvent, Status>>;

    #[instrument(skip_all, fields(node = %self.state.name, path = %req.get_ref().path))]
    async fn open_lane(
        &self,
        req: Request<OpenLaneRequest>,
    ) -> Result<Response<Self::OpenLaneStream>, Status> {
        crate::lane::open(&self.state, req.into_inner())
            .map(Response::new)
            .map_err(|e| {
                tracing::info!(error = %e, "refused a shared-memory lane");
                e.to_status()
            })
    }
}

/// Accepted connections of `listener` with Nagle's algorithm off (a decode step's small
/// request/response pairs must not wait for delayed ACKs, ~40 ms on Linux), each closed once
/// nothing has been read from it for `idle`.
pub fn incoming(
    listener: tokio::net::TcpListener,
    idle: std::time::Duration,
) -> impl futures::Stream<Item = std::io::Result<crate::idle::IdleTimeout>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(crate::idle::IdleTimeout::new(conn, idle))
    })
}
