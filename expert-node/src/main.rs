//! `expert-node`: loads a partition of a checkpoint's (layer, expert) MLPs into memory and serves
//! them over gRPC to a coordinator. Every flag can also be set through its environment variable.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Parser;
use omnishard_expert::server::{ExpertNodeService, NodeState, incoming};
use omnishard_expert::{Checkpoint, ComputeDtype, LocalExperts, fingerprint::fingerprint};
use omnishard_proto::ModelConfig;
use omnishard_proto::placement::{Placement, parse_shard, shard_pairs};
use omnishard_proto::v1::expert_service_server::ExpertServiceServer;

/// The demo model shipped in the repository.
const DEMO_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../coordinator/demo-model");

#[derive(Parser)]
#[command(
    name = "expert-node",
    version,
    about = "omnishard expert node: holds a partition of a MoE checkpoint's experts in memory and serves them over gRPC",
    group(clap::ArgGroup::new("partition").required(true).args(["shard", "placement"]))
)]
struct Cli {
    /// Hugging Face checkpoint directory (config.json and safetensors). Default: the demo model
    /// shipped in the repository.
    #[arg(long, env = "OMNISHARD_MODEL", default_value = DEMO_MODEL)]
    model: PathBuf,
    /// Address to listen on. Use 0.0.0.0:PORT to accept coordinators on other machines; port 0
    /// picks a free port. The bound address is printed on stdout as "listening on ADDR".
    #[arg(long, env = "OMNISHARD_LISTEN", default_value = "127.0.0.1:50051")]
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
    /// Compute dtype; must match the coordinator's.
    #[arg(long, env = "OMNISHARD_DTYPE", value_enum, default_value = "f32")]
    dtype: ComputeDtype,
    /// Largest gRPC message accepted or sent, in MiB.
    #[arg(long, env = "OMNISHARD_MAX_MESSAGE_MIB", default_value_t = 512)]
    max_message_mib: usize,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = ModelConfig::from_model_dir(&cli.model)?;
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
    let ckpt = Checkpoint::open(&cli.model)?;
    let state = Arc::new(NodeState {
        name: name.clone(),
        fingerprint: fingerprint(&cfg, &ckpt)?,
        dtype: cli.dtype.dtype(),
        device: Device::Cpu,
        experts: OnceLock::new(),
    });

    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<ExpertServiceServer<ExpertNodeService>>()
        .await;
    let service = ExpertNodeService::new(state.clone()).into_server(cli.max_message_mib << 20);
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming(listener), shutdown_signal()),
    );

    tracing::info!(node = %name, %addr, experts = pairs.len(), dtype = ?cli.dtype, "loading experts");
    let started = Instant::now();
    let dtype = cli.dtype.dtype();
    let load_cfg = cfg.clone();
    let experts = tokio::task::spawn_blocking(move || {
        let total = pairs.len();
        let step = (total / 20).max(1);
        // The checkpoint (and its memory maps) is dropped when loading ends, so the resident
        // memory is the partition's copy in the compute dtype.
        LocalExperts::load(
            &ckpt,
            &load_cfg,
            &pairs,
            dtype,
            &Device::Cpu,
            |done, total| {
                if done % step == 0 || done == total {
                    tracing::info!(done, total, "experts loaded");
                }
            },
        )
        .map(|e| (e, total))
    });
    let (experts, total) = tokio::select! {
        loaded = experts => loaded??,
        served = &mut server => {
            served??;
            bail!("server stopped while loading");
        }
    };
    let bytes = experts.size_in_bytes();
    if state.experts.set(Arc::new(experts)).is_err() {
        bail!("experts loaded twice");
    }
    health
        .set_serving::<ExpertServiceServer<ExpertNodeService>>()
        .await;
    tracing::info!(
        node = %name,
        experts = total,
        bytes,
        seconds = started.elapsed().as_secs_f64(),
        "serving"
    );
    server.await??;
    tracing::info!("shut down");
    Ok(())
}
