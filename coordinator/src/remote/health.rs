//! Keeping the membership true while serving: every health interval each node that is up is
//! asked for gRPC health and its Info (a node restarted on its address with another dtype, model
//! or shard is caught; a new process, told by its instance id, has its experts probed again), and
//! each node that is down is dialled afresh and re-admitted when its Info matches and its experts
//! pass the probe. All nodes are checked at once with short deadlines, so a partitioned node holds
//! up no other's check and is back within an interval or two of the partition healing.

use std::sync::atomic::Ordering;
use std::time::Duration;

use candle_core::DType;
use futures::future::join_all;
use omnishard_proto::ModelConfig;
use omnishard_proto::tls::error_chain;
use omnishard_proto::v1::{InfoRequest, expert_service_client::ExpertServiceClient};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::RemoteOptions;
use super::admission::{check_info, node_client, node_endpoint};
use super::membership::{Node, Shared};
use super::verify::{VerifyError, verify};

/// What the node holds and which process it is, from its Info (asked over `client`) checked as
/// at admission (fingerprint, dtype, layout); its experts probed too where the options carry a
/// verifier and the process is one not admitted before at this address (a node that reports no
/// instance id is probed every time). A process whose probe found other weights is refused again
/// without a new probe.
async fn checked_holdings(
    node: &Node,
    client: ExpertServiceClient<Channel>,
    cfg: &ModelConfig,
    fingerprint: &str,
    dtype: DType,
    opts: &RemoteOptions,
) -> Result<(Vec<(usize, usize)>, String), String> {
    let mut req = tonic::Request::new(InfoRequest {});
    req.set_timeout(opts.rpc_timeout);
    let info = client
        .clone()
        .info(req)
        .await
        .map_err(|s| format!("Info failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let instance = info.instance_id.clone();
    // A new process at the address may run on another GPU.
    *node.gpu.lock().unwrap_or_else(|e| e.into_inner()) = info.gpu_uuid.clone();
    let held =
        check_info(&node.rpc.address, info, cfg, fingerprint, dtype).map_err(|e| e.to_string())?;
    let known = node
        .instance
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(verifier) = opts
        .verify
        .as_ref()
        .filter(|_| instance.is_empty() || instance != known)
    else {
        return Ok((held, instance));
    };
    let failed = node
        .failed_probe
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some((_, reason)) = failed.filter(|(i, _)| *i == instance && !i.is_empty()) {
        return Err(reason);
    }
    match verify(
        verifier,
        client,
        &held,
        dtype,
        fingerprint,
        opts.rpc_timeout,
    )
    .await
    {
        Ok(()) => Ok((held, instance)),
        Err(VerifyError::Mismatch(reason)) => {
            *node.failed_probe.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((instance, reason.clone()));
            Err(reason)
        }
        Err(VerifyError::Failed(reason)) => Err(reason),
    }
}

/// Checks a node that is up again as at admission: one restarted on its address between two
/// health checks (another dtype, model or shard) answers health like the old one did, so only
/// its Info tells. Returns whether what it holds changed (the routing table must follow).
async fn recheck(
    node: &Node,
    cfg: &ModelConfig,
    fingerprint: &str,
    dtype: DType,
    opts: &RemoteOptions,
) -> Result<bool, String> {
    let known = node
        .instance
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (held, instance) =
        checked_holdings(node, node.rpc.client(), cfg, fingerprint, dtype, opts).await?;
    if instance != known {
        let probed = opts.verify.is_some();
        tracing::info!(node = %node.label(), %instance, probed, "a new expert-node process answers at this address; checked again");
        *node.instance.lock().unwrap_or_else(|e| e.into_inner()) = instance;
        // A new process gets routed calls again once it has answered in GPU memory.
        node.routed_ok.store(true, Ordering::Relaxed);
    }
    let mut current = node.held.lock().unwrap_or_else(|e| e.into_inner());
    if *current == held {
        return Ok(false);
    }
    tracing::warn!(
        node = %node.label(),
        experts = held.len(),
        "expert node now holds a different partition (restarted?); routing follows"
    );
    *current = held;
    Ok(true)
}

/// Brings a down node back if it answers Info with our fingerprint and dtype, over a fresh
/// connection (which then replaces the old one, with the old stream).
pub(super) async fn readmit(
    node: &Node,
    cfg: &ModelConfig,
    fingerprint: &str,
    dtype: DType,
    opts: &RemoteOptions,
) -> Result<(), String> {
    let channel = node_endpoint(&node.rpc.address, opts)?
        .connect_timeout(opts.rpc_timeout)
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {}", error_chain(&e)))?;
    let client = node_client(channel.clone(), opts);
    let (held, instance) =
        checked_holdings(node, client.clone(), cfg, fingerprint, dtype, opts).await?;
    *node.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
    let previous = std::mem::replace(
        &mut *node.instance.lock().unwrap_or_else(|e| e.into_inner()),
        instance.clone(),
    );
    if previous != instance {
        node.routed_ok.store(true, Ordering::Relaxed);
    }
    node.rpc.replace(client, channel).await;
    if !node.up.swap(true, Ordering::AcqRel) {
        tracing::info!(node = %node.label(), "expert node re-admitted");
    }
    Ok(())
}

/// Every `health_interval`: gRPC health and Info of the nodes that are up (a failure or a
/// mismatch marks them down before a request has to find out; a changed partition updates the
/// routing), Info of those that are down over a fresh connection (re-admitted when it matches).
/// All nodes are checked at once, a down node's check bounded by half the interval (at least
/// 200 ms): a partitioned node, which answers nothing, is re-admitted within an interval or two
/// of the partition healing. A node that is up gets three intervals (at least 1 s) to answer, so
/// a busy machine is not taken for a dead one. Both are capped by the RPC deadline. Ends when the
/// experts are dropped.
pub(super) async fn health_loop(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let interval = s.opts.health_interval;
        let bounded = |t: Duration| RemoteOptions {
            rpc_timeout: t.min(s.opts.rpc_timeout),
            ..s.opts.clone()
        };
        let (up, down) = (
            bounded((interval * 3).max(Duration::from_secs(1))),
            bounded((interval / 2).max(Duration::from_millis(200))),
        );
        let nodes = s.nodes();
        let checks = nodes
            .iter()
            .filter(|n| !n.retired.load(Ordering::Acquire))
            .map(|node| check(node, &s, &up, &down));
        if join_all(checks).await.into_iter().any(|changed| changed) {
            s.rebuild_table();
        }
        drop(s);
        tokio::time::sleep(interval).await;
    }
}

/// One node's health check, with the deadlines for a node that is up or down; returns whether
/// what it holds changed.
async fn check(node: &Node, s: &Shared, up: &RemoteOptions, down: &RemoteOptions) -> bool {
    if !node.up.load(Ordering::Acquire) {
        return match readmit(node, &s.cfg, &s.fingerprint, s.dtype, down).await {
            Ok(()) => true,
            Err(reason) => {
                node.refused(&reason);
                false
            }
        };
    }
    let opts = up;
    let mut health = HealthClient::new(node.rpc.channel());
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: "omnishard.v1.ExpertService".into(),
    });
    req.set_timeout(opts.rpc_timeout);
    let serving = matches!(
        tokio::time::timeout(opts.rpc_timeout, health.check(req)).await,
        Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving
    );
    if !serving {
        node.mark_down("health check failed");
        return false;
    }
    match recheck(node, &s.cfg, &s.fingerprint, s.dtype, opts).await {
        Ok(changed) => changed,
        Err(reason) => {
            node.mark_down(&format!("re-check failed: {reason}"));
            false
        }
    }
}
