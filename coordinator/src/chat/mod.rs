//! Chat: the checkpoint's template turning a conversation into a prompt ([`template`], with the
//! JSON its `tojson` prints in [`pyjson`]), client text kept from forging control tokens
//! ([`guard`]), and the two put together ([`prompt`]).

pub mod guard;
pub mod prompt;
pub mod pyjson;
pub mod template;

pub use prompt::{ChatPrompter, PromptError};
pub use template::{ChatTemplate, Conversation, TemplateError, TemplateOrigin};
