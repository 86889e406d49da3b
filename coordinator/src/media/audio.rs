//! Audio files to 16 kHz mono samples, as the reference pipeline feeds `WhisperFeatureExtractor`
//! (librosa loads mono: the mean of the channels). Decoding is symphonia's (pure Rust: WAV/PCM,
//! FLAC, MP3, Ogg Vorbis), probed from the bytes, with the file name's extension as a hint;
//! other rates are resampled by rubato's FFT resampler (band-limited, for fixed ratios: the
//! reference leaves resampling to the caller, librosa's soxr by default, so any good resampler
//! is as faithful as another).

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
    let max_samples = (max_seconds * f64::from(rate)) as usize;
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
    if rate == SAMPLE_RATE {
        return Ok(samples);
    }
    resample(&samples, rate)
}

/// `samples` at `rate` to [`SAMPLE_RATE`], the resampler's delay trimmed off: output sample `i`
/// is the input at time `i / 16000` s.
fn resample(samples: &[f32], rate: u32) -> Result<Vec<f32>, MediaError> {
    use rubato::{FftFixedIn, Resampler};
    let failed = |e: &dyn std::fmt::Display| {
        MediaError::Undecodable(format!("audio: resampling from {rate} Hz: {e}"))
    };
    let chunk = 1024;
    let mut resampler = FftFixedIn::<f32>::new(rate as usize, SAMPLE_RATE as usize, chunk, 2, 1)
        .map_err(|e| failed(&e))?;
    let wanted = (samples.len() as u64 * u64::from(SAMPLE_RATE) / u64::from(rate)) as usize;
    let delay = resampler.output_delay();
    let mut out = Vec::with_capacity(wanted + delay + chunk);
    let mut rest = samples;
    while rest.len() >= resampler.input_frames_next() {
        let (now, later) = rest.split_at(resampler.input_frames_next());
        let y = resampler.process(&[now], None).map_err(|e| failed(&e))?;
        out.extend_from_slice(&y[0]);
        rest = later;
    }
    // The tail, then zeros until the delayed samples are out.
    let y = resampler
        .process_partial(Some(&[rest]), None)
        .map_err(|e| failed(&e))?;
    out.extend_from_slice(&y[0]);
    while out.len() < delay + wanted {
        let y = resampler
            .process_partial::<&[f32]>(None, None)
            .map_err(|e| failed(&e))?;
        if y[0].is_empty() {
            break;
        }
        out.extend_from_slice(&y[0]);
    }
    Ok(out.into_iter().skip(delay).take(wanted).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tone at 44.1 kHz comes out as the same tone at 16 kHz, in phase and of the right length.
    #[test]
    fn resampling_keeps_a_tone() {
        let tone = |rate: f32, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate).sin())
                .collect()
        };
        let out = resample(&tone(44_100.0, 44_100), 44_100).expect("resamples");
        assert_eq!(out.len(), 16_000);
        let want = tone(16_000.0, 16_000);
        // Away from the edges the resampled tone is the tone.
        let worst = out[2000..14000]
            .iter()
            .zip(&want[2000..14000])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-2, "{worst}");
    }
}
