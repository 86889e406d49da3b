//! Sampling parameters change answers as specified, checked against a plain computation on the
//! model's logits (`coordinator score`, the fidelity tool): `logit_bias`, presence and frequency
//! penalties over the generated tokens, `stop_token_ids`, and `min_tokens` barring them — on a
//! real cluster (demo model, two expert-node processes), greedy; and log-probabilities are the
//! log-softmax of those logits, in both of OpenAI's shapes, streamed and not; `echo` puts the
//! prompt first, and with `logprobs` its tokens' log-probabilities too (as does vLLM's
//! `prompt_logprobs`), computed over chunked prefill and never from the prefix cache.

use omnishard_coordinator::TextTokenizer;
use omnishard_coordinator::sampling::argmax;
use omnishard_proto::ModelConfig;
use omnishard_tests::{Server, coordinator_score, demo_model};
use serde_json::{Value, json};

async fn complete(server: &Server, body: Value) -> Value {
    let (status, answer) = server.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The last row of the demo model's logits for `ids`.
fn next_logits(ids: &[u32]) -> Vec<f32> {
    all_logits(ids).pop().unwrap()
}

/// Every row of the demo model's logits for `ids`.
fn all_logits(ids: &[u32]) -> Vec<Vec<f32>> {
    let list = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let model = demo_model();
    let out = coordinator_score(&[
        "--model".as_ref(),
        model.as_os_str(),
        "--token-ids".as_ref(),
        list.as_ref(),
    ]);
    let v: Value = serde_json::from_slice(&out).unwrap();
    let rows = v["logits"].as_array().unwrap();
    rows.iter()
        .map(|r| {
            let r = r.as_array().unwrap();
            r.iter().map(|x| x.as_f64().unwrap() as f32).collect()
        })
        .collect()
}

/// Greedy decoding of `n` tokens with `adjust(logits, generated)` applied to each step's logits.
fn expected(prompt: &[u32], n: usize, adjust: impl Fn(&mut [f32], &[u32])) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let mut logits = next_logits(&ids);
        adjust(&mut logits, &ids[prompt.len()..]);
        ids.push(argmax(&logits));
    }
    ids.split_off(prompt.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_parameters_do_what_they_say() {
    let dir = demo_model();
    let tok = TextTokenizer::load(&dir, &ModelConfig::from_model_dir(&dir).unwrap()).unwrap();
    let prompt = tok
        .encode("The lighthouse keeper of Omnishard Island")
        .unwrap();
    let server = Server::start(&["cluster", "--nodes", "2", "serve"]);
    let text = |answer: &Value| answer["choices"][0]["text"].as_str().unwrap().to_string();
    let base = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0});

    let plain = expected(&prompt, 6, |_, _| {});
    let answer = complete(&server, base.clone()).await;
    assert_eq!(text(&answer), tok.decode(&plain).unwrap());

    // logit_bias: -100 on the greedy first token, +5 on token 42.
    let mut body = base.clone();
    body["logit_bias"] = json!({ plain[0].to_string(): -100, "42": 5 });
    let biased = expected(&prompt, 6, |l, _| {
        l[plain[0] as usize] -= 100.0;
        l[42] += 5.0;
    });
    assert_ne!(biased, plain);
    assert_eq!(
        text(&complete(&server, body).await),
        tok.decode(&biased).unwrap()
    );

    // Presence and frequency penalties count generated tokens only. The memorised text never
    // repeats itself, so start from token soup after which the model stutters.
    let soup = [7u32, 7, 7, 7];
    let mut body = json!({"prompt": soup, "temperature": 0});
    body["max_tokens"] = json!(12);
    body["presence_penalty"] = json!(2.0);
    body["frequency_penalty"] = json!(1.5);
    let penalized = expected(&soup, 12, |l, generated| {
        let mut seen = std::collections::HashMap::<u32, f32>::new();
        for &t in generated {
            *seen.entry(t).or_default() += 1.0;
        }
        for (t, n) in seen {
            l[t as usize] -= 2.0 + 1.5 * n;
        }
    });
    assert_ne!(penalized, expected(&soup, 12, |_, _| {}));
    assert_eq!(
        text(&complete(&server, body).await),
        tok.decode(&penalized).unwrap()
    );

    // stop_token_ids: the third greedy token ends the answer and is not in its text...
    let mut body = base.clone();
    body["stop_token_ids"] = json!([plain[2]]);
    let answer = complete(&server, body.clone()).await;
    assert_eq!(text(&answer), tok.decode(&plain[..2]).unwrap());
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    // ...unless min_tokens bars it until four tokens were generated.
    body["min_tokens"] = json!(4);
    let barred = expected(&prompt, 6, |l, generated| {
        if generated.len() < 4 {
            l[plain[2] as usize] = f32::NEG_INFINITY;
            for &t in tok.stop_tokens() {
                l[t as usize] = f32::NEG_INFINITY;
            }
        }
    });
    let end = barred
        .iter()
        .enumerate()
        .position(|(i, &t)| i >= 4 && t == plain[2])
        .unwrap_or(barred.len());
    assert!(
        end > 2,
        "min_tokens let the answer run past the barred token"
    );
    let answer = complete(&server, body).await;
    assert_eq!(text(&answer), tok.decode(&barred[..end]).unwrap());

    // Log-probabilities: the log-softmax of the model's logits, streamed and not.
    let mut body = base.clone();
    body["max_tokens"] = json!(3);
    body["logprobs"] = json!(2);
    let answer = complete(&server, body.clone()).await;
    let lp = &answer["choices"][0]["logprobs"];
    let mut ids = prompt.clone();
    for (i, &t) in plain[..3].iter().enumerate() {
        let logits = next_logits(&ids);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_z = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
        let got = lp["token_logprobs"][i].as_f64().unwrap() as f32;
        assert!((got - (logits[t as usize] - log_z)).abs() < 1e-3, "{lp}");
        assert_eq!(lp["tokens"][i], tok.decode(&[t]).unwrap());
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 2, "{lp}");
        ids.push(t);
    }
    assert_eq!(lp["text_offset"][0], 0);
    body["stream"] = json!(true);
    let mut streamed = Vec::new();
    for chunk in server.post_stream("/v1/completions", &body).await {
        if let Some(v) = chunk["choices"][0]["logprobs"]["token_logprobs"].as_array() {
            streamed.extend(v.iter().cloned());
        }
    }
    assert_eq!(Value::Array(streamed), lp["token_logprobs"]);
    let chat = json!({"messages": [{"role": "user", "content": "Who keeps the ledger?"}], "max_tokens": 2,
        "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let (_, answer) = server.post_json("/v1/chat/completions", &chat).await;
    let content = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 2, "{answer}");
    let top = content[0]["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    // Greedy: the chosen token is the most likely one.
    assert_eq!(top[0]["token"], content[0]["token"]);
    assert_eq!(top[0]["logprob"], content[0]["logprob"]);

    // echo: the answer starts with the prompt's text, streamed and not.
    let mut body = base.clone();
    body["echo"] = json!(true);
    let echoed = format!(
        "{}{}",
        tok.decode(&prompt).unwrap(),
        tok.decode(&plain).unwrap()
    );
    assert_eq!(text(&complete(&server, body.clone()).await), echoed);
    body["stream"] = json!(true);
    let streamed: String = server
        .post_stream("/v1/completions", &body)
        .await
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, echoed);

    // Per-request metrics, each series naming the model.
    let metrics = server.metrics_text().await;
    for series in [
        "omnishard_request_finished_total{finish_reason=\"length\",model_name=\"demo-model\"}",
        "omnishard_request_finished_total{finish_reason=\"stop\",model_name=\"demo-model\"}",
        "omnishard_request_e2e_seconds_count{model_name=\"demo-model\"}",
        "omnishard_request_queue_seconds_count{model_name=\"demo-model\"}",
        "omnishard_request_generation_tokens_bucket{model_name=\"demo-model\",le=\"8\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }

    // Out-of-range values are refused, naming the parameter.
    for (field, value) in [
        ("presence_penalty", json!(2.5)),
        ("logit_bias", json!({"99999": 1})),
        ("min_p", json!(-0.1)),
        ("min_tokens", json!(7)),
        ("logprobs", json!(21)),
        ("top_logprobs", json!(1)),
    ] {
        let mut body = base.clone();
        body[field] = value;
        let (status, err) = server.post_json("/v1/completions", &body).await;
        assert_eq!(status, 400, "{field}");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(field),
            "{field}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_fork_the_computed_prompt() {
    let server = Server::start(&["cluster", "--nodes", "2", "serve"]);
    let text_of = |a: &Value, i: usize| a["choices"][i]["text"].as_str().unwrap().to_string();
    // Greedy: every choice is the one answer, from its copy of the prompt's cache.
    let greedy = json!({"prompt": "The lighthouse keeper of Omnishard Island", "max_tokens": 16, "temperature": 0});
    let solo = complete(&server, greedy.clone()).await;
    let mut three = greedy.clone();
    three["n"] = json!(3);
    let answer = complete(&server, three).await;
    let choices = answer["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{answer}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(text_of(&answer, i), text_of(&solo, 0), "{answer}");
    }
    assert_eq!(
        answer["usage"]["completion_tokens"],
        3 * solo["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        answer["usage"]["prompt_tokens"],
        solo["usage"]["prompt_tokens"]
    );
    // Streamed: the choices interleave, each with its index, then one usage chunk.
    let mut streamed = greedy.clone();
    streamed["n"] = json!(3);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = server.post_stream("/v1/completions", &streamed).await;
    let mut texts = vec![String::new(); 3];
    let mut finished = 0;
    for chunk in &chunks {
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            texts[i].push_str(c["text"].as_str().unwrap());
            finished += usize::from(!c["finish_reason"].is_null());
        }
    }
    assert_eq!(finished, 3);
    assert!(texts.iter().all(|t| *t == text_of(&solo, 0)), "{texts:?}");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens"],
        3 * solo["usage"]["completion_tokens"].as_u64().unwrap()
    );

    // Sampled: each choice draws with its own seed (the request's plus its index).
    let sampled = json!({"prompt": [7, 7, 7, 7], "max_tokens": 12, "temperature": 1.5, "seed": 11, "n": 4, "ignore_eos": true});
    let answer = complete(&server, sampled).await;
    let texts: Vec<String> = (0..4).map(|i| text_of(&answer, i)).collect();
    assert!(texts.iter().any(|t| t != &texts[0]), "{texts:?}");
    // Structured output holds for every choice.
    let chat = json!({
        "messages": [{"role": "user", "content": "Who keeps the ledger?"}], "n": 2, "max_tokens": 40,
        "temperature": 1.0, "seed": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}}},
    });
    let (status, answer) = server.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{answer}");
    for choice in answer["choices"].as_array().unwrap() {
        let v: Value =
            serde_json::from_str(choice["message"]["content"].as_str().unwrap()).unwrap();
        assert!(v["ok"].is_boolean(), "{answer}");
    }
    // Out of bounds: refused, saying so.
    for (body, expected) in [
        (json!({"prompt": "x", "n": 0}), "n must be 1 to 16"),
        (json!({"prompt": "x", "n": 17}), "n must be 1 to 16"),
    ] {
        let (status, answer) = server.post_json("/v1/completions", &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains(expected),
            "{answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logprobs_are_the_log_softmax_of_every_prompt_row() {
    let dir = demo_model();
    let tok = TextTokenizer::load(&dir, &ModelConfig::from_model_dir(&dir).unwrap()).unwrap();
    let prompt = tok
        .encode("The lighthouse keeper of Omnishard Island")
        .unwrap();
    let rows = all_logits(&prompt);
    // Chunks of 4 tokens: the prompt's rows come from several forward passes.
    let server = Server::start(&[
        "cluster",
        "--nodes",
        "2",
        "serve",
        "--max-batched-tokens",
        "4",
        "--max-active-seqs",
        "4",
    ]);
    let body = json!({"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": true,
        "logprobs": 1, "prompt_logprobs": 3});
    // Twice: the second time the prompt's blocks are cached, and must not be used.
    let first = complete(&server, body.clone()).await;
    let answer = complete(&server, body.clone()).await;
    assert_eq!(first["choices"], answer["choices"]);
    let choice = &answer["choices"][0];
    let lp = &choice["logprobs"];
    let n = prompt.len();
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n + 2, "{lp}");
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    let vllm = choice["prompt_logprobs"].as_array().unwrap();
    assert_eq!(vllm.len(), n);
    assert!(vllm[0].is_null());
    for i in 1..n {
        let row = &rows[i - 1];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_z = row.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
        let t = prompt[i] as usize;
        let want = row[t] - log_z;
        let got = lp["token_logprobs"][i].as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-3, "token {i}: {got} vs {want}");
        assert_eq!(lp["tokens"][i], tok.token_piece(prompt[i]));
        let entry = vllm[i].as_object().unwrap();
        let mine = &entry[&t.to_string()];
        assert!((mine["logprob"].as_f64().unwrap() as f32 - want).abs() < 1e-3);
        let rank = 1 + row.iter().filter(|&&l| l > row[t]).count();
        assert_eq!(mine["rank"], rank, "{mine}");
        assert_eq!(mine["decoded_token"], tok.token_piece(prompt[i]));
        // The three most likely, plus the prompt's token when it is not among them.
        assert_eq!(entry.len(), if rank <= 3 { 3 } else { 4 }, "{entry:?}");
    }
    // The answer's own log-probabilities follow the prompt's.
    let plain = expected(&prompt, 2, |_, _| {});
    let last = next_logits(&prompt);
    let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = last.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    let got = lp["token_logprobs"][n].as_f64().unwrap() as f32;
    assert!((got - (last[plain[0] as usize] - log_z)).abs() < 1e-3);

    // Streamed: the same numbers, the prompt's riding on the first chunk with the echo.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = server.post_stream("/v1/completions", &streamed).await;
    assert_eq!(
        chunks[0]["choices"][0]["prompt_logprobs"],
        choice["prompt_logprobs"]
    );
    assert_eq!(
        chunks[0]["choices"][0]["text"],
        tok.decode(&prompt).unwrap()
    );
    let mut token_logprobs = Vec::new();
    for chunk in &chunks {
        if let Some(v) = chunk["choices"][0]["logprobs"]["token_logprobs"].as_array() {
            token_logprobs.extend(v.iter().cloned());
        }
    }
    assert_eq!(Value::Array(token_logprobs), lp["token_logprobs"]);

    // Every choice gets them; prompt_logprobs alone leaves `logprobs` out.
    let answer = complete(
        &server,
        json!({"prompt": prompt, "max_tokens": 1, "n": 2, "prompt_logprobs": 0}),
    )
    .await;
    for c in answer["choices"].as_array().unwrap() {
        assert!(c["logprobs"].is_null(), "{c}");
        assert_eq!(c["prompt_logprobs"].as_array().unwrap().len(), n, "{c}");
        assert_eq!(c["prompt_logprobs"][1].as_object().unwrap().len(), 1, "{c}");
    }
    let (status, err) = server
        .post_json(
            "/v1/completions",
            &json!({"prompt": "x", "prompt_logprobs": 21}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prompt_logprobs")
    );
}
