//! Placement planning: which node holds which (layer, expert), balanced by bytes and, given
//! recorded usage statistics, by expected load, replicating the most-used experts.
//!
//! Layers run one after another, so a layer's slowest node sets its pace: every MoE layer is
//! balanced on its own. Per layer, an expert with load `w` in `c` copies puts `w / c` on each
//! holder (the coordinator spreads an expert's tokens over its replicas by outstanding work).
//! Copies are assigned longest-processing-time first (Graham 1969) to the node with the least
//! load in that layer, ties to the node with the fewest bytes; while the heaviest node is more
//! than `tolerance` over the mean, the hottest expert on it gets one more copy, up to
//! `max_replicas` and the memory budget.

pub mod command;

use std::collections::BTreeMap;
use std::fmt::Write;

use omnishard_proto::ModelConfig;
use omnishard_proto::placement::ranges_by_layer;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("need at least one node")]
    NoNodes,
    #[error("--replicas must be at least 1")]
    NoReplicas,
    #[error(
        "not enough memory: one copy of every expert needs {needed} bytes, {nodes} nodes × {per_node} bytes give {have}; add nodes or memory"
    )]
    Memory {
        needed: u64,
        nodes: usize,
        per_node: u64,
        have: u64,
    },
    #[error("layer {0} expert {1} found no node with room; add nodes or memory")]
    Unplaced(usize, usize),
}

#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub nodes: usize,
    /// Most copies of any one expert.
    pub max_replicas: usize,
    pub memory_per_node: Option<u64>,
    /// Bytes one expert occupies on a node.
    pub expert_bytes: u64,
    /// Recorded load per (layer, expert); absent pairs count as unused. `None`: uniform.
    pub load: Option<BTreeMap<(usize, usize), f64>>,
    /// Accepted excess of the heaviest node over the mean, per layer (e.g. 0.05).
    pub tolerance: f64,
}

#[derive(Debug, Clone)]
pub struct PlannedNode {
    pub pairs: Vec<(usize, usize)>,
    pub bytes: u64,
    /// Expected load, summed over layers.
    pub load: f64,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub nodes: Vec<PlannedNode>,
    /// Copies per (layer, expert).
    pub copies: BTreeMap<(usize, usize), usize>,
}

impl Plan {
    /// (max, mean) of the nodes' expected load.
    pub fn load_spread(&self) -> (f64, f64) {
        let loads: Vec<f64> = self.nodes.iter().map(|n| n.load).collect();
        let max = loads.iter().copied().fold(0.0, f64::max);
        (max, loads.iter().sum::<f64>() / loads.len().max(1) as f64)
    }

    /// The placement file; node i is named `node-i` and reached at `addresses[i]`.
    pub fn to_toml(&self, addresses: &[String]) -> String {
        let (max, mean) = self.load_spread();
        let mut out = format!(
            "# Written by `coordinator plan`: {} nodes, expected load max/mean {:.3}.\n",
            self.nodes.len(),
            if mean > 0.0 { max / mean } else { 1.0 }
        );
        for (i, node) in self.nodes.iter().enumerate() {
            let specs: Vec<String> = ranges_by_layer(&node.pairs)
                .into_iter()
                .flat_map(|(l, _, ranges)| ranges.into_iter().map(move |r| format!("\"{l}:{r}\"")))
                .collect();
            let _ = write!(
                out,
                "\n# {} experts, {} bytes, expected load {:.1}\n[[node]]\nname = \"node-{i}\"\naddress = \"{}\"\nexperts = [{}]\n",
                node.pairs.len(),
                node.bytes,
                node.load,
                addresses[i],
                specs.join(", ")
            );
        }
        out
    }
}

pub fn plan(cfg: &ModelConfig, req: &PlanRequest) -> Result<Plan, PlanError> {
    let n = req.nodes;
    if n == 0 {
        return Err(PlanError::NoNodes);
    }
    if req.max_replicas == 0 {
        return Err(PlanError::NoReplicas);
    }
    let pairs = cfg.expert_pairs();
    let needed = pairs.len() as u64 * req.expert_bytes;
    let capacity = req.memory_per_node.map(|m| m / req.expert_bytes.max(1));
    if let (Some(per_node), Some(cap)) = (req.memory_per_node, capacity)
        && cap.saturating_mul(n as u64) < pairs.len() as u64
    {
        return Err(PlanError::Memory {
            needed,
            nodes: n,
            per_node,
            have: per_node.saturating_mul(n as u64),
        });
    }
    let load = |l: usize, e: usize| match &req.load {
        Some(map) => map.get(&(l, e)).copied().unwrap_or(0.0),
        None => 1.0,
    };
    let max_copies = req.max_replicas.min(n);
    let mut held: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n];
    let mut node_load = vec![0.0f64; n];
    let mut copies = BTreeMap::new();
    let moe_layers = cfg.moe_layers();
    for (done_layers, &layer) in moe_layers.iter().enumerate() {
        // First copies of the layers after this one must still fit when replicas are added.
        let reserved = ((moe_layers.len() - done_layers - 1) * cfg.num_experts) as u64;
        let w: Vec<f64> = (0..cfg.num_experts).map(|e| load(layer, e)).collect();
        let mut c = vec![1usize; cfg.num_experts];
        let assignment = loop {
            let a = assign_layer(&w, &c, n, &held, capacity);
            let mean = w.iter().sum::<f64>() / n as f64;
            let (heaviest, max) =
                a.loads
                    .iter()
                    .copied()
                    .enumerate()
                    .fold(
                        (0, 0.0),
                        |best, (i, l)| if l > best.1 { (i, l) } else { best },
                    );
            if max <= mean * (1.0 + req.tolerance) {
                break a;
            }
            // One more copy of the hottest expert on the heaviest node, if allowed and it fits.
            let total_copies: u64 =
                held.iter().map(|h| h.len() as u64).sum::<u64>() + c.iter().sum::<usize>() as u64;
            let room =
                capacity.is_none_or(|cap| total_copies + reserved < cap.saturating_mul(n as u64));
            let candidate = a.experts_of[heaviest]
                .iter()
                .copied()
                .filter(|&e| c[e] < max_copies)
                .max_by(|&x, &y| (w[x] / c[x] as f64).total_cmp(&(w[y] / c[y] as f64)));
            match candidate {
                Some(e) if room && w[e] > 0.0 => c[e] += 1,
                _ => break a,
            }
        };
        for (node, experts) in assignment.experts_of.iter().enumerate() {
            held[node].extend(experts.iter().map(|&e| (layer, e)));
            node_load[node] += assignment.loads[node];
        }
        for (e, &copies_e) in c.iter().enumerate() {
            copies.insert((layer, e), copies_e);
        }
    }
    let placed: std::collections::HashSet<&(usize, usize)> = held.iter().flatten().collect();
    if let Some(&lost) = pairs.iter().find(|p| !placed.contains(p)) {
        return Err(PlanError::Unplaced(lost.0, lost.1));
    }
    Ok(Plan {
        nodes: held
            .into_iter()
            .zip(node_load)
            .map(|(mut pairs, load)| {
                pairs.sort_unstable();
                PlannedNode {
                    bytes: pairs.len() as u64 * req.expert_bytes,
                    pairs,
                    load,
                }
            })
            .collect(),
        copies,
    })
}

struct LayerAssignment {
    experts_of: Vec<Vec<usize>>,
    loads: Vec<f64>,
}

/// LPT assignment of one layer's expert copies to nodes, given what the nodes already hold.
fn assign_layer(
    w: &[f64],
    c: &[usize],
    n: usize,
    held: &[Vec<(usize, usize)>],
    capacity: Option<u64>,
) -> LayerAssignment {
    let mut items: Vec<(usize, f64)> = (0..w.len())
        .flat_map(|e| std::iter::repeat_n((e, w[e] / c[e] as f64), c[e]))
        .collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut experts_of: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut loads = vec![0.0f64; n];
    for (e, share) in items {
        let best = (0..n)
            .filter(|&i| !experts_of[i].contains(&e))
            .filter(|&i| {
                capacity.is_none_or(|cap| ((held[i].len() + experts_of[i].len()) as u64) < cap)
            })
            .min_by(|&a, &b| {
                loads[a]
                    .total_cmp(&loads[b])
                    .then(
                        (held[a].len() + experts_of[a].len())
                            .cmp(&(held[b].len() + experts_of[b].len())),
                    )
                    .then(a.cmp(&b))
            });
        // With a memory cap every node may be full for an extra copy: then that copy is dropped;
        // plan() reserves room for first copies and refuses a plan that lost one.
        if let Some(i) = best {
            experts_of[i].push(e);
            loads[i] += share;
        }
    }
    LayerAssignment { experts_of, loads }
}

/// Reads the `experts` list of a `/v1/stats` document into a load map.
pub fn load_from_stats(json: &serde_json::Value) -> Result<BTreeMap<(usize, usize), f64>, String> {
    let experts = json
        .get("experts")
        .and_then(|v| v.as_array())
        .ok_or("the stats file has no \"experts\" list (save GET /v1/stats)")?;
    let mut map = BTreeMap::new();
    for (i, e) in experts.iter().enumerate() {
        let get = |k: &str| {
            e.get(k)
                .and_then(|v| v.as_u64())
                .ok_or(format!("experts[{i}].{k} is missing or not a number"))
        };
        map.insert(
            (get("layer")? as usize, get("expert")? as usize),
            get("assignments")? as f64,
        );
    }
    Ok(map)
}

/// "123", "64GiB", "1.5GB", "512MiB" → bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 64GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, MB, GB, MiB, GiB, ...)"
            ));
        }
    };
    Ok((num * mult) as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Qwen3-30B-A3B's expert shape: 48 layers of 128 experts, top-8.
    pub(crate) fn real_shape() -> ModelConfig {
        let json = serde_json::json!({
            "model_type": "qwen3_moe", "vocab_size": 16, "hidden_size": 2048, "num_hidden_layers": 48,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768
        });
        ModelConfig::from_json(&json.to_string(), std::path::Path::new("config.json")).unwrap()
    }

    /// Zipf-like usage, a different hot set per layer, ~29 experts doing most of the work.
    fn skewed(cfg: &ModelConfig) -> BTreeMap<(usize, usize), f64> {
        let mut map = BTreeMap::new();
        for l in cfg.moe_layers() {
            for e in 0..cfg.num_experts {
                let rank = (e * 37 + l * 11) % cfg.num_experts;
                map.insert((l, e), 10_000.0 / (rank as f64 + 1.0).powf(1.5));
            }
        }
        map
    }

    fn request(load: Option<BTreeMap<(usize, usize), f64>>, replicas: usize) -> PlanRequest {
        PlanRequest {
            nodes: 4,
            max_replicas: replicas,
            memory_per_node: None,
            expert_bytes: 3 * 2048 * 768 * 2,
            load,
            tolerance: 0.05,
        }
    }

    #[test]
    fn uniform_plan_balances_bytes_and_covers_everything_once() {
        let cfg = real_shape();
        let p = plan(&cfg, &request(None, 1)).unwrap();
        let bytes: Vec<u64> = p.nodes.iter().map(|n| n.bytes).collect();
        assert!(bytes.iter().all(|&b| b == bytes[0]), "{bytes:?}");
        let mut all: Vec<_> = p.nodes.iter().flat_map(|n| n.pairs.clone()).collect();
        all.sort();
        assert_eq!(all, cfg.expert_pairs());
    }

    #[test]
    fn skewed_statistics_are_balanced_by_replicating_hot_experts() {
        let cfg = real_shape();
        let load = skewed(&cfg);
        let eight = |replicas| PlanRequest {
            nodes: 8,
            ..request(Some(load.clone()), replicas)
        };
        let single = plan(&cfg, &eight(1)).unwrap();
        let (max1, mean1) = single.load_spread();
        let p = plan(&cfg, &eight(4)).unwrap();
        let (max, mean) = p.load_spread();
        eprintln!(
            "8 nodes, skewed usage: max/mean {:.3} with one copy each, {:.3} with up to 4",
            max1 / mean1,
            max / mean
        );
        assert!(max <= mean * 1.10, "max {max} mean {mean}");
        assert!(
            max1 > mean1 * 1.10,
            "the statistics should be skewed enough to need replicas"
        );
        assert!(p.copies.values().any(|&c| c > 1));
        // Every expert still has a copy somewhere.
        for pair in cfg.expert_pairs() {
            assert!(
                p.nodes.iter().any(|n| n.pairs.contains(&pair)),
                "{pair:?} lost"
            );
        }
    }

    #[test]
    fn memory_budget_is_respected_or_refused() {
        let cfg = real_shape();
        let bytes = 3 * 2048 * 768 * 2u64;
        let mut req = request(Some(skewed(&cfg)), 4);
        req.memory_per_node = Some(1600 * bytes);
        let p = plan(&cfg, &req).unwrap();
        assert!(p.nodes.iter().all(|n| n.bytes <= 1600 * bytes));
        // Replicas of early layers must not crowd out first copies of later ones.
        for pair in cfg.expert_pairs() {
            assert!(
                p.nodes.iter().any(|n| n.pairs.contains(&pair)),
                "{pair:?} lost"
            );
        }
        assert!(
            p.copies.values().any(|&c| c > 1),
            "the spare room should hold some replicas"
        );
        req.memory_per_node = Some(1000 * bytes);
        assert!(matches!(plan(&cfg, &req), Err(PlanError::Memory { .. })));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("64GiB").unwrap(), 64 << 30);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("123").unwrap(), 123);
        assert!(parse_bytes("12 parsecs").is_err());
    }
}
