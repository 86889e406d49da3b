//! A chat request's conversation as the chat template takes it: messages checked and turned
//! into the JSON objects Hugging Face templates read, tools checked against OpenAI's rules, and
//! `tool_choice` read (a required or named call becomes a grammar for constrained decoding).

use serde_json::Value;

use super::media::MediaRef;
use super::types::{ChatFields, Content, Message};
use super::validate::invalid;
use crate::chat::Conversation;
use crate::error::GenerationError;
use crate::grammar::GrammarSpec;

/// Roles a chat message may have; `developer` is OpenAI's newer name for `system`.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// The conversation as the chat template takes it: messages checked and turned into the JSON
/// objects Hugging Face templates read (`content` a string, or null on an assistant message that
/// only calls tools; text parts joined by newlines as vLLM joins them), the tools, and the
/// template's options.
///
/// Media parts (audio) come back beside it, in prompt order; their messages' content is then a
/// list of parts, as Hugging Face passes it to the template.
pub(super) fn conversation(
    body: &mut ChatFields,
) -> Result<(Conversation, Vec<MediaRef>), GenerationError> {
    let messages = body
        .messages
        .take()
        .ok_or_else(|| invalid("`messages` is required"))?;
    if messages.is_empty() {
        return Err(invalid("`messages` must not be empty"));
    }
    let mut media = Vec::new();
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message_json(i, m, &mut media))
        .collect::<Result<Vec<_>, _>>()?;
    let tools = body.tools.take();
    if let Some(tools) = &tools {
        for (i, tool) in tools.iter().enumerate() {
            check_tool(tool).map_err(|why| invalid(format!("tools[{i}]: {why}")))?;
        }
    }
    let kwargs = body.chat_template_kwargs.take().unwrap_or_default();
    if let Some(reserved) = ["messages", "tools", "add_generation_prompt"]
        .into_iter()
        .find(|k| kwargs.contains_key(*k))
    {
        return Err(invalid(format!(
            "chat_template_kwargs.{reserved} is set by the request itself; pass it as a top-level field"
        )));
    }
    let continue_final_message = body.continue_final_message.unwrap_or(false);
    if continue_final_message
        && messages
            .last()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            != Some("assistant")
    {
        return Err(invalid(
            "continue_final_message needs the last message to be the assistant's",
        ));
    }
    Ok((
        Conversation {
            messages,
            tools,
            add_generation_prompt: body
                .add_generation_prompt
                .unwrap_or(!continue_final_message),
            continue_final_message,
            kwargs,
        },
        media,
    ))
}

fn message_json(i: usize, m: Message, media: &mut Vec<MediaRef>) -> Result<Value, GenerationError> {
    let bad = |why: String| invalid(format!("messages[{i}]: {why}"));
    if !ROLES.contains(&m.role.as_str()) {
        return Err(bad(format!(
            "role `{}` is not one of {}",
            m.role,
            ROLES.join(", ")
        )));
    }
    let role = if m.role == "developer" {
        "system"
    } else {
        m.role.as_str()
    };
    let calls_tools = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
    if m.tool_calls.is_some() && role != "assistant" {
        return Err(bad("only assistant messages carry `tool_calls`".into()));
    }
    if m.tool_call_id.is_some() && role != "tool" {
        return Err(bad("only tool messages carry `tool_call_id`".into()));
    }
    if m.reasoning_content.is_some() && role != "assistant" {
        return Err(bad(
            "only assistant messages carry `reasoning_content`".into()
        ));
    }
    let content = match m.content {
        Some(Content::Text(t)) => Value::String(t),
        Some(Content::Parts(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            let before = media.len();
            for (j, p) in parts.into_iter().enumerate() {
                let (part, item) = super::media::part(&format!("messages[{i}].content[{j}]"), p)?;
                out.push(part);
                media.extend(item);
            }
            if media.len() == before {
                // Text only: one string, the parts joined by newlines as vLLM joins them.
                let texts: Vec<&str> = out
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect();
                Value::String(texts.join("\n"))
            } else {
                Value::Array(out)
            }
        }
        None if role == "assistant" && calls_tools => Value::Null,
        None => return Err(bad(
            "`content` is required (it may be null only on an assistant message with tool_calls)"
                .into(),
        )),
    };
    if let Some(calls) = &m.tool_calls {
        for (j, call) in calls.iter().enumerate() {
            if call.kind != "function" {
                return Err(bad(format!("tool_calls[{j}].type must be \"function\"")));
            }
        }
    }
    let mut out = serde_json::Map::new();
    out.insert("role".into(), Value::String(role.to_string()));
    out.insert("content".into(), content);
    if let Some(name) = m.name {
        out.insert("name".into(), Value::String(name));
    }
    if let Some(calls) = m.tool_calls {
        out.insert(
            "tool_calls".into(),
            serde_json::to_value(calls).map_err(|e| bad(e.to_string()))?,
        );
    }
    if let Some(id) = m.tool_call_id {
        out.insert("tool_call_id".into(), Value::String(id));
    }
    if let Some(r) = m.reasoning_content {
        out.insert("reasoning_content".into(), Value::String(r));
    }
    Ok(Value::Object(out))
}

/// OpenAI's rules for a function tool: `{"type": "function", "function": {"name", "description"?,
/// "parameters"?, "strict"?}}`, the name 1 to 64 of `a-z A-Z 0-9 _ -`.
fn check_tool(tool: &Value) -> Result<(), String> {
    let obj = tool.as_object().ok_or("a tool is an object")?;
    if let Some(extra) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "type" | "function"))
    {
        return Err(format!("unknown field `{extra}`"));
    }
    if obj.get("type").and_then(Value::as_str) != Some("function") {
        return Err("`type` must be \"function\"".into());
    }
    let f = obj
        .get("function")
        .and_then(Value::as_object)
        .ok_or("`function` (an object) is required")?;
    if let Some(extra) = f
        .keys()
        .find(|k| !matches!(k.as_str(), "name" | "description" | "parameters" | "strict"))
    {
        return Err(format!("unknown field `function.{extra}`"));
    }
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or("`function.name` (a string) is required")?;
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(format!(
            "function name `{name}` must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -"
        ));
    }
    if f.get("description").is_some_and(|d| !d.is_string()) {
        return Err("`function.description` must be a string".into());
    }
    if f.get("parameters").is_some_and(|p| !p.is_object()) {
        return Err("`function.parameters` must be a JSON Schema object".into());
    }
    Ok(())
}

/// What `tool_choice` asks for.
#[derive(Debug, PartialEq)]
pub(super) enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

pub(super) fn tool_choice(chat: &ChatFields) -> Result<ToolChoice, GenerationError> {
    let bad = |v: &Value| {
        invalid(format!(
            "tool_choice {v} is not \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
        ))
    };
    let choice = match &chat.tool_choice {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => return Err(bad(chat.tool_choice.as_ref().unwrap_or(&Value::Null))),
        },
        Some(v) => {
            let name = (v.get("type").and_then(Value::as_str) == Some("function"))
                .then(|| v.pointer("/function/name").and_then(Value::as_str))
                .flatten()
                .ok_or_else(|| bad(v))?;
            ToolChoice::Named(name.to_string())
        }
    };
    let has_tools = chat.tools.as_ref().is_some_and(|t| !t.is_empty());
    if matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) && !has_tools {
        return Err(invalid(
            "tool_choice asks for a tool call, but `tools` offers none",
        ));
    }
    Ok(choice)
}

/// The grammar of a forced call: `required` calls one of the tools, a named choice that one.
pub(super) fn forced_call(
    chat: &ChatFields,
    choice: &ToolChoice,
) -> Result<Option<GrammarSpec>, GenerationError> {
    let functions = chat.tools.iter().flatten().filter_map(|t| {
        let f = t.get("function")?;
        let name = f.get("name")?.as_str()?.to_string();
        let parameters = f
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"type": "object"}));
        Some((name, parameters))
    });
    match choice {
        ToolChoice::None | ToolChoice::Auto => Ok(None),
        ToolChoice::Required => Ok(Some(GrammarSpec::ToolCall(functions.collect()))),
        ToolChoice::Named(name) => {
            let chosen: Vec<_> = functions.filter(|(n, _)| n == name).collect();
            if chosen.is_empty() {
                return Err(invalid(format!(
                    "tool_choice names function `{name}`, which `tools` does not offer"
                )));
            }
            Ok(Some(GrammarSpec::ToolCall(chosen)))
        }
    }
}
