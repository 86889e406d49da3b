//! `coordinator bench`: the real-size performance figures of issue 9 measured in one run, on one
//! synthetic checkpoint (or `--load-format dummy`), printed as a table and, as the last line, one
//! JSON object. Everything compared is measured side by side in the same run, on the same
//! weights, dtype and threads: these machines are shared and noisy, so ratios carry over where
//! absolute numbers do not.
//!
//! Stages: the model (written to a temporary directory unless `--model` is given), the read
//! bandwidth, in-process decode at batch 1 and 32 and a 512-token prefill, the per-layer cost of
//! a loopback gRPC call, clusters of 1, 2 and 4 expert-node processes, candle-transformers'
//! `qwen3_moe` and Hugging Face transformers on the same weights, and an expert node's resident
//! memory over its partition.

mod bandwidth;
mod device;
mod external;
mod measure;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use omnishard_model::synthetic::{self, Preset, WeightDtype};
use omnishard_model::{Checkpoint, ComputeDtype, DeviceSpec, LoadFormat, LocalExperts};
use omnishard_proto::ModelConfig;
use omnishard_proto::defaults;
use serde_json::{Value, json};

use crate::cluster::{LocalCluster, find_expert_node_binary};
use crate::remote::{CudaIpc, GpuRouting, RemoteExperts, RemoteOptions, ShmLane};
use crate::{CudaGraph, Engine};
use omnishard_model::fingerprint::fingerprint;

/// Arguments of `coordinator bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Checkpoint directory to measure. Default: a synthetic one (--preset, --layers, --experts)
    /// written to a temporary directory and removed afterwards.
    #[arg(long, env = "OMNISHARD_MODEL")]
    pub model: Option<PathBuf>,
    /// `auto` reads the checkpoint's files; `dummy` makes its weights in memory (then only
    /// config.json is needed, and the peers, which read files, are skipped).
    #[arg(long, default_value = "auto")]
    pub load_format: LoadFormat,
    /// Seed of synthetic or dummy weights.
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
    /// Layout of the synthetic model. The default, flat Qwen3-MoE, is what candle and
    /// transformers load; qwen3-omni-30b-a3b has the same dimensions (vocab 152064).
    #[arg(long, default_value = "qwen3-30b-a3b")]
    pub preset: Preset,
    /// Decoder layers of the synthetic model (the real ones have 48; ~1.2 GB each in bf16).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub layers: u32,
    /// Experts per layer of the synthetic model.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub experts: u32,
    /// Compute dtype, f32 or bf16.
    #[arg(long, default_value = "bf16")]
    pub dtype: ComputeDtype,
    /// Threads of this process's pool (and of each peer); default: the machine's cores.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Option<u32>,
    /// Fewer tokens and calls: every key in a few minutes.
    #[arg(long)]
    pub quick: bool,
    /// Expert-node counts of the cluster stage; `0` alone skips it (the GPU benchmark's
    /// scaling stage still runs).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4", value_parser = clap::value_parser!(u32).range(0..=64))]
    pub nodes: Vec<u32>,
    /// Where this process computes. `cuda`/`cuda:N` runs the GPU benchmark instead: in-process
    /// on the GPU, then the coordinator on the GPU with expert nodes on each of --node-devices
    /// (decode at batch 1 and 32, 512-token prefill, for every configuration).
    #[arg(long, env = "OMNISHARD_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Devices of the expert nodes in the GPU benchmark, e.g. `cuda,cpu` (default: --device).
    #[arg(long, value_delimiter = ',')]
    pub node_devices: Vec<DeviceSpec>,
    /// GPU benchmark, scaling stage: GPUs for expert nodes of their own, e.g. `1,2,3` (the
    /// coordinator keeps --device): 1 node on the first, then 2 on the first two, and so on, each
    /// with micro-batch overlap off and on (on: every step of 2 or more sequences split); batch
    /// 128 is measured too. Default: no such stage.
    #[arg(long, value_delimiter = ',')]
    pub scaling_gpus: Vec<usize>,
    /// Node counts of the scaling stage, e.g. `3` for only the 3-node step (default: 1 up to
    /// the number of --scaling-gpus); node i runs on the i-th of --scaling-gpus.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=64))]
    pub scaling_counts: Vec<u32>,
    /// GPU benchmark: whether expert nodes on GPUs answer in GPU memory the coordinator copies
    /// (CUDA IPC, the default of every command) or send the bytes over gRPC (`off`).
    #[arg(long, env = "OMNISHARD_CUDA_IPC", default_value = "auto")]
    pub cuda_ipc: CudaIpc,
    /// GPU benchmark: whether layers go to expert nodes on GPUs with the routing left on the
    /// coordinator's GPU (the default of every command) or planned on the host (`off`).
    #[arg(long, env = "OMNISHARD_GPU_ROUTING", default_value = "auto")]
    pub gpu_routing: GpuRouting,
    /// GPU benchmark: whether in-process batch-1 decode replays a CUDA graph (the default of
    /// every command) or launches every kernel from the host (`off`).
    #[arg(long, env = "OMNISHARD_CUDA_GRAPH", default_value = "auto")]
    pub cuda_graph: CudaGraph,
    /// Whether expert nodes (all on this machine) take their calls through shared-memory lanes
    /// (the default of every command) or over loopback gRPC (`off`).
    #[arg(long, env = "OMNISHARD_SHM_LANE", default_value = "auto")]
    pub shm_lane: ShmLane,
}

/// How much of each measurement a run does.
struct Sizes {
    b1_steps: usize,
    b32_steps: usize,
    prefill_rounds: usize,
    rpc_calls: usize,
    peer_tokens: usize,
}

fn stage(n: usize, what: &str) {
    eprintln!("bench: [{n}/8] {what}");
}

/// A value, or JSON null with the reason on stderr.
fn or_null(key: &str, r: Result<f64, String>) -> Value {
    match r {
        Ok(v) if v.is_finite() => json!(v),
        Ok(v) => {
            eprintln!("bench: {key}: not finite ({v})");
            Value::Null
        }
        Err(reason) => {
            eprintln!("bench: {key} is null: {reason}");
            Value::Null
        }
    }
}

/// Weight bytes read per decoded token at batch 1: every dense weight, the router, top-k experts
/// per MoE layer, lm_head, and one embedding row.
fn active_bytes_per_token(cfg: &ModelConfig, dtype: ComputeDtype) -> f64 {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let attn = h * cfg.num_attention_heads * hd * 2 + h * cfg.num_key_value_heads * hd * 2;
    let expert = 3 * h * cfg.moe_intermediate_size;
    let per_layer: usize = (0..cfg.num_hidden_layers)
        .map(|l| {
            attn + 2 * h
                + 2 * hd
                + if cfg.is_moe_layer(l) {
                    cfg.num_experts * h + cfg.num_experts_per_tok * expert
                } else {
                    3 * h * cfg.intermediate_size.unwrap_or(0)
                }
        })
        .sum();
    let elems = per_layer + cfg.vocab_size * h + h + h;
    elems as f64 * dtype.dtype().size_in_bytes() as f64
}

/// The arguments every expert node of a bench cluster gets: its compute threads and device, and
/// the bench's dummy weights when it uses them.
fn node_args(args: &BenchArgs, threads: usize) -> Vec<String> {
    let mut a = vec!["--threads".to_string(), threads.to_string()];
    if args.load_format == LoadFormat::Dummy {
        a.extend([
            "--load-format".into(),
            "dummy".into(),
            "--weights-seed".into(),
            args.weights_seed.to_string(),
        ]);
    }
    a
}

/// Runs the benchmark; returns the JSON object it printed last.
pub fn run(args: &BenchArgs) -> anyhow::Result<Value> {
    let threads = args
        .threads
        .map(|t| t as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // One pool for everything this process computes; set before any parallel work.
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        eprintln!("bench: rayon pool already built ({e}); using it");
    }
    let sizes = if args.quick {
        Sizes {
            b1_steps: 8,
            b32_steps: 3,
            prefill_rounds: 1,
            rpc_calls: 40,
            peer_tokens: 8,
        }
    } else {
        Sizes {
            b1_steps: 32,
            b32_steps: 8,
            prefill_rounds: 2,
            rpc_calls: 200,
            peer_tokens: 32,
        }
    };
    let started = Instant::now();
    let scratch = tempfile::tempdir()?;
    let dtype_name = args.dtype.to_string();

    stage(1, "model");
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = scratch.path().join("model");
            let config =
                synthetic::config_json(args.preset, args.layers as usize, args.experts as usize);
            match args.load_format {
                LoadFormat::Dummy => {
                    synthetic::write_config(&dir, &config)?;
                }
                LoadFormat::Auto => {
                    eprintln!("bench: writing a synthetic checkpoint to {}", dir.display());
                    synthetic::write_checkpoint(
                        &dir,
                        &config,
                        WeightDtype::Bf16,
                        args.weights_seed,
                        |_, _| {},
                    )?;
                }
            }
            dir
        }
    };
    let cfg = ModelConfig::from_model_dir(&dir)?;
    let ckpt = Checkpoint::load(&dir, &cfg, args.load_format, args.weights_seed)?;
    let fingerprint = fingerprint(&cfg, &ckpt)?;
    if args.device.is_cuda() {
        return device::run(args, &dir, &cfg, &ckpt, threads);
    }
    if !args.node_devices.is_empty() {
        anyhow::bail!("--node-devices belongs to the GPU benchmark: add --device cuda");
    }

    stage(2, "read bandwidth");
    let bandwidth = bandwidth::read_bandwidth(1 << 30, if args.quick { 5 } else { 11 });

    stage(
        3,
        "in-process decode (batch 1 and 32) and 512-token prefill",
    );
    let engine = Engine::load_local_from(&ckpt, &cfg, args.dtype, &candle_core::Device::Cpu)?;
    let b1 = measure::decode_tok_s(&engine, 1, 16, 2, sizes.b1_steps, || {})?;
    let b32 = measure::decode_tok_s(&engine, 32, 16, 1, sizes.b32_steps, || {})?;
    let prefill = measure::prefill_tok_s(&engine, 512, sizes.prefill_rounds)?;
    drop(engine);
    let bound_s = active_bytes_per_token(&cfg, args.dtype) / bandwidth;
    let fraction = bound_s * b1;

    let bin = find_expert_node_binary()?;
    let node_args = node_args(args, threads);
    let start_nodes = |count: usize| {
        LocalCluster::start(
            &bin,
            &dir,
            count,
            args.dtype,
            defaults::STARTUP_TIMEOUT.max(Duration::from_secs(600)),
            &[DeviceSpec::Cpu],
            &node_args,
        )
    };
    let opts = RemoteOptions {
        rpc_timeout: Duration::from_secs(60),
        shm_lane: args.shm_lane == ShmLane::Auto,
        ..RemoteOptions::default()
    };

    let transport = match args.shm_lane {
        ShmLane::Auto => "lane",
        ShmLane::Off => "gRPC",
    };
    stage(
        4,
        &format!("per-layer call overhead ({transport}, on this host) and node memory"),
    );
    let one = start_nodes(1)?;
    let partition_bytes = cfg.expert_pairs().len()
        * 3
        * cfg.hidden_size
        * cfg.moe_intermediate_size
        * args.dtype.dtype().size_in_bytes();
    let rss = one
        .pids()
        .first()
        .ok_or_else(|| "no node started".to_string())
        .and_then(|&pid| external::rss_bytes(pid));
    let rss_ratio = rss.map(|r| r as f64 / partition_bytes as f64);
    let (remote, _) = RemoteExperts::connect(
        one.addresses(),
        &cfg,
        &fingerprint,
        args.dtype.dtype(),
        opts.clone(),
        false,
    )?;
    let local = LocalExperts::load(
        &ckpt,
        &cfg,
        &cfg.expert_pairs(),
        args.dtype.dtype(),
        &candle_core::Device::Cpu,
        |_, _| {},
    )?;
    let layer = cfg.moe_layers().first().copied().unwrap_or(0);
    let (local_us, remote_us) = measure::paired_layer_calls_us(
        &local,
        &remote,
        layer,
        &cfg,
        args.dtype.dtype(),
        sizes.rpc_calls,
    )?;
    drop(local);
    drop(remote);
    let differences: Vec<f64> = remote_us
        .iter()
        .zip(&local_us)
        .map(|(r, l)| r - l)
        .collect();
    let overhead_us = measure::median(&differences);

    stage(5, "expert-node clusters");
    let mut clusters = Vec::new();
    let mut first = Some(one);
    for count in args.nodes.iter().map(|&n| n as usize).filter(|&n| n > 0) {
        let nodes = match first.take() {
            Some(one) if count == 1 => one,
            _ => start_nodes(count)?,
        };
        let engine = Engine::load_remote_from(
            &ckpt,
            &cfg,
            args.dtype,
            &candle_core::Device::Cpu,
            nodes.addresses(),
            opts.clone(),
            false,
        )?;
        let c1 = measure::decode_tok_s(&engine, 1, 16, 2, sizes.b1_steps, || {})?;
        let c32 = measure::decode_tok_s(&engine, 32, 16, 1, sizes.b32_steps, || {})?;
        eprintln!("bench: {count} node(s): batch 1 {c1:.2} tok/s, batch 32 {c32:.2} tok/s");
        clusters.push((count, c1, c32));
    }
    drop(first);
    drop(ckpt);

    let files = args.load_format == LoadFormat::Auto;
    let threads_peer = threads;
    stage(6, "candle-transformers qwen3_moe");
    let candle = if files {
        external::candle(&dir, &dtype_name, threads_peer, sizes.peer_tokens)
    } else {
        Err("--load-format dummy: candle reads checkpoint files".into())
    };
    stage(7, "Hugging Face transformers");
    let hf = if files {
        external::transformers(
            &dir,
            &dtype_name,
            threads_peer,
            sizes.peer_tokens,
            scratch.path(),
        )
    } else {
        Err("--load-format dummy: transformers reads checkpoint files".into())
    };

    stage(8, "report");
    let cluster_ratio = |n: usize, batch32: bool| -> Result<f64, String> {
        clusters
            .iter()
            .find(|(count, _, _)| *count == n)
            .map(|&(_, c1, c32)| if batch32 { c32 / b32 } else { c1 / b1 })
            .ok_or_else(|| format!("no {n}-node cluster in --nodes"))
    };
    println!(
        "model: {} ({} layers, {} experts, hidden {}, vocab {}), {dtype_name}, {threads} threads",
        dir.display(),
        cfg.num_hidden_layers,
        cfg.num_experts,
        cfg.hidden_size,
        cfg.vocab_size
    );
    println!("read bandwidth            {:>10.2} GB/s", bandwidth / 1e9);
    println!(
        "in-process decode b1      {b1:>10.2} tok/s   (bound {:.2} tok/s, {:.0}%)",
        1.0 / bound_s,
        fraction * 100.0
    );
    println!("in-process decode b32     {b32:>10.2} tok/s");
    println!("in-process prefill 512    {prefill:>10.1} tok/s");
    println!(
        "layer call in-process     {:>10.0} us median",
        measure::median(&local_us)
    );
    println!(
        "layer call 1 node ({transport:>4})  {:>8.0} us median  (overhead {overhead_us:.0} us)",
        measure::median(&remote_us)
    );
    for (count, c1, c32) in &clusters {
        println!(
            "{count} node(s)  decode b1 {c1:>8.2} tok/s ({:.2}x)   b32 {c32:>8.2} tok/s ({:.2}x)",
            c1 / b1,
            c32 / b32
        );
    }
    match &candle {
        Ok(v) => println!(
            "candle qwen3_moe b1       {v:>10.2} tok/s  (ours {:.1}x)",
            b1 / v
        ),
        Err(e) => println!("candle qwen3_moe b1       unavailable: {e}"),
    }
    match &hf {
        Ok(v) => println!(
            "transformers b1           {v:>10.2} tok/s  (ours {:.2}x)",
            b1 / v
        ),
        Err(e) => println!("transformers b1           unavailable: {e}"),
    }
    println!("bench took {:.0} s", started.elapsed().as_secs_f64());
    let report = json!({
        "dtype": dtype_name,
        "threads": threads,
        "layers": cfg.num_hidden_layers,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "inproc_decode_tok_s_b1": b1,
        "inproc_decode_tok_s_b32": b32,
        "inproc_prefill_tok_s": prefill,
        "fraction_of_bandwidth_bound": fraction,
        "remote_overhead_us_per_layer": overhead_us,
        "cluster1_over_inproc_b1": or_null("cluster1_over_inproc_b1", cluster_ratio(1, false)),
        "cluster1_over_inproc_b32": or_null("cluster1_over_inproc_b32", cluster_ratio(1, true)),
        "cluster2_over_inproc_b1": or_null("cluster2_over_inproc_b1", cluster_ratio(2, false)),
        "cluster2_over_inproc_b32": or_null("cluster2_over_inproc_b32", cluster_ratio(2, true)),
        "cluster4_over_inproc_b1": or_null("cluster4_over_inproc_b1", cluster_ratio(4, false)),
        "cluster4_over_inproc_b32": or_null("cluster4_over_inproc_b32", cluster_ratio(4, true)),
        "ratio_vs_candle_qwen3_moe": or_null("ratio_vs_candle_qwen3_moe", candle.map(|c| b1 / c)),
        "ratio_vs_hf_transformers": or_null("ratio_vs_hf_transformers", hf.map(|h| b1 / h)),
        "node_rss_over_partition": or_null("node_rss_over_partition", rss_ratio),
    });
    println!("{report}");
    Ok(report)
}
