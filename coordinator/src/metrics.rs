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
    /// Per request, from arrival to the last token.
    pub request_e2e_seconds: Histogram,
    /// Per request, from arrival to admission by the scheduler.
    pub request_queue_seconds: Histogram,
    pub request_finished: IntCounterVec,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    pub node_rpc_seconds: HistogramVec,
    pub node_rpc_errors: IntCounterVec,
    expert_tokens: IntCounterVec,
}

/// Token counts per request: powers of two.
const LENGTH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0, 65536.0, 131072.0,
];

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

impl Metrics {
    pub fn new() -> Self {
        Self::for_model(None)
    }

    /// Metrics whose every series carries `model_name` (vLLM's label), when given.
    pub fn for_model(model_name: Option<&str>) -> Self {
        let labels = model_name.map(|name| {
            std::collections::HashMap::from([("model_name".to_string(), name.to_string())])
        });
        let registry = Registry::new_custom(None, labels).expect("valid registry labels");
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
        let lengths = |name: &str, help: &str| {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(LENGTH_BUCKETS.to_vec()),
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
            request_e2e_seconds: hist1(
                "omnishard_request_e2e_seconds",
                "From a request's arrival to its last token",
            ),
            request_queue_seconds: hist1(
                "omnishard_request_queue_seconds",
                "From a request's arrival to its admission by the scheduler",
            ),
            request_finished: counter_vec(
                "omnishard_request_finished_total",
                "Requests answered, by finish reason",
                &["finish_reason"],
            ),
            request_prompt_tokens: lengths(
                "omnishard_request_prompt_tokens",
                "Prompt tokens per request",
            ),
            request_generation_tokens: lengths(
                "omnishard_request_generation_tokens",
                "Generated tokens per request",
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

/// A periodic log line of throughput and load, as vLLM prints: every [`ThroughputLog::EVERY`]
/// while there is work, from the counters' growth since the last line.
pub struct ThroughputLog {
    at: std::time::Instant,
    prompt: u64,
    generated: u64,
}

impl ThroughputLog {
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    pub fn new(m: &Metrics) -> Self {
        Self {
            at: std::time::Instant::now(),
            prompt: m.prompt_tokens.get(),
            generated: m.completion_tokens.get(),
        }
    }

    /// Logs a line if one is due and tokens moved since the last.
    pub fn tick(&mut self, m: &Metrics) {
        let elapsed = self.at.elapsed();
        if elapsed < Self::EVERY {
            return;
        }
        let (prompt, generated) = (m.prompt_tokens.get(), m.completion_tokens.get());
        if prompt != self.prompt || generated != self.generated {
            let seconds = elapsed.as_secs_f64();
            let capacity = m.kv_cache_capacity_tokens.get().max(1) as f64;
            let queried = m.prefix_cache_query_tokens.get().max(1) as f64;
            tracing::info!(
                prompt_tokens_per_s = format!("{:.1}", (prompt - self.prompt) as f64 / seconds),
                generation_tokens_per_s =
                    format!("{:.1}", (generated - self.generated) as f64 / seconds),
                running = m.active_sequences.get(),
                queued = m.queue_depth.get(),
                kv_cache_use = format!("{:.1}%", 100.0 * m.kv_cache_tokens.get() as f64 / capacity),
                prefix_cache_hit_rate = format!(
                    "{:.1}%",
                    100.0 * m.prefix_cache_hit_tokens.get() as f64 / queried
                ),
                "throughput"
            );
        }
        *self = Self::new(m);
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
