//! The omni-modal part of a Qwen3-Omni checkpoint's `config.json`: the audio tower's
//! configuration (`thinker_config.audio_config`, `Qwen3OmniMoeAudioEncoderConfig` in transformers
//! 4.57.3), the vision tower's (`thinker_config.vision_config`,
//! `Qwen3OmniMoeVisionEncoderConfig`) and the token ids that mark media in a prompt. Read once,
//! checked once; a checkpoint without the towers (plain Qwen3-MoE) has none.

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

/// `thinker_config.vision_config`: the fields the vision tower's math depends on, with the
/// defaults of `Qwen3OmniMoeVisionEncoderConfig` (Qwen3-Omni-30B-A3B's tower) for absent ones.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    /// Of the blocks' MLP: `gelu_pytorch_tanh` (tanh approximation) or `gelu` (erf).
    pub hidden_act: String,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    /// Width of the tower's output: the text model's hidden size.
    pub out_hidden_size: usize,
    /// Learned position embeddings: a square grid of this many, interpolated to each image.
    pub num_position_embeddings: usize,
    /// Blocks after which a deepstack merger taps the hidden states; feature `k` is added to the
    /// output of text layer `k` at the visual positions.
    pub deepstack_visual_indexes: Vec<usize>,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            depth: 27,
            hidden_size: 1152,
            hidden_act: "gelu_pytorch_tanh".into(),
            intermediate_size: 4304,
            num_heads: 16,
            in_channels: 3,
            patch_size: 16,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            out_hidden_size: 3584,
            num_position_embeddings: 2304,
            deepstack_visual_indexes: vec![8, 16, 24],
        }
    }
}

impl VisionConfig {
    fn check(&self) -> Result<(), String> {
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(format!(
                "hidden_size {} must be a multiple of num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.head_dim().is_multiple_of(4) {
            return Err(format!(
                "head dimension {} must be a multiple of 4 (2-D rotary embeddings)",
                self.head_dim()
            ));
        }
        let side = self.grid_side();
        if side < 2 || side * side != self.num_position_embeddings {
            return Err(format!(
                "num_position_embeddings {} must be a square of at least 4",
                self.num_position_embeddings
            ));
        }
        if [
            self.patch_size,
            self.spatial_merge_size,
            self.temporal_patch_size,
            self.in_channels,
        ]
        .contains(&0)
        {
            return Err("patch sizes and in_channels must be positive".into());
        }
        if let Some(&i) = self
            .deepstack_visual_indexes
            .iter()
            .find(|&&i| i >= self.depth)
        {
            return Err(format!(
                "deepstack_visual_indexes has {i}, but the tower has {} blocks",
                self.depth
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu_pytorch_tanh" | "gelu") {
            return Err(format!(
                "hidden_act {:?}: only \"gelu_pytorch_tanh\" and \"gelu\" are supported",
                self.hidden_act
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Side of the square grid of learned position embeddings.
    pub fn grid_side(&self) -> usize {
        // `int(num_position_embeddings ** 0.5)` of the reference.
        (self.num_position_embeddings as f64).sqrt() as usize
    }

    /// Values per patch row of `pixel_values`: channels × temporal patch × patch × patch.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches merged into one output embedding (`spatial_merge_size²`).
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

/// The omni-modal configuration: the towers, if any, and the media token ids.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OmniConfig {
    pub audio: Option<AudioConfig>,
    /// `<|audio_pad|>`: one per audio embedding in a prompt.
    pub audio_token_id: Option<u32>,
    pub audio_start_token_id: Option<u32>,
    pub audio_end_token_id: Option<u32>,
    pub vision: Option<VisionConfig>,
    /// `<|image_pad|>`: one per merged image embedding.
    pub image_token_id: Option<u32>,
    /// `<|video_pad|>`: one per merged video embedding.
    pub video_token_id: Option<u32>,
    pub vision_start_token_id: Option<u32>,
    pub vision_end_token_id: Option<u32>,
    /// `thinker_config.position_id_per_seconds`: temporal mRoPE positions per second of video.
    pub position_id_per_seconds: Option<f64>,
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
            return Ok(Self::default());
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
        let vision = match thinker.get("vision_config") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let c: VisionConfig = serde_json::from_value(v.clone())
                    .map_err(|e| bad(path, "thinker_config.vision_config", e))?;
                c.check()
                    .map_err(|e| bad(path, "thinker_config.vision_config", e))?;
                Some(c)
            }
        };
        Ok(Self {
            audio,
            audio_token_id: id("audio_token_id"),
            audio_start_token_id: id("audio_start_token_id"),
            audio_end_token_id: id("audio_end_token_id"),
            vision,
            image_token_id: id("image_token_id"),
            video_token_id: id("video_token_id"),
            vision_start_token_id: id("vision_start_token_id"),
            vision_end_token_id: id("vision_end_token_id"),
            position_id_per_seconds: thinker
                .get("position_id_per_seconds")
                .and_then(Value::as_f64),
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
    fn vision_config_takes_the_class_defaults_and_is_checked() {
        let path = Path::new("config.json");
        let cfg = OmniConfig::from_json(
            r#"{"thinker_config": {"image_token_id": 151655, "position_id_per_seconds": 13,
                "vision_config": {"depth": 2, "hidden_size": 64, "num_heads": 4,
                                  "deepstack_visual_indexes": [0]}}}"#,
            path,
        )
        .expect("parses");
        let v = cfg.vision.expect("a vision tower");
        assert_eq!((v.depth, v.head_dim(), v.grid_side()), (2, 16, 48));
        assert_eq!((v.patch_len(), v.merge_unit()), (3 * 2 * 16 * 16, 4));
        assert_eq!(cfg.image_token_id, Some(151655));
        assert_eq!(cfg.position_id_per_seconds, Some(13.0));
        for bad in [
            r#"{"depth": 2, "deepstack_visual_indexes": [2]}"#,
            r#"{"hidden_size": 100, "num_heads": 3}"#,
            r#"{"num_position_embeddings": 10}"#,
            r#"{"hidden_act": "relu"}"#,
        ] {
            let text = format!(r#"{{"thinker_config": {{"vision_config": {bad}}}}}"#);
            assert!(OmniConfig::from_json(&text, path).is_err(), "{bad}");
        }
    }

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
