//! Images in chat requests over a real cluster (the demo model's untrained vision tower, two
//! expert-node processes): an `image_url` data: URL renders as the template's
//! `<|vision_start|><|image_pad|><|vision_end|>`, expands to one token per merged patch with
//! the reference's mRoPE positions and deepstack features, and answers the same greedy text
//! streamed or whole, in one prompt chunk or many, and in-process; a bad image is a 400 naming
//! the part.

use base64::Engine as _;
use omnishard_tests::cluster_api::{assert_refused, chat_answer};
use omnishard_tests::{Server, fixtures_dir};
use serde_json::{Value, json};

fn image_part(file: &str) -> Value {
    let bytes = std::fs::read(fixtures_dir().join("media").join(file)).expect("the image");
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    let kind = if file.ends_with(".webp") {
        "webp"
    } else {
        "png"
    };
    json!({"type": "image_url", "image_url": {"url": format!("data:image/{kind};base64,{data}")}})
}

fn chat(parts: Vec<Value>) -> Value {
    json!({
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 12, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": false},
    })
}

/// A plain HTTP/1.1 server on a loopback port answering GET /NAME with the file NAME of `dir`
/// (404 when there is none), on a thread, for as long as the test runs; its origin URL.
fn serve_files(dir: std::path::PathBuf) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let origin = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // Skip the headers.
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let name = line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .trim_start_matches('/');
            let mut out = &stream;
            let _ = match std::fs::read(dir.join(name)) {
                Ok(body) => out
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|_| out.write_all(&body)),
                Err(_) => out.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                ),
            };
        }
    });
    origin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_chat_over_a_cluster_matches_in_process_and_bad_images_are_refused() {
    let text = json!({"type": "text", "text": " What is in the picture?"});
    let body = chat(vec![image_part("scene.png"), text.clone()]);
    let cluster = Server::start(&["cluster", "--nodes", "2", "serve"]);
    let (answer_text, prompt_tokens) = chat_answer(&cluster, &body).await;
    let (_, text_tokens) = chat_answer(&cluster, &chat(vec![text.clone()])).await;
    // 75x53 resized to 72x56 in 4-pixel patches: 14x18 patches, 2x2 merged: 63 tokens, plus
    // <|vision_start|> and <|vision_end|>.
    assert_eq!(prompt_tokens, text_tokens + 65);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = cluster.post_stream("/v1/chat/completions", &streamed).await;
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, answer_text);
    // Image and audio together; again (never from the prefix cache).
    let audio = {
        let bytes = std::fs::read(fixtures_dir().join("media/chirp.wav")).expect("the clip");
        let data = base64::engine::general_purpose::STANDARD.encode(bytes);
        json!({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
    };
    let mixed = chat(vec![image_part("scene.png"), audio, text.clone()]);
    let (mixed_text, _) = chat_answer(&cluster, &mixed).await;
    assert_eq!(chat_answer(&cluster, &mixed).await.0, mixed_text);

    // In-process, and over the cluster in 16-token prompt chunks (the image and its deepstack
    // rows cross chunk boundaries): the same text.
    let local = Server::start(&["serve"]);
    assert_eq!(chat_answer(&local, &body).await.0, answer_text);
    assert_eq!(chat_answer(&local, &mixed).await.0, mixed_text);
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
    assert_eq!(chat_answer(&chunked, &body).await.0, answer_text);

    let garbage = base64::engine::general_purpose::STANDARD.encode(b"no picture here");
    let cases = [
        (
            chat(vec![
                json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{garbage}")}}),
            ]),
            "messages[0].content[0]: cannot decode the image",
        ),
        (
            chat(vec![
                json!({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}),
            ]),
            "start it with --allow-media-urls",
        ),
        (
            chat(vec![
                json!({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}),
            ]),
            "`video_url` parts are not supported yet",
        ),
    ];
    for (body, expected) in cases {
        assert_refused(&local, &body, expected).await;
    }
    // The scheduler's positions (prompt mRoPE rows, then index + delta) against the engine's own
    // decode loop in `coordinator generate`: the same greedy text.
    let question = "What is in the picture?";
    let plain = json!({"messages": [{"role": "user", "content": [image_part("scene.png"),
        {"type": "text", "text": question}]}], "max_tokens": 12, "temperature": 0});
    let served = chat_answer(&local, &plain).await.0;
    let out = std::process::Command::new(omnishard_tests::bin("coordinator"))
        .args([
            "generate",
            "--chat",
            "--max-tokens",
            "12",
            "--prompt",
            question,
            "--image",
        ])
        .arg(fixtures_dir().join("media/scene.png"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run coordinator generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), served);

    // `coordinator score --messages`: the same conversation from a file gives logits whose last
    // row picks the token the server answers with, at the same log-probability.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let messages = dir.path().join("messages.json");
    let media_dir = fixtures_dir().join("media");
    std::fs::write(
        &messages,
        json!([{"role": "user", "content": [
            {"type": "image", "image": media_dir.join("scene.png")},
            {"type": "audio", "audio": media_dir.join("chirp.wav")},
            {"type": "text", "text": question}]}])
        .to_string(),
    )
    .expect("write the messages");
    let out = std::process::Command::new(omnishard_tests::bin("coordinator"))
        .args(["score", "--messages"])
        .arg(&messages)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run coordinator score");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scored: Value = serde_json::from_slice(&out.stdout).expect("json");
    let last: Vec<f32> = serde_json::from_value(
        scored["logits"]
            .as_array()
            .expect("rows")
            .last()
            .expect("a row")
            .clone(),
    )
    .expect("floats");
    let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = last.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    let mut one = json!({"messages": [{"role": "user", "content": [image_part("scene.png"),
        {"type": "input_audio", "input_audio": {"data": base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(media_dir.join("chirp.wav")).expect("the clip")), "format": "wav"}},
        {"type": "text", "text": question}]}], "max_tokens": 1, "temperature": 0, "logprobs": true});
    one["stream"] = json!(false);
    let (status, v) = local.post_json("/v1/chat/completions", &one).await;
    assert_eq!(status, 200, "{v}");
    let served = v["choices"][0]["logprobs"]["content"][0]["logprob"]
        .as_f64()
        .expect("a logprob") as f32;
    assert!(
        (served - (max - log_z)).abs() < 1e-4,
        "served {served}, scored {}",
        max - log_z
    );

    // file:// URLs: only under --allowed-local-media-path, read as the inline image is.
    let file_url = |path: std::path::PathBuf| json!({"type": "image_url", "image_url": {"url": format!("file://{}", path.display())}});
    let by_file = chat(vec![file_url(media_dir.join("scene.png")), text.clone()]);
    assert_refused(&local, &by_file, "--allowed-local-media-path").await;
    let media_root = media_dir.display().to_string();
    let files = Server::start(&["serve", "--allowed-local-media-path", &media_root]);
    assert_eq!(chat_answer(&files, &by_file).await.0, answer_text);
    let outside = chat(vec![
        file_url(media_dir.join("../models/omni-audio/config.json")),
        text.clone(),
    ]);
    assert_refused(&files, &outside, "is outside").await;

    // http(s) URLs: fetched only with --allow-media-urls.
    let origin = serve_files(media_dir.clone());
    let by_url = |name: &str| {
        chat(vec![
            json!({"type": "image_url", "image_url": {"url": format!("{origin}/{name}")}}),
            text.clone(),
        ])
    };
    assert_refused(&local, &by_url("scene.png"), "--allow-media-urls").await;
    let fetching = Server::start(&["serve", "--allow-media-urls"]);
    assert_eq!(
        chat_answer(&fetching, &by_url("scene.png")).await.0,
        answer_text
    );
    assert_refused(&fetching, &by_url("missing.png"), "404").await;

    let limited = Server::start(&["serve", "--limit-mm-per-prompt", "image=1"]);
    let two = chat(vec![image_part("scene.png"), image_part("tiny.png")]);
    assert_refused(&limited, &two, "at most 1").await;
    assert_eq!(chat_answer(&local, &body).await.0, answer_text);
}
