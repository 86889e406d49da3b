//! The cost of media in a prompt at Qwen3-Omni's real size, on this machine's CPU, in one run:
//! log-mel features and the audio tower (`Qwen3OmniMoeAudioEncoder` at the checkpoint's
//! dimensions: 32 layers of width 1280, 480-channel convolutions, 128 mel bins) for 10 s of audio
//! (130 embeddings); preprocessing and the vision tower (`Qwen3OmniMoeVisionEncoder`: 27 blocks
//! of width 1152, patch 16, three deepstack mergers) for a 448×448 image (196 embeddings); each
//! beside the text model's prefill of the same number of tokens at its real dimensions — 2 of
//! its 48 layers (with their 128 experts each) measured, the 48-layer time extrapolated per
//! layer. Random bf16 weights (`omnishard_model::synthetic::fill`, the bits
//! `coordinator synth` writes), the tower computing in f32 as the coordinator runs it on the
//! CPU, the text model in bf16; median of 3.
//!
//! Run: `cargo bench -p omnishard-tests --bench encoders` (about 1.9 GB of weights are written to a
//! temporary directory first).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use omnishard_coordinator::media::image::Rgb;
use omnishard_coordinator::media::image::{ImageProcessorConfig, RgbImage, preprocess_image};
use omnishard_coordinator::{ComputeDtype, Engine};
use omnishard_model::audio::{AudioEncoder, MelParams, log_mel};
use omnishard_model::synthetic::{Preset, WeightDtype, config_json, fill};
use omnishard_model::vision::VisionEncoder;
use omnishard_model::{Checkpoint, Weights};
use omnishard_proto::ModelConfig;
use omnishard_proto::omni::{AudioConfig, VisionConfig, audio_output_len};

const SECONDS: usize = 10;
const RUNS: usize = 3;

/// Qwen3-Omni-30B-A3B's `thinker_config.audio_config`.
fn real_audio_config() -> AudioConfig {
    serde_json::from_value(serde_json::json!({
        "num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120, "d_model": 1280, "n_window": 50, "n_window_infer": 800,
        "downsample_hidden_size": 480, "output_dim": 2048, "max_source_positions": 1500,
    }))
    .expect("a valid audio config")
}

/// The tower's tensors, by name under `thinker.audio_tower.`, with their shapes.
fn tower_shapes(c: &AudioConfig) -> Vec<(String, Vec<usize>)> {
    let (d, ds, ffn) = (c.d_model, c.downsample_hidden_size, c.encoder_ffn_dim);
    let mut t: Vec<(String, Vec<usize>)> = vec![
        ("conv2d1.weight".into(), vec![ds, 1, 3, 3]),
        ("conv2d2.weight".into(), vec![ds, ds, 3, 3]),
        ("conv2d3.weight".into(), vec![ds, ds, 3, 3]),
        (
            "conv_out.weight".into(),
            vec![d, ds * c.frequencies_after_cnn()],
        ),
        ("proj1.weight".into(), vec![d, d]),
        ("proj2.weight".into(), vec![c.output_dim, d]),
    ];
    for (name, n) in [
        ("conv2d1.bias", ds),
        ("conv2d2.bias", ds),
        ("conv2d3.bias", ds),
        ("proj1.bias", d),
        ("proj2.bias", c.output_dim),
        ("ln_post.weight", d),
        ("ln_post.bias", d),
    ] {
        t.push((name.into(), vec![n]));
    }
    for l in 0..c.encoder_layers {
        let p = format!("layers.{l}.");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.push((format!("{p}self_attn.{proj}.weight"), vec![d, d]));
            t.push((format!("{p}self_attn.{proj}.bias"), vec![d]));
        }
        for norm in ["self_attn_layer_norm", "final_layer_norm"] {
            t.push((format!("{p}{norm}.weight"), vec![d]));
            t.push((format!("{p}{norm}.bias"), vec![d]));
        }
        t.push((format!("{p}fc1.weight"), vec![ffn, d]));
        t.push((format!("{p}fc1.bias"), vec![ffn]));
        t.push((format!("{p}fc2.weight"), vec![d, ffn]));
        t.push((format!("{p}fc2.bias"), vec![d]));
    }
    t
}

/// `thinker.visual`'s tensors at Qwen3-Omni's dimensions, under `thinker.visual.`.
fn vision_shapes(c: &VisionConfig) -> Vec<(String, Vec<usize>)> {
    let (d, inter, wide) = (c.hidden_size, c.intermediate_size, c.hidden_size * 4);
    let p = c.patch_size;
    let mut t: Vec<(String, Vec<usize>)> = vec![
        (
            "patch_embed.proj.weight".into(),
            vec![d, 3, c.temporal_patch_size, p, p],
        ),
        ("patch_embed.proj.bias".into(), vec![d]),
        (
            "pos_embed.weight".into(),
            vec![c.num_position_embeddings, d],
        ),
    ];
    for l in 0..c.depth {
        let b = format!("blocks.{l}.");
        for (name, shape) in [
            ("norm1.weight", vec![d]),
            ("norm1.bias", vec![d]),
            ("norm2.weight", vec![d]),
            ("norm2.bias", vec![d]),
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.proj.weight", vec![d, d]),
            ("attn.proj.bias", vec![d]),
            ("mlp.linear_fc1.weight", vec![inter, d]),
            ("mlp.linear_fc1.bias", vec![inter]),
            ("mlp.linear_fc2.weight", vec![d, inter]),
            ("mlp.linear_fc2.bias", vec![d]),
        ] {
            t.push((format!("{b}{name}"), shape));
        }
    }
    let merger = |prefix: String, norm: usize, t: &mut Vec<(String, Vec<usize>)>| {
        for (name, shape) in [
            ("ln_q.weight", vec![norm]),
            ("ln_q.bias", vec![norm]),
            ("mlp.0.weight", vec![wide, wide]),
            ("mlp.0.bias", vec![wide]),
            ("mlp.2.weight", vec![c.out_hidden_size, wide]),
            ("mlp.2.bias", vec![c.out_hidden_size]),
        ] {
            t.push((format!("{prefix}{name}"), shape));
        }
    };
    merger("merger.".into(), d, &mut t);
    for i in 0..c.deepstack_visual_indexes.len() {
        merger(format!("merger_list.{i}."), wide, &mut t);
    }
    t
}

fn write_tower(dir: &std::path::Path, file: &str, module: &str, shapes: Vec<(String, Vec<usize>)>) {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let full = format!("thinker.{module}.{name}");
            let bytes = fill(7, &full, shape.iter().product(), WeightDtype::Bf16);
            (full, shape, bytes)
        })
        .collect();
    let views: HashMap<String, safetensors::tensor::TensorView<'_>> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                shape.clone(),
                bytes,
            )
            .expect("a tensor view");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(&views, None, &dir.join(file)).expect("write the tower");
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    let cfg = real_audio_config();
    let vision_cfg = VisionConfig {
        // The 30B-A3B thinker's hidden size.
        out_hidden_size: 2048,
        ..VisionConfig::default()
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    write_tower(
        dir.path(),
        "audio.safetensors",
        "audio_tower",
        tower_shapes(&cfg),
    );
    write_tower(
        dir.path(),
        "vision.safetensors",
        "visual",
        vision_shapes(&vision_cfg),
    );
    let weight_map: serde_json::Map<String, serde_json::Value> = tower_shapes(&cfg)
        .iter()
        .map(|(n, _)| {
            (
                format!("thinker.audio_tower.{n}"),
                "audio.safetensors".into(),
            )
        })
        .chain(
            vision_shapes(&vision_cfg)
                .iter()
                .map(|(n, _)| (format!("thinker.visual.{n}"), "vision.safetensors".into())),
        )
        .collect();
    let index = serde_json::json!({ "weight_map": weight_map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .expect("write the index");
    let ckpt = Checkpoint::open(dir.path()).expect("the tower's checkpoint");
    // As the coordinator loads it on the CPU: f32 (candle's CPU matmul has no bf16).
    let w = Weights::new(&ckpt, DType::F32, &Device::Cpu).pp("thinker.audio_tower");
    let tower = AudioEncoder::new(&cfg, w).expect("the tower");
    let samples: Vec<f32> = (0..SECONDS * 16_000)
        .map(|i| {
            let t = i as f32 / 16_000.0;
            0.3 * (2.0 * std::f32::consts::PI * (220.0 + 80.0 * t) * t).sin()
        })
        .collect();
    let params = MelParams::whisper(cfg.num_mel_bins);
    let (mut mel_times, mut tower_times) = (Vec::new(), Vec::new());
    let mut embeddings = 0;
    for _ in 0..RUNS {
        let started = Instant::now();
        let (mel, frames) = log_mel(&samples, &params).expect("features");
        mel_times.push(started.elapsed());
        let mel = candle_core::Tensor::from_vec(mel, (params.n_mels, frames), &Device::Cpu)
            .expect("a tensor");
        let started = Instant::now();
        let out = tower.forward(&mel).expect("encodes");
        tower_times.push(started.elapsed());
        embeddings = out.dim(0).expect("rows");
    }
    assert_eq!(embeddings, audio_output_len(SECONDS * 100));

    // The text model at its real dimensions, 2 layers, prefilling as many tokens.
    let layers = 2;
    let text = config_json(Preset::Qwen3Omni30bA3b, layers, 128).to_string();
    let text_cfg = ModelConfig::from_json(&text, std::path::Path::new("synth")).expect("config");
    let engine = Engine::load_local_from(
        &Checkpoint::dummy(&text_cfg, 0),
        &text_cfg,
        ComputeDtype::Bf16,
        &Device::Cpu,
    )
    .expect("the text model");
    let tokens: Vec<u32> = (0..embeddings as u32).map(|i| 1000 + i * 7).collect();
    let prefill = median(
        (0..RUNS)
            .map(|_| {
                let started = Instant::now();
                engine.score(&tokens, None).expect("prefill");
                started.elapsed()
            })
            .collect(),
    );
    // A 448x448 image: preprocessing and the vision tower.
    let vision = VisionEncoder::new(
        &vision_cfg,
        Weights::new(&ckpt, DType::F32, &Device::Cpu).pp("thinker.visual"),
    )
    .expect("the vision tower");
    let processor = ImageProcessorConfig::from_json(
        r#"{"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136,
            "max_pixels": 12845056, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}"#,
    )
    .expect("processor settings");
    let picture = RgbImage::from_fn(448, 448, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let (mut prep_times, mut vision_times) = (Vec::new(), Vec::new());
    let mut image_tokens = 0;
    for _ in 0..RUNS {
        let started = Instant::now();
        let patches = preprocess_image(&picture, &processor).expect("preprocesses");
        prep_times.push(started.elapsed());
        let pixels = patches.to_tensor(&Device::Cpu).expect("a tensor");
        let started = Instant::now();
        let out = vision
            .forward(&pixels, &[patches.grid_thw])
            .expect("encodes");
        vision_times.push(started.elapsed());
        image_tokens = out.embeds.dim(0).expect("rows");
    }
    let image_tokens_ids: Vec<u32> = (0..image_tokens as u32).map(|i| 1000 + i * 7).collect();
    let image_prefill = median(
        (0..RUNS)
            .map(|_| {
                let started = Instant::now();
                engine.score(&image_tokens_ids, None).expect("prefill");
                started.elapsed()
            })
            .collect(),
    );
    let (prep, vision_time) = (median(prep_times), median(vision_times));
    let image_per_layer = image_prefill.as_secs_f64() / layers as f64;
    println!("448x448 image -> {image_tokens} embeddings (tower f32, text bf16, 2 CPU threads):");
    println!(
        "  preprocessing           {:>8.1} ms",
        prep.as_secs_f64() * 1e3
    );
    println!(
        "  vision tower (27 blocks) {:>7.1} ms",
        vision_time.as_secs_f64() * 1e3
    );
    println!(
        "  text prefill of {image_tokens} tokens: {:.1} ms for {layers} layers; {:.1} ms for 48 layers",
        image_prefill.as_secs_f64() * 1e3,
        image_per_layer * 48.0 * 1e3
    );
    println!(
        "  image (preprocessing + tower) / 48-layer text prefill of the same tokens: {:.2}",
        (prep + vision_time).as_secs_f64() / (image_per_layer * 48.0)
    );
    let (mel, tower) = (median(mel_times), median(tower_times));
    let per_layer = prefill.as_secs_f64() / layers as f64;
    println!(
        "{SECONDS} s of audio -> {embeddings} embeddings (tower f32, text bf16, 2 CPU threads):"
    );
    println!(
        "  log-mel features      {:>8.1} ms",
        mel.as_secs_f64() * 1e3
    );
    println!(
        "  audio tower (32 layers) {:>6.1} ms",
        tower.as_secs_f64() * 1e3
    );
    println!(
        "  text prefill of {embeddings} tokens: {:.1} ms for {layers} layers; {:.1} ms for 48 layers (per-layer x 48, embeddings and lm_head counted in the 2)",
        prefill.as_secs_f64() * 1e3,
        per_layer * 48.0 * 1e3
    );
    println!(
        "  audio (features + tower) / 48-layer text prefill of the same tokens: {:.2}",
        (mel + tower).as_secs_f64() / (per_layer * 48.0)
    );
}
