//! The GPU path (`cuda` feature; run on the device machine by `tests/gpu/check.sh`, never in CI):
//! each CUDA kernel against the CPU path on random inputs with odd shapes (prefill attention's in
//! `gpu/attention.rs`), the model on every fixture against the reference within the bf16
//! tolerance of the fidelity tests, decoding with the cache against full recomputation, batch-1
//! decode from a CUDA graph against the same steps launched (`gpu/graph.rs`), batch-1 routing
//! left on the GPU against the host's (`gpu/router.rs`), sampling
//! against the host sampler (`gpu/sampling.rs`), a cluster of GPU expert nodes against the single
//! GPU process bit for bit (`gpu/cluster.rs`), and the audio and vision towers on the GPU in bf16 (every omni-mixed
//! fixture prompt through `coordinator score --device cuda`) against the reference.
#![cfg(feature = "cuda")]

#[path = "gpu/attention.rs"]
mod attention;
#[path = "gpu/cluster.rs"]
mod cluster;
#[path = "gpu/graph.rs"]
mod graph;
#[path = "gpu/router.rs"]
mod router;
#[path = "gpu/sampling.rs"]
mod sampling;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use omnishard_coordinator::{ComputeDtype, Engine, KvCache, LogitsFor, Positions, SequenceInput};
use omnishard_model::experts::combine;
use omnishard_model::ops::cuda;
use omnishard_model::{
    Assignment, CallContext, Checkpoint, DeviceSpec, Experts, LocalExperts, Routing,
};
use omnishard_proto::ModelConfig;
use omnishard_tests::{FIXTURES, Golden, assert_bf16_close, model_dir, prefill_each};

fn gpu() -> Device {
    DeviceSpec::Cuda(0).open().expect("a CUDA GPU")
}

/// ‖a − b‖ / ‖b‖ over two tensors of the same shape.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values")
    };
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|v| v.is_finite()), "non-finite output");
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

fn bits(t: &Tensor) -> Vec<u16> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<half::bf16>())
        .expect("bf16 values")
        .into_iter()
        .map(half::bf16::to_bits)
        .collect()
}

/// A qwen3-moe config with the given sizes, 12 experts, top-3, for dummy weights.
fn odd_config(dir: &Path, hidden: usize, inter: usize) -> ModelConfig {
    let text = std::fs::read_to_string(model_dir("qwen3moe-flat").join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["hidden_size"] = hidden.into();
    cfg["moe_intermediate_size"] = inter.into();
    cfg["num_experts"] = 12.into();
    cfg["num_experts_per_tok"] = 3.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    ModelConfig::from_model_dir(dir).unwrap()
}

/// Random assignments of `n` tokens, `k` distinct experts each, skewed so that one expert gets
/// most tokens (more than one chunk of the kernel's token loop) and some get none.
fn assignments(n: usize, k: usize, experts: usize, seed: u64) -> Vec<Assignment> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut out = Vec::new();
    for t in 0..n {
        let mut chosen = vec![0usize];
        while chosen.len() < k {
            let e = next() % (experts - 2);
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        for e in chosen {
            out.push(Assignment {
                token: t as u32,
                expert: e as u32,
                weight: (next() % 1000) as f32 / 1000.0 + 0.01,
            });
        }
    }
    out
}

#[test]
fn fused_moe_matches_the_cpu_path_and_ignores_grouping() {
    // Odd sizes (GEMV kernels only), then multiples of 64 (experts with 5 or more tokens on the
    // tensor-core kernels; at 150 tokens expert 0's 150 take three 64-slot tiles, the last one
    // with warps whose rows are all padding).
    for (hidden, inter) in [(200, 72), (192, 64)] {
        fused_moe_case(hidden, inter);
    }
}

fn fused_moe_case(hidden: usize, inter: usize) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = odd_config(dir.path(), hidden, inter);
    let ckpt = Checkpoint::dummy(&cfg, 7);
    let pairs = cfg.expert_pairs();
    let cpu =
        LocalExperts::load(&ckpt, &cfg, &pairs, DType::BF16, &Device::Cpu, |_, _| {}).unwrap();
    let gpu_dev = gpu();
    let on_gpu = LocalExperts::load(&ckpt, &cfg, &pairs, DType::BF16, &gpu_dev, |_, _| {}).unwrap();
    assert_eq!(cpu.held(), on_gpu.held());
    for (n, seed) in [(1usize, 1u64), (3, 2), (13, 3), (37, 4), (150, 5)] {
        let xs = Tensor::randn(0f32, 1.0, (n, cfg.hidden_size), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .unwrap();
        let xs_gpu = xs.to_device(&gpu_dev).unwrap();
        let a = assignments(n, cfg.num_experts_per_tok, cfg.num_experts, seed);
        let want = cpu.expert_outputs(1, &xs, &a).unwrap();
        let got = on_gpu.expert_outputs(1, &xs_gpu, &a).unwrap();
        let err = relative_error(&got, &want);
        eprintln!(
            "fused MoE {hidden}x{inter}, {n} tokens: relative error {err:.2e} against the CPU path"
        );
        assert!(err < 1e-2, "{n} tokens: relative error {err}");
        // Each row depends only on its token and expert: a call with a subset gives the same bits.
        let subset: Vec<(usize, Assignment)> = a
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, x)| x.expert % 2 == 1)
            .collect();
        let only: Vec<Assignment> = subset.iter().map(|(_, x)| *x).collect();
        let part = on_gpu.expert_outputs(1, &xs_gpu, &only).unwrap();
        let rows: Vec<u32> = subset.iter().map(|(i, _)| *i as u32).collect();
        let picked = got
            .index_select(&Tensor::new(rows.as_slice(), &gpu_dev).unwrap(), 0)
            .unwrap();
        assert_eq!(
            bits(&part),
            bits(&picked),
            "{n} tokens: grouping changed bits"
        );
        // The GPU sum of expert outputs is the CPU one, bit for bit.
        let sum_gpu = combine(n, &a, &got).unwrap();
        let sum_cpu = combine(n, &a, &got.to_device(&Device::Cpu).unwrap()).unwrap();
        assert_eq!(
            bits(&sum_gpu),
            bits(&sum_cpu),
            "{n} tokens: combine differs"
        );
        // The fused step (at one token: down, weight and sum in one kernel) is outputs + combine,
        // bit for bit: what a node answers and the coordinator sums.
        let routing = Routing {
            top_k: cfg.num_experts_per_tok,
            ids: a.iter().map(|x| x.expert).collect(),
            weights: a.iter().map(|x| x.weight).collect(),
        };
        let fused = on_gpu
            .forward(1, &xs_gpu, &routing, &CallContext::default())
            .unwrap();
        assert_eq!(
            bits(&fused),
            bits(&sum_gpu),
            "{n} tokens: the fused step differs from outputs + combine"
        );
    }
}

#[test]
fn norm_kernels_match_the_cpu_math() {
    let dev = gpu();
    for (rows, heads, d) in [(1usize, 3usize, 32usize), (7, 5, 64), (5, 32, 128)] {
        let x = Tensor::randn(0f32, 2.0, (rows, heads, d), &Device::Cpu).unwrap();
        let w = Tensor::randn(1f32, 0.2, d, &Device::Cpu).unwrap();
        let pos: Vec<f32> = (0..rows * d).map(|i| (i / d) as f32 * 0.37 + 3.0).collect();
        let angle = Tensor::from_vec(pos, (rows, d), &Device::Cpu).unwrap();
        let (cos, sin) = (angle.cos().unwrap(), angle.sin().unwrap());
        let eps = 1e-6;
        // Reference in f32 on the host: RMSNorm, then x * cos + rotate_half(x) * sin.
        let norm = |x: &Tensor, w: &Tensor| -> Tensor {
            let inv = (x.sqr().unwrap().mean_keepdim(2).unwrap() + eps)
                .unwrap()
                .sqrt()
                .unwrap()
                .recip()
                .unwrap();
            x.broadcast_mul(&inv).unwrap().broadcast_mul(w).unwrap()
        };
        let rope = |normed: &Tensor| -> Tensor {
            let half = d / 2;
            let rotated = Tensor::cat(
                &[
                    &normed.narrow(2, half, half).unwrap().neg().unwrap(),
                    &normed.narrow(2, 0, half).unwrap(),
                ],
                2,
            )
            .unwrap();
            (normed.broadcast_mul(&cos.unsqueeze(1).unwrap()).unwrap()
                + rotated.broadcast_mul(&sin.unsqueeze(1).unwrap()).unwrap())
            .unwrap()
        };
        let normed = norm(&x, &w);
        // The last head is a k head with a weight of its own, the others q heads.
        let wk = Tensor::randn(1f32, 0.2, d, &Device::Cpu).unwrap();
        let q_heads = heads - 1;
        let want_q = rope(&norm(&x.narrow(1, 0, q_heads).unwrap(), &w));
        let want_k = rope(&norm(&x.narrow(1, q_heads, 1).unwrap(), &wk));
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        // The heads sit between other columns, as q and k do in the stacked projection.
        let wide = Tensor::cat(
            &[
                &Tensor::ones((rows, 3 * d), DType::F32, &Device::Cpu).unwrap(),
                &x.reshape((rows, heads * d)).unwrap(),
                &Tensor::ones((rows, d), DType::F32, &Device::Cpu).unwrap(),
            ],
            1,
        )
        .unwrap();
        let (q, k) = ((q_heads, &bf(&w)), (1, &bf(&wk)));
        let (cos_sin, wide) = ((&bf(&cos), &bf(&sin)), bf(&wide));
        let (got_q, got_k) = cuda::norm_rope(&wide, 3 * d, q, k, eps, cos_sin, false)
            .unwrap()
            .expect("the fused kernel takes bf16 CUDA tensors");
        for (what, got, want) in [("q", &got_q, &want_q), ("k", &got_k, &want_k)] {
            let err = relative_error(got, want);
            eprintln!("norm+rope {rows}x{heads}x{d} ({what}): relative error {err:.2e}");
            assert!(err < 1e-2, "norm+rope ({what}) relative error {err}");
        }
        // Written heads-first: the same values, and transposed back they are that memory.
        let (first_q, first_k) = cuda::norm_rope(&wide, 3 * d, q, k, eps, cos_sin, true)
            .unwrap()
            .expect("the fused kernel takes bf16 CUDA tensors");
        for (what, got, want) in [("q", &first_q, &got_q), ("k", &first_k, &got_k)] {
            assert_eq!(bits(got), bits(want), "norm+rope heads-first ({what})");
            assert!(
                got.transpose(0, 1).unwrap().is_contiguous(),
                "norm+rope heads-first ({what}): not heads-first memory"
            );
        }
        let got = cuda::rms_norm(&bf(&x), &bf(&w), eps)
            .unwrap()
            .expect("the fused kernel takes bf16 CUDA tensors");
        let err = relative_error(&got, &normed);
        eprintln!("rms_norm {rows}x{heads}x{d}: relative error {err:.2e}");
        assert!(err < 1e-2, "rms_norm relative error {err}");
    }
}

#[test]
fn residual_norm_and_router_kernels_match_the_cpu_math() {
    let dev = gpu();
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    // Residual add + RMSNorm: the sum bit for bit (one bf16 add), the norm within bf16 rounding.
    for (rows, dim) in [(1usize, 2048usize), (5, 200), (3, 9000)] {
        let x = bf(&Tensor::randn(0f32, 1.0, (rows, dim), &Device::Cpu).unwrap());
        let r = bf(&Tensor::randn(0f32, 1.0, (rows, dim), &Device::Cpu).unwrap());
        let w = bf(&Tensor::randn(1f32, 0.2, dim, &Device::Cpu).unwrap());
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let (sum, normed) = cuda::add_rms_norm(&on(&x), &on(&r), &on(&w), 1e-6)
            .unwrap()
            .expect("the fused kernel takes bf16 CUDA tensors");
        let want_sum = (&x + &r).unwrap();
        assert_eq!(bits(&sum), bits(&want_sum), "{rows}x{dim}: residual sum");
        let h = want_sum.to_dtype(DType::F32).unwrap();
        let inv = (h.sqr().unwrap().mean_keepdim(1).unwrap() + 1e-6)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let want = h
            .broadcast_mul(&inv)
            .unwrap()
            .broadcast_mul(&w.to_dtype(DType::F32).unwrap())
            .unwrap();
        let err = relative_error(&normed, &want);
        eprintln!("add+rms_norm {rows}x{dim}: relative error {err:.2e}");
        assert!(err < 1e-2, "{rows}x{dim}: relative error {err}");
    }
    // Decode's GEMV (projections, routers) against the CPU bf16 matmul: f32 sums, one rounding.
    for (m, n, k) in [(1usize, 128usize, 2048usize), (3, 77, 264), (4, 2051, 4096)] {
        let x = bf(&Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap());
        let w = bf(&Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap());
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let got = cuda::gemv(&on(&x), &on(&w))
            .unwrap()
            .expect("the GEMV takes a few bf16 CUDA rows");
        let want = omnishard_model::ops::linear(&x, &w).unwrap();
        let err = relative_error(&got, &want);
        eprintln!("gemv {m}x{k} by {n}: relative error {err:.2e}");
        assert!(err < 5e-3, "gemv {m}x{n}x{k}: relative error {err}");
    }
    // Router: softmax over unmasked experts, top-k, optional renormalisation, against the host.
    for (n, experts, k, norm) in [(1usize, 128usize, 8usize, true), (37, 12, 3, false)] {
        let logits = bf(&Tensor::randn(0f32, 2.0, (n, experts), &Device::Cpu).unwrap());
        let masked: Vec<u8> = (0..experts).map(|e| u8::from(e % 5 == 4)).collect();
        let mask = Tensor::new(masked.as_slice(), &dev).unwrap();
        let (ids, weights) = cuda::router_topk(&logits.to_device(&dev).unwrap(), &mask, k, norm)
            .unwrap()
            .expect("the kernel takes bf16 CUDA logits");
        let rows = logits
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (t, row) in rows.iter().enumerate() {
            let max = row
                .iter()
                .zip(&masked)
                .filter(|(_, m)| **m == 0)
                .map(|(l, _)| *l)
                .fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row
                .iter()
                .zip(&masked)
                .map(|(l, m)| if *m == 0 { (l - max).exp() } else { 0.0 })
                .collect();
            let total: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]));
            let top = &order[..k];
            let kept: f32 = top.iter().map(|&e| exp[e] / total).sum();
            for (i, &e) in top.iter().enumerate() {
                assert_eq!(ids[t * k + i] as usize, e, "token {t} choice {i}");
                let want = exp[e] / total / if norm { kept } else { 1.0 };
                let got = weights[t * k + i];
                assert!(
                    (got - want).abs() <= 1e-5 * want.max(1e-3),
                    "token {t} choice {i}: weight {got} vs {want}"
                );
            }
        }
        eprintln!("router top-{k} of {experts} over {n} tokens: ids equal, weights within 1e-5");
    }
}

#[test]
fn gpu_logits_match_the_reference_on_every_fixture() {
    let dev = gpu();
    for name in FIXTURES {
        let golden = Golden::load(name);
        let engine = Engine::load_local(&model_dir(name), ComputeDtype::Bf16, &dev).unwrap();
        let ours = engine.score(&golden.token_ids, None).unwrap();
        assert_bf16_close(
            &format!("{name} GPU vs reference bf16"),
            &ours,
            &golden.logits_bf16,
        );
        assert_bf16_close(&format!("{name} GPU vs CPU f32"), &ours, &golden.logits_f32);
        if let (Some(pos), Some(reference)) = (golden.positions(), &golden.logits_mrope_f32) {
            let ours = engine.score(&golden.token_ids, Some(pos)).unwrap();
            assert_bf16_close(&format!("{name} GPU mrope vs CPU f32"), &ours, reference);
        }
    }
}

#[test]
fn gpu_encoders_match_the_reference_on_the_media_fixtures() {
    use omnishard_tests::omni::mixed::{media_args, prompt};
    use omnishard_tests::omni::{golden, score_media};
    let (tensors, meta) = golden("omni-mixed");
    for (name, case) in meta["cases"].as_object().expect("cases") {
        let mut args = media_args(case);
        args.extend(["--device", "cuda", "--dtype", "bf16"].map(Into::into));
        let ours = score_media(&[], &prompt(case), &args);
        let want: Vec<Vec<f32>> = tensors[&format!("{name}.logits")].to_vec2().expect("rows");
        assert_bf16_close(&format!("{name} (encoders on the GPU)"), &ours, &want);
    }
}

#[test]
fn gpu_decode_with_cache_matches_full_recompute() {
    let dev = gpu();
    for name in FIXTURES {
        let golden = Golden::load(name);
        let engine = Engine::load_local(&model_dir(name), ComputeDtype::Bf16, &dev).unwrap();
        let model = engine.model();
        let prompts: Vec<Vec<u32>> = [5usize, 9, 14]
            .iter()
            .map(|&n| golden.token_ids[..n].to_vec())
            .collect();
        let mut caches = prefill_each(model, &prompts);
        // Three decode steps of the three sequences together (the batched decode attention).
        let mut seqs = prompts.clone();
        for step in 0..3u32 {
            let next = [11 + step, 23 + step, 42 + step];
            let mut batch: Vec<SequenceInput<'_>> = caches
                .iter_mut()
                .zip(&seqs)
                .zip(next.iter())
                .map(|((cache, seq), t)| SequenceInput {
                    tokens: std::slice::from_ref(t),
                    positions: Positions::text(seq.len() as u32, 1),
                    cache,
                })
                .collect();
            let stepped = model.forward(&mut batch, LogitsFor::Last).unwrap();
            for (i, (seq, logits)) in seqs.iter_mut().zip(stepped).enumerate() {
                seq.push(next[i]);
                let full = engine.score(seq, None).unwrap();
                let ours = logits.to_vec2::<f32>().unwrap();
                assert_bf16_close(
                    &format!("{name} step {step} sequence {i}: cached vs recomputed"),
                    &ours,
                    &full[full.len() - 1..],
                );
            }
        }
    }
}

/// Greedy decoding of `steps` tokens after `prompt`, one sequence: every step's logits.
fn decode_steps(engine: &Engine, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new();
    let mut input = prompt.to_vec();
    let mut rows = Vec::new();
    for _ in 0..=steps {
        let pos = cache.seq_len() as u32;
        let mut batch = [SequenceInput {
            tokens: &input,
            positions: Positions::text(pos, input.len()),
            cache: &mut cache,
        }];
        let logits = engine
            .forward(&mut batch, LogitsFor::Last, &CallContext::default())
            .unwrap();
        let row: Vec<f32> = logits[0].flatten_all().unwrap().to_vec1().unwrap();
        input = vec![omnishard_coordinator::sampling::argmax(&row)];
        rows.push(row);
    }
    rows
}
