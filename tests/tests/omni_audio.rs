//! Audio through Qwen3-Omni's thinker, against transformers 4.57.3 on the committed fixture
//! (tests/fixtures/make_omni_fixtures.py): the WAV decoded, its log-mel features as
//! `WhisperFeatureExtractor` makes them, the audio tower's embeddings, and the logits of a text +
//! audio prompt with the placeholder expanded as the processor expands it — in-process and over
//! a cluster of expert-node processes, bit for bit the same.

use candle_core::{DType, Device, Tensor};
use omnishard_coordinator::media::AudioInput;
use omnishard_coordinator::media::audio::decode;
use omnishard_model::{Checkpoint, LoadFormat};
use omnishard_proto::ModelConfig;
use omnishard_tests::{bin, fixtures_dir, model_dir};
use serde_json::Value;

fn golden() -> (std::collections::HashMap<String, Tensor>, Value) {
    let dir = fixtures_dir().join("golden");
    let tensors = candle_core::safetensors::load(dir.join("omni-audio.safetensors"), &Device::Cpu)
        .expect("golden tensors");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("omni-audio.json")).expect("golden json"))
            .expect("json");
    (tensors, meta)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("a difference")
}

fn clip() -> Vec<f32> {
    let bytes = std::fs::read(fixtures_dir().join("media/chirp.wav")).expect("the clip");
    decode(bytes, Some("wav"), 60.0).expect("decodes")
}

#[test]
fn features_and_embeddings_match_the_reference() {
    let (golden, meta) = golden();
    let dir = model_dir("omni-audio");
    let cfg = ModelConfig::from_model_dir(&dir).expect("config");
    let ckpt = Checkpoint::load(&dir, &cfg, LoadFormat::Auto, 0).expect("checkpoint");
    let audio = AudioInput::load(&dir, &ckpt, DType::F32, &Device::Cpu)
        .expect("loads")
        .expect("an audio tower");
    let samples = clip();
    let mel = audio.features(&samples).expect("features");
    let want = &golden["mel"];
    let d = max_diff(&mel, want);
    eprintln!("mel: max |ours - reference| = {d:e}");
    assert!(d < 1e-4, "mel features differ by {d}");
    assert_eq!(
        mel.dim(1).expect("frames") as u64,
        meta["mel_frames"].as_u64().expect("frames")
    );

    let ids: Vec<u32> = vec![1, audio_token(&meta), 2];
    let (tokens, spans) = audio.expand(&ids, &[samples]).expect("expands");
    let n = meta["audio_tokens"].as_u64().expect("count") as usize;
    assert_eq!(tokens.len(), n + 2);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].start, 1);
    let d = max_diff(&spans[0].embeds, &golden["audio_embeds"]);
    eprintln!("audio embeddings: max |ours - reference| = {d:e}");
    assert!(d < 1e-4, "audio embeddings differ by {d}");
}

/// The placeholder id, from the fixture's prompt (the token repeated audio_tokens times).
fn audio_token(meta: &Value) -> u32 {
    let ids: Vec<u32> = serde_json::from_value(meta["token_ids"].clone()).expect("ids");
    let n = meta["audio_tokens"].as_u64().expect("count") as usize;
    *ids.windows(n)
        .find(|w| w.iter().all(|&t| t == w[0]))
        .and_then(|w| w.first())
        .expect("the placeholder run")
}

/// The fixture prompt with its placeholder run collapsed to one, as a client writes it.
fn collapsed_prompt(meta: &Value) -> String {
    let ids: Vec<u32> = serde_json::from_value(meta["token_ids"].clone()).expect("ids");
    let pad = audio_token(meta);
    let mut out: Vec<u32> = Vec::new();
    for t in ids {
        if t == pad && out.last() == Some(&pad) {
            continue;
        }
        out.push(t);
    }
    out.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn score(prefix: &[&str], meta: &Value) -> Vec<Vec<f32>> {
    let out = std::process::Command::new(bin("coordinator"))
        .args(prefix)
        .arg("score")
        .arg("--model")
        .arg(model_dir("omni-audio"))
        .args(["--token-ids", &collapsed_prompt(meta)])
        .arg("--audio")
        .arg(fixtures_dir().join("media/chirp.wav"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run coordinator score");
    assert!(
        out.status.success(),
        "score failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    serde_json::from_value(v["logits"].clone()).expect("logits")
}

#[test]
fn logits_of_a_text_and_audio_prompt_match_the_reference_and_the_cluster() {
    let (golden, meta) = golden();
    let ours = score(&[], &meta);
    let want: Vec<Vec<f32>> = golden["logits"].to_vec2().expect("rows");
    assert_eq!(ours.len(), want.len(), "prompt length after expansion");
    let max_logit = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let tol = 1e-4 * max_logit.max(1.0);
    let diff = ours
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("logits: max |ours - reference| = {diff:e} (tolerance {tol:e})");
    assert!(diff <= tol, "logits differ by {diff} > {tol}");
    let clustered = score(&["cluster", "--nodes", "3"], &meta);
    let bits =
        |rows: &[Vec<f32>]| -> Vec<u32> { rows.iter().flatten().map(|x| x.to_bits()).collect() };
    assert!(
        bits(&clustered) == bits(&ours),
        "a 3-node cluster changed the logits"
    );
}
