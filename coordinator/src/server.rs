//! The OpenAI-compatible HTTP API (axum): `POST /v1/chat/completions`, `POST /v1/completions`
//! (streamed as server-sent events ending in `data: [DONE]`, or whole), `GET /v1/models`,
//! `GET /health` and `GET /metrics`. Errors use OpenAI's JSON error shape.
//! Reference: <https://platform.openai.com/docs/api-reference/chat>.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::sampling::SamplingParams;
use crate::scheduler::{Event, FinishReason, GenerationRequest, SchedulerHandle, SubmitError};
use crate::tokenizer::{ChatMessage, DecodeStream, StopMatcher, TextTokenizer, chatml};

/// Serving settings fixed at start-up.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model id clients must name (or omit).
    pub model_name: String,
    /// Bearer token required on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Prompt plus generated tokens per sequence.
    pub max_context: usize,
}

pub struct AppState {
    pub engine: Arc<Engine>,
    pub tokenizer: Arc<TextTokenizer>,
    pub scheduler: SchedulerHandle,
    pub metrics: Arc<Metrics>,
    pub config: ServeConfig,
    created: u64,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(
        engine: Arc<Engine>,
        tokenizer: Arc<TextTokenizer>,
        scheduler: SchedulerHandle,
        metrics: Arc<Metrics>,
        config: ServeConfig,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            scheduler,
            metrics,
            config,
            created: unix_now(),
            next_id: AtomicU64::new(1),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
    }

    fn with(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code: Some(code),
            message: message.into(),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
        .route("/models", get(models))
        .route("/stats", get(stats))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let admin = Router::new()
        .route("/nodes", get(list_nodes).post(add_node))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .nest("/v1", v1)
        .nest("/admin", admin)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::with(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such endpoint",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        p @ ("/v1/chat/completions"
        | "/v1/completions"
        | "/v1/models"
        | "/v1/stats"
        | "/admin/nodes"
        | "/health"
        | "/metrics") => p.to_string(),
        _ => "other".to_string(),
    };
    let started = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .request_seconds
        .with_label_values(&[&endpoint])
        .observe(started.elapsed().as_secs_f64());
    state
        .metrics
        .requests
        .with_label_values(&[endpoint.as_str(), resp.status().as_str()])
        .inc();
    resp
}

async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()));
        if !ok {
            return ApiError::with(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                "missing or invalid API key; send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.scheduler.is_alive() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError::with(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            "the scheduler has stopped",
        )
        .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(state.engine.model().usage());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "omnishard"}]
    }))
}

/// Usage statistics: tokens per (layer, expert), a per-layer summary, and per-node traffic.
async fn stats(State(state): State<Arc<AppState>>) -> Json<Value> {
    let cfg = state.engine.config();
    let usage = state.engine.model().usage();
    let snapshot = usage.snapshot();
    let mut layers = Vec::new();
    for layer in cfg.moe_layers() {
        let mut counts: Vec<(usize, u64)> = snapshot
            .iter()
            .filter(|(l, _, _)| *l == layer)
            .map(|&(_, e, n)| (e, n))
            .collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: u64 = counts.iter().map(|c| c.1).sum();
        let share = |n: u64| {
            if total == 0 {
                0.0
            } else {
                n as f64 / total as f64
            }
        };
        let top_k = cfg.num_experts_per_tok;
        layers.push(json!({
            "layer": layer,
            "assignments": total,
            "distinct_experts": counts.len(),
            "top_experts": counts.iter().take(top_k).map(|&(e, n)| json!({"expert": e, "assignments": n, "share": share(n)})).collect::<Vec<_>>(),
            "top_k_share": share(counts.iter().take(top_k).map(|c| c.1).sum()),
        }));
    }
    let nodes = state
        .engine
        .remote()
        .map(|r| r.status())
        .unwrap_or_default();
    Json(json!({
        "tokens": usage.tokens(),
        "top_k": cfg.num_experts_per_tok,
        "moe_layers": cfg.moe_layers(),
        "num_experts": cfg.num_experts,
        "experts": snapshot.iter().map(|&(l, e, n)| json!({"layer": l, "expert": e, "assignments": n})).collect::<Vec<_>>(),
        "layers": layers,
        "nodes": nodes,
    }))
}

fn no_remote() -> ApiError {
    ApiError::with(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "no_expert_nodes",
        "this server runs its experts in-process; start it with --nodes or --placement to manage nodes",
    )
}

async fn list_nodes(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.remote() {
        Some(remote) => Json(json!({"nodes": remote.status()})).into_response(),
        None => no_remote().into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNode {
    address: String,
}

/// Adds an expert node to the running cluster: `{"address": "host:port"}`.
async fn add_node(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let Some(remote) = state.engine.remote().cloned() else {
        return no_remote().into_response();
    };
    let req: AddNode = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::invalid(format!("expected {{\"address\": \"host:port\"}}: {e}"))
                .into_response();
        }
    };
    // Connecting and checking the node blocks; keep it off the async workers.
    match tokio::task::spawn_blocking(move || remote.add_node(&req.address)).await {
        Ok(Ok(status)) => Json(json!({"node": status})).into_response(),
        Ok(Err(e)) => ApiError::with(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "node_rejected",
            e.to_string(),
        )
        .into_response(),
        Err(e) => ApiError::with(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal",
            e.to_string(),
        )
        .into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The body of both completion endpoints; which of `messages` / `prompt` is required depends on
/// the endpoint. Unknown fields are ignored, as OpenAI clients send many.
#[derive(Debug, Deserialize)]
struct CompletionBody {
    model: Option<String>,
    messages: Option<Vec<Message>>,
    prompt: Option<Prompt>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Extension (as vLLM): -1 or absent means no limit.
    top_k: Option<i64>,
    /// Extension (as vLLM).
    repetition_penalty: Option<f32>,
    /// Extension (as vLLM): keep generating past stop tokens, up to max_tokens.
    ignore_eos: Option<bool>,
    stop: Option<Stop>,
    seed: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    logprobs: Option<Value>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// A validated request, ready for the scheduler.
struct Prepared {
    prompt: Vec<u32>,
    ignore_eos: bool,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn parse_body(body: &Bytes) -> Result<CompletionBody, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if matches!(path.as_str(), "." | "?" | "") {
            ApiError::invalid(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::invalid(format!("invalid field `{path}`: {inner}"))
        }
    })
}

/// What request validation needs to know about the served model.
pub struct RequestLimits<'a> {
    pub model_name: &'a str,
    pub max_context: usize,
    pub vocab_size: usize,
    pub tokenizer: &'a TextTokenizer,
}

impl AppState {
    fn limits(&self) -> RequestLimits<'_> {
        RequestLimits {
            model_name: &self.config.model_name,
            max_context: self.config.max_context,
            vocab_size: self.engine.config().vocab_size,
            tokenizer: &self.tokenizer,
        }
    }
}

/// Parses and validates a request body exactly as `/v1/chat/completions` (`chat`) or
/// `/v1/completions` would, without generating; returns (prompt tokens, max_tokens) or the
/// error message. The fuzz target for the HTTP body parser drives this.
pub fn validate_body(
    limits: &RequestLimits<'_>,
    body: &[u8],
    chat: bool,
) -> Result<(usize, usize), String> {
    let kind = if chat { Kind::Chat } else { Kind::Text };
    let body = Bytes::copy_from_slice(body);
    parse_body(&body)
        .and_then(|b| prepare(limits, b, kind))
        .map(|p| (p.prompt.len(), p.max_tokens))
        .map_err(|e| e.message)
}

fn prepare(
    limits: &RequestLimits<'_>,
    mut body: CompletionBody,
    kind: Kind,
) -> Result<Prepared, ApiError> {
    if let Some(model) = &body.model
        && model != limits.model_name
    {
        return Err(ApiError::with(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "model `{model}` does not exist; this server serves `{}`",
                limits.model_name
            ),
        ));
    }
    if body.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported"));
    }
    if body
        .logprobs
        .as_ref()
        .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
    {
        return Err(ApiError::invalid("logprobs are not supported"));
    }
    let encode = |text: &str| {
        limits
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::invalid(e.to_string()))
    };
    let prompt = match kind {
        Kind::Chat => {
            let messages = body
                .messages
                .take()
                .ok_or_else(|| ApiError::invalid("`messages` is required"))?;
            encode(&chatml(&chat_turns(messages)?))?
        }
        Kind::Text => match body.prompt.take() {
            None => return Err(ApiError::invalid("`prompt` is required")),
            Some(Prompt::Text(t)) => encode(&t)?,
            Some(Prompt::Texts(v)) if v.len() == 1 => encode(&v[0])?,
            Some(Prompt::Texts(_)) => {
                return Err(ApiError::invalid(
                    "exactly one prompt per request is supported",
                ));
            }
            Some(Prompt::Tokens(ids)) => {
                let vocab = limits.vocab_size;
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(ApiError::invalid(format!(
                        "prompt token {bad} is out of range (vocab size {vocab})"
                    )));
                }
                ids
            }
        },
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty"));
    }
    let max_context = limits.max_context;
    let too_long = |requested: usize| {
        ApiError::with(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "context_length_exceeded",
            format!(
                "this model's context is {max_context} tokens; the prompt has {} and {requested} more were requested",
                prompt.len()
            ),
        )
    };
    if prompt.len() >= max_context {
        return Err(too_long(1));
    }
    let room = max_context - prompt.len();
    let max_tokens = match body.max_tokens.or(body.max_completion_tokens) {
        Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1")),
        Some(n) if n as usize > room => return Err(too_long(n as usize)),
        Some(n) => n as usize,
        // OpenAI's defaults: 16 for completions, the rest of the context for chat.
        None if kind == Kind::Text => room.min(16),
        None => room,
    };
    let top_k = match body.top_k {
        None | Some(-1) => None,
        Some(k) if k >= 1 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(format!(
                "top_k must be -1 (no limit) or at least 1, got {k}"
            )));
        }
    };
    let sampling = SamplingParams {
        temperature: body.temperature.unwrap_or(1.0),
        top_k,
        top_p: body.top_p.unwrap_or(1.0),
        repetition_penalty: body.repetition_penalty.unwrap_or(1.0),
        seed: body.seed.unwrap_or_else(rand::random),
    };
    sampling.validate().map_err(ApiError::invalid)?;
    let stop = match body.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "`stop` takes at most 4 non-empty strings",
        ));
    }
    Ok(Prepared {
        prompt,
        ignore_eos: body.ignore_eos.unwrap_or(false),
        max_tokens,
        sampling,
        stop,
        stream: body.stream.unwrap_or(false),
        include_usage: body
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

fn chat_turns(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("`messages` must not be empty"));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(ApiError::invalid(format!(
                "messages[{i}].role `{}` is not system, user, assistant or tool",
                m.role
            )));
        }
        let content = match m.content {
            Content::Text(t) => t,
            Content::Parts(parts) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(s)) => t.push_str(&s),
                        ("text", None) => {
                            return Err(ApiError::invalid(format!(
                                "messages[{i}]: a text content part needs `text`"
                            )));
                        }
                        (other, _) => {
                            return Err(ApiError::invalid(format!(
                                "messages[{i}]: content part type `{other}` is not supported (text only)"
                            )));
                        }
                    }
                }
                t
            }
        };
        turns.push(ChatMessage {
            role: m.role,
            content,
        });
    }
    Ok(turns)
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    handle(state, body, Kind::Chat).await
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    handle(state, body, Kind::Text).await
}

fn submit(state: &AppState, p: &Prepared) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = unbounded_channel();
    let req = GenerationRequest {
        prompt: p.prompt.clone(),
        max_tokens: p.max_tokens,
        sampling: p.sampling.clone(),
        stop_tokens: if p.ignore_eos {
            Vec::new()
        } else {
            state.tokenizer.stop_tokens().to_vec()
        },
        events: tx,
    };
    state.scheduler.submit(req).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::with(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "queue_full",
            e.to_string(),
        ),
        SubmitError::Stopped => ApiError::with(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            e.to_string(),
        ),
    })?;
    Ok(rx)
}

async fn handle(state: Arc<AppState>, body: Bytes, kind: Kind) -> Response {
    // Parsing and tokenising a long prompt takes a while: keep it off the async workers.
    let parsing = state.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        parse_body(&body).and_then(|b| prepare(&parsing.limits(), b, kind))
    })
    .await;
    let prepared = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => {
            return ApiError::with(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
                e.to_string(),
            )
            .into_response();
        }
    };
    let rx = match submit(&state, &prepared) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    if prepared.stream {
        stream_response(state, prepared, rx, id, kind).into_response()
    } else {
        whole_response(state, prepared, rx, id, kind).await
    }
}

/// Turns scheduler events into text, honouring stop strings.
struct Assembler {
    decode: DecodeStream,
    stop: StopMatcher,
    completion_tokens: usize,
}

enum Piece {
    Text(String),
    Done { text: String, reason: &'static str },
    Failed(ApiError),
}

fn decode_failed(e: crate::tokenizer::TokenizerError) -> Piece {
    Piece::Failed(ApiError::with(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "decode_error",
        e.to_string(),
    ))
}

impl Assembler {
    fn new(stop: Vec<String>) -> Self {
        Self {
            decode: DecodeStream::default(),
            stop: StopMatcher::new(stop),
            completion_tokens: 0,
        }
    }

    fn on_event(&mut self, tok: &TextTokenizer, event: Option<Event>) -> Piece {
        match event {
            Some(Event::Token(t)) => {
                self.completion_tokens += 1;
                let piece = match self.decode.push(tok, t) {
                    Ok(p) => p.unwrap_or_default(),
                    Err(e) => return decode_failed(e),
                };
                let (text, stopped) = self.stop.push(&piece);
                if stopped {
                    Piece::Done {
                        text,
                        reason: "stop",
                    }
                } else {
                    Piece::Text(text)
                }
            }
            Some(Event::Finished(reason)) => {
                let tail = match self.decode.finish(tok) {
                    Ok(t) => t,
                    Err(e) => return decode_failed(e),
                };
                let (mut text, stopped) = self.stop.push(&tail);
                if !stopped {
                    text.push_str(&self.stop.flush());
                }
                let reason = match reason {
                    _ if stopped => "stop",
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                };
                Piece::Done { text, reason }
            }
            Some(Event::Error {
                message,
                unavailable,
            }) => Piece::Failed(if unavailable {
                ApiError::with(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "expert_nodes_unavailable",
                    message,
                )
            } else {
                ApiError::with(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "generation_failed",
                    message,
                )
            }),
            None => Piece::Failed(ApiError::with(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "unavailable",
                "the scheduler stopped",
            )),
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn whole_response(
    state: Arc<AppState>,
    p: Prepared,
    mut rx: UnboundedReceiver<Event>,
    id: String,
    kind: Kind,
) -> Response {
    let mut asm = Assembler::new(p.stop.clone());
    let mut text = String::new();
    let reason = loop {
        match asm.on_event(&state.tokenizer, rx.recv().await) {
            Piece::Text(t) => text.push_str(&t),
            Piece::Done { text: t, reason } => {
                text.push_str(&t);
                break reason;
            }
            Piece::Failed(e) => return e.into_response(),
        }
    };
    let model = &state.config.model_name;
    let created = unix_now();
    let usage = usage(p.prompt.len(), asm.completion_tokens);
    Json(match kind {
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": null}],
            "usage": usage,
        }),
        Kind::Text => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": null}],
            "usage": usage,
        }),
    })
    .into_response()
}

fn stream_response(
    state: Arc<AppState>,
    p: Prepared,
    rx: UnboundedReceiver<Event>,
    id: String,
    kind: Kind,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let created = unix_now();
    let model = state.config.model_name.clone();
    let usage_id = id.clone();
    let chunk = move |delta: Value, reason: Option<&str>| -> SseEvent {
        let body = match kind {
            Kind::Chat => json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": null}],
            }),
            Kind::Text => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "finish_reason": reason, "logprobs": null}],
            }),
        };
        SseEvent::default().data(body.to_string())
    };
    let usage_chunk = {
        let (id, model) = (usage_id, state.config.model_name.clone());
        move |prompt: usize, completion: usize, kind: Kind| {
            let object = if kind == Kind::Chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            SseEvent::default().data(
                json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage(prompt, completion)})
                    .to_string(),
            )
        }
    };
    struct St<C, U> {
        state: Arc<AppState>,
        rx: Option<UnboundedReceiver<Event>>,
        asm: Assembler,
        started: bool,
        chunk: C,
        usage_chunk: U,
        prompt_tokens: usize,
        include_usage: bool,
        kind: Kind,
    }
    let st = St {
        state,
        rx: Some(rx),
        asm: Assembler::new(p.stop),
        started: false,
        chunk,
        usage_chunk,
        prompt_tokens: p.prompt.len(),
        include_usage: p.include_usage,
        kind,
    };
    let events = futures::stream::unfold(st, |mut st| async move {
        let rx = st.rx.as_mut()?;
        let mut out = Vec::new();
        if !st.started && st.kind == Kind::Chat {
            out.push((st.chunk)(
                json!({"role": "assistant", "content": ""}),
                None,
            ));
        }
        st.started = true;
        match st.asm.on_event(&st.state.tokenizer, rx.recv().await) {
            Piece::Text(t) => {
                if !t.is_empty() {
                    out.push((st.chunk)(json!({"content": t}), None));
                }
            }
            Piece::Done { text, reason } => {
                if !text.is_empty() {
                    out.push((st.chunk)(json!({"content": text}), None));
                }
                out.push((st.chunk)(json!({}), Some(reason)));
                if st.include_usage {
                    out.push((st.usage_chunk)(
                        st.prompt_tokens,
                        st.asm.completion_tokens,
                        st.kind,
                    ));
                }
                out.push(SseEvent::default().data("[DONE]"));
                // Dropping the receiver cancels the sequence (a stop string may end it early).
                st.rx = None;
            }
            Piece::Failed(e) => {
                out.push(SseEvent::default().data(e.body().to_string()));
                out.push(SseEvent::default().data("[DONE]"));
                st.rx = None;
            }
        }
        Some((futures::stream::iter(out.into_iter().map(Ok)), st))
    })
    .flatten();
    Sse::new(events).keep_alive(KeepAlive::default())
}
