//! Audio files to 16 kHz mono samples, as the reference pipeline feeds `WhisperFeatureExtractor`
//! (librosa loads mono: the mean of the channels). Decoding is symphonia's (pure Rust: WAV/PCM,
//! FLAC, MP3, Ogg Vorbis), probed from the bytes, with the file name's extension as a hint.

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::DecoderOptions;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::MediaError;

/// The feature extractor's sampling rate.
pub const SAMPLE_RATE: u32 = 16_000;

/// Decodes `bytes` (of a file named with `extension`, if known) to mono samples at
/// [`SAMPLE_RATE`], at most `max_seconds` long.
pub fn decode(
    bytes: Vec<u8>,
    extension: Option<&str>,
    max_seconds: f64,
) -> Result<Vec<f32>, MediaError> {
    let undecodable = |e: SymphoniaError| MediaError::Undecodable(format!("audio: {e}"));
    let stream = MediaSourceStream::new(Box::new(std::io::Cursor::new(bytes)), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = extension {
        hint.with_extension(ext);
    }
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            stream,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(undecodable)?;
    let mut format = probed.format;
    let track = format
        .default_track()
        .ok_or_else(|| MediaError::Undecodable("audio: the file has no audio track".into()))?;
    let (track_id, params) = (track.id, track.codec_params.clone());
    let rate = params
        .sample_rate
        .ok_or_else(|| MediaError::Undecodable("audio: the track has no sample rate".into()))?;
    if rate != SAMPLE_RATE {
        return Err(MediaError::Unsupported(format!(
            "audio at {rate} Hz: resample it to {SAMPLE_RATE} Hz (resampling here is not implemented yet)"
        )));
    }
    let max_samples = (max_seconds * f64::from(SAMPLE_RATE)) as usize;
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(undecodable)?;
    let mut samples = Vec::new();
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break;
            }
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => return Err(undecodable(e)),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = decoder.decode(&packet).map_err(undecodable)?;
        let spec = *decoded.spec();
        let channels = spec.channels.count().max(1);
        let mut buf = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
        buf.copy_interleaved_ref(decoded);
        samples.extend(
            buf.samples()
                .chunks(channels)
                .map(|frame| frame.iter().sum::<f32>() / channels as f32),
        );
        if samples.len() > max_samples {
            return Err(MediaError::TooLarge(format!(
                "audio longer than {max_seconds} s"
            )));
        }
    }
    if samples.is_empty() {
        return Err(MediaError::Undecodable("audio: no samples".into()));
    }
    Ok(samples)
}
