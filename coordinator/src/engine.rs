//! Loading a model for the coordinator and running the two basic jobs on it: scoring (logits for
//! every input token, the fidelity tool) and generation with the KV cache.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use omnishard_model::fingerprint::fingerprint;
use omnishard_model::{
    CallContext, Checkpoint, CheckpointError, ComputeDtype, Experts, LocalExperts,
};
use omnishard_proto::{Architecture, ConfigError, ModelConfig, defaults};

use crate::media::AudioInput;
use crate::media::prompt::Expanded;
use crate::media::vision::VisionInput;
use crate::overlap;
use crate::remote::{ClusterError, RemoteExperts, RemoteOptions};
use crate::sampling::Sampler;
use omnishard_model::model::{
    KvCache, LogitsFor, MediaSpan, Model, ModelError, Positions, SequenceInput,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("invalid input: {0}")]
    Input(String),
}

/// `--cuda-graph`: whether batch-1 decode steps on a GPU replay a captured CUDA graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CudaGraph {
    Auto,
    Off,
}

pub struct Engine {
    model: Model,
    remote: Option<Arc<RemoteExperts>>,
    /// Steps of at least this many sequences run as two overlapped micro-batches when the
    /// experts are remote (`crate::overlap`); 0: never.
    overlap_min_sequences: usize,
    /// The audio tower (Qwen3-Omni), when the checkpoint has one and it was loaded.
    audio: Option<Arc<AudioInput>>,
    /// The vision tower and image processor (Qwen3-Omni), likewise.
    vision: Option<Arc<VisionInput>>,
}

impl Engine {
    /// Gives the engine the checkpoint's audio tower, so prompts may carry audio.
    pub fn set_audio(&mut self, audio: AudioInput) {
        self.audio = Some(Arc::new(audio));
    }

    pub fn audio(&self) -> Option<&AudioInput> {
        self.audio.as_deref()
    }

    /// Gives the engine the checkpoint's vision tower, so prompts may carry images and video.
    pub fn set_vision(&mut self, vision: VisionInput) {
        self.vision = Some(Arc::new(vision));
    }

    pub fn vision(&self) -> Option<&VisionInput> {
        self.vision.as_deref()
    }

    /// Loads the whole model in this process, experts included, onto `device`.
    pub fn load_local(
        dir: &Path,
        dtype: ComputeDtype,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let cfg = ModelConfig::from_model_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::load_local_from(&ckpt, &cfg, dtype, device)
    }

    /// [`Engine::load_local`] from an open checkpoint (files or dummy weights).
    pub fn load_local_from(
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        dtype: ComputeDtype,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let pairs = cfg.expert_pairs();
        let experts =
            LocalExperts::load(ckpt, cfg, &pairs, dtype.dtype(), device, |done, total| {
                if done % 256 == 0 || done == total {
                    tracing::info!(done, total, "experts loaded");
                }
            })?;
        Self::with_experts(ckpt, cfg, dtype, device, Arc::new(experts), &[])
    }

    /// Loads the dense part of the model and connects to expert nodes at `addresses` for the
    /// routed experts. With `allow_missing`, experts no node serves are masked out of the router.
    pub fn load_remote(
        dir: &Path,
        dtype: ComputeDtype,
        device: &Device,
        addresses: &[String],
        opts: RemoteOptions,
        allow_missing: bool,
    ) -> Result<Self, EngineError> {
        let cfg = ModelConfig::from_model_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::load_remote_from(&ckpt, &cfg, dtype, device, addresses, opts, allow_missing)
    }

    /// [`Engine::load_remote`] from an open checkpoint (files or dummy weights).
    pub fn load_remote_from(
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        dtype: ComputeDtype,
        device: &Device,
        addresses: &[String],
        opts: RemoteOptions,
        allow_missing: bool,
    ) -> Result<Self, EngineError> {
        let fp = fingerprint(cfg, ckpt)?;
        let (experts, masked) =
            RemoteExperts::connect(addresses, cfg, &fp, dtype.dtype(), opts, allow_missing)?;
        let experts = Arc::new(experts);
        let mut engine = Self::with_experts(ckpt, cfg, dtype, device, experts.clone(), &masked)?;
        engine.remote = Some(experts);
        Ok(engine)
    }

    /// Loads the dense part of the model and uses `experts` for the routed experts; the pairs in
    /// `masked` are excluded from routing.
    pub fn with_experts(
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        dtype: ComputeDtype,
        device: &Device,
        experts: Arc<dyn Experts>,
        masked: &[(usize, usize)],
    ) -> Result<Self, EngineError> {
        let model = Model::load(ckpt, cfg, dtype.dtype(), device, experts, masked)?;
        Ok(Self {
            model,
            remote: None,
            overlap_min_sequences: defaults::OVERLAP_MIN_SEQUENCES,
            audio: None,
            vision: None,
        })
    }

    /// With [`CudaGraph::Auto`], batch-1 decode steps replay a CUDA graph where the model allows
    /// it (bf16 on a GPU, the experts in this process on it; [`Model::enable_decode_graph`]);
    /// the log says whether they do, and why not. Returns whether they do.
    pub fn set_cuda_graph(&mut self, mode: CudaGraph) -> bool {
        if mode == CudaGraph::Off || !self.model.device().is_cuda() {
            return false;
        }
        match self.model.enable_decode_graph() {
            Ok(()) => {
                tracing::info!("batch-1 decode steps replay a CUDA graph");
                true
            }
            Err(reason) => {
                tracing::info!(%reason, "batch-1 decode steps run without a CUDA graph");
                false
            }
        }
    }

    /// Steps of at least `min_sequences` sequences (at least 2) run as two micro-batches whose
    /// attention and expert calls overlap, when the experts are on nodes; 0 turns that off.
    pub fn set_overlap_min_sequences(&mut self, min_sequences: usize) {
        self.overlap_min_sequences = min_sequences;
    }

    /// One forward pass over `batch` (see [`Model::forward_for`]), as two overlapped
    /// micro-batches where the overlap setting and the experts call for it.
    pub fn forward(
        &self,
        batch: &mut [SequenceInput<'_>],
        which: LogitsFor,
        ctx: &CallContext,
    ) -> Result<Vec<Tensor>, ModelError> {
        self.forward_media(batch, which, ctx, &[])
    }

    /// [`Engine::forward`] with encoder embeddings for some tokens (see
    /// [`Model::forward_media`]).
    pub fn forward_media(
        &self,
        batch: &mut [SequenceInput<'_>],
        which: LogitsFor,
        ctx: &CallContext,
        media: &[Vec<MediaSpan>],
    ) -> Result<Vec<Tensor>, ModelError> {
        let min = self.overlap_min_sequences;
        if self.remote.is_some() && min > 0 && batch.len() >= min.max(2) && !self.routes_on_gpu() {
            return overlap::forward(&self.model, batch, which, ctx, media);
        }
        self.model.forward_media(batch, which, ctx, media)
    }

    /// Every MoE layer goes to the nodes with its routing left on the GPU (`--gpu-routing`). No
    /// host then waits within a step, so there is no host wait for a micro-batch to hide: the two
    /// halves would queue on the one GPU stream in turn and each make the nodes read their
    /// experts again (BENCHMARKS.md, issue 15), and the split is skipped.
    fn routes_on_gpu(&self) -> bool {
        self.remote.as_ref().is_some_and(|remote| {
            let cfg = self.model.config();
            (0..cfg.num_hidden_layers)
                .filter(|&l| cfg.is_moe_layer(l))
                .all(|l| remote.takes_device_routing(l))
        })
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The expert nodes, when the experts are remote.
    pub fn remote(&self) -> Option<&Arc<RemoteExperts>> {
        self.remote.as_ref()
    }

    /// Logits (f32) for every token of `tokens`, one row of vocab_size per token. Without
    /// `positions`, text positions 0..n.
    pub fn score(
        &self,
        tokens: &[u32],
        positions: Option<Positions>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        self.score_media(tokens, positions, &[])
    }

    /// [`Engine::score`] with encoder embeddings in place of some tokens' (audio).
    pub fn score_media(
        &self,
        tokens: &[u32],
        positions: Option<Positions>,
        media: &[MediaSpan],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::Input("no token ids given".into()));
        }
        let positions = match positions {
            Some(p) => {
                self.check_positions(&p, tokens.len())?;
                p
            }
            None => Positions::text(0, tokens.len()),
        };
        let mut cache = KvCache::new();
        let mut batch = [SequenceInput {
            tokens,
            positions,
            cache: &mut cache,
        }];
        let logits = self.model.forward_media(
            &mut batch,
            LogitsFor::All,
            &CallContext::default(),
            &[media.to_vec()],
        )?;
        Ok(logits[0].to_vec2::<f32>().map_err(ModelError::from)?)
    }

    fn check_positions(&self, p: &Positions, n: usize) -> Result<(), EngineError> {
        if p.rows.iter().any(|r| r.len() != n) {
            return Err(EngineError::Input(format!(
                "position ids need three rows of {n} entries (one per token), got rows of {:?}",
                p.rows.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        let plain = self.config().architecture == Architecture::Qwen3Moe;
        if plain && (p.rows[0] != p.rows[1] || p.rows[0] != p.rows[2]) {
            return Err(EngineError::Input(
                "this qwen3_moe model uses 1-D RoPE: the three position rows must be equal".into(),
            ));
        }
        Ok(())
    }

    /// Generates up to `max_tokens` tokens after `prompt` using the KV cache, calling `on_token`
    /// with each new token; stops early on a stop token (which is returned but not passed on) or
    /// when `on_token` returns false.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        stop_tokens: &[u32],
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>, EngineError> {
        let prompt = Expanded {
            tokens: prompt.to_vec(),
            spans: Vec::new(),
            positions: None,
            rope_delta: 0,
        };
        self.generate_media(&prompt, max_tokens, sampler, stop_tokens, on_token)
    }

    /// [`Engine::generate`] of a prompt with media: encoder embeddings in place of its
    /// placeholders, and its own mRoPE positions (images), decoding continuing at `index +
    /// rope_delta`.
    pub fn generate_media(
        &self,
        expanded: &Expanded,
        max_tokens: usize,
        sampler: &mut Sampler,
        stop_tokens: &[u32],
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>, EngineError> {
        let prompt = expanded.tokens.as_slice();
        if prompt.is_empty() {
            return Err(EngineError::Input("the prompt is empty".into()));
        }
        if let Some(max) = self.config().max_position_embeddings
            && prompt.len() + max_tokens > max
        {
            return Err(EngineError::Input(format!(
                "prompt ({} tokens) + max tokens ({max_tokens}) exceeds the model's context of {max}",
                prompt.len()
            )));
        }
        let mut cache = KvCache::new();
        let mut history = prompt.to_vec();
        let mut generated = Vec::new();
        let mut input = prompt.to_vec();
        let mut media = vec![expanded.spans.clone()];
        let mut prompt_positions = expanded.positions.clone();
        let mut next_pos = 0u32;
        while generated.len() < max_tokens {
            let positions = match prompt_positions.take() {
                Some(p) => {
                    next_pos = (prompt.len() as i64 + expanded.rope_delta).max(0) as u32;
                    p
                }
                None => {
                    let p = Positions::text(next_pos, input.len());
                    next_pos = p.next_text_position();
                    p
                }
            };
            let mut batch = [SequenceInput {
                tokens: &input,
                positions,
                cache: &mut cache,
            }];
            let logits = self.model.forward_media(
                &mut batch,
                LogitsFor::Last,
                &CallContext::default(),
                &media,
            )?;
            // The media is in the prompt, computed by the first pass.
            media.clear();
            let token = sampler
                .sample_tensor(&logits[0], &history)
                .map_err(ModelError::from)?;
            generated.push(token);
            history.push(token);
            if stop_tokens.contains(&token) || !on_token(token) {
                break;
            }
            input = vec![token];
        }
        Ok(generated)
    }
}
