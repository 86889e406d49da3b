//! Audio in chat requests over a real cluster (the demo model's audio tower, two expert-node
//! processes): `input_audio` and `audio_url` data: URLs render as the template's placeholder,
//! expand to one token per audio embedding, and answer the same greedy text streamed or whole,
//! in one prompt chunk or many, and in-process; bad media gets a 400 naming the part, and the
//! server goes on serving.

use base64::Engine as _;
use omnishard_tests::cluster_api::{assert_refused, chat_answer};
use omnishard_tests::{Server, fixtures_dir};
use serde_json::{Value, json};

fn clip_base64() -> String {
    let bytes = std::fs::read(fixtures_dir().join("media/chirp.wav")).expect("the clip");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn chat(audio_part: Value) -> Value {
    json!({
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Listen: "}, audio_part, {"type": "text", "text": " Who keeps the ledger?"}]}],
        "max_tokens": 12, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": false},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_chat_over_a_cluster_matches_in_process_and_bad_media_is_refused() {
    let data = clip_base64();
    let input_audio =
        json!({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}});
    let audio_url =
        json!({"type": "audio_url", "audio_url": {"url": format!("data:audio/wav;base64,{data}")}});
    let cluster = Server::start(&["cluster", "--nodes", "2", "serve"]);
    let (text, prompt_tokens) = chat_answer(&cluster, &chat(input_audio.clone())).await;
    let (text_only, text_tokens) = chat_answer(
        &cluster,
        &json!({"messages": [{"role": "user", "content": "Listen:  Who keeps the ledger?"}],
            "max_tokens": 12, "temperature": 0, "chat_template_kwargs": {"enable_thinking": false}}),
    )
    .await;
    // 2.7 s at the demo tower's 50-frame windows: 35 embeddings, plus <|audio_start|>/<|audio_end|>.
    assert_eq!(prompt_tokens, text_tokens + 37, "{text:?} vs {text_only:?}");
    // The same clip as a data: URL; again (never from the prefix cache); streamed.
    assert_eq!(chat_answer(&cluster, &chat(audio_url)).await.0, text);
    assert_eq!(
        chat_answer(&cluster, &chat(input_audio.clone())).await.0,
        text
    );
    let mut streamed = chat(input_audio.clone());
    streamed["stream"] = json!(true);
    let chunks = cluster.post_stream("/v1/chat/completions", &streamed).await;
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, text);

    // In-process, in one chunk; and over the cluster with the prompt cut into 16-token chunks
    // (the audio span crosses chunk boundaries): the same text.
    let local = Server::start(&["serve"]);
    assert_eq!(
        chat_answer(&local, &chat(input_audio.clone())).await.0,
        text
    );
    let chunked = Server::start(&[
        "cluster",
        "--nodes",
        "2",
        "serve",
        "--max-batched-tokens",
        "16",
        "--max-active-seqs",
        "4",
    ]);
    assert_eq!(
        chat_answer(&chunked, &chat(input_audio.clone())).await.0,
        text
    );

    // Bad media: a 400 naming the part and the problem; the server keeps serving.
    let garbage = base64::engine::general_purpose::STANDARD.encode(b"not audio at all, just words");
    let two = json!({"messages": [{"role": "user", "content": [input_audio.clone(), input_audio.clone()]}]});
    let cases = [
        (
            chat(json!({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}})),
            "messages[0].content[1]: input_audio.data is not base64",
        ),
        (
            chat(json!({"type": "input_audio", "input_audio": {"data": garbage, "format": "wav"}})),
            "messages[0].content[1]: cannot decode the audio",
        ),
        (
            chat(json!({"type": "input_audio", "input_audio": {"data": data, "format": "aiff"}})),
            "input_audio.format `aiff`",
        ),
        (
            chat(json!({"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}})),
            "start it with --allow-media-urls",
        ),
        (
            chat(json!({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}})),
            "`video_url` parts are not supported yet",
        ),
        (
            chat(json!({"type": "input_audio"})),
            "without `input_audio`",
        ),
    ];
    for (body, expected) in cases {
        assert_refused(&local, &body, expected).await;
    }
    let limited = Server::start(&["serve", "--limit-mm-per-prompt", "audio=1"]);
    assert_refused(&limited, &two, "at most 1").await;
    assert_eq!(
        chat_answer(&local, &chat(input_audio.clone())).await.0,
        text
    );
    // In bf16 on the CPU the tower computes in f32 (candle's CPU matmul has no bf16).
    let bf16 = Server::start(&["serve", "--dtype", "bf16"]);
    let (status, v) = bf16
        .post_json("/v1/chat/completions", &chat(input_audio))
        .await;
    assert_eq!(status, 200, "{v}");
}
