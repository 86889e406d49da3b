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
