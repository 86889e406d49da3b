//! Images, video frames and audio through Qwen3-Omni's thinker, against transformers 4.57.3 on
//! the committed fixture (tests/fixtures/make_omni_fixtures.py, `make_mixed_goldens`): the
//! prompt's mRoPE positions equal `get_rope_index`'s, and the logits of text + image, text +
//! image + audio, two images, a video given as frames, and an audio clip followed by a video
//! carrying that clip as its sound track (`use_audio_in_video`: the processor interleaves their
//! tokens by time) equal the reference's within 1e-4 × max(1, max |logit|) — through
//! `coordinator score`, which decodes the files, runs the encoders, expands each placeholder and
//! adds the deepstack features; over a 3-node cluster, bit for bit the same.

use std::collections::HashMap;
use std::ffi::OsString;

use candle_core::Tensor;
use omnishard_coordinator::media::rope_index::{MediaIds, MediaLayout, rope_index};
use omnishard_tests::fixtures_dir;
use omnishard_tests::omni::{assert_logits_close, bits, golden, score_media, score_media_output};
use serde_json::Value;

fn goldens() -> (HashMap<String, Tensor>, Value, Value) {
    let (tensors, meta) = golden("omni-mixed");
    (tensors, meta, golden("omni-vision").1)
}

/// The fixture's placeholder ids (tests/fixtures/make_omni_fixtures.py's IDS).
const AUDIO: u32 = 301;
const IMAGE: u32 = 304;
const VIDEO: u32 = 305;

fn ids(case: &Value) -> Vec<u32> {
    serde_json::from_value(case["token_ids"].clone()).expect("ids")
}

/// The prompt as a client sends it: the fixture's where the processor rearranged it, else
/// `collapsed`.
fn prompt(case: &Value) -> Vec<u32> {
    match case.get("prompt_ids") {
        Some(p) => serde_json::from_value(p.clone()).expect("prompt ids"),
        None => collapsed(&ids(case)),
    }
}

fn audio_clips(case: &Value) -> Vec<&str> {
    let clips = case["audio"].as_array().expect("audio clips");
    clips.iter().map(|c| c.as_str().expect("a path")).collect()
}

/// The prompt with each run of a placeholder collapsed to one, as a client sends it.
fn collapsed(ids: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for &t in ids {
        if [AUDIO, IMAGE, VIDEO].contains(&t) && out.last() == Some(&t) {
            continue;
        }
        out.push(t);
    }
    out
}

#[test]
fn positions_are_get_rope_index() {
    let (golden, meta, vision) = goldens();
    let grid = |name: &str| -> [usize; 3] {
        serde_json::from_value(vision["entries"][name]["grid_thw"].clone()).expect("grid")
    };
    let omni = MediaIds {
        image: IMAGE,
        video: VIDEO,
        vision_start: 303,
        vision_end: 306,
        audio: AUDIO,
        audio_start: 300,
        audio_end: 302,
        position_id_per_seconds: 25.0,
        spatial_merge: 2,
    };
    for (name, case) in meta["cases"].as_object().expect("cases") {
        let mut layout = MediaLayout::default();
        for image in case["images"].as_array().expect("images") {
            let stem = image
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("media/");
            layout.images.push(grid(stem.trim_end_matches(".png")));
        }
        if !case["video_frames"].as_array().expect("frames").is_empty() {
            layout.videos.push((grid("clip"), 2.0));
        }
        for _ in audio_clips(case) {
            layout.audio_tokens.push(35);
        }
        let (positions, delta) = rope_index(&ids(case), &omni, &layout).expect("positions");
        let want: Vec<Vec<f32>> = golden[&format!("{name}.positions")]
            .to_vec2()
            .expect("rows");
        for (row, w) in positions.rows.iter().zip(&want) {
            let w: Vec<u32> = w.iter().map(|&x| x as u32).collect();
            assert_eq!(row, &w, "{name}");
        }
        assert_eq!(delta, case["rope_delta"].as_i64().expect("delta"), "{name}");
    }
}

/// `coordinator score`'s media flags for a case.
fn media_args(case: &Value) -> Vec<OsString> {
    let mut media: Vec<OsString> = Vec::new();
    for image in case["images"].as_array().expect("images") {
        media.push("--image".into());
        media.push(fixtures_dir().join(image.as_str().expect("a path")).into());
    }
    let frames: Vec<String> = case["video_frames"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| {
            fixtures_dir()
                .join(f.as_str().expect("a path"))
                .display()
                .to_string()
        })
        .collect();
    if !frames.is_empty() {
        media.push("--video-frames".into());
        media.push(frames.join(",").into());
        // The fixture's video processor ran with the image processor's bounds (32² and 64²
        // pixels) in place of Qwen3-Omni's video defaults, which would make a 45×30 frame ~5,000
        // patches.
        for flag in ["--video-min-pixels=1024", "--video-max-pixels=4096"] {
            media.push(flag.into());
        }
    }
    for audio in audio_clips(case) {
        media.push("--audio".into());
        media.push(fixtures_dir().join(audio).into());
    }
    if case["use_audio_in_video"].as_bool() == Some(true) {
        media.push("--use-audio-in-video".into());
    }
    media
}

fn score(prefix: &[&str], case: &Value) -> Vec<Vec<f32>> {
    score_media(prefix, &prompt(case), &media_args(case))
}

#[test]
fn logits_of_image_video_and_audio_prompts_match_the_reference_and_the_cluster() {
    let (golden, meta, _) = goldens();
    for (name, case) in meta["cases"].as_object().expect("cases") {
        let ours = score(&[], case);
        let want: Vec<Vec<f32>> = golden[&format!("{name}.logits")].to_vec2().expect("rows");
        assert_logits_close(name, &ours, &want);
        if name == "image_audio" {
            let clustered = score(&["cluster", "--nodes", "3"], case);
            assert!(
                bits(&clustered) == bits(&ours),
                "a 3-node cluster changed the logits"
            );
        }
    }
}

#[test]
fn a_video_without_its_sound_track_is_refused() {
    let (_, meta, _) = goldens();
    let case = &meta["cases"]["video_audio"];
    let prompt = prompt(case);
    let refused = |ids: &[u32], media: Vec<OsString>, expected: &str| {
        let out = score_media_output(&[], ids, &media);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expected), "{err}");
    };
    // Two placeholders take clips (the audio and the video): one clip is too few.
    let mut one_clip = media_args(case);
    let at = one_clip
        .iter()
        .position(|a| a == "--audio")
        .expect("--audio");
    one_clip.drain(at..at + 2);
    refused(
        &prompt,
        one_clip,
        "each video with its audio takes an audio clip too",
    );
    // The video's audio goes inside its <|vision_start|> ... <|vision_end|>.
    let bare: Vec<u32> = prompt.iter().copied().filter(|&t| t != 303).collect();
    refused(
        &bare,
        media_args(case),
        "must stand between <|vision_start|> and <|vision_end|>",
    );
}
