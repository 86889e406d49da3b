//! Next-token sampling on the GPU (`sample.cuh`): the repetition penalty, the greedy argmax, a
//! Gumbel-max draw from the whole softmax, or the largest logits with the softmax denominator for
//! the host to finish top-k / top-p on. The logits never leave the GPU whole: a few bytes come
//! back for greedy and Gumbel draws, at most [`DEVICE_CANDIDATES`] pairs otherwise.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, PushKernelArg};
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
/// A row's result header: token, candidates found, max, denominator.
const HEADER: usize = 4;
/// 64-bit words per row of the settings table (`SAMPLE_ROW_WORDS` in sample.cuh).
const ROW_WORDS: usize = 5;
/// Rows per launch: the table is a kernel parameter of this many rows (`SAMPLE_ROWS`).
const TABLE_ROWS: usize = 32;

/// Samples one row of f32 logits (`[vocab]` or `[1, vocab]`) on its GPU; `None` when the logits
/// are not an f32 CUDA tensor (the host samples).
pub fn sample_row(logits: &Tensor, req: &RowSampling<'_>) -> Result<Option<DeviceDraw>> {
    Ok(sample_rows(&[(logits, *req)])?.and_then(|mut draws| draws.pop()))
}

/// Samples every row (each `[vocab]` or `[1, vocab]` f32 logits) on their GPU in the same
/// launches, with one copy back for all of them (and one per row that hands back candidates):
/// a decode step's batch costs about what one row does. `None` when the rows are not all f32
/// on one CUDA device (the host samples). Each row's draw is what it would be alone.
pub fn sample_rows(rows: &[(&Tensor, RowSampling<'_>)]) -> Result<Option<Vec<DeviceDraw>>> {
    let Some((first, _)) = rows.first() else {
        return Ok(Some(Vec::new()));
    };
    let candle_core::Device::Cuda(dev) = first.device() else {
        return Ok(None);
    };
    if rows
        .iter()
        .any(|(t, _)| t.dtype() != DType::F32 || !t.device().same_device(first.device()))
    {
        return Ok(None);
    }
    let vocab = first.elem_count();
    if vocab == 0 {
        candle_core::bail!("no logits to sample from");
    }
    if let Some((t, _)) = rows.iter().find(|(t, _)| t.elem_count() != vocab) {
        candle_core::bail!(
            "rows of logits differ in length: {} and {vocab}",
            t.elem_count()
        );
    }
    let v_i = checked_i32("vocabulary", vocab)?;
    // Each row's z: its logits, or with a penalty a copy that the penalty writes into.
    let mut zs = Vec::with_capacity(rows.len());
    for (logits, req) in rows {
        let logits = logits.flatten_all()?.contiguous()?;
        if req.penalized.is_empty() || req.penalty == 1.0 {
            zs.push(logits);
            continue;
        }
        let z = logits.copy()?;
        {
            let (source, source_layout) = logits.storage_and_layout();
            let lv = f32_view(&source, source_layout.start_offset(), vocab)?;
            let (storage, layout) = z.storage_and_layout();
            let zv = f32_view(&storage, layout.start_offset(), vocab)?;
            penalize(dev, &lv, &zv, v_i, req.penalized, req.penalty)?;
        }
        zs.push(z);
    }
    let cap = DEVICE_CANDIDATES;
    let stream = dev.cuda_stream();
    let n = rows.len();
    let wants_candidates =
        |req: &RowSampling<'_>| req.temperature > 0.0 && req.gumbel_key.is_none();
    let any_candidates = rows.iter().any(|(_, req)| wants_candidates(req));
    // SAFETY: the partial kernel writes every block's pair of every row; the finish writes every
    // row's header and the first `found` candidates of the rows that want them, the only parts
    // read back.
    let mut partial = unsafe { dev.alloc::<u32>(2 * PARTIAL_BLOCKS * n) }?;
    let mut headers = unsafe { dev.alloc::<u32>(HEADER * n) }?;
    let mut candidates = unsafe { dev.alloc::<u32>(if any_candidates { 2 * cap * n } else { 1 }) }?;
    let (blocks, n_partial, cap_i) = (
        checked_u32("blocks", PARTIAL_BLOCKS)?,
        checked_i32("blocks", PARTIAL_BLOCKS)?,
        checked_i32("cap", cap)?,
    );
    let partial_fn = dev.get_or_load_custom_func("sample_argmax_partial_f32", MODULE, PTX)?;
    let finish_fn = dev.get_or_load_custom_func("sample_row_f32", MODULE, PTX)?;
    let threads = if any_candidates {
        FINISH_THREADS
    } else {
        THREADS
    };
    for (chunk, group) in zs
        .chunks(TABLE_ROWS)
        .zip(rows.chunks(TABLE_ROWS))
        .enumerate()
    {
        let first = chunk * TABLE_ROWS;
        let mut table = [0u64; ROW_WORDS * TABLE_ROWS];
        for (r, (z, (_, req))) in group.0.iter().zip(group.1).enumerate() {
            let (storage, layout) = z.storage_and_layout();
            let zv = f32_view(&storage, layout.start_offset(), vocab)?;
            let (address, _sync) = zv.device_ptr(&stream);
            let flags =
                u64::from(req.gumbel_key.is_some()) | (u64::from(wants_candidates(req)) << 1);
            table[r * ROW_WORDS..(r + 1) * ROW_WORDS].copy_from_slice(&[
                address,
                req.gumbel_key.unwrap_or(0),
                u64::from(req.temperature.to_bits()),
                req.top.clamp(1, cap) as u64,
                flags,
            ]);
        }
        let n_rows = checked_u32("rows", group.1.len())?;
        let mut part = partial.slice_mut(2 * PARTIAL_BLOCKS * first..);
        let mut b = partial_fn.builder();
        b.arg(&table).arg(&v_i).arg(&mut part);
        // SAFETY: argument types and order match `sample_argmax_partial_f32` (sample.cuh; the
        // table is its `SampleTable`); each row's address names `vocab` f32 values kept alive in
        // `zs` until the results are read back.
        unsafe { b.launch(launch_config((blocks, n_rows), THREADS, 0)) }.w()?;
        let part = partial.slice(2 * PARTIAL_BLOCKS * first..);
        let mut head = headers.slice_mut(HEADER * first..);
        let mut cand = if any_candidates {
            candidates.slice_mut(2 * cap * first..)
        } else {
            candidates.slice_mut(..)
        };
        let mut b = finish_fn.builder();
        b.arg(&table)
            .arg(&v_i)
            .arg(&part)
            .arg(&n_partial)
            .arg(&cap_i);
        b.arg(&mut head).arg(&mut cand);
        // SAFETY: argument types and order match `sample_row_f32` (sample.cuh).
        unsafe { b.launch(launch_config((1, n_rows), threads, 0)) }.w()?;
    }

    let header = dev.clone_dtoh(&headers)?;
    let mut draws = Vec::with_capacity(n);
    for (r, (_, req)) in rows.iter().enumerate() {
        let h = &header[r * HEADER..(r + 1) * HEADER];
        let (token, found, total) = (h[0], h[1] as usize, h[3]);
        draws.push(if !wants_candidates(req) {
            DeviceDraw::Token(token)
        } else if found > cap {
            DeviceDraw::TooManyTies
        } else {
            DeviceDraw::Candidates {
                sorted: read_candidates(dev, &candidates, r * 2 * cap, found, cap)?,
                total: f32::from_bits(total),
            }
        });
    }
    // The kernels have run (the copy above waited for them): the z copies may go.
    drop(zs);
    Ok(Some(draws))
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

/// The first `found` candidates of the row whose values start at `at` in `out`, sorted by
/// descending logit then ascending id.
fn read_candidates(
    dev: &CudaDevice,
    out: &CudaSlice<u32>,
    at: usize,
    found: usize,
    cap: usize,
) -> Result<Vec<(u32, f32)>> {
    let values = dev.clone_dtoh(&out.slice(at..at + found))?;
    let ids = dev.clone_dtoh(&out.slice(at + cap..at + cap + found))?;
    let mut sorted: Vec<(u32, f32)> = ids
        .into_iter()
        .zip(values.into_iter().map(f32::from_bits))
        .collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(sorted)
}
