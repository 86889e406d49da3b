//! Turning a request into work for the scheduler: the JSON body parsed and checked against the
//! served model (name, context, vocabulary, sampling ranges), the prompt built and tokenised, and
//! the client's `X-Request-Id` checked. Everything here is pure and synchronous, so the fuzz
//! target drives it directly ([`validate_body`]).

use axum::http::HeaderMap;
use serde_json::Value;

use super::types::{CompletionBody, Content, Kind, Message, Prompt, Stop};
use crate::error::GenerationError;
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, TextTokenizer, chatml};

/// The header a client may name its request with; echoed on the response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest `X-Request-Id` accepted: ids go into every log line of the request and to every
/// expert node, so they must stay short.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Longest stop string accepted: matching costs grow with it on every generated token.
pub const MAX_STOP_BYTES: usize = 256;

/// What request validation needs to know about the served model.
pub struct RequestLimits<'a> {
    pub model_name: &'a str,
    pub max_context: usize,
    pub vocab_size: usize,
    pub tokenizer: &'a TextTokenizer,
    /// Special tokens in client text act as control tokens (else they are plain text).
    pub special_tokens_in_text: bool,
}

/// A validated request, ready for the scheduler.
pub(super) struct Prepared {
    pub prompt: Vec<u32>,
    pub ignore_eos: bool,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// The client's request id, if it sent one: 1 to [`MAX_REQUEST_ID_LEN`] visible ASCII characters
/// (no spaces or control characters, which would let a client forge or break log lines).
pub fn client_request_id(headers: &HeaderMap) -> Result<Option<String>, GenerationError> {
    let Some(value) = headers.get(REQUEST_ID_HEADER) else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    let invalid = |why: &str| {
        GenerationError::InvalidRequestId(format!(
            "invalid X-Request-Id header: {why}; send 1 to {MAX_REQUEST_ID_LEN} visible ASCII characters (no spaces), or no header to let the server choose"
        ))
    };
    if bytes.is_empty() {
        return Err(invalid("it is empty"));
    }
    if bytes.len() > MAX_REQUEST_ID_LEN {
        return Err(invalid(&format!("it is {} bytes long", bytes.len())));
    }
    if let Some(at) = bytes.iter().position(|b| !b.is_ascii_graphic()) {
        return Err(invalid(&format!(
            "byte {at} (0x{:02x}) is not a visible ASCII character",
            bytes[at]
        )));
    }
    // Every byte is visible ASCII, so this is valid UTF-8.
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

pub(super) fn parse_body(body: &[u8]) -> Result<CompletionBody, GenerationError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if matches!(path.as_str(), "." | "?" | "") {
            GenerationError::InvalidRequest(format!("invalid JSON body: {inner}"))
        } else {
            GenerationError::InvalidRequest(format!("invalid field `{path}`: {inner}"))
        }
    })
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
    parse_and_prepare(limits, body, kind)
        .map(|p| (p.prompt.len(), p.max_tokens))
        .map_err(|e| e.to_string())
}

pub(super) fn parse_and_prepare(
    limits: &RequestLimits<'_>,
    body: &[u8],
    kind: Kind,
) -> Result<Prepared, GenerationError> {
    parse_body(body).and_then(|b| prepare(limits, b, kind))
}

fn invalid(message: impl Into<String>) -> GenerationError {
    GenerationError::InvalidRequest(message.into())
}

fn prepare(
    limits: &RequestLimits<'_>,
    mut body: CompletionBody,
    kind: Kind,
) -> Result<Prepared, GenerationError> {
    if let Some(model) = &body.model
        && model != limits.model_name
    {
        return Err(GenerationError::ModelNotFound {
            requested: model.clone(),
            served: limits.model_name.to_string(),
        });
    }
    if body.n.is_some_and(|n| n != 1) {
        return Err(invalid("only n = 1 is supported"));
    }
    if body
        .logprobs
        .as_ref()
        .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
    {
        return Err(invalid("logprobs are not supported"));
    }
    // A text of more bytes than `max_context` tokens can hold cannot fit: refuse it before the
    // tokenizer spends time and memory on it (a 2 MB prompt cost ~200 MB to tokenize).
    let max_bytes = limits.tokenizer.max_bytes_for(limits.max_context);
    let fits = |text: &str| {
        if text.len() > max_bytes {
            return Err(GenerationError::PromptTooLarge {
                bytes: text.len(),
                max_bytes,
                max_context: limits.max_context,
            });
        }
        Ok(())
    };
    let tok = limits.tokenizer;
    let trusted = limits.special_tokens_in_text;
    let encode = |text: &str| {
        fits(text)?;
        let ids = if trusted {
            tok.encode(text)
        } else {
            tok.encode_text(text)
        };
        ids.map_err(|e| invalid(e.to_string()))
    };
    let prompt = match kind {
        Kind::Chat => {
            let messages = body
                .messages
                .take()
                .ok_or_else(|| invalid("`messages` is required"))?;
            let turns = chat_turns(messages)?;
            let rendered = chatml(&turns);
            fits(&rendered)?;
            let ids = if trusted {
                tok.encode(&rendered)
            } else {
                tok.encode_chatml(&turns)
            };
            ids.map_err(|e| invalid(e.to_string()))?
        }
        Kind::Text => match body.prompt.take() {
            None => return Err(invalid("`prompt` is required")),
            Some(Prompt::Text(t)) => encode(&t)?,
            Some(Prompt::Texts(v)) if v.len() == 1 => encode(&v[0])?,
            Some(Prompt::Texts(_)) => {
                return Err(invalid("exactly one prompt per request is supported"));
            }
            Some(Prompt::Tokens(ids)) => {
                let vocab = limits.vocab_size;
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(invalid(format!(
                        "prompt token {bad} is out of range (vocab size {vocab})"
                    )));
                }
                ids
            }
        },
    };
    if prompt.is_empty() {
        return Err(invalid("the prompt is empty"));
    }
    let max_context = limits.max_context;
    let too_long = |requested: usize| GenerationError::ContextLengthExceeded {
        max_context,
        prompt: prompt.len(),
        requested,
    };
    if prompt.len() >= max_context {
        return Err(too_long(1));
    }
    let room = max_context - prompt.len();
    let max_tokens = match body.max_tokens.or(body.max_completion_tokens) {
        Some(0) => return Err(invalid("max_tokens must be at least 1")),
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
            return Err(invalid(format!(
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
    sampling.validate().map_err(invalid)?;
    let stop = match body.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(invalid("`stop` takes at most 4 non-empty strings"));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(invalid(format!(
            "a `stop` string is {} bytes long; at most {MAX_STOP_BYTES} are accepted",
            long.len()
        )));
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

fn chat_turns(messages: Vec<Message>) -> Result<Vec<ChatMessage>, GenerationError> {
    if messages.is_empty() {
        return Err(invalid("`messages` must not be empty"));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(invalid(format!(
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
                            return Err(invalid(format!(
                                "messages[{i}]: a text content part needs `text`"
                            )));
                        }
                        (other, _) => {
                            return Err(invalid(format!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn id_of(value: &[u8]) -> Result<Option<String>, GenerationError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            REQUEST_ID_HEADER,
            HeaderValue::from_bytes(value).expect("header value"),
        );
        client_request_id(&headers)
    }

    #[test]
    fn request_ids_are_checked() {
        assert_eq!(client_request_id(&HeaderMap::new()), Ok(None));
        assert_eq!(id_of(b"test-trace-42"), Ok(Some("test-trace-42".into())));
        let longest = "a".repeat(MAX_REQUEST_ID_LEN);
        assert_eq!(id_of(longest.as_bytes()), Ok(Some(longest.clone())));
        for bad in [
            &b""[..],
            format!("{longest}a").as_bytes(),
            b"two words",
            b"tab\there",
            "caf\u{e9}".as_bytes(),
        ] {
            let err = id_of(bad).expect_err("must be refused");
            assert!(
                matches!(err, GenerationError::InvalidRequestId(_)),
                "{err:?}"
            );
            assert!(err.to_string().contains("X-Request-Id"), "{err}");
        }
    }
}
