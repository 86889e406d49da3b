//! RMSNorm over the last dimension: `Qwen3OmniMoeThinkerTextRMSNorm` (and the final
//! `Qwen3OmniMoeTextRMSNorm`, the same math) in transformers 4.57.3. As the reference, the norm
//! is computed in f32 and cast back to the input dtype before the multiplication by the weight.

use candle_core::{D, DType, Tensor};

use super::Result;
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

    pub(super) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
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
