//! Sampling on the GPU (`ops/cuda/sample.cuh`) against the host sampler: greedy and top-k draws
//! the same tokens seed for seed (the same penalised logits, the same sorted list), top-p from the
//! device's candidates stays in the host's nucleus, the radix select finds the host's top
//! logits, ties beyond the cap go back to the host, and Gumbel-max draws follow the softmax.

use candle_core::{Device, Tensor};
use omnishard_coordinator::{BatchRow, Sampler, SamplingParams};
use omnishard_model::ops::cuda;
use omnishard_model::ops::sampling::{DEVICE_CANDIDATES, DeviceDraw, RowSampling};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::gpu;

/// A vocabulary-sized row (odd length) of random logits with a few repeated values.
fn random_row(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|i| {
            if i % 997 == 0 {
                3.5
            } else {
                rng.random::<f32>() * 8.0 - 4.0
            }
        })
        .collect()
}

fn on(dev: &Device, row: &[f32]) -> Tensor {
    Tensor::new(row, dev)
        .and_then(|t| t.unsqueeze(0))
        .expect("logits on the GPU")
}

#[test]
fn device_sampling_matches_the_host_sampler() {
    let dev = gpu();
    let row = random_row(151_937, 1);
    let logits = on(&dev, &row);
    let history: Vec<u32> = vec![5, 997, 997, 1994, 151_936, 40_000];
    let cases = [
        SamplingParams::default(),
        SamplingParams {
            repetition_penalty: 1.7,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_k: Some(40),
            repetition_penalty: 1.3,
            seed: 9,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_k: Some(DEVICE_CANDIDATES),
            top_p: 0.8,
            seed: 2,
            ..Default::default()
        },
    ];
    for params in cases {
        let (mut device, mut host) = (Sampler::new(params.clone()), Sampler::new(params.clone()));
        for step in 0..16 {
            let d = device
                .sample_tensor(&logits, &history)
                .expect("device draw");
            let h = host.sample(&row, &history);
            assert_eq!(d, h, "{params:?}, step {step}");
        }
    }
}

#[test]
fn top_p_candidates_stay_in_the_host_nucleus() {
    let dev = gpu();
    // Zipf-like (p ~ rank^-2.2 at this temperature, ranks shuffled over the vocabulary): the
    // nucleus of 0.9 is a handful of tokens, well inside the device's candidates.
    let mut rng = StdRng::seed_from_u64(3);
    let mut ranks: Vec<usize> = (0..50_001).collect();
    for i in (1..ranks.len()).rev() {
        ranks.swap(i, rng.random_range(0..=i));
    }
    let row: Vec<f32> = ranks
        .iter()
        .map(|&r| 10.0 - 2.0 * ((1 + r) as f32).ln())
        .collect();
    let logits = on(&dev, &row);
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.9,
        seed: 4,
        ..Default::default()
    };
    let mut order: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1));
    let probs: Vec<f64> = order
        .iter()
        .map(|&(_, l)| f64::from((l - order[0].1) / 0.9).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    let mut mass = 0.0;
    let nucleus: Vec<usize> = order
        .iter()
        .zip(&probs)
        .take_while(|(_, p)| {
            let inside = mass < 0.9 * total;
            mass += *p;
            inside
        })
        .map(|(&(i, _), _)| i)
        .collect();
    assert!(
        nucleus.len() < DEVICE_CANDIDATES / 2,
        "the case should fit: {}",
        nucleus.len()
    );
    let mut s = Sampler::new(params);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..400 {
        let t = s.sample_tensor(&logits, &[]).expect("draw") as usize;
        assert!(nucleus.contains(&t), "token {t} outside the nucleus");
        seen.insert(t);
    }
    assert!(
        seen.len() > 1,
        "a nucleus of {} gave one token",
        nucleus.len()
    );
}

#[test]
fn radix_select_finds_the_largest_logits_and_hands_ties_back() {
    let dev = gpu();
    let row = random_row(100_003, 7);
    let req = RowSampling {
        penalized: &[],
        penalty: 1.0,
        temperature: 1.3,
        top: 700,
        gumbel_key: None,
    };
    let Some(DeviceDraw::Candidates { sorted, total }) =
        cuda::sample_row(&on(&dev, &row), &req).expect("kernel")
    else {
        panic!("expected candidates")
    };
    let mut order: Vec<(u32, f32)> = (0..).zip(row.iter().copied()).collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1));
    assert!(sorted.len() >= 700, "{} candidates", sorted.len());
    assert_eq!(&sorted[..700], &order[..700]);
    let host_total: f64 = row
        .iter()
        .map(|&l| f64::from((l - order[0].1) / 1.3).exp())
        .sum();
    assert!(
        (f64::from(total) / host_total - 1.0).abs() < 1e-4,
        "{total} vs {host_total}"
    );

    let flat = vec![0.25f32; 5_000];
    let tied = cuda::sample_row(&on(&dev, &flat), &req).expect("kernel");
    assert_eq!(tied, Some(DeviceDraw::TooManyTies));
    // The sampler then finishes on the host: top-k of ties keeps the lowest ids.
    let mut s = Sampler::new(SamplingParams {
        temperature: 1.0,
        top_k: Some(3),
        ..Default::default()
    });
    for _ in 0..20 {
        assert!(s.sample_tensor(&on(&dev, &flat), &[]).expect("draw") < 3);
    }
}

#[test]
fn gumbel_draws_follow_the_softmax() {
    let dev = gpu();
    let row = [1.0f32, 0.0, 2.0, -1.0, 0.5];
    let logits = on(&dev, &row);
    let t = 0.8f32;
    let mut s = Sampler::new(SamplingParams {
        temperature: t,
        seed: 12,
        ..Default::default()
    });
    let n = 20_000;
    let mut counts = [0usize; 5];
    for _ in 0..n {
        counts[s.sample_tensor(&logits, &[]).expect("draw") as usize] += 1;
    }
    let weights: Vec<f64> = row.iter().map(|&l| f64::from(l / t).exp()).collect();
    let sum: f64 = weights.iter().sum();
    for (i, (&c, w)) in counts.iter().zip(&weights).enumerate() {
        let p = w / sum;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        let seen = c as f64 / n as f64;
        assert!((seen - p).abs() < 5.0 * sd, "token {i}: {seen} vs {p}");
    }
    let again = |seed| {
        let mut s = Sampler::new(SamplingParams {
            temperature: t,
            seed,
            ..Default::default()
        });
        (0..30)
            .map(|_| s.sample_tensor(&logits, &[]).expect("draw"))
            .collect::<Vec<_>>()
    };
    assert_eq!(again(5), again(5), "a seed repeats its draws");
}

#[test]
fn a_batch_of_rows_draws_what_each_row_draws_alone() {
    let dev = gpu();
    let vocab = 151_937;
    // Rows of one [n, vocab] tensor, as a step's logits are, each with other settings: greedy,
    // penalised greedy, Gumbel, top-k and top-p candidates, a penalised top-k.
    let rows: Vec<Vec<f32>> = (0..6).map(|r| random_row(vocab, 20 + r)).collect();
    let flat: Vec<f32> = rows.concat();
    let all = Tensor::from_vec(flat, (rows.len(), vocab), &dev).expect("logits on the GPU");
    let logits: Vec<Tensor> = (0..rows.len())
        .map(|r| all.narrow(0, r, 1).expect("row"))
        .collect();
    let history: Vec<u32> = vec![5, 997, 1994, 40_000, 151_936];
    let params = [
        SamplingParams::default(),
        SamplingParams {
            repetition_penalty: 1.7,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.9,
            seed: 4,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_k: Some(40),
            seed: 9,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_p: 0.8,
            seed: 2,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_k: Some(5),
            repetition_penalty: 1.3,
            seed: 3,
            ..Default::default()
        },
    ];
    for step in 0..8 {
        let mut batch: Vec<Sampler> = params.iter().cloned().map(Sampler::new).collect();
        let mut alone: Vec<Sampler> = params.iter().cloned().map(Sampler::new).collect();
        for _ in 0..step {
            // Advance every random stream alike: later draws use later keys.
            for (b, a) in batch.iter_mut().zip(alone.iter_mut()) {
                b.sample_tensor(&logits[0], &history).expect("draw");
                a.sample_tensor(&logits[0], &history).expect("draw");
            }
        }
        let mut rows: Vec<BatchRow<'_>> = batch
            .iter_mut()
            .zip(&logits)
            .map(|(sampler, logits)| BatchRow {
                sampler,
                logits,
                history: &history,
            })
            .collect();
        let together: Vec<u32> = Sampler::sample_batch(&mut rows)
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("batch draw");
        let one_by_one: Vec<u32> = alone
            .iter_mut()
            .zip(&logits)
            .map(|(s, l)| s.sample_tensor(l, &history).expect("draw"))
            .collect();
        assert_eq!(together, one_by_one, "step {step}");
    }
}
