//! Micro-batch overlap (`coordinator/src/overlap.rs`) against real `expert-node` processes: a
//! batch of sequences prefilled and decoded with the overlap on gives the same logits, bit for
//! bit, as with it off, in bf16 on the CPU, where omnishard's kernels compute every row on its
//! own whatever else shares the batch (AVX-512 / AVX2 paths; AMX tiles and candle's f32 gemm are
//! not batch-invariant, so there, as on a GPU, the overlap moves logits by rounding, as any
//! change of batch composition under continuous batching does).

use std::time::Duration;

use candle_core::Device;
use omnishard_coordinator::remote::RemoteOptions;
use omnishard_coordinator::{ComputeDtype, Engine, KvCache, LogitsFor, Positions, SequenceInput};
use omnishard_model::CallContext;
use omnishard_tests::{ExpertNode, Golden, addresses, assert_bits_equal, model_dir};

/// Prefills `prompts` together, then decodes `steps` greedy tokens for all of them at once;
/// returns every step's logits, one row per sequence.
fn run(engine: &Engine, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<Vec<f32>>> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = Vec::new();
    for _ in 0..=steps {
        let mut batch: Vec<SequenceInput<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| {
                let pos = cache.seq_len() as u32;
                SequenceInput {
                    tokens,
                    positions: Positions::text(pos, tokens.len()),
                    cache,
                }
            })
            .collect();
        let logits = engine
            .forward(&mut batch, LogitsFor::Last, &CallContext::default())
            .expect("forward");
        let rows: Vec<Vec<f32>> = logits
            .iter()
            .map(|l| l.flatten_all().and_then(|t| t.to_vec1()).expect("logits"))
            .collect();
        inputs = rows
            .iter()
            .map(|r| vec![omnishard_coordinator::sampling::argmax(r)])
            .collect();
        out.push(rows);
    }
    out
}

#[test]
fn overlapped_micro_batches_match_the_whole_batch_bit_for_bit() {
    for (name, dtype, flag) in [
        ("omni-gqa-top4", ComputeDtype::Bf16, "bf16"),
        ("omni-tied-dense-top1", ComputeDtype::Bf16, "bf16"),
    ] {
        let dir = model_dir(name);
        let golden = Golden::load(name);
        // Nine sequences of different lengths, cut from the fixture's prompt.
        let prompts: Vec<Vec<u32>> = (0..9)
            .map(|i| {
                let ids = &golden.token_ids;
                let len = 1 + (i * 3) % ids.len();
                ids[i % ids.len()..]
                    .iter()
                    .chain(ids)
                    .take(len)
                    .copied()
                    .collect()
            })
            .collect();
        let nodes = ExpertNode::shards(&dir, 2, flag);
        let opts = RemoteOptions {
            rpc_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(60),
            ..RemoteOptions::default()
        };
        let mut engine =
            Engine::load_remote(&dir, dtype, &Device::Cpu, &addresses(&nodes), opts, false)
                .expect("engine");
        engine.set_overlap_min_sequences(0);
        let whole = run(&engine, &prompts, 4);
        // Every layer call was profiled, with the nodes' own timing in each answer.
        let profile = engine.remote().expect("remote experts").take_profile();
        assert!(
            profile.calls > 0 && profile.answers >= profile.calls,
            "{profile}"
        );
        engine.set_overlap_min_sequences(2);
        let overlapped = run(&engine, &prompts, 4);
        for (step, (a, b)) in overlapped.iter().zip(&whole).enumerate() {
            assert_bits_equal(a, b, &format!("{name} ({flag}), step {step}"));
        }
        eprintln!("{name} ({flag}): 9 sequences, prefill + 4 steps, overlap on = off bit for bit");
    }
}
