//! Operational routes: `GET /health` (503 with the reason when the scheduler is not running),
//! `GET /metrics` (Prometheus), `GET /v1/models`, `GET /v1/stats` (expert usage and node traffic)
//! and `GET|POST /admin/nodes` (list nodes, add one to a running cluster).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::intake::Admitted;
use super::{AppState, GenerationError};
use crate::remote::describe_pairs;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthQuery {
    /// Liveness only: is this process able to work at all (a restart would help otherwise)?
    live: Option<String>,
}

/// `GET /health`: 200 when requests can be served; 503 with the reason when the scheduler has
/// stopped or some expert has no live node (a load balancer should send traffic elsewhere).
/// `GET /health?live`: the scheduler only — uncovered experts are not fixed by restarting the
/// coordinator, so a liveness probe must not count them.
pub(super) async fn health(
    State(state): State<Arc<AppState>>,
    query: Result<Query<HealthQuery>, QueryRejection>,
) -> Response {
    // An unknown parameter is the caller's mistake, answered in the API's JSON error shape.
    let Ok(Query(query)) = query else {
        return GenerationError::InvalidRequest(
            "`/health` takes no parameters but `live` (`/health?live` for liveness)".into(),
        )
        .into_response();
    };
    // A server that cannot generate must fail its health check, so that a load balancer or
    // orchestrator takes it out of service; the reason says what happened.
    if let Some(reason) = state.scheduler.stopped_reason() {
        return GenerationError::SchedulerStopped { reason }.into_response();
    }
    if state.shutdown.stopping() {
        return GenerationError::ShuttingDown.into_response();
    }
    if query.live.is_none()
        && let Some(remote) = state.engine.remote()
    {
        let uncovered = remote.uncovered();
        if !uncovered.is_empty() {
            return GenerationError::ExpertNodesUnavailable(format!(
                "{} (layer, expert) pairs have no live node: {}",
                uncovered.len(),
                describe_pairs(&uncovered)
            ))
            .into_response();
        }
    }
    Json(json!({"status": "ok"})).into_response()
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(state.engine.model().usage());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub(super) async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [super::tokens::model_card(&state)]
    }))
}

/// Usage statistics: tokens per (layer, expert), a per-layer summary, and per-node traffic.
pub(super) async fn stats(State(state): State<Arc<AppState>>) -> Json<Value> {
    let cfg = state.engine.config();
    let usage = state.engine.model().usage();
    let snapshot = usage.snapshot();
    let mut layers = Vec::new();
    for layer in cfg.moe_layers() {
        let mut counts: Vec<(usize, u64)> = snapshot
            .iter()
            .filter(|(l, _, _)| *l == layer)
            .map(|&(_, e, n)| (e, n))
            .collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: u64 = counts.iter().map(|c| c.1).sum();
        let share = |n: u64| {
            if total == 0 {
                0.0
            } else {
                n as f64 / total as f64
            }
        };
        let top_k = cfg.num_experts_per_tok;
        layers.push(json!({
            "layer": layer,
            "assignments": total,
            "distinct_experts": counts.len(),
            "top_experts": counts.iter().take(top_k).map(|&(e, n)| json!({"expert": e, "assignments": n, "share": share(n)})).collect::<Vec<_>>(),
            "top_k_share": share(counts.iter().take(top_k).map(|c| c.1).sum()),
        }));
    }
    let remote = state.engine.remote();
    let nodes = remote.map(|r| r.status()).unwrap_or_default();
    let holders = remote.map(|r| r.holders());
    let m = &state.metrics;
    Json(json!({
        "model": state.config.model_name,
        "serving": {
            "queue_depth": m.queue_depth.get(),
            "active_sequences": m.active_sequences.get(),
            "kv_cache_tokens": m.kv_cache_tokens.get(),
            "kv_cache_capacity_tokens": m.kv_cache_capacity_tokens.get(),
            "prompt_tokens_total": m.prompt_tokens.get(),
            "completion_tokens_total": m.completion_tokens.get(),
            "prefix_cache_query_tokens_total": m.prefix_cache_query_tokens.get(),
            "prefix_cache_hit_tokens_total": m.prefix_cache_hit_tokens.get(),
            "preemptions_total": m.preemptions.get(),
        },
        "holders": holders,
        "tokens": usage.tokens(),
        "top_k": cfg.num_experts_per_tok,
        "moe_layers": cfg.moe_layers(),
        "num_experts": cfg.num_experts,
        "experts": snapshot.iter().map(|&(l, e, n)| json!({"layer": l, "expert": e, "assignments": n})).collect::<Vec<_>>(),
        "layers": layers,
        "nodes": nodes,
    }))
}

/// `GET /dashboard`: one self-contained page (no external scripts or fonts) that polls
/// `/v1/stats`: nodes, throughput, queue and KV usage, and the routing heatmap.
pub(super) async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

pub(super) async fn list_nodes(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.remote() {
        Some(remote) => Json(json!({"nodes": remote.status()})).into_response(),
        None => GenerationError::NoExpertNodes.into_response(),
    }
}

/// Takes a node out of the running cluster (`DELETE /admin/nodes/{address}`): calls in flight
/// finish, new ones go to the other replicas of its experts.
pub(super) async fn remove_node(
    State(state): State<Arc<AppState>>,
    Path(address): Path<String>,
) -> Response {
    let Some(remote) = state.engine.remote() else {
        return GenerationError::NoExpertNodes.into_response();
    };
    match remote.retire_node(&address) {
        Some(status) => Json(json!({"node": status})).into_response(),
        None => GenerationError::NodeRejected(format!(
            "{address} is not a member of the cluster (or was already removed)"
        ))
        .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNode {
    address: String,
}

/// Admissions of new nodes checked at once; more get 429 (each holds a blocking thread while
/// it connects, and 530 at once once starved the server).
const ADMISSIONS_AT_ONCE: usize = 4;
static ADMISSIONS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(ADMISSIONS_AT_ONCE);

/// Adds an expert node to the running cluster: `{"address": "host:port"}` as
/// `application/json`. The client hears one reason for any refusal (the detail is logged), so
/// the endpoint does not tell open ports from closed ones.
pub(super) async fn add_node(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Admitted,
) -> Response {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !json {
        return GenerationError::UnsupportedMediaType(
            "send the node as JSON (Content-Type: application/json)".into(),
        )
        .into_response();
    }
    let Some(remote) = state.engine.remote().cloned() else {
        return GenerationError::NoExpertNodes.into_response();
    };
    let Ok(_permit) = ADMISSIONS.try_acquire() else {
        return GenerationError::AdminBusy(format!(
            "{ADMISSIONS_AT_ONCE} node admissions are already running; retry later"
        ))
        .into_response();
    };
    let req: AddNode = match serde_json::from_slice(&body.bytes) {
        Ok(r) => r,
        Err(e) => {
            return GenerationError::InvalidRequest(format!(
                "expected {{\"address\": \"host:port\"}}: {e}"
            ))
            .into_response();
        }
    };
    if let Err(e) = omnishard_proto::address::check_node_address(&req.address) {
        return GenerationError::InvalidRequest(e).into_response();
    }
    // Connecting and checking the node blocks; keep it off the async workers.
    match tokio::task::spawn_blocking(move || remote.add_node(&req.address)).await {
        Ok(Ok(status)) => Json(json!({"node": status})).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "node not admitted");
            GenerationError::NodeRejected(
                "the node was not admitted: it is unreachable, not an expert node, or serves another model, dtype or partition (the server log says which)".into(),
            )
            .into_response()
        }
        Err(e) => GenerationError::Internal(e.to_string()).into_response(),
    }
}
