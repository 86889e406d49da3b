//! The vision tower of Qwen3-Omni's thinker, `Qwen3OmniMoeVisionEncoder` of transformers 4.57.3,
//! the candle way (`new(cfg, w)` + `forward`):
//! - `Qwen3OmniMoeVisionPatchEmbed`: a Conv3d whose kernel equals its stride (temporal patch ×
//!   patch × patch), i.e. one linear map of each flattened `pixel_values` row;
//! - plus the learned position embeddings bilinearly interpolated to the grid
//!   (`fast_pos_embed_interpolate`, [`super::positions`]);
//! - `Qwen3OmniMoeVisionBlock`s (pre-norm, LayerNorm eps 1e-6): attention with 2-D rotary
//!   embeddings (row angles then column angles, applied in f32), windowed per image and per
//!   frame pair by `cu_seqlens` — the reference's eager and SDPA paths split q, k, v at
//!   `cu_seqlens` and attend inside each piece, so frames never see each other — and an MLP
//!   (`hidden_act`, tanh-approximated GELU in the checkpoint);
//! - after the blocks listed in `deepstack_visual_indexes`, a deepstack merger
//!   (`Qwen3OmniMoeVisionPatchMerger(use_postshuffle_norm=True)`: the `merge²` patches of a
//!   window concatenated, LayerNorm over the concatenation, Linear, GELU, Linear);
//! - at the end the patch merger (LayerNorm per patch, then the same concatenation and MLP).

use candle_core::{D, DType, Tensor};
use candle_nn::{LayerNorm, Module};
use omnishard_proto::omni::VisionConfig;

use super::positions::{interpolation, rotary_angles};
use crate::model::ModelError;
use crate::model::linear::Linear;
use crate::ops::linear;
use crate::weights::Weights;

type Result<T> = std::result::Result<T, ModelError>;

/// The LayerNorms of the tower and its mergers.
const LN_EPS: f64 = 1e-6;

/// Attention scores computed at once, at most: 64 Mi values (256 MiB in f32).
const SCORES_BUDGET: usize = 1 << 26;

fn layer_norm(size: usize, w: &Weights) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        w.get("weight", &[size])?,
        w.get("bias", &[size])?,
        LN_EPS,
    ))
}

/// `rotate_half`: `[-x2, x1]` of the two halves of the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    tanh_gelu: bool,
}

impl Block {
    fn new(cfg: &VisionConfig, w: Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            norm1: layer_norm(d, &w.pp("norm1"))?,
            norm2: layer_norm(d, &w.pp("norm2"))?,
            qkv: Linear::new(d, 3 * d, true, w.pp("attn.qkv"))?,
            proj: Linear::new(d, d, true, w.pp("attn.proj"))?,
            fc1: Linear::new(d, cfg.intermediate_size, true, w.pp("mlp.linear_fc1"))?,
            fc2: Linear::new(cfg.intermediate_size, d, true, w.pp("mlp.linear_fc2"))?,
            heads: cfg.num_heads,
            tanh_gelu: cfg.hidden_act == "gelu_pytorch_tanh",
        })
    }

    /// `xs` `[patches, d]`; `cos`/`sin` `[patches, 1, head_dim]` (f32); attention inside each
    /// window of `windows` (consecutive row counts).
    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        windows: &[usize],
    ) -> Result<Tensor> {
        let (n, d) = xs.dims2()?;
        let hd = d / self.heads;
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(xs)?)?
            .reshape((n, 3, self.heads, hd))?;
        let rope = |t: Tensor| -> Result<Tensor> {
            let dtype = t.dtype();
            let t = t.to_dtype(DType::F32)?;
            let t = (t.broadcast_mul(cos)? + rotate_half(&t)?.broadcast_mul(sin)?)?;
            Ok(t.to_dtype(dtype)?.transpose(0, 1)?.contiguous()?)
        };
        // [heads, patches, head_dim]
        let q = rope(qkv.narrow(1, 0, 1)?.squeeze(1)?)?;
        let k = rope(qkv.narrow(1, 1, 1)?.squeeze(1)?)?;
        let v = qkv
            .narrow(1, 2, 1)?
            .squeeze(1)?
            .transpose(0, 1)?
            .contiguous()?;
        let scale = (hd as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(windows.len());
        let mut start = 0;
        for &len in windows {
            let (k, v) = (k.narrow(1, start, len)?, v.narrow(1, start, len)?);
            let kt = k.t()?;
            // Queries in blocks, so that a large picture's scores stay within SCORES_BUDGET
            // (each row's softmax is its own: the blocks change nothing).
            let block = (SCORES_BUDGET / (self.heads * len)).clamp(1, len);
            let mut q0 = 0;
            while q0 < len {
                let rows = block.min(len - q0);
                let q = q.narrow(1, start + q0, rows)?;
                let scores = (q.matmul(&kt)? * scale)?;
                // Softmax in f32, as the reference's eager attention.
                let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                    .to_dtype(q.dtype())?;
                outs.push(probs.matmul(&v)?);
                q0 += rows;
            }
            start += len;
        }
        let attn = Tensor::cat(&outs, 1)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, d))?;
        let xs = (xs + self.proj.forward(&attn)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&xs)?)?;
        let h = if self.tanh_gelu {
            h.gelu()?
        } else {
            h.gelu_erf()?
        };
        Ok((xs + self.fc2.forward(&h)?)?)
    }
}

/// `Qwen3OmniMoeVisionPatchMerger`: `merge²` consecutive patches into one embedding of the text
/// model's width. With `postshuffle`, the LayerNorm runs on the concatenation (deepstack mergers),
/// otherwise on each patch before it (the final merger).
struct Merger {
    ln_q: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    width: usize,
    postshuffle: bool,
}

impl Merger {
    fn new(cfg: &VisionConfig, postshuffle: bool, w: Weights) -> Result<Self> {
        let width = cfg.hidden_size * cfg.merge_unit();
        Ok(Self {
            ln_q: layer_norm(
                if postshuffle { width } else { cfg.hidden_size },
                &w.pp("ln_q"),
            )?,
            fc1: Linear::new(width, width, true, w.pp("mlp.0"))?,
            fc2: Linear::new(width, cfg.out_hidden_size, true, w.pp("mlp.2"))?,
            width,
            postshuffle,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let rows = xs.elem_count() / self.width;
        let xs = if self.postshuffle {
            self.ln_q.forward(&xs.reshape((rows, self.width))?)?
        } else {
            self.ln_q.forward(xs)?.reshape((rows, self.width))?
        };
        // `nn.GELU()`: the exact (erf) form.
        self.fc2.forward(&self.fc1.forward(&xs)?.gelu_erf()?)
    }
}

/// What the tower makes of a batch of images or videos.
pub struct VisionOutput {
    /// `[patches / merge², out_hidden_size]`: the embeddings of the `<|image_pad|>` /
    /// `<|video_pad|>` tokens, in input order.
    pub embeds: Tensor,
    /// One `[patches / merge², out_hidden_size]` per entry of `deepstack_visual_indexes`: feature
    /// `k` is added to the output of text layer `k` at the visual positions.
    pub deepstack: Vec<Tensor>,
}

/// `thinker.visual`.
pub struct VisionEncoder {
    cfg: VisionConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack: Vec<Merger>,
}

impl VisionEncoder {
    /// Loads `thinker.visual` from `w` (that module).
    pub fn new(cfg: &VisionConfig, w: Weights) -> Result<Self> {
        let (d, c, t, p) = (
            cfg.hidden_size,
            cfg.in_channels,
            cfg.temporal_patch_size,
            cfg.patch_size,
        );
        let pe = w.pp("patch_embed.proj");
        Ok(Self {
            patch_weight: pe
                .get("weight", &[d, c, t, p, p])?
                .reshape((d, c * t * p * p))?,
            patch_bias: pe.get("bias", &[d])?,
            pos_embed: w.get("pos_embed.weight", &[cfg.num_position_embeddings, d])?,
            blocks: (0..cfg.depth)
                .map(|l| Block::new(cfg, w.pp("blocks").pp(l)))
                .collect::<Result<Vec<_>>>()?,
            merger: Merger::new(cfg, false, w.pp("merger"))?,
            deepstack: (0..cfg.deepstack_visual_indexes.len())
                .map(|i| Merger::new(cfg, true, w.pp("merger_list").pp(i)))
                .collect::<Result<Vec<_>>>()?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// The tower on `pixel_values` `[patches, in_channels × temporal_patch × patch²]` of one or
    /// more images or videos, whose grids (temporal patches, patch rows, patch columns) are
    /// `grids`, in order.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<VisionOutput> {
        let cfg = &self.cfg;
        let m = cfg.spatial_merge_size;
        let (n, len) = pixel_values.dims2()?;
        let expected: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
        if let Some(g) = grids
            .iter()
            .find(|[t, h, w]| *t == 0 || *h == 0 || *w == 0 || h % m != 0 || w % m != 0)
        {
            return Err(ModelError::Input(format!(
                "vision grid {g:?}: every side must be positive and rows and columns multiples of {m}"
            )));
        }
        if len != cfg.patch_len() || n != expected || n == 0 {
            return Err(ModelError::Input(format!(
                "pixel values are {n}×{len}; the grids {grids:?} need {expected}×{}",
                cfg.patch_len()
            )));
        }
        let device = pixel_values.device();
        let dtype = self.pos_embed.dtype();
        let xs = linear(&pixel_values.to_dtype(dtype)?, &self.patch_weight)?
            .broadcast_add(&self.patch_bias)?;

        // Position embeddings: four gathered rows, weighted and summed in the reference's order.
        let bi = interpolation(grids, cfg.grid_side(), m);
        let mut pos: Option<Tensor> = None;
        for k in 0..4 {
            let idx = Tensor::from_slice(&bi.indices[k], n, device)?;
            let wt = Tensor::from_slice(&bi.weights[k], (n, 1), device)?.to_dtype(dtype)?;
            let part = self.pos_embed.index_select(&idx, 0)?.broadcast_mul(&wt)?;
            pos = Some(match pos {
                None => part,
                Some(p) => (p + part)?,
            });
        }
        let mut xs = match pos {
            Some(p) => (xs + p)?,
            None => xs,
        };

        let hd = cfg.head_dim();
        let angles = Tensor::from_vec(rotary_angles(grids, hd, m), (n, hd / 2), device)?;
        let angles = Tensor::cat(&[&angles, &angles], 1)?.unsqueeze(1)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        // `cu_seqlens`: one window per frame pair of every image or video.
        let windows: Vec<usize> = grids
            .iter()
            .flat_map(|&[t, h, w]| std::iter::repeat_n(h * w, t))
            .collect();

        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (l, block) in self.blocks.iter().enumerate() {
            xs = block.forward(&xs, &cos, &sin, &windows)?;
            if let Some(i) = cfg.deepstack_visual_indexes.iter().position(|&d| d == l) {
                deepstack.push(self.deepstack[i].forward(&xs)?);
            }
        }
        Ok(VisionOutput {
            embeds: self.merger.forward(&xs)?,
            deepstack,
        })
    }
}
