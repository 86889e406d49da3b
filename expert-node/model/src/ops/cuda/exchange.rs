//! The exchange buffer of routed calls and passes (`routed.rs`, `pass.rs`): where the router's
//! top-k, the hidden states and the per-slot outputs lie in the coordinator's buffer, the copies
//! into it and out of it (one kernel for both spans, `exchange.cuh`), a node's view of a call
//! ([`ImportedRouted`]), and the per-token sums of the slot rows in ascending expert id — the
//! order of the single process's combine, so the same bits.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PushKernelArg, sys,
};
use candle_core::{CudaDevice, Result, Tensor, bail};
use half::bf16;

use super::ipc::{check, with_raw};
use super::moe::{TopK, combine_plan, launch_combine_at, with_counts};
use super::{DeviceRouting, MODULE, PTX, checked_u32, launch_config, upload, wrap};

/// Offsets in the exchange buffer are multiples of this (the kernels' 16-byte rows and more).
pub(super) const ALIGN: usize = 256;
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
/// buffer at `base`, at the byte offsets `(routing_at, hidden_at)`; then, for a routed pass's
/// layer, raises its nodes' ready flags (`raise`, see [`SpanFlags::Give`]).
pub(super) fn fill_exchange(
    dev: &CudaDevice,
    base: sys::CUdeviceptr,
    (routing_at, hidden_at): (usize, usize),
    routing: &DeviceRouting,
    xs: &Tensor,
    raise: Option<Raise>,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let (top_k, _in_use) = routing.buf.device_ptr(&stream);
    let bytes = xs.elem_count() * 2;
    with_raw(xs, &stream, |rows| {
        copy_spans_after(
            dev,
            [
                (
                    top_k,
                    base + routing_at as u64,
                    2 * routing.tokens * routing.k * 4,
                ),
                (rows, base + hidden_at as u64, bytes),
            ],
            raise.map_or(SpanFlags::None, SpanFlags::Give),
        )
    })
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

/// Makes `stream` wait until the u32 at `addr` is `value`.
pub(super) fn wait_value(stream: &CudaStream, addr: u64, value: u32) -> Result<()> {
    check("cuStreamWaitValue32", unsafe {
        sys::cuStreamWaitValue32_v2(
            stream.cu_stream(),
            addr,
            value,
            sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_EQ as u32,
        )
    })
}

/// Writes `value` to the u32 at `addr` once `stream`'s earlier work is done, with that work's
/// memory writes made visible first.
pub(super) fn write_value(stream: sys::CUstream, addr: u64, value: u32) -> Result<()> {
    check("cuStreamWriteValue32", unsafe {
        sys::cuStreamWriteValue32_v2(
            stream,
            addr,
            value,
            sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
        )
    })
}

/// A routed pass's layer's flags (`pass.rs`), raised by the coordinator: each node's of `nodes`
/// (bit i: node i), node i's at `ready + i * stride` and `done + i * stride` bytes.
#[derive(Clone, Copy)]
pub(super) struct Raise {
    pub(super) ready: u64,
    pub(super) done: u64,
    pub(super) stride: u64,
    pub(super) nodes: u64,
}

/// The flags a copy of [`copy_spans_after`] goes with.
#[derive(Clone, Copy)]
pub(super) enum SpanFlags {
    None,
    /// A node's side: first wait on the GPU until the u32 at this address is 1, clear it after.
    Take(u64),
    /// The coordinator's side: after the copies, clear each node's done flag (still set from
    /// the step before) and set its ready flag.
    Give(Raise),
}

/// Copies two spans `(src, dst, bytes)` of device memory (either process's) on `dev`'s stream,
/// with a routed pass's flags where given: one launch (`exchange_copy_u32`, `pass_take_u32` or
/// `pass_give_u32`) where both spans are whole u32 words, else stream flag operations and
/// copy-engine transfers in series. At batch 1 each of those costs microseconds of latency, in
/// series with the layer on both GPUs.
pub(super) fn copy_spans_after(
    dev: &CudaDevice,
    spans: [(u64, u64, usize); 2],
    flags: SpanFlags,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let words = spans
        .iter()
        .all(|&(src, dst, bytes)| (src | dst | bytes as u64).is_multiple_of(4));
    if !words {
        if let SpanFlags::Take(flag) = flags {
            wait_value(&stream, flag, 1)?;
            write_value(stream.cu_stream(), flag, 0)?;
        }
        for (src, dst, bytes) in spans {
            check("cuMemcpyDtoDAsync", unsafe {
                sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream.cu_stream())
            })?;
        }
        if let SpanFlags::Give(raise) = flags {
            for i in (0..64).filter(|i| (raise.nodes >> i) & 1 == 1) {
                write_value(stream.cu_stream(), raise.done + i * raise.stride, 0)?;
                write_value(stream.cu_stream(), raise.ready + i * raise.stride, 1)?;
            }
        }
        return Ok(());
    }
    let [(src0, dst0, bytes0), (src1, dst1, bytes1)] = spans;
    let (n0, n1) = (
        checked_u32("words", bytes0 / 4)?,
        checked_u32("words", bytes1 / 4)?,
    );
    let total = n0 as usize + n1 as usize;
    let threads = 256;
    let (name, blocks) = match flags {
        SpanFlags::None if total == 0 => return Ok(()),
        SpanFlags::None => (
            "exchange_copy_u32",
            total.div_ceil(threads).min(1024) as u32,
        ),
        SpanFlags::Take(_) => ("pass_take_u32", 1),
        SpanFlags::Give(_) => ("pass_give_u32", 1),
    };
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    // The kernel takes the flags' stride in words.
    let stride = match flags {
        SpanFlags::Give(raise) => checked_u32("flag stride", raise.stride as usize / 4)?,
        _ => 0,
    };
    let mut b = func.builder();
    if let SpanFlags::Take(flag) = &flags {
        b.arg(flag);
    }
    b.arg(&src0)
        .arg(&dst0)
        .arg(&n0)
        .arg(&src1)
        .arg(&dst1)
        .arg(&n1);
    if let SpanFlags::Give(raise) = &flags {
        b.arg(&raise.ready)
            .arg(&raise.done)
            .arg(&stride)
            .arg(&raise.nodes);
    }
    // SAFETY: argument types and order match the kernel named; both spans lie in live
    // allocations and the flags in the pass's buffer (checked by the callers).
    unsafe { b.launch(launch_config((blocks, 1), threads as u32, 0)) }.w()?;
    Ok(())
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
                ready.map_or(SpanFlags::None, SpanFlags::Take),
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
