//! Image and video input of Qwen3-Omni's thinker: the vision tower (`Qwen3OmniMoeVisionEncoder`
//! of transformers 4.57.3, [`encoder`]) that turns the processor's `pixel_values` into embeddings
//! for the prompt's `<|image_pad|>` / `<|video_pad|>` positions and the deepstack features added
//! to the first text layers' outputs there; [`positions`] places each patch (interpolated learned
//! position embeddings, 2-D rotary angles). Preprocessing (decode, resize, patchify) is the
//! coordinator's (`media::image`).

pub mod encoder;
mod positions;

pub use encoder::{VisionEncoder, VisionOutput};
