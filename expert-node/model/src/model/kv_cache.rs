//! The key/value cache of one sequence, every layer's keys and values grown by concatenation:
//! the reference's `DynamicCache` (`DynamicLayer.update`, `transformers.cache_utils` 4.57.3),
//! without the batch dimension.

use candle_core::Tensor;

use super::Result;

/// Keys and values of every layer for one sequence, `[kv_heads, seq, head_dim]` each.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    seq_len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens already in the cache.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Appends `layer`'s new keys and values and returns all of that layer's, old and new.
    /// [`KvCache::seq_len`] moves only when the whole pass is done ([`KvCache::advance`]), so
    /// every layer of the pass sees the same past length.
    pub(super) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let kv = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }

    /// Counts `tokens` more tokens as cached, after a forward pass appended them to every layer.
    pub(super) fn advance(&mut self, tokens: usize) {
        self.seq_len += tokens;
    }
}
