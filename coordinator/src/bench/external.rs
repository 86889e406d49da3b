//! The peers `coordinator bench` compares against, run as child processes on the same weights,
//! dtype and thread count: candle-transformers' `qwen3_moe` (the `candle-baseline` binary built
//! with this workspace) and Hugging Face transformers' `Qwen3MoeForCausalLM` (a Python script
//! embedded in this binary, run when `python3` can import torch and transformers). Each gives
//! decode tokens per second, or the reason it could not run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The HF benchmark script, `tests/scripts/hf_decode_bench.py`, carried in the binary so that
/// `coordinator bench` needs no source checkout.
const HF_SCRIPT: &str = include_str!("../../../tests/scripts/hf_decode_bench.py");

/// Exit code of the HF script when torch or transformers is not importable.
const HF_UNAVAILABLE: i32 = 3;

/// Runs `cmd`, expecting one JSON line with `decode_tok_s` as the last line of stdout.
fn run_json(mut cmd: Command, what: &str) -> Result<f64, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        return Err(match out.status.code() {
            Some(HF_UNAVAILABLE) if what == "transformers" => {
                format!(
                    "python3 cannot import torch/transformers ({tail}); pip install torch transformers==4.57.3"
                )
            }
            _ => format!("{what} failed ({}): {tail}", out.status),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v["decode_tok_s"].as_f64())
        .ok_or_else(|| format!("{what} printed no decode_tok_s: {line:?}"))
}

/// The `candle-baseline` binary next to this executable.
fn candle_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = exe
        .parent()
        .map(|d| d.join("candle-baseline"))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            "no candle-baseline next to the coordinator; build it with `cargo build --release -p omnishard-tests --bin candle-baseline`".to_string()
        })?;
    Ok(path)
}

/// candle-transformers' qwen3_moe greedy decode, tokens per second.
pub fn candle(model: &Path, dtype: &str, threads: usize, tokens: usize) -> Result<f64, String> {
    let mut cmd = Command::new(candle_binary()?);
    cmd.arg("--model")
        .arg(model)
        .args(["--dtype", dtype, "--tokens", &tokens.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string());
    run_json(cmd, "candle-baseline")
}

/// Hugging Face transformers' Qwen3MoeForCausalLM greedy decode, tokens per second.
pub fn transformers(
    model: &Path,
    dtype: &str,
    threads: usize,
    tokens: usize,
    scratch: &Path,
) -> Result<f64, String> {
    let script = scratch.join("hf_decode_bench.py");
    std::fs::write(&script, HF_SCRIPT)
        .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg("--model").arg(model).args([
        "--dtype",
        dtype,
        "--threads",
        &threads.to_string(),
        "--tokens",
        &tokens.to_string(),
    ]);
    run_json(cmd, "transformers")
}

/// Resident memory of a process in bytes (`VmRSS` of /proc/PID/status; Linux only).
pub fn rss_bytes(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}
