//! Media in prompts (Qwen3-Omni's thinker): audio (`audio.rs` decodes, [`AudioInput`] turns it
//! into the audio tower's embeddings), images and video frames (`image.rs`, `resize.rs`,
//! `vision.rs`), their mRoPE positions (`rope_index.rs`), and the prompt with every placeholder
//! expanded to one token per embedding as `Qwen3OmniMoeProcessor` expands it (`prompt.rs`).

pub mod audio;
pub mod image;
pub mod prompt;
pub mod resize;
pub mod rope_index;
pub mod vision;

use std::path::Path;

use candle_core::{Device, Tensor};
use omnishard_model::audio::{AudioEncoder, MelParams, log_mel};
use omnishard_model::{Checkpoint, ModelError, Weights};
use omnishard_proto::omni::OmniConfig;

/// Why a piece of media cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("cannot decode the {0}")]
    Undecodable(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("{0}")]
    Placeholders(String),
    #[error("the encoder failed: {0}")]
    Encoder(#[from] ModelError),
}

/// The dtype an encoder tower computes in: the model's, but f32 on the CPU (candle's CPU matmul
/// and convolutions take no bf16).
pub fn encoder_dtype(dtype: candle_core::DType, device: &Device) -> candle_core::DType {
    if device.is_cpu() {
        candle_core::DType::F32
    } else {
        dtype
    }
}

/// The audio side of a checkpoint: its tower and placeholder token.
pub struct AudioInput {
    encoder: AudioEncoder,
    token_id: u32,
    device: Device,
}

impl AudioInput {
    /// Loads `thinker.audio_tower` of a Qwen3-Omni checkpoint; `None` when it has no audio
    /// tower. On the CPU the tower computes in f32 whatever `dtype` is (candle's CPU matmul and
    /// convolutions have no bf16); its embeddings are cast to the text model's dtype.
    pub fn load(
        dir: &Path,
        ckpt: &Checkpoint,
        dtype: candle_core::DType,
        device: &Device,
    ) -> Result<Option<Self>, MediaError> {
        let omni =
            OmniConfig::from_model_dir(dir).map_err(|e| MediaError::Unsupported(e.to_string()))?;
        let (Some(cfg), Some(token_id)) = (omni.audio, omni.audio_token_id) else {
            return Ok(None);
        };
        let w = Weights::new(ckpt, encoder_dtype(dtype, device), device).pp("thinker.audio_tower");
        Ok(Some(Self {
            encoder: AudioEncoder::new(&cfg, w)?,
            token_id,
            device: device.clone(),
        }))
    }

    /// The clip's log-mel features `[mel bins, frames]`, on the tower's device.
    pub fn features(&self, samples: &[f32]) -> Result<Tensor, MediaError> {
        let params = MelParams::whisper(self.encoder.config().num_mel_bins);
        let (mel, frames) = log_mel(samples, &params).ok_or_else(|| {
            MediaError::Unsupported("audio shorter than 12.5 ms has no features".into())
        })?;
        Tensor::from_vec(mel, (params.n_mels, frames), &self.device)
            .map_err(|e| MediaError::Encoder(e.into()))
    }

    /// The audio tower's embeddings of one clip (mono samples at 16 kHz).
    pub fn embed(&self, samples: &[f32]) -> Result<Tensor, MediaError> {
        Ok(self.encoder.forward(&self.features(samples)?)?)
    }

    pub fn token_id(&self) -> u32 {
        self.token_id
    }
}
