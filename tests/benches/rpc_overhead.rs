//! Per-layer round-trip overhead of a decode step through expert nodes, against the same experts
//! called in-process. One token, hidden 2048, moe_intermediate 768, top-8 (the Qwen3-Omni thinker's
//! shapes), f32 compute, loopback TCP. The nodes are real tonic servers with the expert-node
//! service, run in this process on their own runtime (`in_process_node`) so no separate build is
//! needed.
//!
//! Run: `cargo bench -p omnishard-tests --bench rpc_overhead`

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use omnishard_coordinator::remote::{RemoteExperts, RemoteOptions};
use omnishard_model::{
    CallContext, Checkpoint, Experts, LocalExperts, Routing, fingerprint::fingerprint,
};
use omnishard_proto::ModelConfig;
use omnishard_proto::placement::shard_pairs;
use omnishard_tests::in_process_node;

const HIDDEN: usize = 2048;
const INTER: usize = 768;
const EXPERTS: usize = 16;
const TOP_K: usize = 8;

/// A one-layer qwen3_moe checkpoint with random bf16 expert weights.
fn write_checkpoint(dir: &Path) {
    let config = serde_json::json!({
        "model_type": "qwen3_moe", "vocab_size": 16, "hidden_size": HIDDEN, "num_hidden_layers": 1,
        "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "moe_intermediate_size": INTER,
        "norm_topk_prob": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut random_bf16 = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05;
                half::bf16::from_f32(v).to_bits().to_le_bytes()
            })
            .collect()
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    tensors.push((
        "model.layers.0.mlp.gate.weight".into(),
        vec![EXPERTS, HIDDEN],
        random_bf16(EXPERTS * HIDDEN),
    ));
    for e in 0..EXPERTS {
        let p = format!("model.layers.0.mlp.experts.{e}");
        tensors.push((
            format!("{p}.gate_proj.weight"),
            vec![INTER, HIDDEN],
            random_bf16(INTER * HIDDEN),
        ));
        tensors.push((
            format!("{p}.up_proj.weight"),
            vec![INTER, HIDDEN],
            random_bf16(INTER * HIDDEN),
        ));
        tensors.push((
            format!("{p}.down_proj.weight"),
            vec![HIDDEN, INTER],
            random_bf16(INTER * HIDDEN),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn median_and_p90(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (samples[samples.len() / 2], samples[samples.len() * 9 / 10])
}

fn time(
    experts: &dyn Experts,
    xs: &Tensor,
    routing: &Routing,
    iters: usize,
) -> (Duration, Duration) {
    for _ in 0..20 {
        experts
            .forward(0, xs, routing, &CallContext::default())
            .unwrap();
    }
    let samples = (0..iters)
        .map(|_| {
            let t = Instant::now();
            experts
                .forward(0, xs, routing, &CallContext::default())
                .unwrap();
            t.elapsed()
        })
        .collect();
    median_and_p90(samples)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path());
    let cfg = ModelConfig::from_model_dir(dir.path()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let fp = fingerprint(&cfg, &ckpt).unwrap();
    let all = cfg.expert_pairs();
    let local = LocalExperts::load(&ckpt, &cfg, &all, DType::F32, &Device::Cpu, |_, _| {}).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let one = vec![in_process_node(&rt, dir.path(), &all)];
    let two: Vec<String> = (0..2)
        .map(|i| in_process_node(&rt, dir.path(), &shard_pairs(&cfg, i, 2)))
        .collect();
    let opts = RemoteOptions::default();
    let (remote1, _) =
        RemoteExperts::connect(&one, &cfg, &fp, DType::F32, opts.clone(), false).unwrap();
    let (remote2, _) = RemoteExperts::connect(&two, &cfg, &fp, DType::F32, opts, false).unwrap();

    let xs = Tensor::randn(0f32, 1.0, (1, HIDDEN), &Device::Cpu).unwrap();
    let routing = Routing {
        top_k: TOP_K,
        ids: (0..TOP_K as u32).collect(),
        weights: vec![1.0 / TOP_K as f32; TOP_K],
    };
    let iters = 300;
    // Interleave the three measurements twice so drift on this shared machine hits all alike.
    let mut rows: Vec<(&str, Vec<(Duration, Duration)>)> = vec![
        ("in-process", vec![]),
        ("1 node (loopback gRPC)", vec![]),
        ("2 nodes (loopback gRPC)", vec![]),
    ];
    for _ in 0..2 {
        rows[0].1.push(time(&local, &xs, &routing, iters));
        rows[1].1.push(time(&remote1, &xs, &routing, iters));
        rows[2].1.push(time(&remote2, &xs, &routing, iters));
    }
    let best = |v: &[(Duration, Duration)]| *v.iter().min().unwrap();
    let (base, _) = best(&rows[0].1);
    println!(
        "decode step, one MoE layer: 1 token, hidden {HIDDEN}, top-{TOP_K} of {EXPERTS} experts, f32"
    );
    println!(
        "{:<26} {:>12} {:>12} {:>14} {:>8}",
        "path", "median", "p90", "overhead", "ratio"
    );
    for (name, v) in &rows {
        let (median, p90) = best(v);
        let overhead = median.as_secs_f64() - base.as_secs_f64();
        println!(
            "{name:<26} {:>9.1} µs {:>9.1} µs {:>11.1} µs {:>7.2}x",
            median.as_secs_f64() * 1e6,
            p90.as_secs_f64() * 1e6,
            overhead * 1e6,
            median.as_secs_f64() / base.as_secs_f64()
        );
    }
}
