//! A linear layer with the checkpoint's `[out, in]` weight and an optional bias: torch's
//! `nn.Linear`, as the projections of `Qwen3OmniMoeThinkerTextAttention` (transformers 4.57.3)
//! use it. Qwen3-Omni has no attention bias; the config's `attention_bias` switches it on.

use candle_core::Tensor;

use super::Result;
use crate::ops::linear;
use crate::weights::Weights;

pub(super) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` `[out_dim, in_dim]` and, with `bias`, `bias` `[out_dim]`.
    pub(super) fn new(in_dim: usize, out_dim: usize, bias: bool, w: Weights) -> Result<Self> {
        let weight = w.get("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub(super) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = linear(xs, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        })
    }
}
