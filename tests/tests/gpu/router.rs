//! Routing without the host: the one-launch router of batch-1 decode (gate projection and top-k,
//! `router_gate_topk1_bf16`) against the projection then the top-k in two launches; the experts
//! taking the router's choices on the GPU (batch 1: the kernels read the top-k; larger batches:
//! the tables built there by `moe_plan`) against the same choices handed over from the host — both
//! bit for bit, since the cluster's nodes take the host's routing and must match the single
//! process; and the top-k of NaN logits naming experts that exist.

use candle_core::{DType, Device, Tensor};
use omnishard_model::ops::cuda;
use omnishard_model::{CallContext, Checkpoint, Experts, LocalExperts, Routing};

use super::{bits, gpu, odd_config};

fn randn(shape: (usize, usize), std: f32, dev: &Device) -> Tensor {
    Tensor::randn(0f32, std, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::BF16))
        .and_then(|t| t.to_device(dev))
        .expect("a random bf16 tensor")
}

#[test]
fn one_launch_router_matches_projection_then_top_k() {
    let dev = gpu();
    let Device::Cuda(cuda_dev) = &dev else {
        panic!("gpu() opened {dev:?}")
    };
    // The model's shape, then odd ones (a partial last block of warps, masked experts).
    for (experts, hidden, k, norm) in [
        (128, 2048, 8, true),
        (37, 264, 5, false),
        (12, 200, 3, true),
    ] {
        let masked: Vec<u8> = (0..experts).map(|e| u8::from(e % 7 == 3)).collect();
        let mask = Tensor::new(masked.as_slice(), &dev).unwrap();
        let ticket = cuda::RouterTicket::new(&dev).unwrap().expect("a GPU");
        let gate = randn((experts, hidden), 0.05, &dev);
        for seed in 0..4 {
            let x = randn((1, hidden), 1.0 + seed as f32, &dev);
            let logits = cuda::gemv(&x, &gate).unwrap().expect("a bf16 GEMV");
            let (want_ids, want_w) = cuda::router_topk(&logits, &mask, k, norm)
                .unwrap()
                .expect("bf16 logits on the GPU");
            // Repeated: the last block must leave the ticket at zero for the next launch.
            for round in 0..3 {
                let (ids, w) = cuda::router_gate_topk1(&x, &gate, &mask, &ticket, k, norm)
                    .unwrap()
                    .expect("one bf16 row on the GPU")
                    .to_host(cuda_dev)
                    .unwrap();
                assert_eq!(
                    ids, want_ids,
                    "{experts} experts, seed {seed}, round {round}"
                );
                let to_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(to_bits(&w), to_bits(&want_w), "{experts} experts: weights");
                assert!(
                    ids.iter().all(|&e| masked[e as usize] == 0),
                    "a masked expert"
                );
            }
        }
        eprintln!("one-launch router, top-{k} of {experts} over {hidden}: the two-launch bits");
    }
}

#[test]
fn device_routed_experts_match_the_host_routed_step() {
    let dev = gpu();
    let Device::Cuda(cuda_dev) = &dev else {
        panic!("gpu() opened {dev:?}")
    };
    for (hidden, inter) in [(200, 72), (96, 64)] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = odd_config(dir.path(), hidden, inter);
        let ckpt = Checkpoint::dummy(&cfg, 11);
        let experts = LocalExperts::load(
            &ckpt,
            &cfg,
            &cfg.expert_pairs(),
            DType::BF16,
            &dev,
            |_, _| {},
        )
        .unwrap();
        let layer = 1;
        assert!(
            experts.takes_device_routing(layer),
            "every expert is held on the GPU"
        );
        let (e, k) = (cfg.num_experts, cfg.num_experts_per_tok);
        let mask = Tensor::zeros(e, DType::U8, &dev).unwrap();
        let ticket = cuda::RouterTicket::new(&dev).unwrap().expect("a GPU");
        let gate = randn((e, hidden), 0.1, &dev);
        let usage = Tensor::zeros(e, DType::U32, &dev).unwrap();
        let mut counted = vec![0u32; e];
        // Batch 1 (the one-launch router, top-k read by the kernels), then batches whose tables
        // are built on the GPU: a few tokens (GEMVs only), then ~10 a expert (tensor-core tiles).
        for (seed, n) in [(0, 1), (1, 1), (2, 2), (3, 9), (4, 40), (5, 40)] {
            let x = randn((n, hidden), 1.0 + seed as f32 / 3.0, &dev);
            let routing = if n == 1 {
                cuda::router_gate_topk1(&x, &gate, &mask, &ticket, k, true)
                    .unwrap()
                    .expect("one bf16 row on the GPU")
            } else {
                let logits = x.matmul(&gate.t().unwrap()).unwrap();
                cuda::router_topk_on_device(&logits, &mask, k, true)
                    .unwrap()
                    .expect("bf16 logits on the GPU")
            };
            let got = experts
                .forward_device_routed(layer, &x, &routing, &usage, &CallContext::default())
                .unwrap();
            let (ids, weights) = routing.to_host(cuda_dev).unwrap();
            for &id in &ids {
                counted[id as usize] += 1;
            }
            let host = Routing {
                top_k: k,
                ids,
                weights,
            };
            let want = experts
                .forward(layer, &x, &host, &CallContext::default())
                .unwrap();
            assert_eq!(
                bits(&got),
                bits(&want),
                "{hidden}x{inter}, {n} tokens, seed {seed}"
            );
        }
        assert_eq!(
            usage.to_vec1::<u32>().unwrap(),
            counted,
            "{hidden}x{inter}: usage counts"
        );
        eprintln!(
            "device-routed experts {hidden}x{inter}, batches 1-40: the host-routed bits, usage counted"
        );
    }
}

#[test]
fn top_k_of_nan_logits_stays_in_range() {
    // Broken activations must not send the experts' kernels out of bounds: a NaN logit takes no
    // probability, +inf the most, and a row with no finite logit still names k distinct experts.
    let dev = gpu();
    let (experts, k) = (37usize, 5usize);
    let mask = Tensor::zeros(experts, DType::U8, &dev).unwrap();
    let mut row: Vec<f32> = (0..experts).map(|e| (e as f32 * 0.37).sin()).collect();
    row[4] = f32::NAN;
    let all_nan = vec![f32::NAN; experts];
    let mut with_inf: Vec<f32> = (0..experts).map(|e| (e as f32 * 0.37).sin()).collect();
    with_inf[9] = f32::INFINITY;
    for (case, values) in [
        ("one NaN", &row),
        ("all NaN", &all_nan),
        ("+inf", &with_inf),
    ] {
        let logits = Tensor::new(values.as_slice(), &dev)
            .and_then(|t| t.to_dtype(DType::BF16))
            .and_then(|t| t.reshape((1, experts)))
            .unwrap();
        let (ids, _) = cuda::router_topk(&logits, &mask, k, true)
            .unwrap()
            .expect("bf16 logits on the GPU");
        let mut seen = ids.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen.len(),
            k,
            "{case}: {ids:?} are not {k} distinct experts"
        );
        assert!(
            ids.iter().all(|&e| (e as usize) < experts),
            "{case}: {ids:?}"
        );
        if case == "one NaN" {
            assert!(
                !ids.contains(&4),
                "{case}: the NaN logit was chosen: {ids:?}"
            );
        }
        if case == "+inf" {
            assert_eq!(ids[0], 9, "{case}: the +inf logit comes first: {ids:?}");
        }
    }
}
