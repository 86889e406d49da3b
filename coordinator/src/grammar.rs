//! Constrained decoding with `llguidance` (the grammar engine of vLLM, SGLang and mistral.rs):
//! a request's JSON schema, regular expression, choice list or forced tool call becomes a
//! grammar, and at every step the tokens that cannot continue a string of that grammar are
//! barred from sampling, so the answer always parses. The token trie is built once, at start-up,
//! from the checkpoint's `tokenizer.json`; each constrained sequence owns a [`Constraint`].
//!
//! The mask is computed on the host after each forward pass and applied to the host copy of the
//! logits (a constrained request samples on the host even on a GPU).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::tokenizer::TextTokenizer;

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("cannot build the token trie for constrained decoding: {reason}")]
    Trie { reason: String },
    #[error("the {what} cannot be used for constrained decoding: {reason}")]
    Compile { what: &'static str, reason: String },
    #[error("constrained decoding failed: {0}")]
    Step(String),
}

/// What a request constrains its answer to.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON value matching this JSON Schema (`{"type": "object"}` for `json_object`).
    JsonSchema(Value),
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// One `<tool_call>` block (Hermes format) calling one of these functions, given as
    /// (name, parameters schema).
    ToolCall(Vec<(String, Value)>),
}

impl GrammarSpec {
    fn what(&self) -> &'static str {
        match self {
            GrammarSpec::JsonSchema(_) => "JSON schema",
            GrammarSpec::Regex(_) => "regular expression",
            GrammarSpec::Choice(_) => "choice list",
            GrammarSpec::ToolCall(_) => "tool schema",
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            GrammarSpec::JsonSchema(schema) => {
                let mut schema = schema.clone();
                // Unless the schema says otherwise, JSON laid out as Python writes it: free
                // whitespace lets a weak model pad an answer until it runs out of tokens.
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("x-guidance").or_insert_with(|| LAYOUT.clone());
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| lark_string(c)).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            GrammarSpec::ToolCall(functions) => {
                // One object per function, its name fixed and its arguments its schema; `name`
                // first, as Hermes-format models write it.
                let calls: Vec<Value> = functions
                    .iter()
                    .map(|(name, parameters)| {
                        json!({
                            "type": "object",
                            "properties": {"name": {"const": name}, "arguments": parameters},
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                // Laid out as the chat template writes calls into the prompt. Each tool's
                // `$defs` move to the root, where its `#/$defs/…` references resolve.
                let mut defs = serde_json::Map::new();
                for (name, parameters) in functions {
                    let Some(own) = parameters.get("$defs").and_then(Value::as_object) else {
                        continue;
                    };
                    for (k, v) in own {
                        match defs.get(k) {
                            Some(existing) if existing != v => {
                                return Err(format!(
                                    "tools define `$defs/{k}` differently (tool `{name}` among them); give the definitions distinct names"
                                ));
                            }
                            _ => {
                                defs.insert(k.clone(), v.clone());
                            }
                        }
                    }
                }
                let mut schema = json!({ "anyOf": calls, "x-guidance": *LAYOUT });
                if !defs.is_empty() {
                    schema["$defs"] = Value::Object(defs);
                }
                TopLevelGrammar::from_lark(format!(
                    "start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {schema}"
                ))
            }
        })
    }
}

/// `{"a": 1, "b": [2, 3]}`: the layout of Python's `json.dumps`, which chat templates write tool
/// calls in and models learn.
static LAYOUT: std::sync::LazyLock<Value> = std::sync::LazyLock::new(
    || json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false}),
);

/// A Lark string literal.
fn lark_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The served tokenizer as llguidance sees it: each token's bytes in a trie, and the real
/// tokenizer for the strings a grammar forces.
struct TokenizerView {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for TokenizerView {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.tokenizer
            .encode_text(&String::from_utf8_lossy(s))
            .unwrap_or_default()
    }
}

/// Builds constraints for requests; one per server.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// From the served tokenizer; `vocab_size` is the model's (the tokenizer may have fewer
    /// tokens), `stop_tokens` end a finished answer.
    pub fn load(
        tokenizer: Arc<TextTokenizer>,
        vocab_size: usize,
        stop_tokens: &[u32],
    ) -> Result<Self, GrammarError> {
        let trie_error = |reason: String| GrammarError::Trie { reason };
        let json = tokenizer.to_json().map_err(|e| trie_error(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| trie_error(e.to_string()))?;
        if words.len() > vocab_size {
            return Err(trie_error(format!(
                "it has {} tokens, more than the model's vocab_size {vocab_size}",
                words.len()
            )));
        }
        words.resize(vocab_size, Vec::new());
        let &eos = stop_tokens
            .first()
            .ok_or_else(|| trie_error("the model has no stop token to end an answer".into()))?;
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(stop_tokens);
        let env: TokEnv = Arc::new(TokenizerView { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| trie_error(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A fresh constraint for one answer; a spec the engine cannot compile is the client's
    /// error.
    pub fn constraint(&self, spec: &GrammarSpec) -> Result<Constraint, GrammarError> {
        let compile_error = |reason: String| GrammarError::Compile {
            what: spec.what(),
            reason,
        };
        let grammar = spec.grammar().map_err(compile_error)?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| compile_error(e.to_string()))?;
        Ok(Constraint {
            matcher: Matcher::new(Ok(parser)),
        })
    }
}

/// One answer's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets the logits of every token the grammar does not allow next to -inf (stop tokens are
    /// allowed once the grammar is complete).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError::Step(e.to_string()))?;
        for (id, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past the sampled token.
    pub fn consume(&mut self, token: u32) -> Result<(), GrammarError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Step(e.to_string()))
    }

    /// The grammar is complete and allows nothing more: the answer is over.
    pub fn finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omnishard_proto::ModelConfig;
    use std::path::Path;

    fn demo() -> (Arc<TextTokenizer>, Grammars) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo-model");
        let cfg = ModelConfig::from_model_dir(&dir).unwrap();
        let tok = Arc::new(TextTokenizer::load(&dir, &cfg).unwrap());
        let stops = tok.stop_tokens().to_vec();
        let g = Grammars::load(tok.clone(), cfg.vocab_size, &stops).unwrap();
        (tok, g)
    }

    /// Greedy decoding where every logit is equal: the grammar alone picks (lowest allowed id).
    fn walk(tok: &TextTokenizer, c: &mut Constraint, vocab: usize) -> String {
        let mut out = Vec::new();
        for _ in 0..200 {
            let mut logits = vec![0.0f32; vocab];
            c.mask(&mut logits).unwrap();
            let t = crate::sampling::argmax(&logits);
            if tok.stop_tokens().contains(&t) {
                break;
            }
            c.consume(t).unwrap();
            out.push(t);
            if c.finished() {
                break;
            }
        }
        tok.decode(&out).unwrap()
    }

    #[test]
    fn any_walk_through_the_mask_parses() {
        let (tok, g) = demo();
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"], "additionalProperties": false});
        let text = walk(
            &tok,
            &mut g.constraint(&GrammarSpec::JsonSchema(schema)).unwrap(),
            512,
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["n"].as_i64().is_some_and(|n| (0..=9).contains(&n)),
            "{text}"
        );
        let choice = GrammarSpec::Choice(vec!["keeper".into(), "ledger".into()]);
        let text = walk(&tok, &mut g.constraint(&choice).unwrap(), 512);
        assert!(text == "keeper" || text == "ledger", "{text}");
        let call = GrammarSpec::ToolCall(vec![(
            "get_weather".into(),
            json!({"type": "object", "properties": {"city": {"enum": ["Paris"]}}, "required": ["city"], "additionalProperties": false}),
        )]);
        let text = walk(&tok, &mut g.constraint(&call).unwrap(), 512);
        let body = text
            .strip_prefix("<tool_call>\n")
            .and_then(|t| t.strip_suffix("\n</tool_call>"))
            .unwrap_or_else(|| panic!("{text}"));
        assert_eq!(
            body,
            r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#
        );
        // A tool schema with `$defs` references (as Pydantic writes them).
        let with_refs = GrammarSpec::ToolCall(vec![(
            "ring".into(),
            json!({"type": "object", "properties": {"bell": {"$ref": "#/$defs/Bell"}}, "required": ["bell"],
                   "additionalProperties": false, "$defs": {"Bell": {"enum": ["big"]}}}),
        )]);
        let text = walk(&tok, &mut g.constraint(&with_refs).unwrap(), 512);
        assert!(text.contains(r#""arguments": {"bell": "big"}"#), "{text}");
        let bad = GrammarSpec::Regex("(".into());
        assert!(g.constraint(&bad).is_err());
    }
}
