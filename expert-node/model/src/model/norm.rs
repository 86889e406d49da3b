//! RMSNorm over the last dimension: `Qwen3OmniMoeThinkerTextRMSNorm` (and the final
//! `Qwen3OmniMoeTextRMSNorm`, the same math) in transformers 4.57.3. As the reference, the norm
//! is computed in f32 and cast back to the input dtype before the multiplication by the weight.
//! On a GPU in bf16 one fused kernel does it ([`crate::ops::cuda`]); attention's q and k norms
//! are fused with the RoPE that follows them (`Attention::norm_rope`).

use candle_core::{D, DType, Tensor};

use super::Result;
use super::rope::apply_rope;
use crate::ops::cuda;
use crate::weights::Weights;

pub(super) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `weight` `[size]`.
    pub(super) fn new(size: usize, eps: f64, w: Weights) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[size])?,
            eps,
        })
    }

    /// The norm's weight `[d]` and epsilon.
    pub(super) fn weight_eps(&self) -> (&Tensor, f64) {
        (&self.weight, self.eps)
    }

    /// This norm then RoPE with `cos`/`sin` `[tokens, d]`, of the `heads` heads from column
    /// `start` of `qkv` `[tokens, width]` (the stacked q/k/v projection); returns `[tokens,
    /// heads, d]`. candle's ops (on a GPU in bf16 attention takes q and k in one fused kernel
    /// instead).
    pub(super) fn forward_rope(
        &self,
        qkv: &Tensor,
        start: usize,
        heads: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let d = self.weight.dim(0)?;
        let xs = qkv
            .narrow(1, start, heads * d)?
            .reshape((qkv.dim(0)?, heads, d))?;
        apply_rope(&self.forward(&xs)?, &cos.unsqueeze(1)?, &sin.unsqueeze(1)?)
    }

    /// `(xs + residual, norm(xs + residual))`: the residual add and this norm, one fused kernel
    /// on a GPU in bf16.
    pub(super) fn forward_residual(
        &self,
        xs: &Tensor,
        residual: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if let Some(both) = cuda::add_rms_norm(xs, residual, &self.weight, self.eps)? {
            return Ok(both);
        }
        let h = (xs + residual)?;
        let normed = self.forward(&h)?;
        Ok((h, normed))
    }

    pub(super) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(out) = cuda::rms_norm(xs, &self.weight, self.eps)? {
            return Ok(out);
        }
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        Ok(x.broadcast_mul(&inv_rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?)
    }
}
