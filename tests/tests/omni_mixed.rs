//! Images, video frames and audio through Qwen3-Omni's thinker, against transformers 4.57.3 on
//! the committed fixture (tests/fixtures/make_omni_fixtures.py, `make_mixed_goldens`): the
//! prompt's mRoPE positions equal `get_rope_index`'s, and the logits of text + image, text +
//! image + audio, two images and a video given as frames equal the reference's within 1e-4 ×
//! max(1, max |logit|) — through `coordinator score`, which decodes the files, runs the encoders,
//! expands each placeholder and adds the deepstack features; over a 3-node cluster, bit for bit
//! the same.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use omnishard_coordinator::media::rope_index::{MediaIds, MediaLayout, rope_index};
use omnishard_tests::{bin, fixtures_dir, model_dir};
use serde_json::Value;

fn goldens() -> (HashMap<String, Tensor>, Value, Value) {
    let dir = fixtures_dir().join("golden");
    let tensors = candle_core::safetensors::load(dir.join("omni-mixed.safetensors"), &Device::Cpu)
        .expect("golden tensors");
    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(name)).expect("golden json")).expect("json")
    };
    (tensors, read("omni-mixed.json"), read("omni-vision.json"))
}

/// The fixture's placeholder ids (tests/fixtures/make_omni_fixtures.py's IDS).
const AUDIO: u32 = 301;
const IMAGE: u32 = 304;
const VIDEO: u32 = 305;

fn ids(case: &Value) -> Vec<u32> {
    serde_json::from_value(case["token_ids"].clone()).expect("ids")
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
        audio: AUDIO,
        audio_start: 300,
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
        if !case["audio"].is_null() {
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
    let list = collapsed(&ids(case))
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = std::process::Command::new(bin("coordinator"));
    cmd.args(prefix)
        .arg("score")
        .arg("--model")
        .arg(model_dir("omni-audio"))
        .args(["--token-ids", &list])
        .env("RUST_LOG", "warn");
    for image in case["images"].as_array().expect("images") {
        cmd.arg("--image")
            .arg(fixtures_dir().join(image.as_str().expect("a path")));
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
        cmd.args(["--video-frames", &frames.join(",")]);
    }
    if let Some(audio) = case["audio"].as_str() {
        cmd.arg("--audio").arg(fixtures_dir().join(audio));
    }
    let out = cmd.output().expect("run coordinator score");
    assert!(
        out.status.success(),
        "score failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    serde_json::from_value(v["logits"].clone()).expect("logits")
}

#[test]
fn logits_of_image_video_and_audio_prompts_match_the_reference_and_the_cluster() {
    let (golden, meta, _) = goldens();
    for (name, case) in meta["cases"].as_object().expect("cases") {
        let ours = score(&[], case);
        let want: Vec<Vec<f32>> = golden[&format!("{name}.logits")].to_vec2().expect("rows");
        assert_eq!(
            ours.len(),
            want.len(),
            "{name}: prompt length after expansion"
        );
        let max_logit = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        let tol = 1e-4 * max_logit.max(1.0);
        let diff = ours
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{name}: max |ours - reference| = {diff:e} (tolerance {tol:e})");
        assert!(diff <= tol, "{name}: logits differ by {diff} > {tol}");
        if name == "image_audio" {
            let clustered = score(&["cluster", "--nodes", "3"], case);
            let bits = |rows: &[Vec<f32>]| -> Vec<u32> {
                rows.iter().flatten().map(|x| x.to_bits()).collect()
            };
            assert!(
                bits(&clustered) == bits(&ours),
                "a 3-node cluster changed the logits"
            );
        }
    }
}
