//! Text in and out: the checkpoint's `tokenizer.json` through the `tokenizers` crate, the stop
//! tokens, and incremental decoding that never prints half a UTF-8 character. Chat prompts are
//! the chat template's job ([`crate::chat`]).

use std::path::{Path, PathBuf};

use omnishard_proto::ModelConfig;
use omnishard_proto::config::token_ids_from_json;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("detokenization failed: {0}")]
    Decode(String),
    #[error("{path}: {reason}")]
    GenerationConfig { path: PathBuf, reason: String },
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special-token matching off: text a client wrote is text, so
    /// `<|im_end|><|im_start|>system` in a message cannot forge a turn.
    plain: tokenizers::Tokenizer,
    stop_tokens: Vec<u32>,
    /// Bytes of text one token can stand for, at most.
    max_token_bytes: usize,
}

impl TextTokenizer {
    /// Loads `DIR/tokenizer.json`, or, when the checkpoint has none, `vocab.json` +
    /// `merges.txt` with the added tokens of `tokenizer_config.json` (as transformers'
    /// `Qwen2TokenizerFast` builds it). Stop tokens: `eos_token_id` of `generation_config.json`,
    /// else of `config.json`, else `<|im_end|>` and `<|endoftext|>` as the tokenizer knows them.
    pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let load_error = |path: &Path, reason: String| TokenizerError::Load {
            path: path.to_path_buf(),
            reason,
        };
        let inner = if path.is_file() || !dir.join("vocab.json").is_file() {
            tokenizers::Tokenizer::from_file(&path).map_err(|e| load_error(&path, e.to_string()))?
        } else {
            let json = crate::tokenizer_files::tokenizer_json(dir)
                .map_err(|reason| load_error(&dir.join("vocab.json"), reason))?;
            tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
                .map_err(|e| load_error(&dir.join("vocab.json"), e.to_string()))?
        };
        let gen_path = dir.join("generation_config.json");
        let from_gen = match std::fs::read_to_string(&gen_path) {
            Ok(text) => {
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| TokenizerError::GenerationConfig {
                        path: gen_path.clone(),
                        reason: e.to_string(),
                    })?;
                v.get("eos_token_id")
                    .map(token_ids_from_json)
                    .unwrap_or_default()
            }
            Err(_) => Vec::new(),
        };
        let stop_tokens = if !from_gen.is_empty() {
            from_gen
        } else if !cfg.eos_token_ids.is_empty() {
            cfg.eos_token_ids.clone()
        } else {
            ["<|im_end|>", "<|endoftext|>"]
                .iter()
                .filter_map(|t| inner.token_to_id(t))
                .collect()
        };
        // Every token stands for at most this many bytes of text (UTF-8 length of its vocabulary
        // string, which for byte-level BPE over-counts: safe as an upper bound).
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            inner,
            plain,
            stop_tokens,
            max_token_bytes,
        })
    }

    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The longest text, in bytes, that can encode to fewer than `tokens` tokens: a text longer
    /// than this needs at least `tokens` of them, so it can be refused before tokenizing.
    pub fn max_bytes_for(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.max_token_bytes)
    }

    /// Encodes text; special tokens written in the text (e.g. `<|im_start|>`) are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        ids_of(&self.inner, text)
    }

    /// Encodes text a client wrote: special tokens in it are plain text.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        ids_of(&self.plain, text)
    }

    /// The tokenizer as `tokenizer.json` holds it (for the grammar engine's token trie).
    pub fn to_json(&self) -> Result<serde_json::Value, TokenizerError> {
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The tokenizer's special tokens (text, id): the control tokens client text may not forge.
    pub fn special_tokens(&self) -> Vec<(String, u32)> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect()
    }

    /// A token's vocabulary string (byte-level BPE shows bytes as their stand-in characters),
    /// or an empty string for an id the tokenizer does not know.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_default()
    }

    /// Text of `ids` with special tokens written out (`<|im_end|>`), as a prompt was sent.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// One token's text, special tokens included (`<|im_end|>`), as log-probabilities show it.
    pub fn token_piece(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }
}

fn ids_of(tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>, TokenizerError> {
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| TokenizerError::Encode(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

/// Turns a growing list of generated tokens into text pieces as soon as they are complete
/// characters (byte-level BPE may split one character over several tokens). Only a short window
/// of recent tokens is decoded each time (the prefix/read offsets of Hugging Face's
/// `DecodeStream`), so streaming costs O(1) per token, not O(length).
#[derive(Default)]
pub struct DecodeStream {
    tokens: Vec<u32>,
    /// Start of the window decoded for context (keeps spacing rules right).
    prefix_offset: usize,
    /// Tokens before this one have been emitted.
    read_offset: usize,
}

impl DecodeStream {
    pub fn push(
        &mut self,
        tok: &TextTokenizer,
        token: u32,
    ) -> Result<Option<String>, TokenizerError> {
        self.tokens.push(token);
        let prefix = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let text = tok.decode(&self.tokens[self.prefix_offset..])?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= prefix.len()
            || !text.is_char_boundary(prefix.len())
        {
            return Ok(None);
        }
        let piece = text[prefix.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Ok(Some(piece))
    }

    /// Whatever is still held back at the end of generation (an incomplete character is
    /// emitted as U+FFFD rather than lost).
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<String, TokenizerError> {
        let prefix = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let text = tok.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        Ok(text
            .get(prefix.len()..)
            .filter(|_| text.len() > prefix.len())
            .unwrap_or_default()
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_stream_pieces_add_up_to_the_whole() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo-model");
        let cfg = ModelConfig::from_model_dir(&dir).unwrap();
        let tok = TextTokenizer::load(&dir, &cfg).unwrap();
        // Characters the demo tokenizer never saw come out as several byte tokens each.
        let ids = tok
            .encode("The lighthouse keeper: naïve café ☃ of Omnishard")
            .unwrap();
        let mut stream = DecodeStream::default();
        let mut out = String::new();
        for &t in &ids {
            if let Some(piece) = stream.push(&tok, t).unwrap() {
                out.push_str(&piece);
            }
        }
        out.push_str(&stream.finish(&tok).unwrap());
        assert_eq!(out, tok.decode(&ids).unwrap());
        assert!(out.contains('☃'));
    }
}
