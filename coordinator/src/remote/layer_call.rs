//! Sending one round of a layer's call: each node's share becomes a request (bounded by the
//! message limit), is sent with its deadline and counted as that node's outstanding work, and —
//! when hedging is on and the node runs well past its usual latency — re-sent to replicas
//! (`hedge.rs` says when), whichever answers first being taken. What comes back is a list of
//! [`Answer`]s for `fanout.rs` to check and sum.

use std::cell::OnceCell;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use futures::future::join_all;
use omnishard_model::wire::{self, assignments_to_wire};
use omnishard_model::{Assignment, CallContext, ExpertError};
use omnishard_proto::lane::ANSWER_CAPACITY;
use omnishard_proto::v1::{self, ForwardRequest};
use tracing::Instrument;

use super::RemoteOptions;
use super::call_error::CallError;
use super::client::Reply;
use super::membership::{Node, Table};
use super::plan::{NodeShare, plan};
use super::profile::CallProfile;

/// Room an encoded answer needs beyond its rows (message and tensor framing, timing).
const LANE_FRAMING: usize = 4096;

/// One node's answer (or failure) for some assignments of the layer.
pub(super) struct Answer {
    pub(super) node: usize,
    pub(super) global: Vec<Assignment>,
    pub(super) result: Result<Reply, CallError>,
    /// The assignments were also sent elsewhere (hedged) and are accounted for there: a failure
    /// here marks the node down but re-sends nothing.
    pub(super) covered: bool,
    /// The call's span (layer, node, sizes), for whatever is logged about the answer.
    pub(super) span: tracing::Span,
    /// The request's hidden rows were in the coordinator's GPU memory.
    pub(super) device_input: bool,
}

/// The layer's hidden states as the requests read them: on the host only once a request sends
/// rows as bytes — when every node reads its rows from the coordinator's GPU memory, the
/// states never leave the GPU.
pub(super) struct HiddenRows<'a> {
    xs: &'a Tensor,
    host: OnceCell<Tensor>,
    /// Values in one row (the hidden size).
    pub(super) width: usize,
    /// Bytes of one row.
    pub(super) row_bytes: usize,
}

impl<'a> HiddenRows<'a> {
    pub(super) fn new(xs: &'a Tensor) -> Self {
        let width = xs.dims2().map(|d| d.1).unwrap_or(0);
        Self {
            xs,
            host: OnceCell::new(),
            width,
            row_bytes: width * xs.dtype().size_in_bytes(),
        }
    }

    /// The states on the host, copied there (after the layer's device work) the first time.
    pub(super) fn host(&self) -> candle_core::Result<&Tensor> {
        if let Some(t) = self.host.get() {
            return Ok(t);
        }
        let t = self.xs.to_device(&Device::Cpu)?;
        Ok(self.host.get_or_init(|| t))
    }
}

/// Everything one round of a layer's call needs.
pub(super) struct LayerCall<'a> {
    pub(super) layer: usize,
    pub(super) rows: &'a HiddenRows<'a>,
    pub(super) ctx: &'a CallContext,
    pub(super) table: &'a Table,
    pub(super) nodes: &'a [Arc<Node>],
    pub(super) opts: &'a RemoteOptions,
    pub(super) fingerprint: &'a str,
    pub(super) profile: &'a CallProfile,
    /// This host's id when answers may come back in nodes' GPU memory (the coordinator is on a
    /// GPU and `cuda_ipc` is on), for the nodes whose copies have not failed.
    pub(super) ipc_host: Option<&'a str>,
    /// How long to spin for an answer on a node's shared-memory lane; `None`: lanes are off.
    pub(super) lane_spin: Option<Duration>,
}

/// Counts a call's assignments as its node's outstanding work until the call ends or is
/// abandoned.
struct Busy<'a>(&'a Node, u64);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(self.1, Ordering::Relaxed);
    }
}

impl LayerCall<'_> {
    /// The request for one share: its hidden rows (as bytes, or `device_hidden`: staged in GPU
    /// memory) and assignments, refused before sending when it or its answer would exceed the
    /// message limit.
    pub(super) fn request(
        &self,
        share: &NodeShare,
        device_hidden: Option<v1::DeviceTensor>,
    ) -> Result<ForwardRequest, ExpertError> {
        // The answer has one row per assignment: bound both directions, as bytes (the limit
        // holds whichever way the rows go).
        let largest = share.tokens.len().max(share.global.len()) * self.rows.row_bytes;
        if largest > self.opts.max_message_bytes {
            return Err(ExpertError::Rejected {
                node: self.nodes[share.node].label(),
                layer: self.layer,
                reason: format!(
                    "a {} MiB message would exceed the {} MiB limit; raise --max-message-mib on the coordinator and the nodes, or lower --max-batched-tokens",
                    largest >> 20,
                    self.opts.max_message_bytes >> 20
                ),
            });
        }
        let hidden = match device_hidden {
            Some(_) => None,
            None => Some(wire::encode_rows(self.rows.host()?, &share.tokens)?),
        };
        // Rows staged in GPU memory go with the host's id whatever became of ipc_ok since.
        let ipc_host = self
            .ipc_host
            .filter(|_| {
                device_hidden.is_some() || self.nodes[share.node].ipc_ok.load(Ordering::Relaxed)
            })
            .unwrap_or_default()
            .to_string();
        let (token_index, expert_id, weight) = assignments_to_wire(&share.local);
        Ok(ForwardRequest {
            request_id: 0,
            layer: self.layer as u32,
            hidden,
            device_hidden,
            token_index,
            expert_id,
            weight,
            fingerprint: self.fingerprint.to_string(),
            trace_ids: self.ctx.request_ids.to_vec(),
            ipc_host,
            ..Default::default()
        })
    }

    /// One share's span: a span prints nothing by itself, and at info level the warnings logged
    /// inside it (a node marked down) name layer, node and sizes.
    fn span(&self, share: &NodeShare) -> tracing::Span {
        tracing::info_span!(
            "forward",
            layer = self.layer,
            node = %self.nodes[share.node].rpc.name,
            n_tokens = share.tokens.len(),
            n_assignments = share.global.len(),
        )
    }

    /// Sends `req` to `share`'s node with the RPC deadline; learns the node's latency from it.
    async fn send(&self, share: &NodeShare, req: ForwardRequest) -> Result<Reply, CallError> {
        let node = &self.nodes[share.node];
        let work = share.global.len() as u64;
        node.outstanding.fetch_add(work, Ordering::Relaxed);
        let _busy = Busy(node, work);
        // Through the lane when its slot holds the answer as bytes (one row per assignment), or
        // when the answer is asked for in GPU memory of a node that has answered that way (a
        // handle; should it come as bytes after all and not fit, the client sends the request
        // again over gRPC).
        let fits = share.global.len() * self.rows.row_bytes + LANE_FRAMING <= ANSWER_CAPACITY;
        let lent_before = !req.ipc_host.is_empty() && node.ipc_answers.load(Ordering::Relaxed) > 0;
        let lane_spin = self.lane_spin.filter(|_| fits || lent_before);
        let started = Instant::now();
        let result = node
            .rpc
            .forward(req, self.opts.rpc_timeout, lane_spin)
            .await
            .inspect(|reply| {
                if let Some(t) = &reply.timing {
                    self.profile.node_answered(t);
                }
                if reply.via_lane {
                    node.lane_calls.fetch_add(1, Ordering::Relaxed);
                }
            });
        let seconds = started.elapsed().as_secs_f64();
        if result.is_ok() {
            node.latency
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(work, seconds);
        }
        if let Some(o) = &self.opts.observer {
            o.observe(&node.rpc.name, seconds, result.is_ok());
        }
        result
    }

    fn answer(
        share: &NodeShare,
        result: Result<Reply, CallError>,
        covered: bool,
        span: tracing::Span,
    ) -> Answer {
        Answer {
            node: share.node,
            global: share.global.clone(),
            result,
            covered,
            span,
            device_input: share.device_input,
        }
    }

    /// Sends one share; past its node's hedging threshold, the same work goes to replicas too
    /// and the first complete answer wins.
    pub(super) async fn share(&self, share: NodeShare, req: ForwardRequest) -> Vec<Answer> {
        let span = self.span(&share);
        let primary = self.send(&share, req).instrument(span.clone());
        let after = self.opts.hedge_floor.and_then(|floor| {
            self.nodes[share.node]
                .latency
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .hedge_after(share.global.len() as u64, floor)
        });
        let Some(after) = after.filter(|a| *a < self.opts.rpc_timeout) else {
            return vec![Self::answer(&share, primary.await, false, span)];
        };
        let mut primary = pin!(primary);
        tokio::select! {
            result = &mut primary => return vec![Self::answer(&share, result, false, span)],
            () = tokio::time::sleep(after) => {}
        }
        // Replicas for all of the share, away from the late node; none: wait for it.
        let hedges = plan(
            self.layer,
            &share.global,
            self.table,
            self.nodes,
            &[],
            Some(share.node),
        );
        let (hedges, requests): (Vec<NodeShare>, Vec<ForwardRequest>) =
            match hedges.and_then(|hedges| {
                hedges
                    .into_iter()
                    .map(|h| self.request(&h, None).map(|r| (h, r)))
                    .collect::<Result<Vec<_>, _>>()
            }) {
                Ok(h) if !h.is_empty() => h.into_iter().unzip(),
                _ => return vec![Self::answer(&share, primary.await, false, span)],
            };
        span.in_scope(|| {
            tracing::warn!(
                after_ms = after.as_millis() as u64,
                replicas = hedges.len(),
                "no answer yet; hedging the call to replicas"
            )
        });
        let spans: Vec<tracing::Span> = hedges.iter().map(|h| self.span(h)).collect();
        let sent = hedges
            .iter()
            .zip(requests)
            .zip(&spans)
            .map(|((h, req), s)| self.send(h, req).instrument(s.clone()));
        let mut hedged = pin!(join_all(sent));
        let hedge_answers = |results: Vec<Result<Reply, CallError>>, keep_ok: bool| {
            hedges
                .iter()
                .zip(results)
                .zip(&spans)
                .filter(|((_, r), _)| keep_ok || r.is_err())
                // Failed hedges re-send their work only when they, not the late node, carry it.
                .map(|((h, r), s)| Self::answer(h, r, !keep_ok, s.clone()))
                .collect::<Vec<_>>()
        };
        tokio::select! {
            result = &mut primary => {
                if result.is_ok() {
                    return vec![Self::answer(&share, result, false, span)];
                }
                // The late node failed: the replicas carry the work now.
                let mut out = vec![Self::answer(&share, result, true, span)];
                out.extend(hedge_answers(hedged.await, true));
                out
            }
            results = &mut hedged => {
                if results.iter().all(Result::is_ok) {
                    let late = Err(CallError::Hedged(after));
                    let mut out = vec![Self::answer(&share, late, true, span)];
                    out.extend(hedge_answers(results, true));
                    return out;
                }
                // A replica failed too: the late node's answer is the one to wait for.
                let result = primary.await;
                if result.is_ok() {
                    let mut out = vec![Self::answer(&share, result, false, span)];
                    out.extend(hedge_answers(results, false));
                    out
                } else {
                    let mut out = vec![Self::answer(&share, result, true, span)];
                    out.extend(hedge_answers(results, true));
                    out
                }
            }
        }
    }
}
