//! Audio input of Qwen3-Omni's thinker: log-mel features as the reference processor computes
//! them ([`mel`]) and the audio tower that turns them into embeddings for the prompt's
//! `<|audio_pad|>` positions ([`encoder`]).

pub mod encoder;
pub mod mel;

pub use encoder::AudioEncoder;
pub use mel::{MelParams, log_mel};
