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

pub struct VisionInput {
    encoder: VisionEncoder,
    processor: ImageProcessorConfig,
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
            audio: omni.audio_token_id.unwrap_or(u32::MAX),
            audio_start: omni.audio_start_token_id.unwrap_or(u32::MAX),
            // transformers' Qwen3OmniMoeThinkerConfig default.
            position_id_per_seconds: omni.position_id_per_seconds.unwrap_or(25.0),
            spatial_merge: cfg.spatial_merge_size,
        };
        Ok(Some(Self {
            encoder: VisionEncoder::new(&cfg, w)?,
            processor,
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

    /// A video's (its frames, all of one size) `pixel_values_videos` and grid. `processor`
    /// overrides the image settings: `Qwen3OmniMoeProcessor` calls its video processor with
    /// min/max pixels of 128 × 32² / 768 × 32² unless told otherwise.
    pub fn prepare_frames(
        &self,
        frames: &[RgbImage],
        processor: Option<&ImageProcessorConfig>,
    ) -> Result<PixelPatches, MediaError> {
        preprocess_frames(frames, processor.unwrap_or(&self.processor))
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
