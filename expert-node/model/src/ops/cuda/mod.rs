//! The CUDA backend's own kernels (`kernels.cu`, compiled to PTX by the build script): fused
//! RMSNorm, fused q/k norm + RoPE, the fused MoE step and next-token sampling. Everything else on
//! the GPU is candle's (cuBLAS matmuls, its elementwise kernels). Each function takes and returns
//! candle tensors on one CUDA device and launches on that device's stream; only the router top-k
//! and sampling synchronize, to bring their few results back.
//!
//! Profiles of MoE decoding put the expert step at over half of GPU time (vLLM's fused_moe; see
//! DESIGN §7), and candle's generic path costs one launch per elementary op: RMSNorm alone is
//! nine. These kernels replace the launch-heavy and bandwidth-heavy parts.

mod attention;
mod exchange;
mod graph;
mod ipc;
mod moe;
mod pass;
mod prefill_attention;
mod routed;
mod router;
mod sample;
mod side;
mod staging;

pub use attention::{CacheBuffers, causal_softmax, decode_attention};
pub use exchange::ImportedRouted;
pub(crate) use graph::{
    Captured, DecodeTables, can_capture, capture, decode_attention_indirect, upload_into,
};
pub use ipc::{IpcExporter, IpcImporter, Lent, gather};
pub use moe::{StackedExperts, combine};
pub use pass::{PASS_MAX_NODES, PassExchange, PassMappings, QueuedPass, check_pass, queue_pass};
pub use prefill_attention::prefill_attention;
pub use routed::{
    ROUTED_MAX_EXPERTS, RoutedExchange, RoutedStage, SharedEvent, gpu_uuid, import_routed,
};
pub use router::{
    DeviceRouting, RouterTicket, router_gate_topk1, router_topk, router_topk_on_device,
};
pub use sample::{sample_row, sample_rows};
pub use staging::{IpcStaging, StagedRows};

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Result, Shape, Storage, Tensor, bail};
use half::bf16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/omnishard_kernels.ptx"));
const MODULE: &str = "omnishard";

/// The device of a bf16 CUDA tensor, `None` for any other.
pub fn bf16_device(t: &Tensor) -> Option<&CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) if t.dtype() == DType::BF16 => Some(dev),
        _ => None,
    }
}

/// Runs `f` on the device memory of a contiguous bf16 CUDA tensor.
/// The kernels load 16 bytes at a time, so a view that does not start on a 16-byte boundary is
/// copied first.
fn with_view<R>(t: &Tensor, f: impl FnOnce(&CudaView<'_, bf16>) -> Result<R>) -> Result<R> {
    let t = aligned(t)?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!("expected a CUDA tensor, got {:?}", t.device())
    };
    let slice = s.as_cuda_slice::<bf16>()?;
    let start = layout.start_offset();
    f(&slice.slice(start..start + t.elem_count()))
}

/// `t` itself when it is contiguous from a 16-byte boundary (as bf16), else a copy that is.
fn aligned(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset().is_multiple_of(8) {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

/// A fresh bf16 tensor of `shape` from device memory a kernel has filled.
fn wrap(dev: &CudaDevice, out: CudaSlice<bf16>, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn launch_config(grid: (u32, u32), block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// Lets `func` launch with `bytes` of dynamic shared memory: past the 48 KiB any launch may have,
/// a kernel must opt in (once would do; setting it again costs one driver call).
fn allow_dynamic_shared(func: &CudaFunction, bytes: u32) -> Result<()> {
    if bytes > 48 * 1024 {
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            checked_i32("dynamic shared memory", bytes as usize)?,
        )
        .w()?;
    }
    Ok(())
}

fn checked_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} exceeds i32")))
}

fn checked_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} exceeds u32")))
}

/// Rows of `x` up to which [`gemv`] replaces cuBLAS (one pass over the weight for all of them).
pub const GEMV_MAX_ROWS: usize = 4;
/// Outputs up to which [`gemv`] replaces cuBLAS: lm_head (152k rows) streams at 2.9 TB/s there.
const GEMV_MAX_OUTPUTS: usize = 32_768;

/// `x @ w^T` for `x` `[..., K]` with at most [`GEMV_MAX_ROWS`] rows and a checkpoint weight `w`
/// `[N, K]`, bf16 on one GPU: decode's projections and routers as one warp per output row (the
/// profile had cuBLAS's split-K GEMV plus its reduction at 1.3 TB/s on o_proj). `None` for other
/// shapes and tensors (the caller uses cuBLAS).
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let Some(dev) = bf16_device(x) else {
        return Ok(None);
    };
    let Ok((n, k)) = w.dims2() else {
        return Ok(None);
    };
    let rows = x.elem_count() / k.max(1);
    if bf16_device(w).is_none()
        || x.dims().last() != Some(&k)
        || rows == 0
        || rows > GEMV_MAX_ROWS
        || n > GEMV_MAX_OUTPUTS
        || !k.is_multiple_of(8)
        || !w.is_contiguous()
    {
        return Ok(None);
    }
    let func = dev.get_or_load_custom_func("gemv_bf16", MODULE, PTX)?;
    // SAFETY: the kernel writes every element of every row.
    let mut out = unsafe { dev.alloc::<bf16>(rows * n) }?;
    with_view(x, |xv| {
        with_view(w, |wv| {
            let (m_i, n_i, k_i) = (
                checked_i32("rows", rows)?,
                checked_i32("outputs", n)?,
                checked_i32("inputs", k)?,
            );
            let mut b = func.builder();
            b.arg(xv)
                .arg(wv)
                .arg(&m_i)
                .arg(&n_i)
                .arg(&k_i)
                .arg(&mut out);
            let cfg = launch_config((checked_u32("outputs", n.div_ceil(8))?, 1), 256, 0);
            // SAFETY: argument types and order match `gemv_bf16`.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })
    })?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok(Some(wrap(dev, out, dims)))
}

/// Threads per row of the RMSNorm kernels: one per 16-byte chunk where the row is a multiple of 8
/// elements up to 4,096 (`norm_row8`: every load at once; at most 512 threads, well inside the
/// registers a block gets), else 128 or 256 looping over the row.
fn norm_block(dim: usize) -> u32 {
    if dim.is_multiple_of(8) && dim <= 8 * 512 {
        (dim / 8).div_ceil(32) as u32 * 32
    } else if dim >= 1024 {
        256
    } else {
        128
    }
}

/// RMSNorm over the last dimension of a bf16 CUDA tensor; `None` for any other tensor.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let Some(dev) = bf16_device(x) else {
        return Ok(None);
    };
    let dim = x.dims().last().copied().unwrap_or(0);
    if dim == 0 || weight.dims() != [dim] {
        return Ok(None);
    }
    let rows = x.elem_count() / dim;
    if rows == 0 {
        return Ok(Some(x.clone()));
    }
    let func = dev.get_or_load_custom_func("rms_norm_bf16", MODULE, PTX)?;
    // SAFETY: every element is written by the kernel before the tensor is read.
    let mut out = unsafe { dev.alloc::<bf16>(x.elem_count()) }?;
    with_view(x, |xv| {
        with_view(weight, |wv| {
            let (dim_i, eps_f) = (checked_i32("dim", dim)?, eps as f32);
            let mut b = func.builder();
            b.arg(xv).arg(wv).arg(&mut out).arg(&dim_i).arg(&eps_f);
            let cfg = launch_config((checked_u32("rows", rows)?, 1), norm_block(dim), 0);
            // SAFETY: argument types and order match `rms_norm_bf16`.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })
    })?;
    Ok(Some(wrap(dev, out, x.shape().clone())))
}

/// `(x + r, RMSNorm(x + r))` over the last dimension, bf16 on a GPU, in one kernel; `None` for
/// any other tensors.
pub fn add_rms_norm(
    x: &Tensor,
    r: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(dev) = bf16_device(x) else {
        return Ok(None);
    };
    let dim = x.dims().last().copied().unwrap_or(0);
    if dim == 0 || weight.dims() != [dim] || r.dims() != x.dims() || bf16_device(r).is_none() {
        return Ok(None);
    }
    let rows = x.elem_count() / dim;
    if rows == 0 {
        return Ok(None);
    }
    let func = dev.get_or_load_custom_func("add_rms_norm_bf16", MODULE, PTX)?;
    // SAFETY: every element of both outputs is written by the kernel before they are read.
    let mut sum = unsafe { dev.alloc::<bf16>(x.elem_count()) }?;
    let mut out = unsafe { dev.alloc::<bf16>(x.elem_count()) }?;
    with_view(x, |xv| {
        with_view(r, |rv| {
            with_view(weight, |wv| {
                let (dim_i, eps_f) = (checked_i32("dim", dim)?, eps as f32);
                let mut b = func.builder();
                b.arg(xv).arg(rv).arg(wv).arg(&mut sum).arg(&mut out);
                b.arg(&dim_i).arg(&eps_f);
                let cfg = launch_config((checked_u32("rows", rows)?, 1), norm_block(dim), 0);
                // SAFETY: argument types and order match `add_rms_norm_bf16`.
                unsafe { b.launch(cfg) }.w()?;
                Ok(())
            })
        })
    })?;
    let shape = x.shape().clone();
    Ok(Some((wrap(dev, sum, shape.clone()), wrap(dev, out, shape))))
}

/// Head sizes `norm_rope_bf16` takes (a warp per head, `d / 32` elements a lane), and the heads
/// a block of it takes (a warp each).
const NORM_ROPE_HEAD_DIMS: [usize; 4] = [32, 64, 128, 256];
const NORM_ROPE_ROWS: usize = 4;

/// q_norm and k_norm, then RoPE, of every row of `x` `[tokens, width]` (the stacked q/k/v
/// projection, read where it is: no copy first): `q` = (heads, norm weight `[d]`) from column
/// `start`, then `k`'s heads right after; `cos`/`sin` `[tokens, d]`. One fused kernel for both,
/// out `[tokens, heads, d]` each: contiguous, or with `heads_first` a transposed view of
/// contiguous `[heads, tokens, d]` memory (so that prefill attention's heads-first copy of them
/// is already made). `None` when the tensors are not bf16 on a GPU or the shapes do not fit the
/// kernel (the caller runs candle's ops).
pub fn norm_rope(
    x: &Tensor,
    start: usize,
    q: (usize, &Tensor),
    k: (usize, &Tensor),
    eps: f64,
    (cos, sin): (&Tensor, &Tensor),
    heads_first: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(dev) = bf16_device(x) else {
        return Ok(None);
    };
    let ((q_heads, wq), (k_heads, wk)) = (q, k);
    let (Ok((n, width)), Ok(d)) = (x.dims2(), wq.dims1()) else {
        return Ok(None);
    };
    if !NORM_ROPE_HEAD_DIMS.contains(&d)
        || wk.dims() != [d]
        || cos.dims() != [n, d]
        || sin.dims() != [n, d]
    {
        return Ok(None);
    }
    let bf16_all = [wq, wk, cos, sin].iter().all(|t| bf16_device(t).is_some());
    if !bf16_all || n * q_heads * k_heads == 0 {
        return Ok(None);
    }
    let heads = q_heads + k_heads;
    if start + heads * d > width {
        bail!(
            "norm_rope: heads {start}..{} past the row's {width} columns",
            start + heads * d
        );
    }
    let func = dev.get_or_load_custom_func("norm_rope_bf16", MODULE, PTX)?;
    // SAFETY: every element of both outputs is written by the kernel before they are read.
    let mut out_q = unsafe { dev.alloc::<bf16>(n * q_heads * d) }?;
    let mut out_k = unsafe { dev.alloc::<bf16>(n * k_heads * d) }?;
    with_view(x, |xv| {
        with_view(wq, |wqv| {
            with_view(wk, |wkv| {
                with_view(cos, |cv| {
                    with_view(sin, |sv| {
                        let ints = [
                            checked_i32("tokens", n)?,
                            checked_i32("q heads", q_heads)?,
                            checked_i32("k heads", k_heads)?,
                            checked_i32("head_dim", d)?,
                            checked_i32("row width", width)?,
                        ];
                        let eps_f = eps as f32;
                        let columns = xv.slice(start..);
                        let mut b = func.builder();
                        b.arg(&columns).arg(wqv).arg(wkv).arg(cv).arg(sv);
                        b.arg(&mut out_q).arg(&mut out_k);
                        let first = i32::from(heads_first);
                        for v in &ints {
                            b.arg(v);
                        }
                        b.arg(&eps_f).arg(&first);
                        let blocks = checked_u32("rows", (n * heads).div_ceil(NORM_ROPE_ROWS))?;
                        let cfg = launch_config((blocks, 1), 32 * NORM_ROPE_ROWS as u32, 0);
                        // SAFETY: argument types and order match `norm_rope_bf16`; row `n - 1`'s
                        // last head ends inside `x` (checked above).
                        unsafe { b.launch(cfg) }.w()?;
                        Ok(())
                    })
                })
            })
        })
    })?;
    if heads_first {
        return Ok(Some((
            wrap(dev, out_q, (q_heads, n, d)).transpose(0, 1)?,
            wrap(dev, out_k, (k_heads, n, d)).transpose(0, 1)?,
        )));
    }
    Ok(Some((
        wrap(dev, out_q, (n, q_heads, d)),
        wrap(dev, out_k, (n, k_heads, d)),
    )))
}

/// Copies `data` to the device (small routing tables).
fn upload(dev: &CudaDevice, data: &[u32]) -> Result<CudaSlice<u32>> {
    dev.clone_htod(data)
}
