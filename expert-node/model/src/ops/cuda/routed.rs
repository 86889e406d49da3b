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
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg, sys,
};
use candle_core::{CudaDevice, Device, Result, Tensor, bail};
use half::bf16;
use omnishard_proto::v1;

use super::ipc::{IpcImporter, check, with_raw};
use super::moe::{PLAN_MAX_EXPERTS, TopK, combine_plan, launch_combine_at, with_counts};
use super::staging::{IpcStaging, StagingBuffer};
use super::{DeviceRouting, MODULE, PTX, bf16_device, checked_u32, launch_config, upload, wrap};

/// The most experts a layer may have for routed calls (the plans' one block).
pub const ROUTED_MAX_EXPERTS: usize = PLAN_MAX_EXPERTS;

/// Offsets in the exchange buffer are multiples of this (the kernels' 16-byte rows and more).
pub(super) const ALIGN: usize = 256;
/// Interprocess events opened here at most; past this all are closed and opened afresh.
const MAX_PEER_EVENTS: usize = 16;
/// Exchange buffers a node may still write into after its call failed, kept allocated (never
/// reused) so that those writes land nowhere that matters; past this the oldest is freed.
const MAX_ABANDONED: usize = 16;

/// Where the three parts lie in an exchange buffer of `n` tokens, top-k `k`, hidden size `h`:
/// (routing, hidden, output, total bytes).
pub(super) fn exchange_layout(
    n: usize,
    k: usize,
    h: usize,
) -> Option<(usize, usize, usize, usize)> {
    let slots = n.checked_mul(k)?;
    let routing_bytes = slots.checked_mul(8)?;
    let hidden_at = routing_bytes.next_multiple_of(ALIGN);
    let output_at = hidden_at
        .checked_add(n.checked_mul(h)?.checked_mul(2)?)?
        .next_multiple_of(ALIGN);
    let total = output_at.checked_add(slots.checked_mul(h)?.checked_mul(2)?)?;
    Some((0, hidden_at, output_at, total))
}

/// Copies the router's top-k (`2 n k` u32) and the bf16 rows `xs` (contiguous) into an exchange
/// buffer at `base`, at the byte offsets `(routing_at, hidden_at)`.
pub(super) fn fill_exchange(
    dev: &CudaDevice,
    base: sys::CUdeviceptr,
    (routing_at, hidden_at): (usize, usize),
    routing: &DeviceRouting,
    xs: &Tensor,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let (top_k, _in_use) = routing.buf.device_ptr(&stream);
    let bytes = xs.elem_count() * 2;
    with_raw(xs, &stream, |rows| {
        copy_spans(
            dev,
            [
                (
                    top_k,
                    base + routing_at as u64,
                    2 * routing.tokens * routing.k * 4,
                ),
                (rows, base + hidden_at as u64, bytes),
            ],
        )
    })
}

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

/// Expert ids `0..E` on the GPU: `moe_plan`'s `row_of` with every expert held, for planning
/// the per-token sums. Made once per expert count.
#[derive(Default)]
pub(super) struct ExpertIds(Mutex<Option<Arc<CudaSlice<u32>>>>);

impl ExpertIds {
    pub(super) fn get(&self, dev: &CudaDevice, experts: usize) -> Result<Arc<CudaSlice<u32>>> {
        let mut identity = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = identity.as_ref().filter(|ids| ids.len() == experts) {
            return Ok(ids.clone());
        }
        let ids: Vec<u32> = (0..experts as u32).collect();
        let ids = Arc::new(upload(dev, &ids)?);
        *identity = Some(ids.clone());
        Ok(ids)
    }

    /// Plans the per-token sums of `routing`'s slots (adding its experts to `usage`, the
    /// layer's u32 counts): the combine table and where in it the offsets start.
    pub(super) fn plan_sums(
        &self,
        dev: &CudaDevice,
        routing: &DeviceRouting,
        usage: &Tensor,
    ) -> Result<(CudaSlice<u32>, usize)> {
        let experts = usage.dims1()?;
        let identity = self.get(dev, experts)?;
        let stream = dev.cuda_stream();
        with_counts(usage, experts, |counts| {
            let (at, _in_use) = routing.buf.device_ptr(&stream);
            let top_k = TopK {
                at,
                tokens: routing.tokens,
                k: routing.k,
            };
            combine_plan(dev, top_k, &identity, counts, experts)
        })
    }
}

/// Each token's `[n, h]` sum of the slot rows at `output` (`[n * k, h]` bf16), in the order
/// [`ExpertIds::plan_sums`] planned as `(combine, at)`.
pub(super) fn sums_at(
    dev: &CudaDevice,
    output: sys::CUdeviceptr,
    (combine, at): (&CudaSlice<u32>, usize),
    n: usize,
    h: usize,
) -> Result<Tensor> {
    let offsets = combine.slice(at..at + n + 1);
    let idx = combine.slice(at + n + 1..);
    let sums = launch_combine_at(dev, output, &offsets, &idx, n, h)?;
    Ok(wrap(dev, sums, (n, h)))
}

/// Copies two spans `(src, dst, bytes)` of device memory (either process's) on `dev`'s
/// stream: one launch of `exchange_copy_u32` where both are whole u32 words, else the copy
/// engine. At batch 1 a copy-engine transfer costs microseconds of latency each, in series with
/// the layer on both GPUs.
pub(super) fn copy_spans(dev: &CudaDevice, spans: [(u64, u64, usize); 2]) -> Result<()> {
    copy_spans_after(dev, spans, None)
}

/// [`copy_spans`], first waiting on the GPU until the u32 at `ready` is 1 and clearing it after
/// the copies (a routed pass's ready flag, `pass.rs`): one launch of `pass_take_u32` where the
/// spans are whole words, else a stream wait, a write and the copies.
pub(super) fn copy_spans_after(
    dev: &CudaDevice,
    spans: [(u64, u64, usize); 2],
    ready: Option<u64>,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let words = spans
        .iter()
        .all(|&(src, dst, bytes)| (src | dst | bytes as u64).is_multiple_of(4));
    if !words {
        if let Some(flag) = ready {
            super::pass::wait_value(&stream, flag, 1)?;
            super::pass::write_value(stream.cu_stream(), flag, 0)?;
        }
        for (src, dst, bytes) in spans {
            check("cuMemcpyDtoDAsync", unsafe {
                sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream.cu_stream())
            })?;
        }
        return Ok(());
    }
    let [(src0, dst0, bytes0), (src1, dst1, bytes1)] = spans;
    let (n0, n1) = (
        checked_u32("words", bytes0 / 4)?,
        checked_u32("words", bytes1 / 4)?,
    );
    let total = n0 as usize + n1 as usize;
    if total == 0 && ready.is_none() {
        return Ok(());
    }
    let threads = 256;
    let (func, blocks) = match ready {
        Some(_) => (
            dev.get_or_load_custom_func("pass_take_u32", MODULE, PTX)?,
            1,
        ),
        None => (
            dev.get_or_load_custom_func("exchange_copy_u32", MODULE, PTX)?,
            total.div_ceil(threads).min(1024) as u32,
        ),
    };
    let mut b = func.builder();
    let flag = ready.unwrap_or(0);
    if ready.is_some() {
        b.arg(&flag);
    }
    b.arg(&src0)
        .arg(&dst0)
        .arg(&n0)
        .arg(&src1)
        .arg(&dst1)
        .arg(&n1);
    // SAFETY: argument types and order match `exchange_copy_u32`; both spans lie in live
    // allocations (checked by the callers).
    unsafe { b.launch(launch_config((blocks, 1), threads as u32, 0)) }.w()?;
    Ok(())
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
        fill_exchange(&dev, base, (routing_at, hidden_at), routing, &xs)?;
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

/// A routed call on the node: its top-k and hidden states copied onto the node's GPU (read where
/// they are, the plan's dependent loads of the top-k would each be a peer round trip), and the
/// coordinator's output rows, mapped here.
pub struct ImportedRouted {
    pub(super) xs: Tensor,
    pub(super) top_k: TopK,
    /// The coordinator's `[n * k, H]` output rows.
    pub(super) output: u64,
    /// Where `top_k` points: kept until the launches reading it are queued (its free is ordered
    /// after them on the stream).
    _ids: CudaSlice<u32>,
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

/// Where a call's parts lie in a coordinator's exchange buffer: `n` tokens, top-`k`, and the
/// byte offsets of the top-k, the hidden states and the output rows.
pub(super) struct ExchangeParts {
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) routing: u64,
    pub(super) hidden: u64,
    pub(super) output: u64,
}

impl ExchangeParts {
    /// Checks the call against the model (top-k up to `max_k`, rows of width `hidden`; `h`: the
    /// width the call says) and the offsets' alignment; the bytes of the buffer it needs.
    pub(super) fn check(&self, max_k: usize, hidden: usize, h: usize) -> Result<usize> {
        let (n, k) = (self.n, self.k);
        if h != hidden || n == 0 || k == 0 || k > max_k {
            bail!(
                "a routed call of {n} tokens x top-{k} of width {h}; the model has hidden size {hidden}, top-k {max_k}"
            );
        }
        if exchange_layout(n, k, h).is_none() {
            bail!("a routed call of {n} tokens x top-{k} is too large");
        }
        let parts = [
            (self.routing, 2 * n * k * 4),
            (self.hidden, n * h * 2),
            (self.output, n * k * h * 2),
        ];
        let mut end = 0usize;
        for (offset, len) in parts {
            let offset = usize::try_from(offset).unwrap_or(usize::MAX);
            if !offset.is_multiple_of(ALIGN) {
                bail!("a routed call's part at byte {offset}, not a multiple of {ALIGN}");
            }
            end = end.max(offset.checked_add(len).ok_or_else(|| {
                candle_core::Error::Msg(format!("a routed call's part at byte {offset} overflows"))
            })?);
        }
        Ok(end)
    }

    /// Queues the copies of the top-k and the hidden states (width `h`) out of the exchange
    /// buffer mapped at `base` onto this GPU, after waiting for the flag at `ready` (a routed
    /// pass's) where given; checked by [`ExchangeParts::check`] first.
    pub(super) fn copy_in(
        &self,
        dev: &CudaDevice,
        base: u64,
        h: usize,
        ready: Option<u64>,
    ) -> Result<ImportedRouted> {
        let (n, k) = (self.n, self.k);
        let stream = dev.cuda_stream();
        // Copied over rather than read where they are: the plan's dependent loads of the top-k
        // would each be a peer round trip.
        // SAFETY: both are filled by the copies below before any kernel reads them.
        let mut ids = unsafe { dev.alloc::<u32>(2 * n * k) }?;
        let mut rows = unsafe { dev.alloc::<bf16>(n * h) }?;
        let top_k_at = {
            let (top_k_at, _ids_in_use) = ids.device_ptr_mut(&stream);
            let (rows_at, _rows_in_use) = rows.device_ptr_mut(&stream);
            copy_spans_after(
                dev,
                [
                    (base + self.routing, top_k_at, 2 * n * k * 4),
                    (base + self.hidden, rows_at, n * h * 2),
                ],
                ready,
            )?;
            top_k_at
        };
        Ok(ImportedRouted {
            xs: wrap(dev, rows, (n, h)),
            top_k: TopK {
                at: top_k_at,
                tokens: n,
                k,
            },
            _ids: ids,
            output: base + self.output,
        })
    }
}
