//! A prompt's media made ready for the text model, as `Qwen3OmniMoeProcessor` and the thinker's
//! forward do it (transformers 4.57.3): each placeholder — `<|audio_pad|>`, `<|image_pad|>`,
//! `<|video_pad|>`, one per item, in prompt order — expanded to one token per embedding of its
//! item; the embeddings (and, for images and video, the deepstack features) to scatter over
//! those tokens; and, when there are images or video, the prompt's mRoPE positions
//! (`rope_index`) with the delta decoding continues with. With `use_audio_in_video` each
//! `<|vision_start|><|video_pad|><|vision_end|>` takes the next audio clip too and becomes
//! `<|vision_start|><|audio_start|>`, video and audio tokens interleaved by time,
//! `<|audio_end|><|vision_end|>` (the processor's `replace_multimodal_special_tokens`).

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
    /// Each video takes the next audio clip (in prompt order) as its sound track.
    pub use_audio_in_video: bool,
}

impl Default for MediaItems {
    /// No media; videos at the processor's default of 1 frame per second.
    fn default() -> Self {
        Self {
            audio: Vec::new(),
            images: Vec::new(),
            videos: Vec::new(),
            video_fps: 1.0,
            use_audio_in_video: false,
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
            .map(|frames| v.prepare_frames(frames))
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
    let audio_lengths: Vec<usize> = audio_rows
        .iter()
        .filter_map(|r| r.embeds.dim(0).ok())
        .collect();
    let seconds_per_grid =
        |v: &VisionInput| v.processor().temporal_patch_size as f64 / items.video_fps;
    let (mut a, mut i, mut v) = (
        audio_rows.into_iter(),
        image_rows.into_iter(),
        video_rows.into_iter(),
    );
    let mut grids = video_patches.iter().map(|p| p.grid_thw);
    let mut out = Vec::with_capacity(tokens.len());
    let mut spans = Vec::new();
    // Placeholders seen: audio clips taken (by audio or, with their audio, video), images, videos.
    let mut placeholders = [0usize; 3];
    let mut at = 0;
    while at < tokens.len() {
        let t = tokens[at];
        at += 1;
        if items.use_audio_in_video && Some(t) == video_id {
            placeholders[0] += 1;
            placeholders[2] += 1;
            let (Some(vision), Some(audio)) = (vision, audio) else {
                return Err(missing("audio"));
            };
            let named = [
                vision.ids.vision_end,
                vision.ids.audio_start,
                vision.ids.audio_end,
            ];
            if named.contains(&u32::MAX) {
                return Err(MediaError::Unsupported(
                    "config.json names no vision_end_token_id, audio_start_token_id or audio_end_token_id: a video cannot carry its audio".into(),
                ));
            }
            let around = out.last() == Some(&vision.ids.vision_start)
                && tokens.get(at) == Some(&vision.ids.vision_end);
            if !around {
                return Err(MediaError::Placeholders(
                    "with the video's audio, each <|video_pad|> must stand between <|vision_start|> and <|vision_end|>".into(),
                ));
            }
            let (Some(video), Some(clip), Some(grid)) = (v.next(), a.next(), grids.next()) else {
                continue;
            };
            interleave(
                &mut out,
                &mut spans,
                video,
                clip,
                grid,
                seconds_per_grid(vision),
                vision,
                audio,
            )?;
            continue;
        }
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
        push_span(&mut out, &mut spans, t, rows)?;
    }
    let given = [items.audio.len(), items.images.len(), items.videos.len()];
    if placeholders != given {
        let with_audio = if items.use_audio_in_video {
            " (each video with its audio takes an audio clip too)"
        } else {
            ""
        };
        return Err(MediaError::Placeholders(format!(
            "the prompt has {} audio, {} image and {} video placeholders for {} audio clips, {} images and {} videos{with_audio}: give one placeholder per item",
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
                    .map(|p| (p.grid_thw, seconds_per_grid(v)))
                    .collect(),
                audio_tokens: audio_lengths,
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

/// `rows` over as many copies of placeholder `token`.
fn push_span(
    out: &mut Vec<u32>,
    spans: &mut Vec<MediaSpan>,
    token: u32,
    rows: Rows,
) -> Result<(), MediaError> {
    let n = rows.embeds.dim(0).map_err(ModelError::from)?;
    spans.push(MediaSpan {
        start: out.len(),
        embeds: rows.embeds,
        deepstack: rows.deepstack,
    });
    out.extend(std::iter::repeat_n(token, n));
    Ok(())
}

/// The time index the processor gives tokens when it interleaves a video with its audio:
/// `Qwen3OmniMoeProcessor`'s default `position_id_per_seconds` (its own setting, apart from the
/// model config's).
const PROCESSOR_POSITION_ID_PER_SECONDS: f64 = 13.0;

/// A video and its audio after `<|vision_start|>`: `<|audio_start|>`, then each merged patch of
/// the video (time `t · seconds_per_grid · 13`) and each audio embedding (time = its index) in
/// time order, video first on a tie, then `<|audio_end|>`; the `<|vision_end|>` follows in the
/// prompt.
#[allow(clippy::too_many_arguments)]
fn interleave(
    out: &mut Vec<u32>,
    spans: &mut Vec<MediaSpan>,
    video: Rows,
    clip: Rows,
    grid: [usize; 3],
    seconds_per_grid: f64,
    vision: &VisionInput,
    audio: &AudioInput,
) -> Result<(), MediaError> {
    let m = vision.ids.spatial_merge.max(1);
    let per_frame = (grid[1] / m) * (grid[2] / m);
    let video_len = video.embeds.dim(0).map_err(ModelError::from)?;
    let audio_len = clip.embeds.dim(0).map_err(ModelError::from)?;
    let time =
        |vi: usize| (vi / per_frame) as f64 * seconds_per_grid * PROCESSOR_POSITION_ID_PER_SECONDS;
    out.push(vision.ids.audio_start);
    let (mut vi, mut ai) = (0, 0);
    while vi < video_len || ai < audio_len {
        // The next run of one kind.
        let from_video = ai == audio_len || (vi < video_len && time(vi) <= ai as f64);
        let (rows, from, token) = if from_video {
            let end = (vi..video_len)
                .find(|&j| ai < audio_len && time(j) > ai as f64)
                .unwrap_or(video_len);
            let from = vi;
            vi = end;
            (&video, from..end, vision.video_token_id)
        } else {
            let from = ai;
            while ai < audio_len && (vi == video_len || time(vi) > ai as f64) {
                ai += 1;
            }
            (&clip, from..ai, Some(audio.token_id()))
        };
        // Times that do not compare (NaN) would stall the merge: each run takes at least one.
        if from.is_empty() {
            return Err(MediaError::Unsupported(format!(
                "the video's frame times ({seconds_per_grid} s per frame pair) cannot be ordered with its audio"
            )));
        }
        let narrow = |t: &candle_core::Tensor| t.narrow(0, from.start, from.len());
        let part = Rows {
            embeds: narrow(&rows.embeds).map_err(ModelError::from)?,
            deepstack: rows
                .deepstack
                .iter()
                .map(narrow)
                .collect::<candle_core::Result<_>>()
                .map_err(ModelError::from)?,
        };
        let token = token
            .ok_or_else(|| MediaError::Unsupported("this model names no <|video_pad|>".into()))?;
        push_span(out, spans, token, part)?;
    }
    out.push(vision.ids.audio_end);
    Ok(())
}
