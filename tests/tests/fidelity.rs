//! The model against Hugging Face transformers 4.57.3: logits on every fixture, in f32 and
//! bf16, with text and with three-row mRoPE positions, and greedy continuations with the cache.

use candle_core::Device;
use omnishard_coordinator::{ComputeDtype, Engine, Sampler, SamplingParams};
use omnishard_tests::{
    BF16_TOL, FIXTURES, Golden, assert_bf16_close, compare, model_dir, prefill_each,
};

/// f32 bound: max |difference| <= F32_TOL * max(1, max |logit|).
const F32_TOL: f32 = 1e-4;

#[test]
fn f32_logits_match_reference_on_every_fixture() {
    for name in FIXTURES {
        let golden = Golden::load(name);
        let engine = Engine::load_local(&model_dir(name), ComputeDtype::F32, &Device::Cpu).unwrap();
        let diff = compare(
            &engine.score(&golden.token_ids, None).unwrap(),
            &golden.logits_f32,
        );
        eprintln!(
            "{name} f32 text: max |diff| {:.3e}, max |logit| {:.2}, relative {:.3e}",
            diff.max_abs,
            diff.max_ref,
            diff.relative()
        );
        assert!(diff.relative() <= F32_TOL, "{name}: {diff:?}");
        assert_eq!(diff.argmax_agree, 1.0, "{name}");
        if let (Some(pos), Some(reference)) = (golden.positions(), &golden.logits_mrope_f32) {
            let ours = engine.score(&golden.token_ids, Some(pos)).unwrap();
            let diff = compare(&ours, reference);
            eprintln!(
                "{name} f32 mrope: max |diff| {:.3e}, relative {:.3e}",
                diff.max_abs,
                diff.relative()
            );
            assert!(diff.relative() <= F32_TOL, "{name} mrope: {diff:?}");
            // The three-row positions must actually matter, or this test proves nothing.
            let text = compare(&ours, &golden.logits_f32);
            assert!(
                text.max_abs > 1e-2,
                "{name}: mRoPE positions changed nothing"
            );
        }
    }
}

#[test]
fn bf16_logits_match_reference_within_tolerance() {
    for name in FIXTURES {
        let golden = Golden::load(name);
        let engine =
            Engine::load_local(&model_dir(name), ComputeDtype::Bf16, &Device::Cpu).unwrap();
        let ours = engine.score(&golden.token_ids, None).unwrap();
        assert_bf16_close(name, &ours, &golden.logits_bf16);
    }
}

#[test]
fn greedy_with_cache_matches_reference_and_full_recompute() {
    for name in FIXTURES {
        let golden = Golden::load(name);
        let engine = Engine::load_local(&model_dir(name), ComputeDtype::F32, &Device::Cpu).unwrap();
        let n = golden.greedy_f32.len();
        assert!(n >= 16);
        let mut sampler = Sampler::new(SamplingParams::default());
        let cached = engine
            .generate(&golden.token_ids, n, &mut sampler, &[], |_| true)
            .unwrap();
        assert_eq!(
            cached, golden.greedy_f32,
            "{name}: cached greedy differs from the reference"
        );
        // Without any cache: score the whole sequence again for every new token.
        let mut seq = golden.token_ids.clone();
        for (step, &expected) in cached.iter().enumerate() {
            let logits = engine.score(&seq, None).unwrap();
            let last = logits.last().unwrap();
            let next = omnishard_coordinator::sampling::argmax(last);
            assert_eq!(next, expected, "{name}: step {step} differs without cache");
            seq.push(next);
        }
    }
}

#[test]
fn batched_decode_matches_sequences_decoded_alone() {
    use omnishard_coordinator::{LogitsFor, Positions, SequenceInput};
    // f32 takes the fused CPU kernel, bf16 the generic tensor path.
    for (name, dtype, tolerance) in [
        ("omni-gqa-top4", ComputeDtype::F32, 1e-5),
        ("omni-mqa-step2", ComputeDtype::F32, 1e-5),
        ("omni-gqa-top4", ComputeDtype::Bf16, BF16_TOL),
    ] {
        let golden = Golden::load(name);
        let engine = Engine::load_local(&model_dir(name), dtype, &Device::Cpu).unwrap();
        let model = engine.model();
        let prompts: Vec<Vec<u32>> = [5usize, 9, 14]
            .iter()
            .map(|&n| golden.token_ids[..n].to_vec())
            .collect();
        let next = 42u32;
        // Prefill each alone, twice: one set of caches for the batched step, one for solo steps.
        let mut batched_caches = prefill_each(model, &prompts);
        let mut solo_caches = prefill_each(model, &prompts);
        let tokens = [next];
        let mut batch: Vec<SequenceInput> = prompts
            .iter()
            .zip(batched_caches.iter_mut())
            .map(|(p, cache)| SequenceInput {
                tokens: &tokens,
                positions: Positions::text(p.len() as u32, 1),
                cache,
            })
            .collect();
        let together = model.forward(&mut batch, LogitsFor::Last).unwrap();
        for (i, (p, cache)) in prompts.iter().zip(solo_caches.iter_mut()).enumerate() {
            let mut one = [SequenceInput {
                tokens: &tokens,
                positions: Positions::text(p.len() as u32, 1),
                cache,
            }];
            let alone = model.forward(&mut one, LogitsFor::Last).unwrap();
            let diff = compare(
                &together[i].to_vec2::<f32>().unwrap(),
                &alone[0].to_vec2::<f32>().unwrap(),
            );
            assert!(
                diff.relative() <= tolerance,
                "{name} {dtype:?} sequence {i}: {diff:?}"
            );
            assert_eq!(diff.argmax_agree, 1.0);
        }
    }
}
