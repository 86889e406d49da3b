//! The omnishard coordinator: the dense part of the model (embeddings, attention, routers,
//! lm_head), the tokenizer and sampling, driving the routed experts through
//! [`omnishard_expert::Experts`], in this process or on expert nodes.

pub mod cluster;
mod decode_attention;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod remote;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tokenizer;
pub mod usage;

pub use engine::{Engine, EngineError};
pub use model::{KvCache, LogitsFor, Model, ModelError, Positions, SequenceInput};
pub use omnishard_expert::ComputeDtype;
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{ChatMessage, DecodeStream, TextTokenizer};
