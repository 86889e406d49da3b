//! A conversation to prompt tokens: client strings guarded ([`SpecialTokenGuard`]), the chat
//! template rendered, the text bounded before it is tokenized, and encoded.

use super::guard::SpecialTokenGuard;
use super::template::{ChatTemplate, Conversation, TemplateError};
use crate::tokenizer::{TextTokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The rendered prompt is longer than any prompt that fits the context can be.
    #[error("the rendered prompt is {bytes} bytes")]
    TooLarge { bytes: usize },
}

/// How answers are split into reasoning (`--reasoning-parser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReasoningParser {
    /// `qwen3` when the chat template writes `<think>`, else none.
    #[default]
    Auto,
    /// `<think>…</think>` becomes `reasoning_content` (vLLM's qwen3 parser).
    Qwen3,
    /// Reasoning stays in `content`.
    None,
}

/// How tool calls are read from answers (`--tool-call-parser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ToolCallParser {
    /// `hermes` when the chat template writes `<tool_call>`, else none.
    #[default]
    Auto,
    /// `<tool_call>{"name", "arguments"}</tool_call>` blocks (vLLM's hermes parser; Qwen models).
    Hermes,
    /// Requests with tools are refused unless `tool_choice` is "none".
    None,
}

/// A chat request's prompt.
#[derive(Debug)]
pub struct ChatPrompt {
    pub ids: Vec<u32>,
    /// The prompt ends inside an opened `<think>`: the answer starts with reasoning.
    pub opens_reasoning: bool,
}

/// The served model's way from messages to tokens.
pub struct ChatPrompter {
    template: ChatTemplate,
    guard: SpecialTokenGuard,
    reasoning: bool,
    tool_calls: bool,
}

impl ChatPrompter {
    pub fn new(
        template: ChatTemplate,
        tok: &TextTokenizer,
        reasoning: ReasoningParser,
        tool_calls: ToolCallParser,
    ) -> Self {
        let reasoning = match reasoning {
            ReasoningParser::Auto => template.writes_think(),
            ReasoningParser::Qwen3 => true,
            ReasoningParser::None => false,
        };
        let tool_calls = match tool_calls {
            ToolCallParser::Auto => template.writes_tool_calls(),
            ToolCallParser::Hermes => true,
            ToolCallParser::None => false,
        };
        Self {
            template,
            guard: SpecialTokenGuard::new(tok),
            reasoning,
            tool_calls,
        }
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Answers are split into reasoning and content.
    pub fn parses_reasoning(&self) -> bool {
        self.reasoning
    }

    /// Tool calls are read from answers.
    pub fn parses_tool_calls(&self) -> bool {
        self.tool_calls
    }

    /// Whether the answer starts inside an opened `<think>`: the template's generation prompt
    /// opens one (thinking-only models), or the continued final message left one open. Client
    /// text elsewhere saying `<think>` does not count.
    fn opens_reasoning(&self, conv: &Conversation, rendered: &str) -> Result<bool, PromptError> {
        let open = |text: &str| {
            text.rfind("<think>")
                .is_some_and(|at| !text[at..].contains("</think>"))
        };
        if conv.continue_final_message {
            let last = conv.messages.last().and_then(|m| m.get("content"));
            return Ok(last.and_then(|c| c.as_str()).is_some_and(open));
        }
        if !conv.add_generation_prompt {
            return Ok(false);
        }
        let without = self.template.render(&Conversation {
            add_generation_prompt: false,
            ..conv.clone()
        })?;
        Ok(rendered.strip_prefix(without.as_str()).is_some_and(open))
    }

    /// The prompt's tokens. `trusted`: special tokens in client strings act as control tokens
    /// (`--special-tokens-in-text`). A rendered prompt over `max_bytes` is refused before
    /// tokenizing.
    pub fn encode(
        &self,
        tok: &TextTokenizer,
        mut conv: Conversation,
        trusted: bool,
        max_bytes: usize,
    ) -> Result<ChatPrompt, PromptError> {
        if !trusted {
            conv.messages.iter_mut().for_each(|m| self.guard.hide(m));
            if let Some(tools) = conv.tools.as_mut() {
                tools.iter_mut().for_each(|t| self.guard.hide(t));
            }
            conv.kwargs.values_mut().for_each(|v| self.guard.hide(v));
        }
        let rendered = self.template.render(&conv)?;
        if rendered.len() > max_bytes {
            return Err(PromptError::TooLarge {
                bytes: rendered.len(),
            });
        }
        let ids = if trusted {
            tok.encode(&rendered)?
        } else {
            self.guard.encode(tok, &rendered)?
        };
        let opens_reasoning = self.reasoning && self.opens_reasoning(&conv, &rendered)?;
        Ok(ChatPrompt {
            ids,
            opens_reasoning,
        })
    }
}
