//! The one error type of the HTTP API, generation failures included: every variant maps, in one
//! exhaustive `match`, to the HTTP status and OpenAI's error `type` and `code`, so a new failure
//! cannot reach a client without someone deciding what it looks like. The JSON shape is OpenAI's:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use omnishard_model::{ExpertError, ModelError};
use serde_json::{Value, json};

/// Why a request got no (or only part of a) completion.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerationError {
    /// The body or a parameter is malformed or unsupported.
    #[error("{0}")]
    InvalidRequest(String),
    /// The client's `X-Request-Id` header cannot be used as a request id.
    #[error("{0}")]
    InvalidRequestId(String),
    /// `/v1/*` or `/admin/*` without the right bearer token.
    #[error("missing or invalid API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// The request names a model this server does not serve.
    #[error("model `{requested}` does not exist; this server serves `{served}`")]
    ModelNotFound { requested: String, served: String },
    /// No route matches the path.
    #[error("no such endpoint")]
    NoSuchEndpoint,
    /// Prompt plus requested tokens do not fit the context.
    #[error(
        "this model's context is {max_context} tokens; the prompt has {prompt} and {requested} more were requested"
    )]
    ContextLengthExceeded {
        max_context: usize,
        prompt: usize,
        requested: usize,
    },
    /// The HTTP body is over the server's size limit.
    #[error("the request body is too large: {0}")]
    BodyTooLarge(String),
    /// The body did not arrive in time (seconds allowed).
    #[error("the request body did not arrive within {0} s; send it at once after the request head")]
    BodyTimeout(u64),
    /// The prompt's text is longer than any `max_context`-token prompt can be: refused unread.
    #[error(
        "the prompt is {bytes} bytes; this model's context of {max_context} tokens holds at most {max_bytes} bytes of text"
    )]
    PromptTooLarge {
        bytes: usize,
        max_bytes: usize,
        max_context: usize,
    },
    /// The scheduler's queue is full: back-pressure, the client should retry.
    #[error("the request queue is full; retry later")]
    QueueFull,
    /// The server is shutting down: it takes no new requests (another replica should).
    #[error("the server is shutting down; retry on another replica")]
    ShuttingDown,
    /// The scheduler thread never started or has died; nothing can be generated.
    #[error("the scheduler has stopped: {reason}")]
    SchedulerStopped { reason: String },
    /// No live expert node holds an expert the batch needed (the node or nodes are named).
    #[error("{0}")]
    ExpertNodesUnavailable(String),
    /// The forward pass failed for another reason.
    #[error("{0}")]
    ForwardFailed(String),
    /// Generated tokens could not be turned into text.
    #[error("{0}")]
    Decode(String),
    /// An admin call about expert nodes on a server whose experts are in-process.
    #[error(
        "this server runs its experts in-process; start it with --nodes or --placement to manage nodes"
    )]
    NoExpertNodes,
    /// An expert node that asked to join was refused (unreachable, another model, ...).
    #[error("{0}")]
    NodeRejected(String),
    /// An admin call that is not allowed: the admin API is off (no key), or the call came from
    /// a web page (an `Origin` header).
    #[error("{0}")]
    AdminForbidden(String),
    /// A body in a content type the endpoint does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Too many admin operations at once.
    #[error("{0}")]
    AdminBusy(String),
    /// A bug or a lost worker task: nothing the client can change.
    #[error("{0}")]
    Internal(String),
}

impl GenerationError {
    /// HTTP status, OpenAI error `type` and `code`. No wildcard arm: every variant is decided here.
    pub fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        use GenerationError::*;
        const INVALID: &str = "invalid_request_error";
        const SERVER: &str = "server_error";
        match self {
            InvalidRequest(_) => (StatusCode::BAD_REQUEST, INVALID, None),
            InvalidRequestId(_) => (StatusCode::BAD_REQUEST, INVALID, Some("invalid_request_id")),
            Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
            ),
            ModelNotFound { .. } => (StatusCode::NOT_FOUND, INVALID, Some("model_not_found")),
            NoSuchEndpoint => (StatusCode::NOT_FOUND, INVALID, Some("not_found")),
            BodyTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                INVALID,
                Some("body_too_large"),
            ),
            BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, INVALID, Some("body_timeout")),
            // 400, as OpenAI and vLLM answer a context overflow (clients match on the code).
            ContextLengthExceeded { .. } | PromptTooLarge { .. } => (
                StatusCode::BAD_REQUEST,
                INVALID,
                Some("context_length_exceeded"),
            ),
            QueueFull => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("queue_full"),
            ),
            SchedulerStopped { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, SERVER, Some("unavailable"))
            }
            ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                SERVER,
                Some("shutting_down"),
            ),
            ExpertNodesUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                SERVER,
                Some("expert_nodes_unavailable"),
            ),
            ForwardFailed(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                SERVER,
                Some("generation_failed"),
            ),
            Decode(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                SERVER,
                Some("decode_error"),
            ),
            NoExpertNodes => (StatusCode::BAD_REQUEST, INVALID, Some("no_expert_nodes")),
            NodeRejected(_) => (StatusCode::BAD_REQUEST, INVALID, Some("node_rejected")),
            AdminForbidden(_) => (StatusCode::FORBIDDEN, "permission_error", Some("forbidden")),
            UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                INVALID,
                Some("unsupported_media_type"),
            ),
            AdminBusy(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("admin_busy"),
            ),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, SERVER, Some("internal")),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The JSON error object, also sent as the last event of a stream that fails.
    pub fn body(&self) -> Value {
        let (_, kind, code) = self.parts();
        json!({"error": {"message": self.to_string(), "type": kind, "param": null, "code": code}})
    }

    /// What a failed forward pass means for the requests in it. Exhaustive on purpose: a new
    /// model or expert error must be classified, not silently reported as a 500.
    pub fn from_forward(e: &ModelError) -> Self {
        let message = e.to_string();
        match e {
            ModelError::Experts { source, .. } => match source {
                // A node failed or missed its deadline, no live replica of an expert is left, or
                // no node holds the expert at all: the cluster, not the request, is at fault, and
                // a retry may succeed.
                ExpertError::Node { .. } | ExpertError::NoLiveHolder { .. } => {
                    Self::ExpertNodesUnavailable(message)
                }
                ExpertError::UnknownLayer { .. }
                | ExpertError::InvalidInput { .. }
                | ExpertError::Dtype { .. }
                | ExpertError::NotHeld { .. }
                | ExpertError::InvalidRouting { .. }
                | ExpertError::Candle(_)
                | ExpertError::Rejected { .. }
                | ExpertError::Inconsistent(_) => Self::ForwardFailed(message),
            },
            ModelError::Checkpoint(_) | ModelError::Input(_) | ModelError::Candle(_) => {
                Self::ForwardFailed(message)
            }
        }
    }
}

impl IntoResponse for GenerationError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.body())).into_response();
        if matches!(self, GenerationError::ShuttingDown) {
            // Seconds; by then a load balancer has moved the client to another replica.
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_clients_rely_on() {
        let cases = [
            (GenerationError::InvalidRequest("x".into()), 400, None),
            (GenerationError::Unauthorized, 401, Some("invalid_api_key")),
            (
                GenerationError::ModelNotFound {
                    requested: "a".into(),
                    served: "b".into(),
                },
                404,
                Some("model_not_found"),
            ),
            (
                GenerationError::ContextLengthExceeded {
                    max_context: 8,
                    prompt: 8,
                    requested: 1,
                },
                400,
                Some("context_length_exceeded"),
            ),
            (
                GenerationError::PromptTooLarge {
                    bytes: 9,
                    max_bytes: 8,
                    max_context: 2,
                },
                400,
                Some("context_length_exceeded"),
            ),
            (
                GenerationError::BodyTooLarge("x".into()),
                413,
                Some("body_too_large"),
            ),
            (GenerationError::BodyTimeout(15), 408, Some("body_timeout")),
            (
                GenerationError::AdminForbidden("x".into()),
                403,
                Some("forbidden"),
            ),
            (
                GenerationError::UnsupportedMediaType("x".into()),
                415,
                Some("unsupported_media_type"),
            ),
            (
                GenerationError::AdminBusy("x".into()),
                429,
                Some("admin_busy"),
            ),
            (GenerationError::QueueFull, 429, Some("queue_full")),
            (
                GenerationError::ExpertNodesUnavailable("n".into()),
                503,
                Some("expert_nodes_unavailable"),
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            let body = e.body();
            assert_eq!(body["error"]["code"], json!(code), "{e:?}");
            assert_eq!(body["error"]["message"], json!(e.to_string()));
            assert!(body["error"]["param"].is_null());
        }
    }

    #[test]
    fn an_expert_no_node_holds_is_unavailable_like_a_failed_node() {
        let cases = [
            ExpertError::Node {
                node: "a".into(),
                layer: 0,
                reason: "down".into(),
            },
            ExpertError::NoLiveHolder {
                layer: 0,
                expert: 1,
                reason: "no node in the cluster holds expert 1".into(),
            },
        ];
        for source in cases {
            let e = GenerationError::from_forward(&ModelError::Experts { layer: 0, source });
            assert_eq!(e.status().as_u16(), 503, "{e:?}");
            assert_eq!(e.body()["error"]["code"], json!("expert_nodes_unavailable"));
        }
    }
}
