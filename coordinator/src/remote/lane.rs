//! The coordinator's end of a same-host lane to one expert node (`omnishard_proto::lane`):
//! opening it over gRPC (`OpenLane`, whose answer stream is the lane's lifetime), and waiting
//! for an answer — spinning for a while, then sleeping on the slot in short naps, so that the
//! other futures of the layer's call (nodes over gRPC, the hedging timer) still get polled.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use omnishard_proto::lane::{LaneClient, LaneError, Posted};
use omnishard_proto::v1::{
    InfoRequest, OpenLaneRequest, expert_service_client::ExpertServiceClient,
};
use tonic::transport::Channel;

/// Longest nap between two looks at a slot once the spin is over: the delay added to the other
/// calls polled by the same thread, and to an answer that lands during a nap (the node wakes
/// the napping side, so usually much less).
const NAP: Duration = Duration::from_micros(200);

/// How long the caller spins for a lane's answer before napping: a coordinator on a GPU has its
/// host to itself while the node works, and a GPU node answers a decode call in tens of µs; on
/// a CPU the cores are the nodes' (and the next layer's), so it naps almost at once.
pub(super) fn spin(device: &candle_core::Device) -> Duration {
    if device.is_cuda() {
        Duration::from_millis(1)
    } else {
        Duration::from_micros(20)
    }
}

/// A node's lane, as far as this coordinator knows.
pub(super) enum LaneState {
    /// Not asked for yet, or to be asked again (the last one closed).
    Untried,
    Open(OpenLane),
    /// The node cannot map it (another host, another container, an older node): gRPC only,
    /// until the node is re-admitted.
    Unavailable,
}

/// An open lane and the task watching its `OpenLane` call; dropping it closes the lane.
pub(super) struct OpenLane {
    pub(super) lane: Arc<LaneClient>,
    watcher: tokio::task::AbortHandle,
}

impl Drop for OpenLane {
    fn drop(&mut self) {
        self.watcher.abort();
        self.lane.close();
    }
}

/// Why a node has no lane.
pub(super) enum NoLane {
    /// It did not answer, or is shutting down: the call over the stream finds out which; ask
    /// again next time.
    Unreachable,
    /// It runs on another host (or says nothing of its host: an older node).
    Elsewhere,
    /// It is on this host but the lane could not be made or mapped.
    Failed(String),
}

/// Asks the node where it runs and, on this host, creates a lane and has the node map it; the
/// lane closes when the call's answer stream ends (the node shutting down or gone).
pub(super) async fn open(
    mut client: ExpertServiceClient<Channel>,
    host: &str,
) -> Result<OpenLane, NoLane> {
    let info = client
        .info(InfoRequest {})
        .await
        .map_err(|_| NoLane::Unreachable)?
        .into_inner();
    if info.host_id.is_empty() || info.host_id != host {
        return Err(NoLane::Elsewhere);
    }
    open_here(client, host).await
}

async fn open_here(
    mut client: ExpertServiceClient<Channel>,
    host: &str,
) -> Result<OpenLane, NoLane> {
    let refused = |s: tonic::Status| match s.code() {
        tonic::Code::Unavailable => NoLane::Unreachable,
        _ => NoLane::Failed(s.message().to_string()),
    };
    let lane = Arc::new(LaneClient::create().map_err(|e| NoLane::Failed(e.to_string()))?);
    let path = lane.path().to_string_lossy().into_owned();
    let opened = async {
        let mut events = client
            .open_lane(OpenLaneRequest {
                path,
                host: host.to_string(),
            })
            .await
            .map_err(refused)?
            .into_inner();
        match events.message().await {
            Ok(Some(event)) if event.opened => Ok(events),
            Ok(_) => Err(NoLane::Failed(
                "the node ended the call without opening the lane".to_string(),
            )),
            Err(s) => Err(refused(s)),
        }
    }
    .await;
    // Mapped by the node, or never to be: the name is not needed either way.
    lane.unlink();
    let mut events = opened?;
    let watched = lane.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(_)) = events.message().await {}
        watched.close();
    })
    .abort_handle();
    Ok(OpenLane { lane, watcher })
}

/// A posted request's answer: the encoded `ForwardResponse`.
pub(super) struct Answer {
    posted: Posted,
    spin_until: Instant,
}

impl Answer {
    pub(super) fn new(posted: Posted, spin: Duration) -> Self {
        Self {
            posted,
            spin_until: Instant::now() + spin,
        }
    }
}

impl Future for Answer {
    type Output = Result<Vec<u8>, LaneError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(answer) = self.posted.try_take() {
            return Poll::Ready(answer);
        }
        if Instant::now() < self.spin_until {
            std::hint::spin_loop();
        } else {
            self.posted.sleep(NAP);
            if let Some(answer) = self.posted.try_take() {
                return Poll::Ready(answer);
            }
        }
        // Polled again at once: this future is its own poller (the deadline around it still
        // ends it).
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
