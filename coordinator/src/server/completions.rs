//! `POST /v1/chat/completions` and `POST /v1/completions`: the request id (the client's
//! `X-Request-Id`, else the response id) and the request's span, validation off the async
//! workers, submission to the scheduler, then a whole or streamed answer. Every response of
//! these endpoints, errors included, carries the id back as `x-request-id`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tracing::Instrument;

use super::intake::Admitted;
use super::stream::{Answer, Outcome, stream_response, whole_response};
use super::types::{Header, Kind};
use super::validate::{Prepared, REQUEST_ID_HEADER, client_request_id, parse_and_prepare};
use super::{AppState, GenerationError, unix_now};
use crate::sampling::SamplingParams;
use crate::scheduler::{Event, Fork, GenerationRequest};

pub(super) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Admitted,
) -> Response {
    handle(state, &headers, body, Kind::Chat).await
}

pub(super) async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Admitted,
) -> Response {
    handle(state, &headers, body, Kind::Text).await
}

async fn handle(state: Arc<AppState>, headers: &HeaderMap, body: Admitted, kind: Kind) -> Response {
    let started = Instant::now();
    let given = match client_request_id(headers) {
        Ok(given) => given,
        // Nothing to echo: the id is what is wrong.
        Err(e) => return e.into_response(),
    };
    let response_id = format!(
        "{}-{}",
        kind.id_prefix(),
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let request_id = given.unwrap_or_else(|| response_id.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        model = %state.config.model_name,
        prompt_tokens = tracing::field::Empty,
    );
    let mut resp = generate(state, body, kind, response_id, &request_id, started)
        .instrument(span)
        .await;
    // Checked to be visible ASCII, or made by us: always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    resp
}

/// Runs inside the request's span.
async fn generate(
    state: Arc<AppState>,
    body: Admitted,
    kind: Kind,
    response_id: String,
    request_id: &str,
    started: Instant,
) -> Response {
    let span = tracing::Span::current();
    let in_flight = match state.shutdown.admit() {
        Ok(guard) => guard,
        Err(e) => return refused(e),
    };
    // Parsing and tokenising a long prompt takes a while: keep it off the async workers.
    let parsing = state.clone();
    let in_span = span.clone();
    let prepared = state
        .intake
        .parse(move || {
            let _span = in_span.enter();
            parse_and_prepare(&parsing.limits(), &body.bytes, kind)
        })
        .await;
    let mut prepared = match prepared {
        Ok(p) => p,
        Err(e) => return refused(e),
    };
    span.record("prompt_tokens", prepared.prompt.len());
    let receivers = match submit(&state, &mut prepared, request_id, &span) {
        Ok(rx) => rx,
        Err(e) => return refused(e),
    };
    tracing::info!(
        max_tokens = prepared.max_tokens,
        stream = prepared.stream,
        user = prepared.user.as_deref(),
        "request queued"
    );
    let answer = Answer {
        header: Header {
            id: response_id,
            created: unix_now(),
            model: state.config.model_name.clone(),
            kind,
        },
        stop: prepared.stop,
        format: prepared.format,
        logprobs: prepared.logprobs.is_some(),
        prompt_logprobs: prepared.prompt_logprobs,
        echo: prepared.echo,
        include_usage: prepared.include_usage,
        in_flight,
        outcome: Outcome::new(span, state.metrics.clone(), started, prepared.prompt.len()),
    };
    if prepared.stream {
        stream_response(state, answer, receivers).into_response()
    } else {
        whole_response(state, answer, receivers).await
    }
}

/// A request turned away before it reached the scheduler.
fn refused(e: GenerationError) -> Response {
    tracing::info!(status = e.status().as_u16(), error = %e, "request refused");
    e.into_response()
}

fn submit(
    state: &AppState,
    p: &mut Prepared,
    request_id: &str,
    span: &tracing::Span,
) -> Result<Vec<UnboundedReceiver<Event>>, GenerationError> {
    let (tx, rx) = unbounded_channel();
    let mut receivers = vec![rx];
    // Choices after the first: forks of the first once its prompt is computed, each with its
    // own seed (the request's plus its index) and grammar state.
    let mut constraints = std::mem::take(&mut p.constraints).into_iter();
    let first_constraint = constraints.next();
    let forks = (1..p.n)
        .map(|i| {
            let (tx, rx) = unbounded_channel();
            receivers.push(rx);
            Fork {
                sampling: SamplingParams {
                    seed: p.sampling.seed.wrapping_add(i as u64),
                    ..p.sampling.clone()
                },
                constraint: constraints.next(),
                events: tx,
            }
        })
        .collect();
    let req = GenerationRequest {
        id: request_id.to_string(),
        span: span.clone(),
        prompt: p.prompt.clone(),
        max_tokens: p.max_tokens,
        sampling: p.sampling.clone(),
        stop_tokens: {
            let mut stops = if p.ignore_eos {
                Vec::new()
            } else {
                state.tokenizer.stop_tokens().to_vec()
            };
            stops.extend(&p.stop_token_ids);
            stops
        },
        logprobs: p.logprobs,
        prompt_logprobs: p.prompt_top_logprobs,
        media: std::mem::take(&mut p.media),
        positions: p.positions.take(),
        rope_delta: p.rope_delta,
        constraint: first_constraint,
        forks,
        events: tx,
    };
    state.scheduler.submit(req)?;
    Ok(receivers)
}
