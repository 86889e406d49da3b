//! vLLM's token endpoints and model details: `POST /tokenize` (a prompt, or chat messages
//! rendered by the chat template exactly as a chat request would be), `POST /detokenize`,
//! `GET /v1/models/{id}` with `max_model_len`, and `GET /version`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::intake::Admitted;
use super::types::{DetokenizeBody, TokenizeBody};
use super::validate::{invalid, refuse_unsupported};
use super::{AppState, GenerationError};

pub(super) async fn tokenize(State(state): State<Arc<AppState>>, body: Admitted) -> Response {
    json_answer(state, body, tokenize_body).await
}

/// `answer` run on the body through the intake's parsing slots (rendering and tokenizing a long
/// conversation takes a while: off the async workers), as JSON or the error.
async fn json_answer(
    state: Arc<AppState>,
    body: Admitted,
    answer: fn(&AppState, &[u8]) -> Result<Value, GenerationError>,
) -> Response {
    let parsing = state.clone();
    match state
        .intake
        .parse(move || answer(&parsing, &body.bytes))
        .await
    {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn tokenize_body(state: &AppState, body: &[u8]) -> Result<Value, GenerationError> {
    let limits = state.limits();
    let mut body: TokenizeBody = limits.parse(body)?;
    limits.check_model(body.model.as_deref())?;
    refuse_unsupported(&body.unsupported)?;
    let ids = match (body.prompt.take(), body.chat.messages.is_some()) {
        (Some(prompt), false) => {
            if let Some(name) = body.chat.given().first() {
                return Err(invalid(format!(
                    "`{name}` goes with `messages`, not `prompt`"
                )));
            }
            limits.text_ids(&prompt)?
        }
        (None, true) => {
            let (prompt, media) = limits.chat_prompt(&mut body.chat)?;
            if let Some(m) = media.first() {
                return Err(invalid(format!(
                    "{}: /tokenize does not run media through their encoders; send the text only",
                    m.part
                )));
            }
            prompt.ids
        }
        _ => return Err(invalid("send either `prompt` or `messages`")),
    };
    let token_strs = body.return_token_strs.unwrap_or(false).then(|| {
        ids.iter()
            .map(|&t| state.tokenizer.token_text(t))
            .collect::<Vec<_>>()
    });
    Ok(json!({
        "count": ids.len(),
        "max_model_len": state.config.max_context,
        "tokens": ids,
        "token_strs": token_strs,
    }))
}

pub(super) async fn detokenize(State(state): State<Arc<AppState>>, body: Admitted) -> Response {
    json_answer(state, body, detokenize_body).await
}

fn detokenize_body(state: &AppState, body: &[u8]) -> Result<Value, GenerationError> {
    let limits = state.limits();
    let body: DetokenizeBody = limits.parse(body)?;
    limits.check_model(body.model.as_deref())?;
    let vocab = limits.vocab_size;
    if let Some(bad) = body.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(invalid(format!(
            "token {bad} is out of range (vocab size {vocab})"
        )));
    }
    let text = state
        .tokenizer
        .decode(&body.tokens)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(json!({ "prompt": text }))
}

/// The served model as `/v1/models` lists it.
pub(super) fn model_card(state: &AppState) -> Value {
    json!({
        "id": state.config.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "omnishard",
        "max_model_len": state.config.max_context,
    })
}

pub(super) async fn model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id != state.config.model_name {
        return GenerationError::ModelNotFound {
            requested: id,
            served: state.config.model_name.clone(),
        }
        .into_response();
    }
    Json(model_card(&state)).into_response()
}

pub(super) async fn version() -> Json<Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}
