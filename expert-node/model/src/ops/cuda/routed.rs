//! A layer's expert call with the routing left on the coordinator's GPU (`--gpu-routing`,
//! `ForwardRequest.device_routed`). The coordinator copies the router's top-k and the hidden
//! states into one buffer it exports, with room for every slot's output, and records an
//! interprocess event after the copies ([`RoutedExchange::stage`]). Each node's GPU waits for
//! that event, copies the two in, plans the slots of the experts it holds on the GPU
//! (`moe_plan`) and writes their rows straight into the coordinator's buffer ([`import_routed`],
//! [`StackedExperts::outputs_routed_into`]), then records an event of its own, which the
//! coordinator's GPU waits for ([`IpcImporter::wait_event`]) before it sums each token's rows
//! in ascending expert id ([`RoutedStage::sums`]) — the kernels, slots and order of the single
//! process, so the same bits.
//!
//! Neither host waits for a GPU: a layer's hand-off is two event waits between the GPUs and
//! two messages between the hosts, which run ahead of the GPUs. With the routing planned on the
//! host (BENCHMARKS.md, issue 15) each layer copied the routing back (waiting for the
//! coordinator's GPU) and the node synchronized its GPU before answering, so both GPUs' kernel
//! chains and both hosts' work ran in series. Interprocess events are what PyTorch's
//! `torch.multiprocessing` shares CUDA tensors with (`cuIpcGetEventHandle`).
//!
//! [`StackedExperts::outputs_routed_into`]: super::StackedExperts::outputs_routed_into

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaSlice, sys};
use candle_core::{CudaDevice, Device, Result, Tensor, bail};
use omnishard_proto::v1;

use super::exchange::{
    ExchangeParts, ExpertIds, ImportedRouted, exchange_layout, fill_exchange, sums_at,
};
use super::ipc::{IpcImporter, check};
use super::moe::PLAN_MAX_EXPERTS;
use super::staging::{IpcStaging, StagingBuffer};
use super::{DeviceRouting, bf16_device};

/// The most experts a layer may have for routed calls (the plans' one block).
pub const ROUTED_MAX_EXPERTS: usize = PLAN_MAX_EXPERTS;

/// Interprocess events opened here at most; past this all are closed and opened afresh.
const MAX_PEER_EVENTS: usize = 16;
/// Exchange buffers a node may still write into after its call failed, kept allocated (never
/// reused) so that those writes land nowhere that matters; past this the oldest is freed.
const MAX_ABANDONED: usize = 16;

/// An event of this process that others may wait on (`CU_EVENT_INTERPROCESS`), destroyed on
/// drop.
pub struct SharedEvent {
    ctx: Arc<CudaContext>,
    event: sys::CUevent,
    handle: Vec<u8>,
}

// SAFETY: a CUevent is a driver handle usable from any thread of the process.
unsafe impl Send for SharedEvent {}
unsafe impl Sync for SharedEvent {}

impl SharedEvent {
    pub fn new(device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("an interprocess event lives on a GPU, not {device:?}")
        };
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().w()?;
        let mut event: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
            | sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32;
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut event, flags)
        })?;
        // Owned from here: destroyed if the handle cannot be had.
        let mut shared = Self {
            ctx,
            event,
            handle: Vec::new(),
        };
        let mut handle = sys::CUipcEventHandle_st { reserved: [0; 64] };
        check("cuIpcGetEventHandle", unsafe {
            sys::cuIpcGetEventHandle(&mut handle, event)
        })?;
        shared.handle = handle.reserved.iter().map(|&b| b as u8).collect();
        Ok(shared)
    }

    /// The handle another process opens it by (64 bytes).
    pub fn handle(&self) -> &[u8] {
        &self.handle
    }

    /// Records the work queued so far on `device`'s stream.
    pub fn record(&self, device: &Device) -> Result<()> {
        let Device::Cuda(dev) = device else {
            bail!("an interprocess event records a GPU's stream, not {device:?}")
        };
        self.ctx.bind_to_thread().w()?;
        let stream = dev.cuda_stream();
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(self.event, stream.cu_stream())
        })
    }
}

impl Drop for SharedEvent {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // Nothing else can be done about a failure while dropping.
            let _ = unsafe { sys::cuEventDestroy_v2(self.event) };
        }
    }
}

/// Another process's interprocess events, opened here by handle.
#[derive(Default)]
pub struct PeerEvents {
    opened: Mutex<HashMap<Vec<u8>, OpenedEvent>>,
}

struct OpenedEvent {
    ctx: Arc<CudaContext>,
    event: sys::CUevent,
}

// SAFETY: a CUevent is a driver handle usable from any thread of the process.
unsafe impl Send for OpenedEvent {}

impl Drop for OpenedEvent {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // A wait already queued on it still completes (the driver keeps what it needs).
            let _ = unsafe { sys::cuEventDestroy_v2(self.event) };
        }
    }
}

impl PeerEvents {
    /// Makes `dev`'s stream wait for the latest record of the event behind `handle` made
    /// before this call (the peer records, then sends the handle).
    fn wait(&self, dev: &CudaDevice, handle: &[u8]) -> Result<()> {
        let raw: [u8; 64] = <[u8; 64]>::try_from(handle).map_err(|_| {
            candle_core::Error::Msg(format!(
                "an interprocess event handle has 64 bytes, this one {}",
                handle.len()
            ))
        })?;
        let stream = dev.cuda_stream();
        let ctx = stream.context().clone();
        ctx.bind_to_thread().w()?;
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if !opened.contains_key(handle) {
            if opened.len() >= MAX_PEER_EVENTS {
                opened.clear();
            }
            let mut event: sys::CUevent = std::ptr::null_mut();
            let h = sys::CUipcEventHandle_st {
                reserved: raw.map(|b| b as std::ffi::c_char),
            };
            check("cuIpcOpenEventHandle", unsafe {
                sys::cuIpcOpenEventHandle(&mut event, h)
            })?;
            opened.insert(handle.to_vec(), OpenedEvent { ctx, event });
        }
        let event = opened[handle].event;
        check("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(stream.cu_stream(), event, 0)
        })
    }
}

impl IpcImporter {
    /// Makes `device`'s stream wait for the peer's interprocess event behind `handle` (as last
    /// recorded before this call).
    pub fn wait_event(&self, device: &Device, handle: &[u8]) -> Result<()> {
        let Device::Cuda(dev) = device else {
            bail!("a GPU waits for an interprocess event, not {device:?}")
        };
        self.events.wait(dev, handle)
    }
}

/// The UUID of `device`'s GPU (`cuDeviceGetUuid`); `None` off the GPU or where the driver does
/// not say. Ordinals differ between processes (`CUDA_VISIBLE_DEVICES`); this does not.
pub fn gpu_uuid(device: &Device) -> Option<[u8; 16]> {
    let Device::Cuda(dev) = device else {
        return None;
    };
    let uuid = dev.cuda_stream().context().uuid().ok()?;
    Some(uuid.bytes.map(|b| b as u8))
}

/// The coordinator's side: the buffers layers are exchanged in, its event, and the expert ids
/// every layer's combine table is planned with.
pub struct RoutedExchange {
    staging: IpcStaging,
    ready: SharedEvent,
    identity: ExpertIds,
    abandoned: Mutex<Vec<StagingBuffer>>,
}

/// One layer's call staged: the request's part for every node, and what summing the rows needs.
pub struct RoutedStage<'a> {
    exchange: &'a RoutedExchange,
    buffer: Option<StagingBuffer>,
    request: v1::DeviceRouted,
    dev: CudaDevice,
    combine: CudaSlice<u32>,
    combine_at: usize,
    n: usize,
    h: usize,
    output: sys::CUdeviceptr,
}

impl RoutedExchange {
    /// The exchange of a coordinator computing on `device` (a GPU).
    pub fn new(device: &Device) -> Result<Self> {
        Ok(Self {
            // Apart from the numbers of the pool rows are staged in for calls with assignments.
            staging: IpcStaging::with_first_slot(1 << 31),
            ready: SharedEvent::new(device)?,
            identity: ExpertIds::default(),
            abandoned: Mutex::default(),
        })
    }

    /// Copies the routing and `xs` `[n, H]` (bf16 on the GPU) into an exchange buffer, plans the
    /// per-token sums (adding the chosen experts to `usage`, the layer's u32 counts) and records
    /// the event the nodes' GPUs wait for. Nothing waits for the GPU.
    pub fn stage(
        &self,
        xs: &Tensor,
        routing: &DeviceRouting,
        usage: &Tensor,
    ) -> Result<RoutedStage<'_>> {
        let dev = bf16_device(xs)
            .ok_or_else(|| candle_core::Error::Msg("routed exchange needs bf16 CUDA rows".into()))?
            .clone();
        let (n, h) = xs.dims2()?;
        let k = routing.k;
        if n != routing.tokens || n == 0 {
            bail!("a routing of {} tokens for {n} rows", routing.tokens);
        }
        let Some((routing_at, hidden_at, output_at, total)) = exchange_layout(n, k, h) else {
            bail!("an exchange of {n} x {k} slots of {h} values is too large");
        };
        let stream = dev.cuda_stream();
        let buffer = self.staging.take(stream.context(), total)?;
        let base = buffer.buffer.ptr;
        let xs = xs.contiguous()?;
        fill_exchange(&dev, base, (routing_at, hidden_at), routing, &xs, None)?;
        // The nodes need only the copies: the sums' plan is queued after the event.
        self.ready.record(xs.device())?;
        let (combine, combine_at) = self.identity.plan_sums(&dev, routing, usage)?;
        let request = v1::DeviceRouted {
            hidden: Some(v1::DeviceTensor {
                ipc_handle: buffer.buffer.handle.clone(),
                slot: buffer.slot,
                generation: buffer.generation,
                dtype: v1::Dtype::Bf16 as i32,
                shape: vec![n as u64, h as u64],
                offset: hidden_at as u64,
            }),
            routing_offset: routing_at as u64,
            output_offset: output_at as u64,
            top_k: k as u32,
            ready_event: self.ready.handle().to_vec(),
            // Each node's own list is set by the caller.
            experts: Vec::new(),
        };
        Ok(RoutedStage {
            exchange: self,
            buffer: Some(buffer),
            request,
            dev,
            combine,
            combine_at,
            n,
            h,
            output: base + output_at as u64,
        })
    }
}

impl RoutedStage<'_> {
    /// What every node of the layer is sent.
    pub fn request(&self) -> &v1::DeviceRouted {
        &self.request
    }

    /// Each token's rows summed in ascending expert id, `[n, H]`: queue it once this GPU's
    /// stream waits for every node's event. The buffer goes back for reuse, which the stream
    /// orders after the sum.
    pub fn sums(self) -> Result<Tensor> {
        let plan = (&self.combine, self.combine_at);
        sums_at(&self.dev, self.output, plan, self.n, self.h)
    }

    /// Gives up on the call (a node failed): its buffer is never reused, since a node whose
    /// answer was not taken may still write into it.
    pub fn abandon(mut self) {
        if let Some(b) = self.buffer.take() {
            let mut abandoned = self
                .exchange
                .abandoned
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if abandoned.len() >= MAX_ABANDONED {
                abandoned.remove(0);
            }
            abandoned.push(b);
        }
    }
}

impl Drop for RoutedStage<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.exchange.staging.give_back(b);
        }
    }
}

/// The node's side of a routed call: maps the coordinator's buffer (checking that every part
/// lies inside it), makes this GPU wait for the coordinator's event, and copies the top-k and
/// hidden states in. `max_k`: the model's top-k; `hidden`: its hidden size.
pub fn import_routed(
    importer: &IpcImporter,
    device: &Device,
    req: &v1::DeviceRouted,
    max_k: usize,
    hidden: usize,
) -> Result<ImportedRouted> {
    let Device::Cuda(dev) = device else {
        bail!("routed calls are for nodes on a GPU, this one computes on {device:?}")
    };
    let Some(t) = &req.hidden else {
        bail!("a routed call without its hidden states")
    };
    if t.dtype != v1::Dtype::Bf16 as i32 {
        bail!(
            "routed calls carry bf16 hidden states, not dtype {}",
            t.dtype
        );
    }
    let (n, h) = match t.shape[..] {
        [n, h] => (
            usize::try_from(n).unwrap_or(usize::MAX),
            usize::try_from(h).unwrap_or(usize::MAX),
        ),
        _ => bail!("hidden states of shape {:?}, not [tokens, hidden]", t.shape),
    };
    let parts = ExchangeParts {
        n,
        k: req.top_k as usize,
        routing: req.routing_offset,
        hidden: t.offset,
        output: req.output_offset,
    };
    let end = parts.check(max_k, hidden, h)?;
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    ctx.bind_to_thread().w()?;
    let base = importer.map(&ctx, t, end)?;
    importer.events.wait(dev, &req.ready_event)?;
    parts.copy_in(dev, base, h, None)
}
