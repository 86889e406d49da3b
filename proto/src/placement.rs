//! Which expert node holds which (layer, expert) pairs: even shards (`--shard I/N`) and placement
//! files (TOML), validated once against the model config.
//!
//! ```toml
//! [[node]]
//! name = "a"                  # unique
//! address = "10.0.0.1:50051"  # host:port the coordinator dials
//! experts = ["*:0-63", "5:64"] # LAYER:EXPERT, each a number, an inclusive range a-b, or *
//! ```
//! `*` as a layer means every MoE layer. An expert may be listed on several nodes (replicas).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ModelConfig;

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("cannot read placement file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("placement file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("invalid --shard {value:?}: {reason} (expected I/N with 0 <= I < N, e.g. 0/4)")]
    Shard { value: String, reason: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementToml {
    node: Vec<NodeToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeToml {
    name: String,
    address: String,
    experts: Vec<String>,
}

/// One node of a placement, with its expert set expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedNode {
    pub name: String,
    pub address: String,
    /// (layer, expert), sorted and unique.
    pub pairs: Vec<(usize, usize)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub nodes: Vec<PlacedNode>,
}

/// `"I/N"` → (I, N).
pub fn parse_shard(value: &str) -> Result<(usize, usize), PlacementError> {
    let err = |reason: &str| PlacementError::Shard {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let (i, n) = value.split_once('/').ok_or_else(|| err("no '/'"))?;
    let i: usize = i.trim().parse().map_err(|_| err("I is not a number"))?;
    let n: usize = n.trim().parse().map_err(|_| err("N is not a number"))?;
    if n == 0 || i >= n {
        return Err(err("need 0 <= I < N"));
    }
    Ok((i, n))
}

/// The pairs of shard `index` of `count`: pair p of [`ModelConfig::expert_pairs`] goes to shard
/// `p % count`, so every shard holds an even share of every layer and a layer's fan-out reaches
/// all shards in parallel.
pub fn shard_pairs(cfg: &ModelConfig, index: usize, count: usize) -> Vec<(usize, usize)> {
    cfg.expert_pairs()
        .into_iter()
        .enumerate()
        .filter(|(p, _)| p % count.max(1) == index)
        .map(|(_, pair)| pair)
        .collect()
}

/// Sorted (layer, expert) pairs grouped by layer, each layer's experts written as the
/// inclusive ranges of the placement syntax ("0", "5-7"), with the layer's expert count.
/// The inverse of what [`Placement::from_toml`] expands.
pub fn ranges_by_layer(pairs: &[(usize, usize)]) -> Vec<(usize, usize, Vec<String>)> {
    let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(l, e) in pairs {
        by_layer.entry(l).or_default().push(e);
    }
    by_layer
        .into_iter()
        .map(|(l, experts)| {
            let mut ranges = Vec::new();
            let mut i = 0;
            while i < experts.len() {
                let start = experts[i];
                while i + 1 < experts.len() && experts[i + 1] == experts[i] + 1 {
                    i += 1;
                }
                ranges.push(if experts[i] == start {
                    start.to_string()
                } else {
                    format!("{start}-{}", experts[i])
                });
                i += 1;
            }
            (l, experts.len(), ranges)
        })
        .collect()
}

/// Parses "a", "a-b" or "*" into the values it names, each below `limit`.
fn parse_set(spec: &str, all: &[usize], limit: usize) -> Result<Vec<usize>, String> {
    let spec = spec.trim();
    if spec == "*" {
        return Ok(all.to_vec());
    }
    let (lo, hi) = match spec.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (spec, spec),
    };
    let lo: usize = lo
        .parse()
        .map_err(|_| format!("{spec:?} is not a number, a range a-b or *"))?;
    let hi: usize = hi
        .parse()
        .map_err(|_| format!("{spec:?} is not a number, a range a-b or *"))?;
    if lo > hi {
        return Err(format!("range {spec:?} is empty"));
    }
    if hi >= limit {
        return Err(format!("{hi} is out of range (must be below {limit})"));
    }
    Ok((lo..=hi).collect())
}

impl Placement {
    pub fn from_file(path: &Path, cfg: &ModelConfig) -> Result<Self, PlacementError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlacementError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path, cfg)
    }

    pub fn from_toml(text: &str, path: &Path, cfg: &ModelConfig) -> Result<Self, PlacementError> {
        let invalid = |reason: String| PlacementError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let file: PlacementToml = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if file.node.is_empty() {
            return Err(invalid("no [[node]] entries".into()));
        }
        let moe_layers = cfg.moe_layers();
        let all_experts: Vec<usize> = (0..cfg.num_experts).collect();
        let mut names = BTreeSet::new();
        let mut nodes = Vec::with_capacity(file.node.len());
        for node in file.node {
            if node.name.trim().is_empty() {
                return Err(invalid("a node has an empty name".into()));
            }
            if !names.insert(node.name.clone()) {
                return Err(invalid(format!("node name {:?} appears twice", node.name)));
            }
            if let Err(e) = crate::address::check_node_address(&node.address) {
                return Err(invalid(format!("node {:?}: {e}", node.name)));
            }
            let mut pairs = BTreeSet::new();
            for spec in &node.experts {
                let ctx = |e: String| {
                    invalid(format!("node {:?}, experts entry {spec:?}: {e}", node.name))
                };
                let (layers, experts) = spec
                    .split_once(':')
                    .ok_or_else(|| ctx("expected LAYER:EXPERT".into()))?;
                let layers = parse_set(layers, &moe_layers, cfg.num_hidden_layers).map_err(ctx)?;
                if let Some(l) = layers.iter().find(|l| !moe_layers.contains(l)) {
                    return Err(ctx(format!("layer {l} has a dense MLP, not experts")));
                }
                let experts = parse_set(experts, &all_experts, cfg.num_experts).map_err(ctx)?;
                for &l in &layers {
                    pairs.extend(experts.iter().map(|&e| (l, e)));
                }
            }
            nodes.push(PlacedNode {
                name: node.name,
                address: node.address,
                pairs: pairs.into_iter().collect(),
            });
        }
        Ok(Self { nodes })
    }

    pub fn node(&self, name: &str) -> Option<&PlacedNode> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        let json = serde_json::json!({
            "model_type": "qwen3_moe", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4,
            "mlp_only_layers": [1]
        });
        ModelConfig::from_json(&json.to_string(), Path::new("config.json")).unwrap()
    }

    #[test]
    fn shards_cover_every_pair_once() {
        let cfg = cfg();
        let mut all: Vec<_> = (0..3).flat_map(|i| shard_pairs(&cfg, i, 3)).collect();
        all.sort();
        assert_eq!(all, cfg.expert_pairs());
        assert!(parse_shard("3/3").is_err());
        assert_eq!(parse_shard("1/3").unwrap(), (1, 3));
    }

    #[test]
    fn ranges_compress_sorted_pairs() {
        let r = ranges_by_layer(&[(0, 0), (0, 5), (0, 6), (0, 7), (2, 3)]);
        assert_eq!(
            r,
            vec![
                (0, 4, vec!["0".to_string(), "5-7".to_string()]),
                (2, 1, vec!["3".to_string()])
            ]
        );
    }

    #[test]
    fn placement_expands_and_validates() {
        let cfg = cfg();
        let p = Placement::from_toml(
            "[[node]]\nname = \"a\"\naddress = \"h:1\"\nexperts = [\"*:0-1\", \"2:3\"]\n",
            Path::new("p.toml"),
            &cfg,
        )
        .unwrap();
        assert_eq!(
            p.nodes[0].pairs,
            vec![(0, 0), (0, 1), (2, 0), (2, 1), (2, 3)]
        );
        for (bad, needle) in [
            (
                "[[node]]\nname=\"a\"\naddress=\"h:1\"\nexperts=[\"1:0\"]\n",
                "dense",
            ),
            (
                "[[node]]\nname=\"a\"\naddress=\"h:1\"\nexperts=[\"0:4\"]\n",
                "out of range",
            ),
            (
                "[[node]]\nname=\"a\"\naddress=\"h\"\nexperts=[]\n",
                "HOST:PORT",
            ),
            (
                "[[node]]\nname=\"a\"\naddress=\"h:1\"\nexperts=[]\nextra=1\n",
                "unknown field",
            ),
            (
                "[[node]]\nname=\"a\"\naddress=\"h:1\"\nexperts=[]\n[[node]]\nname=\"a\"\naddress=\"h:2\"\nexperts=[]\n",
                "twice",
            ),
        ] {
            let err = Placement::from_toml(bad, Path::new("p.toml"), &cfg)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
