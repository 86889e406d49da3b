//! Shared by the Qwen3-Omni media tests: golden tensors and their sizes as
//! tests/fixtures/make_omni_fixtures.py wrote them, the largest difference between tensors, the
//! logits tolerance of the fidelity tests, and `coordinator score` run with media flags.

use std::collections::HashMap;
use std::ffi::OsString;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::{bin, fixtures_dir, model_dir};

/// `golden/{name}.safetensors` and `golden/{name}.json`.
pub fn golden(name: &str) -> (HashMap<String, Tensor>, Value) {
    let dir = fixtures_dir().join("golden");
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
            .expect("golden tensors");
    let meta = serde_json::from_slice(
        &std::fs::read(dir.join(format!("{name}.json"))).expect("golden json"),
    )
    .expect("json");
    (tensors, meta)
}

/// The largest |a - b| of two f32 tensors of one shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("a difference")
}

/// Checks `ours` against the reference's `want` within 1e-4 × max(1, max |logit|); returns the
/// largest difference.
pub fn assert_logits_close(what: &str, ours: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(
        ours.len(),
        want.len(),
        "{what}: prompt length after expansion"
    );
    let max_logit = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let tol = 1e-4 * max_logit.max(1.0);
    let diff = ours
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{what}: max |ours - reference| = {diff:e} (tolerance {tol:e})");
    assert!(diff <= tol, "{what}: logits differ by {diff} > {tol}");
    diff
}

/// `coordinator PREFIX... score --model fixtures/models/omni-audio --token-ids IDS MEDIA...`:
/// its logits.
pub fn score_media(prefix: &[&str], ids: &[u32], media: &[OsString]) -> Vec<Vec<f32>> {
    let out = score_media_output(prefix, ids, media);
    assert!(
        out.status.success(),
        "score failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    serde_json::from_value(v["logits"].clone()).expect("logits")
}

/// The same run, whatever its outcome.
pub fn score_media_output(
    prefix: &[&str],
    ids: &[u32],
    media: &[OsString],
) -> std::process::Output {
    let list = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    std::process::Command::new(bin("coordinator"))
        .args(prefix)
        .arg("score")
        .arg("--model")
        .arg(model_dir("omni-audio"))
        .args(["--token-ids", &list])
        .args(media)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run coordinator score")
}

/// The bits of a matrix of logits, to compare runs exactly.
pub fn bits(rows: &[Vec<f32>]) -> Vec<u32> {
    rows.iter().flatten().map(|x| x.to_bits()).collect()
}

/// The cases of golden/omni-mixed.json: their prompts and `coordinator score`'s media flags.
pub mod mixed {
    use std::ffi::OsString;

    use serde_json::Value;

    use crate::fixtures_dir;

    /// The fixture's placeholder ids (tests/fixtures/make_omni_fixtures.py's IDS).
    pub const AUDIO: u32 = 301;
    pub const IMAGE: u32 = 304;
    pub const VIDEO: u32 = 305;

    pub fn ids(case: &Value) -> Vec<u32> {
        serde_json::from_value(case["token_ids"].clone()).expect("ids")
    }

    /// The prompt as a client sends it: the fixture's where the processor rearranged it, else
    /// `collapsed`.
    pub fn prompt(case: &Value) -> Vec<u32> {
        match case.get("prompt_ids") {
            Some(p) => serde_json::from_value(p.clone()).expect("prompt ids"),
            None => collapsed(&ids(case)),
        }
    }

    pub fn audio_clips(case: &Value) -> Vec<&str> {
        let clips = case["audio"].as_array().expect("audio clips");
        clips.iter().map(|c| c.as_str().expect("a path")).collect()
    }

    /// The prompt with each run of a placeholder collapsed to one, as a client sends it.
    pub fn collapsed(ids: &[u32]) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for &t in ids {
            if [AUDIO, IMAGE, VIDEO].contains(&t) && out.last() == Some(&t) {
                continue;
            }
            out.push(t);
        }
        out
    }

    /// `coordinator score`'s media flags for a case.
    pub fn media_args(case: &Value) -> Vec<OsString> {
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
}
