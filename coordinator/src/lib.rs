//! The omnishard coordinator: the dense part of the model (embeddings, attention, routers,
//! lm_head), the tokenizer and sampling, driving the routed experts through
//! [`omnishard_model::Experts`], in this process or on expert nodes.

pub mod bench;
pub mod chat;
pub mod cluster;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod kv_budget;
pub mod media;
pub mod metrics;
pub mod overlap;
pub mod plan;
pub mod prefix_cache;
pub mod probe;
pub mod remote;
pub mod sampling;
pub mod scheduler;
pub mod serve;
pub mod server;
pub mod stop_strings;
pub mod synth;
pub mod tokenizer;
pub mod tokenizer_files;

pub use engine::{CudaGraph, Engine, EngineError};
pub use omnishard_model::{
    ComputeDtype, KvCache, LogitsFor, Model, ModelError, Positions, SequenceInput, model,
};
pub use sampling::{BatchRow, Sampler, SamplingParams};
pub use tokenizer::{DecodeStream, TextTokenizer};
