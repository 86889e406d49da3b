//! `coordinator synth`: writes a random-weight checkpoint with a real model's dimensions, tensor
//! names and config (sharded safetensors with an index), for benchmarks at the real size. The
//! weights are those `--load-format dummy` makes in memory for the same seed.

use std::path::PathBuf;
use std::time::Instant;

use omnishard_model::synthetic::{self, Preset, SynthError, WeightDtype};
use omnishard_proto::ModelConfig;

/// Arguments of `coordinator synth`.
#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Directory to write (created if missing; existing files of the same names are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Whose dimensions and config layout: qwen3-omni-30b-a3b (the thinker, nested config,
    /// `thinker.` names) or qwen3-30b-a3b (flat qwen3_moe, loadable by transformers and candle).
    #[arg(long, default_value = "qwen3-omni-30b-a3b")]
    pub preset: Preset,
    /// Decoder layers (the real models have 48; each costs ~1.2 GB in bf16).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub layers: u32,
    /// Experts per MoE layer (the real models have 128; top-k is min(8, experts)).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub experts: u32,
    /// Element type of the weights: bf16 (as the real checkpoints) or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: WeightDtype,
    /// Seed of the weights; `--load-format dummy --seed S` makes the same ones in memory.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write config.json only (for `--load-format dummy`, which needs no weight files).
    #[arg(long)]
    pub config_only: bool,
}

/// Writes the checkpoint; returns its config.
pub fn run(args: &SynthArgs) -> Result<ModelConfig, SynthError> {
    let config = synthetic::config_json(args.preset, args.layers as usize, args.experts as usize);
    if args.config_only {
        return synthetic::write_config(&args.out, &config);
    }
    let started = Instant::now();
    let mut last_report = Instant::now();
    let cfg =
        synthetic::write_checkpoint(&args.out, &config, args.dtype, args.seed, |done, total| {
            if last_report.elapsed().as_secs() >= 2 || done == total {
                last_report = Instant::now();
                eprintln!(
                    "synth: {:.1} of {:.1} GB written",
                    done as f64 / 1e9,
                    total as f64 / 1e9
                );
            }
        })?;
    eprintln!(
        "synth: wrote {} ({} layers, {} experts, {:?}) in {:.1} s",
        args.out.display(),
        cfg.num_hidden_layers,
        cfg.num_experts,
        args.dtype,
        started.elapsed().as_secs_f64()
    );
    Ok(cfg)
}
