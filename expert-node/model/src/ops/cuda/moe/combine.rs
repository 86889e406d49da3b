//! The per-token sum of a MoE launch's weighted expert outputs on the GPU (`moe_combine_bf16`):
//! each token's rows added in ascending expert id with a bf16 rounding after every add, as the
//! reference's `index_add_` into a zero tensor, and as [`crate::experts::combine`] on the host.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, PushKernelArg};
use candle_core::{CudaDevice, Result, Tensor};
use half::bf16;

use super::super::{
    MODULE, PTX, bf16_device, checked_i32, checked_u32, launch_config, upload, with_view, wrap,
};
use crate::experts::Assignment;

/// Per-token sums of per-assignment outputs `ys` `[assignments.len(), H]` (bf16 on a GPU), each
/// token's rows in ascending expert id: the CUDA form of [`crate::experts::combine`], the same
/// bits. `None` when `ys` is not a bf16 CUDA tensor or H is not a multiple of 8 (the kernel's
/// 16-byte loads).
pub fn combine(n_tokens: usize, assignments: &[Assignment], ys: &Tensor) -> Result<Option<Tensor>> {
    let Some(dev) = bf16_device(ys) else {
        return Ok(None);
    };
    let (_, h) = ys.dims2()?;
    if !h.is_multiple_of(COMBINE_COLUMNS) {
        return Ok(None);
    }
    if n_tokens == 0 || h == 0 {
        return Ok(Some(Tensor::zeros((n_tokens, h), ys.dtype(), ys.device())?));
    }
    let table = upload(dev, &combine_table(n_tokens, assignments)?)?;
    let (offsets, idx) = (table.slice(..n_tokens + 1), table.slice(n_tokens + 1..));
    let sums = with_view(ys, |yv| {
        launch_combine(dev, yv, &offsets, &idx, n_tokens, h)
    })?;
    Ok(Some(wrap(dev, sums, (n_tokens, h))))
}

/// Columns a thread of `moe_combine_bf16` sums (one 16-byte load a row), and its block size.
const COMBINE_COLUMNS: usize = 8;
const COMBINE_THREADS: usize = 256;

/// `moe_combine_bf16` over `ys` (rows 16-byte aligned, `h` a multiple of `COMBINE_COLUMNS`).
pub(super) fn launch_combine(
    dev: &CudaDevice,
    ys: &CudaView<'_, bf16>,
    offsets: &CudaView<'_, u32>,
    idx: &CudaView<'_, u32>,
    n_tokens: usize,
    h: usize,
) -> Result<CudaSlice<bf16>> {
    let stream = dev.cuda_stream();
    let (ys, _in_use) = ys.device_ptr(&stream);
    launch_combine_at(dev, ys, offsets, idx, n_tokens, h)
}

/// [`launch_combine`] over rows at a device address (another process's rows in memory of this
/// GPU, or this process's own).
pub(in super::super) fn launch_combine_at(
    dev: &CudaDevice,
    ys: u64,
    offsets: &CudaView<'_, u32>,
    idx: &CudaView<'_, u32>,
    n_tokens: usize,
    h: usize,
) -> Result<CudaSlice<bf16>> {
    // SAFETY: the kernel writes every element of every token's row.
    let mut out = unsafe { dev.alloc::<bf16>(n_tokens * h) }?;
    let func = dev.get_or_load_custom_func("moe_combine_bf16", MODULE, PTX)?;
    let h_i = checked_i32("hidden", h)?;
    let mut b = func.builder();
    b.arg(&ys).arg(offsets).arg(idx).arg(&h_i).arg(&mut out);
    let grid = (
        h.div_ceil(COMBINE_THREADS * COMBINE_COLUMNS) as u32,
        checked_u32("tokens", n_tokens)?,
    );
    // SAFETY: argument types and order match `moe_combine_bf16`.
    unsafe { b.launch(launch_config(grid, COMBINE_THREADS as u32, 0)) }.w()?;
    Ok(out)
}

/// The combine kernel's table: CSR offsets (`n_tokens + 1`) then each token's assignment
/// indices ordered by expert id, by a counting sort (no per-token lists).
pub(super) fn combine_table(n_tokens: usize, assignments: &[Assignment]) -> Result<Vec<u32>> {
    let mut offsets = vec![0u32; n_tokens + 1];
    for a in assignments {
        let slot = offsets.get_mut(a.token as usize + 1).ok_or_else(|| {
            candle_core::Error::Msg(format!("token {} out of range {n_tokens}", a.token))
        })?;
        *slot += 1;
    }
    for t in 0..n_tokens {
        offsets[t + 1] += offsets[t];
    }
    let mut by_expert: Vec<u32> = (0..checked_u32("assignments", assignments.len())?).collect();
    by_expert.sort_by_key(|&i| assignments[i as usize].expert);
    let mut fill = offsets[..n_tokens].to_vec();
    let mut idx = vec![0u32; assignments.len()];
    for i in by_expert {
        let t = assignments[i as usize].token as usize;
        idx[fill[t] as usize] = i;
        fill[t] += 1;
    }
    let mut table = offsets;
    table.extend(idx);
    Ok(table)
}
