//! Admitting one node: dialling it (TLS, keep-alive, window sizes), asking its `Info` until it
//! has loaded, checking fingerprint, dtype and expert set against this model, and probing its
//! experts when verification is on — at start-up, on a join and (the checks) at re-admission.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use candle_core::DType;
use omnishard_model::ops::cuda::IpcImporter;
use omnishard_model::wire;
use omnishard_proto::tls::error_chain;
use omnishard_proto::v1::{self, InfoRequest, expert_service_client::ExpertServiceClient};
use omnishard_proto::{ModelConfig, defaults};
use tonic::transport::{Channel, Endpoint};

use super::client::NodeClient;
use super::membership::Node;
use super::verify::VerifyError;
use super::{ClusterError, RemoteOptions};

/// How a node is dialled: TLS for `https://`, no Nagle delay, flow-control windows sized for
/// megabyte answers, and HTTP/2 pings even between
/// calls, so a connection a partition silently killed is found dead within seconds and redialled.
pub(super) fn node_endpoint(address: &str, opts: &RemoteOptions) -> Result<Endpoint, String> {
    Ok(omnishard_proto::tls::endpoint(address, opts.tls.as_ref())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(defaults::HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(defaults::HTTP2_CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true))
}

pub(super) fn node_client(channel: Channel, opts: &RemoteOptions) -> ExpertServiceClient<Channel> {
    ExpertServiceClient::new(channel)
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes)
}

/// A failed attempt to reach a node at start-up.
enum Attempt {
    /// It may be starting or loading: try again until the deadline.
    Retry(String),
    /// Misconfigured (TLS): waiting will not help.
    Fatal(String),
    /// Likely misconfigured (TLS): fatal if it keeps happening.
    Suspect(String),
}

pub(super) async fn connect_node(
    address: String,
    cfg: &ModelConfig,
    fingerprint: &str,
    dtype: DType,
    opts: &RemoteOptions,
) -> Result<Node, ClusterError> {
    let unreachable = |reason: String| ClusterError::Unreachable {
        address: address.clone(),
        reason,
    };
    let endpoint = node_endpoint(&address, opts).map_err(unreachable)?;
    let deadline = Instant::now() + opts.startup_timeout;
    // Retry while the node is starting (refused) or loading (UNAVAILABLE), up to the deadline;
    // a TLS failure is a configuration error, which waiting does not mend.
    let failed = |what: String, chain: &str| match omnishard_proto::tls::diagnose(
        &address,
        opts.tls.as_ref(),
        chain,
    ) {
        Some((why, true)) => Attempt::Fatal(format!("TLS failed: {why} ({chain})")),
        Some((why, false)) => Attempt::Suspect(format!("TLS failed: {why} ({chain})")),
        None => Attempt::Retry(what),
    };
    let mut suspicions = 0;
    let info = loop {
        let attempt = async {
            let channel = endpoint.connect().await.map_err(|e| {
                let chain = error_chain(&e);
                failed(format!("cannot connect: {chain}"), &chain)
            })?;
            let mut client = node_client(channel.clone(), opts);
            let mut req = tonic::Request::new(InfoRequest {});
            req.set_timeout(opts.rpc_timeout);
            match client.info(req).await {
                Ok(info) => Ok((client, channel, info.into_inner())),
                Err(s) => Err(failed(
                    format!("Info failed: {:?}: {}", s.code(), s.message()),
                    &error_chain(&s),
                )),
            }
        };
        match attempt.await {
            Ok(ok) => break ok,
            Err(Attempt::Fatal(reason)) => return Err(unreachable(reason)),
            // The same likely TLS verdict again and again is no node still starting.
            Err(Attempt::Suspect(reason)) if suspicions >= 4 => {
                return Err(unreachable(reason));
            }
            Err(Attempt::Suspect(reason)) => {
                suspicions += 1;
                tracing::debug!(%address, %reason, "expert node refused the connection");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(Attempt::Retry(reason)) if Instant::now() >= deadline => {
                return Err(unreachable(format!(
                    "{reason} (gave up after {} s)",
                    opts.startup_timeout.as_secs()
                )));
            }
            Err(Attempt::Retry(reason)) => {
                tracing::debug!(%address, %reason, "expert node not ready yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let (client, channel, info) = info;
    let name = if info.node_name.is_empty() {
        address.clone()
    } else {
        info.node_name.clone()
    };
    let memory_bytes = info.memory_bytes;
    let instance = info.instance_id.clone();
    let gpu = info.gpu_uuid.clone();
    let held = check_info(&address, info, cfg, fingerprint, dtype)?;
    if let Some(verifier) = &opts.verify {
        // A probe that could not be run (a call timed out while the node warms up, say) is
        // tried again until the start-up deadline; a wrong answer is final.
        loop {
            let verified = super::verify::verify(
                verifier,
                client.clone(),
                &held,
                dtype,
                fingerprint,
                opts.rpc_timeout,
            )
            .await;
            let reason = match verified {
                Ok(()) => break,
                Err(VerifyError::Failed(reason)) if Instant::now() < deadline => {
                    tracing::debug!(%address, %reason, "the expert probe failed; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(VerifyError::Failed(reason)) => format!(
                    "{reason} (gave up after {} s)",
                    opts.startup_timeout.as_secs()
                ),
                Err(VerifyError::Mismatch(reason)) => reason,
            };
            return Err(ClusterError::Verification {
                address: address.clone(),
                reason,
            });
        }
    }
    tracing::info!(%address, node = %name, experts = held.len(), memory_bytes, "expert node ready");
    Ok(Node {
        rpc: NodeClient::new(name, address, client, channel),
        up: AtomicBool::new(true),
        retired: AtomicBool::new(false),
        outstanding: AtomicU64::new(0),
        served: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        last_error: Mutex::new(None),
        latency: Mutex::default(),
        held: Mutex::new(held),
        instance: Mutex::new(instance),
        gpu: Mutex::new(gpu),
        failed_probe: Mutex::new(None),
        ipc: IpcImporter::new(),
        ipc_ok: AtomicBool::new(true),
        ipc_answers: AtomicU64::new(0),
        ipc_requests: AtomicU64::new(0),
        routed_ok: AtomicBool::new(true),
        routed_calls: AtomicU64::new(0),
        lane_calls: AtomicU64::new(0),
    })
}

/// Checks a node's Info against this model; returns the (layer, expert) pairs it holds.
pub(super) fn check_info(
    address: &str,
    info: v1::InfoResponse,
    cfg: &ModelConfig,
    fingerprint: &str,
    dtype: DType,
) -> Result<Vec<(usize, usize)>, ClusterError> {
    let address = address.to_string();
    if info.fingerprint != fingerprint {
        return Err(ClusterError::Fingerprint {
            address,
            theirs: info.fingerprint,
            ours: fingerprint.to_string(),
        });
    }
    let theirs = v1::Dtype::try_from(info.dtype)
        .ok()
        .and_then(wire::candle_dtype);
    if theirs != Some(dtype) {
        return Err(ClusterError::Dtype {
            address,
            theirs: theirs
                .map(dtype_name)
                .unwrap_or_else(|| format!("dtype {}", info.dtype)),
            ours: dtype_name(dtype),
        });
    }
    let mut held = Vec::new();
    for layer in &info.layers {
        let l = layer.layer as usize;
        if l >= cfg.num_hidden_layers || !cfg.is_moe_layer(l) {
            return Err(ClusterError::BadInfo {
                address,
                reason: format!("layer {l} is not an MoE layer of this model"),
            });
        }
        for &e in &layer.experts {
            if e as usize >= cfg.num_experts {
                return Err(ClusterError::BadInfo {
                    address,
                    reason: format!("layer {l} expert {e} (the model has {})", cfg.num_experts),
                });
            }
            held.push((l, e as usize));
        }
    }
    // One order for every node's list, whatever order it reported: re-checks compare them.
    held.sort_unstable();
    Ok(held)
}

fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}
