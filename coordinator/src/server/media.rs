//! Media parts of chat messages: `input_audio` (base64 data and its format) and vLLM's
//! `audio_url` with a `data:` URL, checked and decoded here, each refusal naming the part
//! (`messages[0].content[1]`); the template sees a placeholder part in their place. Fetching
//! `http(s)` URLs and reading local files are off (vLLM's `--allow-media-urls`-style opt-ins are
//! not built yet), and images and video need the vision tower, which is not wired in yet: each
//! is a 400 saying so, never silently dropped.

use base64::Engine as _;
use serde_json::{Value, json};

use super::types::ContentPart;
use super::validate::invalid;
use crate::error::GenerationError;
use crate::media::{AudioInput, audio};
use omnishard_model::MediaSpan;

/// Audio formats `input_audio.format` may name (what the decoder reads).
const AUDIO_FORMATS: [&str; 5] = ["wav", "mp3", "flac", "ogg", "oga"];

/// One media item of a conversation, in prompt order.
pub(super) struct MediaRef {
    /// Where it was sent, for errors: `messages[i].content[j]`.
    pub part: String,
    pub bytes: Vec<u8>,
    /// The format, as a file extension (a decoding hint).
    pub format: Option<String>,
}

/// How many media items one prompt may carry, and how long audio may be.
#[derive(Debug, Clone, Copy)]
pub struct MediaLimits {
    pub audio_per_prompt: usize,
    pub max_audio_seconds: f64,
}

impl Default for MediaLimits {
    fn default() -> Self {
        Self {
            audio_per_prompt: 4,
            max_audio_seconds: 600.0,
        }
    }
}

/// The template's part for `p` and the media it carries (none for text).
pub(super) fn part(
    where_: &str,
    p: ContentPart,
) -> Result<(Value, Option<MediaRef>), GenerationError> {
    let bad = |why: String| invalid(format!("{where_}: {why}"));
    match p.kind.as_str() {
        "text" => {
            let text = p
                .text
                .ok_or_else(|| bad("a text part without `text`".into()))?;
            Ok((json!({"type": "text", "text": text}), None))
        }
        "input_audio" => {
            let a = p
                .input_audio
                .ok_or_else(|| bad("an input_audio part without `input_audio`".into()))?;
            let format = a.format.to_ascii_lowercase();
            if !AUDIO_FORMATS.contains(&format.as_str()) {
                return Err(bad(format!(
                    "input_audio.format `{}` is not one of {}",
                    a.format,
                    AUDIO_FORMATS.join(", ")
                )));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(a.data.trim())
                .map_err(|e| bad(format!("input_audio.data is not base64: {e}")))?;
            Ok((
                json!({"type": "audio"}),
                Some(MediaRef {
                    part: where_.to_string(),
                    bytes,
                    format: Some(format),
                }),
            ))
        }
        "audio_url" => {
            let url = p
                .audio_url
                .ok_or_else(|| bad("an audio_url part without `audio_url`".into()))?
                .url;
            let (format, bytes) = data_url(&url).map_err(bad)?;
            Ok((
                json!({"type": "audio"}),
                Some(MediaRef {
                    part: where_.to_string(),
                    bytes,
                    format,
                }),
            ))
        }
        "image_url" | "video_url" => Err(bad(format!(
            "`{}` parts are not supported yet (this server reads text and audio); send the text, or audio as input_audio",
            p.kind
        ))),
        other => Err(bad(format!(
            "content part type `{other}` is not one of text, input_audio, audio_url"
        ))),
    }
}

/// The bytes of a `data:[<type>][;base64],<data>` URL and a format guessed from its media type.
fn data_url(url: &str) -> Result<(Option<String>, Vec<u8>), String> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(
            "only data: URLs are accepted (fetching http(s) URLs and reading local files are off on this server); send the audio inline".into(),
        );
    };
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| "a data: URL without a comma before its data".to_string())?;
    let Some(media_type) = meta.strip_suffix(";base64") else {
        return Err("only base64 data: URLs are accepted (`data:audio/wav;base64,...`)".into());
    };
    let format = media_type.strip_prefix("audio/").map(|t| match t {
        "mpeg" => "mp3".to_string(),
        "x-wav" | "wave" => "wav".to_string(),
        other => other.to_string(),
    });
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("the data: URL is not base64: {e}"))?;
    Ok((format, bytes))
}

/// Decodes the conversation's audio, runs the audio tower, and expands each `<|audio_pad|>`
/// of `prompt` to one token per embedding. Errors name the part at fault.
pub(super) fn expand_audio(
    audio: Option<&AudioInput>,
    limits: &MediaLimits,
    prompt: Vec<u32>,
    media: Vec<MediaRef>,
) -> Result<(Vec<u32>, Vec<MediaSpan>), GenerationError> {
    if media.is_empty() {
        return Ok((prompt, Vec::new()));
    }
    let Some(audio) = audio else {
        return Err(invalid(format!(
            "{}: this model has no audio tower; send text only",
            media[0].part
        )));
    };
    if media.len() > limits.audio_per_prompt {
        return Err(invalid(format!(
            "{} audio clips in one prompt; this server takes at most {} (--limit-mm-per-prompt audio=N)",
            media.len(),
            limits.audio_per_prompt
        )));
    }
    let mut clips = Vec::with_capacity(media.len());
    for m in media {
        let samples = audio::decode(m.bytes, m.format.as_deref(), limits.max_audio_seconds)
            .map_err(|e| invalid(format!("{}: {e}", m.part)))?;
        clips.push(samples);
    }
    audio
        .expand(&prompt, &clips)
        .map_err(|e| invalid(e.to_string()))
}
