//! CUDA IPC answers: an expert node on a GPU leaves a layer's answer in device memory it lends
//! to the coordinator and sends a handle to it (`omnishard.v1.DeviceTensor`); a coordinator on
//! a GPU of the same host maps that memory once per buffer and copies the answer GPU to GPU
//! (NVLink or PCIe peer access). At batch 128 an answer is 4 MiB per layer, and taking it off
//! the node's GPU, through gRPC and back onto the coordinator's cost 6–24 ms per layer call
//! (BENCHMARKS.md, issue 15); this keeps the bytes on the GPUs and sends 64.
//!
//! The memory comes from `cuMemAlloc` (the stream-ordered pool candle allocates from cannot be
//! exported), lent per client by [`crate::lending::Lending`]. The node synchronizes its stream
//! before it answers, so the data is complete when the handle leaves; the coordinator's copy is
//! ordered on its own stream, and it keeps the request's lease until an event after the copy
//! has completed, so the node reuses a buffer only once it has been read. The other direction,
//! hidden rows in the coordinator's GPU memory, is `staging.rs`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, DevicePtr, DevicePtrMut, sys,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Result, Storage, Tensor, bail};
use half::bf16;
use omnishard_proto::v1;

use crate::lending::{IpcAsk, Lending, host_id};
use crate::wire::{candle_dtype, wire_dtype};

/// Clients a node lends to at once (coordinators, one client per node connection).
const MAX_CLIENTS: usize = 4;
/// Buffers per client: two micro-batches in flight, each with an answer being copied.
const BUFFERS_PER_CLIENT: usize = 6;
/// Buffers grow in steps of this, so that answers of nearly the same size share one.
pub(super) const GRANULE: usize = 1 << 20;
/// Most buffers kept mapped per peer (a node lends a client a few; a coordinator's staging
/// buffers are few but new ones take new slots): past this, all are closed and mapped afresh.
const MAX_MAPPINGS: usize = 64;

pub(super) fn check(what: &str, r: sys::CUresult) -> Result<()> {
    r.result()
        .map_err(|e| candle_core::Error::Msg(format!("{what}: {e:?}")))
}

/// Device memory that can be exported, freed on drop.
pub(super) struct DeviceBuffer {
    ctx: Arc<CudaContext>,
    pub(super) ptr: sys::CUdeviceptr,
    pub(super) handle: Vec<u8>,
}

impl DeviceBuffer {
    pub(super) fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().w()?;
        let mut ptr: sys::CUdeviceptr = 0;
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) })?;
        // Owned from here: freed if the handle cannot be had.
        let mut buffer = Self {
            ctx: ctx.clone(),
            ptr,
            handle: Vec::new(),
        };
        let mut handle = sys::CUipcMemHandle_st { reserved: [0; 64] };
        check("cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(&mut handle, ptr)
        })?;
        buffer.handle = handle.reserved.iter().map(|&b| b as u8).collect();
        Ok(buffer)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // Nothing else can be done about a failure while dropping.
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}

/// The node's side: lends buffers and copies answers into them.
pub struct IpcExporter {
    dev: CudaDevice,
    lending: Mutex<Lending<DeviceBuffer>>,
}

impl IpcExporter {
    /// An exporter for a node computing on `device`; `None` off the GPU.
    pub fn new(device: &Device) -> Option<Self> {
        match device {
            Device::Cuda(dev) => Some(Self {
                dev: dev.clone(),
                lending: Mutex::new(Lending::new(
                    MAX_CLIENTS,
                    BUFFERS_PER_CLIENT,
                    RandomState::new().hash_one(std::process::id()),
                )),
            }),
            _ => None,
        }
    }

    /// Takes back what `client` is done with (`ForwardRequest.ipc_keep_from`).
    pub fn release(&self, client: u64, keep_from: u64) {
        self.lending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(client, keep_from, Instant::now());
    }

    /// Copies `ys` (on this node's GPU) into a buffer lent to the asking client, on the device's
    /// stream; the caller synchronizes the stream before answering. `None`: the client is on
    /// another host, `ys` is not a GPU tensor of a wire dtype, or nothing can be lent — the
    /// answer travels as bytes.
    pub fn export(&self, ask: &IpcAsk<'_>, ys: &Tensor) -> Result<Option<v1::DeviceTensor>> {
        if ask.client == 0 || ask.host.is_empty() || ask.host != host_id() {
            return Ok(None);
        }
        let Some(dtype) = wire_dtype(ys.dtype()).filter(|_| ys.device().is_cuda()) else {
            return Ok(None);
        };
        let ys = ys.contiguous()?;
        let bytes = ys.elem_count() * ys.dtype().size_in_bytes();
        let stream = self.dev.cuda_stream();
        let ctx = stream.context().clone();
        let mut lending = self.lending.lock().unwrap_or_else(|e| e.into_inner());
        let lent = lending.lend(
            ask.client,
            ask.request,
            bytes.max(1).next_multiple_of(GRANULE),
            Instant::now(),
            |size| DeviceBuffer::new(&ctx, size),
        )?;
        let Some(lent) = lent else {
            tracing::debug!(
                client = ask.client,
                "no answer buffer can be lent to the client: answering with bytes"
            );
            return Ok(None);
        };
        with_raw(&ys, &stream, |src| {
            check("cuMemcpyDtoDAsync", unsafe {
                sys::cuMemcpyDtoDAsync_v2(lent.buffer.ptr, src, bytes, stream.cu_stream())
            })
        })?;
        Ok(Some(v1::DeviceTensor {
            ipc_handle: lent.buffer.handle.clone(),
            slot: lent.slot,
            generation: lent.generation,
            dtype: dtype as i32,
            shape: ys.dims().iter().map(|&d| d as u64).collect(),
            offset: 0,
        }))
    }
}

/// Runs `f` on the device address of a contiguous f32 or bf16 CUDA tensor's first element.
pub(super) fn with_raw<R>(
    t: &Tensor,
    stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    f: impl FnOnce(sys::CUdeviceptr) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!("expected a CUDA tensor, got {:?}", t.device())
    };
    let start = layout.start_offset();
    match t.dtype() {
        DType::BF16 => {
            let view = s.as_cuda_slice::<bf16>()?.slice(start..);
            let (ptr, _sync) = view.device_ptr(stream);
            f(ptr)
        }
        DType::F32 => {
            let view = s.as_cuda_slice::<f32>()?.slice(start..);
            let (ptr, _sync) = view.device_ptr(stream);
            f(ptr)
        }
        other => bail!("{other:?} answers do not travel"),
    }
}

/// Another process's buffer mapped into this context, closed on drop.
pub(super) struct Mapping {
    ctx: Arc<CudaContext>,
    pub(super) generation: u64,
    pub(super) handle: Vec<u8>,
    pub(super) ptr: sys::CUdeviceptr,
    /// From `ptr` to the end of the allocation.
    pub(super) bytes: usize,
}

impl Mapping {
    /// Maps the buffer behind `t`'s handle into `ctx` (peer access enabled as needed).
    pub(super) fn open(ctx: &Arc<CudaContext>, t: &v1::DeviceTensor) -> Result<Self> {
        let raw: [u8; 64] = <[u8; 64]>::try_from(&t.ipc_handle[..]).map_err(|_| {
            candle_core::Error::Msg(format!(
                "an IPC handle has 64 bytes, this one {}",
                t.ipc_handle.len()
            ))
        })?;
        let handle = sys::CUipcMemHandle_st {
            reserved: raw.map(|b| b as std::ffi::c_char),
        };
        let mut ptr: sys::CUdeviceptr = 0;
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                handle,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        // Owned from here: closed if its size cannot be had.
        let mut mapping = Mapping {
            ctx: ctx.clone(),
            generation: t.generation,
            handle: t.ipc_handle.clone(),
            ptr,
            bytes: 0,
        };
        let (mut base, mut size) = (0, 0usize);
        check("cuMemGetAddressRange", unsafe {
            sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr)
        })?;
        mapping.bytes = size.saturating_sub(ptr.saturating_sub(base) as usize);
        Ok(mapping)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // A copy out of the mapping may still be queued: let it finish first (mappings close
        // rarely: a slot's new allocation, a forgotten client).
        if self.ctx.synchronize().is_ok() {
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        }
    }
}

/// A copy out of a peer's buffer not yet known to be complete (the event after it, shared by
/// the copies of one [`gather`]) and the request's lease it holds.
type Copying = (Arc<CudaEvent>, Box<dyn Send>);

/// The coordinator's side, one per node: the node's buffers it has mapped, and the copies out
/// of them not yet known to be complete.
#[derive(Default)]
pub struct IpcImporter {
    mapped: Mutex<HashMap<u32, Mapping>>,
    copying: Mutex<Vec<Copying>>,
    /// The peer's interprocess events opened here (`routed.rs`).
    pub(super) events: super::routed::PeerEvents,
}

/// A tensor in another process's GPU memory, mapped and ready to be copied by [`gather`]; it
/// holds its request's lease until then.
pub struct Lent<'a> {
    importer: &'a IpcImporter,
    src: sys::CUdeviceptr,
    bytes: usize,
    dtype: DType,
    shape: Vec<usize>,
    lease: Box<dyn Send>,
}

impl Lent<'_> {
    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

impl IpcImporter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps a tensor of another process's buffer (a node's answer, a coordinator's hidden
    /// states) into `device`'s context, for [`gather`] to copy. `lease` is kept until the copy
    /// has completed on the GPU; dropping it tells the node, with the next request, that the
    /// buffer is free again.
    pub fn lent(
        &self,
        device: &Device,
        out: &v1::DeviceTensor,
        lease: impl Send + 'static,
    ) -> Result<Lent<'_>> {
        let Device::Cuda(dev) = device else {
            bail!("a tensor in GPU memory is copied onto a GPU, not {device:?}")
        };
        let dtype = v1::Dtype::try_from(out.dtype)
            .ok()
            .and_then(candle_dtype)
            .ok_or_else(|| candle_core::Error::Msg(format!("unknown dtype {}", out.dtype)))?;
        let elems = out
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
            .filter(|&n| n.checked_mul(dtype.size_in_bytes()).is_some())
            .ok_or_else(|| candle_core::Error::Msg(format!("impossible shape {:?}", out.shape)))?;
        let bytes = elems * dtype.size_in_bytes();
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().w()?;
        let offset = usize::try_from(out.offset)
            .ok()
            .filter(|o| o.checked_add(bytes).is_some())
            .ok_or_else(|| candle_core::Error::Msg(format!("impossible offset {}", out.offset)))?;
        let src = self.map(&ctx, out, offset + bytes)? + offset as sys::CUdeviceptr;
        Ok(Lent {
            importer: self,
            src,
            bytes,
            dtype,
            shape: out.shape.iter().map(|&d| d as usize).collect(),
            lease: Box::new(lease),
        })
    }

    /// [`IpcImporter::lent`] and [`gather`] of the one tensor.
    pub fn copy(
        &self,
        device: &Device,
        out: &v1::DeviceTensor,
        lease: impl Send + 'static,
    ) -> Result<Tensor> {
        gather(device, vec![self.lent(device, out, lease)?])
    }

    /// Drops the leases of copies that have completed (or failed: nothing reads any more).
    pub fn prune(&self) {
        self.copying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(event, _)| matches!(event.try_is_complete(), Ok(false)));
    }

    /// The device address of the tensor's buffer, mapping it (and closing an older allocation
    /// behind the same slot) when needed; refuses `end` bytes past the mapped allocation.
    pub(super) fn map(
        &self,
        ctx: &Arc<CudaContext>,
        out: &v1::DeviceTensor,
        end: usize,
    ) -> Result<sys::CUdeviceptr> {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        let current = mapped
            .get(&out.slot)
            .is_some_and(|m| m.generation == out.generation && m.handle == out.ipc_handle);
        if !current {
            mapped.remove(&out.slot);
            if mapped.len() >= MAX_MAPPINGS {
                mapped.clear();
            }
            let mapping = Mapping::open(ctx, out)?;
            mapped.insert(out.slot, mapping);
        }
        let m = &mapped[&out.slot];
        if end > m.bytes {
            bail!("a tensor up to byte {end} of a buffer of {}", m.bytes);
        }
        Ok(m.ptr)
    }
}

/// Copies lent tensors of the same dtype and row width, one after the other, into one new
/// tensor on `device` (`[sum of rows, width]`), ordered on its stream: a layer's answers from
/// several nodes in one allocation, with no join afterwards. Each lease stays with its importer
/// until an event after the copies has completed.
pub fn gather(device: &Device, parts: Vec<Lent<'_>>) -> Result<Tensor> {
    let Device::Cuda(dev) = device else {
        bail!("tensors in GPU memory are copied onto a GPU, not {device:?}")
    };
    let Some((first, row)) = parts
        .first()
        .and_then(|p| Some((p, p.shape.split_first()?.1)))
    else {
        bail!("nothing to gather")
    };
    let (dtype, row) = (first.dtype, row.to_vec());
    let mut rows = 0;
    for p in &parts {
        if p.dtype != dtype || p.shape.get(1..) != Some(&row[..]) {
            bail!(
                "lent tensors of different kinds: {:?} {:?} and {:?} {:?}",
                dtype,
                first.shape,
                p.dtype,
                p.shape
            );
        }
        rows += p.shape[0];
    }
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    let srcs: Vec<(sys::CUdeviceptr, usize)> = parts.iter().map(|p| (p.src, p.bytes)).collect();
    let elems = rows * row.iter().product::<usize>();
    let storage = match dtype {
        DType::BF16 => copy_into::<bf16>(dev, &stream, &srcs, elems)?,
        DType::F32 => copy_into::<f32>(dev, &stream, &srcs, elems)?,
        other => bail!("{other:?} tensors do not travel"),
    };
    let mut shape = vec![rows];
    shape.extend(row);
    let ys = Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false);
    let done = Arc::new(
        stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .w()?,
    );
    for p in parts {
        p.importer.prune();
        p.importer
            .copying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((done.clone(), p.lease));
    }
    Ok(ys)
}

/// Copies each `(source, bytes)` in turn into one new buffer of `elems` elements.
fn copy_into<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    srcs: &[(sys::CUdeviceptr, usize)],
    elems: usize,
) -> Result<CudaStorage> {
    let mut dst: CudaSlice<T> = unsafe { dev.alloc::<T>(elems.max(1))? };
    {
        let (ptr, _sync) = dst.device_ptr_mut(stream);
        let mut at = ptr;
        for &(src, bytes) in srcs {
            check("cuMemcpyDtoDAsync", unsafe {
                sys::cuMemcpyDtoDAsync_v2(at, src, bytes, stream.cu_stream())
            })?;
            at += bytes as sys::CUdeviceptr;
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
}
