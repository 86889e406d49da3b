//! The omni-modal part of a Qwen3-Omni checkpoint's `config.json`: the audio tower's
//! configuration (`thinker_config.audio_config`, `Qwen3OmniMoeAudioEncoderConfig` in transformers
//! 4.57.3) and the token ids that mark media in a prompt. Read once, checked once; a checkpoint
//! without an audio tower (plain Qwen3-MoE) has none.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::ConfigError;

/// `thinker_config.audio_config`: the fields the encoder's math depends on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AudioConfig {
    pub num_mel_bins: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub d_model: usize,
    /// Half the mel frames of one convolution chunk (chunks of `2 * n_window` frames).
    pub n_window: usize,
    /// Mel frames one attention window spans (a multiple of `2 * n_window`).
    pub n_window_infer: usize,
    pub downsample_hidden_size: usize,
    /// Width of the tower's output: the text model's hidden size.
    pub output_dim: usize,
    pub max_source_positions: usize,
    #[serde(default = "gelu")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_embedding: bool,
}

fn gelu() -> String {
    "gelu".into()
}

/// The omni-modal configuration: the audio tower, if any, and the media token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct OmniConfig {
    pub audio: Option<AudioConfig>,
    /// `<|audio_pad|>`: one per audio embedding in a prompt.
    pub audio_token_id: Option<u32>,
    pub audio_start_token_id: Option<u32>,
}

fn bad(path: &Path, field: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError::Unsupported {
        path: path.to_path_buf(),
        field: field.to_string(),
        value: why.to_string(),
        hint: "a Qwen3-Omni checkpoint's config.json as transformers 4.57.3 writes it".into(),
    }
}

impl OmniConfig {
    /// Reads `DIR/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| bad(&path, "config.json", e))?;
        Self::from_json(&text, &path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let root: Value = serde_json::from_str(text).map_err(|e| bad(path, "config.json", e))?;
        let Some(thinker) = root.get("thinker_config") else {
            return Ok(Self {
                audio: None,
                audio_token_id: None,
                audio_start_token_id: None,
            });
        };
        let id = |name: &str| thinker.get(name).and_then(Value::as_u64).map(|v| v as u32);
        let audio = match thinker.get("audio_config") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let a: AudioConfig = serde_json::from_value(v.clone())
                    .map_err(|e| bad(path, "thinker_config.audio_config", e))?;
                a.check()
                    .map_err(|e| bad(path, "thinker_config.audio_config", e))?;
                Some(a)
            }
        };
        Ok(Self {
            audio,
            audio_token_id: id("audio_token_id"),
            audio_start_token_id: id("audio_start_token_id"),
        })
    }
}

impl AudioConfig {
    fn check(&self) -> Result<(), String> {
        if self.n_window == 0
            || self.n_window_infer == 0
            || !self.n_window_infer.is_multiple_of(2 * self.n_window)
        {
            return Err(format!(
                "n_window_infer {} must be a positive multiple of 2 * n_window {}",
                self.n_window_infer, self.n_window
            ));
        }
        if self.encoder_attention_heads == 0
            || !self.d_model.is_multiple_of(self.encoder_attention_heads)
        {
            return Err(format!(
                "d_model {} must be a multiple of encoder_attention_heads {}",
                self.d_model, self.encoder_attention_heads
            ));
        }
        if !self.d_model.is_multiple_of(2) {
            return Err(format!("d_model {} must be even", self.d_model));
        }
        if self.activation_function != "gelu" {
            return Err(format!(
                "activation_function {:?}: only \"gelu\" is supported",
                self.activation_function
            ));
        }
        Ok(())
    }

    /// Mel frames per convolution chunk.
    pub fn chunk_frames(&self) -> usize {
        2 * self.n_window
    }

    /// Frequency rows after the three stride-2 convolutions.
    pub fn frequencies_after_cnn(&self) -> usize {
        // Each stride-2 convolution with padding 1 takes n rows to ceil(n / 2).
        self.num_mel_bins.div_ceil(2).div_ceil(2).div_ceil(2)
    }
}

/// Audio embeddings the tower makes from `frames` mel frames: `_get_feat_extract_output_lengths`
/// of transformers 4.57.3 (13 per full 100-frame chunk, the convolutions' output for the rest).
/// Python's floor division, also of negative numbers.
pub fn audio_output_len(frames: usize) -> usize {
    let f = frames as i64;
    let leave = f % 100;
    let feat = (leave - 1).div_euclid(2) + 1;
    let out = ((feat - 1).div_euclid(2) + 1 - 1).div_euclid(2) + 1 + (f / 100) * 13;
    out.max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lengths_match_the_reference_formula() {
        // Computed with transformers' _get_feat_extract_output_lengths.
        for (frames, tokens) in [
            (100, 13),
            (70, 9),
            (270, 35),
            (1, 1),
            (3000, 390),
            (199, 26),
        ] {
            assert_eq!(audio_output_len(frames), tokens, "{frames}");
        }
    }
}
