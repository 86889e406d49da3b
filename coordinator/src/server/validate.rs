//! Turning a request into work for the scheduler: the JSON body parsed and checked against the
//! served model (name, context, vocabulary, sampling ranges), the prompt built and tokenised, and
//! the client's `X-Request-Id` checked. Everything here is pure and synchronous, so the fuzz
//! target drives it directly ([`validate_body`]).

use axum::http::HeaderMap;
use serde_json::Value;

use super::conversation::{ToolChoice, conversation, forced_call, tool_choice};
use super::media::{MediaLimits, MediaRef, expand_media};
use super::shape::Shape;
use super::stream::PromptLogprobs;
use super::structured::structured_output;
use super::types::{ChatFields, CompletionBody, Kind, Prompt, Stop};
use crate::chat::output::OutputFormat;
use crate::chat::{ChatPrompt, ChatPrompter, PromptError};
use crate::error::GenerationError;
use crate::grammar::{Constraint, Grammars};
use crate::media::AudioInput;
use crate::media::vision::VisionInput;
use crate::sampling::{MAX_TOP_LOGPROBS, SamplingParams};
use crate::tokenizer::TextTokenizer;
use omnishard_model::MediaSpan;

/// The header a client may name its request with; echoed on the response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest `X-Request-Id` accepted: ids go into every log line of the request and to every
/// expert node, so they must stay short.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Most choices (`n`) one request may ask for: each is a sequence of its own.
pub const MAX_CHOICES: usize = 16;

/// Longest stop string accepted: matching costs grow with it on every generated token.
pub const MAX_STOP_BYTES: usize = 256;

/// Most stop strings one request may give (OpenAI's limit).
pub const MAX_STOPS: usize = 4;

pub(super) fn too_many_stops() -> String {
    format!("`stop` takes at most {MAX_STOPS} non-empty strings")
}

pub(super) fn stop_too_long(bytes: usize) -> String {
    format!("a `stop` string is {bytes} bytes long; at most {MAX_STOP_BYTES} are accepted")
}

/// What request validation needs to know about the served model.
pub struct RequestLimits<'a> {
    pub model_name: &'a str,
    pub max_context: usize,
    pub vocab_size: usize,
    pub tokenizer: &'a TextTokenizer,
    pub chat: &'a ChatPrompter,
    /// Constrained decoding, or why this server cannot do it.
    pub grammars: Result<&'a Grammars, &'a str>,
    /// Token positions the KV cache budget holds.
    pub kv_capacity: usize,
    /// Sequences the scheduler runs at once.
    pub max_sequences: usize,
    /// Special tokens in client text act as control tokens (else they are plain text).
    pub special_tokens_in_text: bool,
    /// The model's audio and vision towers, if it has them, and how much media a prompt may
    /// carry.
    pub audio: Option<&'a AudioInput>,
    pub vision: Option<&'a VisionInput>,
    pub media: &'a MediaLimits,
}

impl RequestLimits<'_> {
    /// The longest prompt text, in bytes, that could fit the context: a longer one is refused
    /// before the tokenizer spends time and memory on it (a 2 MB prompt cost ~200 MB).
    fn max_bytes(&self) -> usize {
        self.tokenizer.max_bytes_for(self.max_context)
    }

    /// Deserializes a request body once its shape is within bounds (see `shape`).
    pub(super) fn parse<T: serde::de::DeserializeOwned>(
        &self,
        body: &[u8],
    ) -> Result<T, GenerationError> {
        Shape::new(self.max_context, self.vocab_size).check(body)?;
        parse_body(body)
    }

    fn too_large(&self, bytes: usize) -> GenerationError {
        GenerationError::PromptTooLarge {
            bytes,
            max_bytes: self.max_bytes(),
            max_context: self.max_context,
        }
    }

    /// A request may name the served model, or none.
    pub(super) fn check_model(&self, model: Option<&str>) -> Result<(), GenerationError> {
        match model {
            Some(model) if model != self.model_name => Err(GenerationError::ModelNotFound {
                requested: model.to_string(),
                served: self.model_name.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// The tokens of a prompt text.
    pub(super) fn text_ids(&self, text: &str) -> Result<Vec<u32>, GenerationError> {
        if text.len() > self.max_bytes() {
            return Err(self.too_large(text.len()));
        }
        let ids = if self.special_tokens_in_text {
            self.tokenizer.encode(text)
        } else {
            self.tokenizer.encode_text(text)
        };
        ids.map_err(|e| invalid(e.to_string()))
    }

    /// The prompt of a conversation, through the chat template, and its media in prompt order
    /// (each still one placeholder token).
    pub(super) fn chat_prompt(
        &self,
        chat: &mut ChatFields,
    ) -> Result<(ChatPrompt, Vec<MediaRef>), GenerationError> {
        let (conv, media) = conversation(chat)?;
        let prompt = self
            .chat
            .encode(
                self.tokenizer,
                conv,
                self.special_tokens_in_text,
                self.max_bytes(),
            )
            .map_err(|e| match e {
                PromptError::TooLarge { bytes } => self.too_large(bytes),
                other => invalid(other.to_string()),
            })?;
        Ok((prompt, media))
    }
}

/// A validated request, ready for the scheduler.
pub(super) struct Prepared {
    /// Answers (choices) asked for.
    pub n: usize,
    /// The grammar each answer must follow: one state per choice, or none.
    pub constraints: Vec<Constraint>,
    pub prompt: Vec<u32>,
    pub ignore_eos: bool,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Tokens that end the answer besides the model's stop tokens.
    pub stop_token_ids: Vec<u32>,
    pub stream: bool,
    pub include_usage: bool,
    /// How the answer is split (reasoning, tool calls); everything is content for completions.
    pub format: OutputFormat,
    /// Return log-probabilities, with this many of the most likely tokens at each step.
    pub logprobs: Option<usize>,
    /// Text the answer starts with (completions' `echo`: the prompt).
    pub echo: Option<String>,
    /// Encoder embeddings in place of the prompt's media placeholders.
    pub media: Vec<MediaSpan>,
    /// The prompt's mRoPE positions when images make them other than 0..n, and the delta after.
    pub positions: Option<omnishard_model::Positions>,
    pub rope_delta: i64,
    /// What to return of the prompt's log-probabilities.
    pub prompt_logprobs: PromptLogprobs,
    /// Most likely tokens to compute at each prompt position, when any are returned.
    pub prompt_top_logprobs: Option<usize>,
    /// The client's end-user id, for the logs.
    pub user: Option<String>,
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

pub(super) fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, GenerationError> {
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
    limits.parse(body).and_then(|b| prepare(limits, b, kind))
}

pub(super) fn invalid(message: impl Into<String>) -> GenerationError {
    GenerationError::InvalidRequest(message.into())
}

fn prepare(
    limits: &RequestLimits<'_>,
    mut body: CompletionBody,
    kind: Kind,
) -> Result<Prepared, GenerationError> {
    limits.check_model(body.model.as_deref())?;
    refuse_unsupported(&body.unsupported)?;
    let mut chat = body.take_chat();
    if kind == Kind::Text {
        if let Some(name) = chat.given().first() {
            return Err(invalid(format!(
                "`{name}` belongs to /v1/chat/completions, not /v1/completions"
            )));
        }
    } else if body.prompt.is_some() {
        return Err(invalid(
            "`prompt` belongs to /v1/completions; chat takes `messages`",
        ));
    }
    let n = body.n.unwrap_or(1) as usize;
    let most = MAX_CHOICES.min(limits.max_sequences);
    if !(1..=most).contains(&n) {
        return Err(invalid(format!("n must be 1 to {most}, got {n}")));
    }
    let logprobs = logprobs_requested(&body, kind)?;
    let requested = structured_output(&mut body)?;
    let echo = body.echo.unwrap_or(false);
    if echo && kind == Kind::Chat {
        return Err(invalid(
            "`echo` belongs to /v1/completions; in chat, send the text as a final assistant message with continue_final_message",
        ));
    }
    let prompt_logprobs = PromptLogprobs {
        echoed: echo && logprobs.is_some(),
        separate: body.prompt_logprobs.is_some(),
    };
    let prompt_top_logprobs = match body.prompt_logprobs {
        Some(n) if n as usize > MAX_TOP_LOGPROBS => {
            return Err(invalid(format!(
                "prompt_logprobs must be 0 to {MAX_TOP_LOGPROBS}, got {n}"
            )));
        }
        Some(n) => Some((n as usize).max(logprobs.unwrap_or(0))),
        None if prompt_logprobs.echoed => logprobs,
        None => None,
    };
    let mut grammar = None;
    let mut echo_text = None;
    let mut media = Vec::new();
    let (prompt, format) = match kind {
        Kind::Chat => {
            let tools_offered = chat.tools.as_ref().is_some_and(|t| !t.is_empty());
            let choice = tool_choice(&chat)?;
            let calls_allowed = tools_offered && choice != ToolChoice::None;
            if calls_allowed && !limits.chat.parses_tool_calls() {
                return Err(invalid(
                    "this server reads no tool calls from answers (started with --tool-call-parser none); send tool_choice \"none\" or no tools",
                ));
            }
            grammar = forced_call(&chat, &choice)?;
            let (prompt, found) = limits.chat_prompt(&mut chat)?;
            media = found;
            let format = OutputFormat {
                // A grammar shapes the whole answer: there is no reasoning to split off.
                reasoning: limits.chat.parses_reasoning()
                    && grammar.is_none()
                    && requested.is_none(),
                starts_in_reasoning: prompt.opens_reasoning,
                tool_calls: calls_allowed,
            };
            (prompt.ids, format)
        }
        Kind::Text => {
            let ids = match body.prompt.take() {
                None => return Err(invalid("`prompt` is required")),
                Some(Prompt::Text(t)) => {
                    let ids = limits.text_ids(&t)?;
                    echo_text = Some(t);
                    ids
                }
                Some(Prompt::Texts(mut v)) if v.len() == 1 => {
                    let t = v.remove(0);
                    let ids = limits.text_ids(&t)?;
                    echo_text = Some(t);
                    ids
                }
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
            };
            (ids, OutputFormat::default())
        }
    };
    if prompt.is_empty() {
        return Err(invalid("the prompt is empty"));
    }
    let expanded = expand_media(limits.audio, limits.vision, limits.media, prompt, media)?;
    let (prompt, media) = (expanded.tokens, expanded.spans);
    // The prompt as sent: its text, or its tokens' text with special tokens written out.
    let echo = match (echo, echo_text) {
        (false, _) => None,
        (true, Some(text)) => Some(text),
        (true, None) => Some(
            limits
                .tokenizer
                .decode_with_special(&prompt)
                .map_err(|e| invalid(e.to_string()))?,
        ),
    };
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
    // Each choice holds a copy of the prompt in the KV cache.
    if n * (prompt.len() + 1) > limits.kv_capacity {
        return Err(invalid(format!(
            "{n} choices of a {}-token prompt need {} KV cache positions; this server's budget holds {}: ask for fewer choices",
            prompt.len(),
            n * (prompt.len() + 1),
            limits.kv_capacity
        )));
    }
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
    let vocab = limits.vocab_size;
    let out_of_vocab = |what: &str, t: u32| {
        invalid(format!(
            "{what}: token {t} is out of range (vocab size {vocab})"
        ))
    };
    let mut logit_bias = Vec::new();
    for (key, &bias) in body.logit_bias.iter().flatten() {
        let t: u32 = key
            .parse()
            .map_err(|_| invalid(format!("logit_bias keys are token ids, got `{key}`")))?;
        if t as usize >= vocab {
            return Err(out_of_vocab("logit_bias", t));
        }
        logit_bias.push((t, bias));
    }
    let stop_token_ids = body.stop_token_ids.take().unwrap_or_default();
    if let Some(&t) = stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(out_of_vocab("stop_token_ids", t));
    }
    let min_tokens = body.min_tokens.unwrap_or(0) as usize;
    if min_tokens > max_tokens {
        return Err(invalid(format!(
            "min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})"
        )));
    }
    let sampling = SamplingParams {
        temperature: body.temperature.unwrap_or(1.0),
        top_k,
        top_p: body.top_p.unwrap_or(1.0),
        min_p: body.min_p.unwrap_or(0.0),
        repetition_penalty: body.repetition_penalty.unwrap_or(1.0),
        presence_penalty: body.presence_penalty.unwrap_or(0.0),
        frequency_penalty: body.frequency_penalty.unwrap_or(0.0),
        logit_bias,
        min_tokens,
        seed: body.seed.unwrap_or_else(rand::random),
    };
    sampling.validate().map_err(invalid)?;
    let stop = match body.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
        return Err(invalid(too_many_stops()));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(invalid(stop_too_long(long.len())));
    }
    let grammar = match (grammar, requested) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "a forced tool call (tool_choice) and a structured output cannot be asked for together",
            ));
        }
        (g, r) => g.or(r),
    };
    let constraints = match &grammar {
        None => Vec::new(),
        Some(spec) => {
            let grammars = limits.grammars.map_err(|reason| {
                invalid(format!(
                    "constrained decoding is not available on this server: {reason}"
                ))
            })?;
            (0..n)
                .map(|_| {
                    grammars
                        .constraint(spec)
                        .map_err(|e| invalid(e.to_string()))
                })
                .collect::<Result<_, _>>()?
        }
    };
    Ok(Prepared {
        n,
        constraints,
        prompt,
        ignore_eos: body.ignore_eos.unwrap_or(false),
        max_tokens,
        sampling,
        stop,
        stop_token_ids,
        stream: body.stream.unwrap_or(false),
        include_usage: body
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        format,
        logprobs,
        echo,
        prompt_logprobs,
        prompt_top_logprobs,
        media,
        positions: expanded.positions,
        rope_delta: expanded.rope_delta,
        user: body.user,
    })
}

/// How many top log-probabilities per token the request asks for, if it asks: chat sends
/// `logprobs: true` and `top_logprobs: N`, completions `logprobs: N`.
fn logprobs_requested(body: &CompletionBody, kind: Kind) -> Result<Option<usize>, GenerationError> {
    let top_in_range = |n: u64, name: &str| {
        if n as usize > MAX_TOP_LOGPROBS {
            Err(invalid(format!(
                "{name} must be 0 to {MAX_TOP_LOGPROBS}, got {n}"
            )))
        } else {
            Ok(n as usize)
        }
    };
    match kind {
        Kind::Chat => {
            let on = match &body.logprobs {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(other) => {
                    return Err(invalid(format!(
                        "logprobs is true or false in chat, got {other}"
                    )));
                }
            };
            match (on, body.top_logprobs) {
                (true, top) => top_in_range(top.unwrap_or(0).into(), "top_logprobs").map(Some),
                (false, Some(_)) => Err(invalid("top_logprobs needs logprobs: true")),
                (false, None) => Ok(None),
            }
        }
        Kind::Text => {
            if body.top_logprobs.is_some() {
                return Err(invalid(
                    "top_logprobs belongs to chat; completions take logprobs: N",
                ));
            }
            match &body.logprobs {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) => top_in_range(n, "logprobs").map(Some),
                    None => Err(invalid(format!(
                        "logprobs is a number of top tokens (0 to {MAX_TOP_LOGPROBS}) in completions, got {v}"
                    ))),
                },
            }
        }
    }
}

/// Fields the server does not know are refused by name: ignored, they would change nothing the
/// client could see.
pub(super) fn refuse_unsupported(
    fields: &serde_json::Map<String, Value>,
) -> Result<(), GenerationError> {
    if fields.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = fields.keys().map(String::as_str).collect();
    Err(invalid(format!(
        "unsupported parameter(s): {}; remove them (this server would otherwise ignore them)",
        names.join(", ")
    )))
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
