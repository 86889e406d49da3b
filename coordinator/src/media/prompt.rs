//! A prompt's media made ready for the text model, as `Qwen3OmniMoeProcessor` and the thinker's
//! forward do it (transformers 4.57.3): each placeholder — `<|audio_pad|>`, `<|image_pad|>`,
//! `<|video_pad|>`, one per item, in prompt order — expanded to one token per embedding of its
//! item; the embeddings (and, for images and video, the deepstack features) to scatter over
//! those tokens; and, when there are images or video, the prompt's mRoPE positions
//! (`rope_index`) with the delta decoding continues with.

use image::RgbImage;
use omnishard_model::{MediaSpan, ModelError, Positions};

use super::rope_index::{MediaLayout, rope_index};
use super::vision::VisionInput;
use super::{AudioInput, MediaError};
use crate::media::image::PixelPatches;

/// A prompt's media, decoded, in prompt order within each kind.
pub struct MediaItems {
    /// Mono samples at 16 kHz.
    pub audio: Vec<Vec<f32>>,
    pub images: Vec<RgbImage>,
    /// Each video's frames (all of one size), sampled at `video_fps` frames per second.
    pub videos: Vec<Vec<RgbImage>>,
    pub video_fps: f64,
}

impl Default for MediaItems {
    /// No media; videos at the processor's default of 1 frame per second.
    fn default() -> Self {
        Self {
            audio: Vec::new(),
            images: Vec::new(),
            videos: Vec::new(),
            video_fps: 1.0,
        }
    }
}

/// The expanded prompt.
pub struct Expanded {
    pub tokens: Vec<u32>,
    pub spans: Vec<MediaSpan>,
    /// mRoPE positions when the prompt has images or video (else text positions 0..n).
    pub positions: Option<Positions>,
    /// Decoding continues at position `tokens.len() + rope_delta`.
    pub rope_delta: i64,
}

/// One item's rows: its embeddings and deepstack features.
struct Rows {
    embeds: candle_core::Tensor,
    deepstack: Vec<candle_core::Tensor>,
}

fn split(
    out: omnishard_model::vision::VisionOutput,
    counts: &[usize],
) -> Result<Vec<Rows>, ModelError> {
    let mut rows = Vec::with_capacity(counts.len());
    let mut at = 0;
    for &n in counts {
        rows.push(Rows {
            embeds: out.embeds.narrow(0, at, n)?,
            deepstack: out
                .deepstack
                .iter()
                .map(|d| d.narrow(0, at, n))
                .collect::<candle_core::Result<_>>()?,
        });
        at += n;
    }
    Ok(rows)
}

/// Expands `tokens`' placeholders for `items` with the checkpoint's encoders.
pub fn expand(
    tokens: &[u32],
    items: &MediaItems,
    audio: Option<&AudioInput>,
    vision: Option<&VisionInput>,
) -> Result<Expanded, MediaError> {
    let missing = |what: &str| MediaError::Unsupported(format!("this model has no {what} tower"));
    let audio_rows = match (items.audio.is_empty(), audio) {
        (true, _) => Vec::new(),
        (false, None) => return Err(missing("audio")),
        (false, Some(a)) => items
            .audio
            .iter()
            .map(|clip| {
                a.embed(clip).map(|embeds| Rows {
                    embeds,
                    deepstack: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let visual = !items.images.is_empty() || !items.videos.is_empty();
    let vision = match (visual, vision) {
        (false, v) => v,
        (true, None) => return Err(missing("vision")),
        (true, Some(v)) => Some(v),
    };
    let merge = vision.map_or(1, |v| v.ids.spatial_merge);
    let encode = |patches: &[PixelPatches]| -> Result<Vec<Rows>, MediaError> {
        let Some(v) = vision.filter(|_| !patches.is_empty()) else {
            return Ok(Vec::new());
        };
        let counts: Vec<usize> = patches.iter().map(|p| p.tokens(merge)).collect();
        Ok(split(v.encode(patches)?, &counts)?)
    };
    let image_patches = match vision {
        Some(v) => items
            .images
            .iter()
            .map(|i| v.prepare(i))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let video_patches = match vision {
        Some(v) => items
            .videos
            .iter()
            .map(|frames| v.prepare_frames(frames, None))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let image_rows = encode(&image_patches)?;
    let video_rows = encode(&video_patches)?;

    let audio_id = audio.map(AudioInput::token_id);
    let (image_id, video_id) = match vision {
        Some(v) => (Some(v.image_token_id), v.video_token_id),
        None => (None, None),
    };
    let (mut a, mut i, mut v) = (
        audio_rows.into_iter(),
        image_rows.into_iter(),
        video_rows.into_iter(),
    );
    let mut out = Vec::with_capacity(tokens.len());
    let mut spans = Vec::new();
    let mut placeholders = [0usize; 3];
    for &t in tokens {
        let (kind, next) = if Some(t) == audio_id {
            (0, a.next())
        } else if Some(t) == image_id {
            (1, i.next())
        } else if Some(t) == video_id {
            (2, v.next())
        } else {
            out.push(t);
            continue;
        };
        placeholders[kind] += 1;
        let Some(rows) = next else {
            continue;
        };
        let n = rows.embeds.dim(0).map_err(ModelError::from)?;
        spans.push(MediaSpan {
            start: out.len(),
            embeds: rows.embeds,
            deepstack: rows.deepstack,
        });
        out.extend(std::iter::repeat_n(t, n));
    }
    let given = [items.audio.len(), items.images.len(), items.videos.len()];
    if placeholders != given {
        return Err(MediaError::Placeholders(format!(
            "the prompt has {} audio, {} image and {} video placeholders for {} audio clips, {} images and {} videos: give one placeholder per item",
            placeholders[0], placeholders[1], placeholders[2], given[0], given[1], given[2]
        )));
    }
    let (positions, rope_delta) = match vision.filter(|_| visual) {
        None => (None, 0),
        Some(v) => {
            let layout = MediaLayout {
                images: image_patches.iter().map(|p| p.grid_thw).collect(),
                videos: video_patches
                    .iter()
                    .map(|p| {
                        let seconds = v.processor().temporal_patch_size as f64 / items.video_fps;
                        (p.grid_thw, seconds)
                    })
                    .collect(),
                audio_tokens: audio_lengths(&out, &spans, audio_id),
            };
            let (p, d) = rope_index(&out, &v.ids, &layout).map_err(MediaError::Placeholders)?;
            (Some(p), d)
        }
    };
    Ok(Expanded {
        tokens: out,
        spans,
        positions,
        rope_delta,
    })
}

/// The embeddings of each audio span, in order.
fn audio_lengths(tokens: &[u32], spans: &[MediaSpan], audio_id: Option<u32>) -> Vec<usize> {
    spans
        .iter()
        .filter(|s| Some(tokens[s.start]) == audio_id)
        .filter_map(|s| s.embeds.dim(0).ok())
        .collect()
}
