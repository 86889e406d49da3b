//! The client of one expert node: its long-lived bidirectional `ForwardStream` (opened on first
//! use, reopened after a failure) or, for a node on this host, its shared-memory lane
//! (`lane.rs`), requests tagged with ids and matched to pending replies, the deadline of each
//! call, the leases on what a node lent for its answers (CUDA IPC), and why a call failed
//! ([`CallError`]; whom that is blamed on: `call_error.rs`).
//!
//! Whether the node is up, how busy it is and what it holds is membership's business
//! (`membership.rs`); this file only talks to it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use omnishard_proto::lane::{ANSWER_TOO_LARGE, LaneError, REQUEST_CAPACITY};
use omnishard_proto::v1::{
    self, ForwardRequest, ForwardResponse, expert_service_client::ExpertServiceClient,
};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::call_error::CallError;
use super::lane::{self, LaneState};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<ForwardResponse, tonic::Status>>>>>;

/// What a node answered: the bytes, or a handle to GPU memory it lent (CUDA IPC, asked for by
/// a request with `ipc_host` set).
pub(super) enum Payload {
    Bytes(v1::Tensor),
    Device(v1::DeviceTensor),
    /// A routed call's answer: the handle of the node's event after its writes (`routed.rs`).
    Done(Vec<u8>),
    /// A routed pass's answer: the node's GPU has done it (`pass.rs`).
    Passed,
}

/// A node's answer, and the lease on what it lent until the answer has been taken.
pub(super) struct Reply {
    pub(super) payload: Payload,
    pub(super) lease: Lease,
    pub(super) timing: Option<v1::NodeTiming>,
    /// It came through the shared-memory lane.
    pub(super) via_lane: bool,
}

/// A request of this client not yet finished: from before it is sent until its answer has been
/// copied out (or given up on). Every request tells the node the smallest id still leased
/// (`ipc_keep_from`), below which the buffers it lent are free again.
pub(super) struct Lease {
    live: Arc<Mutex<BTreeSet<u64>>>,
    id: u64,
}

impl Lease {
    /// Takes the next request id from `next` and leases it; returns the lease, the id and the
    /// smallest id still leased. Both under the one lock: an id taken but not yet leased would
    /// let a concurrent request's keep_from pass it.
    fn take(live: &Arc<Mutex<BTreeSet<u64>>>, next: &AtomicU64) -> (Self, u64, u64) {
        let mut set = live.lock().unwrap_or_else(|e| e.into_inner());
        let id = next.fetch_add(1, Ordering::Relaxed);
        let keep_from = set.first().copied().unwrap_or(id).min(id);
        set.insert(id);
        let lease = Lease {
            live: live.clone(),
            id,
        };
        (lease, id, keep_from)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// The open `ForwardStream` of one node.
struct StreamConn {
    tx: mpsc::Sender<ForwardRequest>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// One expert node: its connection (replaced by a fresh one when a down node is re-admitted)
/// and its long-lived stream (opened on first use, reopened after a failure).
pub(super) struct NodeClient {
    pub(super) name: String,
    pub(super) address: String,
    conn: Mutex<(ExpertServiceClient<Channel>, Channel)>,
    stream: tokio::sync::Mutex<Option<StreamConn>>,
    /// The shared-memory lane, for a node on this host (opened on first use).
    lane: tokio::sync::Mutex<LaneState>,
    next_id: AtomicU64,
    /// This coordinator's client id at the node, for the GPU memory it lends (`ipc_client`).
    ipc_client: u64,
    /// Requests sent and not yet finished with (see [`Lease`]).
    leases: Arc<Mutex<BTreeSet<u64>>>,
    /// Set when the coordinator shuts down, so the end of the stream is not reported as a fault.
    closing: Arc<AtomicBool>,
}

impl NodeClient {
    pub(super) fn new(
        name: String,
        address: String,
        client: ExpertServiceClient<Channel>,
        channel: Channel,
    ) -> Self {
        Self {
            name,
            address,
            conn: Mutex::new((client, channel)),
            stream: tokio::sync::Mutex::new(None),
            lane: tokio::sync::Mutex::new(LaneState::Untried),
            next_id: AtomicU64::new(0),
            ipc_client: rand::random::<u64>().max(1),
            leases: Arc::default(),
            closing: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(super) fn label(&self) -> String {
        format!("{} ({})", self.name, self.address)
    }

    pub(super) fn client(&self) -> ExpertServiceClient<Channel> {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    pub(super) fn channel(&self) -> Channel {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Uses a fresh connection from now on (the old one may be dead without knowing it: a
    /// partition drops packets and resets nothing), with a fresh stream.
    pub(super) async fn replace(&self, client: ExpertServiceClient<Channel>, channel: Channel) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = (client, channel);
        self.drop_stream().await;
        // The process behind the address may be another: ask for its lane afresh.
        *self.lane.lock().await = LaneState::Untried;
    }

    /// The coordinator is shutting down: the end of the stream that follows is no fault.
    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::Release);
        if let Ok(mut lane) = self.lane.try_lock() {
            *lane = LaneState::Untried;
        }
    }

    /// Forgets the open stream (if any) so that the next call opens a fresh one. The lane stays:
    /// one late call does not end the others on it (a node that died closes it, and one that
    /// is re-admitted gets a new one).
    pub(super) async fn drop_stream(&self) {
        if let Some(conn) = self.stream.lock().await.take() {
            conn.alive.store(false, Ordering::Release);
        }
    }

    /// The open lane to this node, opening one if none was tried since the node was admitted
    /// (or the last one closed); `None`: it has none, calls go over the stream.
    async fn lane(&self) -> Option<Arc<omnishard_proto::lane::LaneClient>> {
        let mut state = self.lane.lock().await;
        match &*state {
            LaneState::Open(open) if !open.lane.is_closed() => return Some(open.lane.clone()),
            LaneState::Unavailable => return None,
            LaneState::Open(_) | LaneState::Untried => {}
        }
        let host = omnishard_model::lending::host_id();
        if host.is_empty() {
            *state = LaneState::Unavailable;
            return None;
        }
        match lane::open(self.client(), host).await {
            Ok(open) => {
                tracing::debug!(node = %self.label(), "calls go through a shared-memory lane");
                let lane = open.lane.clone();
                *state = LaneState::Open(open);
                Some(lane)
            }
            Err(lane::NoLane::Unreachable) => {
                *state = LaneState::Untried;
                None
            }
            Err(lane::NoLane::Elsewhere) => {
                *state = LaneState::Unavailable;
                None
            }
            Err(lane::NoLane::Failed(reason)) => {
                tracing::warn!(node = %self.label(), %reason, "the node runs on this host but cannot share a lane with this coordinator (in containers, share /dev/shm and run both as one user; or --shm-lane off): its calls go over gRPC");
                *state = LaneState::Unavailable;
                None
            }
        }
    }

    async fn stream(&self) -> Result<(mpsc::Sender<ForwardRequest>, Pending), String> {
        let mut guard = self.stream.lock().await;
        if let Some(conn) = guard.as_ref().filter(|c| c.alive.load(Ordering::Acquire)) {
            return Ok((conn.tx.clone(), conn.pending.clone()));
        }
        let (tx, rx) = mpsc::channel::<ForwardRequest>(64);
        let mut client = self.client();
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

    /// One request, with `timeout` as its deadline: through the node's shared-memory lane when
    /// `lane_spin` is given (the answer fits a lane slot) and the node has a lane — the caller
    /// spinning that long for the answer before it naps —, else over the stream. The caller's
    /// span (one layer's call to this node) names the layer, the node and the sizes. A request
    /// with `ipc_host` set asks for a CUDA IPC answer as this client.
    pub(super) async fn forward(
        &self,
        mut req: ForwardRequest,
        timeout: Duration,
        lane_spin: Option<Duration>,
    ) -> Result<Reply, CallError> {
        let deadline = Instant::now() + timeout;
        let call = async {
            let (lease, id, keep_from) = Lease::take(&self.leases, &self.next_id);
            req.request_id = id;
            // Every request says what this client is done with, asking for GPU memory or not,
            // so that a node frees what it lent even after the asking stopped.
            req.ipc_client = self.ipc_client;
            req.ipc_keep_from = keep_from;
            let asked_ipc = !req.ipc_host.is_empty();
            let asked_pass = req.device_pass.is_some();
            if let Some(spin) = lane_spin
                && req.encoded_len() <= REQUEST_CAPACITY
                && let Some(lane) = self.lane().await
                && let Some(posted) = lane.post(&req.encode_to_vec())
            {
                match lane::Answer::new(posted, spin).await {
                    Ok(answer) => {
                        let resp = ForwardResponse::decode(answer.as_slice()).map_err(|e| {
                            CallError::BadAnswer(format!("an undecodable answer on the lane: {e}"))
                        })?;
                        // Asked for in GPU memory but sent as bytes, too many for a slot: the
                        // stream takes it.
                        let too_large = resp
                            .error
                            .as_ref()
                            .is_some_and(|e| e.message.contains(ANSWER_TOO_LARGE));
                        if !too_large {
                            return reply(resp, (asked_ipc, asked_pass), lease, true);
                        }
                    }
                    // A routed pass may have been queued already: sent again it would take
                    // the next step's flags.
                    Err(LaneError::Closed) if asked_pass => {
                        return Err(CallError::Transport(
                            "the lane closed under a routed pass".into(),
                        ));
                    }
                    // Closed under the call (the node shutting down, or its lane's call ended):
                    // the stream says whether the node is still there.
                    Err(LaneError::Closed) => {}
                    Err(e) => return Err(CallError::BadAnswer(e.to_string())),
                }
            }
            let (tx, pending) = self.stream().await.map_err(CallError::Transport)?;
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
            reply(resp, (asked_ipc, asked_pass), lease, false)
        };
        match tokio::time::timeout_at(deadline.into(), call).await {
            Ok(result) => result,
            Err(_) => {
                // Whatever is in flight on this stream is now suspect: start afresh next time.
                self.drop_stream().await;
                Err(CallError::Timeout(timeout))
            }
        }
    }
}

/// A node's response as a [`Reply`], or the error it carries or is.
fn reply(
    resp: ForwardResponse,
    (asked_ipc, asked_pass): (bool, bool),
    lease: Lease,
    via_lane: bool,
) -> Result<Reply, CallError> {
    if let Some(e) = resp.error {
        return Err(CallError::status(tonic::Code::from(e.code), &e.message));
    }
    let payload = match (resp.output, resp.device_output) {
        (Some(output), None) => Payload::Bytes(output),
        (None, Some(lent)) if !asked_ipc => {
            return Err(CallError::BadAnswer(format!(
                "answered with GPU memory (slot {}) unasked",
                lent.slot
            )));
        }
        (None, Some(lent)) => Payload::Device(lent),
        (None, None) if asked_pass && resp.done_event.is_empty() => Payload::Passed,
        (None, None) if !resp.done_event.is_empty() && asked_ipc => Payload::Done(resp.done_event),
        (None, None) => return Err(CallError::BadAnswer("the response has no output".into())),
        (Some(_), Some(_)) => {
            return Err(CallError::BadAnswer(
                "the response has both an output and GPU memory".into(),
            ));
        }
    };
    Ok(Reply {
        payload,
        lease,
        timing: resp.timing,
        via_lane,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use candle_core::{Device, Tensor};
    use omnishard_model::Assignment;
    use omnishard_model::wire::{self, assignments_to_wire};
    use omnishard_proto::v1::{ForwardRequest, expert_service_client::ExpertServiceClient};
    use tonic::Code;
    use tonic::transport::Endpoint;

    use super::super::call_error::{CallError, Fault};
    use super::super::fake::{self, Script};
    use super::{Lease, NodeClient, Payload};

    const TIMEOUT: Duration = Duration::from_millis(100);

    #[test]
    fn keep_from_is_the_oldest_request_not_finished() {
        let live = Default::default();
        let next = AtomicU64::new(0);
        let (first, id, keep) = Lease::take(&live, &next);
        assert_eq!((id, keep), (0, 0));
        let (second, id, keep) = Lease::take(&live, &next);
        assert_eq!((id, keep), (1, 0));
        // The newer one finishes first: the older still holds what was lent for it.
        drop(second);
        let (third, id, keep) = Lease::take(&live, &next);
        assert_eq!((id, keep), (2, 0));
        drop(first);
        let (_fourth, id, keep) = Lease::take(&live, &next);
        assert_eq!((id, keep), (3, 2));
        drop(third);
        let (_fifth, id, keep) = Lease::take(&live, &next);
        assert_eq!((id, keep), (4, 3));
    }

    fn request() -> ForwardRequest {
        let xs = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6., 7., 8.], (2, 4), &Device::Cpu)
            .expect("a tensor");
        let assignments = [
            Assignment {
                token: 0,
                expert: 1,
                weight: 0.5,
            },
            Assignment {
                token: 1,
                expert: 3,
                weight: 0.25,
            },
        ];
        let (token_index, expert_id, weight) = assignments_to_wire(&assignments);
        ForwardRequest {
            layer: 1,
            hidden: Some(wire::encode(&xs).expect("encodes")),
            token_index,
            expert_id,
            weight,
            ..Default::default()
        }
    }

    /// One call to a fake node following `script`.
    async fn call(script: Script) -> (Result<omnishard_proto::v1::Tensor, CallError>, usize) {
        call_with(script, None).await
    }

    /// The same, offering the lane with `lane_spin`.
    async fn call_with(
        script: Script,
        lane_spin: Option<Duration>,
    ) -> (Result<omnishard_proto::v1::Tensor, CallError>, usize) {
        let node = fake::spawn("fake", script, &[0, 1], &[0, 1, 2, 3]).await;
        let channel = Endpoint::from_shared(format!("http://{}", node.addr))
            .expect("an endpoint")
            .connect()
            .await
            .expect("connects");
        let client = NodeClient::new(
            "fake".into(),
            node.address(),
            ExpertServiceClient::new(channel.clone()),
            channel,
        );
        let result = client.forward(request(), TIMEOUT, lane_spin).await;
        let output = result.and_then(|reply| match reply.payload {
            Payload::Bytes(output) => Ok(output),
            Payload::Device(_) | Payload::Done(_) | Payload::Passed => {
                Err(CallError::BadAnswer("GPU memory, unasked".into()))
            }
        });
        (output, node.calls())
    }

    #[tokio::test]
    async fn an_answer_comes_back_with_its_rows() {
        let (result, calls) = call(Script::Answer).await;
        let output = result.expect("answered");
        assert_eq!(output.shape, [2, 4]);
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn a_node_without_lanes_answers_on_its_stream() {
        let (result, calls) = call_with(Script::Answer, Some(Duration::from_micros(20))).await;
        assert_eq!(result.expect("answered").shape, [2, 4]);
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn node_failures_are_classified() {
        for (script, expect_code, blame) in [
            (
                Script::Fail(Code::InvalidArgument),
                Some(Code::InvalidArgument),
                Fault::Refused,
            ),
            (
                Script::Fail(Code::ResourceExhausted),
                Some(Code::ResourceExhausted),
                Fault::Refused,
            ),
            (
                Script::Fail(Code::Unavailable),
                Some(Code::Unavailable),
                Fault::Node,
            ),
            (
                Script::Fail(Code::FailedPrecondition),
                Some(Code::FailedPrecondition),
                Fault::Node,
            ),
            (
                Script::Fail(Code::Internal),
                Some(Code::Internal),
                Fault::Node,
            ),
            // The node closing its stream reads as UNAVAILABLE.
            (Script::EndStream, Some(Code::Unavailable), Fault::Node),
        ] {
            let (result, _) = call(script).await;
            let err = result.expect_err("a failure");
            match &err {
                CallError::Status { code, .. } => {
                    assert_eq!(Some(*code), expect_code, "{script:?}")
                }
                other => panic!("{script:?}: {other:?}"),
            }
            assert_eq!(err.fault(), blame, "{script:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_stream_that_cannot_open_is_a_transport_fault() {
        let (result, calls) = call(Script::NoStream).await;
        let err = result.expect_err("no stream");
        assert!(matches!(err, CallError::Transport(_)), "{err:?}");
        assert!(
            err.to_string().contains("cannot open the forward stream"),
            "{err}"
        );
        assert_eq!(err.fault(), Fault::Node);
        assert_eq!(calls, 0);
    }

    #[tokio::test]
    async fn a_silent_node_hits_the_deadline_and_is_at_fault() {
        let started = std::time::Instant::now();
        let (result, calls) = call(Script::Silent).await;
        let err = result.expect_err("no answer");
        assert!(
            matches!(err, CallError::Timeout(t) if t == TIMEOUT),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "no answer within the 100 ms deadline");
        assert_eq!(err.fault(), Fault::Node);
        assert_eq!(calls, 1);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
