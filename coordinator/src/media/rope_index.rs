//! mRoPE positions of a prompt with media: `get_rope_index` of
//! `Qwen3OmniMoePreTrainedModelForConditionalGeneration` (transformers 4.57.3). Text runs on
//! all three rows; an image or video span gets (time, row, column) positions of its merged patch
//! grid, starting after its `<|vision_start|>`, with time `t · second_per_grid ·
//! position_id_per_seconds` (0 for an image); audio is sequential; whatever follows a span
//! continues from the span's largest position + 1. Without images or video the reference takes
//! positions 0..n, as here. The positions of decoding tokens continue at `len + delta`.
//! A video with its audio (`use_audio_in_video`: `<|vision_start|><|audio_start|>`, the two
//! kinds of tokens interleaved, `<|audio_end|><|vision_end|>`) gets the video's and the audio's
//! positions merged in time order, the video's first where they tie.

use omnishard_model::Positions;

/// The token ids that delimit media, and how time maps to positions.
#[derive(Debug, Clone, Copy)]
pub struct MediaIds {
    pub image: u32,
    pub video: u32,
    pub vision_start: u32,
    pub vision_end: u32,
    pub audio: u32,
    pub audio_start: u32,
    pub audio_end: u32,
    pub position_id_per_seconds: f64,
    pub spatial_merge: usize,
}

/// What the prompt's media are, in prompt order within each kind.
#[derive(Debug, Clone, Default)]
pub struct MediaLayout {
    /// (t, h, w) patch grids of the images.
    pub images: Vec<[usize; 3]>,
    /// Patch grids of the videos, with each one's seconds per temporal patch.
    pub videos: Vec<([usize; 3], f64)>,
    /// Embeddings of each audio clip, in prompt order (a video's own audio where the video is).
    pub audio_tokens: Vec<usize>,
}

/// Positions of `tokens` (placeholders expanded) and the delta decoding continues with.
pub fn rope_index(
    tokens: &[u32],
    ids: &MediaIds,
    layout: &MediaLayout,
) -> Result<(Positions, i64), String> {
    let n = tokens.len();
    if layout.images.is_empty() && layout.videos.is_empty() {
        return Ok((Positions::text(0, n), 0));
    }
    let mut rows: [Vec<f64>; 3] = [
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    ];
    // The largest position of the last block pushed, as the reference reads `list[-1].max()`.
    let mut last_max: Option<f64> = None;
    fn push(rows: &mut [Vec<f64>; 3], last_max: &mut Option<f64>, block: [Vec<f64>; 3]) {
        let max = block
            .iter()
            .flatten()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        if max.is_finite() {
            *last_max = Some(max);
        }
        for (row, b) in rows.iter_mut().zip(block) {
            row.extend(b);
        }
    }
    let seq = |start: f64, len: usize| -> [Vec<f64>; 3] {
        let r: Vec<f64> = (0..len).map(|i| start + i as f64).collect();
        [r.clone(), r.clone(), r]
    };
    let find = |what: u32, from: usize| {
        tokens[from.min(n)..]
            .iter()
            .position(|&t| t == what)
            .map(|i| i + from)
    };
    let starts: Vec<usize> = (0..n).filter(|&i| tokens[i] == ids.vision_start).collect();
    let followed_by = |t: u32| {
        starts
            .iter()
            .filter(|&&i| tokens.get(i + 1) == Some(&t))
            .count()
    };
    let in_video = followed_by(ids.audio_start);
    let (mut remain_images, mut remain_videos) =
        (followed_by(ids.image), followed_by(ids.video) + in_video);
    let mut remain_audios = tokens.iter().filter(|&&t| t == ids.audio_start).count();
    if remain_images != layout.images.len() || remain_videos != layout.videos.len() {
        return Err(format!(
            "{remain_images} image and {remain_videos} video spans for {} images and {} videos",
            layout.images.len(),
            layout.videos.len()
        ));
    }
    let has_visual = tokens.contains(&ids.image) || tokens.contains(&ids.video);
    let has_audio = tokens.contains(&ids.audio);
    let (mut image_idx, mut video_idx, mut audio_idx) = (0, 0, 0);
    let mut st = 0usize;
    let m = ids.spatial_merge.max(1);
    // A video with its audio is one span of both.
    for _ in 0..remain_images + remain_videos + remain_audios - in_video {
        let mut st_idx = last_max.map_or(0.0, |x| x + 1.0);
        let ed_vision = if has_visual && (remain_images > 0 || remain_videos > 0) {
            find(ids.vision_start, st).unwrap_or(n + 1)
        } else {
            n + 1
        };
        let ed_audio = if has_audio && remain_audios > 0 {
            find(ids.audio_start, st).unwrap_or(n + 1)
        } else {
            n + 1
        };
        let min_ed = ed_vision.min(ed_audio);
        if min_ed > n {
            return Err("a media span without its start token".into());
        }
        let text_len = min_ed - st;
        if text_len > 0 {
            push(&mut rows, &mut last_max, seq(st_idx, text_len));
            st_idx += text_len as f64;
        }
        let audio_in_video = min_ed == ed_vision && ed_vision + 1 == ed_audio;
        let delimiters = if audio_in_video { 2 } else { 1 };
        push(&mut rows, &mut last_max, seq(st_idx, delimiters));
        st_idx += delimiters as f64;
        let mut next_audio = || -> Result<usize, String> {
            let len = *layout
                .audio_tokens
                .get(audio_idx)
                .ok_or("more audio spans than audio clips")?;
            audio_idx += 1;
            remain_audios -= 1;
            Ok(len)
        };
        let body = if min_ed == ed_audio {
            let len = next_audio()?;
            push(&mut rows, &mut last_max, seq(st_idx, len));
            len
        } else if audio_in_video {
            let audio_len = next_audio()?;
            let (grid, seconds) = *layout
                .videos
                .get(video_idx)
                .ok_or("more video spans than videos")?;
            video_idx += 1;
            remain_videos -= 1;
            let video = grid_block(grid, (seconds, ids.position_id_per_seconds), st_idx, m);
            let audio = seq(st_idx, audio_len);
            let video_len = video[0].len();
            // Merged one position at a time, the video's first on a tie, then the rest of either
            // as one block (the next start is the last block's largest position + 1).
            let column = |b: &[Vec<f64>; 3], from: usize, to: usize| {
                [
                    b[0][from..to].to_vec(),
                    b[1][from..to].to_vec(),
                    b[2][from..to].to_vec(),
                ]
            };
            let (mut vi, mut ai) = (0, 0);
            while vi < video_len && ai < audio_len {
                if video[0][vi] <= audio[0][ai] {
                    push(&mut rows, &mut last_max, column(&video, vi, vi + 1));
                    vi += 1;
                } else {
                    push(&mut rows, &mut last_max, column(&audio, ai, ai + 1));
                    ai += 1;
                }
            }
            if vi < video_len {
                push(&mut rows, &mut last_max, column(&video, vi, video_len));
            }
            if ai < audio_len {
                push(&mut rows, &mut last_max, column(&audio, ai, audio_len));
            }
            audio_len + video_len
        } else {
            let (grid, t_scale) = match tokens.get(ed_vision + 1) {
                Some(&t) if t == ids.image => {
                    let g = layout.images[image_idx];
                    image_idx += 1;
                    remain_images -= 1;
                    (g, (1.0, ids.position_id_per_seconds))
                }
                Some(&t) if t == ids.video => {
                    let (g, seconds) = layout.videos[video_idx];
                    video_idx += 1;
                    remain_videos -= 1;
                    (g, (seconds, ids.position_id_per_seconds))
                }
                _ => {
                    return Err(
                        "a <|vision_start|> followed by neither an image nor a video".into(),
                    );
                }
            };
            let block = grid_block(grid, t_scale, st_idx, m);
            let len = block[0].len();
            push(&mut rows, &mut last_max, block);
            len
        };
        st += text_len + delimiters + body + delimiters;
        let eos = last_max.map_or(0.0, |x| x + 1.0);
        push(&mut rows, &mut last_max, seq(eos, delimiters));
    }
    if st < n {
        let start = last_max.map_or(0.0, |x| x + 1.0);
        push(&mut rows, &mut last_max, seq(start, n - st));
    }
    if rows[0].len() != n {
        return Err(format!(
            "positions for {} tokens where the prompt has {n}: the placeholders do not match the media",
            rows[0].len()
        ));
    }
    let max = rows.iter().flatten().copied().fold(0.0, f64::max);
    let to_u32 = |row: Vec<f64>| -> Result<Vec<u32>, String> {
        row.into_iter()
            .map(|p| {
                if p.fract() == 0.0 && p >= 0.0 && p <= f64::from(u32::MAX) {
                    Ok(p as u32)
                } else {
                    Err(format!(
                        "position {p} is not a whole number (a video's seconds per frame pair times position_id_per_seconds must be)"
                    ))
                }
            })
            .collect()
    };
    let [a, b, c] = rows;
    let positions = Positions {
        rows: [to_u32(a)?, to_u32(b)?, to_u32(c)?],
    };
    Ok((positions, (max as i64) + 1 - n as i64))
}

/// The (time, row, column) positions of a patch grid merged `m × m`, from `start`, with time
/// `(t · seconds) · per_second`: the reference's `get_llm_pos_ids_for_vision`.
fn grid_block(
    grid: [usize; 3],
    (seconds, per_second): (f64, f64),
    start: f64,
    m: usize,
) -> [Vec<f64>; 3] {
    let [t, h, w] = grid;
    let (lh, lw) = (h / m, w / m);
    let mut block: [Vec<f64>; 3] = Default::default();
    for ti in 0..t {
        // As the reference: two f32 products (`arange(t) * second_per_grid.float() *
        // position_id_per_seconds`), then the start added.
        let time = f64::from((ti as f32) * (seconds as f32) * (per_second as f32));
        for hi in 0..lh {
            for wi in 0..lw {
                block[0].push(time + start);
                block[1].push(hi as f64 + start);
                block[2].push(wi as f64 + start);
            }
        }
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: MediaIds = MediaIds {
        image: 4,
        video: 5,
        vision_start: 3,
        vision_end: 6,
        audio: 1,
        audio_start: 0,
        audio_end: 2,
        position_id_per_seconds: 25.0,
        spatial_merge: 2,
    };

    #[test]
    fn an_image_gets_its_grid_and_text_continues_after_it() {
        // text, <vision_start>, 2x3 merged image, <vision_end>, text
        let mut tokens = vec![9, 9, 3];
        tokens.extend([4; 6]);
        tokens.extend([6, 9]);
        let layout = MediaLayout {
            images: vec![[1, 4, 6]],
            ..Default::default()
        };
        let (p, delta) = rope_index(&tokens, &IDS, &layout).expect("positions");
        assert_eq!(p.rows[0], [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7]);
        assert_eq!(p.rows[1], [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7]);
        assert_eq!(p.rows[2], [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]);
        assert_eq!(delta, 8 - 11);
    }

    #[test]
    fn without_images_or_video_positions_are_sequential() {
        let (p, delta) = rope_index(&[0, 1, 1, 2, 9], &IDS, &MediaLayout::default()).expect("ok");
        assert_eq!(p.rows[0], [0, 1, 2, 3, 4]);
        assert_eq!(delta, 0);
    }

    #[test]
    fn mismatched_media_is_an_error() {
        let layout = MediaLayout {
            images: vec![[1, 4, 6], [1, 2, 2]],
            ..Default::default()
        };
        assert!(rope_index(&[3, 4, 6], &IDS, &layout).is_err());
    }
}
