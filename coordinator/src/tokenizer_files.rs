//! A tokenizer for checkpoints that ship `vocab.json` + `merges.txt` and no `tokenizer.json`
//! (some Qwen releases): the byte-level BPE that transformers' `Qwen2TokenizerFast` builds from
//! those files (NFC, Qwen2's split pattern, byte-level pre-tokenizer and decoder), with the
//! added tokens of `tokenizer_config.json` (`added_tokens_decoder`) at their ids.

use std::path::Path;

use serde_json::{Value, json};

/// Qwen2's pre-tokenization pattern (`tokenization_qwen2.PRETOKENIZE_REGEX`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The `tokenizer.json` transformers would write for the files in `dir`.
pub fn tokenizer_json(dir: &Path) -> Result<Value, String> {
    let vocab: Value = serde_json::from_str(&read(&dir.join("vocab.json"))?)
        .map_err(|e| format!("vocab.json: {e}"))?;
    let vocab_size = vocab.as_object().map_or(0, |v| v.len());
    let merges: Vec<Value> = read(&dir.join("merges.txt"))?
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("#version"))
        .map(|l| Value::String(l.to_string()))
        .collect();
    let config: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
        Ok(text) => {
            serde_json::from_str(&text).map_err(|e| format!("tokenizer_config.json: {e}"))?
        }
        Err(_) => json!({}),
    };
    let mut added: Vec<(u64, Value)> = Vec::new();
    for (id, token) in config["added_tokens_decoder"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let id: u64 = id
            .parse()
            .map_err(|_| format!("tokenizer_config.json: added token id `{id}` is not a number"))?;
        let content = token["content"]
            .as_str()
            .ok_or_else(|| format!("tokenizer_config.json: added token {id} has no content"))?;
        let flag = |name: &str, default: bool| token[name].as_bool().unwrap_or(default);
        added.push((
            id,
            json!({"id": id, "content": content, "single_word": flag("single_word", false),
                   "lstrip": flag("lstrip", false), "rstrip": flag("rstrip", false),
                   "normalized": flag("normalized", false), "special": flag("special", true)}),
        ));
    }
    added.sort_by_key(|(id, _)| *id);
    if let Some((id, _)) = added.iter().find(|(id, _)| (*id as usize) < vocab_size) {
        return Err(format!(
            "tokenizer_config.json: added token {id} collides with vocab.json's {vocab_size} entries"
        ));
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}
