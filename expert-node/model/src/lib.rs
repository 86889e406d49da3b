//! omnishard's math, shared by the `coordinator` and `expert-node` binaries so that both compute
//! with exactly the same code: checkpoint reading, the transformer ([`model`]), the routed experts
//! ([`experts`]), the compute backends ([`ops`]), the wire encoding of tensors ([`wire`]), the
//! model fingerprint, and [`Weights`], through which every module loads its tensors. No servers and no command-line parsing live here.

pub mod alloc;
pub mod audio;
pub mod checkpoint;
pub mod device;
pub mod experts;
pub mod fingerprint;
pub mod lending;
pub mod mlp;
pub mod model;
pub mod moe_cpu;
pub mod ops;
pub mod synthetic;
pub mod usage;
pub mod vision;
pub mod weights;
pub mod wire;

pub use checkpoint::{Checkpoint, CheckpointError, LoadFormat};
pub use device::{DeviceError, DeviceSpec};
pub use experts::{Assignment, CallContext, ExpertError, Experts, LocalExperts, Pass, Routing};
pub use mlp::SwiGlu;
pub use model::{KvCache, LogitsFor, MediaSpan, Model, ModelError, Positions, SequenceInput};
pub use usage::ExpertUsage;
pub use weights::Weights;

/// Compute dtype of the coordinator and of the experts; both sides of a cluster must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    Bf16,
}

impl ComputeDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDtype::F32 => candle_core::DType::F32,
            ComputeDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(ComputeDtype::F32),
            "bf16" => Ok(ComputeDtype::Bf16),
            other => Err(format!("unknown dtype {other:?}; use f32 or bf16")),
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
        })
    }
}
