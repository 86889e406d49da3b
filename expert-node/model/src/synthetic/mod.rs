//! Synthetic checkpoints with a real model's dimensions and tensor names, for benchmarks at the
//! real size without downloading (or storing) the real weights: `coordinator synth` writes one as
//! sharded safetensors with an index, and `--load-format dummy` makes the same weights in memory
//! (as vLLM's dummy load format does). Both use [`fill`], so a written checkpoint and the dummy
//! model of the same config and seed are the same bits.
//!
//! Values follow Hugging Face's `_init_weights` in distribution (normal-like with std 0.02, norms
//! 1.0), drawn from a counter-based generator keyed by (seed, tensor name, chunk) so that any
//! tensor can be made alone, in parallel, in any order.

mod write;

pub use write::{SynthError, write_checkpoint, write_config};

use half::bf16;
use omnishard_proto::ModelConfig;
use rayon::prelude::*;
use serde_json::{Value, json};

/// The real models whose dimensions a synthetic checkpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Qwen3-Omni-30B-A3B's thinker: nested `thinker_config.text_config`, `thinker.` tensor
    /// names, interleaved mRoPE, vocab 152064.
    Qwen3Omni30bA3b,
    /// Qwen3-30B-A3B: a flat `qwen3_moe` config, vocab 151936; what transformers'
    /// `Qwen3MoeForCausalLM` and candle-transformers' `qwen3_moe` load.
    Qwen3_30bA3b,
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qwen3-omni-30b-a3b" => Ok(Preset::Qwen3Omni30bA3b),
            "qwen3-30b-a3b" => Ok(Preset::Qwen3_30bA3b),
            other => Err(format!(
                "unknown preset {other:?}; use qwen3-omni-30b-a3b or qwen3-30b-a3b"
            )),
        }
    }
}

/// Element type of the weights written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    Bf16,
    F32,
}

impl WeightDtype {
    pub(crate) fn size(self) -> usize {
        match self {
            WeightDtype::Bf16 => 2,
            WeightDtype::F32 => 4,
        }
    }

    pub(crate) fn safetensors_name(self) -> &'static str {
        match self {
            WeightDtype::Bf16 => "BF16",
            WeightDtype::F32 => "F32",
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bf16" => Ok(WeightDtype::Bf16),
            "f32" => Ok(WeightDtype::F32),
            other => Err(format!("unknown weight dtype {other:?}; use bf16 or f32")),
        }
    }
}

/// `config.json` of `preset` with `layers` decoder layers and `experts` experts per MoE layer
/// (top-k shrinks to `experts` if fewer).
pub fn config_json(preset: Preset, layers: usize, experts: usize) -> Value {
    let top_k = experts.min(8);
    match preset {
        Preset::Qwen3_30bA3b => json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "decoder_sparse_step": 1,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "initializer_range": 0.02,
            "intermediate_size": 6144,
            "max_position_embeddings": 40960,
            "max_window_layers": layers,
            "mlp_only_layers": [],
            "moe_intermediate_size": 768,
            "norm_topk_prob": true,
            "num_attention_heads": 32,
            "num_experts": experts,
            "num_experts_per_tok": top_k,
            "num_hidden_layers": layers,
            "num_key_value_heads": 4,
            "output_router_logits": false,
            "rms_norm_eps": 1e-6,
            "rope_scaling": null,
            "rope_theta": 1_000_000.0,
            "router_aux_loss_coef": 0.001,
            "sliding_window": null,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": 151936
        }),
        Preset::Qwen3Omni30bA3b => json!({
            "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
            "model_type": "qwen3_omni_moe",
            "enable_audio_output": false,
            "im_start_token_id": 151644,
            "im_end_token_id": 151645,
            "thinker_config": {
                "model_type": "qwen3_omni_moe_thinker",
                "tie_word_embeddings": false,
                "text_config": {
                    "model_type": "qwen3_omni_moe_text",
                    "attention_bias": false,
                    "attention_dropout": 0.0,
                    "decoder_sparse_step": 1,
                    "head_dim": 128,
                    "hidden_act": "silu",
                    "hidden_size": 2048,
                    "initializer_range": 0.02,
                    "intermediate_size": 768,
                    "max_position_embeddings": 65536,
                    "mlp_only_layers": [],
                    "moe_intermediate_size": 768,
                    "norm_topk_prob": true,
                    "num_attention_heads": 32,
                    "num_experts": experts,
                    "num_experts_per_tok": top_k,
                    "num_hidden_layers": layers,
                    "num_key_value_heads": 4,
                    "rms_norm_eps": 1e-6,
                    "rope_scaling": {
                        "interleaved": true,
                        "mrope_interleaved": true,
                        "mrope_section": [24, 20, 20],
                        "rope_type": "default"
                    },
                    "rope_theta": 1_000_000.0,
                    "sliding_window": null,
                    "tie_word_embeddings": false,
                    "use_sliding_window": false,
                    "vocab_size": 152064
                }
            }
        }),
    }
}

/// Name and shape of every text-model tensor of `cfg`, in checkpoint order (layer by layer).
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let prefix = cfg.architecture.tensor_prefix();
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut specs = vec![(
        format!("{prefix}model.embed_tokens.weight"),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("{prefix}model.layers.{l}");
        let mut push = |name: String, shape: Vec<usize>| specs.push((format!("{p}.{name}"), shape));
        push("input_layernorm.weight".into(), vec![h]);
        push("post_attention_layernorm.weight".into(), vec![h]);
        for (proj, out) in [("q", nq * hd), ("k", nkv * hd), ("v", nkv * hd)] {
            push(format!("self_attn.{proj}_proj.weight"), vec![out, h]);
            if cfg.attention_bias {
                push(format!("self_attn.{proj}_proj.bias"), vec![out]);
            }
        }
        push("self_attn.o_proj.weight".into(), vec![h, nq * hd]);
        if cfg.attention_bias {
            push("self_attn.o_proj.bias".into(), vec![h]);
        }
        push("self_attn.q_norm.weight".into(), vec![hd]);
        push("self_attn.k_norm.weight".into(), vec![hd]);
        if cfg.is_moe_layer(l) {
            let inter = cfg.moe_intermediate_size;
            push("mlp.gate.weight".into(), vec![cfg.num_experts, h]);
            for e in 0..cfg.num_experts {
                push(format!("mlp.experts.{e}.gate_proj.weight"), vec![inter, h]);
                push(format!("mlp.experts.{e}.up_proj.weight"), vec![inter, h]);
                push(format!("mlp.experts.{e}.down_proj.weight"), vec![h, inter]);
            }
        } else {
            let inter = cfg.intermediate_size.unwrap_or(0);
            push("mlp.gate_proj.weight".into(), vec![inter, h]);
            push("mlp.up_proj.weight".into(), vec![inter, h]);
            push("mlp.down_proj.weight".into(), vec![h, inter]);
        }
    }
    specs.push((format!("{prefix}model.norm.weight"), vec![h]));
    if !cfg.tie_word_embeddings {
        specs.push((format!("{prefix}lm_head.weight"), vec![cfg.vocab_size, h]));
    }
    specs
}

/// Elements generated per independent chunk (one rayon task).
const CHUNK: usize = 1 << 16;

/// splitmix64: a fast, well-mixed counter-based generator step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn name_key(seed: u64, name: &str) -> u64 {
    name.bytes().fold(mix(seed), |h, b| mix(h ^ u64::from(b)))
}

/// The values of tensor `name` with `len` elements as f32: 1.0 for norm weights, zero biases,
/// otherwise a sum of two uniforms (triangular, std 0.02) — cheap and close enough to the normal
/// initialisation for routing and attention to behave like a freshly initialised model.
fn fill_f32_chunk(key: u64, chunk: usize, out: &mut [f32]) {
    // Triangular on [-a, a] has std a / sqrt(6).
    let a = 0.02 * 6f32.sqrt();
    let mut state = mix(key ^ (chunk as u64).wrapping_mul(0xa076_1d64_78bd_642f));
    for v in out.iter_mut() {
        state = mix(state);
        let u1 = (state & 0xffff_ffff) as f32 / 4_294_967_296.0;
        let u2 = (state >> 32) as f32 / 4_294_967_296.0;
        *v = (u1 + u2 - 1.0) * a;
    }
}

/// What kind of values a tensor gets, from its name.
fn constant_of(name: &str) -> Option<f32> {
    if name.ends_with("norm.weight") {
        Some(1.0)
    } else if name.ends_with(".bias") {
        Some(0.0)
    } else {
        None
    }
}

/// Little-endian bytes of tensor `name` (`len` elements) in `dtype`, deterministic in
/// (`seed`, `name`), whatever the thread count.
pub fn fill(seed: u64, name: &str, len: usize, dtype: WeightDtype) -> Vec<u8> {
    let size = dtype.size();
    let mut bytes = vec![0u8; len * size];
    let key = name_key(seed, name);
    let constant = constant_of(name);
    bytes
        .par_chunks_mut(CHUNK * size)
        .enumerate()
        .for_each(|(chunk, out)| {
            let n = out.len() / size;
            let mut vals = vec![0f32; n];
            match constant {
                Some(c) => vals.fill(c),
                None => fill_f32_chunk(key, chunk, &mut vals),
            }
            match dtype {
                WeightDtype::Bf16 => {
                    for (o, v) in out.chunks_exact_mut(2).zip(&vals) {
                        o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
                    }
                }
                WeightDtype::F32 => {
                    for (o, v) in out.chunks_exact_mut(4).zip(&vals) {
                        o.copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        });
    bytes
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn fill_is_deterministic_and_distributed_like_an_init() {
        let a = fill(7, "x.weight", 100_000, WeightDtype::F32);
        let b = fill(7, "x.weight", 100_000, WeightDtype::F32);
        let c = fill(8, "x.weight", 100_000, WeightDtype::F32);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let vals: Vec<f32> = a
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        let std = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
            "{mean} {std}"
        );
        let norm = fill(7, "model.norm.weight", 3, WeightDtype::Bf16);
        assert_eq!(norm, [0x80, 0x3f].repeat(3));
    }

    /// `--load-format dummy` and a written checkpoint are the same bits, tensor by tensor.
    #[test]
    fn written_checkpoint_equals_dummy_weights() {
        let mut config = config_json(Preset::Qwen3Omni30bA3b, 2, 4);
        let text = &mut config["thinker_config"]["text_config"];
        for (key, value) in [
            ("hidden_size", 32),
            ("head_dim", 8),
            ("num_attention_heads", 4),
            ("num_key_value_heads", 2),
            ("moe_intermediate_size", 16),
            ("intermediate_size", 16),
            ("vocab_size", 50),
        ] {
            text[key] = value.into();
        }
        text["rope_scaling"]["mrope_section"] = serde_json::json!([2, 1, 1]);
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_checkpoint(dir.path(), &config, WeightDtype::Bf16, 3, |_, _| {}).unwrap();
        let files = crate::Checkpoint::open(dir.path()).unwrap();
        let dummy = crate::Checkpoint::dummy(&cfg, 3);
        let other_seed = crate::Checkpoint::dummy(&cfg, 4);
        let device = candle_core::Device::Cpu;
        let specs = tensor_specs(&cfg);
        assert_eq!(files.tensor_names().count(), specs.len());
        let bytes = |c: &crate::Checkpoint, name: &str, shape: &[usize]| {
            let t = c
                .tensor(name, shape, candle_core::DType::F32, &device)
                .unwrap();
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let mut differs = false;
        for (name, shape) in &specs {
            assert_eq!(
                bytes(&files, name, shape),
                bytes(&dummy, name, shape),
                "{name}"
            );
            differs |= bytes(&other_seed, name, shape) != bytes(&dummy, name, shape);
        }
        assert!(differs, "the seed changes the weights");
        assert_eq!(
            crate::fingerprint::fingerprint(&cfg, &files).unwrap(),
            crate::fingerprint::fingerprint(&cfg, &dummy).unwrap()
        );
    }

    #[test]
    fn specs_name_every_tensor_of_both_presets() {
        for preset in [Preset::Qwen3_30bA3b, Preset::Qwen3Omni30bA3b] {
            let text = config_json(preset, 2, 4).to_string();
            let cfg = ModelConfig::from_json(&text, Path::new("synth")).unwrap();
            let specs = tensor_specs(&cfg);
            // embed + 2 × (2 norms + 4 projections + 2 qk norms + router + 4 × 3) + norm + lm_head
            assert_eq!(specs.len(), 1 + 2 * (2 + 4 + 2 + 1 + 12) + 2);
            assert_eq!(cfg.num_experts_per_tok, 4);
        }
    }
}
