//! The Qwen3-Omni thinker text model (and plain Qwen3-MoE) as the coordinator runs it:
//! embeddings, pre-norm decoder layers with QK-normed GQA attention and interleaved mRoPE,
//! a KV cache per sequence, the MoE router, dense MLP layers, the final norm and lm_head.
//! The routed experts are behind [`crate::Experts`], local or remote.
//!
//! Reference: `Qwen3OmniMoeThinkerTextModel` in Hugging Face transformers 4.57.3, and the Qwen3
//! technical report (arXiv:2505.09388). Numerics mirror the reference in bf16 too: RMSNorm in f32
//! cast back before the weight, cos/sin in f32, attention and router softmax in f32, residual
//! adds in the compute dtype.

use std::sync::Arc;

use crate::ops::{linear, matmul};
use crate::{CallContext, Checkpoint, CheckpointError, ExpertError, Experts, Routing, SwiGlu};
use candle_core::{D, DType, Device, Tensor};
use omnishard_proto::ModelConfig;

mod decode_attention;

use crate::usage::ExpertUsage;
use decode_attention::decode_attention;

/// Errors running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{source}")]
    Experts { layer: usize, source: ExpertError },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, ModelError>;

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

/// A linear layer with the checkpoint's `[out, in]` weight and an optional bias.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(
        ckpt: &Checkpoint,
        name: &str,
        out_in: (usize, usize),
        bias: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let weight = ckpt.tensor(
            &format!("{name}.weight"),
            &[out_in.0, out_in.1],
            dtype,
            device,
        )?;
        let bias = if bias {
            Some(ckpt.tensor(&format!("{name}.bias"), &[out_in.0], dtype, device)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = linear(xs, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        })
    }
}

/// RMSNorm over the last dimension, computed in f32 and cast back before the weight.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(
        ckpt: &Checkpoint,
        name: &str,
        size: usize,
        eps: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: ckpt.tensor(&format!("{name}.weight"), &[size], dtype, device)?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        Ok(x.broadcast_mul(&inv_rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?)
    }
}

/// Rotary embedding with the interleaved mRoPE layout of Qwen3-Omni: frequency `j` takes its
/// position from row h if `j % 3 == 1 && j < 3 * section[1]`, from row w if
/// `j % 3 == 2 && j < 3 * section[2]`, else from row t. Plain RoPE is the all-t case.
struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    row_of_freq: Vec<usize>,
}

impl RotaryEmbedding {
    fn new(cfg: &ModelConfig) -> Self {
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
    fn cos_sin(&self, pos: &Positions, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
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
        let cos = Tensor::from_vec(cos, (n, 2 * half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, 2 * half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// `x * cos + rotate_half(x) * sin` with the half-split ("NeoX") rotation; `x`: `[heads, s, d]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Keys and values of every layer for one sequence, `[kv_heads, seq, head_dim]` each.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    seq_len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens already in the cache.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let kv = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(
        ckpt: &Checkpoint,
        p: &str,
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::load(
                ckpt,
                &format!("{p}.q_proj"),
                (nq * hd, h),
                bias,
                dtype,
                device,
            )?,
            k_proj: Linear::load(
                ckpt,
                &format!("{p}.k_proj"),
                (nkv * hd, h),
                bias,
                dtype,
                device,
            )?,
            v_proj: Linear::load(
                ckpt,
                &format!("{p}.v_proj"),
                (nkv * hd, h),
                bias,
                dtype,
                device,
            )?,
            o_proj: Linear::load(
                ckpt,
                &format!("{p}.o_proj"),
                (h, nq * hd),
                bias,
                dtype,
                device,
            )?,
            q_norm: RmsNorm::load(
                ckpt,
                &format!("{p}.q_norm"),
                hd,
                cfg.rms_norm_eps,
                dtype,
                device,
            )?,
            k_norm: RmsNorm::load(
                ckpt,
                &format!("{p}.k_norm"),
                hd,
                cfg.rms_norm_eps,
                dtype,
                device,
            )?,
            n_heads: nq,
            n_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// A batch of sequences: `xs` `[tokens, hidden]` (normed), the sequences' tokens one after
    /// another; `cos`/`sin` `[tokens, head_dim]`. Projections, norms and RoPE run once over the
    /// whole batch; only the attention itself runs per sequence, against its own cache.
    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seqs: &mut [SequenceInput<'_>],
        layer: usize,
    ) -> Result<Tensor> {
        let (n, _) = xs.dims2()?;
        let hd = self.head_dim;
        let split = |t: Tensor, heads: usize| -> Result<Tensor> { Ok(t.reshape((n, heads, hd))?) };
        let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        let q = self
            .q_norm
            .forward(&split(self.q_proj.forward(xs)?, self.n_heads)?)?;
        let q = apply_rope(&q, &cos, &sin)?;
        let k = self
            .k_norm
            .forward(&split(self.k_proj.forward(xs)?, self.n_kv_heads)?)?;
        let k = apply_rope(&k, &cos, &sin)?;
        let v = split(self.v_proj.forward(xs)?, self.n_kv_heads)?;
        // Decode steps (one new token after a non-empty cache) of several sequences are
        // attended together; prompts and chunks go one sequence at a time.
        let decoding: Vec<bool> = seqs
            .iter()
            .map(|seq| seq.tokens.len() == 1 && seq.cache.seq_len() > 0)
            .collect();
        let batched = decoding.iter().filter(|d| **d).count() >= 2;
        let mut outs: Vec<Option<Tensor>> = vec![None; seqs.len()];
        let mut decode_rows = Vec::new();
        let mut start = 0;
        for (i, seq) in seqs.iter_mut().enumerate() {
            let s = seq.tokens.len();
            if batched && decoding[i] {
                decode_rows.push((i, start));
            } else {
                let heads_first = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.narrow(0, start, s)?.transpose(0, 1)?.contiguous()?)
                };
                outs[i] = Some(self.attend(
                    &heads_first(&q)?,
                    heads_first(&k)?,
                    heads_first(&v)?,
                    seq.cache,
                    layer,
                )?);
            }
            start += s;
        }
        if !decode_rows.is_empty() {
            let ys = self.attend_decode_batch(&q, &k, &v, seqs, &decode_rows, layer)?;
            for (b, &(i, _)) in decode_rows.iter().enumerate() {
                outs[i] = Some(ys.narrow(0, b, 1)?);
            }
        }
        let outs: Vec<Tensor> = outs.into_iter().flatten().collect();
        self.o_proj.forward(&Tensor::cat(&outs, 0)?)
    }

    /// One decode step of several sequences at once: each query row attends to its own cache,
    /// padded with zeros to the longest and masked there. Returns `[sequences, heads * d]`.
    fn attend_decode_batch(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seqs: &mut [SequenceInput<'_>],
        rows: &[(usize, usize)],
        layer: usize,
    ) -> Result<Tensor> {
        let hd = self.head_dim;
        let mut keys = Vec::with_capacity(rows.len());
        let mut values = Vec::with_capacity(rows.len());
        let mut lens = Vec::with_capacity(rows.len());
        for &(i, row) in rows {
            // One row [1, kv_heads, d] is [kv_heads, 1, d] in memory already: a view, no copy.
            let new = |t: &Tensor| -> Result<Tensor> {
                Ok(t.narrow(0, row, 1)?.reshape((self.n_kv_heads, 1, hd))?)
            };
            let (kc, vc) = seqs[i].cache.append(layer, new(k)?, new(v)?)?;
            lens.push(kc.dim(1)?);
            keys.push(kc);
            values.push(vc);
        }
        let b = rows.len();
        let idx: Vec<u32> = rows.iter().map(|&(_, row)| row as u32).collect();
        let q = q.index_select(&Tensor::from_vec(idx, b, q.device())?, 0)?;
        if let Some(out) = decode_attention(&q, &keys, &values, self.n_kv_heads)? {
            return Ok(out);
        }
        let longest = lens.iter().copied().max().unwrap_or(0);
        let pad = |ts: Vec<Tensor>| -> Result<Tensor> {
            let padded = ts
                .into_iter()
                .zip(&lens)
                .map(|(t, &len)| t.pad_with_zeros(1, 0, longest - len))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::stack(&padded, 0)?)
        };
        let (keys, values) = (pad(keys)?, pad(values)?);
        let groups = self.n_heads / self.n_kv_heads;
        // Query head h uses KV head h / groups: view the queries as [b, kv_heads, groups, d]
        // instead of copying every key and value `groups` times.
        let q = q.reshape((b, self.n_kv_heads, groups, hd))?;
        let scores =
            (matmul(&q, &keys.transpose(2, 3)?)? * (hd as f64).powf(-0.5))?.to_dtype(DType::F32)?;
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|&len| {
                (0..longest).map(move |j| if j < len { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, longest), q.device())?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?.to_dtype(q.dtype())?;
        Ok(matmul(&probs, &values)?.reshape((b, self.n_heads * hd))?)
    }

    /// Causal attention of one sequence's new queries `[heads, s, d]` over its cache plus the
    /// new keys and values `[kv_heads, s, d]`; returns `[s, heads * d]`.
    fn attend(
        &self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (_, s, hd) = q.dims3()?;
        let past = cache.seq_len();
        let (k, v) = cache.append(layer, k, v)?;
        let total = past + s;
        let groups = self.n_heads / self.n_kv_heads;
        let repeat = |t: Tensor| -> Result<Tensor> {
            if groups == 1 {
                return Ok(t);
            }
            Ok(t.unsqueeze(1)?
                .expand((self.n_kv_heads, groups, total, hd))?
                .reshape((self.n_heads, total, hd))?)
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = (matmul(q, &k.t()?)? * (hd as f64).powf(-0.5))?.to_dtype(DType::F32)?;
        // Query i sits at absolute index past + i and sees keys 0..=past + i; a single query
        // (a decode step) sees everything.
        let scores = if s == 1 {
            scores
        } else {
            let mask: Vec<f32> = (0..s)
                .flat_map(|i| {
                    (0..total).map(move |j| {
                        if j <= past + i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            scores.broadcast_add(&Tensor::from_vec(mask, (s, total), q.device())?)?
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
        Ok(matmul(&probs, &v)?
            .transpose(0, 1)?
            .reshape((s, self.n_heads * hd))?)
    }
}

/// The router of an MoE layer (`mlp.gate`, no bias). Softmax over all experts in f32, top-k,
/// optional renormalisation; experts absent from the cluster can be masked out (logit -inf).
struct Router {
    layer: usize,
    gate: Tensor,
    top_k: usize,
    norm_topk_prob: bool,
    masked: Vec<bool>,
}

impl Router {
    fn route(&self, xs: &Tensor) -> Result<Routing> {
        let logits = linear(xs, &self.gate)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let k = self.top_k;
        let mut ids = Vec::with_capacity(logits.len() * k);
        let mut weights = Vec::with_capacity(logits.len() * k);
        for row in logits {
            let row: Vec<f32> = row
                .into_iter()
                .zip(&self.masked)
                .map(|(l, &m)| if m { f32::NEG_INFINITY } else { l })
                .collect();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..exp.len()).collect();
            // Descending probability; ties to the lower expert id. Stable sort keeps that order.
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]));
            let top: Vec<(usize, f32)> = order[..k].iter().map(|&e| (e, exp[e] / sum)).collect();
            let norm: f32 = if self.norm_topk_prob {
                top.iter().map(|(_, p)| p).sum()
            } else {
                1.0
            };
            for (e, p) in top {
                ids.push(e as u32);
                weights.push(p / norm);
            }
        }
        Ok(Routing {
            top_k: k,
            ids,
            weights,
        })
    }
}

enum Mlp {
    Dense(SwiGlu),
    Moe(Router),
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// One sequence's share of a batched forward pass.
pub struct SequenceInput<'a> {
    pub tokens: &'a [u32],
    pub positions: Positions,
    pub cache: &'a mut KvCache,
}

/// Which rows of logits a forward pass returns per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    All,
    Last,
}

pub struct Model {
    cfg: ModelConfig,
    dtype: DType,
    device: Device,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    rotary: RotaryEmbedding,
    experts: Arc<dyn Experts>,
    usage: Arc<ExpertUsage>,
}

impl Model {
    /// Loads everything but the routed experts, which `experts` provides. Experts flagged in
    /// `masked` (indexed `[layer][expert]`) get router logit -inf.
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
        experts: Arc<dyn Experts>,
        masked: &[(usize, usize)],
    ) -> Result<Self> {
        let prefix = format!("{}model", cfg.architecture.tensor_prefix());
        let h = cfg.hidden_size;
        let embed_tokens = ckpt.tensor(
            &format!("{prefix}.embed_tokens.weight"),
            &[cfg.vocab_size, h],
            dtype,
            device,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("{prefix}.layers.{l}");
            let mlp = if cfg.is_moe_layer(l) {
                let mut mask = vec![false; cfg.num_experts];
                for &(ml, me) in masked {
                    if ml == l && me < cfg.num_experts {
                        mask[me] = true;
                    }
                }
                if mask.iter().filter(|m| !**m).count() < cfg.num_experts_per_tok {
                    return Err(ModelError::Input(format!(
                        "layer {l} has fewer than top-k = {} experts left after masking",
                        cfg.num_experts_per_tok
                    )));
                }
                Mlp::Moe(Router {
                    layer: l,
                    gate: ckpt.tensor(
                        &format!("{p}.mlp.gate.weight"),
                        &[cfg.num_experts, h],
                        dtype,
                        device,
                    )?,
                    top_k: cfg.num_experts_per_tok,
                    norm_topk_prob: cfg.norm_topk_prob,
                    masked: mask,
                })
            } else {
                let inter = cfg.intermediate_size.unwrap_or(0);
                Mlp::Dense(SwiGlu::load(
                    ckpt,
                    &format!("{p}.mlp"),
                    h,
                    inter,
                    dtype,
                    device,
                )?)
            };
            let eps = cfg.rms_norm_eps;
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(
                    ckpt,
                    &format!("{p}.input_layernorm"),
                    h,
                    eps,
                    dtype,
                    device,
                )?,
                self_attn: Attention::load(ckpt, &format!("{p}.self_attn"), cfg, dtype, device)?,
                post_attention_layernorm: RmsNorm::load(
                    ckpt,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    eps,
                    dtype,
                    device,
                )?,
                mlp,
            });
        }
        let norm = RmsNorm::load(
            ckpt,
            &format!("{prefix}.norm"),
            h,
            cfg.rms_norm_eps,
            dtype,
            device,
        )?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            let name = format!("{}lm_head.weight", cfg.architecture.tensor_prefix());
            ckpt.tensor(&name, &[cfg.vocab_size, h], dtype, device)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: RotaryEmbedding::new(cfg),
            experts,
            usage: Arc::new(ExpertUsage::new(cfg.num_hidden_layers, cfg.num_experts)),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Tokens routed to each (layer, expert) since load.
    pub fn usage(&self) -> &Arc<ExpertUsage> {
        &self.usage
    }

    /// Runs a batch of sequences through the model, appending to each one's KV cache. Returns one
    /// f32 tensor of logits per sequence: `[tokens, vocab]` or `[1, vocab]` per `which`.
    pub fn forward(
        &self,
        batch: &mut [SequenceInput<'_>],
        which: LogitsFor,
    ) -> Result<Vec<Tensor>> {
        self.forward_for(batch, which, &CallContext::default())
    }

    /// [`Model::forward`] on behalf of the client requests named in `ctx` (passed on to the
    /// experts, so expert nodes can log them).
    pub fn forward_for(
        &self,
        batch: &mut [SequenceInput<'_>],
        which: LogitsFor,
        ctx: &CallContext,
    ) -> Result<Vec<Tensor>> {
        let mut all_ids = Vec::new();
        // Positions of every token of the batch, so cos/sin are built once.
        let mut all_positions = Positions {
            rows: [Vec::new(), Vec::new(), Vec::new()],
        };
        for seq in batch.iter() {
            if seq.tokens.is_empty() || seq.positions.len() != seq.tokens.len() {
                return Err(ModelError::Input(format!(
                    "{} tokens with {} positions per row",
                    seq.tokens.len(),
                    seq.positions.len()
                )));
            }
            if seq
                .positions
                .rows
                .iter()
                .any(|r| r.len() != seq.tokens.len())
            {
                return Err(ModelError::Input("position rows differ in length".into()));
            }
            if let Some(&bad) = seq
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::Input(format!(
                    "token id {bad} out of range (vocab_size {})",
                    self.cfg.vocab_size
                )));
            }
            all_ids.extend_from_slice(seq.tokens);
            for (all, row) in all_positions.rows.iter_mut().zip(&seq.positions.rows) {
                all.extend_from_slice(row);
            }
        }
        let (cos, sin) = self
            .rotary
            .cos_sin(&all_positions, self.dtype, &self.device)?;
        let n = all_ids.len();
        self.usage.record_tokens(n);
        let ids = Tensor::from_vec(all_ids, n, &self.device)?;
        let mut xs = self.embed_tokens.index_select(&ids, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // For profiling (RUST_LOG=trace): when disabled this costs one relaxed load.
            let _layer = tracing::trace_span!("layer", layer = l, tokens = n).entered();
            let normed = layer.input_layernorm.forward(&xs)?;
            let attn = layer.self_attn.forward(&normed, &cos, &sin, batch, l)?;
            let h = (xs + attn)?;
            let normed = layer.post_attention_layernorm.forward(&h)?;
            let mlp_out = match &layer.mlp {
                Mlp::Dense(mlp) => mlp.forward(&normed)?,
                Mlp::Moe(router) => {
                    let routing = router.route(&normed)?;
                    self.usage.record(l, &routing.ids);
                    self.experts
                        .forward(router.layer, &normed, &routing, ctx)
                        .map_err(|source| ModelError::Experts { layer: l, source })?
                }
            };
            xs = (h + mlp_out)?;
        }
        // The rows whose logits are wanted, for the whole batch at once.
        let mut rows = Vec::with_capacity(n);
        let mut counts = Vec::with_capacity(batch.len());
        let mut start = 0u32;
        for seq in batch.iter_mut() {
            let len = seq.tokens.len() as u32;
            seq.cache.seq_len += len as usize;
            let wanted: Vec<u32> = match which {
                LogitsFor::All => (start..start + len).collect(),
                LogitsFor::Last => vec![start + len - 1],
            };
            counts.push(wanted.len());
            rows.extend(wanted);
            start += len;
        }
        let picked = if rows.len() == n {
            xs
        } else {
            let count = rows.len();
            xs.index_select(&Tensor::from_vec(rows, count, &self.device)?, 0)?
        };
        let all = linear(&self.norm.forward(&picked)?, &self.lm_head)?.to_dtype(DType::F32)?;
        let mut logits = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for count in counts {
            logits.push(all.narrow(0, offset, count)?);
            offset += count;
        }
        Ok(logits)
    }
}
