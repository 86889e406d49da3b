//! Hidden states a coordinator on a GPU sends in its own GPU memory (CUDA IPC,
//! `ForwardRequest.device_hidden`): each round of a layer's call gathers every node's rows into
//! one exported buffer, which the nodes map and copy from (`ipc.rs` holds the buffers and the
//! mapping side). At batch 128 the rows are 512 KiB per node and layer; as bytes they cost a
//! copy off the GPU, an encode and the node's upload (BENCHMARKS.md, issue 15).

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaContext, sys};
use candle_core::{Device, Result, Tensor, bail};
use omnishard_proto::v1;

use super::ipc::{DeviceBuffer, GRANULE, check, with_raw};
use crate::wire::travelling_dtype;

/// Most staging buffers a coordinator keeps for reuse (one per layer call in flight).
const MAX_STAGING: usize = 8;

/// One exported buffer of the coordinator's.
pub(super) struct StagingBuffer {
    pub(super) slot: u32,
    pub(super) generation: u64,
    bytes: usize,
    pub(super) buffer: DeviceBuffer,
}

/// The coordinator's side of requests in GPU memory (`ForwardRequest.device_hidden`): buffers
/// it exports for the hidden states it sends, each held by one round of a layer's call until
/// that round's answers are in (a node reads its rows before it answers; one that never answers
/// reads, at worst, rows of a later call into an answer no one takes).
pub struct IpcStaging {
    free: Mutex<Vec<StagingBuffer>>,
    next: Mutex<(u32, u64)>,
}

impl Default for IpcStaging {
    fn default() -> Self {
        Self {
            free: Mutex::default(),
            next: Mutex::new((0, RandomState::new().hash_one(std::process::id()))),
        }
    }
}

/// Rows staged for one round: each part's tensor as a node maps it; the buffer goes back to
/// the pool when this is dropped.
pub struct StagedRows<'a> {
    staging: &'a IpcStaging,
    buffer: Option<StagingBuffer>,
    pub parts: Vec<v1::DeviceTensor>,
}

impl Drop for StagedRows<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.staging.give_back(b);
        }
    }
}

impl IpcStaging {
    pub fn new() -> Self {
        Self::default()
    }

    /// A pool whose buffers are numbered from `first_slot` on: a node keys what it has mapped by
    /// slot, so two pools of one coordinator must not share numbers.
    pub(super) fn with_first_slot(first_slot: u32) -> Self {
        let pool = Self::default();
        pool.next.lock().unwrap_or_else(|e| e.into_inner()).0 = first_slot;
        pool
    }

    /// Gathers each list of rows of `xs` (a 2-D f32 or bf16 tensor on a GPU) into one exported
    /// buffer, one part after the other, and waits until the copies are complete (the nodes
    /// read them from other processes).
    pub fn stage(&self, xs: &Tensor, parts: &[&[u32]]) -> Result<StagedRows<'_>> {
        let Device::Cuda(dev) = xs.device() else {
            bail!("rows are staged from a GPU, not {:?}", xs.device())
        };
        let dtype = travelling_dtype(xs.dtype())?;
        let (n, width) = xs.dims2()?;
        if let Some(r) = parts
            .iter()
            .flat_map(|p| p.iter())
            .find(|&&r| r as usize >= n)
        {
            bail!("row {r} of a tensor of {n} rows");
        }
        let row_bytes = width * xs.dtype().size_in_bytes();
        let total = parts.iter().map(|p| p.len()).sum::<usize>() * row_bytes;
        let stream = dev.cuda_stream();
        let buffer = self.take(stream.context(), total)?;
        let mut staged = StagedRows {
            staging: self,
            parts: Vec::with_capacity(parts.len()),
            buffer: None,
        };
        // One gather of every part's rows and one copy into the buffer: the parts lie one
        // after the other in it.
        let all: Vec<u32> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let idx = Tensor::from_slice(&all, all.len(), xs.device())?;
        let gathered = xs.index_select(&idx, 0)?.contiguous()?;
        with_raw(&gathered, &stream, |src| {
            check("cuMemcpyDtoDAsync", unsafe {
                sys::cuMemcpyDtoDAsync_v2(buffer.buffer.ptr, src, total, stream.cu_stream())
            })
        })?;
        let mut offset = 0;
        for rows in parts {
            staged.parts.push(v1::DeviceTensor {
                ipc_handle: buffer.buffer.handle.clone(),
                slot: buffer.slot,
                generation: buffer.generation,
                dtype: dtype as i32,
                shape: vec![rows.len() as u64, width as u64],
                offset: offset as u64,
            });
            offset += rows.len() * row_bytes;
        }
        staged.buffer = Some(buffer);
        stream.synchronize().w()?;
        Ok(staged)
    }

    /// Returns a buffer for reuse (its readers are done with it, or ordered before its next use).
    pub(super) fn give_back(&self, b: StagingBuffer) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < MAX_STAGING {
            free.push(b);
        }
    }

    /// A free buffer of at least `bytes` (the smallest), else a new one.
    pub(super) fn take(&self, ctx: &Arc<CudaContext>, bytes: usize) -> Result<StagingBuffer> {
        {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let fitting = (0..free.len())
                .filter(|&i| free[i].bytes >= bytes)
                .min_by_key(|&i| free[i].bytes);
            if let Some(i) = fitting {
                return Ok(free.swap_remove(i));
            }
        }
        let size = bytes.max(1).next_multiple_of(GRANULE);
        let buffer = DeviceBuffer::new(ctx, size)?;
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let (slot, generation) = *next;
        *next = (slot.wrapping_add(1), generation.wrapping_add(1));
        Ok(StagingBuffer {
            slot,
            generation,
            bytes: size,
            buffer,
        })
    }
}
