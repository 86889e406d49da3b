//! The demo model's chat template rendered by omnishard equals Hugging Face transformers'
//! `apply_chat_template` (4.57.3), text and token ids, on the conversations of
//! `tests/fixtures/make_chat_fixtures.py`: system prompt, multi-turn with earlier thinking
//! stripped, thinking on and off, tools, tool calls sent back with `content: null`, consecutive
//! tool results, and a continued final message.

use omnishard_coordinator::TextTokenizer;
use omnishard_coordinator::chat::{ChatPrompter, ChatTemplate, Conversation, TemplateOrigin};
use omnishard_proto::ModelConfig;
use omnishard_tests::{demo_model, fixtures_dir};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
struct Case {
    name: String,
    request: Map<String, Value>,
    text: String,
    ids: Vec<u32>,
}

fn conversation(request: &Map<String, Value>) -> Conversation {
    let mut kwargs = request.clone();
    let messages = kwargs
        .remove("messages")
        .and_then(|m| m.as_array().cloned());
    let tools = kwargs.remove("tools").and_then(|t| t.as_array().cloned());
    let flag = |kwargs: &mut Map<String, Value>, name: &str| {
        kwargs
            .remove(name)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    Conversation {
        messages: messages.expect("every case has messages"),
        tools,
        add_generation_prompt: flag(&mut kwargs, "add_generation_prompt"),
        continue_final_message: flag(&mut kwargs, "continue_final_message"),
        kwargs,
    }
}

#[test]
fn renders_as_transformers_does() {
    let dir = demo_model();
    let cfg = ModelConfig::from_model_dir(&dir).unwrap();
    let tok = TextTokenizer::load(&dir, &cfg).unwrap();
    let template = ChatTemplate::load(&dir, None).unwrap();
    assert_eq!(
        template.origin(),
        &TemplateOrigin::File(dir.join("tokenizer_config.json"))
    );
    let golden = std::fs::read_to_string(fixtures_dir().join("golden/chat_template.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&golden).unwrap();
    assert!(cases.len() >= 9);
    let prompter = ChatPrompter::new(
        ChatTemplate::load(&dir, None).unwrap(),
        &tok,
        Default::default(),
        Default::default(),
    );
    for case in &cases {
        let conv = conversation(&case.request);
        let text = template.render(&conv).unwrap();
        assert_eq!(text, case.text, "text of case `{}`", case.name);
        // Guarded (the server's default) and trusted encodings both give transformers' ids
        // when no message holds a special token.
        for trusted in [false, true] {
            let ids = prompter
                .encode(&tok, conv.clone(), trusted, usize::MAX)
                .unwrap()
                .ids;
            assert_eq!(
                ids, case.ids,
                "ids of case `{}` (trusted: {trusted})",
                case.name
            );
        }
    }
}
