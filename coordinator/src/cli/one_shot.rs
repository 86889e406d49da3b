//! The one-shot commands: `generate` (text streamed to stdout, from a prompt or a chat message
//! with images and audio) and `score` (the logits of token ids, media expanded, as JSON).

use std::io::Write;
use std::path::{Path, PathBuf};

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use omnishard_coordinator::media::audio::decode as decode_audio;
use omnishard_coordinator::media::image;
use omnishard_coordinator::media::prompt::{MediaItems, expand};
use omnishard_coordinator::{
    DecodeStream, Positions, Sampler, SamplingParams, TextTokenizer,
    chat::{ChatPrompter, ChatTemplate, Conversation, ReasoningParser, ToolCallParser},
};

use crate::model_args::ModelArgs;

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The prompt text.
    #[arg(long, env = "OMNISHARD_PROMPT")]
    pub(crate) prompt: String,
    /// Send the prompt as a user message through the model's chat template, which opens the
    /// assistant's turn.
    #[arg(long, env = "OMNISHARD_CHAT")]
    pub(crate) chat: bool,
    /// Jinja chat template file for --chat, instead of the checkpoint's.
    #[arg(long, env = "OMNISHARD_CHAT_TEMPLATE", requires = "chat")]
    pub(crate) chat_template: Option<PathBuf>,
    /// Audio file (WAV, FLAC, MP3, Ogg Vorbis; any rate) placed before the prompt text in the
    /// user message, for a checkpoint with an audio tower (Qwen3-Omni); repeatable; needs --chat.
    #[arg(long, requires = "chat")]
    pub(crate) audio: Vec<PathBuf>,
    /// Image file (PNG, JPEG, WebP) placed before the audio and the prompt text in the user
    /// message, for a checkpoint with a vision tower; repeatable; needs --chat.
    #[arg(long, requires = "chat")]
    pub(crate) image: Vec<PathBuf>,
    /// Maximum number of tokens to generate.
    #[arg(long, env = "OMNISHARD_MAX_TOKENS", default_value_t = 64)]
    pub(crate) max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, env = "OMNISHARD_TEMPERATURE", default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, env = "OMNISHARD_TOP_P", default_value_t = 1.0)]
    pub(crate) top_p: f32,
    /// Keep only the K most likely tokens (no limit when absent).
    #[arg(long, env = "OMNISHARD_TOP_K")]
    pub(crate) top_k: Option<usize>,
    /// Repetition penalty (1 = none), as in Hugging Face generate.
    #[arg(long, env = "OMNISHARD_REPETITION_PENALTY", default_value_t = 1.0)]
    pub(crate) repetition_penalty: f32,
    /// Random seed; the same seed and settings give the same text.
    #[arg(long, env = "OMNISHARD_SEED", default_value_t = 0)]
    pub(crate) seed: u64,
}

#[derive(Args)]
pub(crate) struct ScoreArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Comma-separated input token ids, e.g. 1,2,3.
    #[arg(
        long,
        env = "OMNISHARD_TOKEN_IDS",
        value_delimiter = ',',
        required_unless_present = "messages",
        conflicts_with = "messages"
    )]
    pub(crate) token_ids: Vec<u32>,
    /// Instead of --token-ids: a JSON file of chat messages (an array, or `{"messages": [...]}`),
    /// rendered by the model's chat template with the generation prompt; content parts may be
    /// `{"type": "text", "text": ...}`, `{"type": "image", "image": PATH}`, `{"type": "audio",
    /// "audio": PATH}` or `{"type": "video", "video": [FRAME, ...]}` (paths relative to the file;
    /// with --use-audio-in-video a video part names its sound track, `"audio": PATH`).
    #[arg(long, conflicts_with_all = ["audio", "image", "video_frames", "position_ids"])]
    pub(crate) messages: Option<PathBuf>,
    /// JSON file with explicit mRoPE position ids [[t...],[h...],[w...]], one entry per token.
    /// Default: text positions 0..n on all three rows.
    #[arg(long, env = "OMNISHARD_POSITION_IDS")]
    pub(crate) position_ids: Option<PathBuf>,
    /// Audio file (WAV, FLAC, MP3, Ogg Vorbis; 16 kHz) for a Qwen3-Omni checkpoint, repeatable:
    /// the i-th `<|audio_pad|>` of --token-ids becomes clip i's audio-tower embeddings, one token
    /// each, as the reference processor expands it. Positions stay text positions 0..n.
    #[arg(long)]
    pub(crate) audio: Vec<PathBuf>,
    /// Image file (PNG, JPEG, WebP), repeatable: the i-th `<|image_pad|>` becomes image i's
    /// vision-tower embeddings (deepstack included), with the reference's mRoPE positions.
    #[arg(long)]
    pub(crate) image: Vec<PathBuf>,
    /// One video as its frames, comma-separated image files (all of one size) sampled at
    /// --video-fps: the prompt's `<|video_pad|>` becomes its embeddings.
    #[arg(long, value_delimiter = ',')]
    pub(crate) video_frames: Vec<PathBuf>,
    /// Frames per second of --video-frames.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) video_fps: f64,
    /// Each video carries its sound track: the next --audio clip in prompt order (the video's
    /// place counts), its tokens interleaved with the video's by time as the reference processor
    /// does with `use_audio_in_video`.
    #[arg(long)]
    pub(crate) use_audio_in_video: bool,
}

pub(crate) fn read_positions(path: &Path) -> anyhow::Result<Positions> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} must hold [[t...],[h...],[w...]] with non-negative integers",
            path.display()
        )
    })?;
    let Ok(rows) = <[Vec<u32>; 3]>::try_from(rows) else {
        bail!("{} must hold exactly three rows (t, h, w)", path.display());
    };
    Ok(Positions { rows })
}

pub(crate) fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let engine = args.model.load()?;
    let model_dir = args.model.model_dir()?;
    let tokenizer = TextTokenizer::load(&model_dir, engine.config())?;
    let prompt = if args.chat {
        let template = ChatTemplate::load(&model_dir, args.chat_template.as_deref())?;
        let content = if args.audio.is_empty() && args.image.is_empty() {
            serde_json::json!(args.prompt)
        } else {
            let mut parts: Vec<serde_json::Value> = args
                .image
                .iter()
                .map(|_| serde_json::json!({"type": "image"}))
                .chain(
                    args.audio
                        .iter()
                        .map(|_| serde_json::json!({"type": "audio"})),
                )
                .collect();
            parts.push(serde_json::json!({"type": "text", "text": args.prompt}));
            serde_json::Value::Array(parts)
        };
        let conv = Conversation {
            messages: vec![serde_json::json!({"role": "user", "content": content})],
            add_generation_prompt: true,
            ..Default::default()
        };
        // The operator's own prompt: special tokens in it act as written.
        let prompter = ChatPrompter::new(
            template,
            &tokenizer,
            ReasoningParser::None,
            ToolCallParser::None,
        );
        prompter.encode(&tokenizer, conv, true, usize::MAX)?.ids
    } else {
        tokenizer.encode(&args.prompt)?
    };
    let mut sampler = Sampler::new(params);
    let mut stream = DecodeStream::default();
    let mut stdout = std::io::stdout().lock();
    let mut first_token_at = None;
    let mut failed = None;
    let start = Instant::now();
    let items = MediaItems {
        audio: read_clips(&args.audio)?,
        images: args
            .image
            .iter()
            .map(read_image)
            .collect::<anyhow::Result<_>>()?,
        ..Default::default()
    };
    let prompt = expand(&prompt, &items, engine.audio(), engine.vision())?;
    let tokens = engine.generate_media(
        &prompt,
        args.max_tokens,
        &mut sampler,
        tokenizer.stop_tokens(),
        |t| {
            first_token_at.get_or_insert_with(Instant::now);
            match stream.push(&tokenizer, t) {
                Ok(Some(piece)) => {
                    let ok = stdout
                        .write_all(piece.as_bytes())
                        .and_then(|_| stdout.flush());
                    ok.is_ok()
                }
                Ok(None) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    stdout.write_all(stream.finish(&tokenizer)?.as_bytes())?;
    writeln!(stdout)?;
    let total = start.elapsed().as_secs_f64();
    let prefill = first_token_at
        .map(|t| t.duration_since(start).as_secs_f64())
        .unwrap_or(total);
    let decode_tokens = tokens.len().saturating_sub(1);
    let decode_rate = if total > prefill {
        decode_tokens as f64 / (total - prefill)
    } else {
        0.0
    };
    eprintln!(
        "{} prompt tokens in {prefill:.3} s; {} tokens generated in {total:.3} s ({decode_rate:.1} tokens/s decoding)",
        prompt.tokens.len(),
        tokens.len()
    );
    Ok(())
}

pub(crate) fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let positions = args
        .position_ids
        .as_deref()
        .map(read_positions)
        .transpose()?;
    if !(args.video_fps.is_finite() && args.video_fps > 0.0) {
        bail!("--video-fps must be a positive number of frames per second");
    }
    let engine = args.model.load()?;
    if let Some(path) = &args.messages {
        let (tokens, items) = messages_prompt(
            &args.model,
            &engine,
            path,
            args.video_fps,
            args.use_audio_in_video,
        )?;
        let e = expand(&tokens, &items, engine.audio(), engine.vision())?;
        let logits = engine.score_media(&e.tokens, e.positions, &e.spans)?;
        return print_logits(&logits);
    }
    let media = !(args.audio.is_empty() && args.image.is_empty() && args.video_frames.is_empty());
    let logits = if !media {
        engine.score(&args.token_ids, positions)?
    } else {
        if positions.is_some() {
            bail!(
                "--position-ids with media: the expanded prompt's positions come from its media; drop --position-ids"
            );
        }
        let items = MediaItems {
            audio: read_clips(&args.audio)?,
            images: args
                .image
                .iter()
                .map(read_image)
                .collect::<anyhow::Result<_>>()?,
            videos: if args.video_frames.is_empty() {
                Vec::new()
            } else {
                vec![
                    args.video_frames
                        .iter()
                        .map(read_image)
                        .collect::<anyhow::Result<_>>()?,
                ]
            },
            video_fps: args.video_fps,
            use_audio_in_video: args.use_audio_in_video,
        };
        let e = expand(&args.token_ids, &items, engine.audio(), engine.vision())?;
        engine.score_media(&e.tokens, e.positions, &e.spans)?
    };
    print_logits(&logits)
}

fn print_logits(logits: &[Vec<f32>]) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer(&mut out, &serde_json::json!({ "logits": logits }))?;
    writeln!(out)?;
    Ok(())
}

/// The prompt of a messages file through the chat template (media parts as the template's
/// placeholders), and its media, read from the files the parts name.
fn messages_prompt(
    model: &ModelArgs,
    engine: &omnishard_coordinator::Engine,
    path: &Path,
    video_fps: f64,
    use_audio_in_video: bool,
) -> anyhow::Result<(Vec<u32>, MediaItems)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let mut messages = match value {
        serde_json::Value::Array(m) => m,
        serde_json::Value::Object(mut o) => match o.remove("messages") {
            Some(serde_json::Value::Array(m)) => m,
            _ => bail!(
                "{}: expected an array of messages or {{\"messages\": [...]}}",
                path.display()
            ),
        },
        _ => bail!("{}: expected an array of messages", path.display()),
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let mut items = MediaItems {
        video_fps,
        use_audio_in_video,
        ..Default::default()
    };
    for (i, message) in messages.iter_mut().enumerate() {
        let Some(parts) = message.get_mut("content").and_then(|c| c.as_array_mut()) else {
            continue;
        };
        for (j, part) in parts.iter_mut().enumerate() {
            let at = || format!("messages[{i}].content[{j}]");
            let kind = part["type"].as_str().unwrap_or_default().to_string();
            let file = |key: &str| -> anyhow::Result<PathBuf> {
                let p = part[key]
                    .as_str()
                    .ok_or_else(|| anyhow::anyhow!("{}: a {kind} part without `{key}`", at()))?;
                Ok(base.join(p))
            };
            match kind.as_str() {
                "text" => continue,
                "image" => items.images.push(read_image(&file("image")?)?),
                "audio" => items.audio.extend(read_clips(&[file("audio")?])?),
                "video" => {
                    let frames = part["video"]
                        .as_array()
                        .ok_or_else(|| {
                            anyhow::anyhow!("{}: `video` is a list of frame files", at())
                        })?
                        .iter()
                        .map(|f| {
                            let f = f.as_str().ok_or_else(|| {
                                anyhow::anyhow!("{}: frames are file paths", at())
                            })?;
                            read_image(&base.join(f))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    items.videos.push(frames);
                    // Its sound track takes the next clip, as the processor pairs them.
                    match (use_audio_in_video, part.get("audio").is_some()) {
                        (true, true) => items.audio.extend(read_clips(&[file("audio")?])?),
                        (true, false) => bail!(
                            "{}: with --use-audio-in-video a video part names its sound track (`\"audio\": PATH`)",
                            at()
                        ),
                        (false, true) => bail!(
                            "{}: a video part with `audio` needs --use-audio-in-video",
                            at()
                        ),
                        (false, false) => {}
                    }
                }
                other => bail!(
                    "{}: part type `{other}` is not text, image, audio or video",
                    at()
                ),
            }
            // The template sees the placeholder, not the path.
            *part = serde_json::json!({ "type": kind });
        }
    }
    let model_dir = model.model_dir()?;
    let tokenizer = TextTokenizer::load(&model_dir, engine.config())?;
    let template = ChatTemplate::load(&model_dir, None)?;
    let prompter = ChatPrompter::new(
        template,
        &tokenizer,
        ReasoningParser::None,
        ToolCallParser::None,
    );
    let conv = Conversation {
        messages,
        add_generation_prompt: true,
        ..Default::default()
    };
    Ok((
        prompter.encode(&tokenizer, conv, true, usize::MAX)?.ids,
        items,
    ))
}

/// Largest decoded image accepted on the command line, in pixels.
pub(crate) const MAX_IMAGE_PIXELS: u64 = 64 << 20;

pub(crate) fn read_image(path: &PathBuf) -> anyhow::Result<image::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    image::decode(&bytes, MAX_IMAGE_PIXELS).with_context(|| path.display().to_string())
}

/// The audio files' samples, mono at 16 kHz.
pub(crate) fn read_clips(paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<f32>>> {
    paths
        .iter()
        .map(|path| {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let ext = path.extension().and_then(|e| e.to_str());
            decode_audio(bytes, ext, 3600.0).with_context(|| path.display().to_string())
        })
        .collect()
}
