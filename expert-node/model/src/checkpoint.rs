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
use safetensors::{Dtype as StDtype, SafeTensors, tensor::Metadata};

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

/// A checkpoint directory. Cheap to open: only the index (or the single file's header) is read.
pub struct Checkpoint {
    dir: PathBuf,
    /// Tensor name → file name, relative to `dir`.
    weight_map: HashMap<String, String>,
    where_: String,
    shards: Mutex<HashMap<String, Arc<Shard>>>,
}

#[derive(serde::Deserialize)]
struct IndexJson {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        if index_path.exists() {
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
            Ok(Self {
                dir: dir.to_path_buf(),
                weight_map: index.weight_map,
                where_: format!("not listed in {}", index_path.display()),
                shards: Mutex::new(HashMap::new()),
            })
        } else if single_path.exists() {
            let ckpt = Self {
                dir: dir.to_path_buf(),
                weight_map: HashMap::new(),
                where_: format!("not in {}", single_path.display()),
                shards: Mutex::new(HashMap::new()),
            };
            let shard = ckpt.shard(SINGLE_FILE, "<header>")?;
            let weight_map = shard
                .metadata
                .tensors()
                .into_keys()
                .map(|name| (name, SINGLE_FILE.to_string()))
                .collect();
            Ok(Self { weight_map, ..ckpt })
        } else {
            Err(CheckpointError::NoWeights {
                dir: dir.to_path_buf(),
            })
        }
    }

    /// Maps a shard on first use and validates its header against the file length.
    fn shard(&self, file: &str, tensor: &str) -> Result<Arc<Shard>, CheckpointError> {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = shards.get(file) {
            return Ok(s.clone());
        }
        let path = self.dir.join(file);
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

    /// Every tensor name the checkpoint lists.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.weight_map.keys().map(String::as_str)
    }

    /// Shape and dtype of a tensor as stored, without reading its data.
    pub fn describe(&self, name: &str) -> Result<(Vec<usize>, String), CheckpointError> {
        let (shard, _) = self.locate(name)?;
        Ok(shard
            .metadata
            .info(name)
            .map(|i| (i.shape.clone(), format!("{:?}", i.dtype)))
            .unwrap_or_default())
    }

    /// The first `n` bytes (at most) of a tensor's data.
    pub fn leading_bytes(&self, name: &str, n: usize) -> Result<Vec<u8>, CheckpointError> {
        let (shard, path) = self.locate(name)?;
        let (start, end) = shard
            .metadata
            .info(name)
            .map(|i| i.data_offsets)
            .unwrap_or_default();
        let end = end.min(start + n);
        shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| CheckpointError::Corrupt {
                path,
                tensor: name.to_string(),
                reason: "data offsets beyond the end of the file".to_string(),
            })
    }

    fn locate(&self, name: &str) -> Result<(Arc<Shard>, PathBuf), CheckpointError> {
        let file = self
            .weight_map
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                tensor: name.to_string(),
                where_: self.where_.clone(),
            })?;
        let shard = self.shard(file, name)?;
        let path = self.dir.join(file);
        if shard.metadata.info(name).is_none() {
            return Err(CheckpointError::MissingTensor {
                tensor: name.to_string(),
                where_: format!(
                    "the index lists it in {}, whose header does not have it",
                    path.display()
                ),
            });
        }
        Ok((shard, path))
    }

    /// Reads tensor `name`, checks its shape, and converts it to `dtype` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        expected_shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, CheckpointError> {
        let (shard, path) = self.locate(name)?;
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                tensor: name.to_string(),
                where_: self.where_.clone(),
            })?;
        if info.shape != expected_shape {
            return Err(CheckpointError::Shape {
                tensor: name.to_string(),
                path,
                expected: expected_shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let src_dtype = match info.dtype {
            StDtype::BF16 => DType::BF16,
            StDtype::F16 => DType::F16,
            StDtype::F32 => DType::F32,
            other => {
                return Err(CheckpointError::Dtype {
                    tensor: name.to_string(),
                    path,
                    dtype: format!("{other:?}"),
                });
            }
        };
        let (start, end) = info.data_offsets;
        // read_metadata validated that the offsets tile the data section exactly.
        let bytes = shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| CheckpointError::Corrupt {
                path: path.clone(),
                tensor: name.to_string(),
                reason: "data offsets beyond the end of the file".to_string(),
            })?;
        let candle = |source| CheckpointError::Candle {
            tensor: name.to_string(),
            source,
        };
        let t = Tensor::from_raw_buffer(bytes, src_dtype, expected_shape, &Device::Cpu)
            .map_err(candle)?;
        t.to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(candle)
    }
}
