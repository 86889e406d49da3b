//! What a chat model writes, split as OpenAI clients expect it: `<think>…</think>` into
//! `reasoning_content` (vLLM's `qwen3` reasoning parser) and `<tool_call>{"name", "arguments"}
//! </tool_call>` blocks into `tool_calls` (vLLM's `hermes` tool parser, which Qwen models use),
//! the rest as `content`. It works on streamed text: a piece is released as soon as it cannot be
//! the start of a tag, so streaming and whole answers split the same text the same way.
//!
//! Choices where the references differ or are silent: thinking never closed (the answer ran out
//! of tokens mid-thought) stays reasoning; newlines right after `</think>` are not content; a
//! `<tool_call>` block that is not a JSON object with a string `name` is returned as content,
//! word for word, rather than lost; whitespace between and after tool calls is dropped.

use serde_json::Value;

use super::pyjson;

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// One piece of a chat answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Reasoning(String),
    Content(String),
    ToolCall(ParsedToolCall),
}

/// A tool call the model made; `arguments` is JSON text, as OpenAI sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedToolCall {
    pub name: String,
    pub arguments: String,
}

/// Which parsers run on an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutputFormat {
    /// Split `<think>…</think>` off.
    pub reasoning: bool,
    /// The prompt already opened `<think>` (templates of thinking-only models do): the answer
    /// starts inside the reasoning.
    pub starts_in_reasoning: bool,
    /// Parse `<tool_call>` blocks (the request offered tools and allowed calling them).
    pub tool_calls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not yet known whether the answer opens with `<think>`.
    Start,
    Reasoning,
    /// Just after `</think>`: newlines here are dropped.
    AfterReasoning,
    Content,
    /// Inside a `<tool_call>` block.
    ToolCall,
}

/// Splits a streamed chat answer into [`Delta`]s.
#[derive(Debug)]
pub struct OutputParser {
    format: OutputFormat,
    stage: Stage,
    pending: String,
    calls: usize,
    /// Whitespace after a tool call, held until it is known to be content (text follows) or
    /// only the separator before another call or the end.
    held: String,
}

impl OutputParser {
    pub fn new(format: OutputFormat) -> Self {
        let stage = match (format.reasoning, format.starts_in_reasoning) {
            (true, true) => Stage::Reasoning,
            (true, false) => Stage::Start,
            (false, _) => Stage::Content,
        };
        Self {
            format,
            stage,
            pending: String::new(),
            calls: 0,
            held: String::new(),
        }
    }

    /// Tool calls parsed so far.
    pub fn tool_calls(&self) -> usize {
        self.calls
    }

    /// Adds generated text; returns what can be released.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out) {}
        out
    }

    /// The end of the answer: everything still held back.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = self.push("");
        let rest = std::mem::take(&mut self.pending);
        match self.stage {
            Stage::Reasoning => emit(&mut out, Delta::Reasoning(rest)),
            Stage::ToolCall => emit(&mut out, Delta::Content(format!("{CALL_OPEN}{rest}"))),
            Stage::Start | Stage::AfterReasoning | Stage::Content => self.content(&mut out, rest),
        }
        self.held.clear();
        out
    }

    /// Advances one stage if the pending text allows; false when it must wait for more.
    fn step(&mut self, out: &mut Vec<Delta>) -> bool {
        match self.stage {
            Stage::Start => {
                let text = self.pending.trim_start();
                if let Some(rest) = text.strip_prefix(THINK_OPEN) {
                    self.pending = rest.to_string();
                    self.stage = Stage::Reasoning;
                    true
                } else if THINK_OPEN.starts_with(text) {
                    false
                } else {
                    self.stage = Stage::Content;
                    true
                }
            }
            Stage::Reasoning => match self.pending.find(THINK_CLOSE) {
                Some(at) => {
                    let reasoning = self.pending[..at].to_string();
                    self.pending.drain(..at + THINK_CLOSE.len());
                    emit(out, Delta::Reasoning(reasoning));
                    self.stage = Stage::AfterReasoning;
                    true
                }
                None => {
                    let ready = self.release(THINK_CLOSE);
                    emit(out, Delta::Reasoning(ready));
                    false
                }
            },
            Stage::AfterReasoning => {
                let kept = self.pending.trim_start_matches('\n').len();
                self.pending.drain(..self.pending.len() - kept);
                if self.pending.is_empty() {
                    return false;
                }
                self.stage = Stage::Content;
                true
            }
            Stage::Content if !self.format.tool_calls => {
                let all = std::mem::take(&mut self.pending);
                self.content(out, all);
                false
            }
            Stage::Content => match self.pending.find(CALL_OPEN) {
                Some(at) => {
                    let before = self.pending[..at].to_string();
                    self.pending.drain(..at + CALL_OPEN.len());
                    self.content(out, before);
                    // Whitespace between two calls only separates them.
                    self.held.clear();
                    self.stage = Stage::ToolCall;
                    true
                }
                None => {
                    let ready = self.release(CALL_OPEN);
                    self.content(out, ready);
                    false
                }
            },
            Stage::ToolCall => match self.pending.find(CALL_CLOSE) {
                Some(at) => {
                    let body = self.pending[..at].to_string();
                    self.pending.drain(..at + CALL_CLOSE.len());
                    match parse_call(&body) {
                        Some(call) => {
                            self.calls += 1;
                            out.push(Delta::ToolCall(call));
                        }
                        None => emit(
                            out,
                            Delta::Content(format!("{CALL_OPEN}{body}{CALL_CLOSE}")),
                        ),
                    }
                    self.stage = Stage::Content;
                    true
                }
                None => false,
            },
        }
    }

    /// Content text. After a tool call, whitespace is held back until text follows it.
    fn content(&mut self, out: &mut Vec<Delta>, text: String) {
        if self.calls > 0 && text.trim().is_empty() {
            self.held.push_str(&text);
            return;
        }
        let text = std::mem::take(&mut self.held) + &text;
        emit(out, Delta::Content(text));
    }

    /// Takes the pending text except its longest end that could begin `tag`.
    fn release(&mut self, tag: &str) -> String {
        let keep = (1..tag.len())
            .rev()
            .find(|&n| self.pending.ends_with(&tag[..n]))
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let ready = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        ready
    }
}

fn emit(out: &mut Vec<Delta>, delta: Delta) {
    let empty = match &delta {
        Delta::Reasoning(t) | Delta::Content(t) => t.is_empty(),
        Delta::ToolCall(_) => false,
    };
    if !empty {
        out.push(delta);
    }
}

/// `{"name": …, "arguments": {…}}` as Hermes-format models write it.
fn parse_call(body: &str) -> Option<ParsedToolCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments") {
        None | Some(Value::Null) => "{}".to_string(),
        Some(args) => pyjson::dumps(args, None, false),
    };
    Some(ParsedToolCall { name, arguments })
}

/// The parts of a whole answer: reasoning, content and tool calls, each merged.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    pub reasoning: Option<String>,
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
}

impl Answer {
    pub fn add(&mut self, delta: Delta) {
        match delta {
            Delta::Reasoning(t) => self.reasoning.get_or_insert_with(String::new).push_str(&t),
            Delta::Content(t) => self.content.push_str(&t),
            Delta::ToolCall(c) => self.tool_calls.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: OutputFormat = OutputFormat {
        reasoning: true,
        starts_in_reasoning: false,
        tool_calls: true,
    };

    /// Splits `text` fed in pieces of `step` bytes (at char boundaries) and merges the deltas.
    fn split(format: OutputFormat, text: &str, step: usize) -> Answer {
        let mut p = OutputParser::new(format);
        let mut answer = Answer::default();
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(step) {
            let piece: String = piece.iter().collect();
            p.push(&piece).into_iter().for_each(|d| answer.add(d));
        }
        p.finish().into_iter().for_each(|d| answer.add(d));
        answer
    }

    fn every_split(format: OutputFormat, text: &str) -> Answer {
        let whole = split(format, text, usize::MAX);
        for step in 1..8 {
            assert_eq!(split(format, text, step), whole, "step {step} of {text:?}");
        }
        whole
    }

    fn call(name: &str, arguments: &str) -> ParsedToolCall {
        ParsedToolCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn reasoning_then_content() {
        let a = every_split(
            ALL,
            "<think>\nThe keeper.\n</think>\n\nThe lighthouse keeper.",
        );
        assert_eq!(a.reasoning.as_deref(), Some("\nThe keeper.\n"));
        assert_eq!(a.content, "The lighthouse keeper.");
        let a = every_split(ALL, "No thinking <think> here.");
        assert_eq!(
            (a.reasoning, a.content.as_str()),
            (None, "No thinking <think> here.")
        );
        let a = every_split(ALL, "<thin");
        assert_eq!(a.content, "<thin");
        let open = OutputFormat {
            starts_in_reasoning: true,
            ..ALL
        };
        let a = every_split(open, "hmm</think>yes");
        assert_eq!(
            (a.reasoning.as_deref(), a.content.as_str()),
            (Some("hmm"), "yes")
        );
        let a = every_split(ALL, "<think>cut off mid-tho");
        assert_eq!(
            (a.reasoning.as_deref(), a.content.as_str()),
            (Some("cut off mid-tho"), "")
        );
    }

    #[test]
    fn tool_calls_are_parsed() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"read_ledger\", \"arguments\": {\"page\": 3}}\n</tool_call>";
        let a = every_split(ALL, text);
        assert_eq!(a.content, "Let me look.\n");
        assert_eq!(
            a.tool_calls,
            [
                call("get_weather", "{\"city\": \"Paris\"}"),
                call("read_ledger", "{\"page\": 3}")
            ]
        );
        // Not JSON: kept as the model wrote it.
        let broken = "<tool_call>\n{\"name\": \"get_weather\", \"argu\n</tool_call>";
        let a = every_split(ALL, broken);
        assert_eq!((a.content.as_str(), a.tool_calls.len()), (broken, 0));
        // Whitespace after a call is content when text follows it, not when another call does.
        let after = "<tool_call>\n{\"name\": \"f\"}\n</tool_call>\nDone.\n\nNext";
        assert_eq!(every_split(ALL, after).content, "\nDone.\n\nNext");
        // Never closed: content too.
        let a = every_split(ALL, "<tool_call>\n{\"name\"");
        assert_eq!(a.content, "<tool_call>\n{\"name\"");
        // Tool parsing off: all content.
        let plain = OutputFormat {
            tool_calls: false,
            ..ALL
        };
        assert_eq!(every_split(plain, text).content, text);
    }
}
