//! omnishard's shared contract: the validated model configuration that every process agrees on,
//! the versioned gRPC wire format (`omnishard.v1`) between the coordinator and expert nodes, and
//! the shared-memory lane that carries the same messages between processes of one host.

pub mod address;
pub mod config;
pub mod defaults;
pub mod lane;
pub mod omni;
pub mod placement;
pub mod tls;
pub mod wire;

pub use config::{Architecture, ConfigError, ModelConfig};
pub use wire::{ServiceError, v1};
