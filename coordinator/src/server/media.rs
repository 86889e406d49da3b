//! Media parts of chat messages: `input_audio` (base64 data and its format), vLLM's
//! `audio_url` and OpenAI's `image_url` with `data:` URLs, or `file://` URLs of files under the
//! server's `--allowed-local-media-path` (as vLLM's flag), checked and decoded here, each refusal
//! naming the part (`messages[0].content[1]`); the template sees a placeholder part in their
//! place. Fetching `http(s)` URLs is not built (vLLM's `--allow-media-urls`-style opt-in), and
//! video parts are not taken yet (they need a container decoder): each is a 400 saying so, never
//! silently dropped.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Value, json};

use super::types::ContentPart;
use super::validate::invalid;
use crate::error::GenerationError;
use crate::media::prompt::{Expanded, MediaItems, expand};
use crate::media::vision::VisionInput;
use crate::media::{AudioInput, MediaError, audio, image};

/// Audio formats `input_audio.format` may name (what the decoder reads).
const AUDIO_FORMATS: [&str; 5] = ["wav", "mp3", "flac", "ogg", "oga"];

/// What a media part holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MediaKind {
    Audio,
    Image,
}

/// Where a media item's bytes are.
pub(super) enum Source {
    Inline(Vec<u8>),
    /// A `file://` URL's path, read (if under the allowed directory) when the media is decoded.
    File(PathBuf),
}

/// One media item of a conversation, in prompt order.
pub(super) struct MediaRef {
    /// Where it was sent, for errors: `messages[i].content[j]`.
    pub part: String,
    pub kind: MediaKind,
    pub source: Source,
    /// The format, as a file extension (a decoding hint).
    pub format: Option<String>,
}

/// How many media items one prompt may carry, how long audio and how large images may be, and
/// where local files may be read from.
#[derive(Debug, Clone)]
pub struct MediaLimits {
    /// `file://` URLs are read only under this directory (canonical); none: not at all.
    pub local_root: Option<PathBuf>,
    pub audio_per_prompt: usize,
    pub images_per_prompt: usize,
    pub max_audio_seconds: f64,
    /// Pixels of a decoded image (before the processor resizes it).
    pub max_image_pixels: u64,
}

impl Default for MediaLimits {
    fn default() -> Self {
        Self {
            local_root: None,
            audio_per_prompt: 4,
            images_per_prompt: 4,
            max_audio_seconds: 600.0,
            max_image_pixels: 64 << 20,
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
            Ok(media(where_, MediaKind::Audio, Source::Inline(bytes), Some(format)))
        }
        "audio_url" | "image_url" => {
            let (url, kind, what) = if p.kind == "audio_url" {
                (p.audio_url, MediaKind::Audio, "audio")
            } else {
                (p._image_url, MediaKind::Image, "image")
            };
            let url = url
                .ok_or_else(|| bad(format!("a {0} part without `{0}`", p.kind)))?
                .url;
            let (format, source) = media_url(&url, what).map_err(bad)?;
            Ok(media(where_, kind, source, format))
        }
        "video_url" => Err(bad(
            "`video_url` parts are not supported yet (video containers are not decoded); send frames as images"
                .into(),
        )),
        other => Err(bad(format!(
            "content part type `{other}` is not one of text, input_audio, audio_url, image_url"
        ))),
    }
}

/// The template's placeholder part for a media item, and the item.
fn media(
    where_: &str,
    kind: MediaKind,
    source: Source,
    format: Option<String>,
) -> (Value, Option<MediaRef>) {
    let placeholder = match kind {
        MediaKind::Audio => json!({"type": "audio"}),
        MediaKind::Image => json!({"type": "image"}),
    };
    let item = MediaRef {
        part: where_.to_string(),
        kind,
        source,
        format,
    };
    (placeholder, Some(item))
}

/// Where a URL's media of `what` (audio, image) is — the bytes of a
/// `data:[<type>][;base64],<data>` URL, or a `file://` URL's path — and its format, guessed
/// from its media type or file extension.
fn media_url(url: &str, what: &str) -> Result<(Option<String>, Source), String> {
    if let Some(path) = url.strip_prefix("file://") {
        let path = PathBuf::from(path);
        let format = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        return Ok((format, Source::File(path)));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(format!(
            "only data: and file:// URLs are accepted (fetching http(s) URLs is not built); send the {what} inline"
        ));
    };
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| "a data: URL without a comma before its data".to_string())?;
    let Some(media_type) = meta.strip_suffix(";base64") else {
        return Err(format!(
            "only base64 data: URLs are accepted (`data:{what}/...;base64,...`)"
        ));
    };
    let format = media_type
        .strip_prefix(&format!("{what}/"))
        .map(|t| match t {
            "mpeg" => "mp3".to_string(),
            "x-wav" | "wave" => "wav".to_string(),
            other => other.to_string(),
        });
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("the data: URL is not base64: {e}"))?;
    Ok((format, Source::Inline(bytes)))
}

/// Largest local media file read.
const MAX_LOCAL_BYTES: u64 = 256 << 20;

/// The bytes of a local file, if it lies under `root` (both canonical: no `..` or link escapes).
fn read_local(path: &Path, root: Option<&Path>) -> Result<Vec<u8>, String> {
    let Some(root) = root else {
        return Err(
            "file:// URLs are off on this server; start it with --allowed-local-media-path DIR to read files under DIR"
                .into(),
        );
    };
    let real = path
        .canonicalize()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !real.starts_with(root) {
        return Err(format!(
            "{} is outside --allowed-local-media-path {}",
            path.display(),
            root.display()
        ));
    }
    let len = std::fs::metadata(&real)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if len > MAX_LOCAL_BYTES {
        return Err(format!(
            "{} is {len} bytes; at most {MAX_LOCAL_BYTES} are read",
            path.display()
        ));
    }
    std::fs::read(&real).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Decodes the conversation's media, runs their encoders, and expands each placeholder of
/// `prompt` to one token per embedding (with the mRoPE positions images make). Errors name the
/// part at fault.
pub(super) fn expand_media(
    audio: Option<&AudioInput>,
    vision: Option<&VisionInput>,
    limits: &MediaLimits,
    prompt: Vec<u32>,
    media: Vec<MediaRef>,
) -> Result<Expanded, GenerationError> {
    if media.is_empty() {
        return Ok(Expanded {
            tokens: prompt,
            spans: Vec::new(),
            positions: None,
            rope_delta: 0,
        });
    }
    let count = |k| media.iter().filter(|m| m.kind == k).count();
    for (kind, name, most, flag) in [
        (
            MediaKind::Audio,
            "audio clips",
            limits.audio_per_prompt,
            "audio",
        ),
        (
            MediaKind::Image,
            "images",
            limits.images_per_prompt,
            "image",
        ),
    ] {
        if count(kind) > most {
            return Err(invalid(format!(
                "{} {name} in one prompt; this server takes at most {most} (--limit-mm-per-prompt {flag}=N)",
                count(kind)
            )));
        }
    }
    let mut items = MediaItems {
        video_fps: 1.0,
        ..Default::default()
    };
    for m in media {
        let at = |e: MediaError| invalid(format!("{}: {e}", m.part));
        let bytes = match m.source {
            Source::Inline(bytes) => bytes,
            Source::File(path) => read_local(&path, limits.local_root.as_deref())
                .map_err(|e| invalid(format!("{}: {e}", m.part)))?,
        };
        match m.kind {
            MediaKind::Audio => {
                if audio.is_none() {
                    return Err(invalid(format!(
                        "{}: this model has no audio tower; send text only",
                        m.part
                    )));
                }
                let samples = audio::decode(bytes, m.format.as_deref(), limits.max_audio_seconds)
                    .map_err(at)?;
                items.audio.push(samples);
            }
            MediaKind::Image => {
                if vision.is_none() {
                    return Err(invalid(format!(
                        "{}: this model serves no images (no vision tower, or no preprocessor_config.json beside it)",
                        m.part
                    )));
                }
                items
                    .images
                    .push(image::decode(&bytes, limits.max_image_pixels).map_err(at)?);
            }
        }
    }
    expand(&prompt, &items, audio, vision).map_err(|e| invalid(e.to_string()))
}
