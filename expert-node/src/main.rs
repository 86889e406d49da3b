//! `expert-node`: loads a partition of a checkpoint's (layer, expert) MLPs into memory and serves
//! them over gRPC to a coordinator (with mutual TLS when given certificates). Every flag can also
//! be set through its environment variable. SIGTERM or Ctrl-C drains it: NOT_SERVING, new calls
//! refused (the coordinator re-sends them to a replica), calls in flight finished, then exit.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use omnishard_expert::{NodeState, ServeOptions, load_experts, serve};
use omnishard_model::{Checkpoint, ComputeDtype, DeviceSpec, LoadFormat, fingerprint::fingerprint};
use omnishard_proto::ModelConfig;
use omnishard_proto::defaults;
use omnishard_proto::placement::{Placement, parse_shard, shard_pairs};

#[derive(Parser)]
#[command(
    name = "expert-node",
    version,
    about = "omnishard expert node: holds a partition of a MoE checkpoint's experts in memory and serves them over gRPC",
    group(clap::ArgGroup::new("partition").required(true).args(["shard", "placement"]))
)]
struct Cli {
    /// Hugging Face checkpoint directory (config.json and safetensors). Default: the demo model
    /// shipped with omnishard (next to the executable, in the source tree, or $OMNISHARD_DEMO_MODEL).
    #[arg(long, env = "OMNISHARD_MODEL")]
    model: Option<PathBuf>,
    /// Address to listen on. Use 0.0.0.0:PORT to accept coordinators on other machines; port 0
    /// picks a free port; a host name is resolved (localhost:50051). The bound address is printed
    /// on stdout as "listening on ADDR".
    #[arg(long, env = "OMNISHARD_LISTEN", default_value = "127.0.0.1:50051", value_parser = omnishard_proto::address::resolve_listen)]
    listen: SocketAddr,
    /// Hold shard I of N (0-based): (layer, expert) pair p goes to shard p mod N.
    #[arg(long, env = "OMNISHARD_SHARD", value_name = "I/N")]
    shard: Option<String>,
    /// Placement file (TOML) naming nodes and the experts each holds; needs --node.
    #[arg(long, env = "OMNISHARD_PLACEMENT", requires = "node")]
    placement: Option<PathBuf>,
    /// This node's name in the placement file.
    #[arg(long, env = "OMNISHARD_NODE")]
    node: Option<String>,
    /// Compute dtype, f32 or bf16; must match the coordinator's.
    #[arg(long, env = "OMNISHARD_DTYPE", default_value = "f32")]
    dtype: ComputeDtype,
    /// Where the experts are held and computed: `cpu`, or `cuda` / `cuda:N` for a GPU (a build
    /// with the `cuda` feature). In bf16 on a GPU the fused MoE kernels run; hidden states are
    /// copied to and from the GPU at the gRPC boundary.
    #[arg(long, env = "OMNISHARD_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Where the weights come from: `auto` reads the checkpoint's safetensors; `dummy` makes
    /// random weights of config.json's shapes from --weights-seed (must match the coordinator's).
    #[arg(long, env = "OMNISHARD_LOAD_FORMAT", default_value = "auto")]
    load_format: LoadFormat,
    /// Seed of the dummy weights (--load-format dummy).
    #[arg(long, env = "OMNISHARD_WEIGHTS_SEED", default_value_t = 0)]
    weights_seed: u64,
    /// Compute threads (one pool for all experts); default: the machine's cores. Lower it when
    /// several nodes share a machine.
    #[arg(long, env = "OMNISHARD_THREADS")]
    threads: Option<usize>,
    /// Largest gRPC message accepted or sent, in MiB.
    #[arg(long, env = "OMNISHARD_MAX_MESSAGE_MIB", default_value_t = defaults::MAX_MESSAGE_MIB)]
    max_message_mib: usize,
    #[command(flatten)]
    tls: omnishard_proto::tls::TlsArgs,
    /// On SIGTERM, how long the calls in flight may take to finish before the node exits anyway
    /// (new calls are refused at once and go to replicas).
    #[arg(long, env = "OMNISHARD_SHUTDOWN_GRACE_S", default_value_t = 30)]
    shutdown_grace_s: u64,
    /// A connection from which nothing has been read for this many seconds is closed. Live
    /// clients are pinged every half of it (at most every 30 s) and answer, so only silent peers
    /// are cut.
    #[arg(long, env = "OMNISHARD_IDLE_TIMEOUT_S", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_s: u64,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    omnishard_model::alloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| defaults::LOG_FILTER.into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("cannot size the compute pool")?;
    }
    let model = match cli.model {
        Some(dir) => dir,
        None => defaults::demo_model_dir().map_err(anyhow::Error::msg)?,
    };
    let tls = cli.tls.server()?;
    let cfg = ModelConfig::from_model_dir(&model)?;
    let (name, pairs) = match (&cli.shard, &cli.placement, &cli.node) {
        (Some(shard), None, _) => {
            let (i, n) = parse_shard(shard)?;
            (format!("{i}/{n}"), shard_pairs(&cfg, i, n))
        }
        (None, Some(path), Some(node)) => {
            let placement = Placement::from_file(path, &cfg)?;
            let Some(entry) = placement.node(node) else {
                bail!(
                    "node {node:?} is not in {}; it names {:?}",
                    path.display(),
                    placement.nodes.iter().map(|n| &n.name).collect::<Vec<_>>()
                );
            };
            (node.clone(), entry.pairs.clone())
        }
        _ => bail!("give either --shard I/N or --placement FILE --node NAME"),
    };
    if pairs.is_empty() {
        bail!("this node would hold no experts; check --shard / the placement file");
    }
    let ckpt = Checkpoint::load(&model, &cfg, cli.load_format, cli.weights_seed)?;
    let dtype = cli.dtype.dtype();
    let device = cli.device.open()?;
    let state = Arc::new(NodeState::new(
        name.clone(),
        fingerprint(&cfg, &ckpt)?,
        dtype,
        device.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        let scheme = if tls.is_some() { "https://" } else { "" };
        writeln!(out, "listening on {scheme}{addr}")?;
        out.flush()?;
    }
    // The signal is watched twice: by the server, which drains, and here, to bound how long the
    // drain and the closing of connections may take.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grace = std::time::Duration::from_secs(cli.shutdown_grace_s);
    let mut server = tokio::spawn(serve(
        listener,
        state.clone(),
        ServeOptions {
            max_message_bytes: cli.max_message_mib << 20,
            tls,
            shutdown_grace: grace,
            idle_timeout: std::time::Duration::from_secs(cli.idle_timeout_s),
        },
        stopped(stop_rx.clone()),
    ));

    tracing::info!(node = %name, %addr, experts = pairs.len(), dtype = %cli.dtype, device = %cli.device, "loading experts");
    let experts =
        tokio::task::spawn_blocking(move || load_experts(&ckpt, &cfg, &pairs, dtype, &device));
    let experts = tokio::select! {
        loaded = experts => loaded??,
        served = &mut server => {
            served??;
            bail!("server stopped while loading");
        }
    };
    if !state.install(experts) {
        bail!("experts loaded twice");
    }
    tracing::info!(node = %name, "serving");
    let give_up = async {
        stopped(stop_rx).await;
        tokio::time::sleep(grace + std::time::Duration::from_secs(5)).await;
    };
    tokio::select! {
        served = server => served??,
        () = give_up => tracing::warn!("connections still open after the shutdown grace; exiting"),
    }
    tracing::info!("shut down");
    Ok(())
}
