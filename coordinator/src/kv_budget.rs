//! The KV cache's memory budget (`--kv-cache-memory`): how many token positions the running
//! sequences and the prefix cache may hold together. The scheduler admits a request only when
//! its prompt fits (evicting cached prefixes first), and when running sequences outgrow the
//! budget it preempts the newest, dropping its cache to recompute later (vLLM's recompute
//! preemption): its text is unchanged, only its latency grows.

use omnishard_model::KvCache;
use omnishard_proto::ModelConfig;

use crate::prefix_cache::PrefixCache;

/// Bytes of keys and values one token takes over every layer in `dtype_bytes`-byte elements.
pub fn bytes_per_token(cfg: &ModelConfig, dtype_bytes: usize) -> usize {
    2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
}

pub struct KvBudget {
    bytes_per_token: usize,
    /// Token positions the budget holds.
    capacity: usize,
    prefix: Option<PrefixCache>,
}

impl KvBudget {
    /// `budget_bytes` over `bytes_per_token`; `prefix_caching` keeps prompts' prefixes.
    pub fn new(budget_bytes: usize, bytes_per_token: usize, prefix_caching: bool) -> Self {
        Self {
            bytes_per_token: bytes_per_token.max(1),
            capacity: budget_bytes / bytes_per_token.max(1),
            prefix: prefix_caching.then(PrefixCache::default),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions the prefix cache holds.
    pub fn cached(&self) -> usize {
        self.prefix
            .as_ref()
            .map_or(0, |p| p.bytes().div_ceil(self.bytes_per_token))
    }

    /// Makes room for `need` more positions beside `in_use` running ones, evicting cached
    /// prefixes if that is enough; false if it is not.
    pub fn make_room(&mut self, in_use: usize, need: usize) -> bool {
        let Some(free) = self.capacity.checked_sub(in_use + need) else {
            return false;
        };
        if let Some(prefix) = self.prefix.as_mut() {
            prefix.shrink_to(free * self.bytes_per_token);
        }
        true
    }

    /// The longest cached prefix of `tokens` (at most `max_len` of them).
    pub fn lookup(&mut self, tokens: &[u32], max_len: usize) -> Option<(KvCache, usize)> {
        self.prefix.as_mut()?.lookup(tokens, max_len)
    }

    /// Keeps `tokens`' whole blocks from `cache` if the budget has room for them beside
    /// `in_use` running positions.
    pub fn remember(&mut self, tokens: &[u32], cache: &KvCache, in_use: usize) {
        let room = self.capacity.saturating_sub(in_use + self.cached());
        if let Some(prefix) = self.prefix.as_mut()
            && tokens.len() <= room
        {
            prefix.insert(tokens, cache);
        }
    }
}

/// Parses `--kv-cache-memory`: bytes, with an optional `KiB`/`MiB`/`GiB`/`TiB` (or `K`/`M`/`G`/
/// `T`) suffix.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let n: usize = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size: write bytes, e.g. 8GiB, 512MiB or 1000000"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}`; use KiB, MiB, GiB or TiB"
            ));
        }
    };
    n.checked_mul(1usize << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Half the memory the system reports available (`MemAvailable` of /proc/meminfo): the default
/// budget.
pub fn default_budget_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024 / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }

    #[test]
    fn room_is_made_by_evicting_prefixes() {
        let mut b = KvBudget::new(100 * 8, 8, true);
        assert_eq!(b.capacity(), 100);
        assert!(b.make_room(60, 40));
        assert!(!b.make_room(60, 41));
    }
}
