//! Reading a Hugging Face safetensors checkpoint, single-file or sharded with
//! `model.safetensors.index.json`, through memory maps (memmap2 + the `safetensors` crate).
//!
//! A process touches only the tensors it asks for: shards are mapped on first use, and only the
//! pages of the requested tensors are ever read. Every failure names the file and the tensor, so a
//! truncated download or a missing shard is diagnosed without a debugger.
//! Format: <https://github.com/huggingface/safetensors#format>.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use omnishard_proto::ModelConfig;
use safetensors::{Dtype as StDtype, SafeTensors, tensor::Metadata, tensor::TensorInfo};

use crate::synthetic::{self, WeightDtype};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// Errors reading checkpoint tensors.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "{dir}: no {INDEX_FILE} and no {SINGLE_FILE}; point --model at a Hugging Face checkpoint directory"
    )]
    NoWeights { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error(
        "shard {path} (holding tensor {tensor}) is missing: {source}; the download is incomplete"
    )]
    MissingShard {
        path: PathBuf,
        tensor: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is truncated or corrupt ({reason}) while reading tensor {tensor}; download it again"
    )]
    Corrupt {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("tensor {tensor} is not in the checkpoint ({where_})")]
    MissingTensor { tensor: String, where_: String },
    #[error("tensor {tensor} in {path} has shape {actual:?}, the config implies {expected:?}")]
    Shape {
        tensor: String,
        path: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor {tensor} in {path} has dtype {dtype}; only bf16, f16 and f32 weights are read")]
    Dtype {
        tensor: String,
        path: PathBuf,
        dtype: String,
    },
    #[error("tensor {tensor}: {source}")]
    Candle {
        tensor: String,
        source: candle_core::Error,
    },
}

/// One mapped shard with its parsed header.
struct Shard {
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// Where a checkpoint's tensors come from.
enum Source {
    /// Safetensors files in a directory.
    Files {
        dir: PathBuf,
        /// Tensor name → file name, relative to `dir`.
        weight_map: HashMap<String, String>,
        where_: String,
        shards: Mutex<HashMap<String, Arc<Shard>>>,
    },
    /// Made in memory from a seed (`--load-format dummy`), never read from disk.
    Dummy {
        specs: HashMap<String, Vec<usize>>,
        seed: u64,
    },
}

/// How a process gets its weights (`--load-format`, as vLLM's flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFormat {
    /// The checkpoint's safetensors files.
    Auto,
    /// Random weights of the config's shapes, made in memory from a seed: benchmarks of a model
    /// whose checkpoint is not at hand (only its config.json is needed).
    Dummy,
}

impl std::str::FromStr for LoadFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" | "safetensors" => Ok(LoadFormat::Auto),
            "dummy" => Ok(LoadFormat::Dummy),
            other => Err(format!("unknown load format {other:?}; use auto or dummy")),
        }
    }
}

/// A checkpoint: a directory of safetensors (cheap to open: only the index or the single file's
/// header is read), or synthetic weights of a config's shapes. Clones share the mapped files.
#[derive(Clone)]
pub struct Checkpoint {
    source: Arc<Source>,
}

#[derive(serde::Deserialize)]
struct IndexJson {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let shards = Mutex::new(HashMap::new());
        let (weight_map, where_) = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|source| CheckpointError::Io {
                    path: index_path.clone(),
                    source,
                })?;
            let index: IndexJson =
                serde_json::from_str(&text).map_err(|e| CheckpointError::Index {
                    path: index_path.clone(),
                    reason: e.to_string(),
                })?;
            if let Some((name, file)) = index
                .weight_map
                .iter()
                .find(|(_, f)| f.contains('/') || f.contains('\\') || f.starts_with('.'))
            {
                return Err(CheckpointError::Index {
                    path: index_path,
                    reason: format!("tensor {name} points outside the directory: {file:?}"),
                });
            }
            let where_ = format!("not listed in {}", index_path.display());
            (index.weight_map, where_)
        } else if single_path.exists() {
            let shard = map_shard(dir, &shards, SINGLE_FILE, "<header>")?;
            let weight_map = shard
                .metadata
                .tensors()
                .into_keys()
                .map(|name| (name, SINGLE_FILE.to_string()))
                .collect();
            (weight_map, format!("not in {}", single_path.display()))
        } else {
            return Err(CheckpointError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        Ok(Self {
            source: Arc::new(Source::Files {
                dir: dir.to_path_buf(),
                weight_map,
                where_,
                shards,
            }),
        })
    }

    /// The checkpoint of `dir` (whose config is `cfg`) as `format` says: its files, or dummy
    /// weights from `seed`.
    pub fn load(
        dir: &Path,
        cfg: &ModelConfig,
        format: LoadFormat,
        seed: u64,
    ) -> Result<Self, CheckpointError> {
        match format {
            LoadFormat::Auto => Self::open(dir),
            LoadFormat::Dummy => Ok(Self::dummy(cfg, seed)),
        }
    }

    /// Synthetic bf16 weights of `cfg`'s shapes, made on demand from `seed`
    /// ([`crate::synthetic::fill`]): the same bits `coordinator synth` writes for that seed.
    pub fn dummy(cfg: &ModelConfig, seed: u64) -> Self {
        Self {
            source: Arc::new(Source::Dummy {
                specs: synthetic::tensor_specs(cfg).into_iter().collect(),
                seed,
            }),
        }
    }

    /// Every tensor name the checkpoint lists.
    pub fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self.source.as_ref() {
            Source::Files { weight_map, .. } => Box::new(weight_map.keys().map(String::as_str)),
            Source::Dummy { specs, .. } => Box::new(specs.keys().map(String::as_str)),
        }
    }

    /// Shape and dtype of a tensor as stored, without reading its data.
    pub fn describe(&self, name: &str) -> Result<(Vec<usize>, String), CheckpointError> {
        match self.source.as_ref() {
            Source::Files { .. } => {
                let (_, _, info) = self.locate(name)?;
                Ok((info.shape, format!("{:?}", info.dtype)))
            }
            Source::Dummy { specs, .. } => Ok((self.dummy_shape(specs, name)?, "BF16".into())),
        }
    }

    /// The first `n` bytes (at most) of a tensor's data.
    pub fn leading_bytes(&self, name: &str, n: usize) -> Result<Vec<u8>, CheckpointError> {
        match self.source.as_ref() {
            Source::Files { .. } => {
                let (shard, path, info) = self.locate(name)?;
                let bytes = shard_bytes(&shard, &path, name, &info)?;
                Ok(bytes[..n.min(bytes.len())].to_vec())
            }
            Source::Dummy { specs, seed } => {
                let len = self.dummy_shape(specs, name)?.iter().product::<usize>();
                let mut bytes = synthetic::fill(*seed, name, len, WeightDtype::Bf16);
                bytes.truncate(n);
                Ok(bytes)
            }
        }
    }

    fn dummy_shape(
        &self,
        specs: &HashMap<String, Vec<usize>>,
        name: &str,
    ) -> Result<Vec<usize>, CheckpointError> {
        specs
            .get(name)
            .cloned()
            .ok_or_else(|| CheckpointError::MissingTensor {
                tensor: name.to_string(),
                where_: "not a tensor of this config (--load-format dummy)".into(),
            })
    }

    /// The shard holding `name`, its path and the tensor's header entry.
    fn locate(&self, name: &str) -> Result<(Arc<Shard>, PathBuf, TensorInfo), CheckpointError> {
        let Source::Files {
            dir,
            weight_map,
            where_,
            shards,
        } = self.source.as_ref()
        else {
            return Err(CheckpointError::MissingTensor {
                tensor: name.to_string(),
                where_: "a dummy checkpoint has no files".into(),
            });
        };
        let file = weight_map
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                tensor: name.to_string(),
                where_: where_.clone(),
            })?;
        let shard = map_shard(dir, shards, file, name)?;
        let path = dir.join(file);
        let info =
            shard
                .metadata
                .info(name)
                .cloned()
                .ok_or_else(|| CheckpointError::MissingTensor {
                    tensor: name.to_string(),
                    where_: format!(
                        "the index lists it in {}, whose header does not have it",
                        path.display()
                    ),
                })?;
        Ok((shard, path, info))
    }

    /// Reads tensor `name`, checks its shape, and converts it to `dtype` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        expected_shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, CheckpointError> {
        let candle = |source| CheckpointError::Candle {
            tensor: name.to_string(),
            source,
        };
        let t = match self.source.as_ref() {
            Source::Files { .. } => {
                let (shard, path, info) = self.locate(name)?;
                let src_dtype = check_tensor(name, &path, &info, expected_shape)?;
                let bytes = shard_bytes(&shard, &path, name, &info)?;
                Tensor::from_raw_buffer(bytes, src_dtype, expected_shape, &Device::Cpu)
                    .map_err(candle)?
            }
            Source::Dummy { specs, seed } => {
                let shape = self.dummy_shape(specs, name)?;
                if shape != expected_shape {
                    return Err(CheckpointError::Shape {
                        tensor: name.to_string(),
                        path: PathBuf::from("<dummy>"),
                        expected: expected_shape.to_vec(),
                        actual: shape,
                    });
                }
                let len = shape.iter().product::<usize>();
                let bytes = synthetic::fill(*seed, name, len, WeightDtype::Bf16);
                Tensor::from_raw_buffer(&bytes, DType::BF16, expected_shape, &Device::Cpu)
                    .map_err(candle)?
            }
        };
        t.to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(candle)
    }
}

/// Maps a shard on first use and validates its header against the file length.
fn map_shard(
    dir: &Path,
    shards: &Mutex<HashMap<String, Arc<Shard>>>,
    file: &str,
    tensor: &str,
) -> Result<Arc<Shard>, CheckpointError> {
    let mut shards = shards.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = shards.get(file) {
        return Ok(s.clone());
    }
    let path = dir.join(file);
    let handle = File::open(&path).map_err(|source| CheckpointError::MissingShard {
        path: path.clone(),
        tensor: tensor.to_string(),
        source,
    })?;
    // SAFETY: the mapping is read-only; a checkpoint rewritten underneath a running process is
    // outside what we can defend against (as for every mmap-based loader).
    let mmap = unsafe { Mmap::map(&handle) }.map_err(|source| CheckpointError::Io {
        path: path.clone(),
        source,
    })?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|e| CheckpointError::Corrupt {
            path: path.clone(),
            tensor: tensor.to_string(),
            reason: e.to_string(),
        })?;
    let shard = Arc::new(Shard {
        data_start: 8 + header_len,
        mmap,
        metadata,
    });
    shards.insert(file.to_string(), shard.clone());
    Ok(shard)
}

/// Checks a tensor's stored shape and dtype; returns the dtype.
fn check_tensor(
    name: &str,
    path: &Path,
    info: &TensorInfo,
    expected_shape: &[usize],
) -> Result<DType, CheckpointError> {
    if info.shape != expected_shape {
        return Err(CheckpointError::Shape {
            tensor: name.to_string(),
            path: path.to_path_buf(),
            expected: expected_shape.to_vec(),
            actual: info.shape.clone(),
        });
    }
    match info.dtype {
        StDtype::BF16 => Ok(DType::BF16),
        StDtype::F16 => Ok(DType::F16),
        StDtype::F32 => Ok(DType::F32),
        other => Err(CheckpointError::Dtype {
            tensor: name.to_string(),
            path: path.to_path_buf(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// A tensor's bytes inside its mapped shard.
fn shard_bytes<'a>(
    shard: &'a Shard,
    path: &Path,
    name: &str,
    info: &TensorInfo,
) -> Result<&'a [u8], CheckpointError> {
    let (start, end) = info.data_offsets;
    // read_metadata validated that the offsets tile the data section exactly.
    shard
        .mmap
        .get(shard.data_start + start..shard.data_start + end)
        .ok_or_else(|| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            reason: "data offsets beyond the end of the file".to_string(),
        })
}
