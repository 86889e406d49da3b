//! Routed calls on the node (`ForwardRequest.device_routed`, the coordinator's `--gpu-routing`):
//! the layer's routing and hidden states are read from the coordinator's GPU memory once its
//! event says they are there, the slots of the experts held here are computed and written back
//! into its memory, and the answer — an event recorded after those writes — leaves as soon as the
//! work is queued: the node's host never waits for its GPU. The protocol and why:
//! `omnishard-model`'s `ops/cuda/routed.rs`.
//!
//! Routed passes (`ForwardRequest.device_pass`): every layer of a forward pass queued at once,
//! each behind a flag in the coordinator's memory (`ops/cuda/pass.rs`); the answer leaves when
//! the GPU has done them all, or the pass has missed its deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use omnishard_model::lending::host_id;
use omnishard_model::ops::cuda::{SharedEvent, check_pass, import_routed, queue_pass};
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
    if carries_more(req) {
        return Err(NodeError::RoutedExtra);
    }
    let layer = req.layer as usize;
    check_held(experts, layer, &routed.experts)?;
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

/// Whether a routed call or pass also carries what only the host path does.
fn carries_more(req: &ForwardRequest) -> bool {
    req.hidden.is_some()
        || req.device_hidden.is_some()
        || !req.token_index.is_empty()
        || !req.expert_id.is_empty()
        || !req.weight.is_empty()
}

/// Fails (FAILED_PRECONDITION) unless every expert of `list` of `layer` is held here.
fn check_held(experts: &LocalExperts, layer: usize, list: &[u32]) -> Result<(), NodeError> {
    match list.iter().find(|&&e| !experts.holds(layer, e as usize)) {
        Some(&expert) => Err(ExpertError::NotHeld {
            layer,
            expert: expert as usize,
        }
        .into()),
        None => Ok(()),
    }
}

/// The longest a pass may ask the node to wait for its GPU.
const MAX_PASS_DEADLINE: Duration = Duration::from_secs(60);

/// Queues a routed pass and answers once the GPU has done it (this blocking thread polls).
pub(crate) fn process_pass(
    state: &NodeState,
    experts: &LocalExperts,
    req: &ForwardRequest,
    pass: &v1::DevicePass,
) -> Result<ForwardResponse, NodeError> {
    if carries_more(req) || req.device_routed.is_some() {
        return Err(NodeError::RoutedExtra);
    }
    if pass.deadline_ms == 0 {
        return Err(NodeError::PassDeadline);
    }
    if req.ipc_host.is_empty() || req.ipc_host != host_id() {
        return Err(NodeError::Ipc(
            "a routed pass comes from a coordinator on this host".into(),
        ));
    }
    if let Some(l) = pass.layers.iter().find(|l| l.experts.is_empty()) {
        return Err(NodeError::BadPass(format!(
            "layer {} is listed with no experts to compute",
            l.layer
        )));
    }
    if pass.layers.is_empty() {
        return Err(NodeError::BadPass("it lists no layers".into()));
    }
    check_pass(pass, experts.top_k(), experts.hidden_size())
        .map_err(|e| NodeError::BadPass(e.to_string()))?;
    for l in &pass.layers {
        check_held(experts, l.layer as usize, &l.experts)?;
    }
    let started = Instant::now();
    let deadline = started + Duration::from_millis(pass.deadline_ms.into()).min(MAX_PASS_DEADLINE);
    let mut failed = None;
    let queued = queue_pass(
        &state.pass_mappings,
        &state.device,
        pass,
        experts.top_k(),
        experts.hidden_size(),
        &mut |layer, call| {
            experts.outputs_routed_into(layer, call).map_err(|e| {
                let message = e.to_string();
                failed = Some(e);
                candle_core::Error::Msg(message)
            })
        },
    );
    let queued = match (queued, failed) {
        (Ok(q), _) => q,
        (Err(_), Some(e)) => return Err(e.into()),
        (Err(e), None) => return Err(NodeError::Ipc(e.to_string())),
    };
    let launched = micros(started.elapsed());
    match queued.wait(deadline) {
        Ok(true) => {}
        Ok(false) => return Err(NodeError::PassTimeout),
        Err(e) => return Err(NodeError::Gpu(e.to_string())),
    }
    Ok(ForwardResponse {
        request_id: req.request_id,
        timing: Some(v1::NodeTiming {
            wait_us: 0,
            upload_us: 0,
            compute_us: micros(started.elapsed()),
            download_us: 0,
            launch_us: launched,
            plan_us: 0,
        }),
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
