//! The Qwen3-Omni thinker text model (and plain Qwen3-MoE) as the coordinator runs it:
//! `Qwen3OmniMoeThinkerTextModel` in Hugging Face transformers 4.57.3 (embeddings, the decoder
//! layers, the final norm), plus the `lm_head` of `Qwen3OmniMoeThinkerForConditionalGeneration`.
//! The routed experts are behind [`crate::Experts`], local or remote. A forward pass takes a batch
//! of sequences, each with its own positions and KV cache.
//!
//! One file per module of the reference: `layer` (`…DecoderLayer`), `attention` (`…Attention`;
//! `decode_attention` is its fused CPU decode kernel), `router` (the gate of `…SparseMoeBlock`),
//! `rope` (`…RotaryEmbedding`, [`Positions`]), `kv_cache` ([`KvCache`]), `norm` (`…RMSNorm`) and
//! `linear`. Every module loads its tensors through [`crate::Weights`] with `new(cfg, w)`.
//!
//! Numerics mirror the reference in bf16 too: RMSNorm in f32 cast back before the weight, cos/sin
//! in f32, attention and router softmax in f32, residual adds in the compute dtype. See also the
//! Qwen3 technical report (arXiv:2505.09388).

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use omnishard_proto::ModelConfig;

use crate::ops::{cuda, head_dim_fits_gpu_kernels, linear};
use crate::usage::ExpertUsage;
use crate::weights::Weights;
use crate::{CallContext, Checkpoint, CheckpointError, ExpertError, Experts};

mod attention;
mod decode_attention;
mod decode_graph;
mod kv_cache;
mod layer;
pub(crate) mod linear;
mod norm;
mod rope;
mod router;

pub use kv_cache::KvCache;
pub use rope::Positions;

use decode_graph::DecodeGraph;
use layer::{Caches, DecoderLayer, RoutedExperts};
use norm::RmsNorm;
use rope::RotaryEmbedding;

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

/// One sequence's share of a batched forward pass.
pub struct SequenceInput<'a> {
    pub tokens: &'a [u32],
    pub positions: Positions,
    pub cache: &'a mut KvCache,
}

/// Embeddings from an encoder for `rows` consecutive tokens of a sequence's pass, from token
/// `start` on.
#[derive(Debug, Clone)]
pub struct MediaSpan {
    pub start: usize,
    /// `[rows, hidden_size]`.
    pub embeds: Tensor,
    /// Deepstack features (images and video): `deepstack[l]` `[rows, hidden_size]` is added to
    /// these rows of the hidden states after text layer `l` (`_deepstack_process`).
    pub deepstack: Vec<Tensor>,
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
    /// Batch-1 decode steps replayed from a CUDA graph, once enabled.
    decode_graph: Option<Mutex<DecodeGraph>>,
}

impl Model {
    /// Loads everything but the routed experts, which `experts` provides, from `ckpt` in `dtype`
    /// on `device`. The router gives the (layer, expert) pairs in `masked` logit -inf.
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
        experts: Arc<dyn Experts>,
        masked: &[(usize, usize)],
    ) -> Result<Self> {
        Self::new(
            cfg,
            Weights::text_root(ckpt, cfg, dtype, device),
            experts,
            masked,
        )
    }

    /// [`Model::load`] from the text model's root module `w` (`thinker` for Qwen3-Omni, the
    /// checkpoint's root for Qwen3-MoE: `model.…` and `lm_head` lie under it); computes in
    /// `w`'s dtype on its device.
    pub fn new(
        cfg: &ModelConfig,
        w: Weights,
        experts: Arc<dyn Experts>,
        masked: &[(usize, usize)],
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let model = w.pp("model");
        let embed_tokens = model
            .pp("embed_tokens")
            .get("weight", &[cfg.vocab_size, h])?;
        let layers_w = model.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::new(cfg, l, masked, layers_w.pp(l)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(h, cfg.rms_norm_eps, model.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            w.pp("lm_head").get("weight", &[cfg.vocab_size, h])?
        };
        Ok(Self {
            cfg: cfg.clone(),
            dtype: w.dtype(),
            device: w.device().clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: RotaryEmbedding::new(cfg),
            experts,
            usage: Arc::new(
                ExpertUsage::new(cfg.num_hidden_layers, cfg.num_experts)
                    .with_device_counts(w.device())?,
            ),
            decode_graph: None,
        })
    }

    /// Decode steps run from the CUDA graph so far (0 when it is not enabled).
    pub fn graph_replays(&self) -> u64 {
        self.decode_graph.as_ref().map_or(0, |g| {
            g.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .replays()
        })
    }

    /// Runs batch-1 decode steps (one sequence, one token after its prompt) from a CUDA graph
    /// from now on ([`decode_graph`]): the same logits, without the host issuing each of the
    /// step's launches. Applies to a bf16 model on a GPU opened with a stream of its own
    /// ([`crate::DeviceSpec::open`]) whose every MoE layer's experts are held in this process
    /// on that GPU; `Err` says why not (the model runs as before then).
    pub fn enable_decode_graph(&mut self) -> std::result::Result<(), String> {
        if self.dtype != DType::BF16 {
            return Err(format!("the model computes in {:?}, not bf16", self.dtype));
        }
        if !cuda::can_capture(&self.device) {
            return Err(format!(
                "{:?} is not a GPU with a stream of its own",
                self.device
            ));
        }
        let d = self.cfg.head_dim;
        if !head_dim_fits_gpu_kernels(d) {
            return Err(format!(
                "head_dim {d} does not fit the decode-attention kernel"
            ));
        }
        if self
            .usage
            .layer_counts_on_device(0)
            .ok()
            .flatten()
            .is_none()
        {
            return Err("the expert usage counts are not on the GPU".into());
        }
        if let Some(why) = self
            .layers
            .iter()
            .find_map(|layer| layer.graph_blocker(self.experts.as_ref()))
        {
            return Err(why);
        }
        let graph = DecodeGraph::new(self).map_err(|e| e.to_string())?;
        self.decode_graph = Some(Mutex::new(graph));
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where the dense part runs.
    pub fn device(&self) -> &Device {
        &self.device
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
        self.forward_media(batch, which, ctx, &[])
    }

    /// [`Model::forward_for`] with media: `media[k]` lists spans of sequence `k`'s tokens in
    /// this pass whose embeddings are an encoder's output instead of the token table's (as the
    /// reference's `masked_scatter` of audio features over `<|audio_pad|>`); sequences past
    /// the end of `media` have none.
    pub fn forward_media(
        &self,
        batch: &mut [SequenceInput<'_>],
        which: LogitsFor,
        ctx: &CallContext,
        media: &[Vec<MediaSpan>],
    ) -> Result<Vec<Tensor>> {
        if let ([seq], Some(graph)) = (&mut *batch, &self.decode_graph)
            && media.iter().all(Vec::is_empty)
            && let Some(logits) = self.graph_step(graph, seq, ctx)?
        {
            return Ok(vec![logits]);
        }
        let mut all_ids = Vec::new();
        // Positions of every token of the batch, so cos/sin are built once.
        let mut all_positions = Positions {
            rows: [Vec::new(), Vec::new(), Vec::new()],
        };
        for seq in batch.iter() {
            self.check_input(seq)?;
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
        // Per layer, what deepstack adds to the batch's hidden states (rows of visual tokens).
        let mut deep: Vec<Option<Tensor>> = Vec::new();
        let mut offset = 0;
        for (k, seq) in batch.iter().enumerate() {
            for span in media.get(k).into_iter().flatten() {
                let rows = span.embeds.dim(0)?;
                if span.embeds.dims() != [rows, self.cfg.hidden_size]
                    || span.start + rows > seq.tokens.len()
                {
                    return Err(ModelError::Input(format!(
                        "media embeddings {:?} at token {} do not fit a {}-token sequence of width {}",
                        span.embeds.dims(),
                        span.start,
                        seq.tokens.len(),
                        self.cfg.hidden_size
                    )));
                }
                let at = offset + span.start;
                let place = [at..at + rows, 0..self.cfg.hidden_size];
                xs = xs.slice_assign(
                    &place,
                    &span.embeds.to_dtype(self.dtype)?.to_device(&self.device)?,
                )?;
                for (l, feature) in span.deepstack.iter().enumerate() {
                    if deep.len() <= l {
                        deep.resize(l + 1, None);
                    }
                    let base = match deep[l].take() {
                        Some(t) => t,
                        None => xs.zeros_like()?,
                    };
                    let rows_now = base.narrow(0, at, rows)?;
                    let added =
                        (rows_now + feature.to_dtype(self.dtype)?.to_device(&self.device)?)?;
                    deep[l] = Some(base.slice_assign(&place, &added)?);
                }
            }
            offset += seq.tokens.len();
        }
        let routed = RoutedExperts {
            experts: self.experts.as_ref(),
            usage: &self.usage,
            ctx,
        };
        let mut caches = Caches::Batch(&mut *batch);
        let xs = self.run_layers(xs, &cos, &sin, &mut caches, &routed, &deep)?;
        // The rows whose logits are wanted, for the whole batch at once.
        let mut rows = Vec::with_capacity(n);
        let mut counts = Vec::with_capacity(batch.len());
        let mut start = 0u32;
        for seq in batch.iter_mut() {
            let len = seq.tokens.len() as u32;
            seq.cache.advance(len as usize);
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

    /// Every decoder layer over `xs` `[tokens, hidden]` (the embeddings), `deep[l]` (deepstack,
    /// where present) added to layer `l`'s output; returns the hidden states before the final
    /// norm.
    fn run_layers(
        &self,
        mut xs: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut Caches<'_, '_>,
        routed: &RoutedExperts<'_>,
        deep: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let mut pending: Option<Tensor> = None;
        for (l, layer) in self.layers.iter().enumerate() {
            // For profiling (RUST_LOG=trace): when disabled this costs one relaxed load.
            let _layer = tracing::trace_span!("layer", layer = l, tokens = n).entered();
            let (h, mlp_out) = layer.forward(&xs, pending.as_ref(), cos, sin, caches, routed)?;
            xs = h;
            // This layer's output is xs + mlp_out: deepstack adds to it there.
            pending = Some(match deep.get(l).and_then(Option::as_ref) {
                Some(add) => (mlp_out + add)?,
                None => mlp_out,
            });
        }
        Ok(match pending {
            Some(mlp_out) => (xs + mlp_out)?,
            None => xs,
        })
    }

    /// Checks one sequence's share of a pass: tokens, as many positions in every row, ids in
    /// the vocabulary.
    fn check_input(&self, seq: &SequenceInput<'_>) -> Result<()> {
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
        Ok(())
    }
}
