//! The model configuration: `config.json` of a Qwen3-Omni checkpoint (its
//! `thinker_config.text_config`) or of a plain Qwen3-MoE checkpoint (flat, `model_type`
//! "qwen3_moe"), read once and validated once.
//!
//! Field names and defaults mirror Hugging Face transformers 4.57.3
//! (`Qwen3OmniMoeTextConfig`, `Qwen3MoeConfig`). Every field that changes the math is either
//! honoured or refused here with a message naming it, so the model code never has to guess.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// Errors reading or validating `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid model config: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path}: unsupported model_type {model_type:?}; omnishard runs \"qwen3_omni_moe\" (the thinker) and \"qwen3_moe\""
    )]
    UnsupportedModel { path: PathBuf, model_type: String },
    #[error("{path}: unsupported config value `{field}` = {value}: {hint}")]
    Unsupported {
        path: PathBuf,
        field: String,
        value: String,
        hint: String,
    },
}

/// Which checkpoint layout the config came from; decides the tensor-name prefix and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `Qwen3OmniMoeForConditionalGeneration`: the text thinker under `thinker.`.
    Qwen3OmniThinker,
    /// `Qwen3MoeForCausalLM`: flat names.
    Qwen3Moe,
}

impl Architecture {
    /// Prefix of every text-model tensor name in the checkpoint.
    pub fn tensor_prefix(self) -> &'static str {
        match self {
            Architecture::Qwen3OmniThinker => "thinker.",
            Architecture::Qwen3Moe => "",
        }
    }
}

/// `rope_scaling` as written in config.json (`type` is the old spelling of `rope_type`).
#[derive(Debug, Clone, Deserialize)]
struct RawRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    mrope_section: Option<Vec<usize>>,
    mrope_interleaved: Option<bool>,
    /// Spelling of `mrope_interleaved` in some Qwen-Omni family configs.
    interleaved: Option<bool>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// The text model's config.json fields; `None` means "absent", resolved to the architecture's
/// default by [`ModelConfig::resolve`]. Unknown fields are ignored on purpose: real configs carry
/// dozens of fields that do not affect inference.
#[derive(Debug, Clone, Deserialize)]
struct RawTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: Option<usize>,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRopeScaling>,
    attention_bias: Option<bool>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    tie_word_embeddings: Option<bool>,
    use_sliding_window: Option<bool>,
    max_position_embeddings: Option<usize>,
    eos_token_id: Option<Value>,
}

/// A validated text-model configuration. Construct with [`ModelConfig::from_model_dir`] or
/// [`ModelConfig::from_json`].
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP layers; `None` when every layer is MoE.
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Interleaved mRoPE sections (t, h, w) in frequencies; `None` is plain 1-D RoPE.
    pub mrope_section: Option<[usize; 3]>,
    pub attention_bias: bool,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: Option<usize>,
    /// `eos_token_id` from config.json (top level or text config), if any.
    pub eos_token_ids: Vec<u32>,
}

fn unsupported(path: &Path, field: &str, value: impl std::fmt::Debug, hint: &str) -> ConfigError {
    ConfigError::Unsupported {
        path: path.to_path_buf(),
        field: field.to_string(),
        value: format!("{value:?}"),
        hint: hint.to_string(),
    }
}

/// `eos_token_id` may be an integer or a list of integers.
pub fn token_ids_from_json(value: &Value) -> Vec<u32> {
    match value {
        Value::Number(n) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text, &path)
    }

    /// Parses a config.json document; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let json_err = |source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        };
        let root: Value = serde_json::from_str(text).map_err(json_err)?;
        let model_type = root
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("<missing>")
            .to_string();
        let (architecture, text_value) = match model_type.as_str() {
            "qwen3_omni_moe" => {
                let text_config = root
                    .pointer("/thinker_config/text_config")
                    .cloned()
                    .ok_or_else(|| {
                        unsupported(
                            path,
                            "thinker_config.text_config",
                            "<missing>",
                            "a qwen3_omni_moe config must carry the thinker's text config",
                        )
                    })?;
                (Architecture::Qwen3OmniThinker, text_config)
            }
            "qwen3_moe" => (Architecture::Qwen3Moe, root.clone()),
            _ => {
                return Err(ConfigError::UnsupportedModel {
                    path: path.to_path_buf(),
                    model_type,
                });
            }
        };
        let raw: RawTextConfig = serde_json::from_value(text_value).map_err(json_err)?;
        let top_eos = root.get("eos_token_id").map(token_ids_from_json);
        Self::resolve(architecture, raw, top_eos, path)
    }

    fn resolve(
        architecture: Architecture,
        raw: RawTextConfig,
        top_eos: Option<Vec<u32>>,
        path: &Path,
    ) -> Result<Self, ConfigError> {
        let omni = architecture == Architecture::Qwen3OmniThinker;
        // Defaults of Qwen3OmniMoeTextConfig / Qwen3MoeConfig in transformers 4.57.3.
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(4);
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let cfg = ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw
                .rope_theta
                .unwrap_or(if omni { 1_000_000.0 } else { 10_000.0 }),
            mrope_section: None,
            attention_bias: raw.attention_bias.unwrap_or(false),
            num_experts: raw.num_experts.unwrap_or(128),
            num_experts_per_tok: raw.num_experts_per_tok.unwrap_or(8),
            moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(768),
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(omni),
            decoder_sparse_step: raw.decoder_sparse_step.unwrap_or(1),
            mlp_only_layers: raw.mlp_only_layers.clone().unwrap_or_default(),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: raw.max_position_embeddings,
            eos_token_ids: raw
                .eos_token_id
                .as_ref()
                .map(token_ids_from_json)
                .or(top_eos)
                .unwrap_or_default(),
        };
        let mrope_section = Self::validate_rope(&raw, &cfg, path)?;
        let cfg = ModelConfig {
            mrope_section,
            ..cfg
        };
        cfg.validate(&raw, path)?;
        Ok(cfg)
    }

    fn validate_rope(
        raw: &RawTextConfig,
        cfg: &ModelConfig,
        path: &Path,
    ) -> Result<Option<[usize; 3]>, ConfigError> {
        let omni = cfg.architecture == Architecture::Qwen3OmniThinker;
        let Some(rs) = &raw.rope_scaling else {
            if omni {
                return Err(unsupported(
                    path,
                    "rope_scaling",
                    "null",
                    "the Qwen3-Omni thinker needs rope_scaling.mrope_section (e.g. [24, 20, 20])",
                ));
            }
            return Ok(None);
        };
        let rope_type = rs
            .rope_type
            .as_deref()
            .or(rs.legacy_type.as_deref())
            .unwrap_or("default");
        if rope_type != "default" {
            return Err(unsupported(
                path,
                "rope_scaling.rope_type",
                rope_type,
                "only \"default\" RoPE is implemented (no yarn, linear or dynamic scaling)",
            ));
        }
        if let Some(key) = rs.other.keys().next() {
            return Err(unsupported(
                path,
                &format!("rope_scaling.{key}"),
                &rs.other[key],
                "this RoPE scaling parameter is not implemented; remove it or use a checkpoint without it",
            ));
        }
        if !omni {
            if rs.mrope_section.is_some() {
                return Err(unsupported(
                    path,
                    "rope_scaling.mrope_section",
                    &rs.mrope_section,
                    "qwen3_moe uses plain RoPE; mRoPE is only defined for the Qwen3-Omni thinker",
                ));
            }
            return Ok(None);
        }
        if let Some((field, false)) = [
            ("mrope_interleaved", rs.mrope_interleaved),
            ("interleaved", rs.interleaved),
        ]
        .into_iter()
        .find_map(|(f, v)| v.filter(|v| !v).map(|v| (f, v)))
        {
            return Err(unsupported(
                path,
                &format!("rope_scaling.{field}"),
                false,
                "the reference always applies the interleaved mRoPE layout to Qwen3-Omni; a non-interleaved checkpoint would be silently wrong, so it is refused",
            ));
        }
        let section = rs.mrope_section.clone().unwrap_or_else(|| vec![24, 20, 20]);
        let half = cfg.head_dim / 2;
        match section.as_slice() {
            &[t, h, w] if t + h + w == half && 3 * h <= half && 3 * w <= half => {
                Ok(Some([t, h, w]))
            }
            _ => Err(unsupported(
                path,
                "rope_scaling.mrope_section",
                &section,
                &format!(
                    "need three sections (t, h, w) summing to head_dim / 2 = {half}, with 3*h and 3*w at most {half}"
                ),
            )),
        }
    }

    fn validate(&self, raw: &RawTextConfig, path: &Path) -> Result<(), ConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("decoder_sparse_step", self.decoder_sparse_step),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(unsupported(path, field, value, "must be at least 1"));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(unsupported(
                path,
                "head_dim",
                self.head_dim,
                "RoPE needs an even head_dim",
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(unsupported(
                path,
                "num_key_value_heads",
                self.num_key_value_heads,
                &format!(
                    "must divide num_attention_heads = {}",
                    self.num_attention_heads
                ),
            ));
        }
        let act = raw.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" {
            return Err(unsupported(
                path,
                "hidden_act",
                act,
                "only SwiGLU with silu is implemented",
            ));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(unsupported(
                path,
                "use_sliding_window",
                true,
                "sliding-window attention is not implemented",
            ));
        }
        if let Some(&layer) = self
            .mlp_only_layers
            .iter()
            .find(|&&l| l >= self.num_hidden_layers)
        {
            return Err(unsupported(
                path,
                "mlp_only_layers",
                layer,
                &format!(
                    "layer index out of range (the model has {} layers)",
                    self.num_hidden_layers
                ),
            ));
        }
        let moe = self.moe_layers();
        if !moe.is_empty() {
            if self.moe_intermediate_size == 0 {
                return Err(unsupported(
                    path,
                    "moe_intermediate_size",
                    0,
                    "must be at least 1",
                ));
            }
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
                return Err(unsupported(
                    path,
                    "num_experts_per_tok",
                    self.num_experts_per_tok,
                    &format!("must be between 1 and num_experts = {}", self.num_experts),
                ));
            }
        }
        if moe.len() < self.num_hidden_layers && self.intermediate_size.unwrap_or(0) == 0 {
            return Err(unsupported(
                path,
                "intermediate_size",
                self.intermediate_size,
                "the config has dense MLP layers (mlp_only_layers / decoder_sparse_step), which need intermediate_size",
            ));
        }
        Ok(())
    }

    /// Whether `layer` has a sparse MoE block (the rule of `Qwen3OmniMoeThinkerTextDecoderLayer`).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// Indices of the MoE layers, ascending.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .collect()
    }

    /// Every (layer, expert) pair the checkpoint must provide, in (layer, expert) order.
    pub fn expert_pairs(&self) -> Vec<(usize, usize)> {
        self.moe_layers()
            .into_iter()
            .flat_map(|l| (0..self.num_experts).map(move |e| (l, e)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn omni(text: serde_json::Value) -> String {
        serde_json::json!({"model_type": "qwen3_omni_moe", "thinker_config": {"text_config": text}})
            .to_string()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": true}
        })
    }

    fn parse(v: serde_json::Value) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json(&omni(v), Path::new("config.json"))
    }

    #[test]
    fn reads_omni_defaults() {
        let mut with_interleaved = base();
        with_interleaved["rope_scaling"]["interleaved"] = true.into();
        assert!(parse(with_interleaved).is_ok());
        let cfg = parse(base()).unwrap();
        assert_eq!(cfg.architecture, Architecture::Qwen3OmniThinker);
        assert!(cfg.norm_topk_prob);
        assert_eq!(cfg.mrope_section, Some([6, 5, 5]));
        assert_eq!(cfg.expert_pairs().len(), 16);
    }

    #[test]
    fn refuses_math_changing_values() {
        let cases = [
            (
                "mrope_interleaved",
                serde_json::json!({"rope_scaling": {"mrope_section": [6,5,5], "mrope_interleaved": false}}),
            ),
            (
                "rope_scaling.interleaved",
                serde_json::json!({"rope_scaling": {"mrope_section": [6,5,5], "interleaved": false}}),
            ),
            (
                "rope_type",
                serde_json::json!({"rope_scaling": {"rope_type": "yarn", "mrope_section": [6,5,5]}}),
            ),
            (
                "rope_scaling.factor",
                serde_json::json!({"rope_scaling": {"mrope_section": [6,5,5], "factor": 4.0}}),
            ),
            (
                "mrope_section",
                serde_json::json!({"rope_scaling": {"mrope_section": [8,8,8]}}),
            ),
            ("hidden_act", serde_json::json!({"hidden_act": "gelu"})),
            (
                "use_sliding_window",
                serde_json::json!({"use_sliding_window": true}),
            ),
            (
                "num_key_value_heads",
                serde_json::json!({"num_key_value_heads": 3}),
            ),
            (
                "intermediate_size",
                serde_json::json!({"mlp_only_layers": [0]}),
            ),
            (
                "mlp_only_layers",
                serde_json::json!({"mlp_only_layers": [7], "intermediate_size": 8}),
            ),
            (
                "num_experts_per_tok",
                serde_json::json!({"num_experts_per_tok": 9}),
            ),
        ];
        for (field, patch) in cases {
            let mut v = base();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn refuses_unknown_architecture() {
        let err = ModelConfig::from_json(r#"{"model_type": "llama"}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("llama"), "{err}");
    }

    #[test]
    fn dense_layers_follow_sparse_step_and_mlp_only() {
        let mut v = base();
        v["num_hidden_layers"] = 4.into();
        v["decoder_sparse_step"] = 2.into();
        v["mlp_only_layers"] = serde_json::json!([3]);
        v["intermediate_size"] = 32.into();
        let cfg = parse(v).unwrap();
        assert_eq!(cfg.moe_layers(), vec![1]);
    }
}
