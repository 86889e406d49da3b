//! Layer calls with the routing left on the coordinator's GPU (`--gpu-routing`): the engine's
//! device-routed MoE step for [`RemoteExperts`]. The router's top-k and the hidden states are
//! staged in GPU memory every node of the layer maps; each node computes the slots of its own
//! experts and writes them back; the GPUs order it all with interprocess events, and no host
//! waits for a GPU (`omnishard-model`'s `ops/cuda/routed.rs` says how and why).
//!
//! It applies where each expert of the layer has exactly one live holder and every such node is
//! on another GPU of this host and has answered in GPU memory before (so the first calls take the
//! host path, which finds that out). Replicas of an expert both up, a node that refuses the call or
//! cannot read the buffer: the layer goes the host way (`fanout.rs`), with its failover. A node
//! that fails a routed call other than by going down gets no more of them.
//!
//! Not bounded by a deadline: the GPU work after a node's answer. The answer itself has the
//! call's deadline; what becomes of the coordinator's wait on the event of a node process that
//! dies after answering is up to CUDA, and not established here.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::Tensor;
use futures::future::join_all;
use omnishard_model::ops::cuda::{DeviceRouting, ROUTED_MAX_EXPERTS, RoutedExchange};
use omnishard_model::{CallContext, ExpertError, Experts};
use omnishard_proto::v1::{self, ForwardRequest};

use super::RemoteExperts;
use super::call_error::CallError;
use super::client::Payload;
use super::lane;
use super::membership::Node;
use super::profile::Stage;

impl RemoteExperts {
    /// The nodes that compute `layer` on the routed path, each once with the experts it is
    /// counted on for; `None` where the path does not apply (see the module's header).
    pub(super) fn routed_nodes(&self, layer: usize) -> Option<Vec<(usize, Vec<u32>)>> {
        self.with_routed_layer(layer, owners)
    }

    /// Whether `layer` takes the routed path: [`RemoteExperts::routed_nodes`] without the lists
    /// (the engine asks for every layer of every step).
    pub(super) fn takes_routed_calls(&self, layer: usize) -> bool {
        self.with_routed_layer(layer, |experts, nodes, own_gpu| {
            experts
                .iter()
                .all(|holders| owner(holders, nodes, own_gpu).is_some())
                .then_some(())
        })
        .is_some()
    }

    /// `f` on `layer`'s row of the table, the nodes and the coordinator's GPU, where the options,
    /// the dtype and the layer's size allow routed calls at all.
    fn with_routed_layer<R>(
        &self,
        layer: usize,
        f: impl FnOnce(&[Vec<usize>], &[Arc<Node>], &[u8]) -> Option<R>,
    ) -> Option<R> {
        if !self.routing_allowed() {
            return None;
        }
        let table = self.shared.table();
        let nodes = self.shared.nodes();
        let experts = routable_row(&table, layer)?;
        let own_gpu = self.shared.own_gpu.get().filter(|g| !g.is_empty())?;
        f(experts, &nodes, own_gpu)
    }

    /// Whether the options, the dtype and this GPU allow routed calls (and passes) at all.
    pub(super) fn routing_allowed(&self) -> bool {
        let opts = &self.shared.opts;
        opts.gpu_routing
            && opts.cuda_ipc
            && self.shared.dtype == candle_core::DType::BF16
            && !self.shared.routed_off.load(Ordering::Relaxed)
    }

    /// The MoE step of `layer` on the routed path: `[n, H]` sums of `xs`'s rows over their
    /// top-k, queued on the coordinator's GPU; the chosen experts are added to `usage`.
    pub(super) fn forward_routed(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &DeviceRouting,
        usage: &Tensor,
        ctx: &CallContext,
    ) -> Result<Tensor, ExpertError> {
        let mut laps = self.shared.profile.start();
        let exchange = match self.exchange(xs.device()) {
            Ok(exchange) => exchange,
            Err(e) => {
                // No interprocess event on this GPU, say: it will not come later either.
                self.shared.routed_off.store(true, Ordering::Relaxed);
                tracing::warn!(error = %e, "routed calls are not possible here: every layer goes the host way");
                return self.forward_after_routed(layer, xs, routing, ctx);
            }
        };
        // Staged first, whatever happens next: this plans the sums and counts the usage.
        let stage = match exchange.stage(xs, routing, usage) {
            Ok(stage) => stage,
            Err(e) => {
                // Out of GPU memory for the buffer, say: this layer's usage goes uncounted.
                tracing::warn!(layer, error = %e, "cannot stage a routed call: the layer goes the host way");
                return self.forward_after_routed(layer, xs, routing, ctx);
            }
        };
        laps.lap(Stage::Staging);
        let nodes = self.shared.nodes();
        let Some(owners) = self.routed_nodes(layer) else {
            // A node went down since the engine asked: the host way, with failover (the staged
            // buffer, read by no one, goes back when this returns).
            return self.forward_after_routed(layer, xs, routing, ctx);
        };
        let host = omnishard_model::lending::host_id();
        let lane_spin = self.shared.opts.shm_lane.then(|| lane::spin(xs.device()));
        let sends = owners.into_iter().map(|(i, experts)| {
            let node = nodes[i].clone();
            let req = ForwardRequest {
                layer: layer as u32,
                fingerprint: self.shared.fingerprint.clone(),
                trace_ids: ctx.request_ids.to_vec(),
                ipc_host: host.to_string(),
                device_routed: Some(v1::DeviceRouted {
                    experts,
                    ..stage.request().clone()
                }),
                ..Default::default()
            };
            let (timeout, observer) = (self.shared.opts.rpc_timeout, &self.shared.opts.observer);
            async move {
                let started = Instant::now();
                let result = node.rpc.forward(req, timeout, lane_spin).await;
                if let Some(o) = observer {
                    o.observe(
                        &node.rpc.name,
                        started.elapsed().as_secs_f64(),
                        result.is_ok(),
                    );
                }
                (node, result)
            }
        });
        laps.lap(Stage::Encode);
        let answers = self.block_on(join_all(sends));
        laps.lap(Stage::RoundTrip);
        let mut failed = false;
        for (node, result) in answers {
            let waited = result.and_then(|reply| {
                if let Some(t) = &reply.timing {
                    self.shared.profile.node_answered(t);
                }
                if reply.via_lane {
                    node.lane_calls.fetch_add(1, Ordering::Relaxed);
                }
                match reply.payload {
                    Payload::Done(event) => node
                        .ipc
                        .wait_event(xs.device(), &event)
                        .map_err(|e| CallError::Ipc(e.to_string())),
                    Payload::Bytes(_) | Payload::Device(_) | Payload::Passed => {
                        Err(CallError::BadAnswer(
                            "answered a routed call with rows, not an event".into(),
                        ))
                    }
                }
            });
            match waited {
                Ok(()) => {
                    node.routed_calls.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    failed = true;
                    let reason = e.to_string();
                    if node_gone(&e) {
                        node.mark_down(&reason);
                    } else {
                        // The host path judges the node on its own terms (a node that no longer
                        // holds an expert is marked down there, one that cannot map the memory
                        // answers with bytes).
                        node.routed_ok.store(false, Ordering::Relaxed);
                        tracing::warn!(node = %node.label(), layer, error = %reason, "routed call failed: this node's layers go the host way from now on");
                    }
                }
            }
        }
        laps.lap(Stage::Decode);
        if failed {
            // A node that answered may still write into the buffer: it is not reused.
            stage.abandon();
            return self.forward_after_routed(layer, xs, routing, ctx);
        }
        let sums = stage.sums()?;
        laps.lap(Stage::Combine);
        Ok(sums)
    }

    /// The layer the host way after the routed path gave up on it (the usage is counted).
    fn forward_after_routed(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &DeviceRouting,
        ctx: &CallContext,
    ) -> Result<Tensor, ExpertError> {
        let routing = routing.to_routing(xs.device())?;
        self.forward(layer, xs, &routing, ctx)
    }

    /// The exchange of the coordinator's GPU, made on the first routed call.
    fn exchange(&self, device: &candle_core::Device) -> Result<Arc<RoutedExchange>, ExpertError> {
        let mut exchange = self.shared.routed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = exchange.as_ref() {
            return Ok(x.clone());
        }
        let made = Arc::new(RoutedExchange::new(device)?);
        *exchange = Some(made.clone());
        Ok(made)
    }
}

/// `layer`'s row of the routing table (`row[e]`: the holders of expert e) where its size allows
/// routed calls.
pub(super) fn routable_row(table: &[Vec<Vec<usize>>], layer: usize) -> Option<&[Vec<usize>]> {
    table
        .get(layer)
        .filter(|row| !row.is_empty() && row.len() <= ROUTED_MAX_EXPERTS)
        .map(Vec::as_slice)
}

/// What [`owners`] reads of a node.
pub(super) trait Candidate {
    fn routable(&self) -> bool;
    /// Whether it may take routed calls from a coordinator on the GPU `own_gpu`.
    fn takes_routed(&self, own_gpu: &[u8]) -> bool;
}

impl Candidate for Node {
    fn routable(&self) -> bool {
        Node::routable(self)
    }

    fn takes_routed(&self, own_gpu: &[u8]) -> bool {
        routed_capable(self, own_gpu)
    }
}

/// Each node of a layer's routed call with the experts it is counted on for, from the layer's
/// row of the table (`experts[e]`: indices into `nodes` of expert e's holders); `None` unless
/// every expert has exactly one routable holder and every such holder takes routed calls.
pub(super) fn owners<N: Candidate>(
    experts: &[Vec<usize>],
    nodes: &[Arc<N>],
    own_gpu: &[u8],
) -> Option<Vec<(usize, Vec<u32>)>> {
    let mut owned: Vec<Vec<u32>> = vec![Vec::new(); nodes.len()];
    for (expert, holders) in experts.iter().enumerate() {
        owned[owner(holders, nodes, own_gpu)?].push(expert as u32);
    }
    Some(
        owned
            .into_iter()
            .enumerate()
            .filter(|(_, experts)| !experts.is_empty())
            .collect(),
    )
}

/// The node that computes an expert held by `holders` on the routed path: its one routable
/// holder, if that takes routed calls.
fn owner<N: Candidate>(holders: &[usize], nodes: &[Arc<N>], own_gpu: &[u8]) -> Option<usize> {
    let mut live = holders.iter().filter(|&&h| nodes[h].routable());
    let owner = *live.next()?;
    (live.next().is_none() && nodes[owner].takes_routed(own_gpu)).then_some(owner)
}

/// Whether a routed call's failure says the node is gone (down until the health checks bring it
/// back), rather than that it cannot take routed calls. Exhaustive on purpose.
pub(super) fn node_gone(e: &CallError) -> bool {
    match e {
        CallError::Transport(_) | CallError::Timeout(_) | CallError::Hedged(_) => true,
        CallError::Status { code, .. } => *code == tonic::Code::Unavailable,
        CallError::BadAnswer(_) | CallError::Ipc(_) => false,
    }
}

/// A node that may take routed calls: on another GPU of this host (it has answered in GPU
/// memory, which lies elsewhere) and none of its routed calls failed. Nodes on the coordinator's
/// own GPU take the host path: processes on one GPU take turns on it, and every wait between
/// them on the GPU costs a time slice (a cluster of 2 such nodes went from 427 to 144 tok/s at
/// batch 32; BENCHMARKS.md, issue 15).
fn routed_capable(node: &Node, own_gpu: &[u8]) -> bool {
    node.routed_ok.load(Ordering::Relaxed)
        && node.ipc_ok.load(Ordering::Relaxed)
        && node.ipc_answers.load(Ordering::Relaxed) > 0
        && another_gpu(&node.gpu.lock().unwrap_or_else(|e| e.into_inner()), own_gpu)
}

/// Whether a node whose `Info.gpu_uuid` is `gpu` runs on a GPU other than the coordinator's
/// (`own_gpu`): empty (on none, or an older node) is not.
fn another_gpu(gpu: &[u8], own_gpu: &[u8]) -> bool {
    !gpu.is_empty() && gpu != own_gpu
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Candidate, another_gpu, owners};

    /// A node as [`owners`] sees it: up or not, and the GPU it runs on (empty: not on one).
    struct Fake {
        up: bool,
        gpu: &'static [u8],
    }

    impl Candidate for Fake {
        fn routable(&self) -> bool {
            self.up
        }

        fn takes_routed(&self, own_gpu: &[u8]) -> bool {
            another_gpu(self.gpu, own_gpu)
        }
    }

    fn nodes(list: &[(bool, &'static [u8])]) -> Vec<Arc<Fake>> {
        list.iter()
            .map(|&(up, gpu)| Arc::new(Fake { up, gpu }))
            .collect()
    }

    const OURS: &[u8] = b"gpu-0";

    #[test]
    fn each_expert_goes_to_its_one_live_holder_on_another_gpu() {
        let two = nodes(&[(true, b"gpu-1"), (true, b"gpu-2")]);
        // Experts 0 and 2 on node 0, 1 and 3 on node 1.
        let table = vec![vec![0], vec![1], vec![0], vec![1]];
        assert_eq!(
            owners(&table, &two, OURS),
            Some(vec![(0, vec![0, 2]), (1, vec![1, 3])])
        );
        // A node holding nothing of the layer gets no call.
        let three = nodes(&[(true, b"gpu-1"), (true, b"gpu-2"), (true, b"gpu-3")]);
        assert_eq!(
            owners(&table, &three, OURS),
            Some(vec![(0, vec![0, 2]), (1, vec![1, 3])])
        );
    }

    #[test]
    fn replicas_up_a_node_on_our_gpu_or_none_live_send_the_layer_the_host_way() {
        let table = vec![vec![0, 1], vec![1]];
        // Both replicas of expert 0 up: which would compute it is the host path's choice.
        assert_eq!(
            owners(&table, &nodes(&[(true, b"gpu-1"), (true, b"gpu-2")]), OURS),
            None
        );
        // One of them down: the other computes it.
        assert_eq!(
            owners(&table, &nodes(&[(false, b"gpu-1"), (true, b"gpu-2")]), OURS),
            Some(vec![(1, vec![0, 1])])
        );
        // The live holder shares the coordinator's GPU, or is on none.
        for gpu in [OURS, b"".as_slice()] {
            assert_eq!(
                owners(&table, &nodes(&[(false, b"gpu-1"), (true, gpu)]), OURS),
                None
            );
        }
        // No live holder at all.
        assert_eq!(
            owners(
                &table,
                &nodes(&[(false, b"gpu-1"), (false, b"gpu-2")]),
                OURS
            ),
            None
        );
    }
}
