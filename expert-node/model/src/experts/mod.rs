//! The routed experts of the MoE layers behind one abstraction, [`Experts`]: given a layer's
//! hidden states and the router's top-k choice per token, return the weighted sum of the chosen
//! experts' outputs. The routing code in the coordinator does not know whether the experts run
//! in this process ([`LocalExperts`]) or on expert nodes across the network.
//!
//! Numerics follow `Qwen3OmniMoeThinkerTextSparseMoeBlock` (transformers 4.57.3): the top-k
//! weights are cast to the compute dtype, each expert runs once over the batch of its tokens,
//! its output is scaled by the weight and index-added into a zero tensor, experts in ascending id.

mod local;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use omnishard_proto::ModelConfig;

use crate::ops::cuda;

pub use local::LocalExperts;

/// Errors computing a layer's expert contribution.
#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    #[error("layer {layer} is not an MoE layer of this model")]
    UnknownLayer { layer: usize },
    #[error("layer {layer}: the hidden states are malformed: {reason}")]
    InvalidInput { layer: usize, reason: String },
    /// The caller computes in another dtype than these experts: a node started with another
    /// `--dtype` than its cluster, which a replica started right would serve.
    #[error("layer {layer}: hidden states are {got:?}, these experts compute in {computes:?}")]
    Dtype {
        layer: usize,
        got: candle_core::DType,
        computes: candle_core::DType,
    },
    #[error("expert {expert} of layer {layer} is not held here")]
    NotHeld { layer: usize, expert: usize },
    #[error("invalid routing for layer {layer}: {reason}")]
    InvalidRouting { layer: usize, reason: String },
    #[error("expert computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("expert node {node} failed on layer {layer}: {reason}")]
    Node {
        node: String,
        layer: usize,
        reason: String,
    },
    /// No node in the cluster holds the expert at all (possible after a placement reload retired
    /// its holders); [`ExpertError::Node`] is the case of holders that exist but failed. The
    /// message keeps the wording of the `Node` error this case was once reported as.
    #[error("layer {layer}: expert {expert} has no live node: {reason}")]
    NoLiveHolder {
        layer: usize,
        expert: usize,
        reason: String,
    },
    #[error("expert node {node} refused layer {layer}: {reason}")]
    Rejected {
        node: String,
        layer: usize,
        reason: String,
    },
    #[error("inconsistent expert outputs: {0}")]
    Inconsistent(String),
}

/// The router's decision for a batch of tokens: row-major `[n_tokens, top_k]` expert ids and
/// weights (already normalised when `norm_topk_prob`), as f32 on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn n_tokens(&self) -> usize {
        self.ids.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// `(token, expert, weight)` for every routed slot.
    pub fn assignments(&self) -> impl Iterator<Item = Assignment> + '_ {
        let k = self.top_k.max(1);
        self.ids
            .iter()
            .zip(&self.weights)
            .enumerate()
            .map(move |(i, (&expert, &weight))| Assignment {
                token: (i / k) as u32,
                expert,
                weight,
            })
    }
}

/// One token sent to one expert with the router's weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

/// Whom a forward pass works for: the ids of the client requests whose tokens it carries, so
/// that expert nodes can name them in their logs. Empty outside the server.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub request_ids: Arc<[String]>,
}

/// Anything that computes the routed-expert part of an MoE layer.
pub trait Experts: Send + Sync {
    /// `xs`: `[n_tokens, hidden]` in the compute dtype. Returns `[n_tokens, hidden]`: for each
    /// token, the sum over its top-k experts of `weight * expert(x)`.
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
        ctx: &CallContext,
    ) -> Result<Tensor, ExpertError>;

    /// Whether [`Experts::forward_device_routed`] serves `layer` (experts held on this GPU).
    fn takes_device_routing(&self, _layer: usize) -> bool {
        false
    }

    /// Whether a CUDA graph may capture [`Experts::forward_device_routed`] for `layer`: it only
    /// queues work on this process's GPU, with nothing for the host to wait for or send.
    fn captures_device_routing(&self, _layer: usize) -> bool {
        false
    }

    /// Begins a forward pass of `tokens` tokens on `device` that a CUDA graph may capture (a
    /// batch-1 decode step): whether its MoE layers need ordering for the whole pass first.
    /// After [`Pass::Ordered`], [`Experts::forward_device_routed`] only queues GPU work for the
    /// pass, and [`Experts::end_pass`] must follow on the same thread.
    fn begin_pass(&self, _device: &Device, _tokens: usize, _ctx: &CallContext) -> Pass {
        Pass::NotNeeded
    }

    /// Ends the pass [`Experts::begin_pass`] ordered: `queued` says whether all of its work
    /// was queued (run, or replayed from a graph), not cut short by an error. `Err` when the
    /// experts' part failed: the pass's outputs are garbage and it must run again (its waits on
    /// the GPUs have been released, unless releasing them failed too, which is logged).
    fn end_pass(&self, _queued: bool) -> Result<(), ExpertError> {
        Ok(())
    }

    /// The expert step of a batch with the router's choices left on the GPU (no host round
    /// trip per layer), adding the chosen experts to `usage` (the layer's u32 counts
    /// on the GPU). Only called where [`Experts::takes_device_routing`] said yes.
    fn forward_device_routed(
        &self,
        layer: usize,
        _xs: &Tensor,
        _routing: &cuda::DeviceRouting,
        _usage: &Tensor,
        _ctx: &CallContext,
    ) -> Result<Tensor, ExpertError> {
        Err(ExpertError::Inconsistent(format!(
            "layer {layer}: these experts take no routing left on the GPU"
        )))
    }
}

/// What [`Experts::begin_pass`] says of a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The experts need no ordering (they only queue work on this GPU).
    NotNeeded,
    /// The pass's expert work is ordered; the key names what it will queue: a pass under
    /// another key queues other work (another graph).
    Ordered(u64),
    /// Not now: the pass must run without a graph.
    Unavailable,
}

/// Name prefix of one expert's tensors in the checkpoint.
pub fn expert_prefix(cfg: &ModelConfig, layer: usize, expert: usize) -> String {
    format!(
        "{}model.layers.{layer}.mlp.experts.{expert}",
        cfg.architecture.tensor_prefix()
    )
}

/// Assignment indices per expert id (index = expert), each list in assignment order.
pub(crate) fn group_by_expert(
    assignments: &[Assignment],
    num_experts: usize,
) -> Vec<(usize, Vec<u32>)> {
    let mut groups: Vec<(usize, Vec<u32>)> = (0..num_experts).map(|e| (e, Vec::new())).collect();
    for (i, a) in assignments.iter().enumerate() {
        if let Some((_, slots)) = groups.get_mut(a.expert as usize) {
            slots.push(i as u32);
        }
    }
    groups
}

/// Sums per-assignment expert outputs (`[n_assignments, hidden]`, in `assignments` order) into
/// per-token results `[n_tokens, hidden]`: starting from zeros, experts in ascending id, as the
/// reference's loop does. Because the order depends only on expert ids, the result is the same
/// bits wherever each expert was computed.
pub fn combine(
    n_tokens: usize,
    assignments: &[Assignment],
    outputs: &Tensor,
) -> Result<Tensor, ExpertError> {
    let (rows, hidden) = outputs.dims2()?;
    if rows != assignments.len() {
        return Err(ExpertError::Inconsistent(format!(
            "{rows} expert outputs for {} assignments",
            assignments.len()
        )));
    }
    if let Some(out) = cuda::combine(n_tokens, assignments, outputs)? {
        return Ok(out);
    }
    let device = outputs.device();
    let num_experts = assignments
        .iter()
        .map(|a| a.expert as usize + 1)
        .max()
        .unwrap_or(0);
    let mut out = Tensor::zeros((n_tokens, hidden), outputs.dtype(), device)?;
    for (_, slots) in group_by_expert(assignments, num_experts) {
        if slots.is_empty() {
            continue;
        }
        let tokens: Vec<u32> = slots
            .iter()
            .map(|&i| assignments[i as usize].token)
            .collect();
        let m = slots.len();
        let rows = outputs.index_select(&Tensor::from_vec(slots, m, device)?, 0)?;
        out = out.index_add(&Tensor::from_vec(tokens, m, device)?, &rows, 0)?;
    }
    Ok(out)
}
