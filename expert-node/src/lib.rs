//! The expert node: the gRPC service over a partition of a checkpoint's experts ([`server`]) and
//! its start-up ([`serve`], [`load_experts`]), called by the `expert-node` binary, the benchmarks
//! and the tests alike. The math lives in `omnishard-model`.

mod error;
mod idle;
mod lane;
mod routed;
pub mod server;
mod start;

pub use server::{ExpertNodeService, NodeError, NodeState, process};
pub use start::{ServeOptions, load_experts, serve};
