//! The flags every model-running command shares (`generate`, `score`, `serve`): the checkpoint,
//! dtype and device, in-process experts or expert nodes (addresses, deadlines, TLS, hedging), and
//! loading the model with them, its audio and vision towers included.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use omnishard_coordinator::media::AudioInput;
use omnishard_coordinator::media::vision::{VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VisionInput};
use omnishard_coordinator::remote::{
    CudaIpc, GpuRouting, RemoteOptions, RpcObserver, ShmLane, Verifier, VerifyExperts,
};
use omnishard_coordinator::{ComputeDtype, CudaGraph, Engine};
use omnishard_model::{Checkpoint, DeviceSpec, LoadFormat};
use omnishard_proto::placement::Placement;
use omnishard_proto::{ModelConfig, defaults};

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json). Default:
    /// the demo model shipped in the repository.
    #[arg(long, env = "OMNISHARD_MODEL")]
    pub(crate) model: Option<PathBuf>,
    /// Compute dtype. f32 matches the reference to ~1e-5; bf16 halves memory. Expert nodes must
    /// use the same.
    #[arg(long, env = "OMNISHARD_DTYPE", default_value = "f32")]
    pub(crate) dtype: ComputeDtype,
    /// Where this process computes: `cpu`, or `cuda` / `cuda:N` for a GPU (a build with the
    /// `cuda` feature): embeddings, attention and its KV cache, routers, the final norm and
    /// lm_head, and the experts when they run in this process (sampling reads the logits on the
    /// host).
    #[arg(long, env = "OMNISHARD_DEVICE", default_value = "cpu")]
    pub(crate) device: DeviceSpec,
    /// Where the weights come from: `auto` reads the checkpoint's safetensors; `dummy` makes
    /// random weights of config.json's shapes in memory from --weights-seed (benchmarks at the real size
    /// without the checkpoint; expert nodes must use the same --load-format and --weights-seed).
    #[arg(long, env = "OMNISHARD_LOAD_FORMAT", default_value = "auto")]
    pub(crate) load_format: LoadFormat,
    /// Seed of the dummy weights (--load-format dummy); `coordinator synth --seed` writes the same.
    #[arg(long, env = "OMNISHARD_WEIGHTS_SEED", default_value_t = 0)]
    pub(crate) weights_seed: u64,
    /// Expert nodes (host:port,...) serving the routed experts. Without --nodes or --placement
    /// the experts run in this process.
    #[arg(
        long,
        env = "OMNISHARD_NODES",
        value_delimiter = ',',
        conflicts_with = "placement",
        value_parser = node_address
    )]
    pub(crate) nodes: Vec<String>,
    /// Placement file (TOML) whose node addresses serve the experts; the routing table still
    /// comes from what each node reports holding.
    #[arg(long, env = "OMNISHARD_PLACEMENT")]
    pub(crate) placement: Option<PathBuf>,
    /// Start even if some (layer, expert) pairs are served by no node: they are masked out of
    /// the router (logit -inf), which changes the model's output.
    #[arg(long, env = "OMNISHARD_ALLOW_MISSING_EXPERTS")]
    pub(crate) allow_missing_experts: bool,
    /// Deadline of one layer's call to one expert node, in milliseconds.
    #[arg(long, env = "OMNISHARD_RPC_TIMEOUT_MS", default_value_t = defaults::RPC_TIMEOUT.as_millis() as u64)]
    pub(crate) rpc_timeout_ms: u64,
    /// How long to wait at start-up for expert nodes to accept connections and finish loading.
    #[arg(long, env = "OMNISHARD_STARTUP_TIMEOUT_S", default_value_t = defaults::STARTUP_TIMEOUT.as_secs())]
    pub(crate) startup_timeout_s: u64,
    /// Largest gRPC message sent to or accepted from an expert node, in MiB.
    #[arg(long, env = "OMNISHARD_MAX_MESSAGE_MIB", default_value_t = defaults::MAX_MESSAGE_MIB)]
    pub(crate) max_message_mib: usize,
    /// How often every expert node's health is checked in the background (a node that failed is
    /// re-admitted once it answers with the right fingerprint), in milliseconds.
    #[arg(long, env = "OMNISHARD_HEALTH_INTERVAL_MS", default_value_t = defaults::HEALTH_INTERVAL.as_millis() as u64)]
    pub(crate) health_interval_ms: u64,
    /// With expert nodes: a step of at least this many sequences runs as two micro-batches, one
    /// computing attention while the other's expert calls are on the wire. Same output in bf16
    /// on CPUs without AMX; elsewhere (f32, AMX, GPU) logits move by rounding, as with any change
    /// of batch composition. 0 turns the overlap off; 1 acts as 2 (one sequence is never split).
    /// Steps whose every layer takes --gpu-routing are not split: no host waits there to hide.
    #[arg(long, env = "OMNISHARD_OVERLAP_MIN_SEQS", default_value_t = defaults::OVERLAP_MIN_SEQUENCES)]
    pub(crate) overlap_min_seqs: usize,
    /// TLS to `https://` expert nodes: --tls-ca verifies them, --tls-cert/--tls-key is the
    /// client certificate nodes started with --tls-ca require.
    #[command(flatten)]
    pub(crate) tls: omnishard_proto::tls::TlsArgs,
    /// Hedging: a call to an expert node that runs well past that node's usual latency for its
    /// size (three times mean + 4 deviations, never less than this many milliseconds) is re-sent
    /// to replicas of its experts and the first answer taken; the late node is marked down until
    /// its health check passes. Experts without a live replica wait for --rpc-timeout-ms. 0
    /// turns hedging off.
    #[arg(long, env = "OMNISHARD_HEDGE_FLOOR_MS", default_value_t = defaults::HEDGE_FLOOR.as_millis() as u64)]
    pub(crate) hedge_floor_ms: u64,
    /// Expert nodes' weights are checked, not trusted: when a node is admitted (start-up,
    /// `POST /admin/nodes`, a new process at a node's address, down or up) this
    /// many of the experts it holds, drawn at random, are sent a probe batch whose answers must
    /// match the same experts computed here from the checkpoint; `all` probes every one (reads
    /// all their weights here), `off` trusts the nodes.
    #[arg(long, env = "OMNISHARD_VERIFY_EXPERTS", default_value = "8")]
    pub(crate) verify_experts: VerifyExperts,
    /// With --device cuda: expert nodes on GPUs of this host leave each answer in GPU memory
    /// they lend, and the coordinator copies it GPU to GPU (CUDA IPC) instead of the bytes
    /// crossing the host and gRPC. `auto` uses it wherever it works (a node where it fails is
    /// logged and answers over gRPC from then on); `off` always sends the bytes.
    #[arg(long, env = "OMNISHARD_CUDA_IPC", default_value = "auto")]
    pub(crate) cuda_ipc: CudaIpc,
    /// With --device cuda and CUDA IPC: a layer whose experts each have one live holder, all on
    /// other GPUs of this host, leaves its routing and hidden states in the coordinator's GPU memory;
    /// the nodes write their rows back there, and CUDA events between the GPUs order it, so
    /// neither host waits for its GPU within a step (the same logits). `auto` uses it wherever
    /// it applies (from a node's second call on; replicas both up, or a node that cannot, take
    /// the host path); `off` plans every layer's call on the host.
    #[arg(long, env = "OMNISHARD_GPU_ROUTING", default_value = "auto")]
    pub(crate) gpu_routing: GpuRouting,
    /// Expert nodes on this host take their per-layer calls through a shared-memory lane (a
    /// file in /dev/shm the node maps; the same messages as over gRPC), with the waiting side
    /// polling briefly before it sleeps: at decode this removes most of a call's cost, the
    /// loopback network stack and four thread wake-ups. `auto` opens one to every node that
    /// can map it (same host, same /dev/shm; the others, and answers too large for a slot,
    /// go over gRPC); `off` sends every call over gRPC.
    #[arg(long, env = "OMNISHARD_SHM_LANE", default_value = "auto")]
    pub(crate) shm_lane: ShmLane,
    /// With --device cuda: batch-1 decode steps (one sequence generating) replay a CUDA graph
    /// captured at the second step, so the host no longer issues each of a step's ~600 kernel
    /// launches; the same logits. `auto` uses it where it applies (bf16, the experts in this
    /// process on the GPU; the log says which); `off` launches every kernel from the host.
    #[arg(long, env = "OMNISHARD_CUDA_GRAPH", default_value = "auto")]
    pub(crate) cuda_graph: CudaGraph,
    /// Fewest pixels a video frame is resized to (Qwen3-Omni's processor: 128 × 32²).
    #[arg(long, env = "OMNISHARD_VIDEO_MIN_PIXELS", default_value_t = VIDEO_MIN_PIXELS)]
    pub(crate) video_min_pixels: usize,
    /// Most pixels a video frame is resized to (Qwen3-Omni's processor: 768 × 32²).
    #[arg(long, env = "OMNISHARD_VIDEO_MAX_PIXELS", default_value_t = VIDEO_MAX_PIXELS)]
    pub(crate) video_max_pixels: usize,
}

impl ModelArgs {
    pub(crate) fn model_dir(&self) -> anyhow::Result<PathBuf> {
        model_or_demo(self.model.as_deref())
    }

    /// Loads the model with its experts in this process or on the given expert nodes.
    pub(crate) fn load(&self) -> anyhow::Result<Engine> {
        self.load_observed(None)
    }

    pub(crate) fn load_observed(
        &self,
        observer: Option<Arc<dyn RpcObserver>>,
    ) -> anyhow::Result<Engine> {
        let dir = &self.model_dir()?;
        let addresses = match &self.placement {
            Some(path) => {
                let cfg = ModelConfig::from_model_dir(dir)?;
                Placement::from_file(path, &cfg)?
                    .nodes
                    .into_iter()
                    .map(|n| n.address)
                    .collect()
            }
            None => self.nodes.clone(),
        };
        let cfg = ModelConfig::from_model_dir(dir)?;
        let ckpt = Checkpoint::load(dir, &cfg, self.load_format, self.weights_seed)?;
        let device = self.device.open()?;
        // Qwen3-Omni's audio tower, where the checkpoint's files have one (not with dummy
        // weights, which cover the text model only).
        let audio = match self.load_format {
            LoadFormat::Auto => AudioInput::load(dir, &ckpt, self.dtype.dtype(), &device)?,
            LoadFormat::Dummy => None,
        };
        // And its vision tower, where it also ships the image processor's settings.
        let vision = match self.load_format {
            LoadFormat::Auto if dir.join("preprocessor_config.json").is_file() => {
                let mut vision = VisionInput::load(dir, &ckpt, self.dtype.dtype(), &device)?;
                if let Some(v) = &mut vision {
                    v.set_video_pixels(self.video_min_pixels, self.video_max_pixels)?;
                }
                vision
            }
            _ => None,
        };
        if addresses.is_empty() {
            if self.allow_missing_experts {
                bail!("--allow-missing-experts needs --nodes or --placement");
            }
            let mut engine = Engine::load_local_from(&ckpt, &cfg, self.dtype, &device)?;
            engine.set_cuda_graph(self.cuda_graph);
            if let Some(audio) = audio {
                engine.set_audio(audio);
            }
            if let Some(vision) = vision {
                engine.set_vision(vision);
            }
            return Ok(engine);
        }
        let opts = RemoteOptions {
            rpc_timeout: Duration::from_millis(self.rpc_timeout_ms.max(1)),
            startup_timeout: Duration::from_secs(self.startup_timeout_s),
            max_message_bytes: self.max_message_mib << 20,
            health_interval: Duration::from_millis(self.health_interval_ms.max(10)),
            observer,
            tls: self.tls.client()?,
            hedge_floor: (self.hedge_floor_ms > 0)
                .then(|| Duration::from_millis(self.hedge_floor_ms)),
            verify: (self.verify_experts != VerifyExperts::Off)
                .then(|| Verifier::new(ckpt.clone(), &cfg, self.verify_experts)),
            cuda_ipc: self.cuda_ipc == CudaIpc::Auto,
            ipc_input_min_bytes: defaults::IPC_INPUT_MIN_BYTES,
            shm_lane: self.shm_lane == ShmLane::Auto,
            gpu_routing: self.gpu_routing == GpuRouting::Auto,
        };
        let mut engine = Engine::load_remote_from(
            &ckpt,
            &cfg,
            self.dtype,
            &device,
            &addresses,
            opts,
            self.allow_missing_experts,
        )?;
        engine.set_overlap_min_sequences(self.overlap_min_seqs);
        engine.set_cuda_graph(self.cuda_graph);
        if let Some(audio) = audio {
            engine.set_audio(audio);
        }
        if let Some(vision) = vision {
            engine.set_vision(vision);
        }
        Ok(engine)
    }
}

pub(crate) fn node_address(s: &str) -> Result<String, String> {
    omnishard_proto::address::check_node_address(s)?;
    Ok(s.to_string())
}

pub(crate) fn listen_address(s: &str) -> Result<std::net::SocketAddr, String> {
    omnishard_proto::address::resolve_listen(s)
}

/// `--model`, or the demo model shipped with omnishard.
pub(crate) fn model_or_demo(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir.to_path_buf()),
        None => defaults::demo_model_dir().map_err(anyhow::Error::msg),
    }
}
