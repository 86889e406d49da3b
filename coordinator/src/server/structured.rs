//! The structured output a request asks for: OpenAI's `response_format` or vLLM's
//! `guided_json` / `guided_regex` / `guided_choice` / `structured_outputs`, as one grammar for
//! constrained decoding ([`crate::grammar`]).

use serde_json::Value;

use super::types::{CompletionBody, ResponseFormat};
use super::validate::invalid;
use crate::error::GenerationError;
use crate::grammar::GrammarSpec;

/// The structured output a request asks for (OpenAI's `response_format`, or vLLM's
/// `guided_json` / `guided_regex` / `guided_choice` / `structured_outputs`): at most one.
pub(super) fn structured_output(
    body: &mut CompletionBody,
) -> Result<Option<GrammarSpec>, GenerationError> {
    let mut specs: Vec<(&str, GrammarSpec)> = Vec::new();
    match body.response_format.take() {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => specs.push((
            "response_format",
            GrammarSpec::JsonSchema(serde_json::json!({"type": "object"})),
        )),
        Some(ResponseFormat::JsonSchema { json_schema }) => specs.push((
            "response_format",
            GrammarSpec::JsonSchema(json_schema.schema.unwrap_or_else(|| serde_json::json!({}))),
        )),
    }
    let schema = |v: Value| -> Result<GrammarSpec, GenerationError> {
        // vLLM accepts the schema as an object or as JSON text.
        let v = match v {
            Value::String(text) => serde_json::from_str(&text)
                .map_err(|e| invalid(format!("guided_json is not JSON: {e}")))?,
            v => v,
        };
        Ok(GrammarSpec::JsonSchema(v))
    };
    let choice = |c: Vec<String>, name: &str| {
        if c.is_empty() {
            Err(invalid(format!("{name} needs at least one choice")))
        } else {
            Ok(GrammarSpec::Choice(c))
        }
    };
    if let Some(v) = body.guided_json.take() {
        specs.push(("guided_json", schema(v)?));
    }
    if let Some(rx) = body.guided_regex.take() {
        specs.push(("guided_regex", GrammarSpec::Regex(rx)));
    }
    if let Some(c) = body.guided_choice.take() {
        specs.push(("guided_choice", choice(c, "guided_choice")?));
    }
    if let Some(so) = body.structured_outputs.take() {
        if let Some(v) = so.json {
            specs.push(("structured_outputs.json", schema(v)?));
        }
        if let Some(rx) = so.regex {
            specs.push(("structured_outputs.regex", GrammarSpec::Regex(rx)));
        }
        if let Some(c) = so.choice {
            specs.push((
                "structured_outputs.choice",
                choice(c, "structured_outputs.choice")?,
            ));
        }
    }
    match specs.len() {
        0 | 1 => Ok(specs.pop().map(|(_, spec)| spec)),
        _ => {
            let names: Vec<&str> = specs.iter().map(|(n, _)| *n).collect();
            Err(invalid(format!(
                "ask for one structured output, not {}",
                names.join(" and ")
            )))
        }
    }
}
