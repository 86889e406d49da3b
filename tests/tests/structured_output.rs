//! Constrained decoding over a real cluster (demo model, two expert-node processes): JSON-schema
//! and JSON-object answers parse and validate, regular expressions and choice lists hold, and
//! `tool_choice` `required` or a named function makes even this small model (never taught to
//! call tools) emit a valid call for the schema — whole and streamed.

use omnishard_tests::Server;
use serde_json::{Value, json};

fn content(answer: &Value) -> &str {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_follow_the_grammar() {
    let server = Server::start(&["cluster", "--nodes", "2", "serve"]);
    let chat = json!([{"role": "user", "content": "Who keeps the ledger?"}]);
    let schema = json!({
        "type": "object",
        "properties": {
            "keeper": {"type": "string", "maxLength": 24},
            "year": {"type": "integer", "minimum": 1, "maximum": 2100},
            "storm": {"type": "boolean"}
        },
        "required": ["keeper", "year", "storm"],
        "additionalProperties": false
    });
    let body = json!({
        "messages": chat, "max_tokens": 120, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "ledger", "schema": schema, "strict": true}},
    });
    let (status, answer) = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    let v: Value = serde_json::from_str(content(&answer)).unwrap();
    assert!(
        v["keeper"]
            .as_str()
            .is_some_and(|k| k.chars().count() <= 24),
        "{v}"
    );
    assert!(
        v["year"].as_i64().is_some_and(|y| (1..=2100).contains(&y)),
        "{v}"
    );
    assert!(v["storm"].is_boolean(), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
    // Streamed: the same text.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text: String = server
        .post_stream("/v1/chat/completions", &streamed)
        .await
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, content(&answer));

    // vLLM's extensions, on completions.
    let base = json!({"prompt": "The lighthouse keeper", "max_tokens": 20, "temperature": 0});
    let text_of = |a: &Value| a["choices"][0]["text"].as_str().unwrap().to_string();
    let mut choice = base.clone();
    choice["guided_choice"] = json!(["storm", "ledger", "cable"]);
    let (status, answer) = server.post_json("/v1/completions", &choice).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        ["storm", "ledger", "cable"].contains(&text_of(&answer).as_str()),
        "{answer}"
    );
    let mut regex = base.clone();
    regex["structured_outputs"] = json!({"regex": "[0-9]{3}-[a-z]{2}"});
    let (_, answer) = server.post_json("/v1/completions", &regex).await;
    let text = text_of(&answer);
    assert!(
        text.len() == 6
            && text[..3].bytes().all(|b| b.is_ascii_digit())
            && &text[3..4] == "-"
            && text[4..].bytes().all(|b| b.is_ascii_lowercase()),
        "{answer}"
    );
    let mut object = base.clone();
    object["guided_json"] = json!(
        r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}"#
    );
    let (_, answer) = server.post_json("/v1/completions", &object).await;
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    let v: Value = serde_json::from_str(&text_of(&answer)).unwrap();
    assert!(v["ok"].is_boolean(), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_calls_are_valid_calls() {
    // A template that names the tools without their schemas: the demo model's context is short.
    let template = omnishard_tests::fixtures_dir().join("chat/short-tools.jinja");
    let template = template.to_str().unwrap();
    let server = Server::start(&[
        "cluster",
        "--nodes",
        "2",
        "serve",
        "--chat-template",
        template,
        "--tool-call-parser",
        "hermes",
    ]);
    let tool = |name: &str, max: u64| {
        json!({"type": "function", "function": {"name": name, "parameters": {
            "type": "object",
            "properties": {"page": {"type": "integer", "minimum": 1, "maximum": max}},
            "required": ["page"], "additionalProperties": false}}})
    };
    let tools = json!([tool("read_ledger", 9), tool("ring_bell", 3)]);
    let body = json!({
        "messages": [{"role": "user", "content": "Read the ledger."}],
        "tools": tools, "tool_choice": "required", "max_tokens": 60, "temperature": 0,
    });
    let (status, answer) = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{answer}");
    let name = calls[0]["function"]["name"].as_str().unwrap();
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    let max = if name == "read_ledger" { 9 } else { 3 };
    assert!(["read_ledger", "ring_bell"].contains(&name), "{answer}");
    assert!(
        args["page"]
            .as_u64()
            .is_some_and(|p| (1..=max).contains(&p)),
        "{answer}"
    );

    // A named function, streamed: one tool-call delta, for that function.
    let mut named = body.clone();
    named["tool_choice"] = json!({"type": "function", "function": {"name": "ring_bell"}});
    named["stream"] = json!(true);
    let chunks = server.post_stream("/v1/chat/completions", &named).await;
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0]["function"]["name"], "ring_bell");
    assert_eq!(calls[0]["index"], 0);
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["page"].as_u64().is_some_and(|p| (1..=3).contains(&p)));
    let last = chunks
        .iter()
        .rev()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");

    // What cannot be honoured is refused, saying why.
    for (patch, expected) in [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "does not offer",
        ),
        (json!({"tools": null}), "offers none"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "cannot be asked for together",
        ),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
    ] {
        let mut bad = body.clone();
        for (k, v) in patch.as_object().unwrap() {
            bad[k] = v.clone();
        }
        let (status, answer) = server.post_json("/v1/chat/completions", &bad).await;
        assert_eq!(status, 400, "{patch}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{patch}: {message}");
    }
    let (status, answer) = server
        .post_json(
            "/v1/completions",
            &json!({"prompt": "x", "guided_regex": "(", "guided_choice": ["a"]}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = server
        .post_json(
            "/v1/completions",
            &json!({"prompt": "x", "guided_regex": "("}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
}
