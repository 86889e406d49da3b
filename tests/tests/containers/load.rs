//! The container test's client side: greedy completions, streamed completions timed token by
//! token, node status from `/admin/nodes`, and a steady load of concurrent streams whose
//! failures, short answers and longest stall between tokens are counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

/// The coordinator's HTTP API as published on the host.
#[derive(Clone)]
pub struct Api {
    base: String,
    key: String,
    client: reqwest::Client,
}

/// One streamed request, as the client saw it.
#[derive(Debug, Default)]
pub struct Streamed {
    /// Why it failed: a status other than 200, an error event, a broken stream.
    pub error: Option<String>,
    /// `usage.completion_tokens` of the final chunk.
    pub tokens: usize,
    /// Time to the first text chunk.
    pub ttft: Duration,
    /// Longest time between two text chunks, and when the longer wait ended.
    pub max_gap: Duration,
    pub max_gap_at: Option<Instant>,
}

impl Api {
    pub fn new(address: &str, key: &str) -> Self {
        Self {
            base: format!("http://{address}"),
            key: key.to_string(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("http client"),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response, String> {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("POST {path}: {e}"))
    }

    /// Status of a request to `path` without the API key (the key must be required).
    pub async fn status_without_key(&self, path: &str) -> Result<u16, String> {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        Ok(resp.status().as_u16())
    }

    /// The text of a greedy completion of `max_tokens` tokens.
    pub async fn complete(&self, prompt: &str, max_tokens: usize) -> Result<String, String> {
        let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
        let resp = self.post("/v1/completions", &body).await?;
        let status = resp.status();
        let answer: Value = resp.json().await.map_err(|e| e.to_string())?;
        match answer["choices"][0]["text"].as_str() {
            Some(text) if status.is_success() => Ok(text.to_string()),
            _ => Err(format!("completion answered {status}: {answer}")),
        }
    }

    /// Streams a greedy completion, timing every text chunk.
    pub async fn stream(&self, prompt: &str, max_tokens: usize) -> Streamed {
        let mut out = Streamed::default();
        if let Err(e) = self.stream_into(prompt, max_tokens, &mut out).await {
            out.error = Some(e);
        }
        out
    }

    async fn stream_into(
        &self,
        prompt: &str,
        max_tokens: usize,
        out: &mut Streamed,
    ) -> Result<(), String> {
        let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
        let started = Instant::now();
        let resp = self.post("/v1/completions", &body).await?;
        if resp.status() != 200 {
            let status = resp.status();
            return Err(format!(
                "{status}: {}",
                resp.text().await.unwrap_or_default()
            ));
        }
        let mut bytes = resp.bytes_stream();
        let (mut buf, mut last) = (String::new(), None::<Instant>);
        while let Some(chunk) = bytes.next().await {
            let chunk = chunk.map_err(|e| format!("stream broken: {e}"))?;
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let Some(data) = event.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
                if v.get("error").is_some() {
                    return Err(format!("error event: {v}"));
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    out.tokens = n as usize;
                }
                if v["choices"][0]["text"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
                {
                    let now = Instant::now();
                    match last {
                        None => out.ttft = now - started,
                        Some(prev) if now - prev > out.max_gap => {
                            out.max_gap = now - prev;
                            out.max_gap_at = Some(now);
                        }
                        Some(_) => {}
                    }
                    last = Some(now);
                }
            }
        }
        Ok(())
    }

    /// `GET /admin/nodes`: every node's status object.
    pub async fn nodes(&self) -> Result<Vec<Value>, String> {
        let resp = self
            .client
            .get(format!("{}/admin/nodes", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|e| format!("GET /admin/nodes: {e}"))?;
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        v["nodes"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("/admin/nodes answered {v}"))
    }

    /// The status object of the node whose address starts with `host:`.
    pub async fn node(&self, host: &str) -> Result<Value, String> {
        let nodes = self.nodes().await?;
        let prefix = format!("{host}:");
        nodes
            .iter()
            .find(|n| {
                let address = n["address"].as_str().unwrap_or("");
                address.trim_start_matches("https://").starts_with(&prefix)
            })
            .cloned()
            .ok_or_else(|| format!("no node {host} in {nodes:?}"))
    }

    /// Polls until the node's `up` is `up`; the time it took, or an error at the deadline.
    pub async fn wait_node(
        &self,
        host: &str,
        up: bool,
        limit: Duration,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let state = self.node(host).await;
            if let Ok(node) = &state
                && node["up"].as_bool() == Some(up)
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "node {host} not up={up} after {limit:?}: {state:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Concurrent clients sending streamed requests back to back until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Vec<Streamed>>>,
    max_tokens: usize,
}

/// What a load saw.
#[derive(Debug)]
pub struct Summary {
    pub requests: usize,
    pub failed: Vec<String>,
    /// Requests that ended with fewer tokens than asked for.
    pub short: usize,
    pub max_gap: Duration,
    pub max_gap_at: Option<Instant>,
    pub max_ttft: Duration,
}

impl Load {
    pub fn start(api: &Api, clients: usize, max_tokens: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|i| {
                let (api, stop) = (api.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let prompt = format!("The lighthouse keeper {i} {n}");
                        done.push(api.stream(&prompt, max_tokens).await);
                        n += 1;
                    }
                    done
                })
            })
            .collect();
        Self {
            stop,
            clients,
            max_tokens,
        }
    }

    /// Stops the clients after their current request and sums up what they saw.
    pub async fn finish(self, limit: Duration) -> Summary {
        self.stop.store(true, Ordering::Relaxed);
        let mut summary = Summary {
            requests: 0,
            failed: Vec::new(),
            short: 0,
            max_gap: Duration::ZERO,
            max_gap_at: None,
            max_ttft: Duration::ZERO,
        };
        for client in self.clients {
            let done = tokio::time::timeout(limit, client)
                .await
                .expect("load clients did not finish in time")
                .expect("load client panicked");
            for s in done {
                summary.requests += 1;
                if let Some(e) = s.error {
                    summary.failed.push(e);
                    continue;
                }
                if s.tokens != self.max_tokens {
                    summary.short += 1;
                }
                if s.max_gap > summary.max_gap {
                    summary.max_gap = s.max_gap;
                    summary.max_gap_at = s.max_gap_at;
                }
                summary.max_ttft = summary.max_ttft.max(s.ttft);
            }
        }
        summary
    }
}
