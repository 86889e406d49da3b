//! `coordinator`: the command-line entry point. Every flag can also be set through the
//! environment variable named in `--help`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use omnishard_coordinator::cluster::{LocalCluster, find_expert_node_binary};
use omnishard_coordinator::kv_budget;
use omnishard_coordinator::media::AudioInput;
use omnishard_coordinator::media::audio::decode as decode_audio;
use omnishard_coordinator::media::image;
use omnishard_coordinator::media::prompt::{MediaItems, expand};
use omnishard_coordinator::media::vision::VisionInput;
use omnishard_coordinator::metrics::Metrics;
use omnishard_coordinator::remote::{RemoteOptions, RpcObserver};
use omnishard_coordinator::scheduler::SchedulerConfig;
use omnishard_coordinator::serve::{self, ServeSettings};
use omnishard_coordinator::server::loading::Progress;
use omnishard_coordinator::{
    ComputeDtype, DecodeStream, Engine, Positions, Sampler, SamplingParams, TextTokenizer,
    chat::{ChatPrompter, ChatTemplate, Conversation, ReasoningParser, ToolCallParser},
};
use omnishard_model::{Checkpoint, DeviceSpec, LoadFormat};
use omnishard_proto::placement::Placement;
use omnishard_proto::{ModelConfig, defaults};

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "omnishard coordinator: runs a Qwen3-Omni / Qwen3-MoE model whose experts live in this process or on expert nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout; tokens/s go to stderr.
    Generate(GenerateArgs),
    /// Print the logits of every input token as JSON: {"logits": [[...vocab_size floats], ...]}.
    Score(ScoreArgs),
    /// Serve an OpenAI-compatible HTTP API with continuous batching.
    Serve(ServeArgs),
    /// Start N local expert-node processes (shard i/N each), run a command against them, and
    /// stop them all on exit, on error and on Ctrl-C.
    Cluster(ClusterArgs),
    /// Write a placement file for N nodes, balanced by bytes and, with --stats, by expected
    /// load, replicating the most-used experts.
    Plan(omnishard_coordinator::plan::command::PlanArgs),
    /// Write a random-weight checkpoint with a real model's dimensions (for benchmarks).
    Synth(omnishard_coordinator::synth::SynthArgs),
    /// Measure decode, prefill, RPC overhead, clusters and peers at the real model's size; prints
    /// a table and, last, one JSON line (see BENCHMARKS.md).
    Bench(omnishard_coordinator::bench::BenchArgs),
    /// Health check for containers: exit 0 when a coordinator's /health answers 200 (--url) or an
    /// expert node's gRPC health is SERVING (--node), else 1 with the reason.
    Probe(omnishard_coordinator::probe::ProbeArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address of the HTTP server.
    #[arg(long, env = "OMNISHARD_LISTEN", default_value = "127.0.0.1:8000", value_parser = listen_address)]
    listen: std::net::SocketAddr,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long, env = "OMNISHARD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Model id reported by /v1/models and accepted in requests (default: the model directory's name).
    #[arg(long, env = "OMNISHARD_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Sequences prefilling or decoding at once.
    #[arg(long, env = "OMNISHARD_MAX_ACTIVE_SEQS", default_value_t = 64)]
    max_active_seqs: usize,
    /// Tokens per forward pass: one per decoding sequence, the rest for prompt chunks.
    #[arg(long, env = "OMNISHARD_MAX_BATCHED_TOKENS", default_value_t = 512)]
    max_batched_tokens: usize,
    /// Prompt plus generated tokens per sequence (default: the model's max_position_embeddings, else 4096).
    #[arg(long, env = "OMNISHARD_MAX_CONTEXT")]
    max_context: Option<usize>,
    /// Memory for the KV cache of running sequences and cached prefixes, e.g. 8GiB (default:
    /// half the memory available at start-up). It must hold --max-context tokens; when running
    /// sequences outgrow it the newest is preempted and recomputed later.
    #[arg(long, env = "OMNISHARD_KV_CACHE_MEMORY", value_parser = kv_budget::parse_bytes)]
    kv_cache_memory: Option<usize>,
    /// Do not keep the KV of prompts' whole 16-token blocks for later prompts that start the
    /// same way (automatic prefix caching is on by default).
    #[arg(long, env = "OMNISHARD_NO_PREFIX_CACHING")]
    no_prefix_caching: bool,
    /// Requests waiting for a slot; more get HTTP 429.
    #[arg(long, env = "OMNISHARD_QUEUE_SIZE", default_value_t = 256)]
    queue_size: usize,
    /// Let special tokens written in prompts and messages (`<|im_start|>`, ...) act as control
    /// tokens, for trusted callers that render their own templates. Off: they are plain text, so
    /// a message cannot forge a turn.
    #[arg(long, env = "OMNISHARD_SPECIAL_TOKENS_IN_TEXT")]
    special_tokens_in_text: bool,
    /// Jinja chat template file to use instead of the checkpoint's (chat_template.jinja,
    /// chat_template.json or tokenizer_config.json; plain ChatML, with a warning, when it has none).
    #[arg(long, env = "OMNISHARD_CHAT_TEMPLATE")]
    chat_template: Option<PathBuf>,
    /// How chat answers are split into `reasoning_content` and `content`: `auto` uses qwen3's
    /// `<think>…</think>` when the chat template writes `<think>`.
    #[arg(long, env = "OMNISHARD_REASONING_PARSER", value_enum, default_value_t)]
    reasoning_parser: ReasoningParser,
    /// How tool calls are read from chat answers: `auto` uses hermes `<tool_call>` blocks when
    /// the chat template writes `<tool_call>`; with `none`, requests offering tools need
    /// `tool_choice: "none"`.
    #[arg(long, env = "OMNISHARD_TOOL_CALL_PARSER", value_enum, default_value_t)]
    tool_call_parser: ToolCallParser,
    /// Seconds an HTTP/1 connection may take to send a request head, idle keep-alive waits
    /// included, before the server closes it (stalled and abandoned clients hold no socket).
    #[arg(long, env = "OMNISHARD_HTTP_IDLE_TIMEOUT_S", default_value_t = defaults::HTTP_IDLE_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
    http_idle_timeout_s: u64,
    /// On SIGTERM or Ctrl-C: new requests get 503 with Retry-After and /health fails at once;
    /// requests in flight get this many seconds to finish, then end with an error event. A
    /// second signal exits at once.
    #[arg(long, env = "OMNISHARD_SHUTDOWN_GRACE_S", default_value_t = 30)]
    shutdown_grace_s: u64,
    /// Most media items of each kind one prompt may carry, e.g. `audio=4,image=4` (vLLM's flag;
    /// a kind left out keeps its default of 4); more is a 400.
    #[arg(long, env = "OMNISHARD_LIMIT_MM_PER_PROMPT", default_value = "audio=4,image=4", value_parser = media_limits)]
    limit_mm_per_prompt: (usize, usize),
    /// Longest audio clip accepted, in seconds; longer is a 400.
    #[arg(long, env = "OMNISHARD_MAX_AUDIO_SECONDS", default_value_t = 600.0)]
    max_audio_seconds: f64,
}

/// `audio=N,image=M`: (audio clips, images) per prompt.
fn media_limits(s: &str) -> Result<(usize, usize), String> {
    let (mut audio, mut image) = (4, 4);
    for item in s.split(',').filter(|i| !i.trim().is_empty()) {
        let (kind, n) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}`: write KIND=N, e.g. audio=4,image=4"))?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|e| format!("`{n}` is not a count: {e}"))?;
        match kind.trim() {
            "audio" => audio = n,
            "image" => image = n,
            other => {
                return Err(format!(
                    "`{other}`: the kinds are audio and image (video is not served yet)"
                ));
            }
        }
    }
    Ok((audio, image))
}

#[derive(Args)]
struct ModelArgs {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json). Default:
    /// the demo model shipped in the repository.
    #[arg(long, env = "OMNISHARD_MODEL")]
    model: Option<PathBuf>,
    /// Compute dtype. f32 matches the reference to ~1e-5; bf16 halves memory. Expert nodes must
    /// use the same.
    #[arg(long, env = "OMNISHARD_DTYPE", default_value = "f32")]
    dtype: ComputeDtype,
    /// Where this process computes: `cpu`, or `cuda` / `cuda:N` for a GPU (a build with the
    /// `cuda` feature): embeddings, attention and its KV cache, routers, the final norm and
    /// lm_head, and the experts when they run in this process (sampling reads the logits on the
    /// host).
    #[arg(long, env = "OMNISHARD_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Where the weights come from: `auto` reads the checkpoint's safetensors; `dummy` makes
    /// random weights of config.json's shapes in memory from --weights-seed (benchmarks at the real size
    /// without the checkpoint; expert nodes must use the same --load-format and --weights-seed).
    #[arg(long, env = "OMNISHARD_LOAD_FORMAT", default_value = "auto")]
    load_format: LoadFormat,
    /// Seed of the dummy weights (--load-format dummy); `coordinator synth --seed` writes the same.
    #[arg(long, env = "OMNISHARD_WEIGHTS_SEED", default_value_t = 0)]
    weights_seed: u64,
    /// Expert nodes (host:port,...) serving the routed experts. Without --nodes or --placement
    /// the experts run in this process.
    #[arg(
        long,
        env = "OMNISHARD_NODES",
        value_delimiter = ',',
        conflicts_with = "placement",
        value_parser = node_address
    )]
    nodes: Vec<String>,
    /// Placement file (TOML) whose node addresses serve the experts; the routing table still
    /// comes from what each node reports holding.
    #[arg(long, env = "OMNISHARD_PLACEMENT")]
    placement: Option<PathBuf>,
    /// Start even if some (layer, expert) pairs are served by no node: they are masked out of
    /// the router (logit -inf), which changes the model's output.
    #[arg(long, env = "OMNISHARD_ALLOW_MISSING_EXPERTS")]
    allow_missing_experts: bool,
    /// Deadline of one layer's call to one expert node, in milliseconds.
    #[arg(long, env = "OMNISHARD_RPC_TIMEOUT_MS", default_value_t = defaults::RPC_TIMEOUT.as_millis() as u64)]
    rpc_timeout_ms: u64,
    /// How long to wait at start-up for expert nodes to accept connections and finish loading.
    #[arg(long, env = "OMNISHARD_STARTUP_TIMEOUT_S", default_value_t = defaults::STARTUP_TIMEOUT.as_secs())]
    startup_timeout_s: u64,
    /// Largest gRPC message sent to or accepted from an expert node, in MiB.
    #[arg(long, env = "OMNISHARD_MAX_MESSAGE_MIB", default_value_t = defaults::MAX_MESSAGE_MIB)]
    max_message_mib: usize,
    /// How often every expert node's health is checked in the background (a node that failed is
    /// re-admitted once it answers with the right fingerprint), in milliseconds.
    #[arg(long, env = "OMNISHARD_HEALTH_INTERVAL_MS", default_value_t = defaults::HEALTH_INTERVAL.as_millis() as u64)]
    health_interval_ms: u64,
    /// With expert nodes: a step of at least this many sequences runs as two micro-batches, one
    /// computing attention while the other's expert calls are on the wire. Same output in bf16
    /// on CPUs without AMX; elsewhere (f32, AMX, GPU) logits move by rounding, as with any change
    /// of batch composition. 0 turns the overlap off; 1 acts as 2 (one sequence is never split).
    #[arg(long, env = "OMNISHARD_OVERLAP_MIN_SEQS", default_value_t = defaults::OVERLAP_MIN_SEQUENCES)]
    overlap_min_seqs: usize,
    /// TLS to `https://` expert nodes: --tls-ca verifies them, --tls-cert/--tls-key is the
    /// client certificate nodes started with --tls-ca require.
    #[command(flatten)]
    tls: omnishard_proto::tls::TlsArgs,
    /// Hedging: a call to an expert node that runs well past that node's usual latency for its
    /// size (three times mean + 4 deviations, never less than this many milliseconds) is re-sent
    /// to replicas of its experts and the first answer taken; the late node is marked down until
    /// its health check passes. Experts without a live replica wait for --rpc-timeout-ms. 0
    /// turns hedging off.
    #[arg(long, env = "OMNISHARD_HEDGE_FLOOR_MS", default_value_t = defaults::HEDGE_FLOOR.as_millis() as u64)]
    hedge_floor_ms: u64,
}

impl ModelArgs {
    fn model_dir(&self) -> anyhow::Result<PathBuf> {
        model_or_demo(self.model.as_deref())
    }

    /// Loads the model with its experts in this process or on the given expert nodes.
    fn load(&self) -> anyhow::Result<Engine> {
        self.load_observed(None)
    }

    fn load_observed(&self, observer: Option<Arc<dyn RpcObserver>>) -> anyhow::Result<Engine> {
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
                VisionInput::load(dir, &ckpt, self.dtype.dtype(), &device)?
            }
            _ => None,
        };
        if addresses.is_empty() {
            if self.allow_missing_experts {
                bail!("--allow-missing-experts needs --nodes or --placement");
            }
            let mut engine = Engine::load_local_from(&ckpt, &cfg, self.dtype, &device)?;
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
        if let Some(audio) = audio {
            engine.set_audio(audio);
        }
        if let Some(vision) = vision {
            engine.set_vision(vision);
        }
        Ok(engine)
    }
}

#[derive(Args)]
struct ClusterArgs {
    /// Number of expert-node processes to start.
    #[arg(long = "nodes", env = "OMNISHARD_CLUSTER_NODES", value_parser = clap::value_parser!(u32).range(1..=1024))]
    count: u32,
    /// Checkpoint directory for the nodes and the command (else the command's --model).
    #[arg(long, env = "OMNISHARD_MODEL")]
    model: Option<PathBuf>,
    /// The expert-node binary (default: next to this binary, else on PATH).
    #[arg(long, env = "OMNISHARD_EXPERT_NODE_BIN")]
    expert_node_bin: Option<PathBuf>,
    /// Where the nodes hold their experts: one device for all (`cuda`, `cpu`) or one per node
    /// (`cuda:1,cuda:2`: a GPU each, with the command on another). Default: the CPU.
    #[arg(long, env = "OMNISHARD_NODE_DEVICES", value_delimiter = ',')]
    node_devices: Vec<DeviceSpec>,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// `generate` against the local cluster.
    Generate(GenerateArgs),
    /// `score` against the local cluster.
    Score(ScoreArgs),
    /// `serve` against the local cluster.
    Serve(ServeArgs),
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long, env = "OMNISHARD_PROMPT")]
    prompt: String,
    /// Send the prompt as a user message through the model's chat template, which opens the
    /// assistant's turn.
    #[arg(long, env = "OMNISHARD_CHAT")]
    chat: bool,
    /// Jinja chat template file for --chat, instead of the checkpoint's.
    #[arg(long, env = "OMNISHARD_CHAT_TEMPLATE", requires = "chat")]
    chat_template: Option<PathBuf>,
    /// Audio file (WAV, FLAC, MP3, Ogg Vorbis; any rate) placed before the prompt text in the
    /// user message, for a checkpoint with an audio tower (Qwen3-Omni); repeatable; needs --chat.
    #[arg(long, requires = "chat")]
    audio: Vec<PathBuf>,
    /// Image file (PNG, JPEG, WebP) placed before the audio and the prompt text in the user
    /// message, for a checkpoint with a vision tower; repeatable; needs --chat.
    #[arg(long, requires = "chat")]
    image: Vec<PathBuf>,
    /// Maximum number of tokens to generate.
    #[arg(long, env = "OMNISHARD_MAX_TOKENS", default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, env = "OMNISHARD_TEMPERATURE", default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, env = "OMNISHARD_TOP_P", default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (no limit when absent).
    #[arg(long, env = "OMNISHARD_TOP_K")]
    top_k: Option<usize>,
    /// Repetition penalty (1 = none), as in Hugging Face generate.
    #[arg(long, env = "OMNISHARD_REPETITION_PENALTY", default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed; the same seed and settings give the same text.
    #[arg(long, env = "OMNISHARD_SEED", default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated input token ids, e.g. 1,2,3.
    #[arg(
        long,
        env = "OMNISHARD_TOKEN_IDS",
        value_delimiter = ',',
        required = true
    )]
    token_ids: Vec<u32>,
    /// JSON file with explicit mRoPE position ids [[t...],[h...],[w...]], one entry per token.
    /// Default: text positions 0..n on all three rows.
    #[arg(long, env = "OMNISHARD_POSITION_IDS")]
    position_ids: Option<PathBuf>,
    /// Audio file (WAV, FLAC, MP3, Ogg Vorbis; 16 kHz) for a Qwen3-Omni checkpoint, repeatable:
    /// the i-th `<|audio_pad|>` of --token-ids becomes clip i's audio-tower embeddings, one token
    /// each, as the reference processor expands it. Positions stay text positions 0..n.
    #[arg(long)]
    audio: Vec<PathBuf>,
    /// Image file (PNG, JPEG, WebP), repeatable: the i-th `<|image_pad|>` becomes image i's
    /// vision-tower embeddings (deepstack included), with the reference's mRoPE positions.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// One video as its frames, comma-separated image files (all of one size) sampled at
    /// --video-fps: the prompt's `<|video_pad|>` becomes its embeddings.
    #[arg(long, value_delimiter = ',')]
    video_frames: Vec<PathBuf>,
    /// Frames per second of --video-frames.
    #[arg(long, default_value_t = 1.0)]
    video_fps: f64,
}

fn node_address(s: &str) -> Result<String, String> {
    omnishard_proto::address::check_node_address(s)?;
    Ok(s.to_string())
}

fn listen_address(s: &str) -> Result<std::net::SocketAddr, String> {
    omnishard_proto::address::resolve_listen(s)
}

fn read_positions(path: &Path) -> anyhow::Result<Positions> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} must hold [[t...],[h...],[w...]] with non-negative integers",
            path.display()
        )
    })?;
    let Ok(rows) = <[Vec<u32>; 3]>::try_from(rows) else {
        bail!("{} must hold exactly three rows (t, h, w)", path.display());
    };
    Ok(Positions { rows })
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let engine = args.model.load()?;
    let model_dir = args.model.model_dir()?;
    let tokenizer = TextTokenizer::load(&model_dir, engine.config())?;
    let prompt = if args.chat {
        let template = ChatTemplate::load(&model_dir, args.chat_template.as_deref())?;
        let content = if args.audio.is_empty() && args.image.is_empty() {
            serde_json::json!(args.prompt)
        } else {
            let mut parts: Vec<serde_json::Value> = args
                .image
                .iter()
                .map(|_| serde_json::json!({"type": "image"}))
                .chain(
                    args.audio
                        .iter()
                        .map(|_| serde_json::json!({"type": "audio"})),
                )
                .collect();
            parts.push(serde_json::json!({"type": "text", "text": args.prompt}));
            serde_json::Value::Array(parts)
        };
        let conv = Conversation {
            messages: vec![serde_json::json!({"role": "user", "content": content})],
            add_generation_prompt: true,
            ..Default::default()
        };
        // The operator's own prompt: special tokens in it act as written.
        let prompter = ChatPrompter::new(
            template,
            &tokenizer,
            ReasoningParser::None,
            ToolCallParser::None,
        );
        prompter.encode(&tokenizer, conv, true, usize::MAX)?.ids
    } else {
        tokenizer.encode(&args.prompt)?
    };
    let mut sampler = Sampler::new(params);
    let mut stream = DecodeStream::default();
    let mut stdout = std::io::stdout().lock();
    let mut first_token_at = None;
    let mut failed = None;
    let start = Instant::now();
    let items = MediaItems {
        audio: read_clips(&args.audio)?,
        images: args
            .image
            .iter()
            .map(read_image)
            .collect::<anyhow::Result<_>>()?,
        ..Default::default()
    };
    let prompt = expand(&prompt, &items, engine.audio(), engine.vision())?;
    let tokens = engine.generate_media(
        &prompt,
        args.max_tokens,
        &mut sampler,
        tokenizer.stop_tokens(),
        |t| {
            first_token_at.get_or_insert_with(Instant::now);
            match stream.push(&tokenizer, t) {
                Ok(Some(piece)) => {
                    let ok = stdout
                        .write_all(piece.as_bytes())
                        .and_then(|_| stdout.flush());
                    ok.is_ok()
                }
                Ok(None) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    stdout.write_all(stream.finish(&tokenizer)?.as_bytes())?;
    writeln!(stdout)?;
    let total = start.elapsed().as_secs_f64();
    let prefill = first_token_at
        .map(|t| t.duration_since(start).as_secs_f64())
        .unwrap_or(total);
    let decode_tokens = tokens.len().saturating_sub(1);
    let decode_rate = if total > prefill {
        decode_tokens as f64 / (total - prefill)
    } else {
        0.0
    };
    eprintln!(
        "{} prompt tokens in {prefill:.3} s; {} tokens generated in {total:.3} s ({decode_rate:.1} tokens/s decoding)",
        prompt.tokens.len(),
        tokens.len()
    );
    Ok(())
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let positions = args
        .position_ids
        .as_deref()
        .map(read_positions)
        .transpose()?;
    let engine = args.model.load()?;
    let media = !(args.audio.is_empty() && args.image.is_empty() && args.video_frames.is_empty());
    let logits = if !media {
        engine.score(&args.token_ids, positions)?
    } else {
        if positions.is_some() {
            bail!(
                "--position-ids with media: the expanded prompt's positions come from its media; drop --position-ids"
            );
        }
        let items = MediaItems {
            audio: read_clips(&args.audio)?,
            images: args
                .image
                .iter()
                .map(read_image)
                .collect::<anyhow::Result<_>>()?,
            videos: if args.video_frames.is_empty() {
                Vec::new()
            } else {
                vec![
                    args.video_frames
                        .iter()
                        .map(read_image)
                        .collect::<anyhow::Result<_>>()?,
                ]
            },
            video_fps: args.video_fps,
        };
        let e = expand(&args.token_ids, &items, engine.audio(), engine.vision())?;
        engine.score_media(&e.tokens, e.positions, &e.spans)?
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer(&mut out, &serde_json::json!({ "logits": logits }))?;
    writeln!(out)?;
    Ok(())
}

/// Largest decoded image accepted on the command line, in pixels.
const MAX_IMAGE_PIXELS: u64 = 64 << 20;

fn read_image(path: &PathBuf) -> anyhow::Result<image::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    image::decode(&bytes, MAX_IMAGE_PIXELS).with_context(|| path.display().to_string())
}

/// The audio files' samples, mono at 16 kHz.
fn read_clips(paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<f32>>> {
    paths
        .iter()
        .map(|path| {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let ext = path.extension().and_then(|e| e.to_str());
            decode_audio(bytes, ext, 3600.0).with_context(|| path.display().to_string())
        })
        .collect()
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let model_dir = args.model.model_dir()?;
    let model_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| serve::default_model_name(&model_dir));
    let metrics = Arc::new(Metrics::for_model(Some(&model_name)));
    let settings = ServeSettings {
        model_dir: args.model.model_dir()?,
        served_model_name: args.served_model_name,
        api_key: args.api_key,
        max_context: args.max_context,
        special_tokens_in_text: args.special_tokens_in_text,
        chat_template: args.chat_template,
        reasoning_parser: args.reasoning_parser,
        tool_call_parser: args.tool_call_parser,
        idle_timeout: Duration::from_secs(args.http_idle_timeout_s),
        scheduler: SchedulerConfig {
            max_active: args.max_active_seqs,
            max_batched_tokens: args.max_batched_tokens,
            queue_size: args.queue_size,
            kv_cache_bytes: match args.kv_cache_memory {
                Some(bytes) => bytes,
                None => kv_budget::default_budget_bytes().ok_or_else(|| {
                    anyhow::anyhow!(
                        "cannot read the available memory from /proc/meminfo; give --kv-cache-memory"
                    )
                })?,
            },
            prefix_caching: !args.no_prefix_caching,
        },
        placement: args.model.placement.clone(),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
        media: omnishard_coordinator::server::media::MediaLimits {
            audio_per_prompt: args.limit_mm_per_prompt.0,
            images_per_prompt: args.limit_mm_per_prompt.1,
            max_audio_seconds: args.max_audio_seconds,
            ..Default::default()
        },
    };
    let observer = metrics.clone();
    let load = move |progress: &Progress| {
        progress.stage("loading the model and connecting to its expert nodes");
        args.model
            .load_observed(Some(observer))
            .map(Arc::new)
            .map_err(|e| format!("{e:#}"))
    };
    Ok(serve::launch(load, metrics, settings, args.listen)?)
}

fn cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let bin = match args.expert_node_bin {
        Some(bin) => bin,
        None => find_expert_node_binary()?,
    };
    let mut command = args.command;
    let inner = match &mut command {
        ClusterCommand::Generate(a) => &mut a.model,
        ClusterCommand::Score(a) => &mut a.model,
        ClusterCommand::Serve(a) => &mut a.model,
    };
    if !inner.nodes.is_empty() || inner.placement.is_some() {
        bail!("`cluster` starts its own expert nodes; drop --nodes / --placement from the command");
    }
    if let Some(model) = args.model {
        inner.model = Some(model);
    }
    let model = inner.model_dir()?;
    let timeout = Duration::from_secs(inner.startup_timeout_s);
    let weights = match inner.load_format {
        LoadFormat::Auto => Vec::new(),
        LoadFormat::Dummy => vec![
            "--load-format".to_string(),
            "dummy".to_string(),
            "--weights-seed".to_string(),
            inner.weights_seed.to_string(),
        ],
    };
    let local = LocalCluster::start(
        &bin,
        &model,
        args.count as usize,
        inner.dtype,
        timeout,
        &args.node_devices,
        &weights,
    )?;
    inner.nodes = local.addresses().to_vec();
    // `local` stops the nodes when it goes out of scope, whatever the command's outcome.
    let result = match command {
        ClusterCommand::Generate(a) => generate(a),
        ClusterCommand::Score(a) => score(a),
        ClusterCommand::Serve(a) => serve(a),
    };
    drop(local);
    result
}

/// `--model`, or the demo model shipped with omnishard.
fn model_or_demo(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir.to_path_buf()),
        None => defaults::demo_model_dir().map_err(anyhow::Error::msg),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| defaults::LOG_FILTER.into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate(args),
        Command::Score(args) => score(args),
        Command::Serve(args) => serve(args),
        Command::Cluster(args) => cluster(args),
        Command::Plan(mut args) => {
            args.model = Some(model_or_demo(args.model.as_deref())?);
            omnishard_coordinator::plan::command::run(&args).map_err(Into::into)
        }
        Command::Bench(args) => omnishard_coordinator::bench::run(&args).map(|_| ()),
        Command::Probe(args) => match omnishard_coordinator::probe::run(&args) {
            Ok(seen) => {
                println!("{seen}");
                Ok(())
            }
            Err(why) => {
                eprintln!("unhealthy: {why}");
                std::process::exit(1);
            }
        },
        Command::Synth(args) => omnishard_coordinator::synth::run(&args)
            .map(|_| ())
            .map_err(Into::into),
    }
}
