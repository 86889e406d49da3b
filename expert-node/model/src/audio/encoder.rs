//! The audio tower of Qwen3-Omni's thinker, `Qwen3OmniMoeAudioEncoder` of transformers 4.57.3,
//! the candle way (`new(cfg, w)` + `forward`): log-mel frames are cut into chunks of
//! `2 * n_window` frames, each downsampled 8× in frequency and time by three stride-2 3×3
//! convolutions with GELU, flattened and projected (`conv_out`), given sinusoidal positions
//! (restarting in every chunk); the valid rows of all chunks are concatenated and run through
//! pre-norm transformer layers (every row attending to every row, as the reference's eager and
//! SDPA attention compute it); then `ln_post`, `proj1`, GELU, `proj2` to the text model's width.

use candle_core::{DType, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Module};
use omnishard_proto::omni::{AudioConfig, audio_output_len};

use crate::model::ModelError;
use crate::model::linear::Linear;
use crate::weights::Weights;

type Result<T> = std::result::Result<T, ModelError>;

/// `nn.LayerNorm`'s default epsilon.
const LN_EPS: f64 = 1e-5;

fn layer_norm(size: usize, w: &Weights) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        w.get("weight", &[size])?,
        w.get("bias", &[size])?,
        LN_EPS,
    ))
}

fn conv(in_c: usize, out_c: usize, w: &Weights) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        dilation: 1,
        groups: 1,
        cudnn_fwd_algo: None,
    };
    Ok(Conv2d::new(
        w.get("weight", &[out_c, in_c, 3, 3])?,
        Some(w.get("bias", &[out_c])?),
        cfg,
    ))
}

struct EncoderLayer {
    self_attn_layer_norm: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    final_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl EncoderLayer {
    fn new(cfg: &AudioConfig, w: Weights) -> Result<Self> {
        let d = cfg.d_model;
        let attn = w.pp("self_attn");
        Ok(Self {
            self_attn_layer_norm: layer_norm(d, &w.pp("self_attn_layer_norm"))?,
            q_proj: Linear::new(d, d, true, attn.pp("q_proj"))?,
            k_proj: Linear::new(d, d, true, attn.pp("k_proj"))?,
            v_proj: Linear::new(d, d, true, attn.pp("v_proj"))?,
            out_proj: Linear::new(d, d, true, attn.pp("out_proj"))?,
            final_layer_norm: layer_norm(d, &w.pp("final_layer_norm"))?,
            fc1: Linear::new(d, cfg.encoder_ffn_dim, true, w.pp("fc1"))?,
            fc2: Linear::new(cfg.encoder_ffn_dim, d, true, w.pp("fc2"))?,
            heads: cfg.encoder_attention_heads,
        })
    }

    /// `xs` `[rows, d]`, every row attending to every row.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (rows, d) = xs.dims2()?;
        let hd = d / self.heads;
        let h = self.self_attn_layer_norm.forward(xs)?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((rows, self.heads, hd))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let q = split(self.q_proj.forward(&h)?)?;
        let k = split(self.k_proj.forward(&h)?)?;
        let v = split(self.v_proj.forward(&h)?)?;
        let scale = (hd as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?;
        // Softmax in f32, as the reference's eager attention.
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
        let attn = probs
            .matmul(&v)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((rows, d))?;
        let xs = (xs + self.out_proj.forward(&attn)?)?;
        let h = self.final_layer_norm.forward(&xs)?;
        let h = self.fc2.forward(&self.fc1.forward(&h)?.gelu_erf()?)?;
        Ok((xs + h)?)
    }
}

/// `thinker.audio_tower`.
pub struct AudioEncoder {
    cfg: AudioConfig,
    conv2d1: Conv2d,
    conv2d2: Conv2d,
    conv2d3: Conv2d,
    conv_out: Linear,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    ln_post: LayerNorm,
    proj1: Linear,
    proj2: Linear,
}

/// `max_source_positions` sinusoids of width `channels`: sines then cosines.
fn sinusoids(length: usize, channels: usize) -> Vec<f32> {
    let half = channels / 2;
    let increment = (10_000f64).ln() / (half as f64 - 1.0);
    // As the reference: the timescales in f32, the products in f32.
    let inv: Vec<f32> = (0..half)
        .map(|i| ((-increment) as f32 * i as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(length * channels);
    for t in 0..length {
        let scaled: Vec<f32> = inv.iter().map(|&f| t as f32 * f).collect();
        out.extend(scaled.iter().map(|x| x.sin()));
        out.extend(scaled.iter().map(|x| x.cos()));
    }
    out
}

impl AudioEncoder {
    /// Loads `thinker.audio_tower` from `w` (that module).
    pub fn new(cfg: &AudioConfig, w: Weights) -> Result<Self> {
        let (d, ds) = (cfg.d_model, cfg.downsample_hidden_size);
        let positions = Tensor::from_vec(
            sinusoids(cfg.max_source_positions, d),
            (cfg.max_source_positions, d),
            w.device(),
        )?
        .to_dtype(w.dtype())?;
        Ok(Self {
            conv2d1: conv(1, ds, &w.pp("conv2d1"))?,
            conv2d2: conv(ds, ds, &w.pp("conv2d2"))?,
            conv2d3: conv(ds, ds, &w.pp("conv2d3"))?,
            conv_out: Linear::new(ds * cfg.frequencies_after_cnn(), d, false, w.pp("conv_out"))?,
            positions,
            layers: (0..cfg.encoder_layers)
                .map(|l| EncoderLayer::new(cfg, w.pp("layers").pp(l)))
                .collect::<Result<Vec<_>>>()?,
            ln_post: layer_norm(d, &w.pp("ln_post"))?,
            proj1: Linear::new(d, d, true, w.pp("proj1"))?,
            proj2: Linear::new(d, cfg.output_dim, true, w.pp("proj2"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &AudioConfig {
        &self.cfg
    }

    /// Embeddings `[audio_output_len(frames), output_dim]` of one clip's log-mel features `mel`
    /// `[num_mel_bins, frames]`.
    pub fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        let (bins, frames) = mel.dims2()?;
        if bins != self.cfg.num_mel_bins || frames == 0 {
            return Err(ModelError::Input(format!(
                "audio features are {bins}×{frames}; this tower takes {} mel bins and at least one frame",
                self.cfg.num_mel_bins
            )));
        }
        let chunk = self.cfg.chunk_frames();
        let mel = mel.to_dtype(self.positions.dtype())?;
        // Chunks of `chunk` frames, the last one shorter, zero-padded to a batch.
        let mut lengths = vec![chunk; frames / chunk];
        if frames % chunk != 0 {
            lengths.push(frames % chunk);
        }
        let padded = lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let part = mel.narrow(1, i * chunk, len)?;
                if len == chunk {
                    Ok(part)
                } else {
                    part.pad_with_zeros(1, 0, chunk - len)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let batch = Tensor::stack(&padded, 0)?.unsqueeze(1)?;
        let x = self.conv2d1.forward(&batch)?.gelu_erf()?;
        let x = self.conv2d2.forward(&x)?.gelu_erf()?;
        let x = self.conv2d3.forward(&x)?.gelu_erf()?;
        let (b, c, f, t) = x.dims4()?;
        let x = x
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .reshape((b * t, c * f))?;
        let x = self
            .conv_out
            .forward(&x)?
            .reshape((b, t, self.cfg.d_model))?
            .broadcast_add(&self.positions.narrow(0, 0, t)?.unsqueeze(0)?)?;
        // The valid rows of every chunk, in order.
        let valid: Vec<usize> = lengths.iter().map(|&l| audio_output_len(l)).collect();
        let rows = valid
            .iter()
            .enumerate()
            .map(|(i, &n)| x.get(i)?.narrow(0, 0, n))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut xs = Tensor::cat(&rows, 0)?;
        let total = audio_output_len(frames);
        if total != xs.dim(0)? {
            return Err(ModelError::Input(format!(
                "the audio tower made {} rows where {total} were expected",
                xs.dim(0)?
            )));
        }
        // Every row attends to every row, as the reference computes with eager and SDPA
        // attention: it builds `cu_seqlens` windows of `n_window_infer` frames but passes no
        // mask, so only flash-attention's varlen kernel would honour them.
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        let xs = self.ln_post.forward(&xs)?;
        let xs = self.proj1.forward(&xs)?.gelu_erf()?;
        self.proj2.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::sinusoids;

    #[test]
    fn positions_are_sines_then_cosines() {
        let p = sinusoids(3, 4);
        // t = 0: sin 0 = 0, cos 0 = 1.
        assert_eq!(&p[..4], &[0.0, 0.0, 1.0, 1.0]);
        // t = 1, first timescale 1: sin 1.
        assert!((p[4] - 1f32.sin()).abs() < 1e-7);
    }
}
