//! Log-mel features of 16 kHz mono audio exactly as `WhisperFeatureExtractor` computes them
//! with torch (transformers 4.57.3, `_torch_extract_fbank_features`): a centred STFT (reflect
//! padding, periodic Hann window of `n_fft` samples, hop 160), power spectrum, the Slaney mel
//! filter bank of `audio_utils.mel_filter_bank`, log10 clamped at 1e-10, the last frame dropped,
//! values floored at 8 below the maximum, then `(x + 4) / 4`. The transform and the filter bank
//! run in f64 (the reference mixes f32 and f64): well inside the 1e-4 the fixtures check.

use std::f64::consts::PI;

use rustfft::FftPlanner;
use rustfft::num_complex::Complex;

/// The extractor's parameters (those of Qwen3-Omni's `preprocessor_config.json`).
#[derive(Debug, Clone, Copy)]
pub struct MelParams {
    pub sampling_rate: usize,
    pub n_fft: usize,
    pub hop_length: usize,
    pub n_mels: usize,
}

impl MelParams {
    pub fn whisper(n_mels: usize) -> Self {
        Self {
            sampling_rate: 16_000,
            n_fft: 400,
            hop_length: 160,
            n_mels,
        }
    }

    /// Mel frames for `samples` samples (the STFT's frames less the last).
    pub fn frames(&self, samples: usize) -> usize {
        samples / self.hop_length
    }
}

fn hertz_to_mel(f: f64) -> f64 {
    // Slaney: linear below 1 kHz, logarithmic above.
    let (min_log_hz, min_log_mel, logstep) = (1000.0, 15.0, 27.0 / 6.4f64.ln());
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() * logstep
    } else {
        3.0 * f / 200.0
    }
}

fn mel_to_hertz(m: f64) -> f64 {
    let (min_log_hz, min_log_mel, logstep) = (1000.0, 15.0, 6.4f64.ln() / 27.0);
    if m >= min_log_mel {
        min_log_hz * (logstep * (m - min_log_mel)).exp()
    } else {
        200.0 * m / 3.0
    }
}

/// `[n_mels][bins]` Slaney-normalised triangular filters from 0 to 8 kHz.
fn filter_bank(p: &MelParams) -> Vec<Vec<f64>> {
    let bins = p.n_fft / 2 + 1;
    let (lo, hi) = (hertz_to_mel(0.0), hertz_to_mel(8000.0));
    let centers: Vec<f64> = (0..p.n_mels + 2)
        .map(|i| mel_to_hertz(lo + (hi - lo) * i as f64 / (p.n_mels + 1) as f64))
        .collect();
    let nyquist = (p.sampling_rate / 2) as f64;
    let fft_freqs: Vec<f64> = (0..bins)
        .map(|i| nyquist * i as f64 / (bins - 1) as f64)
        .collect();
    (0..p.n_mels)
        .map(|m| {
            let (left, center, right) = (centers[m], centers[m + 1], centers[m + 2]);
            let enorm = 2.0 / (right - left);
            fft_freqs
                .iter()
                .map(|&f| {
                    let down = (f - left) / (center - left);
                    let up = (right - f) / (right - center);
                    down.min(up).max(0.0) * enorm
                })
                .collect()
        })
        .collect()
}

/// `[n_mels, frames]` row-major log-mel features of `samples` (mono, at `p.sampling_rate`);
/// `None` for audio shorter than one hop.
pub fn log_mel(samples: &[f32], p: &MelParams) -> Option<(Vec<f32>, usize)> {
    let frames = p.frames(samples.len());
    if frames == 0 || samples.len() <= p.n_fft / 2 {
        return None;
    }
    let half = p.n_fft / 2;
    // Reflect padding (without repeating the edge sample), as torch.stft(center=True).
    let n = samples.len() as isize;
    let at = |i: isize| -> f64 {
        let j = if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        };
        f64::from(samples[j as usize])
    };
    let window: Vec<f64> = (0..p.n_fft)
        .map(|i| 0.5 - 0.5 * (2.0 * PI * i as f64 / p.n_fft as f64).cos())
        .collect();
    let bank = filter_bank(p);
    let bins = half + 1;
    let fft = FftPlanner::new().plan_fft_forward(p.n_fft);
    let mut buf = vec![Complex::new(0.0, 0.0); p.n_fft];
    let mut power = vec![0.0f64; bins];
    let mut out = vec![0.0f64; p.n_mels * frames];
    for t in 0..frames {
        let start = (t * p.hop_length) as isize - half as isize;
        for (k, b) in buf.iter_mut().enumerate() {
            *b = Complex::new(at(start + k as isize) * window[k], 0.0);
        }
        fft.process(&mut buf);
        for (k, pw) in power.iter_mut().enumerate() {
            *pw = buf[k].norm_sqr();
        }
        for (m, filter) in bank.iter().enumerate() {
            let e: f64 = filter.iter().zip(&power).map(|(f, p)| f * p).sum();
            out[m * frames + t] = e.max(1e-10).log10();
        }
    }
    let max = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let features = out
        .into_iter()
        .map(|x| ((x.max(max - 8.0) + 4.0) / 4.0) as f32)
        .collect();
    Some((features, frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_bank_is_slaneys() {
        let p = MelParams::whisper(80);
        let bank = filter_bank(&p);
        assert_eq!((bank.len(), bank[0].len()), (80, 201));
        // Each filter is a triangle: non-negative, peaked once.
        for f in &bank {
            assert!(f.iter().all(|&w| w >= 0.0));
            assert!(f.iter().any(|&w| w > 0.0));
        }
        assert!((mel_to_hertz(hertz_to_mel(4321.0)) - 4321.0).abs() < 1e-9);
        assert!((mel_to_hertz(hertz_to_mel(321.0)) - 321.0).abs() < 1e-9);
    }

    #[test]
    fn a_tone_lights_the_band_holding_its_frequency() {
        let p = MelParams::whisper(128);
        let tone: Vec<f32> = (0..16_000)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16_000.0).sin())
            .collect();
        let (mel, frames) = log_mel(&tone, &p).expect("features");
        assert_eq!(frames, 100);
        let column: Vec<f32> = (0..128).map(|m| mel[m * frames + 50]).collect();
        let peak = column
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let center = |m: usize| {
            let (lo, hi) = (hertz_to_mel(0.0), hertz_to_mel(8000.0));
            mel_to_hertz(lo + (hi - lo) * (m + 1) as f64 / 129.0)
        };
        assert!((center(peak) - 1000.0).abs() < 60.0, "peak band {peak}");
        assert!(log_mel(&tone[..100], &p).is_none());
    }
}
