//! `candle-baseline`: decode speed of candle-transformers' own `qwen3_moe` model on a flat
//! Qwen3-MoE checkpoint, the comparison `coordinator bench` reports as
//! `ratio_vs_candle_qwen3_moe`. Kept out of the coordinator binary so that it does not link a
//! second model implementation; `coordinator bench` runs it as a child process.
//!
//! Usage: `candle-baseline --model DIR [--dtype bf16|f32] [--tokens N] [--prompt-len P]
//! [--warmup W]`. Prints progress to stderr and one JSON line to stdout:
//! `{"decode_tok_s": .., "tokens": N, "seconds": .., "dtype": ..}`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use baseline_candle_core::{DType, Device, Tensor};
use baseline_candle_nn::VarBuilder;
use candle_transformers::models::qwen3_moe::{Config, ModelForCausalLM};

struct Args {
    model: PathBuf,
    dtype: DType,
    tokens: usize,
    prompt_len: usize,
    warmup: usize,
}

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        model: PathBuf::new(),
        dtype: DType::BF16,
        tokens: 16,
        prompt_len: 16,
        warmup: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => args.model = PathBuf::from(value),
            "--dtype" => {
                args.dtype = match value.as_str() {
                    "bf16" => DType::BF16,
                    "f32" => DType::F32,
                    other => bail!("--dtype {other}: use bf16 or f32"),
                }
            }
            "--tokens" => args.tokens = value.parse().context("--tokens")?,
            "--prompt-len" => args.prompt_len = value.parse().context("--prompt-len")?,
            "--warmup" => args.warmup = value.parse().context("--warmup")?,
            other => bail!("unknown flag {other}; see the header of this file"),
        }
    }
    if args.model.as_os_str().is_empty() {
        bail!("--model DIR is required");
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let text = std::fs::read_to_string(args.model.join("config.json"))
        .with_context(|| format!("cannot read {}/config.json", args.model.display()))?;
    let cfg: Config = serde_json::from_str(&text).context("not a flat qwen3_moe config")?;
    let index = args.model.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
        let mut files: Vec<String> = json["weight_map"]
            .as_object()
            .context("index without weight_map")?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        files.into_iter().map(|f| args.model.join(f)).collect()
    } else {
        vec![args.model.join("model.safetensors")]
    };
    let device = Device::Cpu;
    eprintln!("candle-baseline: loading {}", args.model.display());
    // SAFETY: the checkpoint files are not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, args.dtype, &device)? };
    let mut model = ModelForCausalLM::new(&cfg, vb)?;
    let prompt: Vec<u32> = (0..args.prompt_len as u32)
        .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
        .collect();
    let input = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
    let logits = model.forward(&input, 0)?;
    let mut next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
    let mut started = Instant::now();
    for step in 0..args.warmup + args.tokens {
        if step == args.warmup {
            started = Instant::now();
        }
        let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
        let logits = model.forward(&input, prompt.len() + step)?;
        next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "decode_tok_s": args.tokens as f64 / seconds,
            "tokens": args.tokens,
            "seconds": seconds,
            "dtype": format!("{:?}", args.dtype),
        })
    );
    Ok(())
}
