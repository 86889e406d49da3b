//! The vision side of a Qwen3-Omni checkpoint: its image processor settings
//! (`preprocessor_config.json`), its tower (`thinker.visual`) and the placeholder tokens that
//! its embeddings replace. Pictures go in as decoded RGB ([`super::image::decode`]); out come
//! `pixel_values` ([`VisionInput::prepare`]) and the tower's embeddings and deepstack features
//! ([`VisionInput::encode`]).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use omnishard_model::vision::{VisionEncoder, VisionOutput};
use omnishard_model::{Checkpoint, ModelError, Weights};
use omnishard_proto::omni::OmniConfig;

use super::MediaError;
use super::image::{ImageProcessorConfig, PixelPatches, preprocess_frames, preprocess_image};
use super::rope_index::MediaIds;

/// `Qwen3OmniMoeProcessor`'s bounds on a video frame's pixels (its `videos_kwargs` size
/// `shortest_edge` / `longest_edge`), which it passes to its video processor whatever the
/// checkpoint's files say: 128 and 768 merge windows of 32 × 32.
pub const VIDEO_MIN_PIXELS: usize = 128 * 32 * 32;
pub const VIDEO_MAX_PIXELS: usize = 768 * 32 * 32;

pub struct VisionInput {
    encoder: VisionEncoder,
    processor: ImageProcessorConfig,
    /// The image settings with the video bounds.
    video: ImageProcessorConfig,
    /// `<|image_pad|>`.
    pub image_token_id: u32,
    /// `<|video_pad|>`, if the checkpoint names one.
    pub video_token_id: Option<u32>,
    /// The ids and settings mRoPE positions of media depend on.
    pub ids: MediaIds,
    device: Device,
}

impl VisionInput {
    /// Loads `thinker.visual` of a Qwen3-Omni checkpoint and its processor settings; `None`
    /// when it has no vision tower. The processor's patch sizes must be the tower's.
    pub fn load(
        dir: &Path,
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Self>, MediaError> {
        let omni =
            OmniConfig::from_model_dir(dir).map_err(|e| MediaError::Unsupported(e.to_string()))?;
        let (Some(cfg), Some(image_token_id)) = (omni.vision, omni.image_token_id) else {
            return Ok(None);
        };
        let processor = ImageProcessorConfig::from_model_dir(dir)?;
        let tower = (
            cfg.patch_size,
            cfg.spatial_merge_size,
            cfg.temporal_patch_size,
        );
        let prep = (
            processor.patch_size,
            processor.merge_size,
            processor.temporal_patch_size,
        );
        if tower != prep || cfg.in_channels != 3 {
            return Err(MediaError::Unsupported(format!(
                "the image processor's (patch, merge, temporal patch) {prep:?} are not the vision tower's {tower:?} (or the tower does not take RGB)"
            )));
        }
        let w =
            Weights::new(ckpt, super::encoder_dtype(dtype, device), device).pp("thinker.visual");
        let vision_start = omni.vision_start_token_id.ok_or_else(|| {
            MediaError::Unsupported("config.json names no vision_start_token_id".into())
        })?;
        // Ids a prompt cannot hold stand in for what the checkpoint does not have.
        let ids = MediaIds {
            image: image_token_id,
            video: omni.video_token_id.unwrap_or(u32::MAX),
            vision_start,
            vision_end: omni.vision_end_token_id.unwrap_or(u32::MAX),
            audio: omni.audio_token_id.unwrap_or(u32::MAX),
            audio_start: omni.audio_start_token_id.unwrap_or(u32::MAX),
            audio_end: omni.audio_end_token_id.unwrap_or(u32::MAX),
            // transformers' Qwen3OmniMoeThinkerConfig default.
            position_id_per_seconds: omni.position_id_per_seconds.unwrap_or(25.0),
            spatial_merge: cfg.spatial_merge_size,
        };
        let video = ImageProcessorConfig {
            min_pixels: VIDEO_MIN_PIXELS,
            max_pixels: VIDEO_MAX_PIXELS,
            ..processor.clone()
        };
        Ok(Some(Self {
            encoder: VisionEncoder::new(&cfg, w)?,
            processor,
            video,
            image_token_id,
            video_token_id: omni.video_token_id,
            ids,
            device: device.clone(),
        }))
    }

    pub fn processor(&self) -> &ImageProcessorConfig {
        &self.processor
    }

    pub fn encoder(&self) -> &VisionEncoder {
        &self.encoder
    }

    /// An image's `pixel_values` and grid; `tokens(merge)` of the result is its placeholder count.
    pub fn prepare(&self, image: &RgbImage) -> Result<PixelPatches, MediaError> {
        preprocess_image(image, &self.processor)
    }

    /// Bounds a video frame's pixels to `[min, max]` after resizing (the processor's
    /// `videos_kwargs` size), in place of [`VIDEO_MIN_PIXELS`] / [`VIDEO_MAX_PIXELS`].
    pub fn set_video_pixels(&mut self, min: usize, max: usize) -> Result<(), MediaError> {
        if min == 0 || min > max {
            return Err(MediaError::Unsupported(format!(
                "video pixel bounds {min}..{max}: the minimum must be positive and at most the maximum"
            )));
        }
        self.video.min_pixels = min;
        self.video.max_pixels = max;
        Ok(())
    }

    /// The settings video frames are prepared with.
    pub fn video_processor(&self) -> &ImageProcessorConfig {
        &self.video
    }

    /// A video's (its frames, all of one size) `pixel_values_videos` and grid, as
    /// `Qwen3OmniMoeProcessor` calls its video processor: the image settings, but the frame
    /// bounded by the video pixel bounds.
    pub fn prepare_frames(&self, frames: &[RgbImage]) -> Result<PixelPatches, MediaError> {
        preprocess_frames(frames, &self.video)
    }

    /// The tower on several images (or videos) at once: their embeddings and deepstack features,
    /// concatenated in order.
    pub fn encode(&self, inputs: &[PixelPatches]) -> Result<VisionOutput, MediaError> {
        let tensors = inputs
            .iter()
            .map(|p| p.to_tensor(&self.device))
            .collect::<candle_core::Result<Vec<Tensor>>>()
            .map_err(ModelError::from)?;
        let pixels = Tensor::cat(&tensors, 0).map_err(ModelError::from)?;
        let grids: Vec<[usize; 3]> = inputs.iter().map(|p| p.grid_thw).collect();
        Ok(self.encoder.forward(&pixels, &grids)?)
    }
}
