//! Who is in the cluster and what they hold: the nodes (each admitted by `admission.rs`), adding
//! and retiring them, and the routing table `[layer][expert]` → nodes holding it (re-admission and
//! the background health loop are `health.rs`).
//!
//! Nodes are only ever appended to the list (a removed node is *retired*, not dropped), so an
//! index into it stays valid for as long as the cluster lives; the table is rebuilt whenever
//! membership changes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::DType;
use futures::future::join_all;
use omnishard_model::ops::cuda::{IpcImporter, IpcStaging, RoutedExchange};
use omnishard_proto::ModelConfig;

use super::admission::connect_node;
use super::client::NodeClient;
use super::{ClusterError, NodeStatus, RemoteExperts, RemoteOptions, Runtime, describe_pairs};

/// `[layer][expert]` → indices into the node list of the nodes holding it (up or down).
pub(super) type Table = Vec<Vec<Vec<usize>>>;

/// One member of the cluster: its client and what the coordinator knows about it.
pub(super) struct Node {
    pub(super) rpc: NodeClient,
    /// Routed to; cleared when a call fails, set again by the health checker.
    pub(super) up: AtomicBool,
    /// Removed from the cluster (placement reload); never routed to again.
    pub(super) retired: AtomicBool,
    /// Assignments sent and not yet answered: the "outstanding work" replicas are chosen by.
    pub(super) outstanding: AtomicU64,
    /// Assignments this node has answered, and calls that failed.
    pub(super) served: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) last_error: Mutex<Option<String>>,
    /// This node's latency per call size, for hedging.
    pub(super) latency: Mutex<super::hedge::LatencyModel>,
    pub(super) held: Mutex<Vec<(usize, usize)>>,
    /// The `Info.instance_id` of the process last admitted at this address.
    pub(super) instance: Mutex<String>,
    /// Its `Info.gpu_uuid` (empty: not on a GPU, or an older node).
    pub(super) gpu: Mutex<Vec<u8>>,
    /// A process whose experts failed the probe, with the reason: refused again without a
    /// new probe until another process answers at the address.
    pub(super) failed_probe: Mutex<Option<(String, String)>>,
    /// The node's answers in its GPU memory, mapped here (CUDA IPC), and whether to ask for
    /// them: cleared for good when one could not be copied out.
    pub(super) ipc: IpcImporter,
    pub(super) ipc_ok: AtomicBool,
    pub(super) ipc_answers: AtomicU64,
    pub(super) ipc_requests: AtomicU64,
    /// Whether to send this node routed calls (`routed.rs`): cleared for good when one fails
    /// other than by the node going down; and how many it has answered.
    pub(super) routed_ok: AtomicBool,
    pub(super) routed_calls: AtomicU64,
    /// Calls answered through the shared-memory lane.
    pub(super) lane_calls: AtomicU64,
}

impl Node {
    pub(super) fn label(&self) -> String {
        self.rpc.label()
    }

    fn held_count(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(super) fn status(&self) -> NodeStatus {
        NodeStatus {
            name: self.rpc.name.clone(),
            address: self.rpc.address.clone(),
            up: self.up.load(Ordering::Acquire),
            retired: self.retired.load(Ordering::Acquire),
            experts: self.held_count(),
            assignments: self.served.load(Ordering::Relaxed),
            gpu_memory_answers: self.ipc_answers.load(Ordering::Relaxed),
            gpu_memory_requests: self.ipc_requests.load(Ordering::Relaxed),
            gpu_routed_calls: self.routed_calls.load(Ordering::Relaxed),
            lane_calls: self.lane_calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            outstanding: self.outstanding.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    pub(super) fn routable(&self) -> bool {
        self.up.load(Ordering::Acquire) && !self.retired.load(Ordering::Acquire)
    }

    /// A down node that answered but was refused re-admission: the reason is shown in
    /// `/admin/nodes` and logged whenever it changes (not every health interval).
    pub(super) fn refused(&self, reason: &str) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() != Some(reason) {
            tracing::warn!(node = %self.label(), %reason, "expert node not re-admitted");
            *last = Some(reason.to_string());
        }
    }

    pub(super) fn mark_down(&self, reason: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(node = %self.label(), %reason, "expert node marked down; its experts go to replicas");
        }
    }
}

pub(super) struct Shared {
    pub(super) cfg: ModelConfig,
    pub(super) fingerprint: String,
    pub(super) dtype: DType,
    pub(super) opts: RemoteOptions,
    nodes: RwLock<Vec<Arc<Node>>>,
    table: RwLock<Arc<Table>>,
    /// Where layer calls spend their time (`coordinator bench` prints it).
    pub(super) profile: super::profile::CallProfile,
    /// GPU memory the hidden states are sent in to nodes that read it (CUDA IPC).
    pub(super) staging: IpcStaging,
    /// The buffers and event of routed calls (`routed.rs`), made on the first one.
    pub(super) routed: Mutex<Option<Arc<RoutedExchange>>>,
    /// The UUID of the coordinator's GPU, learnt from the first layer call on one.
    pub(super) own_gpu: std::sync::OnceLock<Vec<u8>>,
    /// Set for good when this GPU cannot take routed calls at all (no interprocess events).
    pub(super) routed_off: AtomicBool,
    /// Routed passes of batch-1 steps (`pass.rs`).
    pub(super) pass: super::pass::PassState,
}

impl Shared {
    /// The nodes as of now (joining nodes are appended; none is ever removed).
    pub(super) fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The routing table as of now. Read it before [`Shared::nodes`]: nodes are only ever
    /// appended, so every index it holds is then valid in the node list.
    pub(super) fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn find(&self, address: &str) -> Option<Arc<Node>> {
        self.nodes().into_iter().find(|n| n.rpc.address == address)
    }

    pub(super) fn rebuild_table(&self) {
        let table = build_table(&self.cfg, &self.nodes());
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }
}

fn build_table(cfg: &ModelConfig, nodes: &[Arc<Node>]) -> Table {
    let mut table = vec![vec![Vec::new(); cfg.num_experts]; cfg.num_hidden_layers];
    for (i, node) in nodes.iter().enumerate() {
        if node.retired.load(Ordering::Acquire) {
            continue;
        }
        for &(l, e) in node.held.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            table[l][e].push(i);
        }
    }
    table
}

impl RemoteExperts {
    /// Connects to every node, checks it, and builds the routing table. Returns the experts and
    /// the (layer, expert) pairs no node serves (empty unless `allow_missing`).
    pub fn connect(
        addresses: &[String],
        cfg: &ModelConfig,
        fingerprint: &str,
        dtype: DType,
        opts: RemoteOptions,
        allow_missing: bool,
    ) -> Result<(Self, Vec<(usize, usize)>), ClusterError> {
        let (experts, missing) =
            Self::connect_unwatched(addresses, cfg, fingerprint, dtype, opts, allow_missing)?;
        experts
            .runtime
            .handle()
            .spawn(super::health::health_loop(Arc::downgrade(&experts.shared)));
        Ok((experts, missing))
    }

    /// [`RemoteExperts::connect`] without the background health loop (which unit tests keep out
    /// of the way: it would re-admit a node they just saw fail).
    pub(super) fn connect_unwatched(
        addresses: &[String],
        cfg: &ModelConfig,
        fingerprint: &str,
        dtype: DType,
        opts: RemoteOptions,
        allow_missing: bool,
    ) -> Result<(Self, Vec<(usize, usize)>), ClusterError> {
        if addresses.is_empty() {
            return Err(ClusterError::NoNodes);
        }
        let runtime = Runtime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("omnishard-rpc")
                .enable_all()
                .build()
                .map_err(ClusterError::Runtime)?,
        ));
        let connects = addresses
            .iter()
            .map(|a| connect_node(a.clone(), cfg, fingerprint, dtype, &opts));
        let results = runtime.handle().block_on(join_all(connects));
        let mut nodes = Vec::with_capacity(results.len());
        for result in results {
            nodes.push(Arc::new(result?));
        }
        let table = build_table(cfg, &nodes);
        let missing: Vec<(usize, usize)> = cfg
            .expert_pairs()
            .into_iter()
            .filter(|&(l, e)| table[l][e].is_empty())
            .collect();
        if !missing.is_empty() {
            let list = describe_pairs(&missing);
            if !allow_missing {
                return Err(ClusterError::MissingExperts {
                    count: missing.len(),
                    total: cfg.expert_pairs().len(),
                    list,
                });
            }
            tracing::warn!(
                count = missing.len(),
                "--allow-missing-experts: these experts are served by no node and are MASKED OUT of the router; output differs from the full model: {list}"
            );
        }
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            fingerprint: fingerprint.to_string(),
            dtype,
            opts,
            nodes: RwLock::new(nodes),
            table: RwLock::new(Arc::new(table)),
            profile: Default::default(),
            staging: IpcStaging::new(),
            routed: Mutex::default(),
            own_gpu: std::sync::OnceLock::new(),
            routed_off: AtomicBool::new(false),
            pass: super::pass::PassState::default(),
        });
        Ok((Self { shared, runtime }, missing))
    }

    /// The (layer, expert) pairs that some node was placed to hold but no live one holds now
    /// (pairs masked out at start-up, with no holder at all, are not counted).
    pub fn uncovered(&self) -> Vec<(usize, usize)> {
        let table = self.shared.table();
        let nodes = self.shared.nodes();
        let live = |&i: &usize| nodes.get(i).is_some_and(|n| n.routable());
        let mut out = Vec::new();
        for (layer, experts) in table.iter().enumerate() {
            for (expert, holders) in experts.iter().enumerate() {
                if !holders.is_empty() && !holders.iter().any(live) {
                    out.push((layer, expert));
                }
            }
        }
        out
    }

    /// The names of the nodes that hold each (layer, expert), indexed `[layer][expert]`.
    pub fn holders(&self) -> Vec<Vec<Vec<String>>> {
        let table = self.shared.table();
        let nodes = self.shared.nodes();
        table
            .iter()
            .map(|experts| {
                experts
                    .iter()
                    .map(|held| {
                        held.iter()
                            .filter_map(|&i| nodes.get(i).map(|n| n.status().name))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// Where layer calls spent their time since the last take (then starts again).
    pub fn take_profile(&self) -> super::ProfileSummary {
        self.shared.profile.take()
    }

    /// Every node with its state, in the order added.
    pub fn status(&self) -> Vec<NodeStatus> {
        self.shared.nodes().iter().map(|n| n.status()).collect()
    }

    /// Adds a node to the running cluster (or brings a retired one back): it is connected to,
    /// its fingerprint and dtype checked, and it takes its share of traffic from the next call.
    pub fn add_node(&self, address: &str) -> Result<NodeStatus, ClusterError> {
        let existing = self.shared.find(address);
        if let Some(node) = existing {
            let (cfg, fp, dtype, opts) = (
                &self.shared.cfg,
                &self.shared.fingerprint,
                self.shared.dtype,
                &self.shared.opts,
            );
            let readmitted = self.block_on(super::health::readmit(&node, cfg, fp, dtype, opts));
            if let Err(reason) = readmitted {
                return Err(ClusterError::Unreachable {
                    address: address.to_string(),
                    reason,
                });
            }
            node.retired.store(false, Ordering::Release);
            self.shared.rebuild_table();
            return Ok(node.status());
        }
        let opts = RemoteOptions {
            startup_timeout: self.shared.opts.rpc_timeout,
            ..self.shared.opts.clone()
        };
        let node = self.block_on(connect_node(
            address.to_string(),
            &self.shared.cfg,
            &self.shared.fingerprint,
            self.shared.dtype,
            &opts,
        ))?;
        let node = Arc::new(node);
        self.shared
            .nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(node.clone());
        self.shared.rebuild_table();
        tracing::info!(node = %node.label(), experts = node.held_count(), "expert node joined");
        Ok(node.status())
    }

    /// Makes the cluster's membership `addresses`: new ones join, absent ones are retired.
    /// Returns the addresses that could not join, with the reason.
    /// Takes the node at `address` out of the cluster: no new call is routed to it (calls in
    /// flight finish), and its experts go to their other replicas. `None` for an address that is
    /// not a member (or already retired).
    pub fn retire_node(&self, address: &str) -> Option<NodeStatus> {
        let node = self.shared.find(address)?;
        if node.retired.swap(true, Ordering::AcqRel) {
            return None;
        }
        tracing::warn!(node = %node.label(), "expert node retired by an administrator");
        self.shared.rebuild_table();
        Some(node.status())
    }

    pub fn sync_addresses(&self, addresses: &[String]) -> Vec<(String, String)> {
        let mut failures = Vec::new();
        for address in addresses {
            let known = self.shared.find(address);
            if known
                .as_ref()
                .is_some_and(|n| !n.retired.load(Ordering::Acquire))
            {
                continue;
            }
            if let Err(e) = self.add_node(address) {
                failures.push((address.clone(), e.to_string()));
            }
        }
        for node in self.shared.nodes() {
            if !addresses.contains(&node.rpc.address) && !node.retired.swap(true, Ordering::AcqRel)
            {
                tracing::warn!(node = %node.label(), "expert node retired (not in the reloaded placement)");
            }
        }
        self.shared.rebuild_table();
        failures
    }
}
