//! The checkpoint's chat template, rendered as Hugging Face transformers renders it
//! (`PreTrainedTokenizerBase.apply_chat_template`): Jinja2 with `trim_blocks` and
//! `lstrip_blocks`, loop controls, Python's string methods, a `tojson` that writes what Python's
//! `json.dumps(ensure_ascii=False)` writes, `raise_exception`, the tokenizer's special tokens as
//! variables, and `continue_final_message` cutting the prompt after the last message's text.
//! Rendered with `minijinja`, as text-generation-inference and mistral.rs do.
//!
//! Where the template comes from, first found: `--chat-template FILE`, the checkpoint's
//! `chat_template.jinja`, `chat_template.json` (`{"chat_template": …}`), then the
//! `chat_template` of `tokenizer_config.json`. A checkpoint with none gets plain ChatML, with a
//! warning.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value as JinjaValue};
use serde_json::{Map, Value};

/// ChatML, for checkpoints that ship no template: each turn `<|im_start|>ROLE\nCONTENT<|im_end|>\n`,
/// then the opened assistant turn.
const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + \
                      (message.content if message.content is string else '') + '<|im_end|>\\n' }}\
                      {%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

const TEMPLATE_NAME: &str = "chat_template";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read chat template {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("chat template from {origin} does not compile: {reason}")]
    Compile { origin: String, reason: String },
    /// The template refused the conversation (`raise_exception`) or failed on it.
    #[error("the chat template cannot render this conversation: {0}")]
    Render(String),
    #[error("{0}")]
    Request(String),
}

/// Where the template was found; shown at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateOrigin {
    File(PathBuf),
    /// No template in the checkpoint: ChatML.
    ChatMlFallback,
}

impl std::fmt::Display for TemplateOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateOrigin::File(p) => write!(f, "{}", p.display()),
            TemplateOrigin::ChatMlFallback => {
                f.write_str("built-in ChatML (the checkpoint has none)")
            }
        }
    }
}

/// One conversation to render, as `apply_chat_template` takes it. Messages and tools are JSON
/// objects as the client sent them (key order kept: `tojson` of a tool must print what Python
/// would).
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    pub messages: Vec<Value>,
    pub tools: Option<Vec<Value>>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// Extra template variables (`chat_template_kwargs`, e.g. `enable_thinking`).
    pub kwargs: Map<String, Value>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    origin: TemplateOrigin,
    /// Whether the template writes `<think>` and `<tool_call>`: it was made for a model that
    /// reasons and calls tools in those tags.
    writes_think: bool,
    writes_tool_calls: bool,
    /// `bos_token`, `eos_token`, … of `tokenizer_config.json`, as Hugging Face passes them.
    special_tokens: Map<String, Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The template of the checkpoint in `dir`, or `file` when given.
    pub fn load(dir: &Path, file: Option<&Path>) -> Result<Self, TemplateError> {
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let special_tokens = config
            .as_ref()
            .map(special_token_variables)
            .unwrap_or_default();
        let (source, origin) = match file {
            Some(path) => (read_text(path)?, TemplateOrigin::File(path.to_path_buf())),
            None => match find_in_checkpoint(dir, config.as_ref())? {
                Some(found) => found,
                None => {
                    tracing::warn!(
                        model = %dir.display(),
                        "the checkpoint has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json); using plain ChatML — pass --chat-template FILE to use the model's own"
                    );
                    (CHATML.to_string(), TemplateOrigin::ChatMlFallback)
                }
            },
        };
        Self::from_source(source, origin, special_tokens)
    }

    fn from_source(
        source: String,
        origin: TemplateOrigin,
        special_tokens: Map<String, Value>,
    ) -> Result<Self, TemplateError> {
        let writes_think = source.contains("<think>");
        let writes_tool_calls = source.contains("<tool_call>");
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| TemplateError::Compile {
                origin: origin.to_string(),
                reason: describe(&e),
            })?;
        Ok(Self {
            env,
            origin,
            writes_think,
            writes_tool_calls,
            special_tokens,
        })
    }

    pub fn origin(&self) -> &TemplateOrigin {
        &self.origin
    }

    /// The template writes `<think>` (Qwen3's reasoning tags).
    pub fn writes_think(&self) -> bool {
        self.writes_think
    }

    /// The template writes `<tool_call>` (Hermes-style tool calls, as Qwen models make them).
    pub fn writes_tool_calls(&self) -> bool {
        self.writes_tool_calls
    }

    /// The prompt text for `conv`.
    pub fn render(&self, conv: &Conversation) -> Result<String, TemplateError> {
        if conv.add_generation_prompt && conv.continue_final_message {
            return Err(TemplateError::Request(
                "add_generation_prompt and continue_final_message cannot both be true: one opens a new assistant turn, the other continues the last message".into(),
            ));
        }
        let mut vars = self.special_tokens.clone();
        vars.extend(conv.kwargs.clone());
        vars.insert("messages".into(), Value::Array(conv.messages.clone()));
        vars.insert(
            "tools".into(),
            conv.tools.clone().map_or(Value::Null, Value::Array),
        );
        vars.insert(
            "add_generation_prompt".into(),
            Value::Bool(conv.add_generation_prompt),
        );
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        let rendered = template
            .render(JinjaValue::from_serialize(&vars))
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        if conv.continue_final_message {
            return cut_after_final_message(rendered, &conv.messages);
        }
        Ok(rendered)
    }
}

/// The template in the checkpoint, if it has one, in transformers' order of precedence.
fn find_in_checkpoint(
    dir: &Path,
    config: Option<&Value>,
) -> Result<Option<(String, TemplateOrigin)>, TemplateError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some((read_text(&jinja)?, TemplateOrigin::File(jinja))));
    }
    let json = dir.join("chat_template.json");
    if let Some(v) = read_json(&json)? {
        let text = template_text(v.get("chat_template")).ok_or_else(|| TemplateError::Read {
            path: json.clone(),
            reason: "it has no `chat_template` string".into(),
        })?;
        return Ok(Some((text, TemplateOrigin::File(json))));
    }
    let path = dir.join("tokenizer_config.json");
    Ok(config
        .and_then(|c| template_text(c.get("chat_template")))
        .map(|text| (text, TemplateOrigin::File(path))))
}

/// A `chat_template` value: a string, or a list of named templates of which `default` is the one
/// a plain chat uses.
fn template_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

fn read_text(path: &Path) -> Result<String, TemplateError> {
    std::fs::read_to_string(path).map_err(|e| TemplateError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The JSON in `path`, or `None` when there is no such file.
fn read_json(path: &Path) -> Result<Option<Value>, TemplateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TemplateError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TemplateError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// `bos_token`, `eos_token`, `unk_token`, `pad_token` as strings (the config may give a string or
/// an `AddedToken` object with `content`).
fn special_token_variables(config: &Value) -> Map<String, Value> {
    ["bos_token", "eos_token", "unk_token", "pad_token"]
        .into_iter()
        .filter_map(|name| {
            let v = config.get(name)?;
            let text = v
                .as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))?;
            Some((name.to_string(), Value::String(text.to_string())))
        })
        .collect()
}

/// transformers' rule: the prompt ends right after the final message's text, so generation
/// continues it instead of closing its turn.
fn cut_after_final_message(rendered: String, messages: &[Value]) -> Result<String, TemplateError> {
    let content = messages.last().and_then(|m| m.get("content"));
    let text = match content {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Array(parts)) => parts
            .iter()
            .rev()
            .find_map(|p| p.get("text").and_then(Value::as_str))
            .unwrap_or_default(),
        _ => "",
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(TemplateError::Request(
            "continue_final_message needs a final message with text to continue".into(),
        ));
    }
    let Some(at) = rendered.rfind(trimmed) else {
        return Err(TemplateError::Request(
            "continue_final_message is set but the chat template does not show the final message's text; the template cannot continue it".into(),
        ));
    };
    let left = text.trim_start();
    let end = if rendered[at..].starts_with(left) {
        at + left.len()
    } else {
        at + trimmed.len()
    };
    let mut rendered = rendered;
    rendered.truncate(end);
    Ok(rendered)
}

fn describe(e: &JinjaError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn raise_exception(message: String) -> Result<JinjaValue, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// Jinja's `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False,
/// indent=indent, separators=separators, sort_keys=sort_keys)` — Python's separators (`", "`,
/// `": "`), not compact JSON, and nothing HTML-escaped.
fn tojson(value: JinjaValue, kwargs: minijinja::value::Kwargs) -> Result<JinjaValue, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::BadSerialization, e.to_string()))?;
    if sort_keys == Some(true) {
        sort_json_keys(&mut json);
    }
    let text = super::pyjson::dumps(&json, indent, ensure_ascii.unwrap_or(false));
    Ok(JinjaValue::from_safe_string(text))
}

fn sort_json_keys(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_json_keys);
        }
        Value::Array(items) => items.iter_mut().for_each(sort_json_keys),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::from_source(source.into(), TemplateOrigin::ChatMlFallback, Map::new())
            .unwrap()
    }

    fn conv(messages: Value) -> Conversation {
        Conversation {
            messages: messages.as_array().unwrap().clone(),
            add_generation_prompt: true,
            ..Default::default()
        }
    }

    #[test]
    fn chatml_fallback_layout() {
        let t = template(CHATML);
        let out = t
            .render(&conv(json!([{"role": "user", "content": "hi"}])))
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let t = template(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(sort_keys=true) }}",
        );
        let mut c = conv(json!([]));
        c.kwargs
            .insert("x".into(), json!({"b": [1, "é<&>"], "a": null}));
        assert_eq!(
            t.render(&c).unwrap(),
            "{\"b\": [1, \"é<&>\"], \"a\": null}|{\n  \"b\": [\n    1,\n    \"é<&>\"\n  ],\n  \"a\": null\n}|{\"a\": null, \"b\": [1, \"é<&>\"]}"
        );
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let t = template("{{ raise_exception('only user turns, please') }}");
        let err = t.render(&conv(json!([]))).unwrap_err().to_string();
        assert!(err.contains("only user turns, please"), "{err}");
    }

    #[test]
    fn continue_final_message_cuts_after_its_text() {
        let t = template(CHATML);
        let mut c = conv(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Once upon "}
        ]));
        c.continue_final_message = true;
        assert!(t.render(&c).is_err(), "both flags at once are refused");
        c.add_generation_prompt = false;
        assert_eq!(
            t.render(&c).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nOnce upon "
        );
    }

    #[test]
    fn template_files_in_order_of_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let cfg =
            json!({"chat_template": "config {{ eos_token }}", "eos_token": {"content": "<e>"}});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let render = |dir: &Path, file: Option<&Path>| {
            let t = ChatTemplate::load(dir, file).unwrap();
            t.render(&conv(json!([]))).unwrap()
        };
        assert_eq!(render(dir.path(), None), "config <e>");
        let named = json!({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "json"}]});
        std::fs::write(dir.path().join("chat_template.json"), named.to_string()).unwrap();
        assert_eq!(render(dir.path(), None), "json");
        std::fs::write(dir.path().join("chat_template.jinja"), "jinja").unwrap();
        assert_eq!(render(dir.path(), None), "jinja");
        let own = dir.path().join("own.jinja");
        std::fs::write(&own, "own").unwrap();
        assert_eq!(render(dir.path(), Some(&own)), "own");
        let empty = tempfile::tempdir().unwrap();
        let t = ChatTemplate::load(empty.path(), None).unwrap();
        assert_eq!(t.origin(), &TemplateOrigin::ChatMlFallback);
        std::fs::write(&own, "{% if %}").unwrap();
        let err = ChatTemplate::load(dir.path(), Some(&own)).unwrap_err();
        assert!(matches!(err, TemplateError::Compile { .. }), "{err}");
    }
}
