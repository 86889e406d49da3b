//! Tests of the whole module over the network: fake nodes on loopback ports (`fake.rs`), the real
//! client, membership and fan-out. A node that fails in any way has its share answered by a
//! replica, with the same bits as asking the replica alone; a refused request fails the call.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use omnishard_model::{CallContext, ExpertError, Experts, Routing};
use tonic::Code;

use super::fake::{self, FINGERPRINT, Script};
use super::{RemoteExperts, RemoteOptions};

const LAYERS: [u32; 2] = [0, 1];
const ALL: [u32; 4] = [0, 1, 2, 3];

fn cluster(addresses: &[String]) -> RemoteExperts {
    cluster_with(
        addresses,
        RemoteOptions {
            rpc_timeout: Duration::from_millis(150),
            startup_timeout: Duration::from_secs(2),
            ..RemoteOptions::default()
        },
    )
}

fn cluster_with(addresses: &[String], opts: RemoteOptions) -> RemoteExperts {
    let cfg = fake::tiny_config();
    // No health loop: it would re-admit the faulty node between rounds, at random.
    let (experts, missing) =
        RemoteExperts::connect_unwatched(addresses, &cfg, FINGERPRINT, DType::F32, opts, false)
            .expect("the fake cluster connects");
    assert!(missing.is_empty());
    experts
}

fn fake_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Three tokens, top-2, over every expert.
fn layer_input() -> (Tensor, Routing) {
    let xs: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
    let xs = Tensor::from_vec(xs, (3, 4), &Device::Cpu).expect("a tensor");
    let routing = Routing {
        top_k: 2,
        ids: vec![3, 0, 1, 2, 0, 1],
        weights: vec![0.6, 0.4, 0.7, 0.3, 0.55, 0.45],
    };
    (xs, routing)
}

fn bits(t: &Tensor) -> Vec<u32> {
    let rows: Vec<Vec<f32>> = t.to_vec2().expect("f32 rows");
    rows.into_iter().flatten().map(f32::to_bits).collect()
}

#[test]
fn after_a_node_fault_its_share_is_answered_by_a_replica_with_the_same_bits() {
    let rt = fake_runtime();
    let (xs, routing) = layer_input();
    let ctx = CallContext::default();
    let replica = rt.block_on(fake::spawn("replica", Script::Answer, &LAYERS, &ALL));
    let direct = cluster(&[replica.address()])
        .forward(1, &xs, &routing, &ctx)
        .expect("the replica answers");
    for script in [
        Script::Fail(Code::Internal),
        Script::Fail(Code::Unavailable),
        Script::Malformed,
        Script::Silent,
        Script::EndStream,
        Script::NoStream,
    ] {
        let faulty = rt.block_on(fake::spawn("faulty", script, &LAYERS, &ALL));
        let before = replica.calls();
        // Both idle: experts 0 and 2 (3 assignments) go to the faulty node, 1 and 3 to the
        // replica; then the faulty node's share goes to the replica too.
        let experts = cluster(&[faulty.address(), replica.address()]);
        let ys = experts
            .forward(1, &xs, &routing, &ctx)
            .unwrap_or_else(|e| panic!("{script:?}: {e}"));
        assert_eq!(bits(&ys), bits(&direct), "{script:?}");
        let reached = usize::from(!matches!(script, Script::NoStream));
        assert_eq!(faulty.calls(), reached, "{script:?}");
        assert_eq!(replica.calls() - before, 2, "{script:?}");
        let status = experts.status();
        assert_eq!(status[0].errors, 1, "{script:?}");
        assert!(status[0].last_error.is_some(), "{script:?}");
        assert_eq!(status[1].errors, 0, "{script:?}");
        assert_eq!(status[1].assignments, 6, "{script:?}");
    }
    // And a sum over nodes each holding part of the experts is the same bits too.
    let low = rt.block_on(fake::spawn("low", Script::Answer, &LAYERS, &[0, 1]));
    let high = rt.block_on(fake::spawn("high", Script::Answer, &LAYERS, &[2, 3]));
    let split = cluster(&[low.address(), high.address()])
        .forward(1, &xs, &routing, &ctx)
        .expect("both answer");
    assert_eq!(bits(&split), bits(&direct));
    assert_eq!((low.calls(), high.calls()), (1, 1));
}

#[test]
fn a_refused_request_fails_the_call_without_failover() {
    let rt = fake_runtime();
    let (xs, routing) = layer_input();
    let refusing = rt.block_on(fake::spawn(
        "refusing",
        Script::Fail(Code::InvalidArgument),
        &LAYERS,
        &ALL,
    ));
    let replica = rt.block_on(fake::spawn("replica", Script::Answer, &LAYERS, &ALL));
    let experts = cluster(&[refusing.address(), replica.address()]);
    let err = experts
        .forward(1, &xs, &routing, &CallContext::default())
        .expect_err("refused");
    let ExpertError::Rejected {
        node,
        layer,
        reason,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(node, &format!("refusing ({})", refusing.address()));
    assert_eq!(*layer, 1);
    assert!(reason.starts_with("InvalidArgument"), "{reason}");
    // The replica answered its own share (experts 1 and 3) and was sent nothing more.
    assert_eq!(replica.calls(), 1);
    let status = experts.status();
    assert!(status[0].up);
    assert_eq!(status[0].errors, 0);
}

#[test]
fn when_every_replica_fails_the_error_names_them() {
    let rt = fake_runtime();
    let (xs, routing) = layer_input();
    let a = rt.block_on(fake::spawn(
        "a",
        Script::Fail(Code::Internal),
        &LAYERS,
        &ALL,
    ));
    let b = rt.block_on(fake::spawn("b", Script::Malformed, &LAYERS, &ALL));
    let experts = cluster(&[a.address(), b.address()]);
    let err = experts
        .forward(0, &xs, &routing, &CallContext::default())
        .expect_err("no replica left");
    let ExpertError::Node {
        node,
        layer: 0,
        reason,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(node, &format!("a ({}), b ({})", a.address(), b.address()));
    assert_eq!(
        reason,
        "Internal: scripted failure; answered a F32 [2, 4] tensor for 3 assignments; no live replica holds expert 0"
    );
    assert_eq!((a.calls(), b.calls()), (1, 1));
}

/// Collects what a test logs.
#[derive(Clone, Default)]
struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_node_marked_down_is_logged_with_the_layer_the_node_and_the_sizes() {
    let rt = fake_runtime();
    let (xs, routing) = layer_input();
    let faulty = rt.block_on(fake::spawn(
        "faulty",
        Script::Fail(Code::Internal),
        &LAYERS,
        &ALL,
    ));
    let replica = rt.block_on(fake::spawn("replica", Script::Answer, &LAYERS, &ALL));
    let experts = cluster(&[faulty.address(), replica.address()]);
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        experts
            .forward(1, &xs, &routing, &CallContext::default())
            .expect("failed over")
    });
    let text =
        String::from_utf8_lossy(&log.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("expert node marked down"))
        .unwrap_or_else(|| panic!("no warning in {text:?}"));
    // Experts 0 and 2 of three tokens went to the faulty node: tokens 0, 1 and 2, 3 assignments.
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("forward{layer=1 node=faulty n_tokens=3 n_assignments=3}"),
        "{line}"
    );
}

#[test]
fn a_node_gone_silent_is_hedged_to_a_replica_long_before_the_deadline() {
    let rt = fake_runtime();
    let (xs, routing) = layer_input();
    let ctx = CallContext::default();
    let replica = rt.block_on(fake::spawn("replica", Script::Answer, &LAYERS, &ALL));
    let direct = cluster(&[replica.address()])
        .forward(1, &xs, &routing, &ctx)
        .expect("the replica answers");
    // Answers a few calls (its latency is learnt), then falls silent as if cut off.
    let late = rt.block_on(fake::spawn("late", Script::SilentAfter(6), &LAYERS, &ALL));
    let deadline = Duration::from_secs(20);
    let experts = cluster_with(
        &[late.address(), replica.address()],
        RemoteOptions {
            rpc_timeout: deadline,
            startup_timeout: Duration::from_secs(2),
            hedge_floor: Some(Duration::from_millis(30)),
            ..RemoteOptions::default()
        },
    );
    for _ in 0..6 {
        let ys = experts.forward(1, &xs, &routing, &ctx).expect("answered");
        assert_eq!(bits(&ys), bits(&direct));
    }
    assert_eq!(late.calls(), 6);
    let started = std::time::Instant::now();
    let ys = experts
        .forward(1, &xs, &routing, &ctx)
        .expect("hedged to the replica");
    let took = started.elapsed();
    assert_eq!(bits(&ys), bits(&direct), "hedging changed the bits");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let status = experts.status();
    assert!(!status[0].up, "the late node stays routed to");
    let why = status[0].last_error.clone().unwrap_or_default();
    assert!(why.contains("replicas answered instead"), "{why}");
    // Later calls go straight to the replica.
    let started = std::time::Instant::now();
    experts.forward(0, &xs, &routing, &ctx).expect("answered");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(late.calls(), 7);
}
