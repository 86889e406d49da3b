//! The node's end of same-host lanes (`omnishard_proto::lane`): `OpenLane` maps the file a
//! coordinator on this host made and starts a thread that answers the requests posted in it
//! with the same code as the gRPC stream ([`crate::server::serve_one`]). The lane lives as long
//! as the `OpenLane` call: it closes when the coordinator ends the call (or dies: its connection
//! drops), and the node closes it, between two calls, once it starts shutting down.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use omnishard_proto::lane::{ANSWER_TOO_LARGE, LaneServer};
use omnishard_proto::v1::{ForwardRequest, LaneEvent, OpenLaneRequest};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use omnishard_model::lending::host_id;

use crate::server::{NodeError, NodeState, failed, serve_one};

/// Lanes one node serves at once (a thread each).
const MAX_LANES: usize = 16;

/// How long a lane thread polls for the next request after answering one before it sleeps: on
/// a GPU the host is idle while the experts run, and the next layer's call comes within tens
/// of µs; on a CPU node the cores belong to the experts, and polling would take one from them.
fn spin(state: &NodeState) -> Duration {
    if state.device.is_cuda() {
        Duration::from_millis(2)
    } else {
        Duration::from_micros(20)
    }
}

/// Opens the lane `req` names; its events stream says when it is open, and ends when it
/// closes.
pub(crate) fn open(
    state: &Arc<NodeState>,
    req: OpenLaneRequest,
) -> Result<ReceiverStream<Result<LaneEvent, Status>>, NodeError> {
    if state.draining() {
        return Err(NodeError::ShuttingDown);
    }
    if req.host.is_empty() || req.host != host_id() {
        return Err(NodeError::Lane(
            "the coordinator is on another host (boot ids differ)".into(),
        ));
    }
    if state.lanes.fetch_add(1, Ordering::AcqRel) >= MAX_LANES {
        state.lanes.fetch_sub(1, Ordering::AcqRel);
        return Err(NodeError::Lane(format!(
            "this node serves {MAX_LANES} lanes already"
        )));
    }
    let count = LaneCount(state.clone());
    let server = LaneServer::open(&req.path).map_err(|e| NodeError::Lane(e.to_string()))?;
    let closer = server.closer();
    let (events, rx) = mpsc::channel(1);
    // The channel is fresh: the first event always fits.
    let _ = events.try_send(Ok(LaneEvent { opened: true }));
    let (done, thread_done) = oneshot::channel::<()>();
    let st = state.clone();
    let spin = spin(state);
    std::thread::Builder::new()
        .name("lane".into())
        .spawn(move || {
            let _count = count;
            tracing::debug!(path = %req.path, "shared-memory lane open");
            server.serve(
                spin,
                |bytes, capacity| answer(&st, bytes, capacity),
                || st.draining(),
            );
            tracing::debug!(path = %req.path, "shared-memory lane closed");
            let _ = done.send(());
        })
        .map_err(|e| NodeError::Lane(format!("cannot start its thread: {e}")))?;
    tokio::spawn(async move {
        tokio::select! {
            // The coordinator ended the call, or is gone.
            () = events.closed() => closer.close(),
            _ = thread_done => {}
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Counts a lane thread in `NodeState::lanes` until it ends.
struct LaneCount(Arc<NodeState>);

impl Drop for LaneCount {
    fn drop(&mut self) {
        self.0.lanes.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One posted request's encoded answer, within `capacity` bytes.
fn answer(state: &Arc<NodeState>, bytes: &[u8], capacity: usize) -> Vec<u8> {
    let received = Instant::now();
    let resp = match ForwardRequest::decode(bytes) {
        Ok(req) => {
            let (id, layer) = (req.request_id, req.layer);
            let result = match state.start_call() {
                Some(call) => serve_one(state, req, received, call),
                None => Err(NodeError::ShuttingDown),
            };
            result.unwrap_or_else(|e| {
                tracing::warn!(layer, call = id, error = %e, "forward request failed");
                failed(id, &e)
            })
        }
        Err(e) => failed(
            0,
            &NodeError::Lane(format!("cannot decode a request from the lane: {e}")),
        ),
    };
    let encoded = resp.encode_to_vec();
    if encoded.len() <= capacity {
        return encoded;
    }
    // An answer asked for in GPU memory that came as bytes (nothing to lend): the coordinator
    // sends the request again over gRPC.
    let e = NodeError::Lane(format!(
        "{ANSWER_TOO_LARGE} ({} bytes, a slot holds {capacity})",
        encoded.len()
    ));
    failed(resp.request_id, &e).encode_to_vec()
}
