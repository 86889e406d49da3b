//! Next-token sampling on the GPU (`sample.cuh`): the repetition penalty, the greedy argmax, a
//! Gumbel-max draw from the whole softmax, or the largest logits with the softmax denominator for
//! the host to finish top-k / top-p on. The logits never leave the GPU whole: a few bytes come
//! back for greedy and Gumbel draws, at most [`DEVICE_CANDIDATES`] pairs otherwise.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::{CudaDevice, DType, Result, Storage, Tensor};

use super::{MODULE, PTX, checked_i32, checked_u32, launch_config};
use crate::ops::sampling::{DEVICE_CANDIDATES, DeviceDraw, RowSampling};

/// Blocks of the partial argmax: two per SM of an H100, a fixed number so the reduction order
/// (and a Gumbel draw) does not depend on the card.
const PARTIAL_BLOCKS: usize = 264;
/// Threads per block of the sampling kernels.
const THREADS: u32 = 256;
/// Threads of the one-block finish (radix select over the vocabulary).
const FINISH_THREADS: u32 = 1024;
/// The result header: token, candidates found, max, denominator.
const HEADER: usize = 4;

/// Samples one row of f32 logits (`[vocab]` or `[1, vocab]`) on its GPU; `None` when the logits
/// are not an f32 CUDA tensor (the host samples).
pub fn sample_row(logits: &Tensor, req: &RowSampling<'_>) -> Result<Option<DeviceDraw>> {
    let candle_core::Device::Cuda(dev) = logits.device() else {
        return Ok(None);
    };
    if logits.dtype() != DType::F32 {
        return Ok(None);
    }
    let logits = logits.flatten_all()?.contiguous()?;
    let vocab = logits.elem_count();
    if vocab == 0 {
        candle_core::bail!("no logits to sample from");
    }
    let penalized = !req.penalized.is_empty() && req.penalty != 1.0;
    // The penalty writes into a copy; without one the kernels read the logits themselves.
    let z = if penalized {
        logits.copy()?
    } else {
        logits.clone()
    };
    let v_i = checked_i32("vocabulary", vocab)?;
    let (storage, layout) = z.storage_and_layout();
    let zv = f32_view(&storage, layout.start_offset(), vocab)?;
    if penalized {
        let (source, source_layout) = logits.storage_and_layout();
        let lv = f32_view(&source, source_layout.start_offset(), vocab)?;
        penalize(dev, &lv, &zv, v_i, req.penalized, req.penalty)?;
    }
    let candidates = req.temperature > 0.0 && req.gumbel_key.is_none();
    let cap = DEVICE_CANDIDATES;
    // SAFETY: the partial kernel writes every block's pair; the finish writes the header and the
    // first `found` candidates, the only parts read back.
    let mut partial = unsafe { dev.alloc::<u32>(2 * PARTIAL_BLOCKS) }?;
    let mut out = unsafe { dev.alloc::<u32>(HEADER + 2 * cap) }?;
    let key = req.gumbel_key.unwrap_or(0);
    let gumbel = i32::from(req.gumbel_key.is_some());
    let func = dev.get_or_load_custom_func("sample_argmax_partial_f32", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&zv)
        .arg(&v_i)
        .arg(&req.temperature)
        .arg(&key)
        .arg(&gumbel);
    b.arg(&mut partial);
    let blocks = checked_u32("blocks", PARTIAL_BLOCKS)?;
    // SAFETY: argument types and order match `sample_argmax_partial_f32` (sample.cuh).
    unsafe { b.launch(launch_config((blocks, 1), THREADS, 0)) }.w()?;

    let top = req.top.clamp(1, cap);
    let (top_i, cap_i) = (checked_i32("top", top)?, checked_i32("cap", cap)?);
    let n_partial = checked_i32("blocks", PARTIAL_BLOCKS)?;
    let candidates_i = i32::from(candidates);
    let func = dev.get_or_load_custom_func("sample_row_f32", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&zv).arg(&v_i).arg(&partial).arg(&n_partial);
    b.arg(&req.temperature)
        .arg(&top_i)
        .arg(&cap_i)
        .arg(&candidates_i);
    b.arg(&mut out);
    let threads = if candidates { FINISH_THREADS } else { THREADS };
    // SAFETY: argument types and order match `sample_row_f32` (sample.cuh).
    unsafe { b.launch(launch_config((1, 1), threads, 0)) }.w()?;

    let header = dev.clone_dtoh(&out.slice(..HEADER))?;
    let (token, found, total) = (header[0], header[1], header[3]);
    if !candidates {
        return Ok(Some(DeviceDraw::Token(token)));
    }
    let found = found as usize;
    if found > cap {
        return Ok(Some(DeviceDraw::TooManyTies));
    }
    Ok(Some(DeviceDraw::Candidates {
        sorted: read_candidates(dev, &out, found, cap)?,
        total: f32::from_bits(total),
    }))
}

/// `len` f32 values of CUDA storage from `start`.
fn f32_view(storage: &Storage, start: usize, len: usize) -> Result<CudaView<'_, f32>> {
    let Storage::Cuda(s) = storage else {
        candle_core::bail!("the logits are not on the GPU")
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(start..start + len))
}

/// Sets `z[t]` to the penalised `logits[t]` for every token in `tokens`.
fn penalize(
    dev: &CudaDevice,
    logits: &CudaView<'_, f32>,
    z: &CudaView<'_, f32>,
    vocab: i32,
    tokens: &[u32],
    penalty: f32,
) -> Result<()> {
    let list = dev.clone_htod(tokens)?;
    let n = checked_i32("penalised tokens", tokens.len())?;
    let func = dev.get_or_load_custom_func("sample_penalize_f32", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(logits)
        .arg(z)
        .arg(&vocab)
        .arg(&list)
        .arg(&n)
        .arg(&penalty);
    let grid = checked_u32("penalised tokens", tokens.len().div_ceil(THREADS as usize))?;
    // SAFETY: argument types and order match `sample_penalize_f32` (sample.cuh); `z` is this
    // call's own copy of the logits.
    unsafe { b.launch(launch_config((grid, 1), THREADS, 0)) }.w()?;
    Ok(())
}

/// The first `found` candidates of `out`, sorted by descending logit then ascending id.
fn read_candidates(
    dev: &CudaDevice,
    out: &CudaSlice<u32>,
    found: usize,
    cap: usize,
) -> Result<Vec<(u32, f32)>> {
    let values = dev.clone_dtoh(&out.slice(HEADER..HEADER + found))?;
    let ids = dev.clone_dtoh(&out.slice(HEADER + cap..HEADER + cap + found))?;
    let mut sorted: Vec<(u32, f32)> = ids
        .into_iter()
        .zip(values.into_iter().map(f32::from_bits))
        .collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(sorted)
}
