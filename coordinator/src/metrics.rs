//! Prometheus metrics of the serving path (text exposition format on `GET /metrics`).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use omnishard_model::ExpertUsage;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub queue_depth: IntGauge,
    pub active_sequences: IntGauge,
    pub kv_cache_tokens: IntGauge,
    pub kv_cache_capacity_tokens: IntGauge,
    pub prefix_cache_query_tokens: IntCounter,
    pub prefix_cache_hit_tokens: IntCounter,
    pub preemptions: IntCounter,
    pub node_rpc_seconds: HistogramVec,
    pub node_rpc_errors: IntCounterVec,
    expert_tokens: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let hist1 = |name: &str, help: &str| {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        Self {
            requests: counter_vec(
                "omnishard_requests_total",
                "HTTP requests by endpoint and status",
                &["endpoint", "status"],
            ),
            request_seconds: hist(
                "omnishard_request_seconds",
                "HTTP request latency",
                &["endpoint"],
            ),
            prompt_tokens: counter("omnishard_prompt_tokens_total", "Prompt tokens admitted"),
            completion_tokens: counter("omnishard_completion_tokens_total", "Tokens generated"),
            time_to_first_token: hist1(
                "omnishard_time_to_first_token_seconds",
                "From enqueue to first token",
            ),
            inter_token_latency: hist1(
                "omnishard_inter_token_latency_seconds",
                "Between consecutive tokens of a sequence",
            ),
            queue_depth: gauge("omnishard_queue_depth", "Requests waiting for admission"),
            active_sequences: gauge(
                "omnishard_active_sequences",
                "Sequences being prefilled or decoded",
            ),
            kv_cache_tokens: gauge(
                "omnishard_kv_cache_tokens",
                "Token positions held in the KV cache (running sequences and cached prefixes)",
            ),
            kv_cache_capacity_tokens: gauge(
                "omnishard_kv_cache_capacity_tokens",
                "Token positions the KV cache budget (--kv-cache-memory) holds",
            ),
            prefix_cache_query_tokens: counter(
                "omnishard_prefix_cache_query_tokens_total",
                "Prompt tokens looked up in the prefix cache",
            ),
            prefix_cache_hit_tokens: counter(
                "omnishard_prefix_cache_hit_tokens_total",
                "Prompt tokens found in the prefix cache (not computed again)",
            ),
            preemptions: counter(
                "omnishard_preemptions_total",
                "Sequences whose KV cache was dropped to make room, to be recomputed",
            ),
            node_rpc_seconds: hist(
                "omnishard_node_rpc_seconds",
                "Per-layer call latency per expert node",
                &["node"],
            ),
            node_rpc_errors: counter_vec(
                "omnishard_node_rpc_errors_total",
                "Failed calls per expert node",
                &["node"],
            ),
            expert_tokens: counter_vec(
                "omnishard_expert_tokens_total",
                "Tokens routed per (layer, expert)",
                &["layer", "expert"],
            ),
            registry,
        }
    }

    /// The text exposition of every metric, with the expert counts refreshed from `usage`.
    pub fn render(&self, usage: &ExpertUsage) -> String {
        for (layer, expert, n) in usage.snapshot() {
            let c = self
                .expert_tokens
                .with_label_values(&[&layer.to_string(), &expert.to_string()]);
            c.inc_by(n.saturating_sub(c.get()));
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::remote::RpcObserver for Metrics {
    fn observe(&self, node: &str, seconds: f64, ok: bool) {
        self.node_rpc_seconds
            .with_label_values(&[node])
            .observe(seconds);
        if !ok {
            self.node_rpc_errors.with_label_values(&[node]).inc();
        }
    }
}
