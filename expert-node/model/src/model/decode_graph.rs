//! Batch-1 decode replayed from a CUDA graph ([`crate::ops::cuda::capture`]): the step — every
//! layer with its experts, then the final norm — captured once and then launched with one
//! call, with only the token's embedding (looked up on the GPU), cos/sin and the cache table
//! written into its inputs before each launch; lm_head follows as one launch of its own. Same
//! kernels in the same order as the eager path, so the same logits bit for bit. The first step
//! runs eagerly (it loads every kernel, which a capture cannot), the second is captured, and
//! every later one — any sequence, its cache anywhere, up to the decode-attention kernel's
//! longest — replays it; one graph per decode-attention split count (long caches are split
//! over several blocks per head, a few ranges of lengths). Where it applies:
//! [`super::Model::enable_decode_graph`].

use candle_core::{DType, Tensor};
use half::bf16;

use super::layer::{Caches, RoutedExperts};
use super::{Model, ModelError, Result, SequenceInput};
use crate::ops::{cuda, linear};
use crate::{CallContext, Pass};

/// Captured steps kept at most (per split count and expert pass: a cluster whose nodes come and
/// go makes a new one each time).
const MAX_CAPTURED: usize = 8;

pub(super) struct DecodeGraph {
    /// The token's embedding, `[1, hidden]` (looked up before the launch: candle's
    /// `index_select` uploads its shapes from the host, which a graph cannot replay).
    input: Tensor,
    /// cos then sin of the token's position, bf16 `[2, head_dim]`.
    rope: Tensor,
    tables: cuda::DecodeTables,
    /// The step's final hidden state after the norm, `[1, hidden]`: lm_head runs on it after
    /// the launch, outside the graph — one launch (cuBLAS at a real vocabulary), so a graph
    /// saves nothing there, and cuBLAS's own workspace stays out of the capture.
    hidden: Tensor,
    /// The step captured per decode-attention split count (`DecodeTables::splits`: short caches
    /// take one block per head, long ones flash-decoding's passes, a launch sequence of its own)
    /// and expert pass (`Pass::Ordered`'s key; 0 for experts in this process), oldest first.
    captured: Vec<(usize, u64, cuda::Captured)>,
    /// Split counts a step has run with eagerly: the next step with one of them is captured.
    warmed: Vec<usize>,
    /// A capture failed: every step runs eagerly from then on (logged once).
    failed: bool,
    /// Steps run from the graph (their expert pass, if any, done).
    replays: u64,
}

impl DecodeGraph {
    pub(super) fn new(model: &Model) -> Result<Self> {
        let cfg = &model.cfg;
        let dev = &model.device;
        Ok(Self {
            input: Tensor::zeros((1, cfg.hidden_size), model.dtype, dev)?,
            rope: Tensor::zeros((2, cfg.head_dim), DType::BF16, dev)?,
            tables: cuda::DecodeTables::new(
                dev,
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                (cfg.num_key_value_heads, cfg.head_dim),
            )?,
            hidden: Tensor::zeros((1, cfg.hidden_size), model.dtype, dev)?,
            captured: Vec::new(),
            warmed: Vec::new(),
            failed: false,
            replays: 0,
        })
    }

    /// Steps run from the graph so far (a model's first two decode steps run without it).
    pub(super) fn replays(&self) -> u64 {
        self.replays
    }
}

impl Model {
    /// One decode step of `seq` (one token after a non-empty cache) through the graph; `None`
    /// (nothing done) when the step does not fit it: another shape, or a cache longer than the
    /// decode-attention kernel takes, or experts elsewhere that cannot take the step's layers
    /// in one pass now (or failed to: the step then runs again without the graph). Returns the
    /// step's logits `[1, vocab]` (f32, a tensor of their own) and advances the cache.
    pub(super) fn graph_step(
        &self,
        graph: &std::sync::Mutex<DecodeGraph>,
        seq: &mut SequenceInput<'_>,
        ctx: &CallContext,
    ) -> Result<Option<Tensor>> {
        if seq.tokens.len() != 1 || seq.cache.seq_len() == 0 {
            return Ok(None);
        }
        self.check_input(seq)?;
        let mut g = graph
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if g.failed {
            return Ok(None);
        }
        let shape = (self.cfg.num_key_value_heads, 1, self.cfg.head_dim);
        let past = seq.cache.seq_len();
        let buffers = (0..self.layers.len())
            .map(|l| seq.cache.reserve(l, shape, &self.embed_tokens))
            .collect::<Result<Vec<_>>>()?;
        let caches: Vec<cuda::CacheBuffers<'_>> = buffers
            .iter()
            .map(|(k, v)| cuda::CacheBuffers { k, v, past })
            .collect();
        if !g.tables.write(&caches)? {
            return Ok(None);
        }
        let ids = Tensor::new(seq.tokens, &self.device)?;
        g.input
            .slice_set(&self.embed_tokens.index_select(&ids, 0)?, 0, 0)?;
        let (cos, sin) = self.rotary.cos_sin_values(&seq.positions);
        let rope: Vec<bf16> = cos.iter().chain(&sin).map(|&v| bf16::from_f32(v)).collect();
        cuda::upload_into(&g.rope, &rope)?;
        let splits = g.tables.splits();
        let (key, ordered) = match self.experts.begin_pass(&self.device, 1, ctx) {
            Pass::NotNeeded => (0, false),
            Pass::Ordered(key) => (key, true),
            Pass::Unavailable => return Ok(None),
        };
        // Ends an ordered pass on every way out (a failed launch included).
        let pass = EndPass(self, ordered);
        let mut replayed = false;
        if let Some((_, _, captured)) = g
            .captured
            .iter()
            .find(|(n, k, _)| (*n, *k) == (splits, key))
        {
            captured.launch()?;
            replayed = true;
        } else if g.warmed.contains(&splits) {
            // Nothing else may queue work on the stream while it is captured.
            let quiet = self.usage.device_access();
            let captured = cuda::capture(&self.device, || self.graph_body(&g));
            drop(quiet);
            match captured {
                Ok(captured) => {
                    captured.launch()?;
                    replayed = true;
                    if g.captured.len() >= MAX_CAPTURED {
                        g.captured.remove(0);
                    }
                    g.captured.push((splits, key, captured));
                }
                Err(error) => {
                    tracing::warn!(%error, "capturing the batch-1 decode step in a CUDA graph failed; decoding without graphs from now on");
                    g.failed = true;
                    // Nothing of the capture ran: this step runs now.
                    self.graph_body(&g)?;
                }
            }
        } else {
            self.graph_body(&g)?;
            g.warmed.push(splits);
        }
        let logits = linear(&g.hidden, &self.lm_head)?.to_dtype(DType::F32)?;
        if let Err(error) = pass.end() {
            // The cache is not advanced: the step runs again over the same positions.
            tracing::warn!(%error, "the experts' pass of a batch-1 step failed; running the step again without the graph");
            return Ok(None);
        }
        if replayed {
            g.replays += 1;
        }
        seq.cache.advance(1);
        self.usage.record_tokens(1);
        Ok(Some(logits))
    }
}

/// An ordered expert pass (`true`) still to be ended: [`EndPass::end`], or on drop.
struct EndPass<'a>(&'a Model, bool);

impl EndPass<'_> {
    /// Every layer of the step was queued.
    fn end(mut self) -> std::result::Result<(), crate::ExpertError> {
        if std::mem::replace(&mut self.1, false) {
            self.0.experts.end_pass(true)
        } else {
            Ok(())
        }
    }
}

impl Drop for EndPass<'_> {
    fn drop(&mut self) {
        if self.1
            && let Err(error) = self.0.experts.end_pass(false)
        {
            tracing::warn!(%error, "the experts' pass of a failed batch-1 step failed too");
        }
    }
}

impl Model {
    /// The launches of one step up to lm_head, reading the embedding, cos/sin and cache table
    /// from `g` and writing the normed hidden state into it; every tensor it makes is dropped
    /// before it returns (the capture's rule).
    fn graph_body(&self, g: &DecodeGraph) -> Result<()> {
        let cos = g.rope.narrow(0, 0, 1)?;
        let sin = g.rope.narrow(0, 1, 1)?;
        let ctx = CallContext::default();
        let routed = RoutedExperts {
            experts: self.experts.as_ref(),
            usage: &self.usage,
            ctx: &ctx,
        };
        let mut caches = Caches::Table(&g.tables);
        let xs = self.run_layers(g.input.clone(), &cos, &sin, &mut caches, &routed, &[])?;
        g.hidden
            .slice_set(&self.norm.forward(&xs)?, 0, 0)
            .map_err(ModelError::from)
    }
}
