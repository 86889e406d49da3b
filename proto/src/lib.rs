//! omnishard's shared contract: the validated model configuration that every process agrees on.
//! The gRPC wire format between the coordinator and the expert nodes lives here too.

pub mod config;

pub use config::{Architecture, ConfigError, ModelConfig};
