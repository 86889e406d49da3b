//! A linear layer with the checkpoint's `[out, in]` weight and an optional bias: torch's
//! `nn.Linear`, as the projections of `Qwen3OmniMoeThinkerTextAttention` (transformers 4.57.3)
//! use it. Qwen3-Omni has no attention bias; the config's `attention_bias` switches it on.
//! q, k and v are one stacked layer (one matmul, one kernel launch on a GPU).

use candle_core::Tensor;

use super::Result;
use crate::ops::{linear, linear_bias};
use crate::weights::Weights;

pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` `[out_dim, in_dim]` and, with `bias`, `bias` `[out_dim]`.
    pub(crate) fn new(in_dim: usize, out_dim: usize, bias: bool, w: Weights) -> Result<Self> {
        let weight = w.get("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Several linear layers over the same input as one: their weights (and biases) stacked
    /// along the output dimension, so one matmul computes them all (q, k and v). Each part is
    /// `(module, out_dim)`; callers split the output at the same widths.
    pub(super) fn stacked(in_dim: usize, bias: bool, parts: &[(Weights, usize)]) -> Result<Self> {
        let layers = parts
            .iter()
            .map(|(w, out)| Self::new(in_dim, *out, bias, w.clone()))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let biases: Option<Vec<&Tensor>> = layers.iter().map(|l| l.bias.as_ref()).collect();
        Ok(Self {
            weight: Tensor::cat(&weights, 0)?,
            bias: match biases {
                Some(b) if bias => Some(Tensor::cat(&b, 0)?),
                _ => None,
            },
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => linear_bias(xs, &self.weight, b)?,
            None => linear(xs, &self.weight)?,
        })
    }
}
