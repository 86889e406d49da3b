//! Checkpoint reading and expert math, shared by the `expert-node` binary and the coordinator's
//! in-process mode, so that both compute an expert with exactly the same code.

pub mod checkpoint;
pub mod experts;
pub mod mlp;
pub mod ops;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use experts::{Assignment, ExpertError, Experts, LocalExperts, Routing};
pub use mlp::SwiGlu;
