//! The model fingerprint that a coordinator and its expert nodes compare before working together:
//! a SHA-256 over the config values that change the math, the name, shape and dtype of every
//! text-model tensor in the checkpoint, and the first bytes of every router weight (so that two
//! fine-tunes of one architecture differ). Weights are otherwise not read.

use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, CheckpointError};
use omnishard_proto::ModelConfig;

/// Hex SHA-256 fingerprint of `cfg` and the text-model tensors of `ckpt`.
pub fn fingerprint(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<String, CheckpointError> {
    let mut h = Sha256::new();
    let c = cfg;
    h.update(
        format!(
            "{:?}|v{}|h{}|i{:?}|l{}|q{}|kv{}|hd{}|eps{:e}|theta{:e}|mrope{:?}|bias{}|e{}|k{}|mi{}|norm{}|step{}|dense{:?}|tie{}",
            c.architecture,
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.rms_norm_eps,
            c.rope_theta,
            c.mrope_section,
            c.attention_bias,
            c.num_experts,
            c.num_experts_per_tok,
            c.moe_intermediate_size,
            c.norm_topk_prob,
            c.decoder_sparse_step,
            c.mlp_only_layers,
            c.tie_word_embeddings
        )
        .as_bytes(),
    );
    let prefix = cfg.architecture.tensor_prefix();
    let mut names: Vec<&str> = ckpt
        .tensor_names()
        .filter(|n| {
            n.starts_with(&format!("{prefix}model.")) || *n == format!("{prefix}lm_head.weight")
        })
        .collect();
    names.sort_unstable();
    for name in names {
        let (shape, dtype) = ckpt.describe(name)?;
        h.update(format!("\n{name}:{shape:?}:{dtype}").as_bytes());
    }
    for layer in cfg.moe_layers() {
        let name = format!("{prefix}model.layers.{layer}.mlp.gate.weight");
        h.update(ckpt.leading_bytes(&name, 64)?);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
