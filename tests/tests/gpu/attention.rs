//! Prefill attention's fused kernel (`ops/cuda/attention.cuh`, `causal_softmax_bf16`) against the
//! reference's steps done on the host in f32: scores rounded to bf16 after the scale, keys past
//! each query masked, softmax, probabilities rounded to bf16. Odd shapes, with and without
//! cached positions before the queries, rows longer than one block's threads.

use candle_core::{DType, Device, Tensor};
use omnishard_model::ops::cuda;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::gpu;

#[test]
fn causal_softmax_matches_the_reference_steps() {
    let dev = gpu();
    for (heads, s, past, seed) in [
        (1usize, 1usize, 0usize, 1u64),
        (3, 7, 0, 2),
        (5, 13, 300, 3),
        (2, 600, 9, 4),
    ] {
        let total = past + s;
        let mut rng = StdRng::seed_from_u64(seed);
        let scores: Vec<f32> = (0..heads * s * total)
            .map(|_| rng.random::<f32>() * 60.0 - 30.0)
            .collect();
        let scores = Tensor::from_vec(scores, (heads, s, total), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .unwrap();
        let host: Vec<f32> = scores
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap();
        let scale = 128f32.powf(-0.5);
        let got = cuda::causal_softmax(&scores.to_device(&dev).unwrap(), scale, past)
            .unwrap()
            .expect("the fused kernel takes bf16 CUDA tensors")
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap();
        let mut worst = 0f32;
        for row in 0..heads * s {
            let visible = past + row % s + 1;
            let at = row * total;
            let v: Vec<f32> = host[at..at + visible]
                .iter()
                .map(|x| half::bf16::from_f32(x * scale).to_f32())
                .collect();
            let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = v.iter().map(|x| (x - m).exp()).sum();
            for j in 0..total {
                let p = got[at + j];
                if j >= visible {
                    assert_eq!(p, 0.0, "row {row}: masked key {j} has probability {p}");
                    continue;
                }
                let want = half::bf16::from_f32((v[j] - m).exp() / sum).to_f32();
                // One bf16 rounding step apart at most (the sum's order differs).
                let err = (p - want).abs();
                assert!(
                    err <= want.abs() * 2f32.powi(-7) + 1e-7,
                    "{heads}x{s} after {past}: row {row} key {j}: {p} against {want}"
                );
                worst = worst.max(err);
            }
        }
        eprintln!("causal softmax {heads}x{s} after {past}: worst absolute error {worst:.2e}");
    }
}
