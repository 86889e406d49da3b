//! `coordinator bench` end to end on a tiny fixture (the real-size runs are in BENCHMARKS.md):
//! it starts and stops its own expert-node processes and prints every key of its JSON line.

use std::process::Command;

use omnishard_tests::{bin, model_dir};
use serde_json::Value;

#[test]
fn bench_prints_every_key_and_measures_in_process_and_clusters() {
    let out = Command::new(bin("coordinator"))
        .args(["bench", "--quick", "--dtype", "f32", "--nodes", "1,2"])
        .arg("--model")
        .arg(model_dir("qwen3moe-flat"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    let report: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    let positive = |key: &str| {
        let v = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {report}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    };
    for key in [
        "inproc_decode_tok_s_b1",
        "inproc_decode_tok_s_b32",
        "inproc_prefill_tok_s",
        "fraction_of_bandwidth_bound",
        "read_bandwidth_gb_s",
        "cluster1_over_inproc_b1",
        "cluster1_over_inproc_b32",
        "cluster2_over_inproc_b1",
        "cluster2_over_inproc_b32",
        "node_rss_over_partition",
    ] {
        positive(key);
    }
    assert!(report["remote_overhead_us_per_layer"].is_f64(), "{report}");
    // Not asked for: null, with the reason on stderr.
    assert!(report["cluster4_over_inproc_b1"].is_null(), "{report}");
    assert!(
        stderr.contains("cluster4_over_inproc_b1 is null"),
        "{stderr}"
    );
    // The peers may be unavailable (no Python here, a config candle cannot read), but the key
    // is always there, and a null always comes with its reason.
    for key in ["ratio_vs_candle_qwen3_moe", "ratio_vs_hf_transformers"] {
        let v = &report[key];
        assert!(
            v.as_f64().is_some_and(|r| r > 0.0)
                || (v.is_null() && stderr.contains(&format!("{key} is null"))),
            "{key} = {v}\n{stderr}"
        );
    }
}
