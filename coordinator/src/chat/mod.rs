//! Chat: the checkpoint's template turning a conversation into a prompt ([`template`], with the
//! JSON its `tojson` prints in [`pyjson`]), client text kept from forging control tokens
//! ([`guard`]), the two put together ([`prompt`]), and the model's answer split into reasoning,
//! content and tool calls ([`output`]).

pub mod guard;
pub mod output;
pub mod prompt;
pub mod pyjson;
pub mod template;

pub use prompt::{ChatPrompt, ChatPrompter, PromptError, ReasoningParser, ToolCallParser};
pub use template::{ChatTemplate, Conversation, TemplateError, TemplateOrigin};
