//! Automatic prefix caching (vLLM's, by hashes of full blocks of tokens): when a sequence has
//! computed its prompt, the keys and values of the prompt's whole blocks are kept, indexed by a
//! hash chain over the blocks, so a later prompt that starts with the same blocks (a shared
//! system prompt, a chat history sent again) copies them instead of computing them. Entries are
//! evicted least recently used first when the KV budget needs their memory.
//!
//! Keys are checked token for token on a hit: a hash collision costs a miss, never a wrong cache.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use omnishard_model::KvCache;

/// Tokens per block: prefixes are cached and matched in whole blocks.
pub const BLOCK_TOKENS: usize = 16;

struct Entry {
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
pub struct PrefixCache {
    /// Hash of each block boundary's prefix → the entry holding it.
    index: HashMap<u64, usize>,
    entries: HashMap<usize, Entry>,
    next_id: usize,
    clock: u64,
    bytes: usize,
}

/// The hash of every whole-block prefix of `tokens`, shortest first (a chain: each block's hash
/// covers all before it).
fn block_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut hashes = Vec::with_capacity(tokens.len() / BLOCK_TOKENS);
    let mut previous = 0u64;
    for block in tokens.chunks_exact(BLOCK_TOKENS) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        previous.hash(&mut h);
        block.hash(&mut h);
        previous = h.finish();
        hashes.push(previous);
    }
    hashes
}

impl PrefixCache {
    /// Bytes the cached keys and values take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The longest cached whole-block prefix of `tokens` of at most `max_len` tokens: a cache
    /// holding it and its length.
    pub fn lookup(&mut self, tokens: &[u32], max_len: usize) -> Option<(KvCache, usize)> {
        let usable = &tokens[..max_len.min(tokens.len())];
        let hashes = block_hashes(usable);
        for (i, h) in hashes.iter().enumerate().rev() {
            let len = (i + 1) * BLOCK_TOKENS;
            let Some(&id) = self.index.get(h) else {
                continue;
            };
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            if entry.tokens.get(..len) != Some(&usable[..len]) {
                continue;
            }
            self.clock += 1;
            entry.last_used = self.clock;
            match entry.cache.prefix(len) {
                Ok(cache) => return Some((cache, len)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot copy a cached prefix; computing it");
                    return None;
                }
            }
        }
        None
    }

    /// Keeps the whole blocks of `tokens` from `cache` (which holds at least that many
    /// positions), unless they are cached already.
    pub fn insert(&mut self, tokens: &[u32], cache: &KvCache) {
        let len = tokens.len() / BLOCK_TOKENS * BLOCK_TOKENS;
        if len == 0 {
            return;
        }
        let hashes = block_hashes(&tokens[..len]);
        let covered = hashes
            .last()
            .and_then(|h| self.index.get(h))
            .is_some_and(|id| {
                self.entries
                    .get(id)
                    .is_some_and(|e| e.tokens.get(..len) == Some(&tokens[..len]))
            });
        if covered {
            return;
        }
        // Entries this one extends hold nothing it does not: drop them.
        let covered_ids: Vec<usize> = self
            .entries
            .iter()
            .filter(|(_, e)| tokens[..len].starts_with(&e.tokens))
            .map(|(&id, _)| id)
            .collect();
        for id in covered_ids {
            self.remove(id);
        }
        let snapshot = match cache.prefix(len) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot copy a prefix into the cache");
                return;
            }
        };
        let bytes = snapshot.bytes();
        let id = self.next_id;
        self.next_id += 1;
        self.clock += 1;
        for h in hashes {
            self.index.insert(h, id);
        }
        self.entries.insert(
            id,
            Entry {
                tokens: tokens[..len].to_vec(),
                cache: snapshot,
                bytes,
                last_used: self.clock,
            },
        );
        self.bytes += bytes;
    }

    /// Evicts least recently used entries until at most `budget` bytes are cached.
    pub fn shrink_to(&mut self, budget: usize) {
        while self.bytes > budget {
            let Some((&id, _)) = self.entries.iter().min_by_key(|(_, e)| e.last_used) else {
                break;
            };
            self.remove(id);
        }
    }

    /// Drops an entry; its blocks' hashes point to another entry holding them, if one does.
    fn remove(&mut self, id: usize) {
        let Some(gone) = self.entries.remove(&id) else {
            return;
        };
        self.bytes -= gone.bytes;
        let hashes = block_hashes(&gone.tokens);
        for (i, h) in hashes.iter().enumerate() {
            if self.index.get(h) != Some(&id) {
                continue;
            }
            let len = (i + 1) * BLOCK_TOKENS;
            let other = self
                .entries
                .iter()
                .find(|(_, e)| e.tokens.get(..len) == Some(&gone.tokens[..len]))
                .map(|(&other, _)| other);
            match other {
                Some(other) => {
                    self.index.insert(*h, other);
                }
                None => {
                    self.index.remove(h);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_over_blocks() {
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[20] = 999;
        let (ha, hb) = (block_hashes(&a), block_hashes(&b));
        assert_eq!(ha.len(), 2);
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        assert_eq!(block_hashes(&a[..15]).len(), 0);
    }
}
