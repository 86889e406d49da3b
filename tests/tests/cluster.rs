//! The model distributed over real `expert-node` processes, over real gRPC: output identical to
//! the in-process run, missing experts refused or masked, failures named and ended by the
//! deadline.

use candle_core::Device;
use std::path::Path;
use std::time::{Duration, Instant};

use omnishard_coordinator::remote::RemoteOptions;
use omnishard_coordinator::{ComputeDtype, Engine, Sampler, SamplingParams};
use omnishard_tests::{
    ExpertNode, Golden, addresses, assert_bits_equal, assert_lanes, compare, model_dir,
};

fn remote(
    model: &Path,
    dtype: ComputeDtype,
    addrs: &[String],
    allow_missing: bool,
) -> Result<Engine, String> {
    remote_with(model, dtype, addrs, allow_missing, true)
}

fn remote_with(
    model: &Path,
    dtype: ComputeDtype,
    addrs: &[String],
    allow_missing: bool,
    shm_lane: bool,
) -> Result<Engine, String> {
    let opts = RemoteOptions {
        rpc_timeout: Duration::from_secs(5),
        startup_timeout: Duration::from_secs(60),
        shm_lane,
        ..RemoteOptions::default()
    };
    Engine::load_remote(model, dtype, &Device::Cpu, addrs, opts, allow_missing)
        .map_err(|e| e.to_string())
}

fn greedy(engine: &Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(SamplingParams::default());
    engine
        .generate(prompt, n, &mut sampler, &[], |_| true)
        .unwrap()
}

#[test]
fn sharded_clusters_match_in_process_bit_for_bit() {
    for (name, dtype, dtype_flag, shard_counts) in [
        (
            "omni-gqa-top4",
            ComputeDtype::F32,
            "f32",
            &[2usize, 3, 4][..],
        ),
        ("omni-mqa-step2", ComputeDtype::F32, "f32", &[3][..]),
        ("omni-tied-dense-top1", ComputeDtype::Bf16, "bf16", &[2][..]),
    ] {
        let dir = model_dir(name);
        let golden = Golden::load(name);
        let local = Engine::load_local(&dir, dtype, &Device::Cpu).unwrap();
        let want_logits = local.score(&golden.token_ids, golden.positions()).unwrap();
        let want_tokens = greedy(&local, &golden.token_ids, 20);
        for &n in shard_counts {
            let nodes = ExpertNode::shards(&dir, n, dtype_flag);
            // Shared-memory lanes (the default for nodes on this host) and gRPC alone.
            for shm_lane in [true, false] {
                let how = format!("{name} on {n} nodes, lanes {shm_lane}");
                let engine = remote_with(&dir, dtype, &addresses(&nodes), false, shm_lane).unwrap();
                let logits = engine.score(&golden.token_ids, golden.positions()).unwrap();
                assert_bits_equal(&logits, &want_logits, &how);
                assert_eq!(greedy(&engine, &golden.token_ids, 20), want_tokens, "{how}");
                assert_lanes(
                    &engine.remote().expect("a cluster").status(),
                    shm_lane,
                    &how,
                );
            }
            eprintln!(
                "{name} ({dtype_flag}) on {n} nodes, through lanes and over gRPC: logits and greedy tokens bit-identical to in-process"
            );
        }
    }
}

/// A placement file whose nodes hold every MoE layer's experts except `missing`, split
/// between overlapping nodes so that most experts have replicas.
fn placement(
    path: &Path,
    name: &str,
    nodes: &[(&str, &str, std::ops::Range<usize>)],
    missing: &[(usize, usize)],
) {
    let cfg = omnishard_proto::ModelConfig::from_model_dir(&model_dir(name)).unwrap();
    let mut toml = String::new();
    for (node, address, experts) in nodes {
        let mut specs = Vec::new();
        for layer in cfg.moe_layers() {
            for e in experts.clone() {
                if !missing.contains(&(layer, e)) {
                    specs.push(format!("\"{layer}:{e}\""));
                }
            }
        }
        toml.push_str(&format!(
            "[[node]]\nname = \"{node}\"\naddress = \"{address}\"\nexperts = [{}]\n\n",
            specs.join(", ")
        ));
    }
    std::fs::write(path, toml).unwrap();
}

fn start_placed(name: &str, file: &Path, nodes: &[&str]) -> Vec<ExpertNode> {
    nodes
        .iter()
        .map(|n| {
            ExpertNode::start(
                &model_dir(name),
                &["--placement", file.to_str().unwrap(), "--node", n],
            )
        })
        .collect()
}

#[test]
fn placement_file_with_replicas_matches_in_process() {
    let name = "omni-gqa-top4";
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("placement.toml");
    // a: 0-4, b: 3-7, c: 0-7; the addresses are filled in once the nodes listen.
    let layout = [
        ("a", "127.0.0.1:1", 0..5),
        ("b", "127.0.0.1:1", 3..8),
        ("c", "127.0.0.1:1", 0..8),
    ];
    placement(&file, name, &layout, &[]);
    let nodes = start_placed(name, &file, &["a", "b", "c"]);
    let live = tmp.path().join("live.toml");
    let with_addresses: Vec<_> = layout
        .iter()
        .zip(&nodes)
        .map(|((n, _, r), node)| (*n, node.address.as_str(), r.clone()))
        .collect();
    placement(&live, name, &with_addresses, &[]);

    let model = model_dir(name);
    let stdout = omnishard_tests::coordinator_score(&[
        "--token-ids".as_ref(),
        "5,17,42,99,3".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--placement".as_ref(),
        live.as_os_str(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let logits: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let local = Engine::load_local(&model_dir(name), ComputeDtype::F32, &Device::Cpu).unwrap();
    assert_bits_equal(
        &logits,
        &local.score(&[5, 17, 42, 99, 3], None).unwrap(),
        "replicated placement",
    );
}

#[test]
fn missing_experts_are_refused_or_masked_like_the_reference() {
    let name = "omni-gqa-top4";
    let golden = Golden::load(name);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("placement.toml");
    placement(
        &file,
        name,
        &[("a", "127.0.0.1:1", 0..4), ("b", "127.0.0.1:1", 4..8)],
        &golden.missing_experts,
    );
    let nodes = start_placed(name, &file, &["a", "b"]);
    let dir = model_dir(name);

    let err = remote(&dir, ComputeDtype::F32, &addresses(&nodes), false)
        .err()
        .unwrap();
    assert!(
        err.contains("3 of 24 (layer, expert) pairs are served by no node"),
        "{err}"
    );
    assert!(
        err.contains("layer 0: experts 0, 5; layer 2: expert 3"),
        "{err}"
    );
    assert!(err.contains("--allow-missing-experts"), "{err}");

    let engine = remote(&dir, ComputeDtype::F32, &addresses(&nodes), true).unwrap();
    let logits = engine.score(&golden.token_ids, None).unwrap();
    let diff = compare(&logits, &golden.logits_masked_f32);
    eprintln!(
        "masked experts vs reference with -inf router logits: max |diff| {:.3e}, relative {:.3e}",
        diff.max_abs,
        diff.relative()
    );
    assert!(diff.relative() <= 1e-4, "{diff:?}");
    // Masking must matter for this prompt, or the comparison proves nothing.
    assert!(compare(&logits, &golden.logits_f32).max_abs > 1e-2);
}

#[test]
fn a_node_that_dies_or_hangs_mid_generation_fails_within_the_deadline() {
    let name = "omni-gqa-top4";
    let dir = model_dir(name);
    let golden = Golden::load(name);
    for signal in ["KILL", "STOP"] {
        let nodes = ExpertNode::shards(&dir, 2, "f32");
        let opts = RemoteOptions {
            rpc_timeout: Duration::from_millis(1500),
            startup_timeout: Duration::from_secs(60),
            ..RemoteOptions::default()
        };
        let engine = Engine::load_remote(
            &dir,
            ComputeDtype::F32,
            &Device::Cpu,
            &addresses(&nodes),
            opts,
            false,
        )
        .unwrap();
        let mut sampler = Sampler::new(SamplingParams::default());
        let mut killed_at = None;
        let mut produced = 0;
        let result = engine.generate(&golden.token_ids, 200, &mut sampler, &[], |_| {
            produced += 1;
            if produced == 5 {
                nodes[1].signal(signal);
                killed_at = Some(Instant::now());
            }
            true
        });
        let elapsed = killed_at.expect("signal sent").elapsed();
        let err = match result {
            Ok(tokens) => panic!("{signal}: generation of {} tokens succeeded", tokens.len()),
            Err(e) => e.to_string(),
        };
        eprintln!("SIG{signal}: failed after {elapsed:?}: {err}");
        // What bounds the wait is the deadline, and the error says which one fired; how long
        // it took on this (possibly loaded) machine is only reported.
        assert!(err.contains(&nodes[1].address), "{err}");
        assert!(err.contains("layer"), "{err}");
        assert!(
            (5..200).contains(&produced),
            "{signal}: {produced} tokens before the error"
        );
        if signal == "STOP" {
            assert!(err.contains("deadline"), "{err}");
            nodes[1].signal("CONT");
        }
    }
}

#[test]
fn unreachable_node_at_start_is_named() {
    let dir = model_dir("omni-gqa-top4");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    let opts = RemoteOptions {
        startup_timeout: Duration::from_secs(1),
        ..RemoteOptions::default()
    };
    let err = Engine::load_remote(
        &dir,
        ComputeDtype::F32,
        &Device::Cpu,
        std::slice::from_ref(&address),
        opts,
        false,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains(&address) && err.contains("cannot connect"),
        "{err}"
    );
}

#[test]
fn mismatched_dtype_or_model_is_refused() {
    let nodes = ExpertNode::shards(&model_dir("omni-gqa-top4"), 1, "bf16");
    let err = remote(
        &model_dir("omni-gqa-top4"),
        ComputeDtype::F32,
        &addresses(&nodes),
        false,
    )
    .err()
    .unwrap();
    assert!(
        err.contains("computes in bf16") && err.contains("--dtype"),
        "{err}"
    );
    let err = remote(
        &model_dir("omni-mqa-step2"),
        ComputeDtype::Bf16,
        &addresses(&nodes),
        false,
    )
    .err()
    .unwrap();
    assert!(err.contains("serves another model"), "{err}");
}
