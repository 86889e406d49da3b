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
            assert_same_steps(&got, &want, &format!("{name} sequence {round}"));
        }
    }
}

#[test]
fn graph_decode_matches_launched_decode_across_split_counts() {
    // Caches of 1,020-1,029 positions: decode attention splits each head over 2 blocks, then 4
    // from 1,024 positions (flash-decoding) — a graph captured for each split count. The
    // fixtures allow 512 positions, so each runs from a copy whose config allows 4,096 (RoPE
    // is computed, not stored: the weights are the fixture's).
    let dev = gpu();
    for name in FIXTURES {
        let dir = long_context_copy(name);
        let golden = Golden::load(name);
        let eager = Engine::load_local(dir.path(), ComputeDtype::Bf16, &dev).unwrap();
        let mut graphed = Engine::load_local(dir.path(), ComputeDtype::Bf16, &dev).unwrap();
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
        assert_same_steps(&got, &want, name);
    }
}

/// Every step's logits of `got` bit for bit those of `want`.
fn assert_same_steps(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: steps");
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        let differ = g
            .iter()
            .zip(w)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{what} step {step}: {differ} logits differ");
    }
}

/// The fixture `name` in a temporary directory with every `max_position_embeddings` of its
/// config at 4,096 (its other files linked, not copied).
fn long_context_copy(name: &str) -> tempfile::TempDir {
    fn widen(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (key, value) in map.iter_mut() {
                    if key == "max_position_embeddings" {
                        *value = 4096.into();
                    } else {
                        widen(value);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(widen),
            _ => {}
        }
    }
    let src = model_dir(name);
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let to = dir.path().join(path.file_name().unwrap());
        if path.file_name().is_some_and(|n| n == "config.json") {
            let mut cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            widen(&mut cfg);
            std::fs::write(&to, cfg.to_string()).unwrap();
        } else {
            std::os::unix::fs::symlink(&path, &to).unwrap();
        }
    }
    dir
}
