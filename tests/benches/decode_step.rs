//! Time of one batched decode step of the demo model in-process (no RPC, no HTTP), for 1, 8
//! and 32 sequences with 32 cached tokens each: how the model itself scales with the batch.
//!
//! Run: `cargo bench -p omnishard-tests --bench decode_step`

use candle_core::Device;
use std::time::{Duration, Instant};

use omnishard_coordinator::{ComputeDtype, Engine, KvCache, LogitsFor, Positions, SequenceInput};
use omnishard_tests::demo_model;

fn main() {
    let engine = Engine::load_local(&demo_model(), ComputeDtype::F32, &Device::Cpu).unwrap();
    let model = engine.model();
    let prompt: Vec<u32> = (1..=32).collect();
    println!("demo model, in-process experts, f32; one decode step after 32 cached tokens");
    println!(
        "{:>8} {:>12} {:>14} {:>12}",
        "batch", "step", "per sequence", "tokens/s"
    );
    for &b in &[1usize, 8, 32] {
        let mut caches: Vec<KvCache> = (0..b).map(|_| KvCache::new()).collect();
        for cache in caches.iter_mut() {
            let mut one = [SequenceInput {
                tokens: &prompt,
                positions: Positions::text(0, 32),
                cache,
            }];
            model.forward(&mut one, LogitsFor::Last).unwrap();
        }
        let token = [7u32];
        let mut samples = Vec::new();
        for step in 0..40u32 {
            let mut batch: Vec<SequenceInput> = caches
                .iter_mut()
                .map(|cache| SequenceInput {
                    tokens: &token,
                    positions: Positions::text(32 + step, 1),
                    cache,
                })
                .collect();
            let t = Instant::now();
            model.forward(&mut batch, LogitsFor::Last).unwrap();
            samples.push(t.elapsed());
        }
        samples.sort();
        let median: Duration = samples[samples.len() / 2];
        println!(
            "{b:>8} {:>9.2} ms {:>11.3} ms {:>12.0}",
            median.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e3 / b as f64,
            b as f64 / median.as_secs_f64()
        );
    }
}
