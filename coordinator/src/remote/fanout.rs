//! One MoE layer over the cluster: [`plan`] splits the layer's assignments into one share per
//! node, the shares are sent concurrently (`layer_call.rs`), and a share whose node fails is
//! re-planned onto replicas and re-sent within the same call. The answers are summed by
//! [`combine`], so where an expert was computed never changes the bits.

use std::sync::atomic::Ordering;

use candle_core::{Device, Tensor};
use futures::future::join_all;
use omnishard_model::experts::combine;
use omnishard_model::ops::cuda::{DeviceRouting, Lent, gather};
use omnishard_model::wire;
use omnishard_model::{Assignment, CallContext, ExpertError, Experts, Pass, Routing};
use omnishard_proto::wire::IPC_READ_FAILED;

use super::RemoteExperts;
use super::call_error::{CallError, Fault};
use super::client::Payload;
use super::lane;
use super::layer_call::{HiddenRows, LayerCall};
use super::plan::plan;
use super::profile::Stage;

/// One node's answer: rows sent as bytes, or left in its GPU memory until every answer of the
/// layer is in and they are copied together.
enum Rows<'a> {
    Host(Tensor),
    Lent(Lent<'a>),
}

impl Rows<'_> {
    fn dims(&self) -> &[usize] {
        match self {
            Rows::Host(t) => t.dims(),
            Rows::Lent(l) => l.dims(),
        }
    }

    fn dtype(&self) -> candle_core::DType {
        match self {
            Rows::Host(t) => t.dtype(),
            Rows::Lent(l) => l.dtype(),
        }
    }
}

impl Experts for RemoteExperts {
    fn takes_device_routing(&self, layer: usize) -> bool {
        // Under a pass, exactly its layers, whatever became of their nodes since (a failure
        // shows at the pass's end): the captured step must not call a node.
        self.pass_covers(layer)
            .unwrap_or_else(|| self.takes_routed_calls(layer))
    }

    /// Only as part of a routed pass (`pass.rs`), which batch-1 steps ask for each time.
    fn captures_device_routing(&self, _layer: usize) -> bool {
        self.passes_possible()
    }

    fn begin_pass(&self, device: &Device, tokens: usize, ctx: &CallContext) -> Pass {
        self.begin_routed_pass(device, tokens, ctx)
    }

    fn end_pass(&self, queued: bool) -> Result<(), ExpertError> {
        self.end_routed_pass(queued)
    }

    fn forward_device_routed(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &DeviceRouting,
        usage: &Tensor,
        ctx: &CallContext,
    ) -> Result<Tensor, ExpertError> {
        if let Some(sums) = self.pass_layer(layer, xs, routing, usage) {
            return sums;
        }
        self.forward_routed(layer, xs, routing, usage, ctx)
    }

    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
        ctx: &CallContext,
    ) -> Result<Tensor, ExpertError> {
        // The table first: nodes are only ever appended, so every index it holds is valid in the
        // node list read after it.
        let table = self.shared.table();
        let nodes = self.shared.nodes();
        let mut pending: Vec<Assignment> = routing.assignments().collect();
        // The answers so far: in nodes' GPU memory, and as bytes on the host.
        let (mut lent, mut host) = (Vec::new(), Vec::new());
        let mut assignments = Vec::with_capacity(pending.len());
        let mut host_assignments = Vec::new();
        let mut failures: Vec<(String, String)> = Vec::new();
        let mut laps = self.shared.profile.start();
        let ipc_host = omnishard_model::lending::host_id();
        let ipc_host = (self.shared.opts.cuda_ipc && xs.device().is_cuda() && !ipc_host.is_empty())
            .then_some(ipc_host);
        if ipc_host.is_some() {
            // For routed calls (`routed.rs`), which go to nodes on other GPUs only.
            self.shared.own_gpu.get_or_init(|| {
                omnishard_model::ops::cuda::gpu_uuid(xs.device())
                    .map(Vec::from)
                    .unwrap_or_default()
            });
            // Copies that completed since the last call give their buffers back (next request).
            for node in &nodes {
                node.ipc.prune();
            }
        }
        let rows = HiddenRows::new(xs);
        let row_bytes = rows.row_bytes;
        let call = LayerCall {
            layer,
            rows: &rows,
            ctx,
            table: &table,
            nodes: &nodes,
            opts: &self.shared.opts,
            fingerprint: &self.shared.fingerprint,
            profile: &self.shared.profile,
            ipc_host,
            lane_spin: self.shared.opts.shm_lane.then(|| lane::spin(xs.device())),
        };
        // Each round sends what is left to live replicas; a node that fails is marked down and
        // its share goes to the next round, within this same call.
        while !pending.is_empty() {
            let shares = plan(layer, &pending, &table, &nodes, &failures, None)?;
            pending.clear();
            // Nodes that answer in GPU memory read large row sets from the coordinator's too.
            let wants_device: Vec<bool> = shares
                .iter()
                .map(|share| {
                    let node = &nodes[share.node];
                    ipc_host.is_some()
                        && node.ipc_ok.load(Ordering::Relaxed)
                        && node.ipc_answers.load(Ordering::Relaxed) > 0
                        && share.tokens.len() * row_bytes >= self.shared.opts.ipc_input_min_bytes
                })
                .collect();
            laps.lap(Stage::Plan);
            // Hidden states leave a GPU once per layer, if any node takes its rows as bytes;
            // each node's rows are cut from that copy.
            if wants_device.iter().any(|w| !w) {
                rows.host()?;
                laps.lap(Stage::CopyOut);
            }
            let parts: Vec<&[u32]> = shares
                .iter()
                .zip(&wants_device)
                .filter(|(_, wants)| **wants)
                .map(|(s, _)| s.tokens.as_slice())
                .collect();
            // Held until this round's answers are in.
            let staged = if parts.is_empty() {
                None
            } else {
                match self.shared.staging.stage(xs, &parts) {
                    Ok(staged) => Some(staged),
                    Err(e) => {
                        tracing::warn!(layer, error = %e, "cannot stage hidden states in GPU memory: sending the bytes");
                        None
                    }
                }
            };
            laps.lap(Stage::Staging);
            let mut staged_parts = staged.iter().flat_map(|s| s.parts.iter().cloned());
            let mut sends = Vec::with_capacity(shares.len());
            for (mut share, wants) in shares.into_iter().zip(wants_device) {
                let device_hidden = wants.then(|| staged_parts.next()).flatten();
                share.device_input = device_hidden.is_some();
                let req = call.request(&share, device_hidden)?;
                sends.push(call.share(share, req));
            }
            laps.lap(Stage::Encode);
            let answers = self.block_on(join_all(sends));
            laps.lap(Stage::RoundTrip);
            for answer in answers.into_iter().flatten() {
                let _in_call = answer.span.enter();
                let node = &nodes[answer.node];
                let checked = answer.result.and_then(|reply| {
                    let ys = match reply.payload {
                        Payload::Bytes(output) => Rows::Host(
                            wire::decode(Some(&output), "output", &Device::Cpu)
                                .map_err(|e| CallError::BadAnswer(e.to_string()))?,
                        ),
                        Payload::Done(_) | Payload::Passed => {
                            return Err(CallError::BadAnswer(
                                "answered a call with assignments by an event".into(),
                            ));
                        }
                        Payload::Device(lent) => {
                            let ys = node
                                .ipc
                                .lent(xs.device(), &lent, reply.lease)
                                .map_err(|e| CallError::Ipc(e.to_string()))?;
                            node.ipc_answers.fetch_add(1, Ordering::Relaxed);
                            Rows::Lent(ys)
                        }
                    };
                    if ys.dims() != [answer.global.len(), rows.width]
                        || ys.dtype() != self.shared.dtype
                    {
                        return Err(CallError::BadAnswer(format!(
                            "answered a {:?} {:?} tensor for {} assignments",
                            ys.dtype(),
                            ys.dims(),
                            answer.global.len()
                        )));
                    }
                    Ok(ys)
                });
                // A node that cannot read the rows staged in GPU memory is not down: it gets
                // the bytes.
                let checked = checked.map_err(|e| match e {
                    CallError::Status { message, .. }
                        if answer.device_input && message.contains(IPC_READ_FAILED) =>
                    {
                        CallError::Ipc(message)
                    }
                    e => e,
                });
                match checked.map_err(|e| (e.fault(), e)) {
                    Ok(ys) => {
                        if answer.device_input {
                            node.ipc_requests.fetch_add(1, Ordering::Relaxed);
                        }
                        node.served
                            .fetch_add(answer.global.len() as u64, Ordering::Relaxed);
                        match ys {
                            Rows::Host(ys) => {
                                host.push(ys);
                                host_assignments.extend_from_slice(&answer.global);
                            }
                            Rows::Lent(ys) => {
                                lent.push(ys);
                                assignments.extend_from_slice(&answer.global);
                            }
                        }
                    }
                    Err((Fault::Node, e)) => {
                        let reason = e.to_string();
                        node.mark_down(&reason);
                        failures.push((node.label(), reason));
                        if !answer.covered {
                            pending.extend_from_slice(&answer.global);
                        }
                    }
                    // GPU memory between the two cannot be read: ask it again with the bytes.
                    Err((Fault::Ipc, e)) => {
                        node.ipc_ok.store(false, Ordering::Relaxed);
                        tracing::warn!(error = %e, "answers from this node come over gRPC from now on");
                        if !answer.covered {
                            pending.extend_from_slice(&answer.global);
                        }
                    }
                    // The node refused the request itself: no replica would take it either.
                    Err((Fault::Refused, e)) => {
                        return Err(ExpertError::Rejected {
                            node: node.label(),
                            layer,
                            reason: e.to_string(),
                        });
                    }
                }
            }
            laps.lap(Stage::Decode);
        }
        if lent.is_empty() && host.is_empty() {
            return Ok(xs.zeros_like()?);
        }
        // Answers in nodes' GPU memory are copied into one tensor, those that came as bytes
        // gathered on the host and copied onto the device in one go; rows in `assignments`
        // order (the sum does not depend on it). Every lent answer was mapped above, where a
        // node whose memory cannot be read is asked again for bytes; a copy that fails after
        // that is the coordinator's GPU failing, and fails the call.
        let mut parts = Vec::with_capacity(2);
        if !lent.is_empty() {
            parts.push(gather(xs.device(), lent)?);
        }
        if !host.is_empty() {
            parts.push(Tensor::cat(&host, 0)?.to_device(xs.device())?);
            assignments.extend(host_assignments);
        }
        let outputs = if parts.len() == 1 {
            parts.swap_remove(0)
        } else {
            Tensor::cat(&parts, 0)?
        };
        laps.lap(Stage::CopyBack);
        let sums = combine(routing.n_tokens(), &assignments, &outputs);
        laps.lap(Stage::Combine);
        sums
    }
}
