//! Token counts per (layer, expert), counted where the router decides, whatever runs the experts.
//! Batch-1 decode on a GPU keeps its routing there, so its counts are kept there too and folded
//! in when read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};

pub struct ExpertUsage {
    num_experts: usize,
    counts: Vec<AtomicU64>,
    tokens: AtomicU64,
    /// u32 per (layer, expert) on the GPU, added to by kernels; `None` on the CPU.
    on_device: Option<Tensor>,
    /// Held by whoever needs the GPU's stream to itself: a CUDA graph capture (work queued by
    /// another thread would be captured into it) and [`ExpertUsage::snapshot`]'s copy.
    device_access: Mutex<()>,
}

impl ExpertUsage {
    pub fn new(num_layers: usize, num_experts: usize) -> Self {
        Self {
            num_experts,
            counts: (0..num_layers * num_experts)
                .map(|_| AtomicU64::new(0))
                .collect(),
            tokens: AtomicU64::new(0),
            on_device: None,
            device_access: Mutex::new(()),
        }
    }

    /// Also keeps counts on `device` when it is a GPU, for steps whose routing stays there.
    pub fn with_device_counts(mut self, device: &Device) -> candle_core::Result<Self> {
        if device.is_cuda() {
            let n = self.counts.len();
            self.on_device = Some(Tensor::zeros(n, DType::U32, device)?);
        }
        Ok(self)
    }

    /// The GPU counts of `layer` (u32 per expert), where there are any.
    pub fn layer_counts_on_device(&self, layer: usize) -> candle_core::Result<Option<Tensor>> {
        self.on_device
            .as_ref()
            .map(|t| t.narrow(0, layer * self.num_experts, self.num_experts))
            .transpose()
    }

    /// Keeps [`ExpertUsage::snapshot`] off the GPU's stream while the guard lives (a CUDA graph
    /// capture on another thread).
    pub fn device_access(&self) -> MutexGuard<'_, ()> {
        self.device_access
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts tokens that went through the model (one forward row each).
    pub fn record_tokens(&self, n: usize) {
        self.tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    pub fn record(&self, layer: usize, experts: &[u32]) {
        for &e in experts {
            if let Some(c) = self.counts.get(layer * self.num_experts + e as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `(layer, expert, tokens)` for every pair that received tokens.
    pub fn snapshot(&self) -> Vec<(usize, usize, u64)> {
        let read = self.on_device.as_ref().map(|t| {
            let _stream = self.device_access();
            t.to_vec1::<u32>()
        });
        let on_device = match read {
            Some(Ok(counts)) => counts,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the GPU's expert usage counts; leaving them out");
                Vec::new()
            }
            None => Vec::new(),
        };
        self.counts
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed) + on_device.get(i).map_or(0, |&d| u64::from(d));
                (n > 0).then(|| (i / self.num_experts, i % self.num_experts, n))
            })
            .collect()
    }
}
