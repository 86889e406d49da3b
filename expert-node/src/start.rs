//! Starting a node: loading its partition of the experts and serving them with gRPC health.
//! One implementation for the binary, the benchmarks and the tests.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use omnishard_model::{Checkpoint, CheckpointError, LocalExperts};
use omnishard_proto::v1::expert_service_server::ExpertServiceServer;
use omnishard_proto::{ModelConfig, defaults};

use crate::server::{ExpertNodeService, NodeState, incoming};

/// How a node serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// TLS (and client-certificate checking), if the node serves TLS; it then refuses plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// On shutdown, how long calls in flight may take to finish before the node exits anyway.
    pub shutdown_grace: Duration,
    /// A connection from which nothing has been read for this long is closed (live clients are
    /// pinged more often than that, and answer).
    pub idle_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_message_bytes: omnishard_proto::defaults::MAX_MESSAGE_MIB << 20,
            tls: None,
            shutdown_grace: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Serves `state` on `listener` until `shutdown` resolves. gRPC health reports NOT_SERVING until
/// the experts are installed ([`NodeState::install`]) and SERVING after, so a coordinator can wait
/// for a node that is still loading. On `shutdown` health turns NOT_SERVING again, new calls are
/// refused with UNAVAILABLE (the coordinator re-sends them to a replica), and the server stops
/// once the calls in flight are answered (or after the grace).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<NodeState>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<ExpertServiceServer<ExpertNodeService>>()
        .await;
    let mut loaded = state.loaded();
    let serving = health.clone();
    let serving = tokio::spawn(async move {
        if loaded.wait_for(|done| *done).await.is_ok() {
            serving
                .set_serving::<ExpertServiceServer<ExpertNodeService>>()
                .await;
        }
    });
    let drained = {
        let state = state.clone();
        async move {
            shutdown.await;
            serving.abort();
            health
                .set_not_serving::<ExpertServiceServer<ExpertNodeService>>()
                .await;
            tracing::info!(
                grace_s = opts.shutdown_grace.as_secs_f64(),
                "shutting down: NOT_SERVING, new calls refused, finishing the calls in flight"
            );
            if state.drain(opts.shutdown_grace).await {
                tracing::info!("calls in flight finished");
            } else {
                tracing::warn!("shutdown grace over with calls still in flight; exiting anyway");
            }
        }
    };
    let service = ExpertNodeService::new(state).into_server(opts.max_message_bytes);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = opts.tls {
        builder = builder.tls_config(tls)?;
    }
    // Bounds on what one client can hold: calls in flight per connection (the coordinator keeps
    // at most two per layer in flight), HTTP/2 pings so a vanished peer's connection is closed
    // instead of kept forever, and the idle timeout for peers that never speak HTTP/2 at all.
    let ping = crate::idle::ping_interval(opts.idle_timeout);
    builder
        .concurrency_limit_per_connection(64)
        .initial_stream_window_size(defaults::HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(defaults::HTTP2_CONNECTION_WINDOW)
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .http2_keepalive_interval(Some(ping))
        .http2_keepalive_timeout(Some(ping.min(Duration::from_secs(20))))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming(listener, opts.idle_timeout), drained)
        .await
}

/// Loads the given (layer, expert) pairs in the compute dtype, logging progress every 5%.
/// Blocking: call it off the async runtime. The checkpoint's memory maps are dropped with `ckpt`
/// afterwards, so what stays resident is the partition's own copy.
pub fn load_experts(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    pairs: &[(usize, usize)],
    dtype: DType,
    device: &Device,
) -> Result<LocalExperts, CheckpointError> {
    let started = Instant::now();
    let step = (pairs.len() / 20).max(1);
    let experts = LocalExperts::load(ckpt, cfg, pairs, dtype, device, |done, total| {
        if done % step == 0 || done == total {
            tracing::info!(done, total, "experts loaded");
        }
    })?;
    tracing::info!(
        experts = pairs.len(),
        bytes = experts.size_in_bytes(),
        seconds = started.elapsed().as_secs_f64(),
        "experts in memory"
    );
    Ok(experts)
}
