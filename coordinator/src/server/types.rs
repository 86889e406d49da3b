//! OpenAI's request and response shapes for `/v1/completions` and `/v1/chat/completions`:
//! the body as it is parsed, and the JSON objects sent back (whole responses, stream chunks,
//! usage). Reference: <https://platform.openai.com/docs/api-reference/chat>.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::chat::output::{Answer, ParsedToolCall};
use crate::sampling::TokenLogprobs;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content: text, or media (OpenAI's `input_audio` and `image_url`,
/// vLLM's `audio_url` and `video_url`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub input_audio: Option<InputAudio>,
    pub audio_url: Option<MediaUrl>,
    /// Read so the part parses, then refused by type: images and video are not wired in yet.
    #[serde(rename = "image_url")]
    pub _image_url: Option<MediaUrl>,
    #[serde(rename = "video_url")]
    pub _video_url: Option<MediaUrl>,
}

/// OpenAI's `input_audio`: base64 data and its format.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InputAudio {
    pub data: String,
    pub format: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MediaUrl {
    pub url: String,
    /// OpenAI's image detail level; accepted, and changes nothing (the processor's rules set the
    /// resolution).
    #[serde(rename = "detail")]
    _detail: Option<String>,
}

/// One chat message as OpenAI's SDK sends it, tool calls and tool results included.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Message {
    pub role: String,
    /// `null` (or absent) only on an assistant message that carries tool calls.
    #[serde(default)]
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<ToolCall>>,
    pub tool_call_id: Option<String>,
    /// A reasoning model's earlier thinking, as vLLM returns it (and Qwen3's template reads it).
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: CalledFunction,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CalledFunction {
    pub name: String,
    /// A JSON string as OpenAI sends it (an object is accepted too).
    pub arguments: Value,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The body of both completion endpoints; which of `messages` / `prompt` is required depends on
/// the endpoint. A field this server does not know lands in `unsupported` and is refused by name:
/// a parameter silently ignored is a wrong answer the client cannot see.
#[derive(Debug, Deserialize)]
pub(super) struct CompletionBody {
    pub model: Option<String>,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension (as vLLM): -1 or absent means no limit.
    pub top_k: Option<i64>,
    /// Extension (as vLLM).
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string, as OpenAI's) to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// Extension (as vLLM).
    pub min_p: Option<f32>,
    /// Extension (as vLLM): stop tokens and stop token ids are barred before this many tokens.
    pub min_tokens: Option<u32>,
    /// Extension (as vLLM): more tokens that end the answer (kept out of the text).
    pub stop_token_ids: Option<Vec<u32>>,
    /// Extension (as vLLM): keep generating past stop tokens, up to max_tokens.
    pub ignore_eos: Option<bool>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    /// Chat: `true` to return each token's log-probability. Completions: how many of the most
    /// likely tokens to return with each (0 to 20).
    pub logprobs: Option<Value>,
    /// Chat: how many of the most likely tokens to return with each (0 to 20).
    pub top_logprobs: Option<u32>,
    /// Completions: the answer starts with the prompt's text (with `logprobs`, the prompt
    /// tokens' log-probabilities come first too).
    pub echo: Option<bool>,
    /// Extension (as vLLM): the prompt tokens' log-probabilities, with this many of the most
    /// likely tokens at each position (0 to 20), as the choice's `prompt_logprobs`.
    pub prompt_logprobs: Option<u32>,
    /// Structured output (OpenAI's): `text`, `json_object` or `json_schema`.
    pub response_format: Option<ResponseFormat>,
    /// vLLM's structured-output extensions: the answer matches this JSON schema, regular
    /// expression or one of these strings.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    /// vLLM's newer form of the same.
    pub structured_outputs: Option<StructuredOutputs>,
    // The chat fields one by one, not a flattened `ChatFields`: serde reports errors inside a
    // flattened struct without the field's name.
    pub messages: Option<Vec<Message>>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    /// OpenAI's end-user id: only logged.
    pub user: Option<String>,
    #[serde(flatten)]
    pub unsupported: serde_json::Map<String, Value>,
}

impl CompletionBody {
    /// The chat fields, moved out.
    pub fn take_chat(&mut self) -> ChatFields {
        ChatFields {
            messages: self.messages.take(),
            tools: self.tools.take(),
            tool_choice: self.tool_choice.take(),
            chat_template_kwargs: self.chat_template_kwargs.take(),
            add_generation_prompt: self.add_generation_prompt.take(),
            continue_final_message: self.continue_final_message.take(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JsonSchemaFormat {
    /// Required by OpenAI; it names the schema for the client only.
    #[serde(rename = "name")]
    _name: String,
    #[serde(rename = "description")]
    _description: Option<String>,
    /// Absent: any JSON value.
    pub schema: Option<Value>,
    /// The schema is always enforced, so `strict` changes nothing.
    #[serde(rename = "strict")]
    _strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StructuredOutputs {
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
}

/// What a chat request says about its conversation; `/tokenize` takes the same.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ChatFields {
    pub messages: Option<Vec<Message>>,
    /// Function tools the model may call; rendered into the prompt by the chat template.
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    /// Variables for the chat template (vLLM's extension), e.g. `{"enable_thinking": false}`.
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Open a new assistant turn after the messages (default true).
    pub add_generation_prompt: Option<bool>,
    /// Continue the final (assistant) message instead of opening a new turn.
    pub continue_final_message: Option<bool>,
}

impl ChatFields {
    /// The fields that were given, by name.
    pub fn given(&self) -> Vec<&'static str> {
        [
            ("messages", self.messages.is_some()),
            ("tools", self.tools.is_some()),
            ("tool_choice", self.tool_choice.is_some()),
            ("chat_template_kwargs", self.chat_template_kwargs.is_some()),
            (
                "add_generation_prompt",
                self.add_generation_prompt.is_some(),
            ),
            (
                "continue_final_message",
                self.continue_final_message.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }
}

/// `POST /tokenize` (vLLM's): a `prompt`, or chat `messages` rendered by the chat template.
#[derive(Debug, Deserialize)]
pub(super) struct TokenizeBody {
    pub model: Option<String>,
    pub prompt: Option<String>,
    #[serde(flatten)]
    pub chat: ChatFields,
    /// Also return each token's text.
    pub return_token_strs: Option<bool>,
    #[serde(flatten)]
    pub unsupported: serde_json::Map<String, Value>,
}

/// `POST /detokenize` (vLLM's).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DetokenizeBody {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

/// Which endpoint a request came through: it decides the prompt field, the defaults and the
/// shape of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Chat,
    Text,
}

impl Kind {
    /// Prefix of the response ids (`chatcmpl-7`, `cmpl-7`), as OpenAI's.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        }
    }

    /// `object` of a stream chunk.
    fn chunk_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        }
    }
}

/// One finished answer of a request.
pub(super) struct Choice<'a> {
    pub answer: &'a Answer,
    pub logprobs: Option<&'a [LogprobEntry]>,
    /// vLLM's `prompt_logprobs`, when asked for.
    pub prompt_logprobs: Option<&'a Value>,
    pub reason: &'a str,
}

/// One token's log-probability and the most likely alternatives, with their texts; none for
/// the prompt's first token (echoed with `logprobs`), which nothing predicts.
#[derive(Debug, Clone)]
pub(super) struct LogprobEntry {
    pub token: String,
    pub logprob: Option<f32>,
    pub top: Option<Vec<(String, f32)>>,
}

/// vLLM's `prompt_logprobs`: per prompt token, null for the first, else an object from token id
/// to `{logprob, rank, decoded_token}` holding the prompt's token and the most likely ones.
pub(super) fn prompt_logprobs_json(
    tokens: &[(u32, Option<TokenLogprobs>)],
    text: impl Fn(u32) -> String,
) -> Value {
    let entry = |&(token, ref lp): &(u32, Option<TokenLogprobs>)| {
        let Some(lp) = lp else {
            return Value::Null;
        };
        let mut map = serde_json::Map::new();
        for (rank, &(id, logprob)) in lp.top.iter().enumerate() {
            map.insert(
                id.to_string(),
                json!({"logprob": logprob, "rank": rank + 1, "decoded_token": text(id)}),
            );
        }
        map.entry(token.to_string()).or_insert_with(
            || json!({"logprob": lp.logprob, "rank": lp.rank, "decoded_token": text(token)}),
        );
        Value::Object(map)
    };
    Value::Array(tokens.iter().map(entry).collect())
}

/// `logprobs` of a choice in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes,
/// top_logprobs}]}`, completions' `{tokens, token_logprobs, top_logprobs, text_offset}` (offsets
/// from `offset`, where these tokens' text starts in the answer). Null when not asked for.
fn logprobs_json(kind: Kind, entries: Option<&[LogprobEntry]>, offset: usize) -> Value {
    let Some(entries) = entries else {
        return Value::Null;
    };
    let bytes = |t: &str| t.as_bytes().to_vec();
    match kind {
        Kind::Chat => {
            let content: Vec<Value> = entries
                .iter()
                .map(|e| {
                    let top: Vec<Value> = e
                        .top
                        .iter()
                        .flatten()
                        .map(|(t, l)| json!({"token": t, "logprob": l, "bytes": bytes(t)}))
                        .collect();
                    json!({"token": e.token, "logprob": e.logprob, "bytes": bytes(&e.token), "top_logprobs": top})
                })
                .collect();
            json!({ "content": content })
        }
        Kind::Text => {
            let mut at = offset;
            let mut offsets = Vec::with_capacity(entries.len());
            for e in entries {
                offsets.push(at);
                at += e.token.len();
            }
            let top: Vec<Value> = entries
                .iter()
                .map(|e| match &e.top {
                    Some(top) => {
                        Value::Object(top.iter().map(|(t, l)| (t.clone(), json!(l))).collect())
                    }
                    None => Value::Null,
                })
                .collect();
            json!({
                "tokens": entries.iter().map(|e| e.token.as_str()).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

/// A tool call as OpenAI returns it; streamed calls carry their `index`.
pub(super) fn tool_call_json(call: &ParsedToolCall, index: Option<usize>) -> Value {
    let id = format!("call_{:024x}", rand::random::<u128>() >> 32);
    let mut v = json!({"id": id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}});
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

pub(super) fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// What every response object of one request shares.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
}

impl Header {
    /// The whole (non-streamed) response.
    /// The whole (non-streamed) response, with one choice per answer, in order.
    pub fn completion(&self, choices: &[Choice<'_>], usage: Value) -> Value {
        let Header {
            id, created, model, ..
        } = self;
        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, c)| self.choice_json(index, c))
            .collect();
        let object = match self.kind {
            Kind::Chat => "chat.completion",
            Kind::Text => "text_completion",
        };
        json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": choices,
            "usage": usage,
        })
    }

    fn choice_json(&self, index: usize, c: &Choice<'_>) -> Value {
        let logprobs = logprobs_json(self.kind, c.logprobs, 0);
        let answer = c.answer;
        let mut choice = match self.kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": answer.content});
                if let Some(reasoning) = &answer.reasoning {
                    message["reasoning_content"] = json!(reasoning);
                }
                if !answer.tool_calls.is_empty() {
                    if answer.content.is_empty() {
                        message["content"] = Value::Null;
                    }
                    let calls: Vec<Value> = answer
                        .tool_calls
                        .iter()
                        .map(|c| tool_call_json(c, None))
                        .collect();
                    message["tool_calls"] = Value::Array(calls);
                }
                json!({"index": index, "message": message, "finish_reason": c.reason, "logprobs": logprobs})
            }
            Kind::Text => {
                json!({"index": index, "text": answer.content, "finish_reason": c.reason, "logprobs": logprobs})
            }
        };
        if let Some(p) = c.prompt_logprobs {
            choice["prompt_logprobs"] = p.clone();
        }
        choice
    }

    /// One stream chunk: `delta` as chat sends it (`{"role"?, "content"?}`); completions send
    /// only its text.
    pub fn chunk(
        &self,
        index: usize,
        delta: Value,
        logprobs: Option<&[LogprobEntry]>,
        reason: Option<&str>,
        text_offset: usize,
    ) -> Value {
        let Header {
            id, created, model, ..
        } = self;
        let logprobs = logprobs_json(self.kind, logprobs, text_offset);
        match self.kind {
            Kind::Chat => json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}],
            }),
            Kind::Text => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": delta.get("content").cloned().unwrap_or(json!("")), "finish_reason": reason, "logprobs": logprobs}],
            }),
        }
    }

    /// The usage chunk sent last with `stream_options.include_usage`.
    pub fn usage_chunk(&self, prompt: usize, completion: usize) -> Value {
        json!({"id": self.id, "object": self.kind.chunk_object(), "created": self.created, "model": self.model, "choices": [], "usage": usage(prompt, completion)})
    }
}
