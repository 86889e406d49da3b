//! The SwiGLU feed-forward block, `down(silu(gate(x)) * up(x))` without biases: both the
//! routed experts of an MoE layer and the dense MLP of `mlp_only_layers` use it
//! (`Qwen3OmniMoeThinkerTextMLP` in transformers 4.57.3).

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::ops::linear;

/// One SwiGLU MLP; weights kept as in the checkpoint, `[out, in]`, in the compute dtype.
#[derive(Clone)]
pub struct SwiGlu {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl SwiGlu {
    /// Loads `{prefix}.{gate_proj,up_proj,down_proj}.weight`.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, CheckpointError> {
        let w = |name: &str, shape: &[usize]| {
            ckpt.tensor(&format!("{prefix}.{name}.weight"), shape, dtype, device)
        };
        Ok(Self {
            gate_proj: w("gate_proj", &[intermediate, hidden])?,
            up_proj: w("up_proj", &[intermediate, hidden])?,
            down_proj: w("down_proj", &[hidden, intermediate])?,
        })
    }

    /// `xs`: `[n, hidden]` → `[n, hidden]`.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gate = linear(xs, &self.gate_proj)?.silu()?;
        let up = linear(xs, &self.up_proj)?;
        linear(&(gate * up)?, &self.down_proj)
    }

    /// Bytes held by the three weight matrices.
    pub fn size_in_bytes(&self) -> usize {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}
