//! A cluster of GPU expert nodes against the single GPU process, bit for bit: the fixtures'
//! prompts, batch-1 decode (replayed from a CUDA graph with routed passes where every layer is
//! routed) and a step of 4 sequences, with the routing left on the GPU or planned on the host,
//! answers in GPU memory or as bytes, calls through shared-memory lanes or gRPC.

use std::time::Duration;

use omnishard_coordinator::remote::RemoteOptions;
use omnishard_coordinator::{
    ComputeDtype, CudaGraph, Engine, KvCache, LogitsFor, Positions, SequenceInput,
};
use omnishard_model::CallContext;
use omnishard_tests::{ExpertNode, Golden, addresses, assert_bits_equal, assert_lanes, model_dir};

use super::{decode_steps, gpu};

/// Each prompt prefilled alone, then one decode step of them all: its logits. With `halves`
/// that step runs as two forward calls, the first half of the sequences then the rest — what
/// a cluster's overlapped step computes (`overlap::split_point` cuts one-token sequences in the
/// middle).
fn batched_step(engine: &Engine, prompts: &[&[u32]], halves: bool) -> Vec<Vec<f32>> {
    let ctx = CallContext::default();
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
    let mut next = Vec::new();
    for (prompt, cache) in prompts.iter().zip(&mut caches) {
        let mut batch = [SequenceInput {
            tokens: prompt,
            positions: Positions::text(0, prompt.len()),
            cache,
        }];
        let logits = engine.forward(&mut batch, LogitsFor::Last, &ctx).unwrap();
        let row: Vec<f32> = logits[0].flatten_all().unwrap().to_vec1().unwrap();
        next.push([omnishard_coordinator::sampling::argmax(&row)]);
    }
    let mut batch: Vec<SequenceInput> = caches
        .iter_mut()
        .zip(&next)
        .zip(prompts)
        .map(|((cache, token), prompt)| SequenceInput {
            tokens: token,
            positions: Positions::text(prompt.len() as u32, 1),
            cache,
        })
        .collect();
    let logits = if halves {
        let (first, second) = batch.split_at_mut(prompts.len() / 2);
        let mut logits = engine.forward(first, LogitsFor::Last, &ctx).unwrap();
        logits.extend(engine.forward(second, LogitsFor::Last, &ctx).unwrap());
        logits
    } else {
        engine.forward(&mut batch, LogitsFor::Last, &ctx).unwrap()
    };
    logits
        .iter()
        .map(|l| l.flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn gpu_cluster_matches_the_gpu_process_bit_for_bit() {
    let dev = gpu();
    for (name, shards) in [("omni-gqa-top4", 2usize), ("omni-mqa-step2", 3)] {
        let dir = model_dir(name);
        let golden = Golden::load(name);
        let local = Engine::load_local(&dir, ComputeDtype::Bf16, &dev).unwrap();
        let want = local.score(&golden.token_ids, golden.positions()).unwrap();
        // Batch-1 decode in process keeps the routing on the GPU (tables built there); the
        // cluster's nodes get it from the host: the same bits either way.
        let prompt = &golden.token_ids[..golden.token_ids.len().min(6)];
        let want_steps = decode_steps(&local, prompt, 8);
        let cfg = local.config().clone();
        let per_layer = local.model().usage().snapshot().into_iter().fold(
            vec![0u64; cfg.num_hidden_layers],
            |mut acc, (layer, _, n)| {
                acc[layer] += n;
                acc
            },
        );
        for layer in cfg.moe_layers() {
            // The score call, the prompt and 8 single-token steps, top-k experts per token.
            let tokens = (golden.token_ids.len() + prompt.len() + 8) as u64;
            assert_eq!(
                per_layer[layer],
                tokens * cfg.num_experts_per_tok as u64,
                "{name}: layer {layer}'s usage counts (GPU-kept batch-1 counts folded in)"
            );
        }
        // After the usage check: these count too.
        let prompts: Vec<&[u32]> = (2..6)
            .map(|k| &golden.token_ids[..k.min(golden.token_ids.len())])
            .collect();
        let want_halves = batched_step(&local, &prompts, true);
        let want_whole = batched_step(&local, &prompts, false);
        drop(local);
        // GPU routing takes nodes on another GPU (those on the coordinator's own take the host
        // path): with two GPUs the nodes go to the second.
        let gpus =
            candle_core::cuda_backend::cudarc::driver::CudaContext::device_count().unwrap_or(1);
        let node_device = if gpus >= 2 { "cuda:1" } else { "cuda" };
        if gpus < 2 {
            eprintln!("{name}: one GPU: the nodes share it, and GPU routing is not exercised");
        }
        let nodes: Vec<ExpertNode> = (0..shards)
            .map(|i| {
                ExpertNode::start(
                    &dir,
                    &[
                        "--shard",
                        &format!("{i}/{shards}"),
                        "--dtype",
                        "bf16",
                        "--device",
                        node_device,
                    ],
                )
            })
            .collect();
        // Layers with their routing left on the coordinator's GPU (the default), the same
        // planned on the host with the answers in the nodes' GPU memory, copied GPU to GPU (CUDA
        // IPC), and as bytes; calls through shared-memory lanes (the default) and over gRPC.
        for (cuda_ipc, shm_lane, gpu_routing) in [
            (true, true, true),
            (true, false, true),
            (true, true, false),
            (false, true, false),
        ] {
            let opts = RemoteOptions {
                shm_lane,
                gpu_routing,
                rpc_timeout: Duration::from_secs(30),
                startup_timeout: Duration::from_secs(120),
                cuda_ipc,
                // The fixtures' rows are small: every request past a node's first answer
                // sends them in GPU memory.
                ipc_input_min_bytes: 0,
                ..RemoteOptions::default()
            };
            let mut engine = Engine::load_remote(
                &dir,
                ComputeDtype::Bf16,
                &dev,
                &addresses(&nodes),
                opts,
                false,
            )
            .unwrap();
            // Batch-1 steps replay a CUDA graph where every layer is routed (a routed pass
            // a step, `pass.rs`), and run eagerly otherwise.
            assert_eq!(
                engine.set_cuda_graph(CudaGraph::Auto),
                gpu_routing && cuda_ipc
            );
            let how = format!(
                "{name} on {shards} GPU nodes, CUDA IPC {cuda_ipc}, lanes {shm_lane}, GPU routing {gpu_routing}"
            );
            let got = engine.score(&golden.token_ids, golden.positions()).unwrap();
            assert_bits_equal(&got, &want, &how);
            let got_steps = decode_steps(&engine, prompt, 8);
            assert_bits_equal(&got_steps, &want_steps, &format!("{how}, batch-1 decode"));
            // Of the 8 single-token steps the first runs eagerly (it loads the kernels); every
            // later one replays the graph, its routed pass done (a failed pass runs the step
            // again without the graph, and is not counted).
            assert_eq!(
                engine.model().graph_replays(),
                if gpu_routing && gpus >= 2 { 7 } else { 0 },
                "{how}: batch-1 steps from the graph"
            );
            // A step of 4 sequences as two overlapped micro-batches: each half's logits as the
            // GPU process computes that half alone. Where every layer is routed the step is not
            // split (BENCHMARKS.md, issue 15: the halves would make the nodes read their
            // experts twice), and the batch's logits are those of one batch of 4.
            engine.set_overlap_min_sequences(2);
            let routed = gpu_routing && cuda_ipc && gpus >= 2;
            let got = batched_step(&engine, &prompts, false);
            let want = if routed { &want_whole } else { &want_halves };
            assert_bits_equal(&got, want, &format!("{how}, a step of 4 sequences"));
            let status = engine.remote().expect("a cluster").status();
            for node in &status {
                // A routed layer's rows are neither lent nor staged: the first calls (before a
                // node has answered in GPU memory) take the host path.
                assert_eq!(
                    (
                        node.gpu_memory_answers > 0,
                        node.gpu_memory_requests > 0 || gpu_routing,
                        node.gpu_routed_calls > 0,
                    ),
                    (cuda_ipc, cuda_ipc, gpu_routing && gpus >= 2),
                    "{how}: {} answered {} times in GPU memory, read {} requests from it and took {} routed calls",
                    node.name,
                    node.gpu_memory_answers,
                    node.gpu_memory_requests,
                    node.gpu_routed_calls
                );
            }
            assert_lanes(&status, shm_lane, &how);
        }
        eprintln!("{name}: {shards} GPU expert nodes give the GPU process's logits bit for bit");
    }
}
