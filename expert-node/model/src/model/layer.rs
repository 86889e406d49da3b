//! One pre-norm decoder layer: `Qwen3OmniMoeThinkerTextDecoderLayer` in transformers 4.57.3.
//! `h = x + self_attn(input_layernorm(x))`, then `y = h + mlp(post_attention_layernorm(h))`,
//! residual adds in the compute dtype. The MLP is the sparse MoE block
//! (`Qwen3OmniMoeThinkerTextSparseMoeBlock`: our [`Router`] here, the routed experts behind
//! [`Experts`]) or, for `mlp_only_layers` and off the `decoder_sparse_step`, a dense
//! `Qwen3OmniMoeThinkerTextMLP` ([`SwiGlu`]).

use candle_core::Tensor;
use omnishard_proto::ModelConfig;

use super::attention::Attention;
use super::norm::RmsNorm;
use super::router::Router;
use super::{ModelError, Result, SequenceInput};
use crate::ops::cuda;
use crate::usage::ExpertUsage;
use crate::weights::Weights;
use crate::{CallContext, Experts, SwiGlu};

enum Mlp {
    Dense(SwiGlu),
    Moe(Router),
}

/// What an MoE layer needs beyond its own weights: the routed experts, the usage counters they
/// feed, and the requests the pass works for.
pub(super) struct RoutedExperts<'a> {
    pub experts: &'a dyn Experts,
    pub usage: &'a ExpertUsage,
    pub ctx: &'a CallContext,
}

/// Where a layer's attention finds the KV caches: the sequences themselves, or (a captured
/// batch-1 decode step) a table of their buffers in device memory.
pub(super) enum Caches<'b, 'a> {
    Batch(&'b mut [SequenceInput<'a>]),
    Table(&'b cuda::DecodeTables),
}

pub(super) struct DecoderLayer {
    layer_idx: usize,
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// Loads layer `layer_idx` from the module `w` names (`…model.layers.{layer_idx}`). `masked`
    /// lists the (layer, expert) pairs no node serves, masked out of the router.
    pub(super) fn new(
        cfg: &ModelConfig,
        layer_idx: usize,
        masked: &[(usize, usize)],
        w: Weights,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        let mlp = if cfg.is_moe_layer(layer_idx) {
            Mlp::Moe(Router::new(cfg, layer_idx, masked, w.pp("mlp.gate"))?)
        } else {
            let inter = cfg.intermediate_size.unwrap_or(0);
            Mlp::Dense(SwiGlu::new(h, inter, w.pp("mlp"))?)
        };
        Ok(Self {
            layer_idx,
            input_layernorm: RmsNorm::new(h, eps, w.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, w.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(h, eps, w.pp("post_attention_layernorm"))?,
            mlp,
        })
    }

    /// Why this layer's batch-1 decode step cannot be captured in a CUDA graph (it would wait
    /// for the host), if it cannot: its experts must take the routing left on the GPU.
    pub(super) fn graph_blocker(&self, experts: &dyn Experts) -> Option<String> {
        match &self.mlp {
            Mlp::Dense(_) => None,
            Mlp::Moe(router) if !router.routes_on_device() => Some(format!(
                "layer {}'s router has no GPU top-k",
                self.layer_idx
            )),
            Mlp::Moe(_) if !experts.captures_device_routing(self.layer_idx) => Some(format!(
                "layer {}'s experts are not all held on this GPU",
                self.layer_idx
            )),
            Mlp::Moe(_) => None,
        }
    }

    /// `residual` plus `pending` (the previous layer's MLP output, added here so that the add
    /// and this layer's input norm are one kernel on a GPU) is the layer's input `[tokens,
    /// hidden]`, the batch's sequences one after another; `cos`/`sin` `[tokens, head_dim]`.
    /// Appends this layer's keys and values to each sequence's cache. Returns the residual
    /// stream after attention and this layer's MLP output, still to be added.
    pub(super) fn forward(
        &self,
        residual: &Tensor,
        pending: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut Caches<'_, '_>,
        routed: &RoutedExperts<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let l = self.layer_idx;
        let (xs, normed) = match pending {
            Some(pending) => self.input_layernorm.forward_residual(residual, pending)?,
            None => (residual.clone(), self.input_layernorm.forward(residual)?),
        };
        let attn = match caches {
            Caches::Batch(batch) => self.self_attn.forward(&normed, cos, sin, batch, l)?,
            Caches::Table(tables) => self.self_attn.forward_table(&normed, cos, sin, tables, l)?,
        };
        let (h, normed) = self.post_attention_layernorm.forward_residual(&xs, &attn)?;
        let mlp_out = match &self.mlp {
            Mlp::Dense(mlp) => mlp.forward(&normed)?,
            Mlp::Moe(router) => {
                let to_experts = |source| ModelError::Experts { layer: l, source };
                // Experts on this GPU: the routing stays there (no host round trip a layer).
                let on_device = if routed.experts.takes_device_routing(l) {
                    match routed.usage.layer_counts_on_device(l)? {
                        Some(counts) => router.route_on_device(&normed)?.map(|r| (r, counts)),
                        None => None,
                    }
                } else {
                    None
                };
                match on_device {
                    Some((routing, counts)) => routed
                        .experts
                        .forward_device_routed(l, &normed, &routing, &counts, routed.ctx)
                        .map_err(to_experts)?,
                    None => {
                        let routing = router.route(&normed)?;
                        routed.usage.record(l, &routing.ids);
                        routed
                            .experts
                            .forward(l, &normed, &routing, routed.ctx)
                            .map_err(to_experts)?
                    }
                }
            }
        };
        Ok((h, mlp_out))
    }
}
