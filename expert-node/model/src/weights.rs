//! Reading a module's weights by its path in the checkpoint, the way candle's
//! `VarBuilder::pp` does: a [`Weights`] names one module (`thinker.model.layers.3.self_attn`),
//! [`Weights::pp`] steps into a sub-module and [`Weights::get`] reads one of its tensors, checked
//! against the shape the config implies and converted to the compute dtype on the compute device.
//! Every `new` of the model, the MLP and the experts loads through it, so each module names only
//! its own tensors (`q_proj`, `weight`) and never spells out the path above it.

use candle_core::{DType, Device, Tensor};
use omnishard_proto::ModelConfig;

use crate::checkpoint::{Checkpoint, CheckpointError};

/// A checkpoint seen from one module: its name prefix, and the dtype and device to load into.
#[derive(Clone)]
pub struct Weights<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl<'a> Weights<'a> {
    /// The checkpoint's root (no prefix).
    pub fn new(ckpt: &'a Checkpoint, dtype: DType, device: &Device) -> Self {
        Self {
            ckpt,
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// The root of the text model's tensors: `thinker.` for a Qwen3-Omni checkpoint, the
    /// checkpoint's root for plain Qwen3-MoE. `model.…` and `lm_head` lie under it.
    pub fn text_root(
        ckpt: &'a Checkpoint,
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self::new(ckpt, dtype, device).pp(cfg.architecture.tensor_prefix().trim_end_matches('.'))
    }

    /// The sub-module `name` (which may itself contain dots, or be a layer index). An empty
    /// `name` is this module.
    pub fn pp(&self, name: impl ToString) -> Self {
        Self {
            ckpt: self.ckpt,
            prefix: self.path(&name.to_string()),
            dtype: self.dtype,
            device: self.device.clone(),
        }
    }

    /// Reads this module's tensor `name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, CheckpointError> {
        self.ckpt
            .tensor(&self.path(name), shape, self.dtype, &self.device)
    }

    /// The full checkpoint name of this module's tensor (or sub-module) `name`.
    pub fn path(&self, name: &str) -> String {
        match (self.prefix.is_empty(), name.is_empty()) {
            (_, true) => self.prefix.clone(),
            (true, false) => name.to_string(),
            (false, false) => format!("{}.{name}", self.prefix),
        }
    }

    /// This module's name prefix (empty at the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{Preset, config_json};
    use std::path::Path;

    #[test]
    fn paths_join_with_dots_and_skip_empty_parts() {
        let text = config_json(Preset::Qwen3Omni30bA3b, 2, 4).to_string();
        let cfg = ModelConfig::from_json(&text, Path::new("synth")).unwrap();
        let ckpt = Checkpoint::dummy(&cfg, 0);
        let root = Weights::new(&ckpt, DType::F32, &Device::Cpu);
        assert_eq!(root.prefix(), "");
        assert_eq!(root.pp("").prefix(), "");
        assert_eq!(root.path("lm_head.weight"), "lm_head.weight");
        let text_root = Weights::text_root(&ckpt, &cfg, DType::F32, &Device::Cpu);
        assert_eq!(text_root.prefix(), "thinker");
        let attn = text_root.pp("model.layers").pp(1).pp("self_attn");
        assert_eq!(attn.prefix(), "thinker.model.layers.1.self_attn");
        assert_eq!(
            attn.pp("q_proj").path("weight"),
            "thinker.model.layers.1.self_attn.q_proj.weight"
        );
        let norm = text_root.pp("model.norm").get("weight", &[2048]).unwrap();
        assert_eq!((norm.dims(), norm.dtype()), (&[2048][..], DType::F32));
        let err = text_root.pp("model.norm").get("weight", &[7]).unwrap_err();
        assert!(
            err.to_string().contains("thinker.model.norm.weight"),
            "{err}"
        );
    }
}
