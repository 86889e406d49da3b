//! `coordinator`: the command-line entry point. Every flag can also be set through the
//! environment variable named in `--help`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use omnishard_coordinator::chat::{ReasoningParser, ToolCallParser};
use omnishard_coordinator::cluster::{LocalCluster, find_expert_node_binary};
use omnishard_coordinator::kv_budget;
use omnishard_coordinator::metrics::Metrics;
use omnishard_coordinator::scheduler::SchedulerConfig;
use omnishard_coordinator::serve::{self, ServeSettings};
use omnishard_coordinator::server::loading::Progress;
use omnishard_model::{DeviceSpec, LoadFormat};
use omnishard_proto::defaults;

mod model_args;
mod one_shot;

use model_args::{ModelArgs, listen_address, model_or_demo};
use one_shot::{GenerateArgs, ScoreArgs, generate, score};

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
    /// Fetch media that chat requests name by http(s) URL (10 s deadline, 256 MiB cap); without
    /// it such URLs are a 400. A server that fetches what clients name can be pointed at the
    /// network it sits in: allow it only where that is acceptable.
    #[arg(long, env = "OMNISHARD_ALLOW_MEDIA_URLS")]
    allow_media_urls: bool,
    /// Let chat requests name media as `file://` URLs of files under this directory (vLLM's
    /// flag); without it such URLs are a 400.
    #[arg(long, env = "OMNISHARD_ALLOWED_LOCAL_MEDIA_PATH")]
    allowed_local_media_path: Option<PathBuf>,
    /// Largest request body, e.g. 2MiB or 16MiB (raise it for media sent inline as base64): a
    /// larger one is a 413, refused by its Content-Length before it is kept (up to 16 times the
    /// limit it is read and discarded first, so the client sees the answer). Bodies being read
    /// share a budget of 16 such bodies; parsing and tokenizing run on half the cores.
    #[arg(long, env = "OMNISHARD_MAX_REQUEST_BYTES", default_value = "2MiB", value_parser = request_bytes)]
    max_request_bytes: usize,
    /// Nice value added to the HTTP front end's threads (parsing, tokenizing, answering), so
    /// that a flood of requests slows new answers before the tokens of running sequences; the
    /// scheduler and compute threads keep the normal priority. 0 leaves them equal.
    #[arg(long, env = "OMNISHARD_FRONTEND_NICE", default_value_t = omnishard_coordinator::server::priority::DEFAULT_FRONTEND_NICE, value_parser = clap::value_parser!(i32).range(0..=19))]
    frontend_nice: i32,
    /// Longest audio clip accepted, in seconds; longer is a 400.
    #[arg(long, env = "OMNISHARD_MAX_AUDIO_SECONDS", default_value_t = 600.0)]
    max_audio_seconds: f64,
}

/// A body limit from 1 KiB to 1 GiB.
fn request_bytes(s: &str) -> Result<usize, String> {
    let bytes = kv_budget::parse_bytes(s)?;
    if !(1 << 10..=1 << 30).contains(&bytes) {
        return Err(format!("{bytes} bytes: give 1KiB to 1GiB"));
    }
    Ok(bytes)
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
        max_request_bytes: args.max_request_bytes,
        frontend_nice: args.frontend_nice,
        media: omnishard_coordinator::server::media::MediaLimits {
            local_root: args
                .allowed_local_media_path
                .as_deref()
                .map(|dir| {
                    dir.canonicalize()
                        .ok()
                        .filter(|d| d.is_dir())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "--allowed-local-media-path {}: not a directory",
                                dir.display()
                            )
                        })
                })
                .transpose()?,
            allow_urls: args.allow_media_urls,
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

fn main() -> anyhow::Result<()> {
    omnishard_model::alloc::keep_freed_memory();
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
