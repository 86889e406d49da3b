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
use omnishard_tests::omni::mixed::{AUDIO, IMAGE, VIDEO, audio_clips, ids, media_args, prompt};
use omnishard_tests::omni::{assert_logits_close, bits, golden, score_media, score_media_output};
use serde_json::Value;

fn goldens() -> (HashMap<String, Tensor>, Value, Value) {
    let (tensors, meta) = golden("omni-mixed");
    (tensors, meta, golden("omni-vision").1)
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
