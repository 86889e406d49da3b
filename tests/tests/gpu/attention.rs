//! Attention's kernels (`ops/cuda/attention.cuh`) against the reference's steps done on the host
//! in f32: prefill's fused softmax (`causal_softmax_bf16`: scores rounded to bf16 after the scale,
//! keys past each query masked, softmax, probabilities rounded to bf16; odd shapes, with and
//! without cached positions before the queries, rows longer than one block's threads), prefill's
//! fused attention (`prefill_attention_d*_bf16`: every head size it is built for, GQA and MQA,
//! odd lengths, long rows, keys and values read in place from cache-like buffers after cached
//! positions, and a head size without a kernel left to the unfused path) and decode attention at
//! every length (one block per head for short caches, flash-decoding's split
//! passes for long ones), which also writes the new key and value into the cache.

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
        let host = values_of(&scores);
        let scale = 128f32.powf(-0.5);
        let got = values_of(
            &cuda::causal_softmax(&scores.to_device(&dev).unwrap(), scale, past)
                .unwrap()
                .expect("the fused kernel takes bf16 CUDA tensors"),
        );
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

/// The values of `t` on the host, flattened, as f32.
fn values_of(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("a tensor's values on the host")
}

/// A random bf16 tensor on `dev` and its values on the host (as rounded).
fn random_bf16(shape: &[usize], rng: &mut StdRng, dev: &Device) -> (Tensor, Vec<f32>) {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    let t = Tensor::from_vec(values, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::BF16))
        .unwrap();
    let host = values_of(&t);
    (t.to_device(dev).unwrap(), host)
}

/// Causal attention of query rows after `past` cached positions as the reference rounds it:
/// scores bf16(bf16(q . k) * scale), softmax in f32, probabilities in bf16, f32 sums rounded to
/// bf16 at the end. `key(j)` and `value(j)` are key position `j`'s rows.
fn reference_row<R: AsRef<[f32]>>(
    query: &[f32],
    visible: usize,
    key: impl Fn(usize) -> R,
    value: impl Fn(usize) -> R,
    scale: f32,
) -> Vec<f32> {
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    let scores: Vec<f32> = (0..visible)
        .map(|j| {
            let dot: f32 = key(j).as_ref().iter().zip(query).map(|(a, b)| a * b).sum();
            bf(bf(dot) * scale)
        })
        .collect();
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = scores.iter().map(|x| (x - m).exp()).sum();
    let mut out = vec![0f32; query.len()];
    for (j, sc) in scores.iter().enumerate() {
        let p = bf((sc - m).exp() / sum);
        for (o, x) in out.iter_mut().zip(value(j).as_ref()) {
            *o += p * x;
        }
    }
    out.into_iter().map(bf).collect()
}

/// Relative error of `got` against `want` (root of the squared differences over `want`'s).
fn relative(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn prefill_attention_matches_the_reference_steps() {
    let dev = gpu();
    for (heads, kv_heads, d, s, past, seed) in [
        (4usize, 2usize, 128usize, 77usize, 0usize, 1u64),
        (32, 4, 128, 512, 0, 2),
        (8, 1, 64, 40, 130, 3),
        (6, 3, 32, 200, 0, 4),
        (2, 2, 32, 1, 63, 5),
        (4, 1, 128, 100, 3000, 6),
    ] {
        let total = past + s;
        // Keys and values in buffers with room past `total`, read through views as the cache
        // hands them out.
        let capacity = total + 5;
        let mut rng = StdRng::seed_from_u64(seed);
        let (q, qh) = random_bf16(&[heads, s, d], &mut rng, &dev);
        let (kb, kh) = random_bf16(&[kv_heads, capacity, d], &mut rng, &dev);
        let (vb, vh) = random_bf16(&[kv_heads, capacity, d], &mut rng, &dev);
        let (k, v) = (
            kb.narrow(1, 0, total).unwrap(),
            vb.narrow(1, 0, total).unwrap(),
        );
        let scale = half::bf16::from_f64((d as f64).powf(-0.5)).to_f32();
        let got = values_of(
            &cuda::prefill_attention(&q, &k, &v, past, scale)
                .unwrap()
                .expect("the fused kernel takes these shapes"),
        );
        let mut worst = 0f64;
        for h in 0..heads {
            let kv = h / (heads / kv_heads);
            let at = |j: usize| (kv * capacity + j) * d;
            for i in 0..s {
                let want = reference_row(
                    &qh[(h * s + i) * d..][..d],
                    past + i + 1,
                    |j| &kh[at(j)..at(j) + d],
                    |j| &vh[at(j)..at(j) + d],
                    scale,
                );
                let out = &got[(i * heads + h) * d..][..d];
                let err = relative(out, &want);
                assert!(
                    err < 1e-2,
                    "{heads} heads / {kv_heads} KV, d {d}, {s} queries after {past}: head {h} query {i}: relative error {err:.2e}"
                );
                worst = worst.max(err);
            }
        }
        eprintln!(
            "prefill attention, {heads} heads / {kv_heads} KV, d {d}, {s} queries after {past}: worst relative error {worst:.2e}"
        );
    }
    // A head size the kernel is not built for is left to the unfused path.
    let mut rng = StdRng::seed_from_u64(7);
    let (q, _) = random_bf16(&[2, 4, 96], &mut rng, &dev);
    let (k, _) = random_bf16(&[1, 4, 96], &mut rng, &dev);
    let none = cuda::prefill_attention(&q, &k, &k, 0, 0.1).unwrap();
    assert!(none.is_none(), "head size 96 has no fused kernel");
}

#[test]
fn decode_attention_matches_the_reference_steps_at_every_length() {
    // Short caches take one block per head, long ones flash-decoding's split passes (2 to 16
    // splits, fewer per head in a batch); GQA, MQA and odd lengths.
    let dev = gpu();
    for (heads, kv_heads, d, lengths, seed) in [
        (32usize, 4usize, 128usize, vec![1usize], 1u64),
        (32, 4, 128, vec![700], 2),
        (32, 4, 128, vec![4999], 3),
        (4, 2, 64, vec![7, 1100, 2501], 4),
        (6, 1, 32, vec![12_000], 5),
    ] {
        let seqs = lengths.len();
        let mut rng = StdRng::seed_from_u64(seed);
        let (q, qh) = random_bf16(&[seqs, heads, d], &mut rng, &dev);
        let (k_new, kn) = random_bf16(&[seqs, kv_heads, d], &mut rng, &dev);
        let (v_new, vn) = random_bf16(&[seqs, kv_heads, d], &mut rng, &dev);
        let mut caches = Vec::new();
        for &len in &lengths {
            let past = len - 1;
            let capacity = past + 3;
            caches.push((
                random_bf16(&[kv_heads, capacity, d], &mut rng, &dev),
                random_bf16(&[kv_heads, capacity, d], &mut rng, &dev),
                past,
            ));
        }
        let buffers: Vec<cuda::CacheBuffers<'_>> = caches
            .iter()
            .map(|((k, _), (v, _), past)| cuda::CacheBuffers { k, v, past: *past })
            .collect();
        let got = values_of(
            &cuda::decode_attention(&q, &k_new, &v_new, &buffers)
                .unwrap()
                .expect("the decode kernel takes these shapes"),
        );
        let scale = (d as f32).powf(-0.5);
        let mut worst = 0f64;
        for (s, ((_, kh), (_, vh), past)) in caches.iter().enumerate() {
            let capacity = past + 3;
            let row = |cache: &[f32], new: &[f32], kv: usize, j: usize| -> Vec<f32> {
                if j < *past {
                    cache[(kv * capacity + j) * d..][..d].to_vec()
                } else {
                    new[(s * kv_heads + kv) * d..][..d].to_vec()
                }
            };
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let want = reference_row(
                    &qh[(s * heads + h) * d..][..d],
                    past + 1,
                    |j| row(kh, &kn, kv, j),
                    |j| row(vh, &vn, kv, j),
                    scale,
                );
                let err = relative(&got[(s * heads + h) * d..][..d], &want);
                assert!(
                    err < 1e-2,
                    "{heads} heads, d {d}, sequence {s} ({} positions), head {h}: relative error {err:.2e}",
                    past + 1
                );
                worst = worst.max(err);
            }
        }
        // The new key and value went into each cache at `past`.
        for (s, ((k, _), (v, _), past)) in caches.iter().enumerate() {
            for (cache, new) in [(k, &k_new), (v, &v_new)] {
                let written = cache.narrow(1, *past, 1).unwrap().squeeze(1).unwrap();
                assert_eq!(
                    super::bits(&written),
                    super::bits(&new.get(s).unwrap()),
                    "sequence {s}: the new row in the cache"
                );
            }
        }
        eprintln!(
            "decode attention, {heads} heads / {kv_heads} KV, d {d}, lengths {lengths:?}: worst relative error {worst:.2e}"
        );
    }
}
