//! Positions and rotary embeddings: `Qwen3OmniMoeThinkerTextRotaryEmbedding` (with its
//! `apply_interleaved_mrope`), `apply_rotary_pos_emb` and `rotate_half` in transformers 4.57.3.
//! Position ids have three rows (temporal, height, width) for mRoPE; for text they are equal and
//! mRoPE is plain 1-D RoPE. cos/sin are computed in f32 and cast to the compute dtype.

use candle_core::{D, DType, Device, Tensor};
use omnishard_proto::ModelConfig;

use super::Result;

/// Position ids of a run of tokens: three rows (temporal, height, width) for mRoPE. Text has three
/// equal rows; vision and audio tokens may differ between rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positions {
    pub rows: [Vec<u32>; 3],
}

impl Positions {
    /// Text positions `start..start + len` on all three rows.
    pub fn text(start: u32, len: usize) -> Self {
        let row: Vec<u32> = (start..start + len as u32).collect();
        Self {
            rows: [row.clone(), row.clone(), row],
        }
    }

    pub fn len(&self) -> usize {
        self.rows[0].len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows[0].is_empty()
    }

    /// The text position that follows these (the reference's `rope_deltas` rule: one past the
    /// largest position of any row).
    pub fn next_text_position(&self) -> u32 {
        self.rows.iter().flatten().max().map(|m| m + 1).unwrap_or(0)
    }
}

/// Rotary embedding with the interleaved mRoPE layout of Qwen3-Omni: frequency `j` takes its
/// position from row h if `j % 3 == 1 && j < 3 * section[1]`, from row w if
/// `j % 3 == 2 && j < 3 * section[2]`, else from row t. Plain RoPE is the all-t case.
pub(super) struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    row_of_freq: Vec<usize>,
}

impl RotaryEmbedding {
    pub(super) fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.head_dim;
        let half = dim / 2;
        let base = cfg.rope_theta as f32;
        // As the reference: 1 / base^(2j / dim), in f32.
        let inv_freq = (0..half)
            .map(|j| 1.0 / base.powf((2 * j) as f32 / dim as f32))
            .collect();
        let row_of_freq = (0..half)
            .map(|j| match cfg.mrope_section {
                Some([_, h, _]) if j % 3 == 1 && j < 3 * h => 1,
                Some([_, _, w]) if j % 3 == 2 && j < 3 * w => 2,
                _ => 0,
            })
            .collect();
        Self {
            inv_freq,
            row_of_freq,
        }
    }

    /// `(cos, sin)`, each `[len, head_dim]` in `dtype`.
    pub(super) fn cos_sin(
        &self,
        pos: &Positions,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let n = pos.len();
        let (cos, sin) = self.cos_sin_values(pos);
        let d = 2 * self.inv_freq.len();
        let cos = Tensor::from_vec(cos, (n, d), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, d), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// [`RotaryEmbedding::cos_sin`] in f32 on the host, row-major `[len, head_dim]` each.
    pub(super) fn cos_sin_values(&self, pos: &Positions) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let n = pos.len();
        let mut cos = Vec::with_capacity(n * 2 * half);
        let mut sin = Vec::with_capacity(n * 2 * half);
        for i in 0..n {
            let freqs: Vec<f32> = (0..half)
                .map(|j| pos.rows[self.row_of_freq[j]][i] as f32 * self.inv_freq[j])
                .collect();
            for _ in 0..2 {
                cos.extend(freqs.iter().map(|f| f.cos()));
                sin.extend(freqs.iter().map(|f| f.sin()));
            }
        }
        (cos, sin)
    }
}

/// `x * cos + rotate_half(x) * sin` with the half-split ("NeoX") rotation; `x`: `[heads, s, d]`.
pub(super) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}
