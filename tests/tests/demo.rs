//! The demo model shipped in the repository: through a cluster of expert nodes, greedy
//! continuation reproduces the text it was trained on and equals the reference's greedy tokens
//! for the same weights (tests/fixtures/golden/demo.json, made by coordinator/demo-model/train.py).

use candle_core::Device;
use omnishard_coordinator::remote::RemoteOptions;
use omnishard_coordinator::{ComputeDtype, Engine, Sampler, SamplingParams, TextTokenizer};
use omnishard_tests::{ExpertNode, addresses, demo_model, fixtures_dir};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text: String,
    prompt: Option<String>,
}

#[test]
fn cluster_reproduces_the_trained_text_and_the_reference() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("golden/demo.json")).unwrap(),
    )
    .unwrap();
    let cases: Vec<Case> = serde_json::from_value(golden["prompts"].clone()).unwrap();
    let corpus = std::fs::read_to_string(demo_model().join("corpus.txt")).unwrap();
    let nodes = ExpertNode::shards(&demo_model(), 3, "f32");
    let engine = Engine::load_remote(
        &demo_model(),
        ComputeDtype::F32,
        &Device::Cpu,
        &addresses(&nodes),
        RemoteOptions::default(),
        false,
    )
    .unwrap();
    let tokenizer = TextTokenizer::load(&demo_model(), engine.config()).unwrap();
    for case in cases {
        let mut sampler = Sampler::new(SamplingParams::default());
        let mut ids = engine
            .generate(
                &case.prompt_ids,
                case.greedy_ids.len(),
                &mut sampler,
                tokenizer.stop_tokens(),
                |_| true,
            )
            .unwrap();
        assert_eq!(
            ids, case.greedy_ids,
            "differs from the reference's greedy tokens"
        );
        ids.retain(|t| !tokenizer.stop_tokens().contains(t));
        let text = tokenizer.decode(&ids).unwrap();
        assert_eq!(text, case.greedy_text);
        if let Some(prompt) = case.prompt {
            assert!(
                corpus.contains(&format!("{prompt}{text}")),
                "not the trained text: {text:?}"
            );
        }
    }
}
