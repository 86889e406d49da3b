//! Routed calls on the node (`ForwardRequest.device_routed`, the coordinator's `--gpu-routing`):
//! the layer's routing and hidden states are read from the coordinator's GPU memory once its
//! event says they are there, the slots of the experts held here are computed and written back
//! into its memory, and the answer — an event recorded after those writes — leaves as soon as the
//! work is queued: the node's host never waits for its GPU. The protocol and why:
//! `omnishard-model`'s `ops/cuda/routed.rs`.

use std::sync::Arc;
use std::time::Instant;

use omnishard_model::ops::cuda::{SharedEvent, import_routed};
use omnishard_model::{ExpertError, LocalExperts};
use omnishard_proto::v1::{self, ForwardRequest, ForwardResponse};

use crate::server::{NodeError, NodeState, micros};

/// Queues one routed call; the answer carries the node's event.
pub(crate) fn process(
    state: &NodeState,
    experts: &LocalExperts,
    req: &ForwardRequest,
    routed: &v1::DeviceRouted,
) -> Result<ForwardResponse, NodeError> {
    if req.hidden.is_some()
        || req.device_hidden.is_some()
        || !req.token_index.is_empty()
        || !req.expert_id.is_empty()
        || !req.weight.is_empty()
    {
        return Err(NodeError::RoutedExtra);
    }
    let layer = req.layer as usize;
    if let Some(&expert) = routed
        .experts
        .iter()
        .find(|&&e| !experts.holds(layer, e as usize))
    {
        return Err(ExpertError::NotHeld {
            layer,
            expert: expert as usize,
        }
        .into());
    }
    let importer = state.importer(req)?;
    let started = Instant::now();
    let imported = import_routed(
        &importer,
        &state.device,
        routed,
        experts.top_k(),
        experts.hidden_size(),
    )
    .map_err(|e| NodeError::Ipc(e.to_string()))?;
    let done = done_event(state)?;
    let uploaded = Instant::now();
    experts.outputs_routed_into(layer, &imported)?;
    done.record(&state.device)
        .map_err(|e| NodeError::Ipc(e.to_string()))?;
    let queued = micros(uploaded.elapsed());
    Ok(ForwardResponse {
        request_id: req.request_id,
        timing: Some(v1::NodeTiming {
            wait_us: 0,
            upload_us: micros(uploaded - started),
            // The host's part only: the GPU's is not waited for here.
            compute_us: queued,
            download_us: 0,
            launch_us: queued,
            plan_us: 0,
        }),
        done_event: done.handle().to_vec(),
        ..Default::default()
    })
}

/// The node's interprocess event, made on the first routed call.
fn done_event(state: &NodeState) -> Result<Arc<SharedEvent>, NodeError> {
    let mut event = state.done_event.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = event.as_ref() {
        return Ok(e.clone());
    }
    let made =
        Arc::new(SharedEvent::new(&state.device).map_err(|e| NodeError::Ipc(e.to_string()))?);
    *event = Some(made.clone());
    Ok(made)
}
