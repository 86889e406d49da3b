//! The SwiGLU feed-forward block, `down(silu(gate(x)) * up(x))` without biases: both the
//! routed experts of an MoE layer and the dense MLP of the layers without one (`mlp_only_layers`,
//! `decoder_sparse_step`) use it (`Qwen3OmniMoeThinkerTextMLP` in transformers 4.57.3).
//!
//! In bf16 on the CPU the weights are re-laid out at load for the bandwidth-bound kernels
//! ([`crate::moe_cpu::PackedExpert`]); elsewhere they stay candle tensors as in the checkpoint.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::CheckpointError;
use crate::moe_cpu::PackedExpert;
use crate::ops::{linear, with_cpu_bf16};
use crate::weights::Weights;

/// One SwiGLU MLP in the compute dtype.
#[derive(Clone)]
pub enum SwiGlu {
    /// Weights `[out, in]` as in the checkpoint, computed with candle.
    Tensors {
        gate_proj: Tensor,
        up_proj: Tensor,
        down_proj: Tensor,
    },
    /// bf16 on the CPU, packed for [`crate::moe_cpu`].
    PackedBf16(Arc<PackedExpert>),
}

fn load_err(name: &str) -> impl Fn(candle_core::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Candle {
        tensor: name.to_string(),
        source,
    }
}

impl SwiGlu {
    /// Loads `{gate_proj,up_proj,down_proj}.weight` of the module `w` names.
    pub fn new(hidden: usize, intermediate: usize, w: Weights) -> Result<Self, CheckpointError> {
        let (dtype, device) = (w.dtype(), w.device());
        let get = |name: &str, shape: &[usize]| w.pp(name).get("weight", shape);
        let gate_proj = get("gate_proj", &[intermediate, hidden])?;
        let up_proj = get("up_proj", &[intermediate, hidden])?;
        let down_proj = get("down_proj", &[hidden, intermediate])?;
        if dtype == DType::BF16 && matches!(device, Device::Cpu) {
            let flat = |t: &Tensor, name: &str| {
                t.flatten_all()
                    .and_then(|t| t.to_vec1())
                    .map_err(load_err(name))
            };
            let prefix = w.prefix();
            let gate = flat(&gate_proj, prefix)?;
            let up = flat(&up_proj, prefix)?;
            let down = flat(&down_proj, prefix)?;
            return Ok(SwiGlu::PackedBf16(Arc::new(PackedExpert::new(
                &gate,
                &up,
                down,
                hidden,
                intermediate,
            ))));
        }
        Ok(SwiGlu::Tensors {
            gate_proj,
            up_proj,
            down_proj,
        })
    }

    /// `xs`: `[n, hidden]` → `[n, hidden]`.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            SwiGlu::Tensors {
                gate_proj,
                up_proj,
                down_proj,
            } => {
                let gate = linear(xs, gate_proj)?.silu()?;
                let up = linear(xs, up_proj)?;
                linear(&(gate * up)?, down_proj)
            }
            SwiGlu::PackedBf16(packed) => {
                let xs = xs.contiguous()?;
                let (m, hidden) = xs.dims2()?;
                let ys = with_cpu_bf16(&xs, |x| packed.forward(x, m)).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "packed bf16 MLP needs bf16 CPU input, got {:?} on {:?}",
                        xs.dtype(),
                        xs.device()
                    ))
                })?;
                Tensor::from_vec(ys, (m, hidden), xs.device())
            }
        }
    }

    /// Bytes held by the three weight matrices.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            SwiGlu::Tensors {
                gate_proj,
                up_proj,
                down_proj,
            } => [gate_proj, up_proj, down_proj]
                .iter()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum(),
            SwiGlu::PackedBf16(packed) => packed.size_in_bytes(),
        }
    }
}
