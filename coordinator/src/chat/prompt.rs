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

/// The served model's way from messages to tokens.
pub struct ChatPrompter {
    template: ChatTemplate,
    guard: SpecialTokenGuard,
}

impl ChatPrompter {
    pub fn new(template: ChatTemplate, tok: &TextTokenizer) -> Self {
        Self {
            template,
            guard: SpecialTokenGuard::new(tok),
        }
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
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
    ) -> Result<Vec<u32>, PromptError> {
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
        Ok(if trusted {
            tok.encode(&rendered)?
        } else {
            self.guard.encode(tok, &rendered)?
        })
    }
}
