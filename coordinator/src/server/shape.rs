//! Bounds on a request body's JSON shape, checked in one pass that builds nothing (serde_json
//! only copies a string with escapes into its scratch buffer) before the body is deserialized: how many messages, tools and stop strings it holds, how long a
//! stop string is, how many entries any array or object has and how deep it nests.
//!
//! Deserializing builds a tree many times the body's size (60,000 one-character messages in a
//! 1.8 MB body became ~20 MB of values, then a chat template to render); this pass stops at the
//! first bound passed, so such a request costs a scan of the bytes up to that point. Malformed
//! JSON is left to the deserializer, which reports where it is wrong.

use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::GenerationError;
use super::validate::{MAX_STOP_BYTES, MAX_STOPS, invalid, stop_too_long, too_many_stops};

/// Deepest nesting accepted (a JSON schema for structured output needs a few levels).
pub const MAX_DEPTH: usize = 64;

/// Most tools one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// The bounds that depend on the served model.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Messages in a chat: each takes at least two tokens of the context.
    pub max_messages: usize,
    /// Entries of any array or object: a token-id prompt fits the context, a `logit_bias` the
    /// vocabulary.
    pub max_entries: usize,
    pub max_context: usize,
}

impl Shape {
    pub fn new(max_context: usize, vocab_size: usize) -> Self {
        Self {
            max_messages: (max_context / 2).max(1),
            max_entries: max_context.max(vocab_size),
            max_context,
        }
    }

    /// Scans `body`; the first bound it passes, as a 400. Malformed JSON passes (the
    /// deserializer then says what is wrong with it).
    pub fn check(&self, body: &[u8]) -> Result<(), GenerationError> {
        let found = RefCell::new(None);
        let scan = Scan {
            shape: self,
            found: &found,
        };
        let mut de = serde_json::Deserializer::from_slice(body);
        let _ = Node {
            scan: &scan,
            role: Role::Top,
            depth: 0,
        }
        .deserialize(&mut de);
        match found.into_inner() {
            Some(why) => Err(invalid(why)),
            None => Ok(()),
        }
    }
}

struct Scan<'a> {
    shape: &'a Shape,
    /// The bound passed, once one is (the scan then stops with an error of its own).
    found: &'a RefCell<Option<String>>,
}

impl Scan<'_> {
    fn refuse<E: serde::de::Error>(&self, why: String) -> E {
        self.found.replace(Some(why));
        E::custom("request shape out of bounds")
    }
}

/// What a value is, by where it sits: the fields with bounds of their own are named.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Top,
    Messages,
    Tools,
    Stop,
    StopString,
    Other,
}

impl Role {
    fn of_top_level_key(key: &str) -> Self {
        match key {
            "messages" => Self::Messages,
            "tools" => Self::Tools,
            "stop" => Self::Stop,
            _ => Self::Other,
        }
    }
}

#[derive(Clone, Copy)]
struct Node<'a> {
    scan: &'a Scan<'a>,
    role: Role,
    depth: usize,
}

impl Node<'_> {
    fn child(self, role: Role) -> Self {
        Self {
            role,
            depth: self.depth + 1,
            ..self
        }
    }

    fn enter<E: serde::de::Error>(&self) -> Result<(), E> {
        if self.depth >= MAX_DEPTH {
            return Err(self.scan.refuse(format!(
                "the request's JSON nests more than {MAX_DEPTH} levels deep"
            )));
        }
        Ok(())
    }

    /// Entries this array or object may have, and what to say when it has more.
    fn most(&self) -> (usize, String) {
        let shape = self.scan.shape;
        match self.role {
            Role::Messages => (
                shape.max_messages,
                format!(
                    "`messages` holds more than {} messages; a context of {} tokens cannot fit more (each takes at least 2 tokens)",
                    shape.max_messages, shape.max_context
                ),
            ),
            Role::Tools => (
                MAX_TOOLS,
                format!(
                    "`tools` offers more than {MAX_TOOLS} tools; at most {MAX_TOOLS} are accepted"
                ),
            ),
            Role::Stop => (MAX_STOPS, too_many_stops()),
            _ => (
                shape.max_entries,
                format!(
                    "an array or object in the request has more than {} entries (the larger of the context and the vocabulary)",
                    shape.max_entries
                ),
            ),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        if matches!(self.role, Role::Stop | Role::StopString) && s.len() > MAX_STOP_BYTES {
            return Err(self.scan.refuse(stop_too_long(s.len())));
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.enter()?;
        let (most, why) = self.most();
        let role = if self.role == Role::Stop {
            Role::StopString
        } else {
            Role::Other
        };
        let mut n = 0;
        while seq.next_element_seed(self.child(role))?.is_some() {
            n += 1;
            if n > most {
                return Err(self.scan.refuse(why));
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.enter()?;
        let (most, why) = self.most();
        let top = self.role == Role::Top;
        let mut n = 0;
        while let Some(role) = map.next_key_seed(Key { top })? {
            map.next_value_seed(self.child(role))?;
            n += 1;
            if n > most {
                return Err(self.scan.refuse(why));
            }
        }
        Ok(())
    }
}

/// An object's key: at the top level it decides the role of its value.
struct Key {
    top: bool,
}

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Role;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Role, D::Error> {
        de.deserialize_str(self)
    }
}

impl Visitor<'_> for Key {
    type Value = Role;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Role, E> {
        Ok(if self.top {
            Role::of_top_level_key(key)
        } else {
            Role::Other
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(shape: &Shape, body: &str) -> Option<String> {
        shape.check(body.as_bytes()).err().map(|e| e.to_string())
    }

    #[test]
    fn ordinary_and_malformed_bodies_pass() {
        let shape = Shape::new(64, 100);
        for body in [
            r#"{"prompt": "hi", "stop": ["a", "b"], "max_tokens": 3}"#,
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}"#,
            r#"{"prompt": [1, 2, 3], "logit_bias": {"5": -100}}"#,
            r#"{"prompt": [[[[[[[["#,
            "not json",
            "[1, 2]",
        ] {
            assert_eq!(refusal(&shape, body), None, "{body}");
        }
    }

    #[test]
    fn each_bound_is_refused_with_its_reason() {
        let shape = Shape::new(64, 100);
        let messages = format!(
            r#"{{"messages": [{}]}}"#,
            vec![r#"{"role": "user", "content": "x"}"#; 33].join(",")
        );
        assert!(refusal(&shape, &messages).is_some_and(|m| m.contains("more than 32 messages")));
        let long_stop = format!(r#"{{"stop": "{}"}}"#, "z".repeat(MAX_STOP_BYTES + 1));
        assert!(refusal(&shape, &long_stop).is_some_and(|m| m.contains("257 bytes")));
        let long_in_list = format!(r#"{{"stop": ["a", "{}"]}}"#, "z".repeat(300));
        assert!(refusal(&shape, &long_in_list).is_some_and(|m| m.contains("300 bytes")));
        assert!(refusal(&shape, r#"{"stop": ["a","b","c","d","e"]}"#).is_some());
        let ids = format!(r#"{{"prompt": [{}]}}"#, vec!["1"; 101].join(","));
        assert!(refusal(&shape, &ids).is_some_and(|m| m.contains("more than 100 entries")));
        let deep = format!(r#"{{"guided_json": {}{}}}"#, "[".repeat(70), "]".repeat(70));
        assert!(refusal(&shape, &deep).is_some_and(|m| m.contains("64 levels")));
        let tools = format!(r#"{{"tools": [{}]}}"#, vec!["{}"; MAX_TOOLS + 1].join(","));
        assert!(refusal(&shape, &tools).is_some_and(|m| m.contains("tools")));
    }

    #[test]
    fn a_stop_string_only_counts_where_stop_strings_are() {
        // A long string elsewhere (a nested `stop` key included) is the prompt's business.
        let shape = Shape::new(64, 100);
        let nested = format!(r#"{{"guided_json": {{"stop": "{}"}}}}"#, "z".repeat(1000));
        assert_eq!(refusal(&shape, &nested), None);
    }
}
