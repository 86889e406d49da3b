//! The experts held in this process ([`LocalExperts`]): loaded per (layer, expert) from the
//! checkpoint, validated per call against everything a remote caller could get wrong, and
//! computed by the packed bf16 CPU kernels, the stacked GPU kernels, or candle's ops.

use candle_core::{DType, Device, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::{
    Assignment, CallContext, ExpertError, Experts, Routing, combine, expert_prefix, group_by_expert,
};
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::mlp::SwiGlu;
use crate::moe_cpu;
use crate::ops::cuda::{self, StackedExperts};
use crate::ops::with_cpu_bf16;
use crate::weights::Weights;
use omnishard_proto::ModelConfig;

/// One layer's experts as held in this process.
enum LayerExperts {
    /// Indexed by expert id, `None` where not held.
    Each(Vec<Option<SwiGlu>>),
    /// bf16 on a GPU: the held experts stacked for the fused kernels.
    Stacked(StackedExperts),
}

impl LayerExperts {
    fn holds(&self, expert: usize) -> bool {
        match self {
            LayerExperts::Each(row) => matches!(row.get(expert), Some(Some(_))),
            LayerExperts::Stacked(stacked) => stacked.holds(expert),
        }
    }
}

/// Experts held in this process, per layer.
pub struct LocalExperts {
    layers: Vec<LayerExperts>,
    num_experts: usize,
    moe_layers: Vec<bool>,
    hidden_size: usize,
    /// Experts per token (`num_experts_per_tok`): no call may route a token to more, which
    /// bounds a call's work and output at top-k times its input.
    top_k: usize,
    dtype: DType,
}

impl LocalExperts {
    /// Loads the given (layer, expert) pairs; `progress(done, total)` is called after each one.
    /// In bf16 on a GPU each layer's experts are stacked for the fused kernels
    /// ([`StackedExperts`]), read on the host and copied over once per layer.
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        pairs: &[(usize, usize)],
        dtype: DType,
        device: &Device,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, CheckpointError> {
        let (hidden, inter) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let stack =
            device.is_cuda() && dtype == DType::BF16 && StackedExperts::supports(hidden, inter);
        let mut by_layer: Vec<Vec<usize>> = vec![Vec::new(); cfg.num_hidden_layers];
        for &(layer, expert) in pairs {
            if let Some(experts) = by_layer.get_mut(layer) {
                experts.push(expert);
            }
        }
        let root = Weights::new(ckpt, dtype, device);
        let host = Weights::new(ckpt, DType::BF16, &Device::Cpu);
        let mut done = 0;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (layer, experts) in by_layer.iter().enumerate() {
            if stack && !experts.is_empty() {
                let mut tensors = Vec::with_capacity(experts.len());
                for &expert in experts {
                    let w = host.pp(expert_prefix(cfg, layer, expert));
                    let get = |name: &str, shape: &[usize]| w.pp(name).get("weight", shape);
                    tensors.push((
                        expert,
                        [
                            get("gate_proj", &[inter, hidden])?,
                            get("up_proj", &[inter, hidden])?,
                            get("down_proj", &[hidden, inter])?,
                        ],
                    ));
                    done += 1;
                    progress(done, pairs.len());
                }
                let stacked =
                    StackedExperts::new(cfg.num_experts, &tensors, device).map_err(|source| {
                        CheckpointError::Candle {
                            tensor: format!("the experts of layer {layer}"),
                            source,
                        }
                    })?;
                layers.push(LayerExperts::Stacked(stacked));
                continue;
            }
            let mut row = vec![None; cfg.num_experts];
            for &expert in experts {
                let mlp = SwiGlu::new(hidden, inter, root.pp(expert_prefix(cfg, layer, expert)))?;
                if let Some(slot) = row.get_mut(expert) {
                    *slot = Some(mlp);
                }
                done += 1;
                progress(done, pairs.len());
            }
            layers.push(LayerExperts::Each(row));
        }
        Ok(Self {
            layers,
            num_experts: cfg.num_experts,
            moe_layers: (0..cfg.num_hidden_layers)
                .map(|l| cfg.is_moe_layer(l))
                .collect(),
            hidden_size: cfg.hidden_size,
            top_k: cfg.num_experts_per_tok,
            dtype,
        })
    }

    /// The (layer, expert) pairs held, in order.
    pub fn held(&self) -> Vec<(usize, usize)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(l, row)| {
                (0..self.num_experts)
                    .filter(|&e| row.holds(e))
                    .map(move |e| (l, e))
            })
            .collect()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|layer| match layer {
                LayerExperts::Each(row) => row.iter().flatten().map(SwiGlu::size_in_bytes).sum(),
                LayerExperts::Stacked(stacked) => stacked.size_in_bytes(),
            })
            .sum()
    }

    /// `weight * expert(xs[token])` for every assignment, in the order given:
    /// `[n_assignments, hidden]`. Each expert runs once over the batch of its tokens, experts in
    /// parallel. Validates everything a remote caller could get wrong before computing anything.
    pub fn expert_outputs(
        &self,
        layer: usize,
        xs: &Tensor,
        assignments: &[Assignment],
    ) -> Result<Tensor, ExpertError> {
        self.expert_outputs_timed(layer, xs, assignments, &mut || {})
    }

    /// [`LocalExperts::expert_outputs`], calling `planned` once the call is checked and planned
    /// (on a GPU: its launch tables uploaded), before any expert runs: the node reports its
    /// host's planning apart from the launches.
    pub fn expert_outputs_timed(
        &self,
        layer: usize,
        xs: &Tensor,
        assignments: &[Assignment],
        planned: &mut dyn FnMut(),
    ) -> Result<Tensor, ExpertError> {
        let (row, groups) = self.checked_groups(layer, xs, assignments)?;
        let row = match row {
            LayerExperts::Stacked(stacked) => {
                return Ok(stacked.outputs(xs, assignments, &groups, planned)?);
            }
            LayerExperts::Each(row) => row,
        };
        planned();
        self.outputs_each(row, layer, xs, assignments, groups)
    }

    /// Experts a token may be routed to (`num_experts_per_tok`).
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// A routed call (`ForwardRequest.device_routed`): the output of every slot of the
    /// coordinator's top-k that chose an expert held here, written as row `slot` of its
    /// `[n * k, hidden]` rows (see [`cuda::import_routed`]); the other rows are left alone.
    /// Queued on the device's stream, not waited for.
    pub fn outputs_routed_into(
        &self,
        layer: usize,
        call: &cuda::ImportedRouted,
    ) -> Result<(), ExpertError> {
        match self.layer_experts(layer) {
            Some(LayerExperts::Stacked(stacked)) => Ok(stacked.outputs_routed_into(call)?),
            Some(LayerExperts::Each(_)) => Err(ExpertError::Dtype {
                layer,
                got: DType::BF16,
                computes: self.dtype,
            }),
            None => Err(ExpertError::UnknownLayer { layer }),
        }
    }

    /// Whether expert `expert` of MoE layer `layer` is held here.
    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.layer_experts(layer)
            .is_some_and(|row| row.holds(expert))
    }

    /// The experts of MoE layer `layer`, if it is one.
    fn layer_experts(&self, layer: usize) -> Option<&LayerExperts> {
        self.layers.get(layer).filter(|_| self.moe_layers[layer])
    }

    /// Validates a call (everything a remote caller could get wrong) and groups the
    /// assignments by expert: each held expert with tokens, its assignment indices in order.
    #[allow(clippy::type_complexity)]
    fn checked_groups(
        &self,
        layer: usize,
        xs: &Tensor,
        assignments: &[Assignment],
    ) -> Result<(&LayerExperts, Vec<(usize, Vec<u32>)>), ExpertError> {
        let row = self
            .layer_experts(layer)
            .ok_or(ExpertError::UnknownLayer { layer })?;
        let invalid = |reason: String| ExpertError::InvalidRouting { layer, reason };
        let bad_input = |reason: String| ExpertError::InvalidInput { layer, reason };
        let (n_tokens, hidden) = xs.dims2().map_err(|_| {
            bad_input(format!(
                "hidden states must be [tokens, hidden], got {:?}",
                xs.dims()
            ))
        })?;
        if hidden != self.hidden_size {
            return Err(bad_input(format!(
                "hidden size {hidden}, the model has {}",
                self.hidden_size
            )));
        }
        if xs.dtype() != self.dtype {
            return Err(ExpertError::Dtype {
                layer,
                got: xs.dtype(),
                computes: self.dtype,
            });
        }
        let groups = group_by_expert(assignments, self.num_experts);
        // One bit per (token, expert) of this call: cheaper than hashing at prefill sizes.
        let mut seen = vec![false; n_tokens * self.num_experts];
        let mut per_token = vec![0usize; n_tokens];
        for a in assignments {
            if a.token as usize >= n_tokens {
                return Err(invalid(format!(
                    "token index {} out of range for {n_tokens} tokens",
                    a.token
                )));
            }
            let count = &mut per_token[a.token as usize];
            *count += 1;
            if *count > self.top_k {
                return Err(invalid(format!(
                    "token {} routed to more than top-k = {} experts",
                    a.token, self.top_k
                )));
            }
            if !a.weight.is_finite() {
                return Err(invalid(format!(
                    "non-finite weight {} for token {}",
                    a.weight, a.token
                )));
            }
            if !row.holds(a.expert as usize) {
                return Err(ExpertError::NotHeld {
                    layer,
                    expert: a.expert as usize,
                });
            }
            let pair = a.token as usize * self.num_experts + a.expert as usize;
            if std::mem::replace(&mut seen[pair], true) {
                return Err(invalid(format!(
                    "token {} routed twice to expert {}",
                    a.token, a.expert
                )));
            }
        }
        let groups: Vec<(usize, Vec<u32>)> = groups
            .into_iter()
            .filter(|(_, slots)| !slots.is_empty())
            .collect();
        Ok((row, groups))
    }

    /// [`LocalExperts::expert_outputs`] for experts held one by one (CPU, or f32).
    fn outputs_each(
        &self,
        row: &[Option<SwiGlu>],
        layer: usize,
        xs: &Tensor,
        assignments: &[Assignment],
        groups: Vec<(usize, Vec<u32>)>,
    ) -> Result<Tensor, ExpertError> {
        let hidden = self.hidden_size;
        if let Some(out) = self.packed_outputs(row, xs, assignments, &groups)? {
            return Ok(out);
        }
        let device = xs.device();
        let per_expert: Vec<(Vec<u32>, Tensor)> = groups
            .into_par_iter()
            .filter(|(_, slots)| !slots.is_empty())
            .map(
                |(expert, slots)| -> Result<(Vec<u32>, Tensor), ExpertError> {
                    let tokens: Vec<u32> = slots
                        .iter()
                        .map(|&i| assignments[i as usize].token)
                        .collect();
                    let weights: Vec<f32> = slots
                        .iter()
                        .map(|&i| assignments[i as usize].weight)
                        .collect();
                    let m = slots.len();
                    let idx = Tensor::from_vec(tokens, m, device)?;
                    let w = Tensor::from_vec(weights, (m, 1), device)?.to_dtype(self.dtype)?;
                    let mlp = row[expert]
                        .as_ref()
                        .ok_or(ExpertError::NotHeld { layer, expert })?;
                    let ys = mlp.forward(&xs.index_select(&idx, 0)?)?.broadcast_mul(&w)?;
                    Ok((slots, ys))
                },
            )
            .collect::<Result<_, _>>()?;
        if per_expert.is_empty() {
            return Ok(Tensor::zeros((0, hidden), self.dtype, device)?);
        }
        // Rows are grouped by expert; put them back in assignment order.
        let mut position = vec![0u32; assignments.len()];
        let mut next = 0u32;
        for (slots, _) in &per_expert {
            for &slot in slots {
                position[slot as usize] = next;
                next += 1;
            }
        }
        let stacked = Tensor::cat(&per_expert.iter().map(|(_, ys)| ys).collect::<Vec<_>>(), 0)?;
        let order = Tensor::from_vec(position, assignments.len(), device)?;
        Ok(stacked.index_select(&order, 0)?)
    }
}

impl LocalExperts {
    /// The bf16 CPU path: every expert of the layer in one pass of [`moe_cpu::run`]. `None` when
    /// the experts are not packed (another dtype or device).
    fn packed_outputs(
        &self,
        row: &[Option<SwiGlu>],
        xs: &Tensor,
        assignments: &[Assignment],
        groups: &[(usize, Vec<u32>)],
    ) -> Result<Option<Tensor>, ExpertError> {
        let hidden = self.hidden_size;
        let xs = xs.contiguous()?;
        let jobs = with_cpu_bf16(&xs, |x| {
            groups
                .iter()
                .map(|(expert, slots)| match &row[*expert] {
                    Some(SwiGlu::PackedBf16(packed)) => {
                        let mut rows = Vec::with_capacity(slots.len() * hidden);
                        for &slot in slots {
                            let t = assignments[slot as usize].token as usize;
                            rows.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
                        }
                        Some(moe_cpu::ExpertJob {
                            expert: packed,
                            xs: rows,
                            weights: slots
                                .iter()
                                .map(|&i| bf16::from_f32(assignments[i as usize].weight))
                                .collect(),
                            m: slots.len(),
                        })
                    }
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
        })
        .flatten();
        let Some(jobs) = jobs else {
            return Ok(None);
        };
        let mut grouped = vec![bf16::ZERO; assignments.len() * hidden];
        moe_cpu::run(&jobs, &mut grouped);
        // Rows come grouped by expert; put them back in assignment order.
        let mut out = vec![bf16::ZERO; assignments.len() * hidden];
        let mut next = 0;
        for (_, slots) in groups {
            for &slot in slots {
                let slot = slot as usize;
                out[slot * hidden..(slot + 1) * hidden]
                    .copy_from_slice(&grouped[next * hidden..(next + 1) * hidden]);
                next += 1;
            }
        }
        Ok(Some(Tensor::from_vec(
            out,
            (assignments.len(), hidden),
            xs.device(),
        )?))
    }
}

impl Experts for LocalExperts {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &Routing,
        _ctx: &CallContext,
    ) -> Result<Tensor, ExpertError> {
        let assignments: Vec<Assignment> = routing.assignments().collect();
        let outputs = match self.checked_groups(layer, xs, &assignments)? {
            // On a GPU the outputs are summed in the same launch sequence, with one upload.
            (LayerExperts::Stacked(stacked), groups) => {
                return Ok(stacked.forward(xs, &assignments, &groups, routing.n_tokens())?);
            }
            (LayerExperts::Each(row), groups) => {
                self.outputs_each(row, layer, xs, &assignments, groups)?
            }
        };
        combine(routing.n_tokens(), &assignments, &outputs)
    }

    fn takes_device_routing(&self, layer: usize) -> bool {
        matches!(
            self.layer_experts(layer),
            Some(LayerExperts::Stacked(stacked)) if stacked.takes_device_routing()
        )
    }

    fn captures_device_routing(&self, layer: usize) -> bool {
        self.takes_device_routing(layer)
    }

    fn forward_device_routed(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &cuda::DeviceRouting,
        usage: &Tensor,
        _ctx: &CallContext,
    ) -> Result<Tensor, ExpertError> {
        match self.layer_experts(layer) {
            Some(LayerExperts::Stacked(stacked)) => Ok(stacked.forward_routed(xs, routing, usage)?),
            Some(LayerExperts::Each(_)) => Err(ExpertError::Inconsistent(format!(
                "layer {layer}: experts held on the CPU take no routing left on the GPU"
            ))),
            None => Err(ExpertError::UnknownLayer { layer }),
        }
    }
}
