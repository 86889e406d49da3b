//! A forward pass's routed layers ordered by flags in GPU memory rather than a call per layer
//! (`ForwardRequest.device_pass`): what lets a coordinator replay a batch-1 decode step whose
//! experts are on other GPUs from one CUDA graph. Per layer, [`routed.rs`](super::routed) costs
//! both hosts a message and the coordinator's host a wait for the node's answer before it can
//! queue the sum, so the coordinator's host issues every launch and the layer is the two hosts'
//! work in series (70 µs of host time a call at batch 1; BENCHMARKS.md, issue 15).
//!
//! Here the coordinator orders the whole pass up front: each node gets one message listing its
//! layers and queues them all at once, each behind a wait on a flag. The coordinator's GPU, per
//! layer, fills the one exchange buffer (top-k and hidden states, [`super::routed`]'s layout),
//! clears each node's done flag of the layer and sets its ready flag, all in one launch
//! (`pass_give_u32`); then it plans the sums, waits until each node's done flag is set and sums
//! the rows. A node's GPU waits for its ready flag, clears it, copies the layer in, writes its
//! slots' rows and sets its done flag. A ready flag goes 0 → 1 → 0 within a step; a done flag
//! 0 → 1, back to 0 at the same layer of the next step, before the node can see that step's
//! ready flag. So the values a graph captured hold for every replay; a write after a layer's
//! work carries that work's memory writes with it (`cuStreamWriteValue32`'s default barrier).
//! The exchange is reused layer after layer: the coordinator refills it only after every node's
//! done flag of the layer before, and sets a ready flag only after the sum that read the rows.
//!
//! The coordinator's GPU waits on its done flags with `cuStreamWaitValue32` in its own memory.
//! The nodes' ready flags are in the coordinator's memory too, so that one buffer and one
//! message make a pass; a node polls its flag over NVLink in the kernel that then copies the
//! layer in and clears the flag (`pass_take_u32`: one launch, not a stream wait, a write and a
//! copy in series). A pass that fails (a node refuses it or misses its
//! deadline) releases the coordinator's waits from a stream of their own, and its buffer is
//! never used again: a node may still write into it. The stream memory operations are what
//! NVSHMEM's signals and the timeline semaphores of Vulkan do across devices; CUDA driver API,
//! "Stream Memory Operations".

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaEvent, sys};
use candle_core::{CudaDevice, Device, Result, Tensor, bail};
use omnishard_proto::v1;

use super::exchange::{
    ALIGN, ExchangeParts, ExpertIds, ImportedRouted, Raise, exchange_layout, fill_exchange,
    sums_at, wait_value, write_value,
};
use super::ipc::{DeviceBuffer, GRANULE, Mapping, check};
use super::{DeviceRouting, bf16_device};

/// Nodes one pass can order (each has a ready and a done flag per layer in the buffer).
pub const PASS_MAX_NODES: usize = 64;
/// Pass buffers a node keeps mapped (one per coordinator, for its graph's lifetime).
const MAX_PASS_MAPPINGS: usize = 8;

/// Sets the flags at `addrs` to 1 from a stream of its own (the device's may be stuck waiting
/// on them) and waits until that is done.
fn release(ctx: &Arc<CudaContext>, addrs: &[u64]) -> Result<()> {
    ctx.bind_to_thread().w()?;
    let mut side: sys::CUstream = std::ptr::null_mut();
    check("cuStreamCreate", unsafe {
        sys::cuStreamCreate(
            &mut side,
            sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
        )
    })?;
    let written = addrs.iter().try_for_each(|&a| write_value(side, a, 1));
    let synced = check("cuStreamSynchronize", unsafe {
        sys::cuStreamSynchronize(side)
    });
    // SAFETY: the stream was made above and nothing else holds it.
    let _ = unsafe { sys::cuStreamDestroy_v2(side) };
    written.and(synced)
}

/// Byte offsets of a pass buffer's parts.
#[derive(Clone, Copy)]
struct Layout {
    ready_at: usize,
    done_at: usize,
    routing_at: usize,
    hidden_at: usize,
    output_at: usize,
    total: usize,
}

impl Layout {
    /// Flags for [`PASS_MAX_NODES`] nodes × `layers`, then the exchange of `n` tokens, top-`k`,
    /// width `h`.
    fn new(layers: usize, n: usize, k: usize, h: usize) -> Option<Self> {
        let flags = PASS_MAX_NODES.checked_mul(layers)?.checked_mul(4)?;
        let done_at = flags;
        let exchange_at = (2 * flags).next_multiple_of(ALIGN);
        let (routing, hidden, output, bytes) = exchange_layout(n, k, h)?;
        Some(Self {
            ready_at: 0,
            done_at,
            routing_at: exchange_at + routing,
            hidden_at: exchange_at + hidden,
            output_at: exchange_at + output,
            total: exchange_at.checked_add(bytes)?,
        })
    }
}

/// The coordinator's side: one buffer for passes of `tokens` tokens through a model of
/// `layers` layers, its flags zeroed. Never reused after a failed pass ([`PassExchange::fail`]).
pub struct PassExchange {
    dev: CudaDevice,
    buffer: DeviceBuffer,
    generation: u64,
    layers: usize,
    tokens: usize,
    k: usize,
    hidden: usize,
    at: Layout,
    identity: ExpertIds,
}

impl PassExchange {
    /// A buffer on `device` (a GPU) for passes of `tokens` tokens, top-`k`, width `hidden`
    /// through `layers` layers of `experts` experts; `generation` tells it apart from the ones
    /// before it.
    pub fn new(
        device: &Device,
        layers: usize,
        tokens: usize,
        k: usize,
        hidden: usize,
        experts: usize,
        generation: u64,
    ) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("a pass buffer lives on a GPU, not {device:?}")
        };
        let Some(at) = Layout::new(layers, tokens, k, hidden) else {
            bail!("a pass of {tokens} tokens x top-{k} through {layers} layers is too large");
        };
        let ctx = dev.cuda_stream().context().clone();
        let buffer = DeviceBuffer::new(&ctx, at.total.next_multiple_of(GRANULE))?;
        // Zero flags before any node can see the buffer; everything after is on the stream.
        check("cuMemsetD32", unsafe {
            sys::cuMemsetD32_v2(buffer.ptr, 0, at.routing_at / 4)
        })?;
        ctx.synchronize().w()?;
        let identity = ExpertIds::default();
        // Made now: a graph cannot capture its upload.
        identity.get(dev, experts)?;
        Ok(Self {
            dev: dev.clone(),
            buffer,
            generation,
            layers,
            tokens,
            k,
            hidden,
            at,
            identity,
        })
    }

    /// Whether passes of this shape use this buffer.
    pub fn fits(&self, layers: usize, tokens: usize, k: usize, hidden: usize) -> bool {
        (self.layers, self.tokens, self.k, self.hidden) == (layers, tokens, k, hidden)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn flag(&self, base: usize, node: usize, layer: usize) -> u64 {
        self.buffer.ptr + (base + 4 * (node * self.layers + layer)) as u64
    }

    /// The message for the pass's `node`-th node (below [`PASS_MAX_NODES`]): its layers, each
    /// with the experts it is counted on for, and how long it may take.
    pub fn order(
        &self,
        node: usize,
        layers: Vec<v1::LayerExperts>,
        deadline: Duration,
    ) -> v1::DevicePass {
        let flags = |base: usize| (base + 4 * node * self.layers) as u64;
        v1::DevicePass {
            buffer: Some(v1::DeviceTensor {
                ipc_handle: self.buffer.handle.clone(),
                slot: 0,
                generation: self.generation,
                dtype: v1::Dtype::Bf16 as i32,
                shape: vec![self.at.total as u64],
                offset: 0,
            }),
            tokens: self.tokens as u32,
            top_k: self.k as u32,
            routing_offset: self.at.routing_at as u64,
            hidden_offset: self.at.hidden_at as u64,
            output_offset: self.at.output_at as u64,
            ready_offset: flags(self.at.ready_at),
            done_offset: flags(self.at.done_at),
            layers,
            deadline_ms: u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX),
        }
    }

    /// Queues `layer`'s exchange with `nodes` (indices below [`PASS_MAX_NODES`], as ordered):
    /// fills the buffer from `xs` and `routing`, raises each node's ready flag, plans the sums
    /// (adding the chosen experts to `usage`), waits for each node's done flag and clears it,
    /// and returns each token's sum `[tokens, hidden]`. Only queues work (a graph may capture
    /// it).
    pub fn layer(
        &self,
        layer: usize,
        xs: &Tensor,
        routing: &DeviceRouting,
        usage: &Tensor,
        nodes: &[usize],
    ) -> Result<Tensor> {
        let dev = bf16_device(xs)
            .ok_or_else(|| candle_core::Error::Msg("a pass exchanges bf16 CUDA rows".into()))?;
        let (n, h) = xs.dims2()?;
        if (n, h, routing.tokens, routing.k) != (self.tokens, self.hidden, self.tokens, self.k)
            || layer >= self.layers
            || nodes.iter().any(|&i| i >= PASS_MAX_NODES)
        {
            bail!(
                "layer {layer} of {n} x {h} rows, top-{}, for a pass buffer of {} tokens x top-{}, width {}, {} layers",
                routing.k,
                self.tokens,
                self.k,
                self.hidden,
                self.layers
            );
        }
        let stream = dev.cuda_stream();
        let xs = xs.contiguous()?;
        let base = self.buffer.ptr;
        let raise = Raise {
            ready: self.flag(self.at.ready_at, 0, layer),
            done: self.flag(self.at.done_at, 0, layer),
            stride: 4 * self.layers as u64,
            nodes: nodes.iter().fold(0, |mask, &i| mask | 1 << i),
        };
        fill_exchange(
            dev,
            base,
            (self.at.routing_at, self.at.hidden_at),
            routing,
            &xs,
            Some(raise),
        )?;
        let plan = self.identity.plan_sums(dev, routing, usage)?;
        for &i in nodes {
            wait_value(&stream, self.flag(self.at.done_at, i, layer), 1)?;
        }
        sums_at(
            dev,
            base + self.at.output_at as u64,
            (&plan.0, plan.1),
            n,
            h,
        )
    }

    /// After a failed pass: raises the ready and done flags of `pairs` (node, layer) from a
    /// stream of their own, so that no GPU stays stuck on one of them (this one on a done flag,
    /// a node's on a ready flag of a layer this side never reached). The buffer must not be
    /// used again (late writes of the nodes land in it).
    pub fn fail(&self, pairs: &[(usize, usize)]) -> Result<()> {
        let addrs: Vec<u64> = pairs
            .iter()
            .filter(|&&(i, l)| i < PASS_MAX_NODES && l < self.layers)
            .flat_map(|&(i, l)| {
                [
                    self.flag(self.at.ready_at, i, l),
                    self.flag(self.at.done_at, i, l),
                ]
            })
            .collect();
        release(self.dev.cuda_stream().context(), &addrs)
    }
}

/// The node's side: coordinators' pass buffers mapped here (one per buffer a coordinator has
/// made: a failed pass retires its buffer), kept across passes (a graph replays into the same
/// buffer every step); past [`MAX_PASS_MAPPINGS`] the oldest no pass holds is closed.
#[derive(Default)]
pub struct PassMappings {
    mapped: Mutex<VecDeque<Arc<Mapping>>>,
}

impl PassMappings {
    fn map(&self, ctx: &Arc<CudaContext>, t: &v1::DeviceTensor) -> Result<Arc<Mapping>> {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mapped
            .iter()
            .find(|m| m.handle == t.ipc_handle && m.generation == t.generation)
        {
            return Ok(m.clone());
        }
        if mapped.len() >= MAX_PASS_MAPPINGS {
            // The oldest no pass holds (closing waits for the GPU's work on it).
            if let Some(i) = mapped.iter().position(|m| Arc::strong_count(m) == 1) {
                mapped.remove(i);
            }
        }
        let buffer = Arc::new(Mapping::open(ctx, t)?);
        mapped.push_back(buffer.clone());
        Ok(buffer)
    }
}

/// A pass queued on the node's GPU: [`QueuedPass::wait`] says when it is done.
pub struct QueuedPass {
    ctx: Arc<CudaContext>,
    done: CudaEvent,
    /// Its ready flags: raised by the node itself if the pass misses its deadline.
    ready: Vec<u64>,
    /// Kept mapped until the GPU is done with it.
    _buffer: Arc<Mapping>,
}

impl QueuedPass {
    /// Waits (polling the host, never blocking in the driver) until the GPU has done the pass
    /// (`true`), or past `deadline`: then raises the pass's own ready flags so that the GPU
    /// stops waiting on a coordinator that is gone (`false`). `Err`: the GPU failed.
    pub fn wait(&self, deadline: Instant) -> Result<bool> {
        // A batch-1 step's pass takes a few milliseconds and its answer is on the step's
        // critical path: spin that long (a sleep costs tens of microseconds more), then nap.
        let spin_until = Instant::now() + Duration::from_millis(50);
        loop {
            if self.done.try_is_complete().w()? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                release(&self.ctx, &self.ready)?;
                return Ok(false);
            }
            if Instant::now() < spin_until {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

/// Checks a pass against the model (top-k up to `max_k`, width `hidden`) before anything is
/// mapped or queued: its parts and flags aligned, its layers ascending. The bytes of the
/// coordinator's buffer it needs.
pub fn check_pass(req: &v1::DevicePass, max_k: usize, hidden: usize) -> Result<usize> {
    if req.buffer.is_none() {
        bail!("a routed pass without its buffer")
    }
    let mut end = pass_parts(req).check(max_k, hidden, hidden)?;
    let last = req.layers.iter().map(|l| l.layer as usize).max();
    for offset in [req.ready_offset, req.done_offset] {
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        if !offset.is_multiple_of(4) {
            bail!("a pass's flags at byte {offset}, not a multiple of 4");
        }
        let flags_end = last
            .and_then(|l| l.checked_add(1)?.checked_mul(4)?.checked_add(offset))
            .ok_or_else(|| candle_core::Error::Msg("a pass's flags overflow".into()))?;
        end = end.max(flags_end);
    }
    if req.layers.windows(2).any(|w| w[0].layer >= w[1].layer) {
        bail!("a pass's layers must be listed in ascending order, each once");
    }
    Ok(end)
}

fn pass_parts(req: &v1::DevicePass) -> ExchangeParts {
    ExchangeParts {
        n: req.tokens as usize,
        k: req.top_k as usize,
        routing: req.routing_offset,
        hidden: req.hidden_offset,
        output: req.output_offset,
    }
}

/// Queues a pass on the node (`req`, checked by [`check_pass`]): maps the coordinator's buffer
/// once, then for each of its layers polls the ready flag, copies the layer in and clears the
/// flag (one kernel), has `compute(layer, call)` queue the experts' rows into the buffer and
/// raises the done flag. `compute` is called in the order of `req.layers`. An error stops the
/// queuing and raises the ready flags of what was queued, so this GPU does not wait on them.
pub fn queue_pass(
    mappings: &PassMappings,
    device: &Device,
    req: &v1::DevicePass,
    max_k: usize,
    hidden: usize,
    compute: &mut dyn FnMut(usize, &ImportedRouted) -> Result<()>,
) -> Result<QueuedPass> {
    let Device::Cuda(dev) = device else {
        bail!("routed passes are for nodes on a GPU, this one computes on {device:?}")
    };
    let end = check_pass(req, max_k, hidden)?;
    let Some(t) = &req.buffer else {
        bail!("a routed pass without its buffer")
    };
    let parts = pass_parts(req);
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    ctx.bind_to_thread().w()?;
    let buffer = mappings.map(&ctx, t)?;
    if end > buffer.bytes {
        bail!("a pass up to byte {end} of a buffer of {}", buffer.bytes);
    }
    let base = buffer.ptr;
    let flag = |offset: u64, layer: u32| base + offset + 4 * layer as u64;
    let mut ready = Vec::with_capacity(req.layers.len());
    let queued = req.layers.iter().try_for_each(|l| {
        let ready_flag = flag(req.ready_offset, l.layer);
        ready.push(ready_flag);
        let call = parts.copy_in(dev, base, hidden, Some(ready_flag))?;
        compute(l.layer as usize, &call)?;
        write_value(stream.cu_stream(), flag(req.done_offset, l.layer), 1)
    });
    if let Err(e) = queued {
        if let Err(released) = release(&ctx, &ready) {
            tracing::error!(error = %released, "cannot release a failed pass's waits on this GPU");
        }
        return Err(e);
    }
    let done = stream
        .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .w()?;
    Ok(QueuedPass {
        ctx,
        done,
        ready,
        _buffer: buffer,
    })
}
