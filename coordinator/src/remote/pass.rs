//! Routed passes: a batch-1 decode step replayed from the coordinator's CUDA graph with its
//! experts on nodes on other GPUs. At the step's start each node of the pass gets one message
//! listing its layers (`ForwardRequest.device_pass`) and queues them all behind flags in the
//! coordinator's GPU memory; the coordinator's layers only queue GPU work (fill the exchange,
//! raise the nodes' ready flags, wait for their done flags, sum), which the graph captures.
//! The nodes answer when their GPUs have done the pass; the step's end waits for those answers
//! (`omnishard-model`'s `ops/cuda/pass.rs` says how the GPUs are ordered, and why: per layer,
//! a routed call costs both hosts a message, and the coordinator's host a wait, in series with
//! both GPUs).
//!
//! It applies where every MoE layer takes routed calls (`routed.rs`: one live holder per
//! expert, each on another GPU of this host). A node that fails a pass, or does not answer by
//! its deadline, fails the step: at the first failed answer every flag of the pass is raised
//! (this GPU and the other nodes stop waiting), the buffer is never used again (nor freed: a
//! node may still have it mapped), the node is marked down (gone) or takes no more routed
//! calls, and the model runs the step again without the graph. While a pass is under way, other
//! threads' layers go the host way.

use std::hash::Hasher;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Instant;

use candle_core::{Device, Tensor};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use omnishard_model::ops::cuda::{DeviceRouting, PASS_MAX_NODES, PassExchange};
use omnishard_model::{CallContext, ExpertError, Pass};
use omnishard_proto::v1::{self, ForwardRequest};
use tokio::task::JoinHandle;

use super::RemoteExperts;
use super::call_error::CallError;
use super::client::{Payload, Reply};
use super::lane;
use super::membership::Node;
use super::routed::{node_gone, owners, routable_row};

/// Failed passes' buffers kept allocated: a node may still have one mapped and write into it,
/// so none is freed; past this many, passes stop (batch-1 steps run without the graph).
const MAX_ABANDONED: usize = 16;

/// The coordinator's passes: the buffer of the current shape, the pass under way, and the
/// buffers of failed ones.
#[derive(Default)]
pub(super) struct PassState {
    exchange: Mutex<Option<Arc<PassExchange>>>,
    active: Mutex<Option<ActivePass>>,
    abandoned: Mutex<Vec<Arc<PassExchange>>>,
    /// Buffers made so far (each pass buffer's generation).
    made: std::sync::atomic::AtomicU64,
}

impl PassState {
    fn active(&self) -> std::sync::MutexGuard<'_, Option<ActivePass>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Answer = (Arc<Node>, Result<Reply, CallError>);

/// A pass ordered and not yet ended.
struct ActivePass {
    /// The thread that began it: only its layers belong to the pass.
    thread: ThreadId,
    exchange: Arc<PassExchange>,
    /// Per model layer, the nodes computing it (indices into the node list); empty: none.
    layers: Vec<Vec<usize>>,
    calls: Vec<JoinHandle<Answer>>,
}

impl ActivePass {
    /// Every (node, layer) flag pair of the pass.
    fn pairs(&self) -> Vec<(usize, usize)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(l, nodes)| nodes.iter().map(move |&i| (i, l)))
            .collect()
    }
}

impl RemoteExperts {
    /// [`omnishard_model::Experts::begin_pass`]: orders the pass where every MoE layer takes
    /// routed calls, else [`Pass::Unavailable`].
    pub(super) fn begin_routed_pass(
        &self,
        device: &Device,
        tokens: usize,
        ctx: &CallContext,
    ) -> Pass {
        let shared = &self.shared;
        if !self.passes_possible() {
            return Pass::Unavailable;
        }
        let this = std::thread::current().id();
        let stale = {
            let mut active = shared.pass.active();
            match active.as_ref() {
                Some(p) if p.thread != this => return Pass::Unavailable,
                // One this thread never ended (it cannot have: the model ends every pass).
                Some(_) => active.take(),
                None => None,
            }
        };
        if let Some(p) = stale {
            let _ = self.finish(p, false);
        }
        // Made (GPU memory, a device sync) before the pass state is locked.
        let exchange = match self.pass_exchange(device, tokens) {
            Ok(exchange) => exchange,
            Err(e) => {
                tracing::warn!(error = %e, "no buffer for routed passes: batch-1 steps run without a CUDA graph");
                return Pass::Unavailable;
            }
        };
        // Held until the pass is stored: one pass at a time.
        let mut active = shared.pass.active();
        if active.is_some() {
            return Pass::Unavailable;
        }
        let cfg = &shared.cfg;
        // Read once for every layer (the table first: every index it holds is then valid).
        let table = shared.table();
        let nodes = shared.nodes();
        let Some(own_gpu) = shared.own_gpu.get().filter(|g| !g.is_empty()) else {
            return Pass::Unavailable;
        };
        let mut layers = vec![Vec::new(); cfg.num_hidden_layers];
        let mut orders: Vec<Vec<v1::LayerExperts>> = Vec::new();
        for l in (0..table.len()).filter(|&l| cfg.is_moe_layer(l)) {
            let Some(owners) = routable_row(&table, l).and_then(|row| owners(row, &nodes, own_gpu))
            else {
                return Pass::Unavailable;
            };
            for (i, experts) in owners {
                if i >= PASS_MAX_NODES {
                    return Pass::Unavailable;
                }
                if orders.len() <= i {
                    orders.resize(i + 1, Vec::new());
                }
                orders[i].push(v1::LayerExperts {
                    layer: l as u32,
                    experts,
                });
                layers[l].push(i);
            }
        }
        if layers.iter().all(Vec::is_empty) {
            return Pass::Unavailable;
        }
        // Fixed keys: the same pass must get the same key every step.
        let mut key = std::hash::DefaultHasher::new();
        key.write_u64(exchange.generation());
        for nodes in &layers {
            key.write_usize(nodes.len());
            for &i in nodes {
                key.write_usize(i);
            }
        }
        let host = omnishard_model::lending::host_id();
        let lane_spin = shared.opts.shm_lane.then(|| lane::spin(device));
        let timeout = shared.opts.rpc_timeout;
        let calls = orders
            .into_iter()
            .enumerate()
            .filter(|(_, list)| !list.is_empty())
            .map(|(i, list)| {
                let node = nodes[i].clone();
                let req = ForwardRequest {
                    layer: list[0].layer,
                    fingerprint: shared.fingerprint.clone(),
                    trace_ids: ctx.request_ids.to_vec(),
                    ipc_host: host.to_string(),
                    device_pass: Some(exchange.order(i, list, timeout)),
                    ..Default::default()
                };
                // The node's own deadline first: its answer then says why.
                let call_timeout = timeout + timeout / 4;
                self.runtime.handle().spawn(async move {
                    let result = node.rpc.forward(req, call_timeout, lane_spin).await;
                    (node, result)
                })
            })
            .collect();
        *active = Some(ActivePass {
            thread: this,
            exchange,
            layers,
            calls,
        });
        // Never 0 (the key of experts that need no pass).
        Pass::Ordered(key.finish() | 1)
    }

    /// Whether passes may be ordered at all (the options, the dtype, this GPU, the failures so
    /// far).
    pub(super) fn passes_possible(&self) -> bool {
        self.routing_allowed()
            && self
                .shared
                .pass
                .abandoned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len()
                < MAX_ABANDONED
    }

    /// The pass buffer for `tokens` tokens, made (and the last one replaced) when the shape
    /// changes.
    fn pass_exchange(
        &self,
        device: &Device,
        tokens: usize,
    ) -> Result<Arc<PassExchange>, ExpertError> {
        let cfg = &self.shared.cfg;
        let (layers, k, h) = (
            cfg.num_hidden_layers,
            cfg.num_experts_per_tok,
            cfg.hidden_size,
        );
        let mut exchange = self
            .shared
            .pass
            .exchange
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(x) = exchange.as_ref().filter(|x| x.fits(layers, tokens, k, h)) {
            return Ok(x.clone());
        }
        let generation = self.shared.pass.made.fetch_add(1, Ordering::Relaxed) + 1;
        let made = Arc::new(PassExchange::new(
            device,
            layers,
            tokens,
            k,
            h,
            cfg.num_experts,
            generation,
        )?);
        *exchange = Some(made.clone());
        Ok(made)
    }

    /// With a pass under way: `Some(whether it covers layer)` on the thread that began it, and
    /// `Some(false)` on any other (its layers go the host way: a routed call would queue this
    /// GPU's wait for a node whose stream holds the pass, behind the pass's own flags). `None`
    /// without one.
    pub(super) fn pass_covers(&self, layer: usize) -> Option<bool> {
        self.shared.pass.active().as_ref().map(|p| {
            p.thread == std::thread::current().id()
                && p.layers.get(layer).is_some_and(|n| !n.is_empty())
        })
    }

    /// The layer's part of this thread's pass, if it has one covering `layer`: only GPU work,
    /// queued (`None`: not a pass layer, call the nodes per layer).
    pub(super) fn pass_layer(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &DeviceRouting,
        usage: &Tensor,
    ) -> Option<Result<Tensor, ExpertError>> {
        let mut active = self.shared.pass.active();
        let pass = active
            .as_mut()
            .filter(|p| p.thread == std::thread::current().id())?;
        let nodes = pass.layers.get(layer).filter(|n| !n.is_empty())?;
        Some(
            pass.exchange
                .layer(layer, xs, routing, usage, nodes)
                .map_err(ExpertError::from),
        )
    }

    /// [`omnishard_model::Experts::end_pass`]: waits for the nodes' answers; a failed pass (or
    /// one not `queued` in full) releases the GPUs' waits and fails.
    pub(super) fn end_routed_pass(&self, queued: bool) -> Result<(), ExpertError> {
        let mut active = self.shared.pass.active();
        let Some(pass) = active.take_if(|p| p.thread == std::thread::current().id()) else {
            return Ok(());
        };
        drop(active);
        self.finish(pass, queued)
    }

    fn finish(&self, pass: ActivePass, complete: bool) -> Result<(), ExpertError> {
        let pairs = pass.pairs();
        let mut failed = (!complete).then(|| "the step ended before all its layers".to_string());
        let mut released = false;
        if !complete {
            // The step stopped before queuing every layer: the nodes wait for ready flags
            // that will not come, and this GPU may wait for theirs.
            self.fail_pass(&pass.exchange, &pairs);
            released = true;
        }
        let started = Instant::now();
        let mut answers: FuturesUnordered<_> = pass.calls.into_iter().collect();
        while let Some(answer) = self.block_on(answers.next()) {
            let outcome = match answer {
                Ok((node, result)) => match result.and_then(|reply| match reply.payload {
                    Payload::Passed => Ok(reply),
                    _ => Err(CallError::BadAnswer(
                        "answered a routed pass with rows or an event".into(),
                    )),
                }) {
                    Ok(reply) => {
                        if let Some(t) = &reply.timing {
                            self.shared.profile.node_answered(t);
                        }
                        node.routed_calls.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        // A node that missed its deadline after this side gave up on the pass
                        // waited for flags that were late for another node's sake.
                        if node_gone(&e) {
                            node.mark_down(&reason);
                        } else if !(released
                            && matches!(&e, CallError::Status { code, .. } if *code == tonic::Code::DeadlineExceeded))
                        {
                            node.routed_ok.store(false, Ordering::Relaxed);
                        }
                        tracing::warn!(node = %node.label(), error = %reason, "routed pass failed");
                        format!("node {}: {reason}", node.label())
                    }
                },
                Err(e) => format!("a pass call's task failed: {e}"),
            };
            if !released {
                // At the first failure: the other nodes' passes (and this GPU) wait on flags
                // that may never come otherwise.
                self.fail_pass(&pass.exchange, &pairs);
                released = true;
            }
            failed.get_or_insert(outcome);
        }
        tracing::trace!(
            waited_us = started.elapsed().as_micros() as u64,
            "routed pass answered"
        );
        match failed {
            None => Ok(()),
            Some(reason) => Err(ExpertError::Inconsistent(format!(
                "routed pass failed: {reason}"
            ))),
        }
    }

    /// Releases what a failed pass left waiting on the GPUs and retires its buffer.
    fn fail_pass(&self, exchange: &Arc<PassExchange>, pairs: &[(usize, usize)]) {
        if let Err(e) = exchange.fail(pairs) {
            tracing::error!(error = %e, "cannot release a failed routed pass's waits on this GPU");
        }
        let state = &self.shared.pass;
        let mut current = state.exchange.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|x| Arc::ptr_eq(x, exchange)) {
            *current = None;
        }
        let mut abandoned = state.abandoned.lock().unwrap_or_else(|e| e.into_inner());
        abandoned.push(exchange.clone());
        if abandoned.len() == MAX_ABANDONED {
            tracing::warn!(
                failed = MAX_ABANDONED,
                "routed passes failed too often: batch-1 steps run without the CUDA graph from now on"
            );
        }
    }
}
