//! A scripted expert node for this module's unit tests: a real tonic `ExpertService` with gRPC
//! health, served on a loopback port in the test's own tokio runtime, that answers, fails with a
//! given status, answers a malformed tensor, stays silent, or refuses or ends its stream — so the
//! client and the fan-out are tested over the same transport as in production, in milliseconds.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};
use futures::StreamExt;
use omnishard_model::wire;
use omnishard_proto::ModelConfig;
use omnishard_proto::v1::{
    self, ForwardRequest, ForwardResponse, InfoRequest, InfoResponse, LayerExperts,
    expert_service_server::{ExpertService, ExpertServiceServer},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// The fingerprint every fake node reports (and [`tiny_config`]'s clusters expect).
pub(super) const FINGERPRINT: &str = "fake-fingerprint";

/// How a fake node answers each `ForwardStream` request.
#[derive(Debug, Clone, Copy)]
pub(super) enum Script {
    /// Row `i` is `weight[i] * (expert[i] + 1) * hidden[token[i]]`, computed in f32.
    Answer,
    /// A request-level error with this code, the stream staying open.
    Fail(tonic::Code),
    /// A tensor with one row fewer than the request has assignments.
    Malformed,
    /// Nothing, ever (the stream stays open).
    Silent,
    /// Answers this many requests, then nothing (a node cut off by a partition).
    SilentAfter(usize),
    /// Ends the response stream at the first request, answering nothing.
    EndStream,
    /// Refuses to open the stream at all.
    NoStream,
}

/// A running fake node.
pub(super) struct FakeNode {
    pub(super) addr: SocketAddr,
    /// `ForwardStream` requests received.
    pub(super) calls: Arc<AtomicUsize>,
}

impl FakeNode {
    pub(super) fn address(&self) -> String {
        self.addr.to_string()
    }

    pub(super) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Fake {
    name: String,
    script: Script,
    layers: Vec<LayerExperts>,
    calls: Arc<AtomicUsize>,
}

/// Starts a fake node named `name` holding `experts` of every layer in `layers`, on the current
/// tokio runtime.
pub(super) async fn spawn(name: &str, script: Script, layers: &[u32], experts: &[u32]) -> FakeNode {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("a bound address");
    let calls = Arc::new(AtomicUsize::new(0));
    let fake = Fake {
        name: name.to_string(),
        script,
        layers: layers
            .iter()
            .map(|&layer| LayerExperts {
                layer,
                experts: experts.to_vec(),
            })
            .collect(),
        calls: calls.clone(),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ExpertServiceServer<Fake>>().await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(ExpertServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    FakeNode { addr, calls }
}

/// A 2-layer, 4-expert, hidden-4 Qwen3-MoE config, every layer MoE.
pub(super) fn tiny_config() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "qwen3_moe", "vocab_size": 16, "hidden_size": 4, "num_hidden_layers": 2,
        "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 4, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 4
    });
    ModelConfig::from_json(&json.to_string(), Path::new("config.json")).expect("a valid config")
}

/// What a node following [`Script::Answer`] computes; `None` if the request is malformed.
fn answer(req: &ForwardRequest, drop_last_row: bool) -> Option<v1::Tensor> {
    let xs = wire::decode(req.hidden.as_ref(), "hidden", &Device::Cpu).ok()?;
    let rows: Vec<Vec<f32>> = xs.to_vec2().ok()?;
    let assignments = wire::assignments_from_wire(req)?;
    let mut out = Vec::new();
    for a in &assignments {
        let scale = a.weight * (a.expert + 1) as f32;
        out.extend(rows.get(a.token as usize)?.iter().map(|x| x * scale));
    }
    let hidden = xs.dims2().ok()?.1;
    let mut n = assignments.len();
    if drop_last_row && n > 0 {
        n -= 1;
        out.truncate(n * hidden);
    }
    wire::encode(&Tensor::from_vec(out, (n, hidden), &Device::Cpu).ok()?).ok()
}

#[tonic::async_trait]
impl ExpertService for Fake {
    async fn info(&self, _req: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            fingerprint: FINGERPRINT.into(),
            layers: self.layers.clone(),
            dtype: v1::Dtype::F32 as i32,
            memory_bytes: 0,
            node_name: self.name.clone(),
            version: String::new(),
            instance_id: "fake".into(),
            // Nowhere a lane could reach: calls go over the stream.
            host_id: String::new(),
            gpu_uuid: Vec::new(),
        }))
    }

    async fn forward(
        &self,
        _req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        Err(Status::unimplemented("the coordinator uses ForwardStream"))
    }

    type ForwardStreamStream = ReceiverStream<Result<ForwardResponse, Status>>;

    async fn forward_stream(
        &self,
        req: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        if let Script::NoStream = self.script {
            return Err(Status::unavailable("scripted: no stream"));
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let fake = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(req)) = inbound.next().await {
                let seen = fake.calls.fetch_add(1, Ordering::SeqCst);
                let error = |code: tonic::Code, message: &str| ForwardResponse {
                    request_id: req.request_id,
                    output: None,
                    error: Some(v1::Error {
                        code: code as i32,
                        message: message.into(),
                    }),
                    timing: None,
                    device_output: None,
                    done_event: Vec::new(),
                };
                let resp = match fake.script {
                    Script::SilentAfter(n) if seen >= n => continue,
                    Script::Answer | Script::Malformed | Script::SilentAfter(_) => {
                        match answer(&req, matches!(fake.script, Script::Malformed)) {
                            Some(output) => ForwardResponse {
                                request_id: req.request_id,
                                output: Some(output),
                                error: None,
                                timing: None,
                                device_output: None,
                                done_event: Vec::new(),
                            },
                            None => error(tonic::Code::InvalidArgument, "malformed request"),
                        }
                    }
                    Script::Fail(code) => error(code, "scripted failure"),
                    Script::Silent => continue,
                    Script::EndStream | Script::NoStream => break,
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type OpenLaneStream = ReceiverStream<Result<v1::LaneEvent, Status>>;

    async fn open_lane(
        &self,
        _req: Request<v1::OpenLaneRequest>,
    ) -> Result<Response<Self::OpenLaneStream>, Status> {
        Err(Status::unimplemented(
            "the fake node answers on its stream only",
        ))
    }
}
