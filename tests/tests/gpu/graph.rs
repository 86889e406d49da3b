//! Batch-1 decode replayed from a CUDA graph against the same steps launched from the host: the
//! same logits bit for bit at every step — the eager first step, the captured second, the
//! replays, and after the caches outgrow their buffers (new addresses, the same graph) — a
//! second sequence through the graph the first captured, and long caches, whose decode attention
//! is split over several blocks per head (a graph per split count).

use omnishard_coordinator::{ComputeDtype, CudaGraph, Engine};
use omnishard_tests::{FIXTURES, Golden, model_dir};

use super::{decode_steps, gpu};

#[test]
fn graph_decode_matches_launched_decode_bit_for_bit() {
    let dev = gpu();
    for name in FIXTURES {
        let golden = Golden::load(name);
        let eager = Engine::load_local(&model_dir(name), ComputeDtype::Bf16, &dev).unwrap();
        let mut graphed = Engine::load_local(&model_dir(name), ComputeDtype::Bf16, &dev).unwrap();
        assert!(
            graphed.set_cuda_graph(CudaGraph::Auto),
            "{name}: the decode graph should apply to a bf16 model with its experts on the GPU"
        );
        // 70 steps after a 5-token prompt: the caches' 64 positions run out at step 60.
        for (round, prompt) in [&golden.token_ids[..5], &golden.token_ids[2..9]]
            .into_iter()
            .enumerate()
        {
            let want = decode_steps(&eager, prompt, 70);
            let got = decode_steps(&graphed, prompt, 70);
            assert!(
                graphed.model().graph_replays() >= 68 * (round as u64 + 1),
                "{name}: only {} steps ran from the graph",
                graphed.model().graph_replays()
            );
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                let differ = g
                    .iter()
                    .zip(w)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differ, 0,
                    "{name} sequence {round} step {step}: {differ} logits differ"
                );
            }
        }
    }
}

#[test]
fn graph_decode_matches_launched_decode_across_split_counts() {
    // Caches of 1,020-1,029 positions: decode attention splits each head over 2 blocks, then 4
    // from 1,024 positions (flash-decoding) — a graph captured for each split count.
    let dev = gpu();
    let mut ran = 0;
    for name in FIXTURES {
        let golden = Golden::load(name);
        let eager = Engine::load_local(&model_dir(name), ComputeDtype::Bf16, &dev).unwrap();
        if matches!(eager.config().max_position_embeddings, Some(max) if max < 1100) {
            continue;
        }
        let mut graphed = Engine::load_local(&model_dir(name), ComputeDtype::Bf16, &dev).unwrap();
        assert!(graphed.set_cuda_graph(CudaGraph::Auto));
        let prompt: Vec<u32> = golden
            .token_ids
            .iter()
            .copied()
            .cycle()
            .take(1019)
            .collect();
        let want = decode_steps(&eager, &prompt, 10);
        let got = decode_steps(&graphed, &prompt, 10);
        assert!(
            graphed.model().graph_replays() >= 8,
            "{name}: only {} steps ran from the graphs",
            graphed.model().graph_replays()
        );
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            let differ = g
                .iter()
                .zip(w)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{name} step {step}: {differ} logits differ");
        }
        ran += 1;
    }
    assert!(ran > 0, "no fixture takes 1,100 positions");
}
