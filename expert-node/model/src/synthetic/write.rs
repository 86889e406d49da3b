//! Writing a synthetic checkpoint to disk as Hugging Face lays one out: `config.json`,
//! safetensors shards and `model.safetensors.index.json`, streamed tensor by tensor.

use std::io::Write;
use std::path::Path;

use omnishard_proto::ModelConfig;
use serde_json::{Value, json};

use super::{WeightDtype, fill, tensor_specs};
use crate::checkpoint::INDEX_FILE;

/// Errors writing a synthetic checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the synthetic config is invalid: {0}")]
    Config(#[from] omnishard_proto::ConfigError),
}

/// Largest shard written, in bytes (Hugging Face's `save_pretrained` default is 5 GB).
const SHARD_BYTES: usize = 4 << 30;

/// Validates `config` and writes it as `dir/config.json` (creating `dir`).
pub fn write_config(dir: &Path, config: &Value) -> Result<ModelConfig, SynthError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config).unwrap_or_default();
    let cfg = ModelConfig::from_json(&text, &path)?;
    std::fs::write(&path, &text).map_err(io(&path))?;
    Ok(cfg)
}

/// Writes `config.json`, safetensors shards of at most ~4 GiB and `model.safetensors.index.json`
/// into `dir` (created if missing). `progress(bytes_done, bytes_total)` after each tensor.
pub fn write_checkpoint(
    dir: &Path,
    config: &Value,
    dtype: WeightDtype,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<ModelConfig, SynthError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    let cfg = write_config(dir, config)?;
    let specs = tensor_specs(&cfg);
    let size = dtype.size();
    let total: usize = specs
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() * size)
        .sum();
    // Consecutive tensors grouped into shards.
    let mut shards: Vec<Vec<&(String, Vec<usize>)>> = vec![Vec::new()];
    let mut in_shard = 0;
    for spec in &specs {
        let bytes = spec.1.iter().product::<usize>() * size;
        if in_shard > 0 && in_shard + bytes > SHARD_BYTES {
            shards.push(Vec::new());
            in_shard = 0;
        }
        in_shard += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(spec);
        }
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut done = 0;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let path = dir.join(&file);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0;
        for (name, shape) in shard {
            let bytes = shape.iter().product::<usize>() * size;
            header.insert(
                name.clone(),
                json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
            weight_map.insert(name.clone(), Value::String(file.clone()));
        }
        let mut header = serde_json::to_vec(&header).unwrap_or_default();
        // The data section starts 8-byte aligned, as the safetensors writer pads it.
        header.resize(header.len().div_ceil(8) * 8, b' ');
        let handle = std::fs::File::create(&path).map_err(io(&path))?;
        let mut out = std::io::BufWriter::with_capacity(8 << 20, handle);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&header))
            .map_err(io(&path))?;
        for (name, shape) in shard {
            let len = shape.iter().product::<usize>();
            out.write_all(&fill(seed, name, len, dtype))
                .map_err(io(&path))?;
            done += len * size;
            progress(done, total);
        }
        out.flush().map_err(io(&path))?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let index_path = dir.join(INDEX_FILE);
    std::fs::write(
        &index_path,
        serde_json::to_string_pretty(&index).unwrap_or_default(),
    )
    .map_err(io(&index_path))?;
    Ok(cfg)
}
