//! `coordinator plan`: the command-line side of placement planning — read the config and
//! optional usage statistics, plan, write the placement file and read it back as nodes will.

use std::path::PathBuf;

use omnishard_model::ComputeDtype;
use omnishard_proto::placement::{Placement, PlacementError};
use omnishard_proto::{ConfigError, ModelConfig};

use super::{PlanError, PlanRequest, load_from_stats, parse_bytes, plan};

/// Arguments of `coordinator plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Checkpoint directory (default: the demo model).
    #[arg(long, env = "OMNISHARD_MODEL")]
    pub model: Option<PathBuf>,
    /// Number of expert nodes.
    #[arg(long = "nodes", env = "OMNISHARD_PLAN_NODES", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub count: u32,
    /// Most copies of any one expert (default: 2 with --stats, else 1).
    #[arg(long, env = "OMNISHARD_PLAN_REPLICAS")]
    pub replicas: Option<usize>,
    /// Memory for expert weights per node, e.g. 64GiB (default: unlimited).
    #[arg(long, env = "OMNISHARD_PLAN_MEMORY_PER_NODE", value_parser = parse_bytes)]
    pub memory_per_node: Option<u64>,
    /// Usage statistics as saved from GET /v1/stats; without it every expert counts the same.
    #[arg(long, env = "OMNISHARD_PLAN_STATS")]
    pub stats: Option<PathBuf>,
    /// Compute dtype the nodes will use, f32 or bf16 (sets the bytes per expert).
    #[arg(long, env = "OMNISHARD_DTYPE", default_value = "f32")]
    pub dtype: ComputeDtype,
    /// Node addresses (host:port,...), one per node (default: 127.0.0.1:50051, :50052, ...).
    #[arg(long, env = "OMNISHARD_PLAN_ADDRESSES", value_delimiter = ',')]
    pub addresses: Vec<String>,
    /// Where to write the placement file.
    #[arg(long, env = "OMNISHARD_PLAN_OUT")]
    pub out: PathBuf,
}

/// Why `coordinator plan` failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not usage statistics from GET /v1/stats: {reason}")]
    Stats { path: PathBuf, reason: String },
    #[error("--addresses has {given} entries for --nodes {nodes}")]
    Addresses { given: usize, nodes: usize },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("the written placement does not read back: {0}")]
    ReadBack(#[from] PlacementError),
    #[error("no --model given")]
    NoModel,
}

/// Plans and writes the placement file; prints a summary to stderr.
pub fn run(args: &PlanArgs) -> Result<(), PlanCommandError> {
    let dir = args.model.as_deref().ok_or(PlanCommandError::NoModel)?;
    let cfg = ModelConfig::from_model_dir(dir)?;
    let n = args.count as usize;
    let load = match &args.stats {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| PlanCommandError::Read {
                path: path.clone(),
                source,
            })?;
            let stats = |reason: String| PlanCommandError::Stats {
                path: path.clone(),
                reason,
            };
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| stats(e.to_string()))?;
            Some(load_from_stats(&json).map_err(stats)?)
        }
        None => None,
    };
    let addresses: Vec<String> = if args.addresses.is_empty() {
        (0..n).map(|i| format!("127.0.0.1:{}", 50051 + i)).collect()
    } else if args.addresses.len() == n {
        args.addresses.clone()
    } else {
        return Err(PlanCommandError::Addresses {
            given: args.addresses.len(),
            nodes: n,
        });
    };
    let dtype_bytes = args.dtype.dtype().size_in_bytes() as u64;
    let request = PlanRequest {
        nodes: n,
        max_replicas: args.replicas.unwrap_or(if load.is_some() { 2 } else { 1 }),
        memory_per_node: args.memory_per_node,
        expert_bytes: 3 * (cfg.hidden_size * cfg.moe_intermediate_size) as u64 * dtype_bytes,
        load,
        tolerance: 0.05,
    };
    let plan = plan(&cfg, &request)?;
    std::fs::write(&args.out, plan.to_toml(&addresses)).map_err(|source| {
        PlanCommandError::Write {
            path: args.out.clone(),
            source,
        }
    })?;
    // Read it back as the nodes will, so a plan that does not parse is never left behind.
    Placement::from_file(&args.out, &cfg)?;
    let (max, mean) = plan.load_spread();
    let replicated = plan.copies.values().filter(|&&c| c > 1).count();
    eprintln!(
        "wrote {}: {n} nodes, {} experts ({} with replicas), expected load max/mean {:.3}",
        args.out.display(),
        plan.copies.len(),
        replicated,
        if mean > 0.0 { max / mean } else { 1.0 }
    );
    for (i, node) in plan.nodes.iter().enumerate() {
        eprintln!(
            "  node-{i} {}: {} experts, {} MiB, expected load {:.1}",
            addresses[i],
            node.pairs.len(),
            node.bytes >> 20,
            node.load
        );
    }
    Ok(())
}
