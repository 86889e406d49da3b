//! Images and video frames through Qwen3-Omni's vision side, against transformers 4.57.3 on the
//! committed fixture (tests/fixtures/make_omni_vision.py): the files decoded, resized, normalised
//! and patched as `Qwen2VLImageProcessorFast` / `Qwen2VLVideoProcessor` do (pixel values and
//! grids), and the vision tower's embeddings and deepstack features — per image, for a video of
//! three frames, and for three images in one call (attention windowed per image).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use omnishard_coordinator::media::image::{
    ImageProcessorConfig, PixelPatches, RgbImage, decode, preprocess_frames, preprocess_image,
};
use omnishard_coordinator::media::vision::VisionInput;
use omnishard_model::{Checkpoint, LoadFormat};
use omnishard_proto::ModelConfig;
use omnishard_tests::omni::{golden, max_diff};
use omnishard_tests::{fixtures_dir, model_dir};
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;

fn grid(golden: &HashMap<String, Tensor>, name: &str) -> [usize; 3] {
    let g: Vec<Vec<i64>> = golden[&format!("{name}.grid_thw")].to_vec2().expect("grid");
    [g[0][0] as usize, g[0][1] as usize, g[0][2] as usize]
}

fn entries(meta: &Value) -> Vec<(String, Value)> {
    meta["entries"]
        .as_object()
        .expect("entries")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn decode_file(path: &str) -> RgbImage {
    let bytes = std::fs::read(fixtures_dir().join(path)).expect("media file");
    decode(&bytes, 1 << 24).expect("decodes")
}

/// The entry's media run through our processor.
fn prepare(entry: &Value, cfg: &ImageProcessorConfig) -> PixelPatches {
    match &entry["source"] {
        Value::Array(frames) => {
            let frames: Vec<_> = frames
                .iter()
                .map(|f| decode_file(f.as_str().expect("path")))
                .collect();
            preprocess_frames(&frames, cfg).expect("frames")
        }
        source => preprocess_image(&decode_file(source.as_str().expect("path")), cfg)
            .expect("preprocesses"),
    }
}

#[test]
fn pixel_values_and_grids_match_the_reference_processor() {
    let (golden, meta) = golden("omni-vision");
    let cfg = ImageProcessorConfig::from_model_dir(&model_dir("omni-audio")).expect("config");
    let p = &meta["processor"];
    assert_eq!(
        cfg.patch_size as u64,
        p["patch_size"].as_u64().expect("patch")
    );
    assert_eq!(
        cfg.min_pixels as u64,
        p["min_pixels"].as_u64().expect("min")
    );
    assert_eq!(
        cfg.max_pixels as u64,
        p["max_pixels"].as_u64().expect("max")
    );
    for (name, entry) in entries(&meta) {
        let ours = prepare(&entry, &cfg);
        assert_eq!(ours.grid_thw, grid(&golden, &name), "{name}: grid");
        let want = &golden[&format!("{name}.pixel_values")];
        let got = ours.to_tensor(&Device::Cpu).expect("tensor");
        let d = max_diff(&got, want);
        eprintln!(
            "{name}: grid {:?}, pixel values max |ours - reference| = {d:e}",
            ours.grid_thw
        );
        assert!(d < TOLERANCE, "{name}: pixel values differ by {d}");
        assert_eq!(
            ours.tokens(cfg.merge_size) as u64,
            entry["tokens"].as_u64().expect("tokens"),
            "{name}: placeholder tokens"
        );
    }
}

fn tower() -> VisionInput {
    let dir = model_dir("omni-audio");
    let cfg = ModelConfig::from_model_dir(&dir).expect("config");
    let ckpt = Checkpoint::load(&dir, &cfg, LoadFormat::Auto, 0).expect("checkpoint");
    VisionInput::load(&dir, &ckpt, DType::F32, &Device::Cpu)
        .expect("loads")
        .expect("a vision tower")
}

fn compare(
    what: &str,
    out: &omnishard_model::vision::VisionOutput,
    golden: &HashMap<String, Tensor>,
    key: &str,
    deepstack: usize,
) -> f32 {
    let mut worst = max_diff(&out.embeds, &golden[&format!("{key}.embeds")]);
    assert_eq!(out.deepstack.len(), deepstack, "{what}: deepstack features");
    for (k, d) in out.deepstack.iter().enumerate() {
        worst = worst.max(max_diff(d, &golden[&format!("{key}.deepstack.{k}")]));
    }
    eprintln!("{what}: embeddings and deepstack max |ours - reference| = {worst:e}");
    assert!(worst < TOLERANCE, "{what}: differs by {worst}");
    worst
}

#[test]
fn vision_tower_matches_the_reference() {
    let (golden, meta) = golden("omni-vision");
    let vision = tower();
    let deepstack = meta["deepstack_visual_indexes"]
        .as_array()
        .expect("indexes")
        .len();
    for (name, entry) in entries(&meta) {
        // On the reference's pixel values: the tower alone.
        let pixels = &golden[&format!("{name}.pixel_values")];
        let out = vision
            .encoder()
            .forward(pixels, &[grid(&golden, &name)])
            .expect("forward");
        compare(&format!("{name} (tower)"), &out, &golden, &name, deepstack);
        // From the file: decoding, processor and tower together.
        let ours = prepare(&entry, vision.processor());
        let out = vision.encode(&[ours]).expect("encodes");
        compare(&format!("{name} (file)"), &out, &golden, &name, deepstack);
    }
    // Three images in one call: attention stays inside each image.
    let names: Vec<String> = serde_json::from_value(meta["batch"].clone()).expect("batch");
    let inputs: Vec<PixelPatches> = names
        .iter()
        .map(|n| prepare(&meta["entries"][n], vision.processor()))
        .collect();
    let out = vision.encode(&inputs).expect("encodes");
    compare("batch", &out, &golden, "batch", deepstack);
}

#[test]
fn bad_pictures_are_refused() {
    assert!(decode(b"not an image", 1 << 20).is_err());
    let bytes = std::fs::read(fixtures_dir().join("media/badge.png")).expect("badge");
    // 160×120 is more than 10 000 pixels.
    assert!(decode(&bytes, 10_000).is_err());
    assert!(decode(&bytes[..bytes.len() / 2], 1 << 20).is_err());
}
