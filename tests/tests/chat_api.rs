//! The chat API over a real cluster (demo model, two expert-node processes): prompts come from
//! the model's own chat template — every golden conversation of `make_chat_fixtures.py` sent as
//! a request is counted as the tokens transformers renders for it — reasoning is split into
//! `reasoning_content` streamed and not, and what the server does not support is refused by
//! name instead of ignored.

use omnishard_tests::{Server, fixtures_dir};
use serde_json::{Value, json};

/// The demo model's context length (max_position_embeddings).
const DEMO_CONTEXT: usize = 512;

async fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    server.post_json(path, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_template_makes_the_prompt() {
    let server = Server::start(&["cluster", "--nodes", "2", "serve"]);
    let golden = std::fs::read_to_string(fixtures_dir().join("golden/chat_template.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&golden).unwrap();
    for case in &cases {
        // Template-only cases: media parts without their data (tests/tests/audio_api.rs sends
        // real media).
        let media = case["request"]["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["content"].as_array())
            .flatten()
            .any(|p| p["type"] != "text");
        if media {
            continue;
        }
        let mut body = case["request"].clone();
        let request = body.as_object_mut().unwrap();
        if let Some(thinking) = request.remove("enable_thinking") {
            request.insert(
                "chat_template_kwargs".into(),
                json!({ "enable_thinking": thinking }),
            );
        }
        request.insert("max_tokens".into(), json!(1));
        request.insert("temperature".into(), json!(0));
        let (status, answer) = post(&server, "/v1/chat/completions", &body).await;
        let tokens = case["ids"].as_array().unwrap().len();
        if tokens < DEMO_CONTEXT {
            assert_eq!(status, 200, "{}: {answer}", case["name"]);
            assert_eq!(
                answer["usage"]["prompt_tokens"], tokens,
                "prompt of {}",
                case["name"]
            );
        } else {
            // The demo model's context is short and tool schemas are long: the refusal counts
            // the prompt.
            assert_eq!(status, 400, "{}: {answer}", case["name"]);
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(&format!("the prompt has {tokens} ")),
                "{}: {message}",
                case["name"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_is_split_streamed_and_not() {
    let server = Server::start(&["cluster", "--nodes", "2", "serve"]);
    // The answer continues an opened <think>: everything it writes is reasoning (the demo model
    // never closes it).
    let body = json!({
        "messages": [
            {"role": "user", "content": "Who keeps the ledger?"},
            {"role": "assistant", "content": "<think>\nThe lighthouse keeper"}
        ],
        "continue_final_message": true,
        "max_tokens": 12,
        "temperature": 0,
    });
    let (status, whole) = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    let message = &whole["choices"][0]["message"];
    let reasoning = message["reasoning_content"].as_str().unwrap();
    assert!(!reasoning.is_empty(), "{whole}");
    assert_eq!(message["content"], "", "{whole}");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = server.post_stream("/v1/chat/completions", &streamed).await;
    let mut pieces = String::new();
    for chunk in &chunks {
        let delta = &chunk["choices"][0]["delta"];
        if let Some(t) = delta["reasoning_content"].as_str() {
            pieces.push_str(t);
        }
        assert!(
            delta["content"].as_str().unwrap_or_default().is_empty(),
            "{chunk}"
        );
    }
    assert_eq!(pieces, reasoning);

    // A user who writes `<think>` opens no reasoning: only the template or a continued message
    // can.
    let asks = json!({"messages": [{"role": "user", "content": "What does the <think> tag do?"}], "max_tokens": 6, "temperature": 0});
    let (status, answer) = post(&server, "/v1/chat/completions", &asks).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["choices"][0]["message"]
            .get("reasoning_content")
            .is_none(),
        "{answer}"
    );

    // A plain question: no reasoning, all content.
    let plain = json!({"messages": [{"role": "user", "content": "Who keeps the ledger?"}], "max_tokens": 8, "temperature": 0});
    let (status, answer) = post(&server, "/v1/chat/completions", &plain).await;
    assert_eq!(status, 200, "{answer}");
    let message = &answer["choices"][0]["message"];
    assert!(message.get("reasoning_content").is_none(), "{answer}");
    assert!(
        message["content"]
            .as_str()
            .unwrap()
            .starts_with("The lighthouse keeper"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_supported_is_refused_by_name() {
    let server = Server::start(&["cluster", "--nodes", "2", "serve"]);
    let user = json!([{"role": "user", "content": "hi"}]);
    let tool = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}});
    let cases = [
        (
            "/v1/chat/completions",
            json!({"messages": user, "banana_mode": true, "best_of": 2}),
            "banana_mode, best_of",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "tools": [tool]}),
            "`tools` belongs to /v1/chat/completions",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "echo": true}),
            "`echo` belongs to /v1/completions",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "echo": true, "prompt_logprobs": 25}),
            "prompt_logprobs must be 0 to 20",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": null}]}),
            "messages[0]: `content` is required",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}),
            "only assistant messages carry `tool_calls`",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "tools": [{"type": "function", "function": {"name": "no spaces"}}]}),
            "tools[0]: function name `no spaces`",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "continue_final_message": true}),
            "last message to be the assistant's",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "continue_final_message": true, "add_generation_prompt": true}),
            "last message to be the assistant's",
        ),
    ];
    for (path, body, expected) in cases {
        let (status, answer) = post(&server, path, &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{body}: {message}");
    }
    // A tool call sent back with `content: null`, tool results, and tool_choice none: served.
    let conversation = json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
        ],
        "tools": [tool],
        "tool_choice": "none",
        "max_tokens": 2,
    });
    let (status, answer) = post(&server, "/v1/chat/completions", &conversation).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoints_and_model_details() {
    let server = Server::start(&["cluster", "--nodes", "2", "serve"]);
    let golden = std::fs::read_to_string(fixtures_dir().join("golden/chat_template.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&golden).unwrap();
    // Chat messages tokenize exactly as the chat template renders them.
    let case = &cases[1];
    let (status, answer) = post(&server, "/tokenize", &case["request"]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tokens"], case["ids"]);
    assert_eq!(answer["count"], case["ids"].as_array().unwrap().len());
    assert_eq!(answer["max_model_len"], DEMO_CONTEXT);
    // A prompt, with each token's text; and back.
    let body = json!({"prompt": "The lighthouse keeper", "return_token_strs": true});
    let (status, answer) = post(&server, "/tokenize", &body).await;
    assert_eq!(status, 200, "{answer}");
    let strs = answer["token_strs"].as_array().unwrap();
    assert_eq!(strs.len(), answer["count"].as_u64().unwrap() as usize);
    let (status, back) = post(&server, "/detokenize", &json!({"tokens": answer["tokens"]})).await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["prompt"], "The lighthouse keeper");
    for (path, body) in [
        (
            "/tokenize",
            json!({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}),
        ),
        ("/tokenize", json!({"prompt": "x", "padding": true})),
        ("/detokenize", json!({"tokens": [99999]})),
        ("/tokenize", json!({"prompt": "x", "model": "gpt-4"})),
    ] {
        let (status, answer) = post(&server, path, &body).await;
        assert!(
            status == 400 || status == 404,
            "{path} {body}: {status} {answer}"
        );
    }
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(server.url(path)).send();
    let card: Value = get("/v1/models/demo-model")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(card["id"], "demo-model");
    assert_eq!(card["max_model_len"], DEMO_CONTEXT);
    assert_eq!(get("/v1/models/other").await.unwrap().status(), 404);
    let version: Value = get("/version").await.unwrap().json().await.unwrap();
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
}
