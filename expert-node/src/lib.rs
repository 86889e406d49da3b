//! Checkpoint reading and expert math, shared by the `expert-node` binary and the coordinator's
//! in-process mode, so that both compute an expert with exactly the same code.

pub mod checkpoint;
pub mod experts;
pub mod fingerprint;
pub mod mlp;
pub mod ops;
pub mod server;
pub mod wire;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use experts::{Assignment, ExpertError, Experts, LocalExperts, Routing};
pub use mlp::SwiGlu;

/// Compute dtype of the coordinator and of the experts; both sides of a cluster must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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
