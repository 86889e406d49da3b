//! Token counts per (layer, expert), counted where the router decides, whatever runs the experts.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct ExpertUsage {
    num_experts: usize,
    counts: Vec<AtomicU64>,
    tokens: AtomicU64,
}

impl ExpertUsage {
    pub fn new(num_layers: usize, num_experts: usize) -> Self {
        Self {
            num_experts,
            counts: (0..num_layers * num_experts)
                .map(|_| AtomicU64::new(0))
                .collect(),
            tokens: AtomicU64::new(0),
        }
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
        self.counts
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then(|| (i / self.num_experts, i % self.num_experts, n))
            })
            .collect()
    }
}
