//! The OpenAI-compatible HTTP API (axum): `POST /v1/chat/completions`, `POST /v1/completions`
//! (streamed as server-sent events ending in `data: [DONE]`, or whole), `GET /v1/models` and
//! `/v1/models/{id}`, `POST /tokenize` and `/detokenize`, `GET /version`, `GET /v1/stats`,
//! `GET /dashboard`,
//! `GET|POST /admin/nodes`, `GET /health` and `GET /metrics`. Errors use OpenAI's JSON error
//! shape ([`GenerationError`]).
//!
//! This file holds the shared state, the router and its middleware (request metrics, API key);
//! the request and response shapes are in `types`, request checking in `validate` (a chat's
//! messages, tools and tool choice in `conversation`, structured output in `structured`), the
//! completion endpoints in `completions`, answer assembly in `stream`, the token endpoints and
//! model details in `tokens`, the operational routes in `admin`. Starting a server is
//! [`crate::serve`]'s job.

mod admin;
mod completions;
mod conversation;
pub mod intake;
pub mod loading;
pub mod media;
pub mod priority;
mod shape;
pub mod shutdown;
mod stream;
mod structured;
mod tokens;
mod types;
mod validate;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};

pub use crate::error::GenerationError;
pub use validate::{
    MAX_REQUEST_ID_LEN, REQUEST_ID_HEADER, RequestLimits, client_request_id, validate_body,
};

use crate::chat::ChatPrompter;
use crate::engine::Engine;
use crate::grammar::Grammars;
use crate::metrics::Metrics;
use crate::scheduler::SchedulerHandle;
use crate::tokenizer::TextTokenizer;

/// Serving settings fixed at start-up.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model id clients must name (or omit).
    pub model_name: String,
    /// Bearer token required on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Prompt plus generated tokens per sequence.
    pub max_context: usize,
    /// Special tokens in client text act as control tokens (else they are plain text).
    pub special_tokens_in_text: bool,
    /// Token positions the KV cache budget holds.
    pub kv_capacity: usize,
    /// Sequences the scheduler runs at once.
    pub max_sequences: usize,
    /// How much media one prompt may carry.
    pub media: media::MediaLimits,
    /// Largest request body read.
    pub max_request_bytes: usize,
    /// Time a request body may take to arrive after its head.
    pub body_deadline: std::time::Duration,
}

pub struct AppState {
    pub engine: Arc<Engine>,
    pub tokenizer: Arc<TextTokenizer>,
    pub chat: Arc<ChatPrompter>,
    /// Constrained decoding, or why it is unavailable.
    pub grammars: Result<Grammars, String>,
    pub scheduler: SchedulerHandle,
    pub metrics: Arc<Metrics>,
    pub config: ServeConfig,
    /// Graceful shutdown: whether new requests are admitted, and those in flight.
    pub shutdown: Arc<shutdown::Shutdown>,
    /// How request bodies are read and parsed.
    pub intake: intake::Intake,
    created: u64,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(
        engine: Arc<Engine>,
        tokenizer: Arc<TextTokenizer>,
        chat: Arc<ChatPrompter>,
        grammars: Result<Grammars, String>,
        scheduler: SchedulerHandle,
        metrics: Arc<Metrics>,
        config: ServeConfig,
    ) -> Self {
        Self {
            intake: intake::Intake::new(config.max_request_bytes, config.body_deadline),
            engine,
            tokenizer,
            chat,
            grammars,
            scheduler,
            metrics,
            config,
            shutdown: Arc::default(),
            created: unix_now(),
            next_id: AtomicU64::new(1),
        }
    }

    fn limits(&self) -> RequestLimits<'_> {
        RequestLimits {
            model_name: &self.config.model_name,
            max_context: self.config.max_context,
            special_tokens_in_text: self.config.special_tokens_in_text,
            kv_capacity: self.config.kv_capacity,
            max_sequences: self.config.max_sequences,
            vocab_size: self.engine.config().vocab_size,
            tokenizer: &self.tokenizer,
            chat: &self.chat,
            grammars: self.grammars.as_ref().map_err(String::as_str),
            audio: self.engine.audio(),
            vision: self.engine.vision(),
            media: &self.config.media,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(completions::chat_completions))
        .route("/completions", post(completions::completions))
        .route("/models", get(admin::models))
        .route("/models/{id}", get(tokens::model))
        .route("/stats", get(admin::stats))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let admin = Router::new()
        .route("/nodes", get(admin::list_nodes).post(admin::add_node))
        .route("/nodes/{address}", delete(admin::remove_node))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_access,
        ));
    let tokens = Router::new()
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .nest("/v1", v1)
        .merge(tokens)
        .route("/version", get(tokens::version))
        .route("/dashboard", get(admin::dashboard))
        .nest("/admin", admin)
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .fallback(|| async { GenerationError::NoSuchEndpoint })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Label of requests that matched no route: one label for all of them, so probes of random
/// paths cannot blow up the metric's cardinality.
pub const UNMATCHED_ENDPOINT: &str = "unmatched";

/// Counts and times every request by the route it matched (the route's pattern, so a route
/// added later is labelled without touching this).
async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    // `Router::layer` runs after routing in axum 0.8, so the matched route is known here; the
    // fallback sets none.
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED_ENDPOINT, MatchedPath::as_str)
        .to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .requests
        .with_label_values(&[endpoint.as_str(), resp.status().as_str()])
        .inc();
    // The duration runs to the end of the body: a stream's response headers leave at once.
    let seconds = state
        .metrics
        .request_seconds
        .with_label_values(&[&endpoint]);
    let (parts, body) = resp.into_parts();
    let timed = TimedBody {
        inner: body,
        timer: Some((started, seconds)),
    };
    Response::from_parts(parts, axum::body::Body::new(timed))
}

/// A response body that records the request's duration when its last frame is sent (or when
/// it is dropped: the client went away).
struct TimedBody {
    inner: axum::body::Body,
    timer: Option<(Instant, prometheus::Histogram)>,
}

impl TimedBody {
    fn observe(&mut self) {
        if let Some((started, histogram)) = self.timer.take() {
            histogram.observe(started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for TimedBody {
    fn drop(&mut self) {
        self.observe();
    }
}

impl http_body::Body for TimedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.observe();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
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
            return GenerationError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// The admin API changes the cluster: off unless the server has an API key, and never for a
/// web page (a browser sends `Origin`; curl and SDKs do not), so a page open in a local browser
/// cannot add a node to a server on localhost.
async fn require_admin_access(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    if state.config.api_key.is_none() {
        return GenerationError::AdminForbidden(
            "the admin API is off: start the server with --api-key to use /admin/*".into(),
        )
        .into_response();
    }
    if req.headers().contains_key(header::ORIGIN) {
        return GenerationError::AdminForbidden(
            "admin calls from web pages (requests with an Origin header) are refused".into(),
        )
        .into_response();
    }
    require_api_key(State(state), req, next).await
}

/// Compares the SHA-256 digests of both in time independent of their contents and lengths (a
/// length check first would tell a client how long the key is).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn key_comparison_is_exact() {
        assert!(constant_time_eq(b"secret-key", b"secret-key"));
        for other in [&b"secret-kez"[..], b"secret-key ", b"", b"secret"] {
            assert!(!constant_time_eq(b"secret-key", other));
        }
    }
}
