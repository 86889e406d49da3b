//! The router's softmax and top-k on the GPU (`router.cuh`): for the batch, one warp per token
//! over logits from the gate projection; for batch-1 decode, the gate GEMV and the top-k in one
//! launch (`router_gate_topk1_bf16`), the same bits. The choices stay on the GPU for experts held
//! there ([`DeviceRouting`]) or come back to the host for everything else.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::{CudaDevice, DType, Device, Result, Storage, Tensor, bail};
use half::bf16;

use super::{MODULE, PTX, bf16_device, checked_i32, checked_u32, launch_config, with_view};

/// A router's top-k left on the GPU: `[tokens * k]` expert ids then `[tokens * k]` weights (f32
/// bits), row-major, as `router_topk_bf16` writes them.
pub struct DeviceRouting {
    pub(super) buf: CudaSlice<u32>,
    pub tokens: usize,
    pub k: usize,
}

impl DeviceRouting {
    /// The routing on the host, as calls with assignments take it (waits for the device).
    pub fn to_routing(&self, device: &candle_core::Device) -> Result<crate::experts::Routing> {
        let candle_core::Device::Cuda(dev) = device else {
            candle_core::bail!("a routing on the GPU is read from a GPU, not {device:?}")
        };
        let (ids, weights) = self.to_host(dev)?;
        Ok(crate::experts::Routing {
            top_k: self.k,
            ids,
            weights,
        })
    }

    /// The ids and weights copied to the host (one copy; waits for the device).
    pub fn to_host(&self, dev: &CudaDevice) -> Result<(Vec<u32>, Vec<f32>)> {
        let both = dev.clone_dtoh(&self.buf)?;
        let (ids, bits) = both.split_at(self.tokens * self.k);
        Ok((
            ids.to_vec(),
            bits.iter().map(|&b| f32::from_bits(b)).collect(),
        ))
    }
}

/// A router's own counter for [`router_gate_topk1`]: how many of the launch's blocks have
/// finished their logits, zero between launches (the last block resets it). One per router,
/// whose launches run one after another on its device's stream.
pub struct RouterTicket(CudaSlice<u32>);

impl RouterTicket {
    /// A zeroed counter on `device`; `None` off a GPU.
    pub fn new(device: &Device) -> Result<Option<Self>> {
        match device {
            Device::Cuda(dev) => Ok(Some(Self(dev.alloc_zeros::<u32>(1)?))),
            _ => Ok(None),
        }
    }
}

/// Runs `f` on the u8 mask of `experts` experts (nonzero = never chosen) in device memory;
/// `None` (and `f` not run) for a mask of another shape or dtype.
fn with_mask<R>(
    masked: &Tensor,
    experts: usize,
    f: impl FnOnce(&CudaView<'_, u8>) -> Result<R>,
) -> Result<Option<R>> {
    if masked.dims() != [experts] || masked.dtype() != DType::U8 {
        return Ok(None);
    }
    let (storage, layout) = masked.storage_and_layout();
    let Storage::Cuda(mask) = &*storage else {
        bail!("the router mask is not on the GPU")
    };
    let start = layout.start_offset();
    f(&mask.as_cuda_slice::<u8>()?.slice(start..start + experts)).map(Some)
}

/// What both top-k kernels take besides their buffers: the experts, k and whether to
/// renormalise as the kernels type them, and their dynamic shared memory (an f32 per expert).
struct TopkArgs {
    experts: i32,
    k: i32,
    norm: i32,
    shared: u32,
}

impl TopkArgs {
    fn new(experts: usize, k: usize, norm: bool) -> Result<Self> {
        Ok(Self {
            experts: checked_i32("experts", experts)?,
            k: checked_i32("top-k", k)?,
            norm: i32::from(norm),
            shared: checked_u32("experts", experts * 4)?,
        })
    }
}

/// The router's top-k on the GPU: `logits` `[tokens, experts]` (bf16) and `masked` (u8 per
/// expert, nonzero = never chosen) on one device, left there; `None` when the logits are not
/// bf16 on a GPU or the shapes do not fit the kernel.
pub fn router_topk_on_device(
    logits: &Tensor,
    masked: &Tensor,
    k: usize,
    norm: bool,
) -> Result<Option<DeviceRouting>> {
    let Some(dev) = bf16_device(logits) else {
        return Ok(None);
    };
    let (n, experts) = logits.dims2()?;
    if k == 0 || k > experts || n == 0 {
        return Ok(None);
    }
    let func = dev.get_or_load_custom_func("router_topk_bf16", MODULE, PTX)?;
    // SAFETY: the kernel writes every id and weight of every token.
    let mut out = unsafe { dev.alloc::<u32>(2 * n * k) }?;
    let args = TopkArgs::new(experts, k, norm)?;
    let n_i = checked_i32("tokens", n)?;
    let launched = with_mask(masked, experts, |mask| {
        with_view(logits, |lv| {
            let mut b = func.builder();
            b.arg(lv)
                .arg(mask)
                .arg(&n_i)
                .arg(&args.experts)
                .arg(&args.k)
                .arg(&args.norm)
                .arg(&mut out);
            let cfg = launch_config((checked_u32("tokens", n)?, 1), 32, args.shared);
            // SAFETY: argument types and order match `router_topk_bf16`.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })
    })?;
    Ok(launched.map(|()| DeviceRouting {
        buf: out,
        tokens: n,
        k,
    }))
}

/// [`router_topk_on_device`] with the ids and weights copied back to the host (one copy).
pub fn router_topk(
    logits: &Tensor,
    masked: &Tensor,
    k: usize,
    norm: bool,
) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
    let Some(dev) = bf16_device(logits) else {
        return Ok(None);
    };
    if logits.dim(0)? == 0 {
        return Ok(Some((Vec::new(), Vec::new())));
    }
    let Some(routing) = router_topk_on_device(logits, masked, k, norm)? else {
        return Ok(None);
    };
    routing.to_host(dev).map(Some)
}

/// Batch-1 decode's router in one launch: the gate projection of `x` `[1, hidden]` by `gate`
/// `[experts, hidden]` and the top-k of its logits, left on the GPU — the same ids and weights as
/// [`super::gemv`] then [`router_topk_on_device`]. `ticket` is the router's own (see
/// [`RouterTicket`]). `None` for other shapes, dtypes or devices (the caller takes the two
/// launches).
pub fn router_gate_topk1(
    x: &Tensor,
    gate: &Tensor,
    masked: &Tensor,
    ticket: &RouterTicket,
    k: usize,
    norm: bool,
) -> Result<Option<DeviceRouting>> {
    let Some(dev) = bf16_device(x) else {
        return Ok(None);
    };
    let Ok((experts, hidden)) = gate.dims2() else {
        return Ok(None);
    };
    if bf16_device(gate).is_none()
        || x.dims() != [1, hidden]
        || !hidden.is_multiple_of(8)
        || !gate.is_contiguous()
        || k == 0
        || k > experts
    {
        return Ok(None);
    }
    let func = dev.get_or_load_custom_func("router_gate_topk1_bf16", MODULE, PTX)?;
    // SAFETY: every logit is written by one warp before the last block reads it; the last block
    // writes every id and weight.
    let mut logits = unsafe { dev.alloc::<bf16>(experts) }?;
    let mut out = unsafe { dev.alloc::<u32>(2 * k) }?;
    let args = TopkArgs::new(experts, k, norm)?;
    let h_i = checked_i32("hidden", hidden)?;
    // Eight warps a block, one logit a warp: the blocks of `gemv`.
    let blocks = checked_u32("experts", experts.div_ceil(8))?;
    let launched = with_mask(masked, experts, |mask| {
        with_view(x, |xv| {
            with_view(gate, |gv| {
                let mut b = func.builder();
                b.arg(xv)
                    .arg(gv)
                    .arg(mask)
                    .arg(&args.experts)
                    .arg(&h_i)
                    .arg(&args.k)
                    .arg(&args.norm)
                    .arg(&mut logits)
                    .arg(&ticket.0)
                    .arg(&mut out);
                let cfg = launch_config((blocks, 1), 256, args.shared);
                // SAFETY: argument types and order match `router_gate_topk1_bf16`.
                unsafe { b.launch(cfg) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok(launched.map(|()| DeviceRouting {
        buf: out,
        tokens: 1,
        k,
    }))
}
