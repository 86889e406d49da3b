//! Planning one round of a layer's call: the (token, expert, weight) assignments split into
//! one share per node — every expert's tokens to its live replica with the least outstanding
//! work, down and retired nodes skipped, the late node of a hedged call avoided — and, when no
//! replica is left, the error that names the nodes and why they are down.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use omnishard_model::{Assignment, ExpertError};

use super::membership::Node;

/// The share of one layer's work that goes to one node.
#[derive(Debug)]
pub(super) struct NodeShare {
    pub(super) node: usize,
    /// Global token indices of the hidden rows sent, in order.
    pub(super) tokens: Vec<u32>,
    /// Assignments with global token indices, in request order.
    pub(super) global: Vec<Assignment>,
    /// The same with indices into `tokens`.
    pub(super) local: Vec<Assignment>,
    /// The hidden rows were sent in the coordinator's GPU memory (CUDA IPC).
    pub(super) device_input: bool,
}

/// What [`plan`] reads of a node: whether it may be routed to, how busy it is, and for the error
/// when no replica is left, its name and why it is down. Read live, as the plan is made.
pub(super) trait Replica {
    fn routable(&self) -> bool;
    /// Assignments in flight to this node.
    fn outstanding(&self) -> u64;
    /// Assignments this node has answered.
    fn served(&self) -> u64;
    fn label(&self) -> String;
    fn last_error(&self) -> Option<String>;
}

impl Replica for Node {
    fn routable(&self) -> bool {
        Node::routable(self)
    }

    fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn label(&self) -> String {
        Node::label(self)
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Chooses, for every expert in `pending`, the live replica with the least outstanding work
/// (assignments in flight, counting those planned in this call; ties to the node that has
/// served least). All tokens of one expert go to one node, so each expert sees the same
/// batch wherever it lives.
///
/// `table` is `[layer][expert]` → indices into `nodes`; `failures` are the (node, reason) of the
/// calls that already failed in this layer's call, for the error when no replica is left;
/// `skip` is a node not to use (a late one whose work is being hedged).
pub(super) fn plan<N: Replica>(
    layer: usize,
    pending: &[Assignment],
    table: &[Vec<Vec<usize>>],
    nodes: &[Arc<N>],
    failures: &[(String, String)],
    skip: Option<usize>,
) -> Result<Vec<NodeShare>, ExpertError> {
    // Grouped by expert with a counting sort and tokens looked up by index, not hashed: a
    // batch-128 layer has 1,024 assignments, planned on the coordinator's critical path every
    // layer. `order[starts[e]..starts[e + 1]]` are expert e's assignments, in request order.
    let n_experts = pending
        .iter()
        .map(|a| a.expert as usize + 1)
        .max()
        .unwrap_or(0);
    let mut starts = vec![0usize; n_experts + 1];
    for a in pending {
        starts[a.expert as usize + 1] += 1;
    }
    for e in 0..n_experts {
        starts[e + 1] += starts[e];
    }
    let mut next = starts.clone();
    let mut order = vec![0u32; pending.len()];
    for (i, a) in pending.iter().enumerate() {
        let at = &mut next[a.expert as usize];
        order[*at] = i as u32;
        *at += 1;
    }
    let n_tokens = pending
        .iter()
        .map(|a| a.token as usize + 1)
        .max()
        .unwrap_or(0);
    let mut planned = vec![0u64; nodes.len()];
    let mut shares: Vec<Option<NodeShare>> = (0..nodes.len()).map(|_| None).collect();
    // Per node, each global token's index among the rows sent to it.
    let mut local_index: Vec<Vec<u32>> = vec![Vec::new(); nodes.len()];
    for expert in 0..n_experts {
        let group = &order[starts[expert]..starts[expert + 1]];
        if group.is_empty() {
            continue;
        }
        let expert = expert as u32;
        let holders = table
            .get(layer)
            .and_then(|row| row.get(expert as usize))
            .ok_or(ExpertError::NotHeld {
                layer,
                expert: expert as usize,
            })?;
        if holders.is_empty() {
            // Possible after nodes were retired by a placement reload.
            return Err(ExpertError::NoLiveHolder {
                layer,
                expert: expert as usize,
                reason: format!(
                    "no node in the cluster holds expert {expert}; add one that does (POST /admin/nodes or the placement file)"
                ),
            });
        }
        let best = holders
            .iter()
            .copied()
            .filter(|&i| Some(i) != skip && nodes[i].routable())
            .min_by_key(|&i| {
                let n = &nodes[i];
                (n.outstanding() + planned[i], n.served(), i)
            });
        let Some(node) = best else {
            return Err(no_replica(layer, expert, holders, nodes, failures));
        };
        planned[node] += group.len() as u64;
        let share = shares[node].get_or_insert_with(|| NodeShare {
            node,
            tokens: Vec::with_capacity(n_tokens),
            global: Vec::with_capacity(pending.len()),
            local: Vec::with_capacity(pending.len()),
            device_input: false,
        });
        let index = &mut local_index[node];
        if index.is_empty() {
            index.resize(n_tokens, u32::MAX);
        }
        for &i in group {
            let a = pending[i as usize];
            let slot = &mut index[a.token as usize];
            if *slot == u32::MAX {
                *slot = share.tokens.len() as u32;
                share.tokens.push(a.token);
            }
            share.global.push(a);
            share.local.push(Assignment { token: *slot, ..a });
        }
    }
    Ok(shares.into_iter().flatten().collect())
}

/// The error for an expert none of whose holders is up, naming them and why they are down.
fn no_replica<N: Replica>(
    layer: usize,
    expert: u32,
    holders: &[usize],
    nodes: &[Arc<N>],
    failures: &[(String, String)],
) -> ExpertError {
    if !failures.is_empty() {
        return ExpertError::Node {
            node: failures
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            layer,
            reason: format!(
                "{}; no live replica holds expert {expert}",
                failures
                    .iter()
                    .map(|(_, r)| r.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
    }
    let down: Vec<String> = holders
        .iter()
        .map(|&i| {
            let n = &nodes[i];
            format!(
                "{} is down ({})",
                n.label(),
                n.last_error().unwrap_or_else(|| "retired".into())
            )
        })
        .collect();
    ExpertError::Node {
        node: holders
            .iter()
            .map(|&i| nodes[i].label())
            .collect::<Vec<_>>()
            .join(", "),
        layer,
        reason: format!("no live replica holds expert {expert}: {}", down.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use omnishard_model::{Assignment, ExpertError};

    use super::{NodeShare, Replica, plan};

    /// A node as `plan` sees it.
    struct Fake {
        name: &'static str,
        up: bool,
        outstanding: u64,
        served: u64,
        last_error: Option<&'static str>,
    }

    impl Fake {
        fn up(name: &'static str, outstanding: u64, served: u64) -> Arc<Self> {
            let last_error = None;
            Arc::new(Fake {
                name,
                up: true,
                outstanding,
                served,
                last_error,
            })
        }

        fn down(name: &'static str, last_error: Option<&'static str>) -> Arc<Self> {
            Arc::new(Fake {
                name,
                up: false,
                outstanding: 0,
                served: 0,
                last_error,
            })
        }
    }

    impl Replica for Fake {
        fn routable(&self) -> bool {
            self.up
        }
        fn outstanding(&self) -> u64 {
            self.outstanding
        }
        fn served(&self) -> u64 {
            self.served
        }
        fn label(&self) -> String {
            self.name.to_string()
        }
        fn last_error(&self) -> Option<String> {
            self.last_error.map(String::from)
        }
    }

    fn a(token: u32, expert: u32) -> Assignment {
        Assignment {
            token,
            expert,
            weight: 0.5,
        }
    }

    /// One layer (layer 0) whose expert `e` is held by the nodes `holders[e]`.
    fn table(holders: &[&[usize]]) -> Vec<Vec<Vec<usize>>> {
        vec![holders.iter().map(|h| h.to_vec()).collect()]
    }

    /// (node, experts sent to it) of a plan, in node order.
    fn experts_by_node(shares: &[NodeShare]) -> Vec<(usize, Vec<u32>)> {
        shares
            .iter()
            .map(|s| {
                let mut experts: Vec<u32> = s.global.iter().map(|a| a.expert).collect();
                experts.dedup();
                (s.node, experts)
            })
            .collect()
    }

    #[test]
    fn each_expert_goes_to_the_replica_with_least_outstanding_work() {
        let nodes = [Fake::up("a", 5, 0), Fake::up("b", 2, 0)];
        let shares = plan(
            0,
            &[a(0, 0), a(1, 0)],
            &table(&[&[0, 1]]),
            &nodes,
            &[],
            None,
        )
        .unwrap();
        assert_eq!(experts_by_node(&shares), [(1, vec![0])]);

        // Work planned in this call counts: expert 0's three tokens make "a" the busier.
        let nodes = [Fake::up("a", 0, 0), Fake::up("b", 0, 0)];
        let pending = [a(0, 0), a(1, 0), a(2, 0), a(0, 1)];
        let shares = plan(0, &pending, &table(&[&[0, 1], &[0, 1]]), &nodes, &[], None).unwrap();
        assert_eq!(experts_by_node(&shares), [(0, vec![0]), (1, vec![1])]);

        // Equal work: the node that has served least, then the first.
        let nodes = [Fake::up("a", 1, 9), Fake::up("b", 1, 3)];
        let shares = plan(0, &[a(0, 0)], &table(&[&[0, 1]]), &nodes, &[], None).unwrap();
        assert_eq!(experts_by_node(&shares), [(1, vec![0])]);
    }

    #[test]
    fn down_nodes_are_skipped() {
        let nodes = [Fake::down("a", Some("reset")), Fake::up("b", 100, 100)];
        let shares = plan(
            0,
            &[a(0, 0), a(0, 1)],
            &table(&[&[0, 1], &[1, 0]]),
            &nodes,
            &[],
            None,
        )
        .unwrap();
        assert_eq!(experts_by_node(&shares), [(1, vec![0, 1])]);
        // A node being hedged away from is skipped like a down one.
        let nodes = [Fake::up("a", 0, 0), Fake::up("b", 100, 100)];
        let shares = plan(0, &[a(0, 0)], &table(&[&[0, 1]]), &nodes, &[], Some(0)).unwrap();
        assert_eq!(experts_by_node(&shares), [(1, vec![0])]);
    }

    #[test]
    fn a_share_sends_each_token_once_and_keeps_request_order() {
        let nodes = [Fake::up("a", 0, 0)];
        let pending = [a(4, 2), a(7, 0), a(4, 0), a(9, 2)];
        let shares = plan(0, &pending, &table(&[&[0], &[], &[0]]), &nodes, &[], None).unwrap();
        let [share] = &shares[..] else {
            panic!("{shares:?}")
        };
        // Experts ascending, each expert's tokens in the order routed.
        assert_eq!(share.global, [a(7, 0), a(4, 0), a(4, 2), a(9, 2)]);
        assert_eq!(share.tokens, [7, 4, 9]);
        let local: Vec<(u32, u32)> = share.local.iter().map(|x| (x.token, x.expert)).collect();
        assert_eq!(local, [(0, 0), (1, 0), (1, 2), (2, 2)]);
    }

    #[test]
    fn an_expert_no_node_holds_names_the_fix() {
        let nodes = [Fake::up("a", 0, 0)];
        let err = plan(0, &[a(0, 1)], &table(&[&[0], &[]]), &nodes, &[], None).unwrap_err();
        assert!(
            matches!(
                err,
                ExpertError::NoLiveHolder {
                    layer: 0,
                    expert: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "layer 0: expert 1 has no live node: no node in the cluster holds expert 1; add one that does (POST /admin/nodes or the placement file)"
        );
        // Beyond the table: not held.
        let err = plan(0, &[a(0, 9)], &table(&[&[0]]), &nodes, &[], None).unwrap_err();
        assert_eq!(err.to_string(), "expert 9 of layer 0 is not held here");
    }

    #[test]
    fn an_expert_with_no_live_replica_names_its_nodes_and_why() {
        let nodes = [
            Fake::down("a", Some("Internal: oom")),
            Fake::down("b", None),
        ];
        let t = table(&[&[0, 1]]);
        let err = plan(
            3,
            &[a(0, 0)],
            &[vec![], vec![], vec![], t[0].clone()],
            &nodes,
            &[],
            None,
        );
        assert_eq!(
            err.unwrap_err().to_string(),
            "expert node a, b failed on layer 3: no live replica holds expert 0: a is down (Internal: oom); b is down (retired)"
        );
        // Within a call, the failures of this call are what the caller needs to hear.
        let failures = [(
            "a".to_string(),
            "no answer within the 10 ms deadline".to_string(),
        )];
        let err = plan(0, &[a(0, 0)], &t, &nodes, &failures, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expert node a failed on layer 0: no answer within the 10 ms deadline; no live replica holds expert 0"
        );
    }
}
