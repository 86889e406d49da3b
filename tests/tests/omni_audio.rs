//! Audio through Qwen3-Omni's thinker, against transformers 4.57.3 on the committed fixture
//! (tests/fixtures/make_omni_fixtures.py): the WAV decoded, its log-mel features as
//! `WhisperFeatureExtractor` makes them, the audio tower's embeddings, and the logits of a text +
//! audio prompt with the placeholder expanded as the processor expands it — in-process and over
//! a cluster of expert-node processes, bit for bit the same.

use candle_core::{DType, Device};
use omnishard_coordinator::media::AudioInput;
use omnishard_coordinator::media::audio::decode;
use omnishard_coordinator::media::prompt::{MediaItems, expand};
use omnishard_model::{Checkpoint, LoadFormat};
use omnishard_proto::ModelConfig;
use omnishard_tests::omni::{assert_logits_close, bits, golden, max_diff, score_media};
use omnishard_tests::{fixtures_dir, model_dir};
use serde_json::Value;

fn clip() -> Vec<f32> {
    let bytes = std::fs::read(fixtures_dir().join("media/chirp.wav")).expect("the clip");
    decode(bytes, Some("wav"), 60.0).expect("decodes")
}

#[test]
fn features_and_embeddings_match_the_reference() {
    let (golden, meta) = golden("omni-audio");
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
    let items = MediaItems {
        audio: vec![samples],
        ..Default::default()
    };
    let expanded = expand(&ids, &items, Some(&audio), None).expect("expands");
    let (tokens, spans) = (expanded.tokens, expanded.spans);
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
fn collapsed_prompt(meta: &Value) -> Vec<u32> {
    let ids: Vec<u32> = serde_json::from_value(meta["token_ids"].clone()).expect("ids");
    let pad = audio_token(meta);
    let mut out: Vec<u32> = Vec::new();
    for t in ids {
        if t == pad && out.last() == Some(&pad) {
            continue;
        }
        out.push(t);
    }
    out
}

fn score(prefix: &[&str], meta: &Value) -> Vec<Vec<f32>> {
    let media = [
        "--audio".into(),
        fixtures_dir().join("media/chirp.wav").into(),
    ];
    score_media(prefix, &collapsed_prompt(meta), &media)
}

#[test]
fn logits_of_a_text_and_audio_prompt_match_the_reference_and_the_cluster() {
    let (golden, meta) = golden("omni-audio");
    let ours = score(&[], &meta);
    let want: Vec<Vec<f32>> = golden["logits"].to_vec2().expect("rows");
    assert_logits_close("logits", &ours, &want);
    let clustered = score(&["cluster", "--nodes", "3"], &meta);
    assert!(
        bits(&clustered) == bits(&ours),
        "a 3-node cluster changed the logits"
    );
}
