//! An expert node faced with malformed `Forward` requests, unary and on the stream: each is
//! rejected with INVALID_ARGUMENT / FAILED_PRECONDITION and a message, and the node keeps
//! serving valid requests.

use std::time::Duration;

use bytes::Bytes;
use omnishard_proto::v1::{
    self, ForwardRequest, InfoRequest, expert_service_client::ExpertServiceClient,
};
use omnishard_tests::{ExpertNode, model_dir};
use tonic::Code;
use tonic::transport::Channel;

const HIDDEN: usize = 64;

fn f32_tensor(rows: usize, cols: usize, value: f32) -> v1::Tensor {
    v1::Tensor {
        dtype: v1::Dtype::F32 as i32,
        shape: vec![rows as u64, cols as u64],
        data: Bytes::from(value.to_le_bytes().repeat(rows * cols)),
    }
}

async fn client(address: &str) -> (ExpertServiceClient<Channel>, v1::InfoResponse) {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ExpertServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    for _ in 0..300 {
        match client.info(InfoRequest {}).await {
            Ok(info) => return (client, info.into_inner()),
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(s) => panic!("info: {s:?}"),
        }
    }
    panic!("node never finished loading");
}

#[tokio::test]
async fn malformed_requests_are_rejected_and_the_node_keeps_serving() {
    let node = ExpertNode::start(
        &model_dir("omni-gqa-top4"),
        &["--shard", "0/2", "--max-message-mib", "1"],
    );
    let (mut client, info) = client(&node.address).await;
    let held = &info.layers[0];
    let (layer, expert) = (held.layer, held.experts[0]);
    let not_held = (0..8).find(|e| !held.experts.contains(e)).unwrap();
    let good = ForwardRequest {
        request_id: 7,
        layer,
        hidden: Some(f32_tensor(2, HIDDEN, 0.5)),
        token_index: vec![0, 1],
        expert_id: vec![expert, expert],
        weight: vec![0.25, 0.75],
        fingerprint: info.fingerprint.clone(),
        trace_ids: vec!["req-protocol".into()],
        ..Default::default()
    };
    let resp = client.forward(good.clone()).await.unwrap().into_inner();
    let out = resp.output.unwrap();
    assert_eq!(
        (out.shape.clone(), resp.request_id),
        (vec![2, HIDDEN as u64], 7)
    );

    // Hidden states said to be in a coordinator's GPU memory (CUDA IPC).
    let in_gpu_memory = v1::DeviceTensor {
        ipc_handle: vec![0; 64],
        dtype: v1::Dtype::F32 as i32,
        shape: vec![2, HIDDEN as u64],
        ..Default::default()
    };
    // A layer's routing said to be left in a coordinator's GPU memory (`--gpu-routing`).
    let routed = v1::DeviceRouted {
        hidden: Some(v1::DeviceTensor {
            dtype: v1::Dtype::Bf16 as i32,
            ..in_gpu_memory.clone()
        }),
        routing_offset: 0,
        output_offset: 4096,
        top_k: 2,
        ready_event: vec![0; 64],
        experts: vec![expert],
    };
    let routed_call = ForwardRequest {
        hidden: None,
        token_index: vec![],
        expert_id: vec![],
        weight: vec![],
        device_routed: Some(routed),
        ipc_client: 5,
        ipc_host: omnishard_model::lending::host_id().to_string(),
        ..good.clone()
    };
    // A batch-1 step's routed layers ordered at once (`pass.rs`).
    let pass_call = ForwardRequest {
        device_routed: None,
        device_pass: Some(v1::DevicePass {
            buffer: Some(in_gpu_memory.clone()),
            tokens: 1,
            top_k: 2,
            routing_offset: 0,
            hidden_offset: 256,
            output_offset: 4096,
            ready_offset: 1 << 20,
            done_offset: 1 << 21,
            layers: vec![v1::LayerExperts {
                layer: 0,
                experts: vec![expert],
            }],
            deadline_ms: 1000,
        }),
        ..routed_call.clone()
    };
    let with_pass = |f: &dyn Fn(&mut v1::DevicePass)| {
        let mut call = pass_call.clone();
        if let Some(p) = call.device_pass.as_mut() {
            f(p);
        }
        call
    };
    let bad_cases: Vec<(&str, ForwardRequest, Code, &str)> = vec![
        (
            "a routed pass that carries hidden states as bytes too",
            ForwardRequest {
                hidden: good.hidden.clone(),
                ..pass_call.clone()
            },
            Code::InvalidArgument,
            "GPU memory only",
        ),
        (
            "a routed pass without a deadline",
            with_pass(&|p| p.deadline_ms = 0),
            Code::InvalidArgument,
            "deadline_ms",
        ),
        (
            "a routed pass that lists no layers",
            with_pass(&|p| p.layers.clear()),
            Code::InvalidArgument,
            "lists no layers",
        ),
        (
            "a routed pass with a layer and no experts to compute",
            with_pass(&|p| p.layers[0].experts.clear()),
            Code::InvalidArgument,
            "no experts to compute",
        ),
        (
            "a routed pass counting on an expert not held",
            with_pass(&|p| p.layers[0].experts.push(not_held)),
            Code::FailedPrecondition,
            "not held here",
        ),
        (
            "a routed pass from another host",
            ForwardRequest {
                ipc_host: "another-host".into(),
                ..pass_call.clone()
            },
            Code::FailedPrecondition,
            "on this host",
        ),
        (
            "a routed pass to a node on the CPU",
            pass_call.clone(),
            Code::FailedPrecondition,
            "routed passes are for nodes on a GPU",
        ),
        (
            "a routed call that carries assignments too",
            ForwardRequest {
                token_index: vec![0],
                expert_id: vec![expert],
                weight: vec![1.0],
                ..routed_call.clone()
            },
            Code::InvalidArgument,
            "GPU memory only",
        ),
        (
            // A new process at the address, holding another shard: refused before anything is
            // computed, rather than leaving that expert's rows unwritten.
            "a routed call counting on an expert not held",
            ForwardRequest {
                device_routed: routed_call.device_routed.clone().map(|r| v1::DeviceRouted {
                    experts: vec![expert, not_held],
                    ..r
                }),
                ..routed_call.clone()
            },
            Code::FailedPrecondition,
            "not held here",
        ),
        (
            // About the node: the coordinator sends such calls only to nodes that answered in
            // their own GPU memory, and takes the layer the host way after this answer.
            "a routed call to a node on the CPU",
            routed_call,
            Code::FailedPrecondition,
            "routed calls are for nodes on a GPU",
        ),
        (
            "hidden states both as bytes and in GPU memory",
            ForwardRequest {
                device_hidden: Some(in_gpu_memory.clone()),
                ..good.clone()
            },
            Code::InvalidArgument,
            "not both",
        ),
        (
            // A node on the CPU maps no GPU memory: about the node, and the coordinator sends
            // it the bytes instead (it never sends these to a node that has not answered in
            // its own GPU memory).
            "hidden states in GPU memory, to a node on the CPU",
            ForwardRequest {
                hidden: None,
                device_hidden: Some(in_gpu_memory),
                ipc_client: 5,
                ipc_host: omnishard_model::lending::host_id().to_string(),
                ..good.clone()
            },
            Code::FailedPrecondition,
            omnishard_proto::wire::IPC_READ_FAILED,
        ),
        (
            "wrong hidden size",
            ForwardRequest {
                hidden: Some(f32_tensor(2, HIDDEN - 1, 0.5)),
                ..good.clone()
            },
            Code::InvalidArgument,
            "hidden size 63",
        ),
        (
            "unknown layer",
            ForwardRequest {
                layer: 99,
                ..good.clone()
            },
            Code::InvalidArgument,
            "layer 99 is not an MoE layer",
        ),
        (
            "expert not held",
            ForwardRequest {
                expert_id: vec![expert, not_held],
                ..good.clone()
            },
            Code::FailedPrecondition,
            "not held here",
        ),
        (
            "token out of range",
            ForwardRequest {
                token_index: vec![0, 2],
                ..good.clone()
            },
            Code::InvalidArgument,
            "out of range",
        ),
        (
            "non-finite weight",
            ForwardRequest {
                weight: vec![0.25, f32::NAN],
                ..good.clone()
            },
            Code::InvalidArgument,
            "non-finite",
        ),
        (
            "ragged lists",
            ForwardRequest {
                weight: vec![0.25],
                ..good.clone()
            },
            Code::InvalidArgument,
            "equal lengths",
        ),
        (
            "duplicate assignment",
            ForwardRequest {
                token_index: vec![1, 1],
                ..good.clone()
            },
            Code::InvalidArgument,
            "routed twice",
        ),
        (
            "short payload",
            ForwardRequest {
                hidden: Some(v1::Tensor {
                    data: Bytes::from(vec![0u8; 7]),
                    ..f32_tensor(2, HIDDEN, 0.5)
                }),
                ..good.clone()
            },
            Code::InvalidArgument,
            "bytes of data",
        ),
        (
            "unknown dtype",
            ForwardRequest {
                hidden: Some(v1::Tensor {
                    dtype: 42,
                    ..f32_tensor(2, HIDDEN, 0.5)
                }),
                ..good.clone()
            },
            Code::InvalidArgument,
            "unsupported dtype",
        ),
        (
            "wrong dtype",
            ForwardRequest {
                hidden: Some(v1::Tensor {
                    dtype: v1::Dtype::Bf16 as i32,
                    shape: vec![2, HIDDEN as u64],
                    data: Bytes::from(vec![0u8; 2 * HIDDEN * 2]),
                }),
                ..good.clone()
            },
            // Not the request's fault: a node started with another --dtype than its cluster,
            // which a replica started right would serve.
            Code::FailedPrecondition,
            "compute in",
        ),
        (
            "missing hidden",
            ForwardRequest {
                hidden: None,
                ..good.clone()
            },
            Code::InvalidArgument,
            "missing",
        ),
        (
            "fingerprint mismatch",
            ForwardRequest {
                fingerprint: "other-model".into(),
                ..good.clone()
            },
            Code::FailedPrecondition,
            "fingerprint mismatch",
        ),
    ];
    for (what, req, code, needle) in bad_cases {
        let status = client.forward(req).await.unwrap_err();
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{what}: {}",
            status.message()
        );
    }
    // Over the 1 MiB limit the node was started with.
    let huge = ForwardRequest {
        hidden: Some(f32_tensor(5000, HIDDEN, 0.5)),
        token_index: vec![0],
        expert_id: vec![expert],
        weight: vec![1.0],
        ..good.clone()
    };
    let status = client.forward(huge).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(
        status.message().contains("too large") || status.message().contains("length"),
        "{status:?}"
    );

    // Still serving, unary and on the stream, where a bad request answers an error and the same
    // stream then serves the next one.
    let again = client.forward(good.clone()).await.unwrap().into_inner();
    assert_eq!(again.output.unwrap().data, out.data);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut inbound = client
        .forward_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(ForwardRequest {
        request_id: 1,
        layer: 99,
        ..good.clone()
    })
    .await
    .unwrap();
    let first = inbound.message().await.unwrap().unwrap();
    assert_eq!(first.request_id, 1);
    assert_eq!(first.error.unwrap().code, Code::InvalidArgument as i32);
    // Asked for its answer in GPU memory (as a coordinator on a GPU of this host asks), a node
    // on the CPU has none to lend: the bytes come, the same as unasked.
    tx.send(ForwardRequest {
        request_id: 2,
        ipc_client: 5,
        ipc_host: omnishard_model::lending::host_id().to_string(),
        ..good.clone()
    })
    .await
    .unwrap();
    let second = inbound.message().await.unwrap().unwrap();
    assert_eq!(second.request_id, 2);
    assert!(second.device_output.is_none());
    assert_eq!(second.output.unwrap().data, out.data);
}

#[tokio::test]
async fn info_and_health_report_the_partition() {
    let node = ExpertNode::start(
        &model_dir("omni-gqa-top4"),
        &["--shard", "1/3", "--dtype", "bf16"],
    );
    let (_, info) = client(&node.address).await;
    let held: usize = info.layers.iter().map(|l| l.experts.len()).sum();
    assert_eq!(held, 8, "24 pairs over 3 shards");
    assert_eq!(info.dtype, v1::Dtype::Bf16 as i32);
    assert_eq!(info.node_name, "1/3");
    assert_eq!(info.memory_bytes, 8 * 3 * 64 * 32 * 2);
    assert_eq!(info.fingerprint.len(), 64);
}

#[tokio::test]
async fn a_token_routed_to_more_than_top_k_experts_is_refused() {
    // 8 experts, top-4: one token sent to 5 held experts would be 5 outputs for one input row.
    let node = ExpertNode::start(&model_dir("omni-gqa-top4"), &["--shard", "0/1"]);
    let (mut client, info) = client(&node.address).await;
    let held = &info.layers[0];
    assert!(held.experts.len() >= 5, "{:?}", held.experts);
    let request = ForwardRequest {
        request_id: 1,
        layer: held.layer,
        hidden: Some(f32_tensor(1, HIDDEN, 0.5)),
        token_index: vec![0; 5],
        expert_id: held.experts[..5].to_vec(),
        weight: vec![0.2; 5],
        fingerprint: info.fingerprint.clone(),
        trace_ids: Vec::new(),
        ..Default::default()
    };
    let err = client.forward(request.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("top-k = 4"), "{err:?}");
    // Four is the model's own top-k: served.
    let four = ForwardRequest {
        token_index: vec![0; 4],
        expert_id: held.experts[..4].to_vec(),
        weight: vec![0.25; 4],
        ..request
    };
    client.forward(four).await.unwrap();
}

/// Waits for a lane answer, at most a few seconds.
fn lane_answer(posted: &mut omnishard_proto::lane::Posted) -> v1::ForwardResponse {
    use prost::Message;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(answer) = posted.try_take() {
            let bytes = answer.expect("answered, not closed");
            return v1::ForwardResponse::decode(bytes.as_slice()).expect("a response");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer on the lane"
        );
        posted.sleep(Duration::from_millis(1));
    }
}

#[tokio::test]
async fn a_lane_opens_only_for_this_host_and_answers_like_the_stream() {
    use omnishard_proto::lane::LaneClient;
    use prost::Message;
    use std::sync::Arc;

    let node = ExpertNode::start(&model_dir("omni-gqa-top4"), &["--shard", "0/2"]);
    let (mut client, info) = client(&node.address).await;
    let host = omnishard_model::lending::host_id().to_string();
    let lane = Arc::new(LaneClient::create().expect("a lane file"));
    let path = lane.path().to_string_lossy().into_owned();
    for (what, req, expect) in [
        (
            "a coordinator on another host",
            v1::OpenLaneRequest {
                path: path.clone(),
                host: "another-boot-id".into(),
            },
            "another host",
        ),
        (
            "a file that is not a lane",
            v1::OpenLaneRequest {
                path: "/etc/passwd".into(),
                host: host.clone(),
            },
            "not a lane",
        ),
    ] {
        let Err(status) = client.open_lane(req).await else {
            panic!("{what}: the lane was opened")
        };
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains(expect),
            "{what}: {}",
            status.message()
        );
    }

    let mut events = client
        .open_lane(v1::OpenLaneRequest { path, host })
        .await
        .expect("opened")
        .into_inner();
    assert!(
        events
            .message()
            .await
            .expect("an event")
            .expect("one")
            .opened
    );
    lane.unlink();

    let held = &info.layers[0];
    let good = ForwardRequest {
        request_id: 11,
        layer: held.layer,
        hidden: Some(f32_tensor(2, HIDDEN, 0.5)),
        token_index: vec![0, 1],
        expert_id: vec![held.experts[0], held.experts[1]],
        weight: vec![0.25, 0.75],
        fingerprint: info.fingerprint.clone(),
        ..Default::default()
    };
    let over_grpc = client.forward(good.clone()).await.unwrap().into_inner();
    let mut posted = lane.post(&good.encode_to_vec()).expect("a slot");
    let on_lane = lane_answer(&mut posted);
    assert_eq!(on_lane.request_id, 11);
    assert_eq!(on_lane.error, None);
    assert_eq!(
        on_lane.output, over_grpc.output,
        "the same bytes either way"
    );

    // A bad request on the lane is refused like on the stream, and the lane goes on.
    let bad = ForwardRequest {
        weight: vec![0.25],
        ..good.clone()
    };
    let mut posted = lane.post(&bad.encode_to_vec()).expect("a slot");
    let refused = lane_answer(&mut posted).error.expect("an error");
    assert_eq!(refused.code, Code::InvalidArgument as i32, "{refused:?}");
    let mut posted = lane.post(&b"not a request"[..]).expect("a slot");
    let refused = lane_answer(&mut posted).error.expect("an error");
    assert!(refused.message.contains("cannot decode"), "{refused:?}");
    let mut posted = lane.post(&good.encode_to_vec()).expect("a slot");
    assert_eq!(lane_answer(&mut posted).output, over_grpc.output);

    // Ending the call closes the lane on the node's side too.
    drop(events);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !lane.is_closed() {
        assert!(
            std::time::Instant::now() < deadline,
            "the node kept the lane open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
