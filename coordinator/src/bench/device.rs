//! `coordinator bench --device cuda`: the GPU figures of issue 10 in one run, on one set of
//! weights (`--load-format dummy` at the full size): batch-1 and batch-32 decode and a 512-token
//! prefill for (a) everything in this process on the GPU (and its batch-128 decode and batch-1
//! decode after a 4,096-token prompt), then, for each `--node-devices` entry,
//! (b/c) this process on the GPU with `--nodes` expert-node processes holding the experts on that
//! device (`cuda`: the same GPU over loopback gRPC; `cpu`: the machine's cores, bf16). CPU nodes
//! also get their share of the weight-bandwidth bound: expert bytes per token over the host's
//! measured read bandwidth. With `--scaling-gpus`, the scaling stage of issue 15: expert nodes
//! each on a GPU of their own, with micro-batch overlap off and on, batch 128 included. The peer
//! (Hugging Face transformers on the same GPU) is run beside this by `tests/gpu/bench.sh`.

use std::time::{Duration, Instant};

use omnishard_model::{Checkpoint, DeviceSpec};
use omnishard_proto::ModelConfig;
use serde_json::{Value, json};

use super::{BenchArgs, bandwidth, measure, node_args};
use crate::Engine;
use crate::cluster::{LocalCluster, find_expert_node_binary};
use crate::remote::{CudaIpc, GpuRouting, RemoteOptions, ShmLane};

/// Prompt of the in-process batch-1 decode measured after a long prompt.
const LONG_PROMPT: usize = 4096;

/// One configuration's figures.
struct Row {
    name: String,
    b1: f64,
    b32: f64,
    /// Measured in process, and for clusters with `--scaling-gpus` only.
    b128: Option<f64>,
    prefill: f64,
}

fn measure_engine(engine: &Engine, name: String, args: &BenchArgs) -> anyhow::Result<Row> {
    let quick = args.quick;
    let (b1_steps, b32_steps, b128_steps) = if quick { (8, 3, 2) } else { (48, 12, 6) };
    // Where a remote layer call's time goes, per phase: the timed decode steps (what the
    // warm-up steps left is dropped as the timed ones begin: first calls map IPC buffers and
    // load kernels), every round of the prefill.
    let profile = |phase: &str| {
        if let Some(remote) = engine.remote() {
            eprintln!("bench: {name}: {phase}: {}", remote.take_profile());
        }
    };
    let drop_warmup = || {
        if let Some(remote) = engine.remote() {
            remote.take_profile();
        }
    };
    profile("start-up");
    let b128 = if engine.remote().is_some() && args.scaling_gpus.is_empty() {
        None
    } else {
        let b128 = measure::decode_tok_s(engine, 128, 16, 2, b128_steps, drop_warmup)?;
        profile("b128 decode");
        Some(b128)
    };
    let b1 = measure::decode_tok_s(engine, 1, 16, 4, b1_steps, drop_warmup)?;
    profile("b1 decode");
    let b32 = measure::decode_tok_s(engine, 32, 16, 2, b32_steps, drop_warmup)?;
    profile("b32 decode");
    let prefill = measure::prefill_tok_s(engine, 512, if quick { 2 } else { 4 })?;
    profile("prefill 512");
    let row = Row {
        name,
        b1,
        b32,
        b128,
        prefill,
    };
    eprintln!(
        "bench: {}: b1 {:.1} tok/s, b32 {:.1} tok/s, b128 {}, prefill 512 {:.0} tok/s",
        row.name,
        row.b1,
        row.b32,
        row.b128.map_or("-".into(), |v| format!("{v:.1} tok/s")),
        row.prefill
    );
    Ok(row)
}

/// Expert weight bytes read per token at batch 1 (top-k experts of every MoE layer).
fn expert_bytes_per_token(cfg: &ModelConfig) -> f64 {
    let per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2;
    (cfg.moe_layers().len() * cfg.num_experts_per_tok * per_expert) as f64
}

/// Starts expert-node clusters on this benchmark's model and connects an engine on this
/// process's device to them.
struct Clusters<'a> {
    args: &'a BenchArgs,
    bin: std::path::PathBuf,
    dir: &'a std::path::Path,
    cfg: &'a ModelConfig,
    ckpt: &'a Checkpoint,
    device: &'a candle_core::Device,
}

impl Clusters<'_> {
    /// `count` nodes on `devices` (one for all, or one each) with `threads` host threads each;
    /// the nodes stop when the returned cluster is dropped.
    fn start(
        &self,
        count: usize,
        devices: &[DeviceSpec],
        threads: usize,
    ) -> anyhow::Result<(LocalCluster, Engine)> {
        let a = self.args;
        let nodes = LocalCluster::start(
            &self.bin,
            self.dir,
            count,
            a.dtype,
            Duration::from_secs(1800),
            devices,
            &node_args(a, threads),
        )?;
        let opts = RemoteOptions {
            rpc_timeout: Duration::from_secs(60),
            cuda_ipc: a.cuda_ipc == CudaIpc::Auto,
            shm_lane: a.shm_lane == ShmLane::Auto,
            gpu_routing: a.gpu_routing == GpuRouting::Auto,
            ..RemoteOptions::default()
        };
        let mut engine = Engine::load_remote_from(
            self.ckpt,
            self.cfg,
            a.dtype,
            self.device,
            nodes.addresses(),
            opts,
            false,
        )?;
        // Batch-1 steps replay a graph where the experts take a routed pass (`--gpu-routing`).
        engine.set_cuda_graph(a.cuda_graph);
        Ok((nodes, engine))
    }
}

/// Runs the GPU benchmark on `cfg`'s model in `dir`; returns the JSON object it printed last.
pub fn run(
    args: &BenchArgs,
    dir: &std::path::Path,
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    threads: usize,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let device = args.device.open()?;
    let mut rows = Vec::new();

    eprintln!("bench: [1/3] in-process on {}", args.device);
    let mut engine = Engine::load_local_from(ckpt, cfg, args.dtype, &device)?;
    engine.set_cuda_graph(args.cuda_graph);
    rows.push(measure_engine(
        &engine,
        format!("in-process, {}", args.device),
        args,
    )?);
    // How evenly the measured routing spreads over `--shard` nodes: a layer waits for its
    // busiest node, so this bounds what more nodes can give.
    let usage = engine.model().usage().snapshot();
    for n in 2..=args.scaling_gpus.len().max(3) {
        let (mean, worst) = shard_imbalance(cfg, &usage, n);
        eprintln!(
            "bench: routing so far over {n} --shard nodes: the busiest node gets {mean:.2}x an even share of a layer's assignments (mean over MoE layers; worst layer {worst:.2}x)"
        );
    }
    // Batch-1 decode after a long prompt, where decode attention reads a long cache each step
    // (the rows above decode after 16 tokens). Not fatal: a prefill of this length may not fit
    // a smaller GPU, and the figures after it should not be lost to that.
    let steps = if args.quick { 4 } else { 16 };
    let b1_long = match measure::decode_tok_s(&engine, 1, LONG_PROMPT, 2, steps, || {}) {
        Ok(tok_s) => {
            eprintln!("bench: in-process, b1 after a {LONG_PROMPT}-token prompt: {tok_s:.1} tok/s");
            Some(tok_s)
        }
        Err(e) => {
            eprintln!("bench: in-process, b1 after a {LONG_PROMPT}-token prompt failed: {e}");
            None
        }
    };
    drop(engine);
    // Freed device memory goes back to the driver at the next synchronization; the expert nodes
    // started below need it.
    device.synchronize()?;

    eprintln!("bench: [2/3] host read bandwidth (the CPU nodes' bound)");
    let host_bandwidth = bandwidth::read_bandwidth(1 << 30, if args.quick { 5 } else { 11 });

    eprintln!("bench: [3/3] expert-node clusters");
    let cluster = Clusters {
        args,
        bin: find_expert_node_binary()?,
        dir,
        cfg,
        ckpt,
        device: &device,
    };
    let mut cpu_fraction = None;
    let node_devices = if args.node_devices.is_empty() {
        vec![args.device]
    } else {
        args.node_devices.clone()
    };
    for node_device in node_devices {
        for count in args.nodes.iter().map(|&n| n as usize).filter(|&n| n > 0) {
            // CPU nodes share the machine's cores; GPU nodes need few host threads.
            let node_threads = match node_device {
                DeviceSpec::Cpu => (threads / count).max(1),
                DeviceSpec::Cuda(_) => 2,
            };
            let (_nodes, engine) = cluster.start(count, &[node_device], node_threads)?;
            let row = measure_engine(
                &engine,
                format!("{} + {count} {node_device} node(s)", args.device),
                args,
            )?;
            if node_device == DeviceSpec::Cpu {
                cpu_fraction = Some(row.b1 * expert_bytes_per_token(cfg) / host_bandwidth);
            }
            rows.push(row);
        }
    }

    let counts: Vec<usize> = if args.scaling_counts.is_empty() {
        (1..=args.scaling_gpus.len()).collect()
    } else {
        args.scaling_counts.iter().map(|&n| n as usize).collect()
    };
    if let Some(n) = counts.iter().find(|&&n| n > args.scaling_gpus.len()) {
        anyhow::bail!(
            "--scaling-counts {n}: only {} GPUs are given in --scaling-gpus",
            args.scaling_gpus.len()
        );
    }
    for n in counts {
        let devices: Vec<DeviceSpec> = args.scaling_gpus[..n]
            .iter()
            .map(|&g| DeviceSpec::Cuda(g))
            .collect();
        let names: Vec<String> = devices.iter().map(ToString::to_string).collect();
        eprintln!("bench: scaling: {n} node(s) on {}", names.join(", "));
        let (_nodes, mut engine) = cluster.start(n, &devices, 2)?;
        for overlap in [false, true] {
            // On: every step of two or more sequences is split (batch 32 too, below the
            // serving default), so that the rows show what the split does at each batch.
            engine.set_overlap_min_sequences(if overlap { 2 } else { 0 });
            let name = format!(
                "{} + nodes on {}, overlap {}",
                args.device,
                names.join("+"),
                if overlap { "on" } else { "off" }
            );
            rows.push(measure_engine(&engine, name, args)?);
        }
    }

    let base = &rows[0];
    println!(
        "model: {} ({} layers, {} experts, hidden {}, vocab {}), {}",
        dir.display(),
        cfg.num_hidden_layers,
        cfg.num_experts,
        cfg.hidden_size,
        cfg.vocab_size,
        args.dtype
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>13}",
        "configuration", "b1 tok/s", "b32 tok/s", "b128 tok/s", "prefill tok/s"
    );
    let b128_of = |r: &Row| r.b128.map_or("-".to_string(), |v| format!("{v:.1}"));
    for row in &rows {
        println!(
            "{:<44} {:>9.1} {:>9.1} {:>10} {:>13.0}   (of in-process: b1 {:.2}x, b32 {:.2}x{})",
            row.name,
            row.b1,
            row.b32,
            b128_of(row),
            row.prefill,
            row.b1 / base.b1,
            row.b32 / base.b32,
            match (row.b128, base.b128) {
                (Some(r), Some(b)) => format!(", b128 {:.2}x", r / b),
                _ => String::new(),
            }
        );
    }
    match b1_long {
        Some(tok_s) => println!(
            "in-process batch-1 decode after a {LONG_PROMPT}-token prompt: {tok_s:.1} tok/s ({:.2}x of after 16)",
            tok_s / base.b1
        ),
        None => println!("in-process batch-1 decode after a {LONG_PROMPT}-token prompt: -"),
    }
    println!("host read bandwidth {:.1} GB/s", host_bandwidth / 1e9);
    if let Some(f) = cpu_fraction {
        println!(
            "CPU nodes' batch-1 decode at {:.0}% of their weight-bandwidth bound",
            f * 100.0
        );
    }
    println!("bench took {:.0} s", started.elapsed().as_secs_f64());
    let report = json!({
        "device": args.device.to_string(),
        "dtype": args.dtype.to_string(),
        "layers": cfg.num_hidden_layers,
        "host_read_bandwidth_gb_s": host_bandwidth / 1e9,
        "cpu_nodes_fraction_of_bound": cpu_fraction,
        "long_prompt_tokens": LONG_PROMPT,
        "in_process_decode_tok_s_b1_long_prompt": b1_long,
        "rows": rows.iter().map(|r| json!({
            "configuration": r.name,
            "decode_tok_s_b1": r.b1,
            "decode_tok_s_b32": r.b32,
            "decode_tok_s_b128": r.b128,
            "prefill_tok_s_512": r.prefill,
        })).collect::<Vec<_>>(),
    });
    println!("{report}");
    Ok(report)
}

/// Over `n` nodes holding `--shard i/n` each: the busiest node's share of a layer's counted
/// assignments (`usage`: (layer, expert, count)) against an even share, as (mean over the MoE
/// layers with any, worst layer).
fn shard_imbalance(cfg: &ModelConfig, usage: &[(usize, usize, u64)], n: usize) -> (f64, f64) {
    let mut node_of = std::collections::HashMap::new();
    for i in 0..n {
        for pair in omnishard_proto::placement::shard_pairs(cfg, i, n) {
            node_of.insert(pair, i);
        }
    }
    let mut loads = vec![vec![0u64; n]; cfg.num_hidden_layers];
    for &(layer, expert, count) in usage {
        if let (Some(&node), Some(row)) = (node_of.get(&(layer, expert)), loads.get_mut(layer)) {
            row[node] += count;
        }
    }
    let ratios: Vec<f64> = loads
        .iter()
        .filter_map(|row| {
            let total: u64 = row.iter().sum();
            let max = *row.iter().max()?;
            (total > 0).then(|| max as f64 * n as f64 / total as f64)
        })
        .collect();
    let mean = ratios.iter().sum::<f64>() / ratios.len().max(1) as f64;
    (mean, ratios.iter().copied().fold(0.0, f64::max))
}

#[cfg(test)]
mod tests {
    use super::shard_imbalance;
    use crate::plan::tests::real_shape;

    #[test]
    fn the_busiest_shard_is_measured_per_layer() {
        let cfg = real_shape();
        // --shard i/2 holds pairs p with p % 2 == i: with 128 experts a layer, the even experts
        // on node 0. Layer 0 even (node 0: 10 + 10, node 1: 10 + 10); layer 1: node 0 has 30 of
        // 40; the other layers have no usage and do not count.
        let usage = [
            (0, 0, 10),
            (0, 1, 10),
            (0, 2, 10),
            (0, 3, 10),
            (1, 0, 20),
            (1, 1, 5),
            (1, 2, 10),
            (1, 3, 5),
        ];
        let (mean, worst) = shard_imbalance(&cfg, &usage, 2);
        assert!((mean - 1.25).abs() < 1e-9, "{mean}");
        assert!((worst - 1.5).abs() < 1e-9, "{worst}");
        // No usage at all: nothing to compare.
        assert_eq!(shard_imbalance(&cfg, &[], 2), (0.0, 0.0));
    }
}
