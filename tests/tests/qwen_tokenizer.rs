//! A checkpoint that ships `vocab.json` + `merges.txt` and no `tokenizer.json` (some Qwen
//! releases) loads as transformers' `Qwen2TokenizerFast` loads it: the real Qwen vocabulary
//! (151,643 ranks of `qwen.tiktoken`, `tests/fixtures/make_qwen_tokenizer.py`) encodes
//! multilingual text, code and special tokens to the reference's ids, and decodes back.

use std::sync::Arc;

use omnishard_coordinator::TextTokenizer;
use omnishard_coordinator::grammar::{GrammarSpec, Grammars};
use omnishard_proto::ModelConfig;
use omnishard_tests::{demo_model, fixtures_dir};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn vocab_and_merges_encode_as_the_reference() {
    let dir = fixtures_dir().join("qwen-tokenizer");
    assert!(!dir.join("tokenizer.json").exists());
    // The config only supplies stop tokens when generation_config.json has none.
    let cfg = ModelConfig::from_model_dir(&demo_model()).unwrap();
    let tok = TextTokenizer::load(&dir, &cfg).unwrap();
    let golden: Vec<Golden> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    assert!(golden.len() >= 8);
    for g in &golden {
        assert_eq!(tok.encode(&g.text).unwrap(), g.ids, "{:?}", g.text);
    }
    let id = |t: &str| tok.encode(t).unwrap();
    assert_eq!(id("<|im_end|>"), [151645]);
    assert_eq!(id("<think>"), [151667]);
    assert_eq!(id("</tool_call>"), [151658]);
    // Special tokens are skipped when decoding; text comes back whole.
    let text = "Zürich 東京 🤖 def f(): pass";
    assert_eq!(tok.decode(&id(text)).unwrap(), text);
    // The grammar engine builds its token trie from the same tokenizer.
    let grammars = Grammars::load(Arc::new(tok), 151_936, &[151645]).unwrap();
    assert!(
        grammars
            .constraint(&GrammarSpec::Regex("[0-9]+".into()))
            .is_ok()
    );
}
