//! Media parts of chat messages: `input_audio` (base64 data and its format), vLLM's
//! `audio_url` and OpenAI's `image_url` with `data:` URLs, or `file://` URLs of files under the
//! server's `--allowed-local-media-path` (as vLLM's flag), checked and decoded here, each refusal
//! naming the part (`messages[0].content[1]`); the template sees a placeholder part in their
//! place. `http(s)` URLs are fetched only with `--allow-media-urls` (a server fetching what
//! clients name can be turned against the network it sits in), with a deadline and a size cap.
//! Video parts are not taken yet (they need a container decoder): each refusal is a 400 saying
//! so, never silently dropped.

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
    /// An `http(s)` URL, fetched (if allowed) when the media is decoded.
    Url(String),
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
    /// `http(s)` URLs are fetched (else refused).
    pub allow_urls: bool,
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
            allow_urls: false,
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
    if url.starts_with("http://") || url.starts_with("https://") {
        let format = url
            .rsplit_once('.')
            .map(|(_, ext)| ext.to_ascii_lowercase())
            .filter(|e| e.len() <= 4 && e.chars().all(|c| c.is_ascii_alphanumeric()));
        return Ok((format, Source::Url(url.to_string())));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(format!(
            "only data:, file:// and http(s):// URLs are accepted; send the {what} inline"
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

/// Largest local media file read, or media URL fetched.
const MAX_LOCAL_BYTES: u64 = 256 << 20;

/// How long fetching one media URL may take.
const URL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The body of `url` if fetching is allowed: status 200, at most [`MAX_LOCAL_BYTES`], within
/// [`URL_DEADLINE`]. Blocking: call it off the async runtime (validation runs on the blocking
/// pool).
fn fetch(url: &str, allowed: bool) -> Result<Vec<u8>, String> {
    use std::io::Read;
    if !allowed {
        return Err(
            "fetching http(s) media URLs is off on this server; start it with --allow-media-urls, or send the media inline"
                .into(),
        );
    }
    let client = reqwest::blocking::Client::builder()
        .timeout(URL_DEADLINE)
        .build()
        .map_err(|e| format!("cannot fetch {url}: {e}"))?;
    let resp = client
        .get(url)
        .send()
        .map_err(|e| format!("cannot fetch {url}: {e}"))?;
    if resp.status() != reqwest::StatusCode::OK {
        return Err(format!("fetching {url} answered {}", resp.status()));
    }
    let mut bytes = Vec::new();
    resp.take(MAX_LOCAL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot fetch {url}: {e}"))?;
    if bytes.len() as u64 > MAX_LOCAL_BYTES {
        return Err(format!("{url} is over {MAX_LOCAL_BYTES} bytes"));
    }
    Ok(bytes)
}

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
    let mut items = MediaItems::default();
    for m in media {
        let at = |e: MediaError| invalid(format!("{}: {e}", m.part));
        let bytes = match m.source {
            Source::Inline(bytes) => bytes,
            Source::File(path) => read_local(&path, limits.local_root.as_deref())
                .map_err(|e| invalid(format!("{}: {e}", m.part)))?,
            Source::Url(url) => {
                fetch(&url, limits.allow_urls).map_err(|e| invalid(format!("{}: {e}", m.part)))?
            }
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
