//! The router of an MoE layer: the `gate` of `Qwen3OmniMoeThinkerTextSparseMoeBlock` in
//! transformers 4.57.3 and the top-k of its `forward`. `logits = gate(x)` (no bias), softmax over
//! all experts in f32, top-k, divided by the sum of the k when `norm_topk_prob`. The experts
//! themselves are behind [`crate::Experts`]; the reference's cast of the weights to the compute
//! dtype and the weighted sum happen there. On a GPU in bf16 the softmax and top-k run in one
//! kernel and only the chosen ids and weights come back to the host; for batch-1 decode the
//! projection and the top-k are one launch and the choices stay on the GPU.

use candle_core::{DType, Tensor};
use omnishard_proto::ModelConfig;

use super::{ModelError, Result};
use crate::Routing;
use crate::ops::{cuda, linear};
use crate::weights::Weights;

pub(super) struct Router {
    gate: Tensor,
    top_k: usize,
    norm_topk_prob: bool,
    /// Per expert of this layer (indexed by expert id): `true` for an expert that no expert node
    /// served when the model was loaded and that the operator chose to run without
    /// (`--allow-missing-experts`). Its logit is set to -inf before the softmax, so it is never
    /// chosen and takes no probability mass. All `false` when every expert is served.
    masked: Vec<bool>,
    /// The top-k kernels' own state on a GPU; `None` on the CPU.
    on_device: Option<OnDevice>,
}

/// What the router's kernels take on a GPU besides the gate.
struct OnDevice {
    /// `masked` as u8.
    mask: Tensor,
    /// The batch-1 launch's counter ([`cuda::router_gate_topk1`]).
    ticket: cuda::RouterTicket,
}

impl Router {
    /// Loads `weight` `[num_experts, hidden]` of the module `w` names (`…layers.{layer}.mlp.gate`).
    /// `masked` lists the (layer, expert) pairs of the whole model that no node serves; those of
    /// `layer` are masked out. Fails if fewer than top-k experts would be left.
    pub(super) fn new(
        cfg: &ModelConfig,
        layer: usize,
        masked: &[(usize, usize)],
        w: Weights,
    ) -> Result<Self> {
        let mut mask = vec![false; cfg.num_experts];
        for &(ml, me) in masked {
            if ml == layer && me < cfg.num_experts {
                mask[me] = true;
            }
        }
        if mask.iter().filter(|m| !**m).count() < cfg.num_experts_per_tok {
            return Err(ModelError::Input(format!(
                "layer {layer} has fewer than top-k = {} experts left after masking",
                cfg.num_experts_per_tok
            )));
        }
        let on_device = match cuda::RouterTicket::new(w.device())? {
            Some(ticket) => {
                let flags: Vec<u8> = mask.iter().map(|&m| u8::from(m)).collect();
                let mask = Tensor::from_vec(flags, cfg.num_experts, w.device())?;
                Some(OnDevice { mask, ticket })
            }
            None => None,
        };
        Ok(Self {
            on_device,
            gate: w.get("weight", &[cfg.num_experts, cfg.hidden_size])?,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
            masked: mask,
        })
    }

    /// Whether [`Router::route_on_device`] applies (bf16 on a GPU).
    pub(super) fn routes_on_device(&self) -> bool {
        self.on_device.is_some()
    }

    /// The top-k for the rows of `xs` left on the GPU (no copy back), where `xs` is bf16 there;
    /// one row (batch-1 decode) in one launch, projection and top-k together.
    pub(super) fn route_on_device(&self, xs: &Tensor) -> Result<Option<cuda::DeviceRouting>> {
        let Some(dev) = &self.on_device else {
            return Ok(None);
        };
        let (k, norm) = (self.top_k, self.norm_topk_prob);
        if let Some(routing) =
            cuda::router_gate_topk1(xs, &self.gate, &dev.mask, &dev.ticket, k, norm)?
        {
            return Ok(Some(routing));
        }
        let logits = linear(xs, &self.gate)?;
        Ok(cuda::router_topk_on_device(&logits, &dev.mask, k, norm)?)
    }

    /// The top-k experts and their weights for every row of `xs` `[tokens, hidden]`.
    pub(super) fn route(&self, xs: &Tensor) -> Result<Routing> {
        let logits = linear(xs, &self.gate)?;
        let k = self.top_k;
        if let Some(dev) = &self.on_device
            && let Some((ids, weights)) =
                cuda::router_topk(&logits, &dev.mask, k, self.norm_topk_prob)?
        {
            return Ok(Routing {
                top_k: k,
                ids,
                weights,
            });
        }
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut ids = Vec::with_capacity(logits.len() * k);
        let mut weights = Vec::with_capacity(logits.len() * k);
        for row in logits {
            let row: Vec<f32> = row
                .into_iter()
                .zip(&self.masked)
                .map(|(l, &m)| if m { f32::NEG_INFINITY } else { l })
                .collect();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..exp.len()).collect();
            // Descending probability; ties to the lower expert id. Stable sort keeps that order.
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]));
            let top: Vec<(usize, f32)> = order[..k].iter().map(|&e| (e, exp[e] / sum)).collect();
            let norm: f32 = if self.norm_topk_prob {
                top.iter().map(|(_, p)| p).sum()
            } else {
                1.0
            };
            for (e, p) in top {
                ids.push(e as u32);
                weights.push(p / norm);
            }
        }
        Ok(Routing {
            top_k: k,
            ids,
            weights,
        })
    }
}
