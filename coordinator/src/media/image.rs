//! Images (and video frames) for Qwen3-Omni's thinker, prepared as transformers 4.57.3 prepares
//! them. The checkpoint's `preprocessor_config.json` names `Qwen2VLImageProcessor`, which
//! `AutoImageProcessor` loads as `Qwen2VLImageProcessorFast` whenever torchvision is installed
//! (`FORCE_FAST_IMAGE_PROCESSOR`), so that one is matched; videos go through
//! `Qwen2VLVideoProcessor`, the same steps per frame:
//! 1. decode (PNG, JPEG, WebP) to 8-bit RGB as `PIL.Image.convert("RGB")` does: alpha dropped (not
//!    composited), grey replicated;
//! 2. [`smart_resize`]: both sides multiples of `patch_size × merge_size`, the area within
//!    `[min_pixels, max_pixels]`, the aspect ratio kept;
//! 3. resize with torchvision's antialiased bicubic on uint8 ([`super::resize`], bit-exact);
//! 4. rescale by `rescale_factor` and normalise by the mean and std, fused as the processor fuses
//!    them: `(x − 255·mean) / (255·std)` in f32;
//! 5. cut into patches (`pixel_values`): one row of `3 × temporal_patch × patch × patch` values
//!    (channel, then frame, then pixel row and column) per patch, patches ordered by frame pair,
//!    then merge window (row-major), then position inside the window — the order the vision
//!    tower's patch merger expects; a single image is repeated to fill the temporal patch, a video
//!    whose frame count is not a multiple of it repeats its last frame.
//!
//! Decoders: PNG and WebP (lossless and lossy) decode to the same pixels as PIL's; JPEG is
//! zune-jpeg's, which differs from PIL's libjpeg-turbo by up to 4 levels on some pixels (its IDCT
//! and chroma upsampling), so a JPEG's pixel values are close to the reference's, not equal.
//! 16-bit PNGs are scaled to 8 bits (PIL truncates RGB to the high byte and clips grey).

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{ImageReader, Limits};
use serde::Deserialize;

use super::MediaError;
use super::resize::resize_bicubic;

/// A decoded picture: 8-bit RGB, row-major.
pub use image::{Rgb, RgbImage};

/// `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`: `Qwen2VLImageProcessor`'s defaults, written as
/// transformers writes them (torch rounds them to f32 as Rust does).
#[allow(clippy::excessive_precision)]
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// The image processor's settings: `preprocessor_config.json`'s image keys, with
/// `Qwen2VLImageProcessorFast`'s defaults for absent ones.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    /// `size["shortest_edge"]`: the least area after resizing.
    pub min_pixels: usize,
    /// `size["longest_edge"]`: the largest area after resizing.
    pub max_pixels: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self {
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
        }
    }
}

#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
}

/// The keys read from `preprocessor_config.json`; the others (the feature extractor's) are left.
#[derive(Deserialize)]
struct RawConfig {
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    size: Option<RawSize>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    rescale_factor: Option<f64>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
}

impl ImageProcessorConfig {
    /// Reads `DIR/preprocessor_config.json`; the defaults when the file is absent.
    pub fn from_model_dir(dir: &Path) -> Result<Self, MediaError> {
        let path = dir.join("preprocessor_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_json(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(MediaError::Unsupported(format!("{}: {e}", path.display()))),
        }
    }

    /// `min_pixels` / `max_pixels` win over `size`, as in the processor's `__init__`.
    pub fn from_json(text: &str) -> Result<Self, MediaError> {
        let bad = |why: String| MediaError::Unsupported(format!("preprocessor_config.json: {why}"));
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let d = Self::default();
        let size = raw.size.as_ref();
        let cfg = Self {
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            min_pixels: raw
                .min_pixels
                .or(size.and_then(|s| s.shortest_edge))
                .unwrap_or(d.min_pixels),
            max_pixels: raw
                .max_pixels
                .or(size.and_then(|s| s.longest_edge))
                .unwrap_or(d.max_pixels),
            image_mean: raw.image_mean.unwrap_or(d.image_mean),
            image_std: raw.image_std.unwrap_or(d.image_std),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_resize: raw.do_resize.unwrap_or(true),
            do_rescale: raw.do_rescale.unwrap_or(true),
            do_normalize: raw.do_normalize.unwrap_or(true),
        };
        if cfg.patch_size == 0 || cfg.merge_size == 0 || cfg.temporal_patch_size == 0 {
            return Err(bad(
                "patch_size, merge_size and temporal_patch_size must be positive".into(),
            ));
        }
        if cfg.min_pixels > cfg.max_pixels {
            return Err(bad(format!(
                "min_pixels {} exceeds max_pixels {}",
                cfg.min_pixels, cfg.max_pixels
            )));
        }
        if cfg.image_std.contains(&0.0) || cfg.rescale_factor == 0.0 {
            return Err(bad("image_std and rescale_factor must be non-zero".into()));
        }
        Ok(cfg)
    }

    /// Side lengths are multiples of this.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values in one row of `pixel_values`.
    pub fn patch_len(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// Decodes an image file's bytes (PNG, JPEG or WebP, told by their content) to 8-bit RGB,
/// refusing pictures of more than `max_pixels` pixels before decoding them.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, MediaError> {
    let undecodable = |e: image::ImageError| MediaError::Undecodable(format!("image: {e}"));
    let reader = || {
        let reader = ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| MediaError::Undecodable(format!("image: {e}")))?;
        if reader.format().is_none() {
            return Err(MediaError::Undecodable(
                "image: not a PNG, JPEG or WebP file".into(),
            ));
        }
        Ok(reader)
    };
    let (w, h) = reader()?.into_dimensions().map_err(undecodable)?;
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(MediaError::TooLarge(format!(
            "a {w}×{h} image has more than {max_pixels} pixels"
        )));
    }
    let mut limits = Limits::default();
    // The decoded picture at up to 16 bits per channel with alpha, and the decoder's own room.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    let mut reader = reader()?;
    reader.limits(limits);
    Ok(reader.decode().map_err(undecodable)?.to_rgb8())
}

/// `smart_resize` of transformers' `qwen2_vl/image_processing_qwen2_vl.py`: the `(height,
/// width)` an image of `height × width` is resized to. Python's `round` rounds half to even.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), MediaError> {
    if height == 0 || width == 0 {
        return Err(MediaError::Undecodable("image: it has no pixels".into()));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(MediaError::Unsupported(format!(
            "image: absolute aspect ratio must be smaller than 200, got {ratio}"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() as usize * factor;
    let mut w_bar = (w / f).round_ties_even() as usize * factor;
    if h_bar * w_bar > max_pixels {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as usize * factor);
        w_bar = factor.max((w / beta / f).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    if h_bar == 0 || w_bar == 0 {
        return Err(MediaError::Unsupported(format!(
            "image: {width}×{height} resizes to nothing (min_pixels {min_pixels})"
        )));
    }
    Ok((h_bar, w_bar))
}

/// The processor's output for one image or video: `pixel_values` (`pixel_values_videos`) and
/// its `image_grid_thw` (`video_grid_thw`).
#[derive(Debug, Clone, PartialEq)]
pub struct PixelPatches {
    /// `[patches, row_len]`, row-major.
    pub values: Vec<f32>,
    pub row_len: usize,
    /// Temporal patches, patch rows, patch columns.
    pub grid_thw: [usize; 3],
}

impl PixelPatches {
    pub fn patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Embeddings the vision tower makes of it: placeholder tokens in the prompt.
    pub fn tokens(&self, merge_size: usize) -> usize {
        self.patches() / (merge_size * merge_size)
    }

    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.values, (self.patches(), self.row_len), device)
    }
}

/// One image's `pixel_values` and grid.
pub fn preprocess_image(
    image: &RgbImage,
    cfg: &ImageProcessorConfig,
) -> Result<PixelPatches, MediaError> {
    preprocess_frames(std::slice::from_ref(image), cfg)
}

/// A video's frames (all of one size) to `pixel_values_videos` and its grid; one frame is an
/// image.
pub fn preprocess_frames(
    frames: &[RgbImage],
    cfg: &ImageProcessorConfig,
) -> Result<PixelPatches, MediaError> {
    let first = frames
        .first()
        .ok_or_else(|| MediaError::Unsupported("a video needs at least one frame".into()))?;
    let (w0, h0) = first.dimensions();
    if let Some(f) = frames.iter().find(|f| f.dimensions() != (w0, h0)) {
        return Err(MediaError::Unsupported(format!(
            "video frames differ in size: {w0}×{h0} and {}×{}",
            f.width(),
            f.height()
        )));
    }
    let (h, w) = if cfg.do_resize {
        smart_resize(
            h0 as usize,
            w0 as usize,
            cfg.factor(),
            cfg.min_pixels,
            cfg.max_pixels,
        )?
    } else {
        (h0 as usize, w0 as usize)
    };
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    if h % (p * m) != 0 || w % (p * m) != 0 {
        return Err(MediaError::Unsupported(format!(
            "a {w}×{h} picture is not a whole number of {}-pixel merge windows",
            p * m
        )));
    }
    let resized: Vec<RgbImage> = frames
        .iter()
        .map(|f| {
            if (w as u32, h as u32) == f.dimensions() {
                f.clone()
            } else {
                resize_bicubic(f, w as u32, h as u32)
            }
        })
        .collect();
    let normalized: Vec<Vec<f32>> = resized.iter().map(|f| normalize(f, cfg)).collect();
    // Frames padded with the last one to a whole number of temporal patches.
    let t_frames = normalized.len().div_ceil(tp) * tp;
    let frame = |i: usize| &normalized[i.min(normalized.len() - 1)];
    let (gt, gh, gw) = (t_frames / tp, h / p, w / p);
    let row_len = 3 * tp * p * p;
    let mut values = Vec::with_capacity(gt * gh * gw * row_len);
    for t in 0..gt {
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            for tt in 0..tp {
                                let f = frame(t * tp + tt);
                                for y in y0..y0 + p {
                                    let line = &f[c * h * w + y * w..c * h * w + y * w + w];
                                    values.extend_from_slice(&line[x0..x0 + p]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(PixelPatches {
        values,
        row_len,
        grid_thw: [gt, gh, gw],
    })
}

/// Channel-first f32 values of `image` after `rescale_and_normalize`: with both steps on, the
/// processor folds the rescale into the mean and std (`mean / rescale_factor`, in f32) and
/// computes `(x − mean′) / std′`.
fn normalize(image: &RgbImage, cfg: &ImageProcessorConfig) -> Vec<f32> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let inv = (1.0 / cfg.rescale_factor) as f32;
    let rescale = cfg.rescale_factor as f32;
    let mut out = vec![0f32; 3 * h * w];
    for c in 0..3 {
        let (mean, std) = match (cfg.do_rescale, cfg.do_normalize) {
            (true, true) => (cfg.image_mean[c] * inv, cfg.image_std[c] * inv),
            (_, true) => (cfg.image_mean[c], cfg.image_std[c]),
            _ => (0.0, 1.0),
        };
        let plane = &mut out[c * h * w..(c + 1) * h * w];
        for (o, px) in plane.iter_mut().zip(image.pixels()) {
            let x = f32::from(px.0[c]);
            *o = match (cfg.do_rescale, cfg.do_normalize) {
                (_, true) => (x - mean) / std,
                (true, false) => x * rescale,
                (false, false) => x,
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_follows_the_reference() {
        // Values from transformers' smart_resize.
        assert_eq!(smart_resize(53, 75, 8, 1024, 4096).ok(), Some((56, 72)));
        assert_eq!(smart_resize(120, 160, 8, 1024, 4096).ok(), Some((48, 72)));
        assert_eq!(smart_resize(13, 21, 8, 1024, 4096).ok(), Some((32, 48)));
        // round(6.5) = 6 in Python.
        assert_eq!(smart_resize(52, 52, 8, 16, 1 << 20).ok(), Some((48, 48)));
        assert_eq!(
            smart_resize(1080, 1920, 32, 3136, 12_845_056).ok(),
            Some((1088, 1920))
        );
        assert!(smart_resize(1, 300, 8, 16, 4096).is_err());
        // Video frames of the real checkpoint (patch 16, merge 2) under the processor's video
        // bounds of 128 × 32² and 768 × 32² pixels.
        let (lo, hi) = (
            crate::media::vision::VIDEO_MIN_PIXELS,
            crate::media::vision::VIDEO_MAX_PIXELS,
        );
        assert_eq!(smart_resize(360, 640, 32, lo, hi).ok(), Some((352, 640)));
        assert_eq!(smart_resize(1080, 1920, 32, lo, hi).ok(), Some((640, 1152)));
        assert_eq!(smart_resize(120, 160, 32, lo, hi).ok(), Some((320, 448)));
    }

    #[test]
    fn config_reads_min_max_pixels_over_size() {
        let cfg = ImageProcessorConfig::from_json(
            r#"{"patch_size": 16, "min_pixels": 3136, "max_pixels": 12845056,
                "size": {"shortest_edge": 1, "longest_edge": 2},
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}"#,
        )
        .expect("parses");
        assert_eq!(
            (cfg.min_pixels, cfg.max_pixels, cfg.factor()),
            (3136, 12_845_056, 32)
        );
        let cfg =
            ImageProcessorConfig::from_json(r#"{"size": {"shortest_edge": 7, "longest_edge": 9}}"#)
                .expect("parses");
        assert_eq!(
            (cfg.min_pixels, cfg.max_pixels, cfg.image_mean),
            (7, 9, CLIP_MEAN)
        );
    }

    #[test]
    fn patches_are_ordered_by_merge_window_with_the_image_repeated_in_time() {
        let cfg = ImageProcessorConfig {
            patch_size: 1,
            merge_size: 2,
            min_pixels: 1,
            max_pixels: 1 << 20,
            do_normalize: false,
            do_rescale: false,
            ..ImageProcessorConfig::default()
        };
        // 4×2 (w×h): pixel value = 10 * y + x in every channel.
        let img = RgbImage::from_fn(4, 2, |x, y| image::Rgb([(10 * y + x) as u8; 3]));
        let p = preprocess_image(&img, &cfg).expect("patches");
        assert_eq!(p.grid_thw, [1, 2, 4]);
        assert_eq!(p.row_len, 3 * 2);
        let firsts: Vec<f32> = p.values.chunks(p.row_len).map(|r| r[0]).collect();
        assert_eq!(firsts, [0.0, 1.0, 10.0, 11.0, 2.0, 3.0, 12.0, 13.0]);
        // Each row: channel-major, the two (identical) frames of the temporal patch.
        assert!(
            p.values
                .chunks(p.row_len)
                .all(|r| r.iter().all(|&v| v == r[0]))
        );
        assert_eq!(p.tokens(2), 2);
    }
}
