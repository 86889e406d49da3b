//! The routed experts of the MoE layers behind one abstraction, [`Experts`]: given a layer's
//! hidden states and the router's top-k choice per token, return the weighted sum of the chosen
//! experts' outputs. The routing code in the coordinator does not know whether the experts run
//! in this process ([`LocalExperts`]) or on expert nodes across the network.
//!
//! Numerics follow `Qwen3OmniMoeThinkerTextSparseMoeBlock` (transformers 4.57.3): the top-k
//! weights are cast to the compute dtype, each expert runs once over the batch of its tokens,
//! its output is scaled by the weight and index-added into a zero tensor, experts in ascending id.

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::mlp::SwiGlu;
use omnishard_proto::ModelConfig;

/// Errors computing a layer's expert contribution.
#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    #[error("layer {layer} is not an MoE layer of this model")]
    UnknownLayer { layer: usize },
    #[error("expert {expert} of layer {layer} is not held here")]
    NotHeld { layer: usize, expert: usize },
    #[error("invalid routing for layer {layer}: {reason}")]
    InvalidRouting { layer: usize, reason: String },
    #[error("expert computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Remote(String),
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

/// Anything that computes the routed-expert part of an MoE layer.
pub trait Experts: Send + Sync {
    /// `xs`: `[n_tokens, hidden]` in the compute dtype. Returns `[n_tokens, hidden]`: for each
    /// token, the sum over its top-k experts of `weight * expert(x)`.
    fn forward(&self, layer: usize, xs: &Tensor, routing: &Routing) -> Result<Tensor, ExpertError>;
}

/// Experts held in this process, indexed `[layer][expert]`.
pub struct LocalExperts {
    experts: Vec<Vec<Option<SwiGlu>>>,
    hidden_size: usize,
    dtype: DType,
}

/// Name prefix of one expert's tensors in the checkpoint.
pub fn expert_prefix(cfg: &ModelConfig, layer: usize, expert: usize) -> String {
    format!(
        "{}model.layers.{layer}.mlp.experts.{expert}",
        cfg.architecture.tensor_prefix()
    )
}

impl LocalExperts {
    /// Loads the given (layer, expert) pairs; `progress(done, total)` is called after each one.
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        pairs: &[(usize, usize)],
        dtype: DType,
        device: &Device,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, CheckpointError> {
        let mut experts: Vec<Vec<Option<SwiGlu>>> = (0..cfg.num_hidden_layers)
            .map(|_| vec![None; cfg.num_experts])
            .collect();
        for (i, &(layer, expert)) in pairs.iter().enumerate() {
            let mlp = SwiGlu::load(
                ckpt,
                &expert_prefix(cfg, layer, expert),
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                dtype,
                device,
            )?;
            experts[layer][expert] = Some(mlp);
            progress(i + 1, pairs.len());
        }
        Ok(Self {
            experts,
            hidden_size: cfg.hidden_size,
            dtype,
        })
    }

    /// The (layer, expert) pairs held, in order.
    pub fn held(&self) -> Vec<(usize, usize)> {
        self.experts
            .iter()
            .enumerate()
            .flat_map(|(l, row)| {
                row.iter()
                    .enumerate()
                    .filter(|(_, e)| e.is_some())
                    .map(move |(e, _)| (l, e))
            })
            .collect()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.experts
            .iter()
            .flatten()
            .flatten()
            .map(SwiGlu::size_in_bytes)
            .sum()
    }

    /// The weighted sum of the assigned experts' outputs per token: `[n_tokens, hidden]`.
    /// Validates everything a remote caller could get wrong before computing anything.
    pub fn forward_assignments(
        &self,
        layer: usize,
        xs: &Tensor,
        assignments: &[Assignment],
    ) -> Result<Tensor, ExpertError> {
        let row = self
            .experts
            .get(layer)
            .filter(|row| row.iter().any(Option::is_some))
            .ok_or(ExpertError::UnknownLayer { layer })?;
        let invalid = |reason: String| ExpertError::InvalidRouting { layer, reason };
        let (n_tokens, hidden) = xs.dims2().map_err(|_| {
            invalid(format!(
                "hidden states must be [tokens, hidden], got {:?}",
                xs.dims()
            ))
        })?;
        if hidden != self.hidden_size {
            return Err(invalid(format!(
                "hidden size {hidden}, the model has {}",
                self.hidden_size
            )));
        }
        // Group by expert, ascending, as the reference's loop over experts does.
        let mut by_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); row.len()];
        let mut seen = std::collections::HashSet::with_capacity(assignments.len());
        for a in assignments {
            if a.token as usize >= n_tokens {
                return Err(invalid(format!(
                    "token index {} out of range for {n_tokens} tokens",
                    a.token
                )));
            }
            if !a.weight.is_finite() {
                return Err(invalid(format!(
                    "non-finite weight {} for token {}",
                    a.weight, a.token
                )));
            }
            let slot = by_expert
                .get_mut(a.expert as usize)
                .filter(|_| row[a.expert as usize].is_some())
                .ok_or(ExpertError::NotHeld {
                    layer,
                    expert: a.expert as usize,
                })?;
            if !seen.insert((a.token, a.expert)) {
                return Err(invalid(format!(
                    "token {} routed twice to expert {}",
                    a.token, a.expert
                )));
            }
            slot.0.push(a.token);
            slot.1.push(a.weight);
        }
        let mut out = Tensor::zeros((n_tokens, hidden), self.dtype, xs.device())?;
        for (expert, (tokens, weights)) in by_expert.into_iter().enumerate() {
            let Some(mlp) = &row[expert] else { continue };
            if tokens.is_empty() {
                continue;
            }
            let m = tokens.len();
            let idx = Tensor::from_vec(tokens, m, xs.device())?;
            let w = Tensor::from_vec(weights, (m, 1), xs.device())?.to_dtype(self.dtype)?;
            let ys = mlp.forward(&xs.index_select(&idx, 0)?)?.broadcast_mul(&w)?;
            out = out.index_add(&idx, &ys, 0)?;
        }
        Ok(out)
    }
}

impl Experts for LocalExperts {
    fn forward(&self, layer: usize, xs: &Tensor, routing: &Routing) -> Result<Tensor, ExpertError> {
        let assignments: Vec<Assignment> = routing.assignments().collect();
        self.forward_assignments(layer, xs, &assignments)
    }
}
