//! The key/value cache of one sequence: the reference's `DynamicCache` (`DynamicLayer.update`,
//! `transformers.cache_utils` 4.57.3), without the batch dimension. On the CPU every layer's keys
//! and values grow by concatenation; on a GPU they live in buffers of spare capacity (doubled when
//! full) written in place, so a decode step copies one row instead of the whole cache and the
//! decode-attention kernel reads the buffers directly.

use candle_core::Tensor;

use super::Result;

/// Keys and values of every layer for one sequence, `[kv_heads, seq, head_dim]` each (on a GPU,
/// `[kv_heads, capacity, head_dim]` buffers of which the first `seq` positions are used).
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
        if k.device().is_cuda() {
            return self.append_in_place(layer, &k, &v);
        }
        let kv = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }

    /// [`KvCache::append`] into the layer's buffers; returns views of the positions in use.
    fn append_in_place(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (kv_heads, new, d) = k.dims3()?;
        let (kb, vb) = self.reserve(layer, (kv_heads, new, d), k)?;
        kb.slice_set(&k.contiguous()?, 1, self.seq_len)?;
        vb.slice_set(&v.contiguous()?, 1, self.seq_len)?;
        let used = self.seq_len + new;
        Ok((kb.narrow(1, 0, used)?, vb.narrow(1, 0, used)?))
    }

    /// The GPU buffers of `layer` with room for `new` more positions after [`KvCache::seq_len`]
    /// (shape `(kv_heads, new, d)`, dtype and device those of `like`), grown to twice the length
    /// needed when full. The first `seq_len` positions hold the cache.
    pub(super) fn reserve(
        &mut self,
        layer: usize,
        (kv_heads, new, d): (usize, usize, usize),
        like: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let needed = self.seq_len + new;
        let buffers = match self.layers[layer].take() {
            Some((kb, vb)) if kb.dim(1)? >= needed => (kb, vb),
            old => {
                let capacity = (2 * needed).max(64);
                let fresh = || Tensor::zeros((kv_heads, capacity, d), like.dtype(), like.device());
                let (kb, vb) = (fresh()?, fresh()?);
                if let Some((ok, ov)) = old {
                    kb.slice_set(&ok, 1, 0)?;
                    vb.slice_set(&ov, 1, 0)?;
                }
                (kb, vb)
            }
        };
        self.layers[layer] = Some(buffers.clone());
        Ok(buffers)
    }

    /// A cache holding a copy of this one's first `len` positions (for prefix caching): its
    /// own tensors, so neither cache's later appends touch the other.
    pub fn prefix(&self, len: usize) -> Result<KvCache> {
        let len = len.min(self.seq_len);
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                layer
                    .as_ref()
                    .map(|(k, v)| -> Result<(Tensor, Tensor)> {
                        // Always a fresh tensor of just these positions: a prefix that happens to
                        // be contiguous would otherwise share (and keep alive) the whole buffer.
                        let own = |t: &Tensor| t.narrow(1, 0, len)?.force_contiguous();
                        Ok((own(k)?, own(v)?))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            seq_len: len,
        })
    }

    /// Bytes the cache's tensors take (on a GPU, with their spare capacity).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Counts `tokens` more tokens as cached, after a forward pass appended them to every layer.
    pub(super) fn advance(&mut self, tokens: usize) {
        self.seq_len += tokens;
    }
}
